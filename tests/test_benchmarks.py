"""The benchmarks run end to end at a tiny size and end with the figure line that
benchmarks/summary.py tables against its goals (the figures themselves are measured by `make bench`,
never asserted here). weight_sync.py and rollout_scaling.py (vLLM engines, a ~100M model, about a
minute each) run in `make bench` only."""
import os
import subprocess
import sys

import pytest

from benchmarks.summary import GOALS, figure_line, number, parse

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name,args", [
    ("attention", ["--repeats", "1"]),
    ("logits_window", ["--repeats", "1", "--prompts", "2"]),
    ("step_time", ["--repeats", "1", "--prompts", "2"]),
    ("loss_memory", ["--tokens", "64", "--vocab", "4096", "--iters", "1", "--peer-tokens", "64", "--peer-iters", "1"]),
    ("patch_mask", ["--images", "4", "--repeats", "1"]),
    ("micro_batching", ["--prompts", "2", "--repeats", "1", "--max-response", "16"]),
])
def test_benchmark_ends_with_its_figures(name, args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, f"benchmarks/{name}.py", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    line = figure_line(run.stdout)
    assert line is not None, run.stdout[-2000:]
    figures = parse(line)
    for figure, *_ in GOALS[name]:
        assert number(figures[figure]) > 0, line
