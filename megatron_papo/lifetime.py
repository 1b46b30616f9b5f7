"""Helper processes that must not outlive the trainer.

A SIGKILLed (or OOM-killed) trainer runs no clean-up, and some of the processes it started wait
forever: vLLM's engine core / workers and megatron-core's checkpoint-writer queue manager were seen
orphaned on this machine, each holding hundreds of MB (on GPU: the engine's GPU memory). Such a
process calls `exit_when_process_ends` with the trainer's identity, taken in the trainer by
`this_process()`.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import psutil


def this_process() -> tuple[int, float]:
    """(pid, start time) of the calling process: its identity, since pids are reused."""
    me = psutil.Process()
    return me.pid, me.create_time()


def exit_when_process_ends(pid: int, create_time: float, poll_s: float = 1.0) -> None:
    """From now on, end this process (os._exit) within `poll_s` of process (pid, create_time) ending.
    A daemon thread polls; a no-op when called in that process itself. The helper also ignores
    SIGUSR1, the preemption notice SLURM delivers to every process of a job step: the trainer saves
    on it, and a helper it killed (the checkpoint-writer queue) would fail that save."""
    if pid == os.getpid():
        return
    if threading.current_thread() is threading.main_thread():  # Python sets handlers there only
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    def watch():
        while True:
            try:
                alive = psutil.Process(pid).create_time() == create_time
            except psutil.NoSuchProcess:
                alive = False
            if not alive:
                os._exit(1)
            time.sleep(poll_s)

    threading.Thread(target=watch, name=f"exit-with-{pid}", daemon=True).start()
