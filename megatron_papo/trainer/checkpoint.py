"""Checkpoints: megatron-core distributed checkpoints of model, optimizer, scheduler, every rank's
RNG states, the data position and the step; written atomically; `resume=auto` picks the newest
complete one; SIGTERM / SIGUSR1 (SLURM preemption) request a save and a clean exit.

Layout under `save_dir`:
    step_00000010/          a complete checkpoint (megatron-core torch_dist format + our COMPLETE)
    step_00000020.tmp/      a save in progress (or killed): never read, removed by the next save
    latest                  text file with the newest complete step, replaced atomically

Atomicity: every rank writes into `step_N.tmp`; after a barrier, rank 0 writes COMPLETE, renames
the directory to `step_N` (one rename: a kill leaves either the old or the new name) and then
replaces `latest` (write + os.replace). A kill at any point leaves `latest` naming a complete one.
"""
from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import signal
from dataclasses import dataclass
from multiprocessing.managers import SyncManager
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from megatron_papo.lifetime import exit_when_process_ends, this_process

COMPLETE_MARKER = "COMPLETE"


@dataclass
class CheckpointConfig:
    save_dir: str = ""            # where checkpoints go (default: <output_dir>/checkpoints)
    save_interval: int = 10       # save every this many RL steps (0: only at the end / on signal)
    keep_last: int = 2            # keep this many newest complete checkpoints (0: keep all)
    resume: str = "auto"          # "auto" = newest complete checkpoint in save_dir if any; "none"; or a path
    save_on_signal: bool = True   # SIGTERM/SIGUSR1 -> save at the end of the current step, exit 0


def step_dir(save_dir: str | Path, step: int) -> Path:
    return Path(save_dir) / f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file() and not path.name.endswith(".tmp")


def find_resume_checkpoint(cfg: CheckpointConfig) -> Path | None:
    """The checkpoint to resume from per `cfg.resume`, or None to start fresh."""
    if cfg.resume == "none":
        return None
    if cfg.resume != "auto":
        path = Path(cfg.resume)
        if not is_complete(path):
            raise FileNotFoundError(f"checkpoint.resume={cfg.resume}: not a complete checkpoint "
                                    f"(expected a step_* directory containing {COMPLETE_MARKER})")
        return path
    root = Path(cfg.save_dir)
    latest = root / "latest"
    if latest.is_file():
        path = step_dir(root, int(latest.read_text().strip()))
        if is_complete(path):
            return path
    # `latest` missing or stale: the newest complete directory wins.
    candidates = sorted(p for p in root.glob("step_*") if is_complete(p))
    return candidates[-1] if candidates else None


def rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state_dict(modules: dict, optimizer, is_loading: bool) -> dict[str, Any]:
    """`modules`: name -> model stage; "model" is the trained one (the optimizer's), others (e.g. the
    reference model) are saved under their name as a key prefix so their tensors do not collide."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    sd: dict[str, Any] = {name: m.sharded_state_dict(prefix="" if name == "model" else f"{name}.")
                          for name, m in modules.items()}
    if optimizer is not None and (is_loading or optimizer_has_state(optimizer)):
        sd["optimizer"] = optimizer.sharded_state_dict(sd["model"], is_loading=is_loading)
    # One RNG object per (pp, tp, dp) rank: a resumed rank continues its own streams.
    pp, tp, dp = (parallel_state.get_pipeline_model_parallel_world_size(),
                  parallel_state.get_tensor_model_parallel_world_size(),
                  parallel_state.get_data_parallel_world_size())
    pp_r, tp_r, dp_r = (parallel_state.get_pipeline_model_parallel_rank(),
                        parallel_state.get_tensor_model_parallel_rank(),
                        parallel_state.get_data_parallel_rank())
    sd["rng_state"] = ShardedObject("rng_state", rng_state() if not is_loading else None, (pp, tp, dp), (pp_r, tp_r, dp_r),
                                    replica_id=0)
    return sd


def optimizer_has_state(optimizer) -> bool:
    """False before the first step: Adam has no moments yet and megatron's optimizer cannot save
    (or later load) them; such checkpoints are saved without optimizer, which is what a fresh
    optimizer is."""
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(len(state) > 0 for o in inner for state in o.optimizer.state.values())


def _start_writer_queue_bound_to_this_process() -> None:
    """megatron-core's checkpoint writer reports through a multiprocessing Manager queue that it
    spawns at the first save and never stops (megatron-core 0.16: filesystem_async._results_queue);
    a SIGKILLed trainer left that manager orphaned with ~300 MB. We start the manager ourselves, set
    to exit with this process (megatron_papo.lifetime). Other megatron-core versions: left alone."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "absent") is not None:
        return  # already started, or no such queue in this version
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(initializer=exit_when_process_ends, initargs=this_process())
    filesystem_async._results_queue = manager.Queue()  # the queue's proxy keeps the manager alive


def save_checkpoint(cfg: CheckpointConfig, step: int, modules: dict, optimizer, scheduler,
                    train_state: dict[str, Any], write_extras: Callable[[Path], None] | None = None) -> Path:
    """Collective: every rank calls it. `train_state` (step, data position, ...) is the same on all
    ranks and saved once as common state. `write_extras(dir)` runs on rank 0 before the checkpoint
    is marked complete (config.json, tokenizer, ... so tools can read the directory). Returns the
    final directory."""
    from megatron.core import dist_checkpointing

    root = Path(cfg.save_dir)
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    rank0 = dist.get_rank() == 0
    if rank0:
        for stale in root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    sd = _sharded_state_dict(modules, optimizer, is_loading=False)
    sd["train_state"] = dict(train_state, step=step, optimizer_saved="optimizer" in sd)
    sd["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    _start_writer_queue_bound_to_this_process()
    dist_checkpointing.save(sd, str(tmp))
    dist.barrier()
    if rank0:
        if write_extras is not None:
            write_extras(tmp)
        (tmp / COMPLETE_MARKER).write_text(f"{step}\n")
        if final.exists():  # a re-save of the same step (e.g. signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / "latest", f"{step}\n")
        _prune(root, cfg.keep_last)
    dist.barrier()
    return final


def load_checkpoint(path: Path, modules: dict, optimizer, scheduler) -> dict[str, Any]:
    """Collective. Loads into the given model/optimizer/scheduler, restores this rank's RNG
    states, and returns the saved train_state."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(path))
    if not common["train_state"].get("optimizer_saved", True):
        optimizer = None  # saved before its first step: the fresh optimizer is that state
    sd = _sharded_state_dict(modules, optimizer, is_loading=True)
    loaded = dist_checkpointing.load(sd, str(path))
    for name, m in modules.items():
        m.load_state_dict(loaded[name], strict=False)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and common.get("scheduler") is not None:
        scheduler.load_state_dict(common["scheduler"])
    set_rng_state(loaded["rng_state"])
    return common["train_state"]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    complete = sorted(p for p in root.glob("step_*") if is_complete(p))
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


class PreemptionHandler:
    """SIGTERM / SIGUSR1 set a flag; the loop checks `should_stop()` (agreed across ranks) at the
    end of each step, saves and exits 0. Signals arriving during a save are not lost."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, enabled: bool = True):
        self.received: int | None = None
        if enabled:
            for sig in self.SIGNALS:
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        self.received = signum

    def should_stop(self) -> bool:
        """Collective: True on every rank when any rank received a signal."""
        device = "cuda" if torch.cuda.is_available() else "cpu"  # nccl reduces CUDA tensors only
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32, device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
