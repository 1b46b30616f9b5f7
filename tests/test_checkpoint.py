"""Checkpoints:
- survive a kill during a save: `latest` still names the previous complete checkpoint, the
  half-written one is ignored, and the trainer resumes from the previous one with its weights;
- hold tensors and JSON only, and resuming unpickles nothing from them (a pickle runs code).
"""
import json
import os
import re
import signal
import subprocess
import sys

import psutil
import pytest
import torch

from megatron_papo.trainer.checkpoint import CheckpointConfig, find_resume_checkpoint, is_complete
from tests.distributed import REPO


def _group(pgid: int) -> list[psutil.Process]:
    members = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                members.append(p)
        except (ProcessLookupError, psutil.Error):
            pass
    return members


def _run(mode: str, out, extra=()) -> tuple[int, str, list]:
    """Run the worker in its own process group. Returns (exit code, log, the group's processes still
    alive 30 s after the worker ended): megatron-core's checkpoint-writer queue manager must exit
    with a SIGKILLed worker (megatron_papo.lifetime). Whatever is left is killed afterwards."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    log = out / f"{mode}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(REPO / "tests/dist/checkpoint_kill.py"), mode, str(out),
                                 *extra],
                                cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=300)
            _, left = psutil.wait_procs(_group(proc.pid), timeout=30)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return rc, log.read_text(), left


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    rc, log, left = _run("save", tmp_path)
    assert rc == -signal.SIGKILL, log[-4000:]
    assert not left, f"processes outlived the killed worker: {[p.cmdline() for p in left]}"
    checksum = re.search(r"saved step 1 checksum=(\S+)", log).group(1)
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "1"
    assert (ckpts / "step_00000002.tmp").is_dir() and not is_complete(ckpts / "step_00000002.tmp")
    assert find_resume_checkpoint(CheckpointConfig(save_dir=str(ckpts))) == ckpts / "step_00000001"
    _assert_no_pickles(ckpts / "step_00000001", step=1)
    # `latest` lost too (e.g. a kill between rename and pointer update): the newest complete one wins
    (ckpts / "latest").unlink()
    assert find_resume_checkpoint(CheckpointConfig(save_dir=str(ckpts))) == ckpts / "step_00000001"
    rc, log, left = _run("load", tmp_path)
    assert rc == 0 and not left, log[-4000:]
    assert f"resumed step 1 checksum={checksum}" in log


def _assert_no_pickles(step_dir, step: int) -> None:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    entries = FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
    objects = [k for k, v in entries.items() if isinstance(v, BytesStorageMetadata)]
    assert not objects, f"pickled objects in the checkpoint: {objects[:5]}"
    torch.load(step_dir / "common.pt", weights_only=True)
    assert json.loads((step_dir / "train_state.json").read_text())["step"] == step


@pytest.mark.parametrize("where", ["objects", "metadata"])
def test_resume_unpickles_nothing_from_the_checkpoint(tmp_path, where):
    """A checkpoint may come from anyone: resuming from one whose RNG state (or .metadata) is a
    pickle that writes a file must not write it, and must say why it stops."""
    rc, log, _ = _run(f"poison_{where}", tmp_path)
    assert rc == 0 and "poisoned checkpoint written" in log, log[-4000:]
    rc, log, _ = _run("load", tmp_path)
    assert not (tmp_path / "pwned").exists(), "resuming ran code from the checkpoint"
    assert rc != 0 and "not loaded" in log, log[-4000:]
