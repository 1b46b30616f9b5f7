"""What a user sees: one line per step, metrics.jsonl, tensorboard, PNG curves, and the training-health alarms.

Only the logging rank (global rank 0) writes; the others hold a disabled logger, so callers never
branch on rank themselves.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_papo.folders import write_text_atomic

# Keys shown on the one-line summary, in this order, with their short names.
CONSOLE_KEYS = [
    ("reward", "reward"), ("accuracy", "acc"), ("kl_prcp", "kl_prcp"), ("entropy", "ent"),
    ("masked_entropy", "ent_masked"), ("clipfrac_low", "clip_lo"), ("clipfrac_high", "clip_hi"),
    ("ref_kl", "ref_kl"), ("grad_norm", "gnorm"), ("response_len", "len"), ("tokens_per_s", "tok/s"),
    ("val/accuracy", "val_acc"), ("val/pass_at_k", "val_pass"),
]
# Curves plotted at the end of a run (one panel each, when present).
SMOOTHING = 5  # steps in the moving average drawn over each curve
PLOT_KEYS = ["reward", "accuracy", "val/accuracy", "kl_prcp", "entropy", "masked_entropy", "ref_kl", "clipfrac_high", "grad_norm"]


# Each alarm's name and the start of its message (its WARNING line); megatron_papo.study reads logs by them.
ALARM_PREFIXES = {"loss hacking": "possible loss hacking", "collapse": "training collapse"}


@dataclass
class MonitorConfig:
    tensorboard: bool = True          # also write tensorboard event files (needs the tensorboard package)
    plots: bool = True                # write PNG curves (needs matplotlib) at the end of a run
    alarm_window: int = 5             # steps in the recent window compared against the earlier baseline
    alarm_kl_factor: float = 3.0      # alarm when recent mean KL_prcp exceeds this factor x the baseline mean
    alarm_entropy_rise: float = 0.10  # ... while the masked policy's entropy rose by at least this fraction
    alarm_accuracy_fraction: float = 0.5  # collapse alarm when recent mean training accuracy < this x the earlier mean (0: off)
    stop_on_alarm: bool = False       # stop the run (after a checkpoint) when an alarm fires


def _windows(history: list[dict[str, Any]], keys: tuple[str, ...], w: int,
             min_earlier: int) -> tuple[list[dict], list[dict]] | None:
    """(earlier steps, last `w` steps) of the rows whose `keys` are all finite numbers (a diverged
    step's NaN is stored as the string "nan" and left out); None until `min_earlier` steps precede
    the last `w`."""
    rows = [h for h in history if all(isinstance(h.get(k), (int, float)) and math.isfinite(h[k]) for k in keys)]
    return (rows[:-w], rows[-w:]) if len(rows) >= w + min_earlier else None


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def loss_hacking_alarm(history: list[dict[str, float]], cfg: MonitorConfig) -> str | None:
    """PAPO's collapse signature (docs/papo.md "Loss hacking"): KL_prcp jumps while the masked
    policy's entropy rises, i.e. the model inflates the perception KL by spreading its masked-image
    distribution (emitting garbage without the image) rather than by sharpening the real one. The
    real policy's entropy is reported, not required: in the paper it rises too, but in the study's
    collapse here (docs/results.md) it fell while the masked entropy rose sevenfold, and a KL that
    grows with a steady masked entropy is what PAPO asks for. Compares the last `alarm_window`
    steps with the steps before them. Returns a human-readable reason, or None."""
    split = _windows(history, ("kl_prcp", "entropy", "masked_entropy"), cfg.alarm_window, cfg.alarm_window)
    if split is None:
        return None
    base, recent = split
    kl_base, kl_now = _mean(base, "kl_prcp"), _mean(recent, "kl_prcp")
    rises = {k: (_mean(recent, k) - _mean(base, k)) / max(abs(_mean(base, k)), 1e-8) for k in ("entropy", "masked_entropy")}
    if kl_now > cfg.alarm_kl_factor * max(kl_base, 1e-8) and rises["masked_entropy"] >= cfg.alarm_entropy_rise:
        return (f"{ALARM_PREFIXES['loss hacking']}: KL_prcp {kl_base:.4g} -> {kl_now:.4g} (x{kl_now / max(kl_base, 1e-8):.1f}) "
                f"while masked entropy rose {rises['masked_entropy']:+.0%} (entropy {rises['entropy']:+.0%}) "
                f"(last {cfg.alarm_window} steps vs before); consider lowering gamma or raising eta")
    return None


def collapse_alarm(history: list[dict[str, float]], cfg: MonitorConfig) -> str | None:
    """A training collapse, whatever the objective: the mean training accuracy (the verified share of
    the step's responses) of the last `alarm_window` steps is below `alarm_accuracy_fraction` x the
    mean of all steps before, judged from step `alarm_window` + 1 on, so a policy that loses half
    its accuracy in its first updates is caught against the first step. The collapses on record
    here (docs/results.md: GRPO, and PAPO_G at the published and at a high gamma) ended at accuracy
    0 with the reference KL up 5-10x and the responses stuck at the length limit or at one token;
    KL_prcp fell with the rest, so the loss-hacking signature missed them. The reference KL and the
    response length are reported for the diagnosis, not required: a healthy run's reference KL
    also grows several-fold as it leaves the reference. Accuracy, not reward: reward adds format
    and length terms whose scale depends on the preset. Returns a human-readable reason, or None."""
    if cfg.alarm_accuracy_fraction <= 0:
        return None
    split = _windows(history, ("accuracy",), cfg.alarm_window, 1)
    if split is None:
        return None
    base, recent = split
    acc_base, acc_now = _mean(base, "accuracy"), _mean(recent, "accuracy")
    if acc_base <= 0 or acc_now >= cfg.alarm_accuracy_fraction * acc_base:
        return None
    seen = [f"{k} {_mean(base, k):.3g} -> {_mean(recent, k):.3g}" for k in ("ref_kl", "response_len")
            if all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k]) for r in base + recent)]
    return (f"{ALARM_PREFIXES['collapse']}: accuracy {acc_base:.3f} -> {acc_now:.3f} (below {cfg.alarm_accuracy_fraction:g}x)"
            + (f", {', '.join(seen)}" if seen else "") + f" (last {cfg.alarm_window} steps vs before); "
            "consider a new run from an earlier checkpoint (model.load=<its step folder>) with a lower optim.lr "
            "or algo.gamma")


def training_alarms(history: list[dict[str, float]], cfg: MonitorConfig) -> list[str]:
    """Every alarm that fires on this history: PAPO's loss-hacking signature, and a collapse."""
    return [a for a in (loss_hacking_alarm(history, cfg), collapse_alarm(history, cfg)) if a]


def validation_comparison(before: dict | None, after: dict) -> str:
    """The end-of-run verdict on the validation split: accuracy before RL (step 0) and after, and the
    change with its paired standard error over problems (the same problems and sampling seeds at
    both steps, so each problem's difference is one draw of the change)."""
    k, n = after["k"], after["problems"]
    head = f"validation: {n} held-out problems (synthetic seed {after['seed']}), k={k}"
    now = f"step {after['step']} avg@{k} {after['accuracy']:.3f} pass@{k} {after['pass_at_k']:.3f}"
    if before is None or (before["seed"], before["k"], len(before["per_problem"])) != (after["seed"], k, n):
        return f"{head}: {now} (no step-0 validation of the same split to compare with)"
    diffs = [a - b for a, b in zip(after["per_problem"], before["per_problem"])]
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else float("nan")
    verdict = "above the noise (> 2 s.e.)" if abs(mean) > 2 * se else "within the noise (<= 2 s.e.)"
    return (f"{head}: before RL (step 0) avg@{k} {before['accuracy']:.3f} pass@{k} {before['pass_at_k']:.3f}; "
            f"after {now}; change {mean:+.3f} +- {se:.3f} (paired standard error), {verdict}")


def format_line(step: int, metrics: dict[str, Any], phase_seconds: dict[str, float]) -> str:
    parts = [f"step {step:>5d}"]
    for key, short in CONSOLE_KEYS:
        if key in metrics:
            v = metrics[key]
            parts.append(f"{short} {v:.4g}" if isinstance(v, float) else f"{short} {v}")
    if phase_seconds:
        parts.append("time " + " ".join(f"{k} {v:.1f}s" for k, v in phase_seconds.items()))
    return " | ".join(parts)


class MetricsLogger:
    def __init__(self, out_dir: str | Path, cfg: MonitorConfig, enabled: bool = True, resume_step: int = 0):
        self.cfg, self.enabled = cfg, enabled
        self.out_dir = Path(out_dir)
        self.history: list[dict[str, Any]] = []
        self._tb = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.out_dir / "metrics.jsonl"
        # A resumed run keeps the rows up to its checkpoint and drops those of steps it will redo.
        if self.jsonl_path.exists():
            rows = [json.loads(line) for line in self.jsonl_path.read_text().splitlines() if line.strip()]
            self.history = [r for r in rows if r.get("step", 0) <= resume_step]
            write_text_atomic(self.jsonl_path, "".join(json.dumps(r) + "\n" for r in self.history))
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=resume_step + 1)
            except ImportError:
                print("[metrics] tensorboard is not installed: skipping tensorboard logs")

    def log(self, step: int, metrics: dict[str, Any], phase_seconds: dict[str, float] | None = None) -> str | None:
        """Record one step; prints the one-line summary. Returns the alarms' text if any fired."""
        if not self.enabled:
            return None
        phase_seconds = phase_seconds or {}
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()},
               **{f"time/{k}": round(v, 4) for k, v in phase_seconds.items()}}
        self.history.append(row)
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        print(format_line(step, row, phase_seconds), flush=True)
        alarms = training_alarms(self.history, self.cfg)
        for alarm in alarms:
            print(f"WARNING [step {step}] {alarm}", flush=True)
        return "; ".join(alarms) or None

    def close(self) -> list[Path]:
        """Flush tensorboard and write the PNG curves; returns the files written."""
        if not self.enabled:
            return []
        if self._tb is not None:
            self._tb.close()
        return plot_curves(self.history, self.out_dir) if self.cfg.plots else []


def plot_curves(history: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    keys = [k for k in PLOT_KEYS if any(k in h for h in history)]
    if not keys:
        return []
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[metrics] matplotlib is not installed: no plots written")
        return []
    cols = min(4, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(h["step"], h[key]) for h in history if key in h and isinstance(h[key], (int, float))]
        steps, values = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(steps, values, marker=".", alpha=0.35, label="per step")
        if len(values) >= 2 * SMOOTHING:  # RL metrics are noisy: the trend is what one looks for
            smooth = [sum(values[max(0, i - SMOOTHING + 1): i + 1]) / len(values[max(0, i - SMOOTHING + 1): i + 1])
                      for i in range(len(values))]
            ax.plot(steps, smooth, linewidth=2, label=f"mean of last {SMOOTHING}")
            ax.legend(fontsize=7)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    path = out_dir / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float):
        return round(v, 8) if math.isfinite(v) else str(v)
    return v
