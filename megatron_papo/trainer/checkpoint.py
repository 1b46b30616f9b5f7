"""Checkpoints: megatron-core distributed checkpoints of model, optimizer, scheduler, every rank's
RNG states, the data position and the step; written atomically; `resume=auto` picks the newest
complete one; SIGTERM / SIGUSR1 (SLURM preemption) request a save and a clean exit.

Layout under `save_dir`:
    step_00000010/              a complete checkpoint (megatron-core torch_dist format, train_state.json,
                                run_config.yaml, our COMPLETE)
    step_00000020.tmp/          a save in progress (or killed): never read, removed by the next save
    step_00000000.deleted.tmp/  a checkpoint being deleted (keep_last), renamed first so that a kill
                                never leaves a half-deleted step_* folder; removed by the next save
Only these names are ours: a user's `step_00000010_hf` export or `step_00000010_backup` copy beside
them is never read, pruned or removed.

Atomicity: every rank writes into `step_N.tmp`; after a barrier, rank 0 writes COMPLETE, renames
the directory to `step_N` (one rename: a kill leaves either the old or the new name). The folder's
files are fsynced before COMPLETE is written, and the parent folder after the rename. A kill at any
point leaves the newest complete step_N whole, and resume=auto takes it: the newest complete folder
is the only record of the latest step (no pointer file to fall behind it).

No pickles: a checkpoint may come from anyone, and unpickling runs code. A checkpoint holds tensors
(weights, optimizer state, every rank's RNG states), `common.pt` (scheduler and optimizer
hyperparameters: read with torch.load(weights_only=True)) and `train_state.json`. megatron-core's
per-layer `_extra_state` objects (empty without transformer-engine fp8) are left out. On resume,
`.metadata` (torch.distributed.checkpoint's index, a pickle) is read with an allow-list of its own
classes first, and a checkpoint holding any pickled object is refused.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import random
import re
import shutil
import signal
from dataclasses import dataclass
from multiprocessing.managers import SyncManager
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.distributed as dist
import yaml

from megatron_papo.config import dump_yaml
from megatron_papo.folders import fsync_folder, write_text_atomic
from megatron_papo.lifetime import exit_when_process_ends, this_process
from megatron_papo.parallel.context import ParallelContext
from megatron_papo.parallel.distributed import collective_device

COMPLETE_MARKER = "COMPLETE"
TRAIN_STATE = "train_state.json"  # step, data position, layout: what the loop restores besides tensors
RUN_CONFIG = "run_config.yaml"    # the run's resolved config, compared with the resuming run's
CHECKPOINT_NAME = re.compile(r"step_\d{8}")                # step_dir's names
LEFTOVER_NAME = re.compile(r"step_\d{8}(\.deleted)?\.tmp")  # a killed save or deletion

# Options a resumed run may change: they change neither what is trained nor how (run length, where
# and how often it writes, what it reports, memory knobs), or megatron's distributed checkpoint
# reshards them (TP and PP sizes; DP follows the world size), or the responses do not depend on them
# (rollout.tp: seeds follow the global prompt index). A section name allows all its options.
CHANGEABLE_ON_RESUME = {"steps", "output_dir", "checkpoint", "monitor", "validation", "parallel.tp", "parallel.pp",
                        "parallel.sequence_parallel", "parallel.recompute", "model.ref_offload",
                        "rollout.gpu_memory_utilization", "rollout.bucket_mb", "rollout.tp", "rollout.dump"}


class CheckpointError(ValueError):
    """A checkpoint this run must not load, or folders it must not write into; one line saying why."""


@dataclass
class CheckpointConfig:
    save_dir: str = ""            # where checkpoints go (default: <output_dir>/checkpoints)
    save_interval: int = 10       # save every this many RL steps (0: only at the end / on signal)
    keep_last: int = 2            # keep this many newest complete checkpoints (0: keep all)
    resume: str = "auto"          # "auto" = newest complete checkpoint in save_dir if any; "none"; or a path
    save_on_signal: bool = True   # SIGTERM/SIGUSR1 -> save at the end of the current step, exit 0
    on_existing_run: Literal["refuse", "move"] = "refuse"  # a fresh run whose output_dir/save_dir hold
                                  # another run's metrics or checkpoints: "refuse" (an error saying how to
                                  # proceed) or "move" (rename those folders to <folder>.previous_<n> first)


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
    candidates = complete_checkpoints(cfg.save_dir)
    return candidates[-1] if candidates else None


def complete_checkpoints(save_dir: str | Path) -> list[Path]:
    """Oldest first; only step_dir's names count."""
    return sorted(p for p in Path(save_dir).glob("step_*") if CHECKPOINT_NAME.fullmatch(p.name) and is_complete(p))


