"""Checkpoints:
- survive a kill during a save: the previous complete checkpoint is the newest one, the
  half-written one is ignored, and the trainer resumes from the previous one with its weights;
- hold tensors and JSON only, and resuming unpickles nothing from them (a pickle runs code);
- record the run's config: a resume that changes the objective is refused with the keys named, a
  layout change (TP1 -> TP2) resumes with weights and Adam moments resharded;
- a fresh run never mixes with another run in its folders: it is refused, or moves that run aside;
- a kill while old checkpoints are deleted leaves nothing behind, and a resume with nothing left to
  do says so and exits before building the rollout engine;
- megatron-core's private writer-queue global, which trainer.checkpoint sets, is still there and used.
"""
import contextlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys

import psutil
import pytest
import torch

from megatron_papo.trainer.checkpoint import (
    CheckpointConfig,
    _prune,
    complete_checkpoints,
    find_resume_checkpoint,
    is_complete,
    remove_leftovers,
)
from tests.dist.checkpoint_kill import OVERRIDES
from tests.distributed import REPO, run_distributed


def _group(pgid: int) -> list[psutil.Process]:
    members = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                members.append(p)
        except (ProcessLookupError, psutil.Error):
            pass
    return members


class Jobs:
    """tests/dist/checkpoint_kill.py's server: each job runs in a forked child (the imports, most of
    a job's time, are done once per module), in its own process group."""

    def __init__(self):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
        self.server = subprocess.Popen([sys.executable, str(REPO / "tests/dist/checkpoint_kill.py"), "serve"], cwd=REPO,
                                       env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                       start_new_session=True)

    def _answer(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.server.stdout], [], [], timeout)
        line = self.server.stdout.readline() if ready else ""
        if not line:
            raise TimeoutError(f"no answer from the job server in {timeout} s (rc={self.server.poll()})")
        return json.loads(line)

    def run(self, mode: str, out, extra=()) -> tuple[int, str, list]:
        """Run a job. Returns (exit code, log, the job's processes still alive 30 s after it ended):
        megatron-core's checkpoint-writer queue manager must exit with a SIGKILLed job
        (megatron_papo.lifetime). Whatever is left is killed afterwards."""
        log = out.parent / f"{out.name}-{mode}.log"  # beside `out`, which a run may move aside
        self.server.stdin.write(json.dumps({"mode": mode, "out": str(out), "extra": list(extra), "log": str(log)}) + "\n")
        self.server.stdin.flush()
        pid = self._answer(60)["pid"]
        try:
            try:
                rc = self._answer(300)["rc"]
            except TimeoutError:
                os.killpg(pid, signal.SIGKILL)
                raise
            _, left = psutil.wait_procs(_group(pid), timeout=30)
        finally:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return rc, log.read_text(), left

    def close(self) -> None:
        self.server.stdin.close()
        try:
            self.server.wait(timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.server.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def jobs():
    server = Jobs()
    yield server
    server.close()


def test_sigkill_during_save_keeps_previous_checkpoint(jobs, tmp_path):
    """The saved state is not what a fresh process builds (weights perturbed, Adam moments, scheduler
    steps with a warm-up, data drawn), so the resumed process shows what it loaded: every tensor of
    model, reference, optimizer (moments and lr), scheduler, RNG and the data position, by name."""
    warmup = ["optim.warmup_steps=5"]  # the scheduler's steps change the lr
    rc, log, left = jobs.run("save", tmp_path, warmup)
    assert rc == -signal.SIGKILL, log[-4000:]
    assert not left, f"processes outlived the killed worker: {[p.cmdline() for p in left]}"
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "step_00000002.tmp").is_dir() and not is_complete(ckpts / "step_00000002.tmp")
    assert find_resume_checkpoint(CheckpointConfig(save_dir=str(ckpts))) == ckpts / "step_00000001"
    _assert_no_pickles(ckpts / "step_00000001", step=1)
    rc, log, left = jobs.run("load", tmp_path, warmup)
    assert rc == 0 and not left, log[-4000:]
    assert "resumed step 1 " in log, log[-4000:]
    fresh, saved, loaded = (torch.load(tmp_path / f"state_{s}.pt", weights_only=True) for s in ("fresh", "saved", "loaded"))
    assert loaded.keys() == saved.keys(), sorted(loaded.keys() ^ saved.keys())[:10]
    assert any(k.startswith("ref_model.") for k in saved) and any(k.endswith(".exp_avg_sq") for k in saved)
    assert saved["scheduler.num_steps"] == 3 and saved["optimizer0.group0.lr"] > 0
    for key, value in saved.items():
        if key.startswith(("model.", "ref_model.")) or key in ("scheduler.num_steps", "optimizer0.group0.lr", "data"):
            assert key not in fresh or not _equal(fresh[key], value), f"{key}: the save did not move it off the start"
        assert _equal(loaded[key], value), key


