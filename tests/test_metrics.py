"""Metrics: jsonl rows, resume truncation, the training-health alarms, and the PNG curves."""
import json

import numpy as np

from megatron_papo.trainer.metrics import (
    MetricsLogger,
    MonitorConfig,
    collapse_alarm,
    format_line,
    loss_hacking_alarm,
    validation_comparison,
)


def _rows(kl, ent, ent_m):
    return [{"step": i + 1, "kl_prcp": a, "entropy": b, "masked_entropy": c} for i, (a, b, c) in enumerate(zip(kl, ent, ent_m))]


def test_alarm_fires_only_on_the_collapse_signature():
    cfg = MonitorConfig(alarm_window=3, alarm_kl_factor=3.0, alarm_entropy_rise=0.1)
    stable = _rows([0.01] * 6, [1.0] * 6, [1.2] * 6)
    assert loss_hacking_alarm(stable, cfg) is None
    collapse = _rows([0.01] * 3 + [0.05] * 3, [1.0] * 3 + [1.3] * 3, [1.2] * 3 + [1.6] * 3)
    assert "loss hacking" in loss_hacking_alarm(collapse, cfg)
    # the collapse of the study here (docs/results.md): the real policy sharpens while the masked
    # one spreads; the alarm names both entropies' changes
    sharpening = _rows([0.07] * 3 + [1.0] * 3, [0.15] * 3 + [0.12] * 3, [0.25] * 3 + [1.5] * 3)
    reason = loss_hacking_alarm(sharpening, cfg)
    assert "masked entropy rose +500%" in reason and "entropy -20%" in reason, reason
    # KL grows while the masked entropy holds: the real branch perceives more (what PAPO asks for)
    perceiving = _rows([0.01] * 3 + [0.05] * 3, [1.0] * 3 + [0.7] * 3, [1.2] * 3 + [1.25] * 3)
    assert loss_hacking_alarm(perceiving, cfg) is None
    # both entropies rise but KL_prcp holds: not the perception loss being hacked
    diffuse = _rows([0.01] * 3 + [0.02] * 3, [1.0] * 3 + [1.3] * 3, [1.2] * 3 + [1.6] * 3)
    assert loss_hacking_alarm(diffuse, cfg) is None
    # too short a history to judge
    assert loss_hacking_alarm(collapse[:5], cfg) is None


def _acc_rows(acc, ref_kl=None, length=None):
    return [{"step": i + 1, "accuracy": a, **({"ref_kl": ref_kl[i]} if ref_kl else {}),
             **({"response_len": length[i]} if length else {})} for i, a in enumerate(acc)]


def test_collapse_alarm_fires_when_training_accuracy_halves(tmp_path, capsys):
    """The study's collapses (docs/results.md): accuracy to 0 with ref_kl up and the length stuck;
    the loss-hacking signature misses them (KL_prcp fell too)."""
    cfg = MonitorConfig(alarm_window=3, alarm_accuracy_fraction=0.5)
    acc = [0.45, 0.5, 0.4, 0.45, 0.0, 0.0, 0.0]
    rows = _acc_rows(acc, ref_kl=[0.1] * 4 + [8.0] * 3, length=[14.0] * 4 + [32.0] * 3)
    reason = collapse_alarm(rows, cfg)
    # 0 against the mean of the 4 steps before, 0.45; the diagnosis names ref_kl and the length
    assert reason.startswith("training collapse: accuracy 0.450 -> 0.000 (below 0.5x), ref_kl 0.1 -> 8, "
                             "response_len 14 -> 32 (last 3 steps vs before)"), reason
    assert collapse_alarm(rows[:5], cfg) is None  # (0.4 + 0.45 + 0) / 3 is not below 0.5 x (0.45 + 0.5) / 2
    # judged from step window + 1: a policy that halves in its first updates, against step 1
    early = _acc_rows([0.42, 0.18, 0.2, 0.15])
    assert "accuracy 0.420 -> 0.177" in collapse_alarm(early, cfg) and collapse_alarm(early[:3], cfg) is None
    assert collapse_alarm(_acc_rows([0.42, 0.3, 0.25, 0.3]), cfg) is None  # lost less than half
    assert collapse_alarm(_acc_rows([0.0, 0.0, 0.0, 0.0]), cfg) is None  # nothing to lose
    assert collapse_alarm(_acc_rows([0.5, 0.4, 0.5, 0.4, 0.45, 0.55]), cfg) is None  # healthy
    assert collapse_alarm(rows, MonitorConfig(alarm_window=3, alarm_accuracy_fraction=0)) is None  # off
    # a diverged step (NaN, stored as "nan") is left out, not read as a collapse
    assert collapse_alarm(_acc_rows([0.45, 0.5]) + [{"step": 3, "accuracy": "nan"}] + _acc_rows([0.4, 0.45, 0.5])[2:],
                          cfg) is None
    # the logger prints each alarm that fires and returns them all
    log = MetricsLogger(tmp_path, MonitorConfig(tensorboard=False, plots=False, alarm_window=3))
    fired = [log.log(r["step"], {k: v for k, v in r.items() if k != "step"}) for r in rows]
    assert fired[:5] == [None] * 5 and fired[5].startswith("training collapse") and fired[6].startswith("training")
    assert "WARNING [step 7] training collapse: accuracy 0.450 -> 0.000" in capsys.readouterr().out