def remove_leftovers(save_dir: str | Path) -> None:
    """Remove what killed saves and deletions left (LEFTOVER_NAME), nothing else."""
    for leftover in Path(save_dir).glob("step_*.tmp"):
        if LEFTOVER_NAME.fullmatch(leftover.name):
            shutil.rmtree(leftover, ignore_errors=True)


def rng_state() -> dict[str, torch.Tensor]:
    """This rank's RNG states (python, numpy, torch, cuda, megatron's tracker) as tensors."""
    from megatron.core import tensor_parallel

    _, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": torch.tensor(mt, dtype=torch.int64),
             "python_gauss": torch.tensor([gauss is not None, gauss or 0.0], dtype=torch.float64),
             "numpy": torch.tensor([*keys.tolist(), pos, has_gauss], dtype=torch.int64),
             "numpy_gauss": torch.tensor([cached], dtype=torch.float64),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    for name, tracker_state in tensor_parallel.get_cuda_rng_tracker().get_states().items():
        state[f"tracker.{name}"] = tracker_state
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    from megatron.core import tensor_parallel

    has_gauss, gauss = state["python_gauss"].tolist()
    random.setstate((3, tuple(state["python"].tolist()), gauss if has_gauss else None))
    numpy = state["numpy"].tolist()
    np.random.set_state(("MT19937", np.array(numpy[:624], dtype=np.uint32), numpy[624], numpy[625],
                         state["numpy_gauss"].item()))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(
        {k.removeprefix("tracker."): v for k, v in state.items() if k.startswith("tracker.")})


def layout(ctx: ParallelContext) -> dict[str, int]:
    """The training layout a checkpoint records (train_state.json) and its RNG tensors are indexed by."""
    return {"pp": ctx.pp, "tp": ctx.tp, "dp": ctx.dp}


