"""Progress in a log file: a plain line every 10%, not a redraw per step (a SLURM log of the demo held
400 carriage-return redraws of one bar)."""
import io

from megatron_papo.progress import Progress


def test_log_file_gets_a_line_every_ten_percent():
    log = io.StringIO()  # not a terminal
    bar = Progress(range(400), desc="sft warm-up", unit="steps", stream=log)
    seen = [bar.set_postfix(loss=f"{i:.1f}") or i for i in bar]
    assert seen == list(range(400))
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and 10 <= len(lines) <= 12
    assert lines[-1].startswith("sft warm-up: 400/400 steps (100%") and lines[-1].endswith("loss=399.0")


def test_disabled_shows_nothing():
    log = io.StringIO()
    assert list(Progress(range(5), desc="x", enabled=False, stream=log)) == list(range(5))
    assert log.getvalue() == ""
