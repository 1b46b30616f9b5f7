"""Launch a multi-rank worker script under torchrun (gloo, CPU) from a pytest test.

Each launch costs 8-20 s of imports, so a worker script groups many checks; it asserts and exits
non-zero on failure. The launch has a hard timeout and the test shows the workers' output.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


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
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        str(script_path), *map(str, args),
    ]
    full_env = dict(os.environ)
    full_env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"})
    full_env.update(env or {})
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        raise AssertionError(f"{script} on {nproc} ranks timed out after {timeout}s\n{out[-6000:]}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script} on {nproc} ranks failed (rc={proc.returncode})\n{out[-8000:]}"
    return out
