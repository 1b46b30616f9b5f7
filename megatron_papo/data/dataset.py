"""The PAPO / ViRL39K training format and a deterministic, resumable iterator over any dataset.

A data file is parquet or jsonl; each row has a problem text (with `<image>` placeholders), an
answer and a list of images. An image is raw bytes, a file path (relative to the data file's folder,
or absolute), or a `{"bytes": ..., "path": ...}` dict (bytes win when both are set). jsonl cannot hold raw
bytes: there they are base64 strings, bare or as `{"bytes": "<base64>"}`; a bare string that names
an existing file is a path.

Bad rows (no answer, empty text, text that is not valid UTF-8, an image that does not decode, is
absurdly small or large, or a placeholder count that does not match the images) never stop a run:
they are skipped, counted by reason (`skip_metrics()`, for the metrics log), warned once each with
their row id, and summed up in one line on stderr after loading. A file that cannot be read is an
error naming the file.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from megatron_papo.data.prompts import IMAGE_PLACEHOLDER, PROMPT_TEMPLATES, render_prompt
from megatron_papo.data.rewards import parse_choices
from megatron_papo.data.tokenizer import CHAT_SPECIAL_TOKENS

if TYPE_CHECKING:
    from megatron_papo.data.synthetic import SyntheticConfig
from megatron_papo.data.sample import Sample

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    path: str = ""                      # parquet or jsonl file in the PAPO / ViRL39K format
    problem_key: str = "problem"        # column with the problem text (`<image>` marks each image)
    answer_key: str = "answer"          # column with the ground-truth answer
    image_key: str = "images"           # column with the list of images (bytes / path / {"bytes","path"})
    prompt_template: str = "papo"       # a name in PROMPT_TEMPLATES or a literal template with `{content}`
    min_image_side: int = 28            # images with a shorter side are bad rows (the processor needs 28 px)
    max_image_side: int = 16384         # images with a longer side are bad rows
    # Images with more pixels are bad rows, checked from the header before decoding (a 12 KB PNG can
    # declare 10^8 pixels). 16x the processor's max_pixels (PAPO: 1280*28^2; raise both together): the
    # processor shrinks anything larger anyway, 16x still admits a 12-megapixel photo, and each
    # decoded copy is then at most ~64 MB (16M pixels x 4 bytes), not 0.4 GB as at the old 10^8.
    max_image_pixels: int = 16 * 1280 * 28 * 28
    seed: int = 0                       # shuffling seed (each epoch is a seeded permutation)
    shuffle: bool = True                # False: file order every epoch

    @property
    def template(self) -> str:
        return PROMPT_TEMPLATES.get(self.prompt_template, self.prompt_template)


class BadRow(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class SkipStats:
    """Bad rows by reason, with their row ids (the row's 0-based index in the file)."""
    counts: Counter = field(default_factory=Counter)
    rows: dict[str, list[int]] = field(default_factory=dict)
    _seen: set = field(default_factory=set, repr=False)

    def add(self, reason: str, row: int) -> bool:
        """Count a bad row once, however many epochs meet it; True the first time."""
        if (reason, row) in self._seen:
            return False
        self._seen.add((reason, row))
        self.counts[reason] += 1
        self.rows.setdefault(reason, []).append(row)
        return True

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "no bad rows"
        parts = [f"{r}={n} (rows {self.rows[r][:5]}{'...' if n > 5 else ''})" for r, n in sorted(self.counts.items())]
        return f"skipped {self.total} bad rows: " + ", ".join(parts)

    def metrics(self) -> dict[str, int]:
        """{"data/skipped_rows": total, "data/skipped/<reason>": count}, for the metrics log."""
        return {"data/skipped_rows": self.total, **{f"data/skipped/{r}": n for r, n in sorted(self.counts.items())}}


# ---------------------------------------------------------------- reading files

class ParquetRows:
    """Rows of a memory-mapped parquet table, made into dicts one at a time (image bytes stay on disk)."""

    def __init__(self, table, path: str):
        self.table, self.path = table, path

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int) -> dict:
        return self.table.slice(i, 1).to_pylist()[0]

    def __iter__(self):
        try:
            for batch in self.table.to_batches(max_chunksize=256):
                yield from batch.to_pylist()
        except (OSError, ValueError) as e:  # pyarrow's errors for damaged pages subclass these
            raise ValueError(f"data file {self.path}: corrupt parquet data: {e}") from e

    @property
    def columns(self) -> set[str]:
        return set(self.table.column_names)