def test_only_our_names_are_read_pruned_or_removed(tmp_path):
    """A user's export or copy beside the checkpoints (step_00000002_hf, step_00000001_backup with its
    COMPLETE) is never resumed from, pruned or removed; leftovers of killed saves and deletions are;
    auto takes the newest complete checkpoint."""
    def folder(name, complete):
        (tmp_path / name).mkdir()
        (tmp_path / name / "data").write_text("x")
        if complete:
            (tmp_path / name / "COMPLETE").write_text("1\n")

    for name, complete in [("step_00000001", True), ("step_00000002", True), ("step_00000003", True),
                           ("step_00000002_hf", False), ("step_00000001_backup", True), ("step_00000009_old", True),
                           ("step_00000004.tmp", False), ("step_00000000.deleted.tmp", True), ("step_notes.tmp", False)]:
        folder(name, complete)
    ours = ["step_00000001", "step_00000002", "step_00000003"]
    assert [p.name for p in complete_checkpoints(tmp_path)] == ours
    assert find_resume_checkpoint(CheckpointConfig(save_dir=str(tmp_path))) == tmp_path / "step_00000003"
    remove_leftovers(tmp_path)
    _prune(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["step_00000003", "step_00000002_hf", "step_00000001_backup", "step_00000009_old", "step_notes.tmp"])


def _equal(a, b) -> bool:
    return a == b if isinstance(a, str) else torch.equal(a, b)


def _assert_no_pickles(step_dir, step: int) -> None:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    entries = FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
    objects = [k for k, v in entries.items() if isinstance(v, BytesStorageMetadata)]
    assert not objects, f"pickled objects in the checkpoint: {objects[:5]}"
    torch.load(step_dir / "common.pt", weights_only=True)
    assert json.loads((step_dir / "train_state.json").read_text())["step"] == step


@pytest.mark.parametrize("where", ["objects", "metadata"])
def test_resume_unpickles_nothing_from_the_checkpoint(jobs, tmp_path, where):
    """A checkpoint may come from anyone: resuming from one whose RNG state (or .metadata) is a
    pickle that writes a file must not write it, and must say why it stops."""
    rc, log, _ = jobs.run(f"poison_{where}", tmp_path)
    assert rc == 0 and "poisoned checkpoint written" in log, log[-4000:]
    rc, log, _ = jobs.run("load", tmp_path)
    assert not (tmp_path / "pwned").exists(), "resuming ran code from the checkpoint"
    assert rc != 0 and "not loaded" in log, log[-4000:]


def _cli(out, extra=(), timeout=900) -> subprocess.CompletedProcess:
    """`python -m megatron_papo.train` with the worker's options (so its config matches the worker's)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore",
               VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "megatron_papo.train", f"output_dir={out}", *OVERRIDES, *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_resume_with_another_objective_is_refused_naming_the_keys(step1_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(step1_run, out)  # preset papo_h (the default)
    step1 = out / "checkpoints" / "step_00000001"
    run = _cli(out, ["preset=dapo", "steps=2"])
    assert run.returncode == 2, f"rc={run.returncode}\n{(run.stdout + run.stderr)[-4000:]}"
    error = run.stderr.strip().splitlines()
    assert len(error) == 1 and "Traceback" not in run.stderr, run.stderr[-4000:]
    assert error[0].startswith("error: ") and "preset: papo_h -> dapo" in error[0] and "algo.beta" in error[0], error
    assert not (out / "checkpoints" / "step_00000002").exists() and not (out / "rollout_model").exists()
    import yaml
    assert yaml.safe_load((step1 / "run_config.yaml").read_text())["preset"] == "papo_h"


def _tensors(step_dir) -> dict[str, torch.Tensor]:
    """Every tensor of a torch_dist checkpoint, whole (global shape), read in this process."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import load

    from megatron_papo.models.qwen2_5_vl.dist_io import _SlicePlanner

    entries = FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
    requests = {k: (k, (0,) * len(m.size), torch.empty(m.size, dtype=m.properties.dtype))
                for k, m in entries.items() if isinstance(m, TensorStorageMetadata)}
    load({}, storage_reader=FileSystemReader(str(step_dir)), planner=_SlicePlanner(requests), no_dist=True)
    return {k: dest for k, (_, _, dest) in requests.items()}


