"""Launch a multi-rank worker script under torchrun (gloo, CPU) from a pytest test.

Each launch costs 8-20 s of imports, so a worker script groups many checks; it asserts and exits
non-zero on failure. The launch has a hard timeout and the test shows the workers' output.

On a timeout or a failure nothing of the launch outlives it: torch-elastic starts every worker in its
own session, so killing the launcher alone leaves hung ranks (and their ports and memory) behind.
`run_distributed` remembers every descendant of the launcher while it runs, sends SIGTERM (torchrun
forwards it to the workers), waits STOP_GRACE_S, then SIGKILLs the remembered processes and their
process groups, the launcher last.
"""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
STOP_GRACE_S = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(script: str, nproc: int, args=(), timeout: float = 300, env=None) -> str:
    """Run `script` (a path relative to the repo, or absolute) on `nproc` gloo ranks.

    Returns the combined output; raises AssertionError with that output on failure or timeout.
    """
    script_path = Path(script) if os.path.isabs(script) else REPO / script
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", str(nproc),
        "--standalone",  # the rendezvous store binds a free port itself: no port picked here to lose to a race
        str(script_path), *map(str, args),
    ]
    full_env = dict(os.environ)
    full_env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"})
    full_env.update(env or {})
    proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    launcher = psutil.Process(proc.pid)
    seen: dict[int, psutil.Process] = {}  # every descendant seen: a dead worker's children lose their link
    deadline = time.monotonic() + timeout
    ended = None  # when the launcher exited (its output may still be held open by what it left behind)
    while True:
        try:
            out = proc.communicate(timeout=0.5)[0]
            break
        except subprocess.TimeoutExpired:
            _remember_descendants(launcher, seen)
            ended = ended or (time.monotonic() if proc.poll() is not None else None)
            if time.monotonic() > deadline or (ended and time.monotonic() > ended + STOP_GRACE_S):
                _stop(proc, launcher, seen)
                out = proc.communicate()[0]
                why = (f"timed out after {timeout}s" if not ended else
                       f"exited (rc={proc.returncode}) but left processes holding its output")
                raise AssertionError(f"{script} on {nproc} ranks {why}\n{out[-6000:]}")
    if proc.returncode != 0:
        _stop(proc, launcher, seen)
    assert proc.returncode == 0, f"{script} on {nproc} ranks failed (rc={proc.returncode})\n{out[-8000:]}"
    return out


def _remember_descendants(launcher: psutil.Process, seen: dict) -> None:
    try:
        for p in launcher.children(recursive=True):
            seen.setdefault(p.pid, p)
    except psutil.NoSuchProcess:
        pass


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _stop(proc: subprocess.Popen, launcher: psutil.Process, seen: dict) -> None:
    """SIGTERM (to the launcher, which forwards it; to the leftovers if it is gone), STOP_GRACE_S,
    then SIGKILL to the remembered processes, the process groups they lead (workers), the launcher."""
    _remember_descendants(launcher, seen)
    targets = [launcher] if proc.poll() is None else list(seen.values())
    for p in targets:
        _signal(p, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline and any(_alive(p) for p in [launcher, *seen.values()]):
        time.sleep(0.1)
    _remember_descendants(launcher, seen)
    own_group = os.getpgrp()
    for p in seen.values():
        if _alive(p):
            try:
                group = os.getpgid(p.pid)
                if group == p.pid and group != own_group:  # a worker: its own session and group
                    os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _signal(p, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _signal(p: psutil.Process, sig) -> None:
    try:
        p.send_signal(sig)  # psutil refuses a pid that now names another process
    except psutil.NoSuchProcess:
        pass
