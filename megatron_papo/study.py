"""Does PAPO do what the paper says, here? Presets x seeds on the synthetic task, from one SFT checkpoint.

    python -m megatron_papo.study                                   # grpo, papo_g, papo_h x seeds 1 2 3
    python -m megatron_papo.study --scenario collapse --gamma 0.2   # do the training-health alarms fire?

For each seed:
1. one SFT warm-up (`megatron_papo.train` with steps=0 and sft_steps > 0 writes its step-0
   checkpoint), in <out>/seed_<s>/sft;
2. every preset starts from that checkpoint's weights (`model.load=<step 0>`, sft_steps=0), in
   <out>/seed_<s>/<label>: presets differ only in the RL objective (same weights, data order,
   rollout seeds, masks and step count). The trainer refuses to resume a checkpoint under another
   preset (trainer/checkpoint.py CHANGEABLE_ON_RESUME), hence model.load: the RL runs themselves are
   ordinary runs, resumed with --resume auto when the study is run again;
3. the SFT checkpoint and every final checkpoint are evaluated (megatron_papo.eval.Evaluator) on a
   held-out synthetic split (--eval-seed, a seed no training or warm-up run draws from), k samples
   per problem, on the real image and on the masked image (the run's mask config, masked as in
   training): avg@k, pass@k, and the perception gap avg@k(real) - avg@k(masked);
4. failures on the real image are read for perception errors: the SFT targets teach the model to
   describe the scene in its `<think>` block, so a description that names a wrong count, colour or
   shape (or, on level 3, order) is one (data/synthetic.py perception_errors); failures without a
   readable description are counted apart ("undescribed").

Outputs in --out (outputs/study), shared by the scenarios: a run is the same run in every scenario
that has it (the SFT warm-ups, GRPO), so a second scenario resumes it ("nothing to do") instead of
training it again. Per scenario: results_<scenario>.md (preset x metric, mean +- std over seeds,
all levels and per level), results_<scenario>.json (every number, per run), curves_<scenario>.png
(training curves, one line per preset, seeds shaded); shared: eval/ (every response, cached per
checkpoint) and each run's folder (train.log, metrics.jsonl, checkpoints).
--docs writes the same table, the command and the alarm verdicts into docs/results.md (one
section per scenario). `--set key=value` passes an option to every training run.

`--scenario collapse`: grpo, papo_g and papo_h with --gamma (default 0.2) instead of their 0.02:
the high-gamma PAPO without double entropy should collapse (docs/papo.md "Loss hacking"), the
same gamma with double entropy should not. The training-health alarms (trainer/metrics.py: loss
hacking, collapse) are read from each run's log ("WARNING [step N] ...") and recomputed from its
metrics.jsonl.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from megatron_papo.folders import write_text_atomic
from megatron_papo.trainer.metrics import ALARM_PREFIXES, MonitorConfig, training_alarms

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = {"default": ("grpo", "papo_g", "papo_h"), "collapse": ("grpo", "papo_g", "papo_h")}
COLLAPSE_GAMMA = 0.2          # 10x the published gamma
TRAIN_WINDOW = 5              # training metrics in the table: the mean over the last this many steps
CURVE_KEYS = ["reward", "accuracy", "kl_prcp", "entropy", "masked_entropy", "clipfrac_low", "clipfrac_high", "ref_kl",
              "response_len"]
AT_LIMIT = 0.9                # a step's responses are "at the length limit" when their mean length >= this x max_new_tokens
SMOOTHING = 5                 # moving average of the curves (runs of at least 2 x this many steps)
SFT = "sft"                   # the label of the warm-up checkpoint in tables
ALARM_LINE = re.compile(r"WARNING \[step (\d+)\] (" + "|".join(map(re.escape, ALARM_PREFIXES.values())) + ")")
ALARMS_HEAD = f"Training-health alarms (trainer/metrics.py: {', '.join(ALARM_PREFIXES)})"
SFT_PRESET = "grpo"           # the warm-up's loss is SFT's whatever the preset; one preset lets scenarios share it
SHOWN_LINES = re.compile(r"^(step |WARNING|error|nothing to do|resuming|stopping|Traceback)")
DOCS_DEFAULT = "docs/results.md"


class StudyError(RuntimeError):
    """A run that failed or a setting that cannot work; one message saying which."""


@dataclass
class Run:
    seed: int
    label: str                # table row and folder name: the preset, plus its gamma when --gamma changed it
    preset: str
    overrides: list[str] = field(default_factory=list)  # objective overrides on top of the preset (algo.gamma)
    folder: Path = Path()

    @property
    def ckpt_dir(self) -> Path:
        return self.folder / "checkpoints"


# ------------------------------------------------------------------ plan
def plan(args) -> tuple[dict[int, Run], list[Run]]:
    """SFT run per seed, and the RL runs (seed-major)."""
    from megatron_papo.algos import load_preset

    out = Path(args.out)
    sft = {s: Run(s, SFT, SFT_PRESET, folder=out / f"seed_{s}" / SFT) for s in args.seeds}
    runs = []
    for s in args.seeds:
        for preset in args.presets:
            extra, label = [], preset
            if args.gamma is not None and load_preset(preset).gamma > 0:
                extra, label = [f"algo.gamma={args.gamma}"], f"{preset}_gamma{args.gamma:g}"
            runs.append(Run(s, label, preset, extra, folder=out / f"seed_{s}" / label))
    labels = [r.label for r in runs if r.seed == args.seeds[0]]
    if len(set(labels)) != len(labels) or SFT in labels:
        raise StudyError(f"--presets gives the runs {labels}: each must appear once (and not be named {SFT!r})")
    return sft, runs


def common_overrides(args, seed: int) -> list[str]:
    """Every run of a seed: the user's --set, then what the study fixes (after, so it wins)."""
    levels = "[" + ",".join(map(str, args.levels)) + "]" if args.levels else None
    # validation.problems=0: the study evaluates every checkpoint itself, on its own held-out split
    return [*args.set, f"seed={seed}", f"synthetic.seed={seed}", f"steps={args.steps}", "validation.problems=0",
            *([f"synthetic.levels={levels}"] if levels else [])]