def test_checkpoint_resumes_at_another_layout(jobs, tmp_path):
    """TP1 -> TP2 -> PP2: weights and Adam moments carry over exactly. Megatron pads the vocabulary
    to a multiple of 128 x TP: with 1100 tokens the embedding and output layer have 1152 rows at TP1
    and 1280 at TP2, so the resharded load must fit them too."""
    from transformers import Qwen2VLImageProcessor

    from megatron_papo.data.tokenizer import save_tiny_tokenizer
    from megatron_papo.models.qwen2_5_vl.flavors import get_flavor
    from tests.helpers_hf import save_tiny_hf_folder

    hf = tmp_path / "hf"
    save_tiny_hf_folder(hf, get_flavor("tiny", vocab_size=1100), seed=3)
    save_tiny_tokenizer(hf)
    Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12544).save_pretrained(hf)
    out = tmp_path / "run"
    rc, log, _ = jobs.run("optim", out, [f"model.hf_dir={hf}"])
    assert rc == 0, log[-4000:]
    log = run_distributed("tests/dist/checkpoint_kill.py", 2, ["load_save", out, f"model.hf_dir={hf}", "parallel.tp=2"])
    assert log.count("resumed step 1 ") == 2, log[-4000:]
    log = run_distributed("tests/dist/checkpoint_kill.py", 2, ["load_save", out, f"model.hf_dir={hf}", "parallel.pp=2"])
    assert log.count("resumed step 2 ") == 2, log[-4000:]
    first = _tensors(out / "checkpoints" / "step_00000001")
    assert any(k.startswith("optimizer.state.exp_avg.") for k in first), sorted(first)[:20]
    for step, layout in ((2, {"pp": 1, "tp": 2, "dp": 1}), (3, {"pp": 2, "tp": 1, "dp": 1})):
        folder = out / "checkpoints" / f"step_{step:08d}"
        assert json.loads((folder / "train_state.json").read_text())["layout"] == layout
        later = _tensors(folder)
        for key, a in first.items():
            if key.startswith("rng_state."):  # per rank: restarted from the seed at another layout
                continue
            b = later[key]
            if a.shape != b.shape:  # vocab padding: the 1100 real rows must match
                assert a.shape[1:] == b.shape[1:] and min(a.shape[0], b.shape[0]) >= 1100, (key, a.shape, b.shape)
                a, b = a[:1100], b[:1100]
            assert torch.equal(a, b), (step, key)


@pytest.fixture(scope="module")
def step1_run(jobs, tmp_path_factory):
    """A run folder holding checkpoint step_00000001 (copied by the tests that start from one)."""
    out = tmp_path_factory.mktemp("step1") / "run"
    rc, log, _ = jobs.run("step1", out)
    assert rc == 0, log[-4000:]
    return out


def _old_run(step1_run, out) -> list[str]:
    """A finished run in `out`: checkpoint step_00000001 and 7 metrics rows. Returns what it holds."""
    shutil.copytree(step1_run, out)
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward": 0.5}) + "\n" for s in range(1, 8)))
    return sorted(str(p.relative_to(out)) for p in out.rglob("*"))


def test_fresh_run_into_a_folder_holding_another_run_is_refused(step1_run, tmp_path):
    out = tmp_path / "run"
    before = _old_run(step1_run, out)
    run = _cli(out, ["steps=1", "checkpoint.resume=none"])
    assert run.returncode == 2, f"rc={run.returncode}\n{(run.stdout + run.stderr)[-4000:]}"
    error = run.stderr.strip().splitlines()
    assert len(error) == 1 and "Traceback" not in run.stderr, run.stderr[-4000:]
    assert "--resume auto" in error[0] and "checkpoint.on_existing_run=move" in error[0], error
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before  # nothing written or deleted
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 7


