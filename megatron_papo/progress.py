"""Progress of long work: a tqdm bar on a terminal; in a log file (SLURM, `make demo > log`) a
plain line every few percent instead of hundreds of carriage-return redraws, as Megatron-LM prints."""
from __future__ import annotations

import sys
import time


class Progress:
    """Iterate `iterable` (of `total` items) showing progress; `set_postfix(key=value)` adds figures.
    `enabled=False` (e.g. ranks other than 0) shows nothing."""

    def __init__(self, iterable, desc: str, total: int | None = None, unit: str = "it", enabled: bool = True,
                 every_percent: int = 10, stream=None):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.stream = stream or sys.stderr
        self.enabled, self.every = enabled, every_percent
        self.postfix: dict = {}
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=desc, unit=unit, file=self.stream)

    def set_postfix(self, **values) -> None:
        self.postfix = values
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def __iter__(self):
        start, shown = time.perf_counter(), -1
        for i, item in enumerate(self.iterable, 1):
            yield item
            if self.bar is not None:
                self.bar.update(1)
            elif self.enabled and self.total:
                percent = 100 * i // self.total
                if percent // self.every > shown or i == self.total:
                    shown = percent // self.every
                    figures = "".join(f" {k}={v}" for k, v in self.postfix.items())
                    print(f"{self.desc}: {i}/{self.total} {self.unit} ({percent}%, {time.perf_counter() - start:.0f} s)"
                          f"{figures}", file=self.stream, flush=True)
        if self.bar is not None:
            self.bar.close()