def sft_command(args, run: Run) -> list[str]:
    return _train_command(args, [*common_overrides(args, run.seed), f"preset={run.preset}", "steps=0",
                                 f"sft_steps={args.sft_steps}", f"output_dir={run.folder}"])


def rl_command(args, run: Run, sft_step0: Path) -> list[str]:
    # model.hf_dir= : the SFT weights, not the config's starting folder (which _init_weights prefers)
    return _train_command(args, [*common_overrides(args, run.seed), f"preset={run.preset}", *run.overrides,
                                 "sft_steps=0", f"model.load={sft_step0}",
                                 "model.hf_dir=", f"output_dir={run.folder}"])


def _train_command(args, overrides: list[str]) -> list[str]:
    # steps=0 of the SFT run comes after the common steps=: the later override wins
    return [sys.executable, "-m", "megatron_papo.train", "--config", args.config, "--resume", "auto", *overrides]


# ------------------------------------------------------------------ training (the trainer's CLI)
def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    for key, value in (("OMP_NUM_THREADS", "1"), ("VLLM_CPU_KVCACHE_SPACE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                       ("PYTHONWARNINGS", "ignore")):
        env.setdefault(key, value)
    return env


_print_lock = threading.Lock()


def train(command: list[str], run: Run, tag: str) -> None:
    """Run the trainer; its output goes to <run>/train.log (appended), its step lines to the console."""
    run.folder.mkdir(parents=True, exist_ok=True)
    log = run.folder / "train.log"
    with _print_lock:
        print(f"[{tag}] {shlex.join(command)}", flush=True)
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(command)}\n")
        f.flush()
        proc = subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace")
        for line in proc.stdout:
            f.write(line)
            if SHOWN_LINES.match(line):
                with _print_lock:
                    print(f"[{tag}] {line.rstrip()}", flush=True)
        rc = proc.wait()
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise StudyError(f"[{tag}] the trainer exited with {rc}; log {log}; its last lines:\n{tail}")


def run_all(jobs: int, tasks: list) -> None:
    """tasks: (fn, args); up to `jobs` at once; every failure is reported."""
    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        futures = [pool.submit(fn, *a) for fn, a in tasks]
        errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise StudyError("\n".join(map(str, errors)))


def final_checkpoint(run: Run) -> Path:
    from megatron_papo.trainer.checkpoint import CheckpointConfig, find_resume_checkpoint

    path = find_resume_checkpoint(CheckpointConfig(save_dir=str(run.ckpt_dir), resume="auto"))
    if path is None:
        raise StudyError(f"{run.ckpt_dir}: no complete checkpoint")
    return path


def read_metrics(run: Run) -> list[dict]:
    f = run.folder / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []


def run_config(ckpt: Path) -> dict:
    import yaml

    return yaml.safe_load((ckpt / "run_config.yaml").read_text())


def _mean_of(rows: list[dict], key: str) -> float:
    """Mean of `key` over the rows that log it as a number (a preset without it, or a diverged step
    logged as "nan", has none); NaN when none do."""
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return sum(values) / len(values) if values else math.nan


def train_summary(rows: list[dict]) -> dict:
    """Means over the last TRAIN_WINDOW steps of the run's metrics.jsonl (NaN when absent)."""
    last = rows[-TRAIN_WINDOW:]
    out = {"steps": rows[-1]["step"] if rows else 0, "window": len(last)}
    for key in ("reward", "accuracy", "kl_prcp", "entropy", "masked_entropy", "clipfrac_high"):
        out[key] = _mean_of(last, key)
    return out


def length_drift(rows: list[dict], max_new_tokens: int) -> dict:
    """Whether the responses drifted to the length limit (the policy stopped ending them), and the
    reference KL before and after: tokens written past where the warm-up's model would have stopped
    are ones the reference finds unlikely, so ref_kl jumps with the length, not with a bad reference."""
    limit = AT_LIMIT * max_new_tokens
    logged = [r for r in rows if isinstance(r.get("response_len"), (int, float))]
    at = [r for r in logged if r["response_len"] >= limit]
    below = [r for r in logged if r["response_len"] < limit]
    return {"max_new_tokens": max_new_tokens, "first_step_at_limit": at[0]["step"] if at else None,
            "steps_at_limit": len(at), "ref_kl_below_limit": _mean_of(below, "ref_kl"),
            "ref_kl_at_limit": _mean_of(at, "ref_kl"), "ref_kl_step1": _mean_of(rows[:1], "ref_kl")}


def alarm_verdict(run: Run, rows: list[dict], monitor: dict) -> dict:
    """The steps at which a training-health alarm fired, and which: printed in the run's log, and
    recomputed from metrics.jsonl with trainer/metrics.py training_alarms and the run's monitor
    config. A run trained before an alarm existed has none of it in its log (agree is then False)."""
    cfg = MonitorConfig(**monitor)
    recomputed, kinds = [], set()
    for i in range(len(rows)):
        fired = training_alarms(rows[: i + 1], cfg)
        if fired:
            recomputed.append(rows[i]["step"])
            kinds |= {name for name, start in ALARM_PREFIXES.items() for a in fired if a.startswith(start)}
    log = run.folder / "train.log"
    logged = sorted({int(m.group(1)) for m in ALARM_LINE.finditer(log.read_text(errors="replace"))}) if log.is_file() else []
    logged = [s for s in logged if s <= (rows[-1]["step"] if rows else 0)]  # steps a resume redid are in the log twice
    return {"fired": bool(recomputed or logged), "steps": recomputed, "kinds": sorted(kinds), "logged_steps": logged,
            "agree": recomputed == logged}


# ------------------------------------------------------------------ evaluation
def eval_samples(args, image_size: int):
    from megatron_papo.data.synthetic import SyntheticConfig, SyntheticShapes

    ds = SyntheticShapes(SyntheticConfig(seed=args.eval_seed, levels=tuple(args.eval_levels), image_size=image_size,
                                         num_samples=args.eval_problems))
    return ds, [ds[i] for i in range(len(ds))]


def evaluate_all(args, items: list[tuple[Run, Path]]) -> dict[tuple[int, str], dict]:
    """{(seed, label): {"real": rows, "masked": rows}}, cached in <out>/eval/ by checkpoint and settings."""
    from megatron_papo.data.processor import MaskConfig
    from megatron_papo.eval import Evaluator

    folder = Path(args.out) / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    results, todo = {}, []
    for run, ckpt in items:
        key = eval_key(args, ckpt)
        f = folder / f"seed_{run.seed}_{run.label}.json"
        cached = json.loads(f.read_text()) if f.is_file() else None
        if cached and cached.get("key") == key:
            results[(run.seed, run.label)] = cached
        else:
            todo.append((run, ckpt, key, f))
    if not todo:
        return results
    cfg = run_config(todo[0][1])
    _, samples = eval_samples(args, cfg["synthetic"]["image_size"])
    r = cfg["rollout"]
    evaluator = Evaluator(todo[0][1], dtype=r["engine_dtype"], max_new_tokens=r["max_new_tokens"], seed=0)
    try:
        for run, ckpt, key, f in todo:
            print(f"[eval] seed {run.seed} {run.label}: {ckpt} ({args.eval_problems} problems x k={args.k}, "
                  "real and masked images)", flush=True)
            evaluator.load(ckpt)
            c = run_config(ckpt)
            mask = MaskConfig(**c["mask"])
            temperature, top_p = c["rollout"]["temperature"], c["rollout"]["top_p"]
            real = evaluator.run(samples, args.k, temperature, top_p)
            masked = evaluator.run(samples, args.k, temperature, top_p, mask=mask)
            entry = {"key": key, "real": real.rows, "masked": masked.rows}
            write_text_atomic(f, json.dumps(entry))
            results[(run.seed, run.label)] = entry
    finally:
        evaluator.close()
    return results


def eval_key(args, ckpt: Path) -> dict:
    return {"ckpt": str(ckpt.resolve()), "complete_mtime_ns": (ckpt / "COMPLETE").stat().st_mtime_ns,
            "k": args.k, "problems": args.eval_problems, "eval_seed": args.eval_seed, "levels": list(args.eval_levels)}


def eval_metrics(entry: dict, scenes: dict, k: int) -> dict:
    """avg@k, pass@k (real, masked), perception gap and perception errors, for all levels and per level."""
    from megatron_papo.data.synthetic import PERCEPTION_ERRORS, perception_errors

    out = {}
    levels = sorted({s.level for s in scenes.values()})
    for name, keep in [("all", lambda lv: True)] + [(f"level {lv}", (lambda lv0: lambda lv: lv == lv0)(lv))
                                                     for lv in levels]:
        real = [r for r in entry["real"] if keep(scenes[r["sample_id"]].level)]
        masked = [r for r in entry["masked"] if keep(scenes[r["sample_id"]].level)]
        problems = len({r["sample_id"] for r in real})
        avg = lambda rows: sum(r["accuracy"] for r in rows) / max(len(rows), 1)  # noqa: E731
        passed = lambda rows: len({r["sample_id"] for r in rows if r["accuracy"] > 0}) / max(problems, 1)  # noqa: E731
        failures = [r for r in real if r["accuracy"] <= 0]
        verdicts = [perception_errors(scenes[r["sample_id"]], r["response"]) for r in failures]
        perception = sum(bool(v) for v in verdicts)
        out[name] = {
            "problems": problems, "responses": len(real), "avg": avg(real), "pass": passed(real),
            "masked_avg": avg(masked), "masked_pass": passed(masked), "gap": avg(real) - avg(masked),
            "format": sum(r["format"] for r in real) / max(len(real), 1),
            "failures": len(failures), "perception_errors": perception,
            "undescribed": sum(v is None for v in verdicts),
            "perception_share": perception / len(failures) if failures else math.nan,
            "error_kinds": {e: sum(e in (v or ()) for v in verdicts) for e in PERCEPTION_ERRORS},
        }
    return out


# ------------------------------------------------------------------ tables and plots
def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def cell(values: list[float], digits: int = 3, sign: bool = False) -> str:
    m, s = mean_std(values)
    if math.isnan(m):
        return "-"
    text = f"{m:+.{digits}f}" if sign else f"{m:.{digits}f}"
    return text + (f" ± {s:.{digits}f}" if not math.isnan(s) else "")


def tables(results: dict, k: int) -> str:
    """Markdown: one table over all levels (eval + training columns), then one per level."""
    labels = results["labels"]
    by_label = {label: [r for r in results["runs"] if r["label"] == label] for label in labels}
    seeds = results["settings"]["seeds"]
    lines = [f"**{results['smoke']}**", ""] if results.get("smoke") else []
    lines += [f"Mean ± std over {len(seeds)} seed{'s' * (len(seeds) > 1)} ({', '.join(map(str, seeds))}); "
             f"held-out split: synthetic seed {results['settings']['eval_seed']}, "
             f"{results['settings']['eval_problems']} problems, k={k}.", ""]
    levels = list(next(iter(results["runs"]))["eval"]) if results["runs"] else []
    if len(levels) == 2:  # one level: its table would repeat the first
        levels = levels[:1]
    for level in levels:
        runs_at = {label: [r["eval"][level] for r in rs] for label, rs in by_label.items()}
        head = [f"avg@{k}", f"pass@{k}", f"avg@{k} masked", "perception gap", "perception errors / failures",
                "undescribed / failures"]
        train_cols = level == "all"
        if train_cols:
            head += [f"train reward (last {TRAIN_WINDOW})", f"train KL_prcp (last {TRAIN_WINDOW})", "alarm fired"]
        lines += [f"### {'All levels' if level == 'all' else level.capitalize()}", "",
                  "| preset | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
        for label in labels:
            ev = runs_at[label]
            fails = sum(e["failures"] for e in ev)
            row = [cell([e["avg"] for e in ev]), cell([e["pass"] for e in ev]), cell([e["masked_avg"] for e in ev]),
                   cell([e["gap"] for e in ev], sign=True),
                   f"{cell([e['perception_share'] for e in ev])} ({sum(e['perception_errors'] for e in ev)}/{fails})",
                   f"{sum(e['undescribed'] for e in ev)}/{fails}"]
            if train_cols:
                rs = by_label[label]
                if label == SFT:
                    row += ["-", "-", "-"]
                else:
                    row += [cell([r["train"]["reward"] for r in rs]), cell([r["train"]["kl_prcp"] for r in rs], 4),
                            f"{sum(r['alarm']['fired'] for r in rs)}/{len(rs)}"]
            lines.append(f"| {label} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def alarm_lines(results: dict) -> list[str]:
    out = []
    for r in results["runs"]:
        if r["label"] == SFT:
            continue
        a = r["alarm"]
        n = len(set(a["steps"]) | set(a["logged_steps"]))
        verdict = (f"fired at step {a['steps'][0] if a['steps'] else a['logged_steps'][0]} "
                   f"({n} step{'s' * (n != 1)}; {', '.join(a['kinds']) or 'logged only'})" if a["fired"] else "did not fire")
        if not a["agree"]:
            verdict += f" (log: steps {_ranges(a['logged_steps'])}; recomputed from metrics.jsonl: steps {_ranges(a['steps'])})"
        t = r["train"]
        out.append(f"- {r['label']}, seed {r['seed']}: {verdict}; last {t['window']} of {t['steps']} steps: "
                   f"KL_prcp {_num(t['kl_prcp'])}, entropy {_num(t['entropy'])}, masked entropy "
                   f"{_num(t['masked_entropy'])}, reward {_num(t['reward'])}, accuracy {_num(t['accuracy'])}")
    return out


def drift_lines(results: dict) -> list[str]:
    out = []
    for r in results["runs"]:
        if r["label"] == SFT:
            continue
        d = r["drift"]
        where = (f"from step {d['first_step_at_limit']} ({d['steps_at_limit']} of {r['train']['steps']} steps)"
                 if d["first_step_at_limit"] is not None else "never")
        out.append(f"- {r['label']}, seed {r['seed']}: responses at the {d['max_new_tokens']}-token limit {where}; "
                   f"ref_kl {_num(d['ref_kl_below_limit'])} on the other steps, {_num(d['ref_kl_at_limit'])} at the "
                   f"limit (step 1: {_num(d['ref_kl_step1'])})")
    return out


def _ranges(steps: list[int]) -> str:
    """[6, 7, 8, 12] -> "6-8, 12"; [] -> "none"."""
    runs: list[list[int]] = []
    for step in steps:
        if runs and step == runs[-1][1] + 1:
            runs[-1][1] = step
        else:
            runs.append([step, step])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs) or "none"


def _num(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def plot_curves(histories: dict[str, list[list[dict]]], path: Path) -> Path | None:
    """One panel per CURVE_KEYS metric, one line per preset (mean over seeds), seeds' range shaded."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[study] matplotlib is not installed: no curves", flush=True)
        return None
    import numpy as np

    cols = 4
    rows = (len(CURVE_KEYS) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, CURVE_KEYS):
        for i, (label, seed_rows) in enumerate(histories.items()):
            curves = []
            for rows_ in seed_rows:
                pts = [(h["step"], h[key]) for h in rows_ if isinstance(h.get(key), (int, float))]
                if pts:
                    curves.append(dict(pts))
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            if not steps:
                continue
            values = np.array([[c[s] for s in steps] for c in curves], dtype=float)
            if len(steps) >= 2 * SMOOTHING:
                kernel = np.ones(SMOOTHING) / SMOOTHING
                values = np.array([np.convolve(np.pad(v, (SMOOTHING - 1, 0), mode="edge"), kernel, mode="valid")
                                   for v in values])
            color = f"C{i}"
            ax.plot(steps, values.mean(0), color=color, label=label, linewidth=1.6)
            if len(values) > 1:
                ax.fill_between(steps, values.min(0), values.max(0), color=color, alpha=0.2)
        ax.set_title(key + (f" (mean of last {SMOOTHING})" if any(
            len(r) >= 2 * SMOOTHING for rs in histories.values() for r in rs) else ""), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(CURVE_KEYS):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_docs(path: Path, scenario: str, command: str, results: dict, table: str, curves: Path | None) -> None:
    """The scenario's section of docs/results.md (between its markers); other sections stay. The
    curves are copied beside it (study_<scenario>_curves.png)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if curves is not None:
        curves = Path(shutil.copyfile(curves, path.parent / f"study_{scenario}_curves.png"))
    begin, end = f"<!-- study:{scenario} -->", f"<!-- /study:{scenario} -->"
    s = results["settings"]
    body = [begin, f"## Scenario `{scenario}`", "", "```bash", command, "```", "",
            f"Presets {', '.join(results['labels'][1:])}; seeds {s['seeds']}; {s['steps']} RL steps after "
            f"{s['sft_steps']} SFT steps; config {s['config']}" + (f"; overrides {' '.join(s['set'])}" if s["set"] else "")
            + ".", "", table, f"{ALARMS_HEAD}, per run:", "", *alarm_lines(results), "",
            "Response length and reference KL, per run (study.length_drift):", "", *drift_lines(results), "",
            f"![curves]({curves.name})" if curves else "", end]
    text = path.read_text() if path.is_file() else (
        "# Results: does PAPO do what the paper says, here?\n\n"
        "Written by `python -m megatron_papo.study --docs` (megatron_papo/study.py says what each number is).\n"
        "The paper's numbers are in docs/papo.md.\n\n")
    section = "\n".join(body) + "\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


# ------------------------------------------------------------------ main
def parse_args(argv):
    p = argparse.ArgumentParser(prog="megatron_papo.study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default="default")
    p.add_argument("--config", default="examples/configs/papo_tiny.yaml", help="the trainer's YAML file")
    p.add_argument("--presets", nargs="+", help="objective presets (default: the scenario's: grpo papo_g papo_h)")
    p.add_argument("--gamma", type=float, help=f"algo.gamma of every preset with a perception loss "
                                               f"(default: the presets' own; collapse: {COLLAPSE_GAMMA})")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="run seeds (seed and synthetic.seed)")
    p.add_argument("--steps", type=int, help="RL steps per run (default: the config's)")
    p.add_argument("--sft-steps", type=int, help="SFT warm-up steps (default: the config's)")
    p.add_argument("--levels", nargs="+", type=int, help="synthetic levels to train on (default: the config's)")
    p.add_argument("--eval-levels", nargs="+", type=int, help="levels to evaluate (default: the training levels)")
    p.add_argument("--k", type=int, default=8, help="samples per problem (avg@k, pass@k)")
    p.add_argument("--eval-problems", type=int, default=64, help="problems in the held-out split")
    p.add_argument("--eval-seed", type=int, default=12345, help="synthetic seed of the held-out split")
    p.add_argument("--jobs", type=int, default=1, help="training runs at once (1 is fastest on 2 cores)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="trainer options for every run")
    p.add_argument("--out", help="output folder, shared by the scenarios (default: outputs/study)")
    p.add_argument("--docs", nargs="?", const=str(REPO / DOCS_DEFAULT), help=f"also write the results into {DOCS_DEFAULT} "
                                                                 "(or the given file)")
    return p.parse_args(argv)


def resolve(args) -> None:
    """Defaults from the scenario and the config; the checks a run would only fail later."""
    from megatron_papo.train import resolve_config
    from megatron_papo.trainer.config import sft_seed

    args.presets = args.presets or list(SCENARIOS[args.scenario])
    if args.scenario == "collapse" and args.gamma is None:
        args.gamma = COLLAPSE_GAMMA
    args.out = args.out or "outputs/study"
    # the trainer runs in the repository root: absolute paths, so that the study runs from anywhere
    config = Path(args.config)
    if not config.is_file() and (REPO / config).is_file():
        config = REPO / config
    args.config, args.out = str(config.resolve()), str(Path(args.out).resolve())
    cfg = resolve_config(args.config, list(args.set))
    args.steps = cfg.steps if args.steps is None else args.steps
    args.sft_steps = cfg.sft_steps if args.sft_steps is None else args.sft_steps
    if args.sft_steps <= 0:
        raise StudyError("the study starts every preset from one SFT checkpoint per seed: --sft-steps must be > 0")
    if cfg.data.path:
        raise StudyError("the study trains and evaluates on the synthetic task (it knows each scene); unset data.path")
    # what the full study runs; anything less is labelled a smoke run in every output
    reduced = [why for why, less in (
        (f"{len(args.seeds)} seed{'s' * (len(args.seeds) > 1)}", len(args.seeds) < 3),
        (f"{args.steps} of the config's {cfg.steps} RL steps", args.steps < cfg.steps),
        (f"{args.sft_steps} of the config's {cfg.sft_steps} SFT steps", args.sft_steps < cfg.sft_steps),
        (f"k={args.k} on {args.eval_problems} problems", args.k < 8 or args.eval_problems < 64),
        ("overridden trainer options (--set)", bool(args.set))) if less]
    args.smoke = f"SMOKE RUN, NOT A RESULT (reduced: {'; '.join(reduced)})" if reduced else ""
    args.levels = args.levels or list(cfg.synthetic.levels)
    args.eval_levels = args.eval_levels or args.levels
    for s in args.seeds:  # the RL stream draws from synthetic.seed=s, the warm-up from sft_seed(s)
        if args.eval_seed in (s, sft_seed(s)):
            raise StudyError(f"--eval-seed {args.eval_seed} is a seed training draws from (seed {s}): pick another")
    if args.eval_seed == cfg.validation.seed:  # what the demo's settings were chosen on
        raise StudyError(f"--eval-seed {args.eval_seed} is the config's validation.seed: pick another")
    if len(set(args.seeds)) != len(args.seeds) or len(set(args.presets)) != len(args.presets):
        raise StudyError("--seeds and --presets must not repeat")
    for preset in args.presets:
        resolve_config(args.config, [*args.set, f"preset={preset}"])  # an unknown preset, here


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)  # megatron-core's "Apex is not installed", ...
    warnings.filterwarnings("ignore", category=FutureWarning)
    for key, value in (("OMP_NUM_THREADS", "1"), ("VLLM_CPU_KVCACHE_SPACE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)  # this process evaluates with vLLM, as the trainer's children do
    command = "python -m megatron_papo.study " + shlex.join(argv)
    try:
        resolve(args)
        sft, runs = plan(args)
        if args.smoke:
            print(f"[study] {args.smoke}", flush=True)
        # 1. one warm-up per seed, 2. every preset from it
        run_all(args.jobs, [(train, (sft_command(args, r), r, f"seed {r.seed} sft")) for r in sft.values()])
        step0 = {s: final_checkpoint(r) for s, r in sft.items()}
        for s, path in step0.items():
            if not path.name.endswith("00000000"):
                raise StudyError(f"{path}: the SFT run's checkpoint is not step 0")
        run_all(args.jobs, [(train, (rl_command(args, r, step0[r.seed]), r, f"seed {r.seed} {r.label}")) for r in runs])
        finals = {(r.seed, r.label): final_checkpoint(r) for r in runs}
        # 3. evaluation
        evals = evaluate_all(args, [(sft[s], step0[s]) for s in args.seeds]
                             + [(r, finals[(r.seed, r.label)]) for r in runs])
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    ds, _ = eval_samples(args, run_config(step0[args.seeds[0]])["synthetic"]["image_size"])
    scenes = {i: ds.scene(i) for i in range(len(ds))}
    results = {"command": command, "scenario": args.scenario, "smoke": args.smoke,
               "settings": {"seeds": args.seeds, "presets": args.presets, "gamma": args.gamma, "steps": args.steps,
                            "sft_steps": args.sft_steps, "levels": args.levels, "eval_levels": args.eval_levels,
                            "k": args.k, "eval_problems": args.eval_problems, "eval_seed": args.eval_seed,
                            "config": _shown(Path(args.config)), "set": args.set},
               "labels": [SFT] + [r.label for r in runs if r.seed == args.seeds[0]], "runs": []}
    histories: dict[str, list[list[dict]]] = {}
    for s in args.seeds:
        results["runs"].append({"seed": s, "label": SFT, "ckpt": str(step0[s]),
                                "eval": eval_metrics(evals[(s, SFT)], scenes, args.k)})
    for r in runs:
        rows = read_metrics(r)
        final = finals[(r.seed, r.label)]
        if int(final.name.split("_")[-1]) != args.steps:
            print(f"[study] note: {r.folder} ends at {final.name}, not step {args.steps}", flush=True)
        histories.setdefault(r.label, []).append(rows)
        results["runs"].append({"seed": r.seed, "label": r.label, "preset": r.preset, "overrides": r.overrides,
                                "ckpt": str(final), "train": train_summary(rows),
                                "alarm": alarm_verdict(r, rows, run_config(final)["monitor"]),
                                "drift": length_drift(rows, run_config(final)["rollout"]["max_new_tokens"]),
                                "eval": eval_metrics(evals[(r.seed, r.label)], scenes, args.k)})
    out = Path(args.out)
    table = tables(results, args.k)
    report = {ext: out / f"results_{args.scenario}.{ext}" for ext in ("md", "json")}
    report["json"].write_text(json.dumps(_finite(results), indent=1) + "\n")
    curves = plot_curves(histories, out / f"curves_{args.scenario}.png")
    alarms = alarm_lines(results)
    md = [f"# Study: {args.scenario}", "", "```bash", command, "```", "", table, f"{ALARMS_HEAD}, per run:", "",
          *alarms, "", "Response length and reference KL, per run:", "", *drift_lines(results), "",
          f"Curves: {curves.name if curves else '(matplotlib missing)'}; every number: {report['json'].name}; "
          "every response: eval/.", ""]
    report["md"].write_text("\n".join(md))
    print("\n" + table + f"\n{ALARMS_HEAD}, per run:\n" + "\n".join(alarms), flush=True)
    if args.docs:
        write_docs(Path(args.docs), args.scenario, command, results, table, curves)
        print(f"[study] wrote {args.docs}", flush=True)
    print(f"[study] outputs: {out.resolve()} ({report['md'].name}, {report['json'].name}, "
          f"{curves.name if curves else 'no curves'}, eval/, seed_*/)", flush=True)
    return 0


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _finite(v):
    """JSON has no NaN: null instead (a metric the run does not have)."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return None if isinstance(v, float) and not math.isfinite(v) else v


if __name__ == "__main__":
    sys.exit(main())
