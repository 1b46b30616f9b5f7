"""Stream Megatron weights into the rollout engines in buckets, every TP rank writing its own shards.

Who does what. Every rank of the job hosts one rollout-engine worker (vLLM's SPMD mode: an engine
is `rollout.tp` consecutive ranks, each loading full HF tensors and keeping its slice), and every
engine needs the whole policy. A DP replica (its model-parallel group: TP x PP ranks) feeds the
engine workers on its own ranks, so no sync crosses replicas:
  * each pipeline stage's SENDER is its TP rank 0 (in the replica);
  * stage by stage, the stage's TP ranks fill a bucket, and every rank of the replica loads it.

The plan: every rank of a stage computes the same plan from its parameters' shapes alone. Each
parameter becomes its HF tensor(s) (`hf_mapping.hf_shapes`, names and layouts from the one map),
given fixed places (offsets) in buckets of at most `bucket_mb`; a bucket never splits an engine
"load group" (vLLM: the tensors of one module, e.g. q/k/v weights and biases -> qkv_proj), so a
group larger than `bucket_mb` raises the bucket size to that group's (the CAPACITY; vLLM loads a
module from whole HF tensors, so no loader-based route needs less). The sender announces its
stage's plan (entries per bucket) to the replica.

Two routes, chosen per call:
  * shared memory (every rank of the replica on one host): the bucket is the sender's shared-memory
    buffer (packing.SharedBuffer). Each TP rank writes its own shard of each parameter straight into
    it, in HF layout (`hf_mapping.write_hf_shard`: the parts are disjoint and tile the tensors; a
    tensor all ranks hold whole is written by TP rank 0; a GPU parameter is copied to the host on
    the way), a barrier, every rank's engine loads from that buffer by path (the workers map it: no
    copy), a barrier (the bucket may be overwritten). A byte is written once, read by every engine.
  * broadcast (the replica spans hosts): each parameter is all-gathered over the TP group
    (`dist.all_gather`), the sender writes the bucket, and broadcasts it over the replica's CPU group
    into each rank's engine buffer. (Design only, not built: one receiver per host and shared memory
    on that host, which would cut the cross-host bytes by the ranks per host; docs/scaling.md.)
At the end every engine resets its caches, which also frees its buffer. A rank may host no engine
(engine=None: tests, benchmarks); it still takes part.

Peak extra memory (C = capacity = max(bucket, largest load group)):
  * shared memory: the sender's buffer, C, mapped by the replica's ranks (TP peers touch about C/TP
    of it by writing); vLLM's reload materialises each module it rebuilds (the model's own size,
    module by module);
  * broadcast: C per rank (its engine buffer), plus one parameter's gathered shards (a full tensor)
    per TP rank.

Bytes per sync (P = parameters in HF layout, element size e): each engine worker loads P * e (less
the vision tower when frozen after the first sync): its full-tensor share (`SyncStats.bytes`). On
the shared-memory route no byte travels between ranks besides the TP writes; on the broadcast route
each rank receives the P_s * e of every other stage s, and the TP gather moves (t-1)/t of each
stage's bytes to its sender. Each rank receiving only its 1/r slice (rollout/reshard.py) is the
next step (design only).
"""
from __future__ import annotations

import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_papo.models.qwen2_5_vl import hf_mapping
from megatron_papo.models.qwen2_5_vl.flavors import Qwen2_5_VLConfig
from megatron_papo.models.qwen2_5_vl.hf_mapping import Rule

from .engine import RolloutEngine
from .packing import PackedTensor, SharedBuffer, aligned, map_shared, pack_layout, packed_end


@dataclass
class WeightSyncConfig:
    """Options of the Megatron -> rollout engine weight sync."""

    bucket_mb: float = 256.0                  # bucket size (raised to the largest load group); peak extra memory per rank
    freeze_vision: bool = False               # vision tower not trained: sent on the first sync only
    transfer_dtype: torch.dtype | None = None  # cast before packing (e.g. bf16 for a bf16 engine); None = as trained
    shared_memory_gather: bool = True         # TP ranks write into shared memory when they share a host (CPU tensors)


@dataclass
class SyncGroups:
    """This rank's place in the sync (module doc): its replica's TP group, pipeline group and
    model-parallel group on gloo (the buckets are host memory)."""

    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    cpu_group: dist.ProcessGroup  # the replica's model-parallel group (TP x PP ranks), on gloo

    def __post_init__(self):
        self._senders: list[int] | None = None

    @classmethod
    def from_context(cls, ctx) -> "SyncGroups":
        """From megatron_papo.parallel.ParallelContext."""
        return cls(ctx.tp_group, ctx.pp_group, ctx.model_parallel_cpu_group)

    @property
    def tp_rank(self) -> int:
        return dist.get_rank(self.tp_group)

    @property
    def pp_rank(self) -> int:
        return dist.get_rank(self.pp_group)

    @property
    def is_sender(self) -> bool:
        return self.tp_rank == 0

    @property
    def stage_senders(self) -> list[int]:
        """Global ranks of the senders of stages 0..p-1 of this replica."""
        if self._senders is None:
            places = [None] * dist.get_world_size(self.cpu_group)
            dist.all_gather_object(places, (self.pp_rank, self.tp_rank, dist.get_rank()), group=self.cpu_group)
            self._senders = [rank for _, _, rank in sorted(p for p in places if p[1] == 0)]
        return self._senders


