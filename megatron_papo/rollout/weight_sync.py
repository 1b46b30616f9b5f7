"""Stream Megatron weights into the rollout engine in buckets, every TP rank writing its own shards.

Who does what (one rollout replica; the engine runs in-process on one designated rank):
  * the DRIVER hosts the engine: pipeline stage 0, TP rank 0, DP rank 0 (global rank 0 in
    megatron's rank order). Only it calls the engine.
  * each pipeline stage's SENDER is its (TP rank 0, DP rank 0) rank; the senders form the driver's
    pipeline group, so every sender finds the driver without global communication.
  * DP ranks > 0 hold the same weights and do nothing.

The plan: every rank of a stage computes the same plan from its parameters' shapes alone. Each
parameter becomes its HF tensor(s) (`hf_mapping.hf_shapes`, names and layouts from the one map),
given fixed places (offsets) in buckets of at most `bucket_mb`; a bucket never splits an engine
"load group" (vLLM: the tensors of one module, e.g. q/k/v weights and biases -> qkv_proj), so a
group larger than `bucket_mb` raises the bucket size to that group's (the CAPACITY; vLLM loads a
module from whole HF tensors, so no loader-based route needs less).

Per bucket, every TP rank writes its own shard of each parameter straight into the bucket, in HF
layout (`hf_mapping.write_hf_shard`: the ranks' parts are disjoint and tile the tensors; a tensor
all ranks hold whole is written by TP rank 0), a barrier, the sender delivers the bucket, a
barrier (the bucket may be overwritten). The bucket is the sender's shared-memory buffer; on the
driver it IS the engine's `weight_buffer`, which the engine's workers map and load from, so a
byte is copied once from the parameter to where vLLM reads it. This needs the stage's TP ranks on
one host with CPU parameters; otherwise (GPU parameters, TP across hosts) each parameter is
all-gathered over the TP group (`dist.all_gather`) and the sender writes all shards.
Later stages: the stage's sender sends each filled bucket point-to-point to the driver (metadata,
then the bytes), which receives it straight into the engine's buffer and loads it. Stages are taken
in order 0, 1, ...; a later stage blocks on its first send until the driver gets to it. At the end
the driver resets the engine's caches, which also frees the engine's buffer.

Peak extra memory (C = capacity = max(bucket, largest load group)):
  * the driver: the engine's buffer, C (resident as far as written: its own shards, or the whole
    bucket when received from a later stage or with the all-gather);
  * a later stage's sender: its bucket, C;
  * other TP ranks: the pages of the bucket they write, about C / TP;
  * with the all-gather instead: plus one parameter's gathered shards (a full tensor) per TP rank.
The engine's workers map the same pages (no copy); vLLM's reload then materialises each module
it rebuilds (the model's own size, module by module).

Bytes moved per sync (P = parameters in HF layout, element size e, TP t, PP p):
  each byte of a stage is written once into its bucket ((t-1)/t of it by the TP peers, in place);
  sender -> driver: P_s * e for each stage s > 0; the driver's engine loads P * e (less the vision
  tower when frozen after the first sync). `SyncStats` reports what one call moved.
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
    """This rank's place in the sync (see module doc). Build with `from_parallel_state` or by hand."""

    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_rank: int

    @classmethod
    def from_parallel_state(cls) -> "SyncGroups":
        from megatron.core import parallel_state

        return cls(parallel_state.get_tensor_model_parallel_group(),
                   parallel_state.get_pipeline_model_parallel_group(), parallel_state.get_data_parallel_rank())

    @property
    def active(self) -> bool:
        return self.dp_rank == 0

    @property
    def is_sender(self) -> bool:
        return self.active and dist.get_rank(self.tp_group) == 0

    @property
    def pp_rank(self) -> int:
        return dist.get_rank(self.pp_group)

    @property
    def is_driver(self) -> bool:
        return self.is_sender and self.pp_rank == 0

    @property
    def stage_senders(self) -> list[int]:
        """Global ranks of the senders of stages 0..p-1 (valid on senders); [0] is the driver."""
        return dist.get_process_group_ranks(self.pp_group)


@dataclass
class SyncStats:
    tensors: int = 0              # HF tensors delivered (driver: all stages; sender: its stage)
    bytes: int = 0                # their bytes
    buckets: int = 0
    capacity_bytes: int = 0       # this stage's bucket size: max(bucket_mb, largest load group)
    gathered_bytes: int = 0       # shard bytes this rank got from its TP peers (written into its bucket
                                  # in place, or received by all-gather)
    engine_seconds: float = 0.0   # driver: time inside the engine's load calls
    seconds: float = 0.0
    names: list[str] = field(default_factory=list)


@dataclass
class _Item:
    """A parameter and the places of its HF tensors in its bucket."""

    param: torch.Tensor
    rule: Rule
    entries: list[PackedTensor]


def _is_tied_output_copy(local_name: str, rule: Rule) -> bool:
    """The last stage's copy of a tied embedding (param_rules maps it to the embedding's rule)."""
    return "output_layer" in local_name and "output_layer" not in rule.megatron