def test_fresh_run_can_move_the_other_run_aside(jobs, step1_run, tmp_path):
    out = tmp_path / "run"
    before = _old_run(step1_run, out)
    rc, log, _ = jobs.run("preflight", out, ["checkpoint.resume=none", "checkpoint.on_existing_run=move"])
    assert rc == 0 and "resume from: None" in log, log[-4000:]
    aside = tmp_path / "run.previous_1"
    assert f"moved {out} to {aside}" in log, log[-4000:]
    assert not out.exists()
    assert sorted(str(p.relative_to(aside)) for p in aside.rglob("*")) == before


def test_resume_never_mixes_with_other_checkpoints(jobs, step1_run, tmp_path):
    """An older checkpoint beside newer ones, or another folder's checkpoint into a folder holding a
    run: either resume would interleave two runs."""
    out = tmp_path / "run"
    _old_run(step1_run, out)
    mine = out / "checkpoints" / "step_00000001"
    shutil.copytree(mine, out / "checkpoints" / "step_00000003")
    rc, log, _ = jobs.run("preflight", out, [f"checkpoint.resume={mine}"])
    assert rc != 0 and "also holds newer checkpoints (step_00000003)" in log, log[-4000:]
    elsewhere = tmp_path / "elsewhere" / "step_00000001"
    elsewhere.parent.mkdir()
    (out / "checkpoints" / "step_00000003").rename(elsewhere)
    rc, log, _ = jobs.run("preflight", out, [f"checkpoint.resume={elsewhere}", "checkpoint.on_existing_run=move"])
    assert rc != 0 and "belong to another run" in log and "on_existing_run=move to" not in log, log[-4000:]
    rc, log, _ = jobs.run("preflight", tmp_path / "new", [f"checkpoint.resume={elsewhere}"])
    assert rc == 0 and f"resume from: {elsewhere}" in log, log[-4000:]


def test_a_training_checkpoint_starts_a_new_run(jobs, tmp_path):
    """model.load=<step dir>: what the refusal of another objective points to (a new run from the
    trained weights); training checkpoints leave out megatron's `_extra_state` objects."""
    rc, log, _ = jobs.run("optim", tmp_path / "a")  # the optimizer step moves the weights off the seeded init
    assert rc == 0, log[-4000:]
    checksum = re.search(r"saved step 1 checksum=(\S+)", log).group(1)
    rc, log, _ = jobs.run("load", tmp_path / "b", [f"model.load={tmp_path / 'a' / 'checkpoints' / 'step_00000001'}",
                                             "preset=dapo"])
    assert rc == 0 and f"resumed step 0 checksum={checksum}" in log, log[-4000:]


def test_kill_while_pruning_leaves_no_folder_behind(jobs, tmp_path):
    rc, log, _ = jobs.run("prune", tmp_path, ["checkpoint.keep_last=1"])
    assert rc == -signal.SIGKILL, log[-4000:]
    rc, log, _ = jobs.run("load_save", tmp_path, ["checkpoint.keep_last=1"])
    assert rc == 0 and "resumed step 3 " in log, log[-4000:]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000004"]


def test_resume_with_nothing_left_to_do_exits_before_the_engine(step1_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(step1_run, out)
    # the options a resumed run may change do not stop it
    run = _cli(out, ["steps=1", "checkpoint.keep_last=3", "checkpoint.save_interval=5", "monitor.alarm_window=3"])
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "nothing to do: checkpoint at step 1 >= steps=1" in run.stdout, (run.stdout + run.stderr)[-4000:]
    assert not (out / "rollout_model").exists(), "the rollout engine was built"


def test_megatron_core_writer_queue_is_the_global_we_set(monkeypatch):
    """trainer.checkpoint sets megatron-core's private `filesystem_async._results_queue` (its manager
    would outlive a SIGKILLed trainer otherwise). A megatron-core that renames that global, or stops
    writing through it, fails here instead of silently orphaning ~300 MB managers again."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_papo.trainer import checkpoint

    assert hasattr(filesystem_async, "_results_queue"), "megatron-core renamed its checkpoint writer queue"
    monkeypatch.setattr(filesystem_async, "_results_queue", None)  # as at the first save
    manager = checkpoint._start_writer_queue_bound_to_this_process()
    try:
        assert manager is not None and filesystem_async._results_queue is not None
        queue = filesystem_async._get_write_results_queue()  # what the writer reports through
        assert queue is filesystem_async._results_queue, "megatron-core no longer reads the queue we set"
        queue.put("written")
        assert queue.get(timeout=30) == "written"
        assert checkpoint._start_writer_queue_bound_to_this_process() is None  # once per process
    finally:
        manager.shutdown()