@dataclass
class SyncStats:
    tensors: int = 0              # HF tensors loaded into this rank's engine (all stages)
    bytes: int = 0                # their bytes (full HF tensors: what this rollout rank is given)
    buckets: int = 0
    capacity_bytes: int = 0       # the largest stage's bucket size: max(bucket_mb, largest load group)
    gathered_bytes: int = 0       # shard bytes this rank got from its TP peers (written into its bucket
                                  # in place, or received by all-gather)
    received_bytes: int = 0       # bytes that reached this rank over the network (broadcast route)
    engine_seconds: float = 0.0   # time inside the engine's load calls
    seconds: float = 0.0
    route: str = ""               # "shared_memory" or "broadcast"
    names: list[str] = field(default_factory=list)


@dataclass
class _Item:
    """A parameter and the places of its HF tensors in its bucket."""

    param: torch.Tensor
    rule: Rule
    entries: list[PackedTensor]


class WeightSync:
    """Megatron stage parameters -> HF tensors in buckets -> every rank's engine worker.

    Call `sync` on every rank at the same point, each with its engine (or None)."""

    def __init__(self, cfg: Qwen2_5_VLConfig, groups: SyncGroups, options: WeightSyncConfig | None = None,
                 load_group=RolloutEngine.load_group):
        """`load_group`: the engine class's `load_group` (e.g. `VLLMEngine.load_group`); every rank
        needs it, not only the driver, since every rank computes the plan."""
        self.load_group = load_group
        self.cfg = cfg
        self.groups = groups
        self.options = options or WeightSyncConfig()
        self.bucket_bytes = max(aligned(1), int(self.options.bucket_mb * 2**20))
        self._vision_sent = False
        self._hosts: list[str] | None = None

    def _skip(self, rule: Rule) -> bool:
        return rule.scope == "vision" and self.options.freeze_vision and self._vision_sent

    def plan(self, params: Iterable[tuple[str, torch.Tensor, Rule]]) -> tuple[list[list[_Item]], int]:
        """(buckets, capacity): this stage's parameters placed in buckets (module doc). Parameters
        whose HF tensors share a load group must come consecutively (they do in model order)."""
        tp = dist.get_world_size(self.groups.tp_group)
        units: list[tuple[set[str], list[tuple[str, torch.Tensor, Rule, list]]]] = []
        finished_groups: set[str] = set()
        for name, param, rule in params:
            if self._skip(rule):
                continue
            dtype = self.options.transfer_dtype or param.dtype
            specs = [(hf, dtype, shape) for hf, shape in
                     zip(rule.hf, hf_mapping.hf_shapes(rule, tuple(param.shape), tp, self.cfg))]
            keys = {self.load_group(hf) for hf in rule.hf}
            if units and keys & units[-1][0]:
                units[-1][0].update(keys)
                units[-1][1].append((name, param, rule, specs))
                continue
            if keys & finished_groups:
                raise ValueError(f"{name}: load group {sorted(keys & finished_groups)} is split by other parameters; "
                                 "an engine loads a group in one call, so its parameters must be consecutive")
            if units:
                finished_groups |= units[-1][0]
            units.append((keys, [(name, param, rule, specs)]))
        sizes = [packed_end(pack_layout(spec for *_, specs in unit for spec in specs)) for _, unit in units]
        capacity = max([self.bucket_bytes, *sizes])
        buckets: list[list[_Item]] = []
        used = capacity
        for (_, unit), size in zip(units, sizes):
            if aligned(used) + size > capacity:
                buckets.append([])
                used = 0
            for _, param, rule, specs in unit:
                entries = pack_layout(specs, start=used)
                buckets[-1].append(_Item(param, rule, entries))
                used = packed_end(entries)
        return buckets, capacity

    def _route(self) -> str:
        """"shared_memory" when every rank of the replica is on this host (module doc)."""
        if not self.options.shared_memory_gather:
            return "broadcast"
        if self._hosts is None:
            self._hosts = [None] * dist.get_world_size(self.groups.cpu_group)
            dist.all_gather_object(self._hosts, socket.gethostname(), group=self.groups.cpu_group)
        return "shared_memory" if len(set(self._hosts)) == 1 else "broadcast"

    def _local(self, param: torch.Tensor) -> torch.Tensor:
        """A parameter as this rank sends it over the wire: detached, in transfer_dtype, contiguous."""
        local = param.detach()
        if self.options.transfer_dtype is not None:
            local = local.to(self.options.transfer_dtype)
        return local.contiguous()

    @torch.no_grad()
    def sync(self, params: Iterable[tuple[str, torch.Tensor, Rule]], engine: RolloutEngine | None) -> SyncStats:
        """Push this stage's parameters (local name, tensor, hf_mapping rule: param_binding's
        `hf_param_rules(model)`) to the engine workers of this replica; collective over the replica
        (every replica syncs at once). `engine`: this rank's worker, or None where it hosts none."""
        start = time.perf_counter()
        stats = SyncStats()
        g = self.groups
        mine, capacity = self.plan(params)
        stats.route = route = self._route()
        senders = g.stage_senders
        for stage, sender in enumerate(senders):
            own = g.pp_rank == stage
            announced = [([[e for item in b for e in item.entries] for b in mine], capacity) if dist.get_rank() == sender
                         else None]
            dist.broadcast_object_list(announced, src=sender, group=g.cpu_group)
            bucket_entries, stage_capacity = announced[0]
            stats.capacity_bytes = max(stats.capacity_bytes, stage_capacity)
            if route == "shared_memory":
                self._stage_by_shared_memory(mine if own else None, bucket_entries, stage_capacity, sender, engine, stats)
            else:
                self._stage_by_broadcast(mine if own else None, bucket_entries, stage_capacity, sender, engine, stats)
        if engine is not None:
            engine.reset_caches()
        if self.options.freeze_vision:
            self._vision_sent = True
        stats.seconds = time.perf_counter() - start
        return stats

    def _stage_by_shared_memory(self, mine, bucket_entries, capacity: int, sender: int, engine, stats) -> None:
        """One stage's buckets: its TP ranks write into the sender's buffer, every rank loads it."""
        g = self.groups
        tp, tp_rank = dist.get_world_size(g.tp_group), g.tp_rank
        own = None
        if dist.get_rank() == sender:
            own = SharedBuffer(capacity)
        try:
            path = [own.path if own is not None else None]
            dist.broadcast_object_list(path, src=sender, group=g.cpu_group)
            target = None
            if mine is not None:  # this rank writes (its stage)
                target = own.bytes if own is not None else map_shared(path[0], capacity)
            for b, entries in enumerate(bucket_entries):
                if mine is not None:
                    for item in mine[b]:
                        hf_mapping.write_hf_shard(item.rule, item.param.detach(), tp_rank, tp, self.cfg,
                                                  [e.view(target) for e in item.entries])
                        if own is not None and hf_mapping.split_dim(item.rule, item.param.dim()) is not None:
                            stats.gathered_bytes += (tp - 1) * item.param.numel() * item.entries[0].dtype.itemsize
                dist.barrier(group=g.cpu_group)  # the bucket is complete
                if engine is not None:
                    self._load(engine, entries, stats, source=path[0])
                dist.barrier(group=g.cpu_group)  # loaded everywhere: the bucket may be overwritten
        finally:
            if own is not None:
                own.close()

    def _stage_by_broadcast(self, mine, bucket_entries, capacity: int, sender: int, engine, stats) -> None:
        """One stage's buckets: gathered over TP into the sender's buffer, broadcast to every rank."""
        g = self.groups
        is_sender = dist.get_rank() == sender
        buffer = engine.weight_buffer(capacity).bytes if engine is not None else torch.empty(capacity, dtype=torch.uint8)
        for b, entries in enumerate(bucket_entries):
            if mine is not None:
                for item in mine[b]:
                    self._gather_and_write(item, buffer if is_sender else None, stats)
            end = packed_end(entries)
            dist.broadcast(buffer[:end], src=sender, group=g.cpu_group)
            if not is_sender:
                stats.received_bytes += end
            if engine is not None:
                self._load(engine, entries, stats)

    def _gather_and_write(self, item: _Item, target: torch.Tensor | None, stats: SyncStats) -> None:
        """All-gather one parameter's shards over the TP group; the sender (target given) writes them."""
        tp_group = self.groups.tp_group
        local = self._local(item.param)
        shards = [torch.empty_like(local) for _ in range(dist.get_world_size(tp_group))]
        dist.all_gather(shards, local, group=tp_group)
        stats.gathered_bytes += (len(shards) - 1) * local.numel() * local.element_size()
        if target is not None:
            outs = [e.view(target) for e in item.entries]
            for tp_rank, shard in enumerate(shards):
                hf_mapping.write_hf_shard(item.rule, shard, tp_rank, len(shards), self.cfg, outs)

    def _load(self, engine: RolloutEngine, entries: list[PackedTensor], stats: SyncStats,
              source: str | None = None) -> None:
        start = time.perf_counter()
        engine.load_packed(entries, source=source)
        stats.engine_seconds += time.perf_counter() - start
        stats.buckets += 1
        stats.tensors += len(entries)
        stats.bytes += sum(e.nbytes for e in entries)
        stats.names += [e.name for e in entries]
