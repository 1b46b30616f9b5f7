"""Worker (2 ranks) that never finishes, for the run_distributed timeout test. Each rank starts a
child in its own process group and one in a new session (as vLLM's helpers may), then writes
`<rank> <own pid> <launcher pid> <child pids>` to <dir>/rank<r>. Rank 0 records a SIGTERM in
<dir>/sigterm0 and exits; rank 1 ignores SIGTERM and must be killed."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

folder, rank = Path(sys.argv[1]), int(os.environ["RANK"])
sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
children = [subprocess.Popen(sleep), subprocess.Popen(sleep, start_new_session=True)]
if rank == 0:
    def on_term(*_):
        (folder / "sigterm0").write_text("1")
        sys.exit(1)
    signal.signal(signal.SIGTERM, on_term)
else:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
(folder / f"rank{rank}.tmp").write_text(" ".join(map(str, [os.getpid(), os.getppid(), *(c.pid for c in children)])))
(folder / f"rank{rank}.tmp").rename(folder / f"rank{rank}")
while True:
    time.sleep(1)
