"""One table of every benchmark figure against its goal: what `make bench` prints last.

Each benchmark ends its output with a figure line, `key=value` pairs only (see each benchmark's
docstring). This script takes that line from each benchmark of the Makefile's `bench` target and
prints one row per figure: benchmark, figure, value, goal, met.

    python benchmarks/summary.py                  # run the bench target's commands (make -n bench), then the table
    python benchmarks/summary.py --logs DIR       # no runs: DIR/<benchmark>.log are their outputs (make bench)
    python benchmarks/summary.py --line loss_memory='peak_mem_ratio=0.2 time_ratio=0.3 ...' [--line ...]

A benchmark without a figure line (it failed, or its log is missing) is a row saying so.
Exit status: 1 when a benchmark gave no figure line (or, with --strict, when a goal is not met), else 0.
"""
import argparse
import operator
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# benchmark -> [(figure, comparison, threshold, where the goal comes from)]
GOALS = {
    "loss_memory": [("peer_time_ratio", "<=", 1.0, "verl's log-prob + entropy path, worst size"),
                    ("peer_mem_ratio", "<=", 0.6, "same")],
    "patch_mask": [("fraction_of_memcpy", ">=", 0.9, "README: masking at memcpy speed")],
    "weight_sync": [("ratio", "<=", 0.5, "sync vs disk round trip")],
    "rollout_scaling": [("gen_speedup", ">=", 1.6, "2 TP1 engines vs 1"), ("sync_ratio", "<=", 1.0, "")],
    "step_time": [("papo_over_grpo", "<=", 1.20, "")],
    "micro_batching": [("time_ratio", "<", 1.0, "tokens vs fixed micro-batches")],
    "attention": [("lm_time_ratio", "<", 1.0, "torch SDPA vs megatron's local attention"),
                  ("vision_time_ratio", "<", 1.0, "same, ViT window / image segments")],
    "logits_window": [("window_time_ratio", "<", 1.0, "output layer on the loss's positions vs all"),
                      ("window_logits_ratio", "<", 1.0, "same, logits computed")],
}
COMPARE = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt}
_PAIR = r"[A-Za-z_][\w.]*=\S+"
FIGURE_LINE = re.compile(rf"^\s*{_PAIR}(\s+{_PAIR})*\s*$")
TEE = re.compile(r"\s*(2>&1\s*)?\|\s*tee\s+\S+\s*$")


def figure_line(output: str):
    """The last line of the output made of key=value pairs only, or None."""
    lines = [line for line in output.splitlines() if FIGURE_LINE.match(line)]
    return lines[-1].strip() if lines else None


def parse(line: str) -> dict:
    """{figure: its text as printed}."""
    return dict(pair.split("=", 1) for pair in line.split())


def number(text: str):
    try:
        return float(text)
    except ValueError:
        return None


def benchmark_name(command: str) -> str:
    found = re.search(r"benchmarks/(\w+)\.py", command)
    return found.group(1) if found else command


def bench_commands() -> list[str]:
    """The bench target's benchmark commands as make expands them (without this script, without tee)."""
    listing = subprocess.run(["make", "--no-print-directory", "-n", "bench"], cwd=REPO, check=True,
                             capture_output=True, text=True).stdout
    return [TEE.sub("", line) for line in listing.splitlines()
            if re.search(r"benchmarks/\w+\.py", line) and "benchmarks/summary.py" not in line]


def run(command: str) -> str:
    """Run one benchmark command from the repo root, echoing its output, and return that output."""
    print(f"$ {command}", flush=True)
    proc = subprocess.Popen(["bash", "-c", command], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    captured = []
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        captured.append(line)
    if proc.wait() != 0:
        print(f"[summary] {benchmark_name(command)} exited with status {proc.returncode}", flush=True)
    return "".join(captured)


def table(lines: dict, strict: bool = False) -> int:
    """Print the summary of {benchmark: figure line or None}; return the exit status."""
    rows, status = [], 0
    for name, line in lines.items():
        goals = {figure: (op, limit) for figure, op, limit, _ in GOALS.get(name, [])}
        if line is None:
            status = 1
            for figure, (op, limit) in goals.items() or {"-": ("", 0)}.items():
                rows.append((name, figure, "(no figure line)", f"{op} {limit:g}" if op else "-", "MISSING"))
            continue
        figures = parse(line)
        for figure, text in figures.items():
            goal, met = "-", "-"
            if figure in goals:
                op, limit = goals[figure]
                value = number(text)
                ok = value is not None and COMPARE[op](value, limit)
                goal, met = f"{op} {limit:g}", "yes" if ok else "NO"
                status = status or int(strict and not ok)
            rows.append((name, figure, text, goal, met))
        for figure, (op, limit) in goals.items():
            if figure not in figures:
                rows.append((name, figure, "(absent)", f"{op} {limit:g}", "NO"))
                status = status or int(strict)
    header = ("benchmark", "figure", "value", "goal", "met")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(5)]
    print("\nbenchmark summary")
    for row in [header] + rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    goals_total = [r for r in rows if r[3] != "-"]
    print(f"goals met: {sum(r[4] == 'yes' for r in goals_total)} of {len(goals_total)}")
    return status


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logs", type=Path, help="read DIR/<benchmark>.log (the outputs make bench tees there)")
    parser.add_argument("--line", action="append", default=[], metavar="NAME=LINE",
                        help="a benchmark's figure line given directly (repeatable); no runs")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal is not met")
    args = parser.parse_args()
    lines = {}
    if args.line:
        for item in args.line:
            name, _, line = item.partition("=")
            lines[name] = figure_line(line)
    elif args.logs:
        for command in bench_commands():
            name = benchmark_name(command)
            log = args.logs / f"{name}.log"
            lines[name] = figure_line(log.read_text(errors="replace")) if log.exists() else None
    else:
        for command in bench_commands():
            lines[benchmark_name(command)] = figure_line(run(command))
    sys.exit(table(lines, args.strict))


if __name__ == "__main__":
    main()
