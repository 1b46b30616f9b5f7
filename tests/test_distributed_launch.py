"""run_distributed on a hung launch: it raises after its timeout and nothing of the launch is left
(launcher, workers in their own sessions, their children in the worker's group or in a new session);
the launcher got SIGTERM first (torchrun forwarded it: rank 0 saw it)."""
import psutil
import pytest

from tests.distributed import run_distributed


def test_timeout_leaves_no_process_of_the_launch(tmp_path):
    # 30 s: the launch must have started both ranks and their children before the timeout fires;
    # 10 s was too short while a 4-rank test loaded the other core (CI, 2026-12-04)
    with pytest.raises(AssertionError, match="timed out after 30s"):
        run_distributed("tests/dist/hang_worker.py", 2, args=(tmp_path,), timeout=30)
    pids = [int(x) for r in (0, 1) for x in (tmp_path / f"rank{r}").read_text().split()]
    assert len(set(pids)) == 7  # launcher + 2 x (worker + 2 children)
    alive = [p for p in pids if _alive(p)]
    assert not alive, [psutil.Process(p).cmdline() for p in alive]
    assert (tmp_path / "sigterm0").is_file()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