def _sharded_state_dict(modules: dict, optimizer, ctx: ParallelContext, is_loading: bool,
                        rng: bool = True) -> dict[str, Any]:
    """`modules`: name -> model stage; "model" is the trained one (the optimizer's), others (e.g. the
    reference model) are saved under their name as a key prefix so their tensors do not collide.
    `rng`: include this rank's RNG states (not when loading at another layout)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    sd: dict[str, Any] = {name: m.sharded_state_dict(prefix="" if name == "model" else f"{name}.")
                          for name, m in modules.items()}
    if optimizer is not None and (is_loading or optimizer_has_state(optimizer)):
        sd["optimizer"] = optimizer.sharded_state_dict(sd["model"], is_loading=is_loading)
    sd = _without_objects(sd)
    if not rng:
        return sd
    # Each RNG state is a [pp, tp, dp, n] tensor: a resumed rank continues its own streams.
    size = layout(ctx)
    ranks = {"pp": ctx.pp_rank, "tp": ctx.tp_rank, "dp": ctx.dp_rank}
    sd["rng_state"] = {name: ShardedTensor.from_rank_offsets(
        f"rng_state.{name}", t.reshape(1, 1, 1, -1), *((axis, ranks[k], size[k]) for axis, k in enumerate(size)),
        replica_id=0) for name, t in rng_state().items()}
    return sd


def _without_objects(sd: dict[str, Any]) -> dict[str, Any]:
    """`sd` less megatron-core's ShardedObjects (pickled on save): only the layers' `_extra_state`
    (transformer-engine fp8 metadata, empty here) are such; any other is an error, not a silent loss."""
    from megatron.core.dist_checkpointing.dict_utils import extract_matching_values, nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    objects, rest = extract_matching_values(sd, lambda v: isinstance(v, ShardedObject))
    others = [o.key for o in nested_values(objects) if not o.key.endswith("_extra_state")]
    if others:
        raise CheckpointError(f"state to checkpoint holds objects {others[:3]} that would be pickled; "
                              "checkpoints hold tensors only")
    return rest


def optimizer_has_state(optimizer) -> bool:
    """False before the first step: Adam has no moments yet and megatron's optimizer cannot save
    (or later load) them; such checkpoints are saved without optimizer, which is what a fresh
    optimizer is."""
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(len(state) > 0 for o in inner for state in o.optimizer.state.values())


def _start_writer_queue_bound_to_this_process() -> SyncManager | None:
    """megatron-core's checkpoint writer reports through a multiprocessing Manager queue that it
    spawns at the first save and never stops (megatron-core 0.16: filesystem_async._results_queue);
    a SIGKILLed trainer left that manager orphaned with ~300 MB. We start the manager ourselves, set
    to exit with this process (megatron_papo.lifetime), and return it (None: nothing started).
    Other megatron-core versions: left alone, and tests/test_checkpoint.py fails on them."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "absent") is not None:
        return None  # already started, or no such queue in this version
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(initializer=exit_when_process_ends, initargs=this_process())
    # Private megatron-core global, set because megatron offers no way to pass the queue or its manager
    # (test_megatron_core_writer_queue_is_the_global_we_set fails when megatron-core renames or stops reading it).
    filesystem_async._results_queue = manager.Queue()  # the queue's proxy keeps the manager alive
    return manager