class WeightSync:
    """Megatron stage parameters -> HF tensors in buckets -> the engine on the driver rank.

    Call `sync` on every rank at the same point (all TP ranks of DP replica 0 take part; the
    driver passes its engine, the others None)."""

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
        self._tp_hosts: list[str] | None = None

    def _skip(self, local_name: str, rule: Rule) -> bool:
        if self.cfg.tie_word_embeddings and _is_tied_output_copy(local_name, rule):
            return True
        return rule.scope == "vision" and self.options.freeze_vision and self._vision_sent

    def plan(self, params: Iterable[tuple[str, torch.Tensor, Rule]]) -> tuple[list[list[_Item]], int]:
        """(buckets, capacity): this stage's parameters placed in buckets (module doc). Parameters
        whose HF tensors share a load group must come consecutively (they do in model order)."""
        tp = dist.get_world_size(self.groups.tp_group)
        units: list[tuple[set[str], list[tuple[str, torch.Tensor, Rule, list]]]] = []
        finished_groups: set[str] = set()
        for name, param, rule in params:
            if self._skip(name, rule):
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

    def _shared_memory_gather(self, buckets: list[list[_Item]]) -> bool:
        """TP peers can write into the sender's buffer: CPU parameters, every TP rank on this host."""
        if not self.options.shared_memory_gather or not all(i.param.is_cpu for b in buckets for i in b):
            return False
        if self._tp_hosts is None:
            self._tp_hosts = [None] * dist.get_world_size(self.groups.tp_group)
            dist.all_gather_object(self._tp_hosts, socket.gethostname(), group=self.groups.tp_group)
        return len(set(self._tp_hosts)) == 1

    def _local(self, param: torch.Tensor) -> torch.Tensor:
        """A parameter as this rank sends it over the wire: detached, in transfer_dtype, contiguous."""
        local = param.detach()
        if self.options.transfer_dtype is not None:
            local = local.to(self.options.transfer_dtype)
        return local.contiguous()

    @torch.no_grad()
    def sync(self, params: Iterable[tuple[str, torch.Tensor, Rule]], engine: RolloutEngine | None) -> SyncStats:
        """Push this stage's parameters (local name, tensor, hf_mapping rule; e.g. checkpoint_io's
        `param_rules(model)`) to the engine. `engine` is required on the driver, ignored elsewhere."""
        start = time.perf_counter()
        stats = SyncStats()
        g = self.groups
        if not g.active:
            return stats
        if g.is_driver and engine is None:
            raise ValueError("the driver rank (pipeline stage 0, TP rank 0, DP rank 0) must pass the engine")
        buckets, capacity = self.plan(params)
        stats.capacity_bytes = capacity
        tp_group = g.tp_group
        tp, tp_rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
        in_place = tp == 1 or self._shared_memory_gather(buckets)
        own = None  # a later stage's sender's bucket
        if g.is_driver:
            buffer = engine.weight_buffer(capacity)
        elif g.is_sender:
            buffer = own = SharedBuffer(capacity)
        try:
            if in_place and tp > 1:  # the peers map the sender's buffer
                paths = [None] * tp
                dist.all_gather_object(paths, buffer.path if g.is_sender else None, group=tp_group)
                target = buffer.bytes if g.is_sender else map_shared(paths[0], capacity)
                dist.barrier(group=tp_group)  # mapped everywhere
            elif g.is_sender:
                target = buffer.bytes
            for bucket in buckets:
                for item in bucket:
                    if in_place:
                        hf_mapping.write_hf_shard(item.rule, item.param.detach(), tp_rank, tp, self.cfg,
                                                  [e.view(target) for e in item.entries])
                        if g.is_sender and hf_mapping.split_dim(item.rule, item.param.dim()) is not None:
                            stats.gathered_bytes += (tp - 1) * item.param.numel() * item.entries[0].dtype.itemsize
                    else:
                        self._gather_and_write(item, target if g.is_sender else None, stats)
                if tp > 1 and in_place:
                    dist.barrier(group=tp_group)  # the bucket is complete
                if g.is_sender:
                    self._deliver(bucket, target, engine, stats)
                if tp > 1 and in_place:
                    dist.barrier(group=tp_group)  # delivered: the bucket may be overwritten
            if g.is_driver:
                for sender in g.stage_senders[1:]:
                    self._receive_from(sender, engine, stats)
                engine.reset_caches()
            elif g.is_sender:
                dist.send_object_list([None], dst=g.stage_senders[0])  # end of this stage
        finally:
            if own is not None:
                own.close()
        if self.options.freeze_vision:
            self._vision_sent = True
        stats.seconds = time.perf_counter() - start
        return stats

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

    def _deliver(self, bucket: list[_Item], target: torch.Tensor, engine: RolloutEngine | None,
                 stats: SyncStats) -> None:
        """The sender's filled bucket: loaded by the engine (driver) or sent to the driver."""
        entries = [e for item in bucket for e in item.entries]
        if self.groups.is_driver:
            self._load(engine, entries, stats)
            return
        end = packed_end(entries)
        driver = self.groups.stage_senders[0]
        dist.send_object_list([entries], dst=driver)
        dist.send(target[:end], dst=driver)
        stats.buckets += 1
        self._count(entries, stats)

    def _receive_from(self, sender: int, engine: RolloutEngine, stats: SyncStats) -> None:
        """A later stage's buckets, received straight into the engine's buffer and loaded."""
        while True:
            message = [None]
            dist.recv_object_list(message, src=sender)
            entries = message[0]
            if entries is None:
                return
            end = packed_end(entries)
            dist.recv(engine.weight_buffer(end).bytes[:end], src=sender)
            self._load(engine, entries, stats)

    def _load(self, engine: RolloutEngine, entries: list[PackedTensor], stats: SyncStats) -> None:
        start = time.perf_counter()
        engine.load_packed(entries)
        stats.engine_seconds += time.perf_counter() - start
        stats.buckets += 1
        self._count(entries, stats)

    @staticmethod
    def _count(entries: list[PackedTensor], stats: SyncStats) -> None:
        stats.tensors += len(entries)
        stats.bytes += sum(e.nbytes for e in entries)
        stats.names += [e.name for e in entries]