def read_rows(path: str) -> "ParquetRows | list[dict | BadRow]":
    """The rows of a parquet or jsonl file (dicts); a clear error naming the file when unreadable.

    A jsonl line that is not valid UTF-8 comes back as a BadRow in its place (one bad row, not a
    dead file); a line that is not JSON still fails the file (it is not a jsonl file then).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        import pyarrow.parquet as pq

        try:
            return ParquetRows(pq.read_table(path, memory_map=True), path)
        except Exception as e:
            raise ValueError(f"data file {path} is not a readable parquet file: {e}") from e
    if ext in (".jsonl", ".json"):
        rows = []
        with open(path, "rb") as f:  # decoded line by line, so one bad line costs one row
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    rows.append(BadRow("invalid_text", f"line {lineno} is not valid UTF-8 ({e.reason} at byte {e.start})"))
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"data file {path} line {lineno} is not valid JSON: {e}") from e
                if not isinstance(row, dict):
                    raise ValueError(f"data file {path} line {lineno} is not a JSON object")
                rows.append(row)
        return rows
    raise ValueError(f"data file {path}: unsupported extension {ext!r}; expected .parquet or .jsonl")


def _image_bytes(image, folder: str) -> bytes:
    """Raw bytes of one image given as bytes, a path, or a {"bytes", "path"} dict."""
    if isinstance(image, dict):
        if image.get("bytes") is not None:
            image = image["bytes"]
        elif image.get("path"):
            image = image["path"]
        else:
            raise BadRow("missing_image", "image dict has neither bytes nor path")
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, str):
        path = image if os.path.isabs(image) else os.path.join(folder, image)
        if not os.path.isfile(path):
            try:  # jsonl cannot hold raw bytes: a long string that is not a file may be base64 bytes
                if len(image) > 64:
                    return base64.b64decode(image, validate=True)
            except ValueError:
                pass
            raise BadRow("missing_image", f"image file {path} not found")
        with open(path, "rb") as f:
            return f.read()
    raise BadRow("missing_image", f"image of type {type(image).__name__} (expected bytes, path or dict)")


def _read_image(image, folder: str, c: "DataConfig", decode: bool):
    """Checks the size the header declares (nothing is decoded for that); then, with decode=True,
    returns the RGB uint8 [H, W, 3] array."""
    data = _image_bytes(image, folder)
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if min(w, h) < c.min_image_side:
                raise BadRow("image_too_small", f"{w}x{h} px, min side {c.min_image_side}")
            if max(w, h) > c.max_image_side or w * h > c.max_image_pixels:
                raise BadRow("image_too_large", f"{w}x{h} px, max side {c.max_image_side}, max pixels {c.max_image_pixels}")
            if decode:
                return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except BadRow:
        raise
    except Image.DecompressionBombError as e:
        raise BadRow("image_too_large", str(e)) from None
    except Exception as e:
        raise BadRow("undecodable_image", f"{type(e).__name__}: {e}") from None


def _text(row: dict, key: str):
    """row[key], bytes (a parquet binary column) decoded as UTF-8; BadRow when it is not valid UTF-8
    or is a string the tokenizer cannot encode (a lone UTF-16 surrogate, e.g. JSON "\\ud800")."""
    value = row.get(key)
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRow("invalid_text", f"{key!r} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRow("invalid_text", f"{key!r} has a lone UTF-16 surrogate (not valid Unicode text)") from None
    return value


def _decode_b64(value):
    """jsonl stores bytes as base64 strings inside {"bytes": ...}."""
    if isinstance(value, dict) and isinstance(value.get("bytes"), str):
        try:
            return {**value, "bytes": base64.b64decode(value["bytes"], validate=True)}
        except ValueError:
            raise BadRow("undecodable_image", "image bytes are not valid base64") from None
    return value


# ---------------------------------------------------------------- the dataset

class PapoDataset:
    """Map-style dataset over the good rows of a PAPO / ViRL39K file; `ds[i]` is a Sample.

    sample_id is the row's index in the file, so it survives filtering and reshuffling.
    """

    def __init__(self, config: DataConfig):
        self.config = config
        self.folder = os.path.dirname(os.path.abspath(config.path))
        self.stats = SkipStats()
        self._bad: set[int] = set()  # rows found bad on full decode: never decoded again
        self.max_images = 0  # the most images of a good row (the rollout engine's images-per-prompt limit)
        # every rank reads the same file, so rank 0 alone reports what the load finds
        self._report_load = os.environ.get("RANK", "0") == "0"
        self._rows = read_rows(config.path)
        columns = (self._rows.columns if isinstance(self._rows, ParquetRows)
                   else set().union(*(r for r in self._rows if isinstance(r, dict))))
        for key in (config.problem_key, config.answer_key):
            if columns and key not in columns:  # (a file of only undecodable lines has no columns)
                raise ValueError(f"data file {config.path} has no column {key!r}; columns: {sorted(columns)}")
        self._good: list[int] = []
        for i, row in enumerate(self._rows):
            try:
                if isinstance(row, BadRow):  # read_rows could not even decode it
                    raise row
                self._check(row)
                self._good.append(i)
                self.max_images = max(self.max_images, len(self._images_of(row)))
            except BadRow as e:
                self._skip(e, i, report=self._report_load)
        if self._report_load:  # a plain line: nothing configures logging, and INFO would never show
            print(f"{config.path}: {len(self._good)} good rows, {self.stats.summary()}", file=sys.stderr, flush=True)

    def _skip(self, e: BadRow, row: int, report: bool = True) -> None:
        if self.stats.add(e.reason, row) and report:  # once per row, however many epochs meet it
            logger.warning("%s row %d skipped: %s", self.config.path, row, e)

    def skip_metrics(self) -> dict[str, int]:
        """Bad rows so far: {"data/skipped_rows": total, "data/skipped/<reason>": count}."""
        return self.stats.metrics()

    def _images_of(self, row: dict) -> list:
        images = row.get(self.config.image_key) or []
        if not isinstance(images, (list, tuple)):
            images = [images]
        return [_decode_b64(im) for im in images]

    def _check(self, row: dict) -> None:
        """Cheap checks at load time: text, answer, image headers (size) — no full decode."""
        c = self.config
        problem, answer = _text(row, c.problem_key), _text(row, c.answer_key)
        if answer is None or not str(answer).strip():
            raise BadRow("missing_answer", f"empty or missing {c.answer_key!r}")
        if not isinstance(problem, str) or not problem.replace(IMAGE_PLACEHOLDER, "").strip():
            raise BadRow("empty_text", f"empty or missing {c.problem_key!r}")
        special = [t for t in CHAT_SPECIAL_TOKENS if t in problem]
        if special:  # the tokenizer would read them as the chat's structure or as image slots
            raise BadRow("special_token", f"{c.problem_key!r} holds the chat template's special tokens {special}")
        images = self._images_of(row)
        n_placeholders = problem.count(IMAGE_PLACEHOLDER)
        if n_placeholders and n_placeholders != len(images):
            raise BadRow("placeholder_mismatch", f"{n_placeholders} {IMAGE_PLACEHOLDER} placeholders, {len(images)} images")
        for image in images:
            _read_image(image, self.folder, c, decode=False)

    def __len__(self) -> int:
        return len(self._good)

    def load(self, index: int) -> Sample:
        """Sample `index` (0 <= index < len); raises BadRow if an image fails to fully decode."""
        c = self.config
        row_id = self._good[index]
        row = self._rows[row_id]
        images = [_read_image(image, self.folder, c, decode=True) for image in self._images_of(row)]
        problem = _text(row, c.problem_key)
        if images and IMAGE_PLACEHOLDER not in problem:
            problem = IMAGE_PLACEHOLDER * len(images) + problem  # images first, as chat UIs put them
        return Sample(sample_id=row_id, prompt=render_prompt(c.template, problem), answer=str(_text(row, c.answer_key)).strip(),
                      images=images, choices=parse_choices(problem))

    def __getitem__(self, index: int) -> Sample | None:
        """Sample `index`, or None (counted and logged) when the row turns out bad on full decode."""
        if self._good[index] in self._bad:
            return None
        try:
            return self.load(index)
        except BadRow as e:
            self._bad.add(self._good[index])
            self._skip(e, self._good[index])
            return None


class ResumableIterator:
    """Endless, deterministic iteration over a map-style dataset, epoch after epoch.

    Epoch e visits the dataset in the order of a permutation seeded by (seed, e) (or file order
    without shuffle). `state_dict()` is the position (epoch, index within the epoch); a run that
    loads it continues with exactly the sample that would have come next. Items that come back as
    None (rows found bad on full decode) are skipped; the skip is deterministic, so resume stays exact.
    """

    def __init__(self, dataset, seed: int = 0, shuffle: bool = True):
        if len(dataset) == 0:
            raise ValueError("dataset has no usable rows")
        self.dataset, self.seed, self.shuffle = dataset, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> np.ndarray:
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, self.epoch]).permutation(n)

    def __iter__(self):
        return self

    def __next__(self) -> Sample:
        for _ in range(len(self.dataset) + 1):  # at most one full epoch of bad rows before giving up
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._make_order()
            index = int(self._order[self.position])
            self.position += 1
            sample = self.dataset[index]
            if sample is not None:
                return sample
        raise RuntimeError("every row of the dataset failed to load")

    def take(self, n: int) -> list[Sample]:
        return [next(self) for _ in range(n)]

    def skip_metrics(self) -> dict[str, int]:
        """The dataset's bad-row counts for the metrics log ({} for datasets without bad rows)."""
        return self.dataset.skip_metrics() if hasattr(self.dataset, "skip_metrics") else {}

    def state_dict(self) -> dict:
        return {"seed": self.seed, "shuffle": self.shuffle, "epoch": self.epoch, "position": self.position,
                "dataset_len": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        if state["dataset_len"] != len(self.dataset) or state["seed"] != self.seed or state["shuffle"] != self.shuffle:
            raise ValueError(f"iterator state {state} does not match this dataset (len {len(self.dataset)}, "
                             f"seed {self.seed}, shuffle {self.shuffle})")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._make_order()


def build_iterator(config: "DataConfig | SyntheticConfig") -> ResumableIterator:
    """The training stream for a data file (DataConfig) or the built-in synthetic task (SyntheticConfig)."""
    from megatron_papo.data.synthetic import SyntheticConfig, SyntheticShapes

    if isinstance(config, SyntheticConfig):
        return ResumableIterator(SyntheticShapes(config), seed=config.seed)
    return ResumableIterator(PapoDataset(config), seed=config.seed, shuffle=config.shuffle)