def save_checkpoint(cfg: CheckpointConfig, step: int, modules: dict, optimizer, scheduler,
                    train_state: dict[str, Any], ctx: ParallelContext, run_config: Any = None,
                    write_extras: Callable[[Path], None] | None = None) -> Path:
    """Collective: every rank calls it; `ctx`: the job's layout and this rank's place in it.
    `train_state` (step, data position, ...) is the same on all ranks; rank 0 writes it (JSON-able)
    to train_state.json, and `run_config` (the run's config dataclass) to run_config.yaml.
    `write_extras(dir)` runs on rank 0 before the checkpoint is marked complete (config.json,
    tokenizer, ... so tools can read the directory). Returns the final directory."""
    from megatron.core import dist_checkpointing

    root = Path(cfg.save_dir)
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    rank0 = ctx.rank == 0
    if rank0:
        remove_leftovers(root)
        tmp.mkdir(parents=True)
    dist.barrier()
    sd = _sharded_state_dict(modules, optimizer, ctx, is_loading=False)
    train_state = dict(train_state, step=step, optimizer_saved="optimizer" in sd, layout=layout(ctx))
    sd["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    _start_writer_queue_bound_to_this_process()
    dist_checkpointing.save(sd, str(tmp))
    dist.barrier()
    if rank0:
        write_text_atomic(tmp / TRAIN_STATE, json.dumps(train_state, indent=1) + "\n")
        if run_config is not None:
            write_text_atomic(tmp / RUN_CONFIG, dump_yaml(run_config))
        if write_extras is not None:
            write_extras(tmp)
        fsync_folder(tmp, with_files=True)  # write_extras' files too: COMPLETE never reaches the disk before them
        write_text_atomic(tmp / COMPLETE_MARKER, f"{step}\n")
        if final.exists():  # a re-save of the same step (e.g. signal right after a periodic save)
            _delete(final)
        os.replace(tmp, final)
        fsync_folder(root)
        _prune(root, cfg.keep_last)
    dist.barrier()
    return final


def load_checkpoint(path: Path, modules: dict, optimizer, scheduler, ctx: ParallelContext) -> dict[str, Any]:
    """Collective (`ctx`: as for save_checkpoint). Loads into the given model/optimizer/scheduler, restores this rank's RNG
    states, and returns the saved train_state. Unpickles nothing from the checkpoint."""
    from megatron.core import dist_checkpointing

    from megatron_papo.models.qwen2_5_vl.dist_io import weights_only_common_load

    train_state = read_train_state(path)
    _check_no_pickles(path)
    fresh_optimizer = None
    if not train_state["optimizer_saved"]:  # saved before its first step: the fresh optimizer is that state
        fresh_optimizer, optimizer = optimizer, None
    same_layout = train_state["layout"] == layout(ctx)
    if not same_layout and ctx.rank == 0:
        print(f"{path} was saved at layout {train_state['layout']}, resuming at {layout(ctx)}: weights and optimizer "
              "state are resharded; RNG streams restart from the seed", flush=True)
    sd = _sharded_state_dict(modules, optimizer, ctx, is_loading=True, rng=same_layout)
    loaded = dist_checkpointing.load(sd, str(path), common_strategy=weights_only_common_load())
    for name, m in modules.items():
        m.load_state_dict(loaded[name], strict=False)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if fresh_optimizer is not None:  # its fp32 copies of the weights (bf16, distributed optimizer) predate this load
        fresh_optimizer.reload_model_params()
    if scheduler is not None and loaded.get("scheduler") is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        set_rng_state({k: v.reshape(-1) for k, v in loaded["rng_state"].items()})
    return train_state


def check_config(path: Path, cfg: Any) -> None:
    """Refuse to resume from `path` with options that differ from its run_config.yaml, except
    CHANGEABLE_ON_RESUME: another objective or data on a checkpoint is another experiment."""
    f = Path(path) / RUN_CONFIG
    if not f.is_file():
        raise CheckpointError(f"{path}: no {RUN_CONFIG}; written by an older megatron_papo: not loaded")
    saved, now = flat_keys(yaml.safe_load(f.read_text())), flat_keys(yaml.safe_load(dump_yaml(cfg)))
    absent = "(absent)"
    keys = sorted(saved.keys() | now.keys(), key=lambda k: (k.count("."), k))  # `preset` before `algo.*`
    differ = [f"{k}: {saved.get(k, absent)} -> {now.get(k, absent)}" for k in keys
              if saved.get(k, absent) != now.get(k, absent)
              and k not in CHANGEABLE_ON_RESUME and k.split(".")[0] not in CHANGEABLE_ON_RESUME]
    if differ:
        shown = ", ".join(differ[:8]) + (f" (and {len(differ) - 8} more)" if len(differ) > 8 else "")
        raise CheckpointError(f"cannot resume from {path}: options differ from its {RUN_CONFIG} ({shown}); resume "
                              "with its values, or start a new run from its weights in another output_dir "
                              f"(model.load={path}, no model.hf_dir: the checkpoint holds its tokenizer)")


def flat_keys(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as {"section.key": value}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def preflight(cfg: Any) -> Path | None:
    """Collective, before anything is built: the checkpoint this run resumes from (None: a fresh
    start), checked against the run's config, and never mixed with another run in its folders (the
    new run's checkpoints would sort among the old ones, keep_last delete them first and a later
    `--resume auto` continue the old run). Rank 0 decides, and moves folders aside, and the others
    get its answer, so that all ranks agree; a CheckpointError is raised on every rank."""
    answer: list = [None]
    if dist.get_rank() == 0:
        try:
            answer[0] = _resume_point(cfg)
        except CheckpointError as e:
            answer[0] = e
    dist.broadcast_object_list(answer, src=0)
    if isinstance(answer[0], CheckpointError):
        raise answer[0]
    return answer[0]


def _resume_point(cfg: Any) -> Path | None:
    ck = cfg.checkpoint
    out, save_dir = Path(cfg.output_dir).resolve(), Path(ck.save_dir).resolve()
    path = find_resume_checkpoint(ck)
    if path is not None:
        check_config(path, cfg)
        if path.parent.resolve() == save_dir:  # this run's own checkpoint
            newer = [p.name for p in complete_checkpoints(save_dir) if p.name > path.name]
            if newer:
                raise CheckpointError(f"checkpoint.resume={ck.resume}: {save_dir} also holds newer checkpoints "
                                      f"({', '.join(newer)}), which would mix with this run's: move them away, "
                                      "or resume into another output_dir")
            return path
    metrics = out / "metrics.jsonl"
    rows = len(metrics.read_text().strip().splitlines()) if metrics.is_file() else 0
    others = complete_checkpoints(save_dir)
    if not rows and not others:
        return path
    folders = [f for f in [out] + [save_dir] * (not save_dir.is_relative_to(out)) if f.exists()]
    if path is None and ck.on_existing_run == "move":
        for folder in folders:
            aside = _aside(folder)
            os.rename(folder, aside)
            print(f"moved {folder} to {aside} (checkpoint.on_existing_run=move)", flush=True)
        return None
    held = [f"{rows} rows of {metrics}"] * bool(rows) + [f"{len(others)} checkpoints in {save_dir}"] * bool(others)
    hints = (["continue it with --resume auto"] * bool(others and path is None) + ["use another output_dir"]
             + [f"set checkpoint.on_existing_run=move to rename {' and '.join(map(str, folders))} to "
                f"{' and '.join(str(_aside(f)) for f in folders)}"] * (path is None))
    raise CheckpointError(f"{' and '.join(held)} belong to another run, which this run would mix with: "
                          + ", or ".join(hints))


def _aside(folder: Path) -> Path:
    n = 1
    while folder.with_name(f"{folder.name}.previous_{n}").exists():
        n += 1
    return folder.with_name(f"{folder.name}.previous_{n}")


def read_train_state(path: Path) -> dict[str, Any]:
    f = Path(path) / TRAIN_STATE
    if not f.is_file():
        raise CheckpointError(f"{path}: no {TRAIN_STATE}; written by an older megatron_papo whose checkpoints "
                              "hold pickles (they run code when loaded): not loaded")
    return json.loads(f.read_text())


def _check_no_pickles(path: Path) -> None:
    """Read .metadata with an allow-list (megatron-core then reads it with plain pickle) and refuse
    a checkpoint that holds pickled objects (megatron-core would unpickle them)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from megatron_papo.models.qwen2_5_vl.dist_io import read_dist_metadata

    try:
        entries = read_dist_metadata(path).state_dict_metadata
    except (OSError, pickle.UnpicklingError, AttributeError, EOFError) as e:
        raise CheckpointError(f"{path}/.metadata: {e}; not loaded") from None
    objects = sorted(k for k, v in entries.items() if isinstance(v, BytesStorageMetadata))
    if objects:
        raise CheckpointError(f"{path} holds pickled objects ({', '.join(objects[:3])}"
                              f"{', ...' if len(objects) > 3 else ''}), which run code when loaded: not loaded")


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for old in complete_checkpoints(root)[:-keep_last]:
        _delete(old)


def _delete(path: Path) -> None:
    """Rename, then delete: a kill midway leaves a `.tmp` name that the next save removes, never a
    half-deleted folder under a checkpoint's name."""
    doomed = path.with_name(path.name + ".deleted.tmp")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


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
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32)
        if dist.is_initialized():
            flag = flag.to(collective_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


@dataclass
class RunState:
    """Where the run stands: saved in every checkpoint's train_state.json."""

    step: int = 0            # RL steps completed
    sft_done: bool = False   # the warm-up (if any) ran and the reference model holds its result