def test_logger_writes_jsonl_plots_and_truncates_on_resume(tmp_path, capsys):
    cfg = MonitorConfig(tensorboard=True, plots=True, alarm_window=2)
    log = MetricsLogger(tmp_path, cfg)
    log.log(0, {"val/accuracy": 0.25})  # the validation before RL
    for step in range(1, 6):
        log.log(step, {"reward": 0.1 * step, "accuracy": 0.05 * step, "kl_prcp": 0.01, "entropy": 1.0,
                       "masked_entropy": 1.1}, {"rollout": 1.5, "train": 2.0})
    files = log.close()
    assert [f.name for f in files] == ["curves.png"] and files[0].stat().st_size > 1000
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5] and rows[3]["reward"] == 0.3 and rows[1]["time/train"] == 2.0
    assert "step     5 | reward 0.5" in capsys.readouterr().out
    assert any((tmp_path / "tensorboard").iterdir())
    # resuming from the checkpoint of step 3 drops the rows of steps 4-5 (they will be redone)
    MetricsLogger(tmp_path, cfg, resume_step=3).close()
    assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]
    # from the step-0 checkpoint, saved after step 0's validation, that row stays
    MetricsLogger(tmp_path, cfg, resume_step=0).close()
    assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0]


def test_disabled_logger_writes_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "x", MonitorConfig(), enabled=False)
    assert log.log(1, {"reward": 1.0}) is None and log.close() == [] and not (tmp_path / "x").exists()


def test_format_line_orders_known_keys():
    line = format_line(7, {"accuracy": 0.5, "reward": 0.25, "other": 3}, {"rollout": 2.0})
    assert line.startswith("step     7 | reward 0.25 | acc 0.5") and line.endswith("time rollout 2.0s")


def test_validation_comparison_is_the_paired_difference_with_its_standard_error():
    rng = np.random.default_rng(0)
    before = rng.integers(0, 5, 40) / 4
    after = np.clip(before + rng.integers(-1, 3, 40) / 4, 0, 1)
    row = lambda step, acc: {"step": step, "problems": 40, "k": 4, "seed": 777, "accuracy": acc.mean(),  # noqa: E731
                             "pass_at_k": (acc > 0).mean(), "per_problem": acc.tolist()}
    d = after - before
    se = d.std(ddof=1) / np.sqrt(len(d))  # the textbook paired standard error, computed independently
    line = validation_comparison(row(0, before), row(50, after))
    assert f"change {d.mean():+.3f} +- {se:.3f}" in line and "above the noise" in line, line
    assert f"avg@4 {before.mean():.3f}" in line and f"step 50 avg@4 {after.mean():.3f}" in line
    assert "within the noise" in validation_comparison(row(0, before), row(50, before[::-1].copy()))
    assert "no step-0 validation" in validation_comparison(None, row(50, after))
    # a resume may change validation.*: another split or k is not a pair
    assert "no step-0 validation" in validation_comparison({**row(0, before), "seed": 778}, row(50, after))
    assert "no step-0 validation" in validation_comparison({**row(0, before), "k": 8}, row(50, after))
