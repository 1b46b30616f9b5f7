"""The job's parallel layout, built once (train.py) and passed down, as torchtitan passes ParallelDims.

Training: TP x PP x DP ranks in megatron-core's order (TP fastest). Rollout: the same ranks form
E = world / rollout_tp vLLM engines of rollout_tp consecutive ranks each (one host per engine);
every rank is one worker of exactly one engine. A step's prompts are split over the engines by
global prompt index (`RolloutTopology.prompt_range`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class RolloutTopology:
    """Which engine this rank serves. Pure arithmetic: the same on every rank."""

    world: int     # ranks in the job
    tp: int        # ranks per engine (rollout.tp)
    rank: int      # this rank

    @property
    def engines(self) -> int:
        return self.world // self.tp

    @property
    def engine_index(self) -> int:
        return self.rank // self.tp

    @property
    def engine_rank(self) -> int:
        """This rank's place in its engine (0 = the engine's first rank)."""
        return self.rank % self.tp

    def prompt_range(self, num_prompts: int, engine: int | None = None) -> range:
        """The global prompt indices an engine generates: contiguous, sizes differing by at most one."""
        e = self.engine_index if engine is None else engine
        base, extra = divmod(num_prompts, self.engines)
        start = e * base + min(e, extra)
        return range(start, start + base + (e < extra))


def check_rollout_tp(rollout_tp: int, world: int, ranks_per_host: int, sizes: dict[str, int]) -> None:
    """Reject a rollout.tp the job or vLLM cannot run, before anything is built. `sizes`: the model
    dimensions vLLM splits over its TP ranks (heads, KV heads, MLP widths, padded vocabulary)."""
    if rollout_tp < 1:
        raise ValueError(f"rollout.tp must be >= 1, got {rollout_tp}")
    if world % rollout_tp:
        raise ValueError(f"rollout.tp={rollout_tp} must divide the job's {world} ranks (one engine per "
                         f"rollout.tp consecutive ranks)")
    if ranks_per_host % rollout_tp:
        raise ValueError(f"rollout.tp={rollout_tp} must divide the {ranks_per_host} ranks per host: an engine "
                         "cannot span hosts")
    for name, size in sizes.items():
        if name == "num_key_value_heads" and rollout_tp > size:
            if rollout_tp % size:  # vLLM replicates KV heads over rollout_tp / size ranks
                raise ValueError(f"rollout.tp={rollout_tp} must be a multiple of {name}={size} (or divide it)")
        elif size % rollout_tp:
            raise ValueError(f"rollout.tp={rollout_tp} must divide the model's {name}={size} (vLLM splits it "
                             "over its TP ranks)")


def ranks_per_host() -> int:
    """torchrun's LOCAL_WORLD_SIZE (ranks on this host); the whole job when started without torchrun."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))


@dataclass
class ParallelContext:
    """Layout, this rank's coordinates and the process groups (megatron-core's, read once)."""

    tp: int
    pp: int
    dp: int
    rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    model_parallel_group: dist.ProcessGroup   # this replica's TP x PP ranks
    model_parallel_cpu_group: dist.ProcessGroup  # the same ranks on gloo (host-memory weight buckets)
    rollout: RolloutTopology

    @property
    def world(self) -> int:
        return self.rollout.world

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @classmethod
    def from_megatron(cls, rollout_tp: int = 1) -> "ParallelContext":
        """Read megatron-core's parallel_state once (after initialize_model_parallel)."""
        from megatron.core import parallel_state as ps

        world, rank = dist.get_world_size(), dist.get_rank()
        model_parallel = ps.get_model_parallel_group()
        return cls(
            tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
            dp=ps.get_data_parallel_world_size(), rank=rank, tp_rank=ps.get_tensor_model_parallel_rank(),
            pp_rank=ps.get_pipeline_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
            tp_group=ps.get_tensor_model_parallel_group(), pp_group=ps.get_pipeline_model_parallel_group(),
            dp_group=ps.get_data_parallel_group(), model_parallel_group=model_parallel,
            model_parallel_cpu_group=_on_gloo(model_parallel),
            rollout=RolloutTopology(world=world, tp=rollout_tp, rank=rank))


def _on_gloo(group: dist.ProcessGroup) -> dist.ProcessGroup:
    """`group`'s ranks on gloo (itself on a gloo job). Collective over the job: every rank creates
    every replica's group, in the same order."""
    if dist.get_backend(group) == "gloo":
        return group
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, tuple(dist.get_process_group_ranks(group)))
    mine = None
    for ranks in sorted(set(everyone)):
        created = dist.new_group(list(ranks), backend="gloo")
        if dist.get_rank() in ranks:
            mine = created
    return mine
