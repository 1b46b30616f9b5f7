"""Metrics: jsonl rows, resume truncation, the loss-hacking alarm, and the PNG curves."""
import json

from megatron_papo.trainer.metrics import MetricsLogger, MonitorConfig, format_line, loss_hacking_alarm


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


def test_logger_writes_jsonl_plots_and_truncates_on_resume(tmp_path, capsys):
    cfg = MonitorConfig(tensorboard=True, plots=True, alarm_window=2)
    log = MetricsLogger(tmp_path, cfg)
    for step in range(1, 6):
        log.log(step, {"reward": 0.1 * step, "accuracy": 0.05 * step, "kl_prcp": 0.01, "entropy": 1.0,
                       "masked_entropy": 1.1}, {"rollout": 1.5, "train": 2.0})
    files = log.close()
    assert [f.name for f in files] == ["curves.png"] and files[0].stat().st_size > 1000
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[2]["reward"] == 0.3 and rows[0]["time/train"] == 2.0
    assert "step     5 | reward 0.5" in capsys.readouterr().out
    assert any((tmp_path / "tensorboard").iterdir())
    # resuming from the checkpoint of step 3 drops the rows of steps 4-5 (they will be redone)
    MetricsLogger(tmp_path, cfg, resume_step=3).close()
    assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_disabled_logger_writes_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "x", MonitorConfig(), enabled=False)
    assert log.log(1, {"reward": 1.0}) is None and log.close() == [] and not (tmp_path / "x").exists()


def test_format_line_orders_known_keys():
    line = format_line(7, {"accuracy": 0.5, "reward": 0.25, "other": 3}, {"rollout": 2.0})
    assert line.startswith("step     7 | reward 0.25 | acc 0.5") and line.endswith("time rollout 2.0s")
