"""Every shell command in README.md's code blocks is run by a test at tiny size, or listed here with
the reason it cannot run in the suite. A new README command with neither fails this test; a listed
test that no longer exists fails it too."""
import re

from tests.distributed import REPO

# command pattern -> the test that runs it (sizes changed), or why it cannot run here
COVERED = {
    r"make demo": "tests/test_launchers.py::test_demo_script_at_tiny_size",  # make demo = papo_tiny.sh
    r"make test": "why: it is the suite itself (CI runs it through .ci/run)",
    r"torchrun --nproc-per-node 4 -m megatron_papo\.train --config examples/configs/papo_tiny\.yaml "
    r"parallel\.tp=2 parallel\.pp=2 preset=papo_g steps=20 rollout\.n=5":
        "tests/test_train.py::test_rl_step_tp2pp2_and_dp2_equal_tp1",
    r"python tools/convert_hf_to_megatron\.py --hf-dir \S+ --out \S+ --tp \d+ --pp \d+ --dtype bf16":
        "tests/test_conversion.py::test_one_process_conversion_round_trip_and_layouts",
    r"torchrun --nproc-per-node \d+ tools/convert_hf_to_megatron\.py .*":
        "tests/test_conversion.py::test_one_process_conversion_round_trip_and_layouts",
    r"torchrun --nproc-per-node 8 tools/verify_conversion\.py --hf-dir \S+ --ckpt \S+ --tp 8 --pp 1":
        "tests/test_conversion.py::test_one_process_conversion_round_trip_and_layouts",
    r"sbatch examples/slurm/papo_72b\.sbatch":
        "tests/test_launchers.py::test_sbatch_starts_one_launcher_per_node_and_requeues_on_usr1",
    r"NNODES=8 NODE_RANK=<i> MASTER_ADDR=<node0> HF_DIR=\.\.\. CKPT=\.\.\. bash examples/papo_72b\.sh":
        "tests/test_launchers.py::test_papo_72b_launcher_rehearsal",
}


def readme_commands() -> list[str]:
    """Commands of the ```bash blocks: continuation lines joined, comments dropped (a commented-out
    command, `# torchrun ...`, counts as a command too)."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.strip()
            if line.startswith("# ") and re.match(r"# (torchrun|python|bash|make|sbatch)\b", line):
                line = line[2:]
            elif line.startswith("#"):
                line = " ".join(re.findall(r"\b(sbatch \S+)", line))  # a command named inside a comment
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line:
                commands.append(" ".join(line.split()))
    return commands


def test_every_readme_command_is_run_or_explained():
    commands = readme_commands()
    assert len(commands) >= 8
    for command in commands:
        matches = [p for p in COVERED if re.fullmatch(p, command)]
        assert len(matches) == 1, f"README command without a test (or a reason) in {__file__}: {command}"
    for pattern, how in COVERED.items():
        assert any(re.fullmatch(pattern, c) for c in commands), f"listed but not in README: {pattern}"
        if how.startswith("tests/"):
            path, name = how.split("::")
            assert f"def {name}(" in (REPO / path).read_text(), f"{how} does not exist"


def test_every_claims_table_test_exists():
    """docs/claims.md (README's claims -> the tests that check them) names only tests that exist."""
    text = (REPO / "docs" / "claims.md").read_text()
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text)
    assert len(named) >= 30
    for path, name in named:
        assert f"def {name}(" in (REPO / path).read_text(), f"docs/claims.md names {path}::{name}, which does not exist"
