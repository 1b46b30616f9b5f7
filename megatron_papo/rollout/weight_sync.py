"""Stream Megatron weights into the rollout engine, one tensor gathered at a time, in buckets.

Who does what (one rollout replica; the engine runs in-process on one designated rank):
  * the DRIVER hosts the engine: pipeline stage 0, TP rank 0, DP rank 0 (global rank 0 in
    megatron's rank order). Only it calls the engine.
  * each pipeline stage's SENDER is its (TP rank 0, DP rank 0) rank; the senders form the driver's
    pipeline group, so every sender finds the driver without global communication.
  * DP ranks > 0 hold the same weights and do nothing.
Per stage, every TP rank walks its parameters in the same order; each tensor is all-gathered over
the TP group (one tensor at a time), the sender converts it to HF names / layouts with
hf_mapping and collects tensors into batches of at most `bucket_mb`, never splitting an engine
"load group" (vLLM: the tensors of one module, e.g. q/k/v weights and biases -> qkv_proj). The
driver hands its own stage's batches straight to the engine; a later stage's sender packs each
batch into a preallocated byte bucket and sends it point-to-point to the driver (metadata object,
then the bytes), which loads it. Stages are taken in order 0, 1, ...: a later stage's sender
blocks on its first send until the driver gets to it. At the end the driver resets the engine's
caches.

Peak extra memory: one batch plus one bucket on the driver (the engine adapter packs a batch into
its own transfer buffer: vllm_engine uses a /dev/shm file) and on each sender, plus one gathered
tensor (its TP shards and full copy) on the stage's ranks; a load group larger than a bucket
travels alone in a buffer of its own size.

Bytes moved per sync (P = parameters in HF layout, element size e, TP t, PP p):
  all-gather: each TP rank receives (t-1)/t of its stage's tensors; sender -> driver: P_s * e for
  each stage s > 0; the driver's engine receives P * e (less the vision tower when frozen after
  the first sync). `SyncStats` reports what one call moved.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_papo.models.qwen2_5_vl import hf_mapping
from megatron_papo.models.qwen2_5_vl.flavors import Qwen2_5_VLConfig
from megatron_papo.models.qwen2_5_vl.hf_mapping import Rule

from .engine import RolloutEngine

_ALIGN = 64  # bytes: every tensor in a bucket starts at a multiple of this


@dataclass
class WeightSyncConfig:
    """Options of the Megatron -> rollout engine weight sync."""

    bucket_mb: float = 256.0                  # bucket size; peak extra memory per rank is about one bucket
    freeze_vision: bool = False               # vision tower not trained: sent on the first sync only
    transfer_dtype: torch.dtype | None = None  # cast before packing (e.g. bf16 for a bf16 engine); None = as trained


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
    gathered_bytes: int = 0       # bytes this rank received in TP all-gathers
    engine_seconds: float = 0.0   # driver: time spent inside engine.load_weights
    seconds: float = 0.0
    names: list[str] = field(default_factory=list)


def _padded_nbytes(tensor: torch.Tensor) -> int:
    return -(-tensor.numel() * tensor.element_size() // _ALIGN) * _ALIGN


class _Bucket:
    """A preallocated byte buffer holding (name, dtype, shape, offset) entries."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.buffer: torch.Tensor | None = None
        self.entries: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []
        self.used = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.buffer is None:
            self.buffer = torch.empty(self.capacity, dtype=torch.uint8)
        nbytes = tensor.numel() * tensor.element_size()
        self.buffer[self.used:self.used + nbytes].view(tensor.dtype).copy_(tensor.reshape(-1))
        self.entries.append((name, tensor.dtype, tuple(tensor.shape), self.used))
        self.used += _padded_nbytes(tensor)

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        out = []
        for name, dtype, shape, offset in self.entries:
            numel = 1
            for s in shape:
                numel *= s
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            out.append((name, self.buffer[offset:offset + nbytes].view(dtype).view(shape)))
        return out

    def clear(self) -> None:
        self.entries, self.used = [], 0


def _is_tied_output_copy(local_name: str, rule: Rule) -> bool:
    """The last stage's copy of a tied embedding (param_rules maps it to the embedding's rule)."""
    return "output_layer" in local_name and "output_layer" not in rule.megatron


class WeightSync:
    """Megatron stage parameters -> HF tensors -> buckets -> the engine on the driver rank.

    Call `sync` on every rank at the same point (all TP ranks of DP replica 0 take part in the
    all-gathers; the driver passes its engine, the others None)."""

    def __init__(self, cfg: Qwen2_5_VLConfig, groups: SyncGroups, options: WeightSyncConfig | None = None,
                 load_group: Callable[[str], str] = RolloutEngine.load_group):
        """`load_group`: the engine class's `load_group` (e.g. `VLLMEngine.load_group`); every rank
        needs it, not only the driver, since senders pack the buckets."""
        self.load_group = load_group
        self.cfg = cfg
        self.groups = groups
        self.options = options or WeightSyncConfig()
        self.bucket_bytes = max(_ALIGN, int(self.options.bucket_mb * 2**20))
        self._vision_sent = False

    def _skip(self, local_name: str, rule: Rule) -> bool:
        if self.cfg.tie_word_embeddings and _is_tied_output_copy(local_name, rule):
            return True
        return rule.scope == "vision" and self.options.freeze_vision and self._vision_sent

    @torch.no_grad()
    def _hf_tensors(self, params: Iterable[tuple[str, torch.Tensor, Rule]], stats: SyncStats):
        """This stage's parameters as (HF name, full tensor), gathered one at a time (sender only yields)."""
        tp = self.groups.tp_group
        tp_size = dist.get_world_size(tp)
        for local_name, param, rule in params:
            if self._skip(local_name, rule):
                continue
            local = param.detach()
            if self.options.transfer_dtype is not None:
                local = local.to(self.options.transfer_dtype)
            local = local.contiguous()
            if tp_size > 1:
                shards = [torch.empty_like(local) for _ in range(tp_size)]
                dist.all_gather(shards, local, group=tp)
                stats.gathered_bytes += (tp_size - 1) * local.numel() * local.element_size()
            else:
                shards = [local]
            if not self.groups.is_sender:
                continue
            full = hf_mapping.unshard(rule, shards, self.cfg.vocab_size)
            del shards
            yield from zip(rule.hf, hf_mapping.to_hf(rule, full, self.cfg))

    def _groups(self, hf_tensors):
        """Consecutive (name, tensor) pairs with the same load group, as lists."""
        group, key = [], None
        for name, tensor in hf_tensors:
            k = self.load_group(name)
            if group and k != key:
                yield group
                group = []
            group.append((name, tensor))
            key = k
        if group:
            yield group

    def _batches(self, hf_tensors, stats: SyncStats):
        """Lists of (name, tensor) of at most one bucket's bytes, never splitting a load group
        (a group larger than a bucket is a batch of its own)."""
        batch, used = [], 0
        for group in self._groups(hf_tensors):
            size = sum(_padded_nbytes(t) for _, t in group)
            for name, tensor in group:
                stats.tensors += 1
                stats.bytes += tensor.numel() * tensor.element_size()
                stats.names.append(name)
            if batch and used + size > self.bucket_bytes:
                yield batch
                batch, used = [], 0
            batch += group
            used += size
        if batch:
            yield batch

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
        batches = self._batches(self._hf_tensors(params, stats), stats)
        if not g.is_sender:
            for _ in batches:  # drives the all-gathers; nothing is yielded on non-senders
                pass
        elif g.is_driver:
            for batch in batches:  # the driver's own stage: straight to the engine, no packing
                self._load(engine, batch, stats)
            for sender in g.stage_senders[1:]:
                self._receive_from(sender, engine, stats)
            engine.reset_caches()
        else:
            driver = g.stage_senders[0]
            bucket = _Bucket(self.bucket_bytes)
            for batch in batches:
                size = sum(_padded_nbytes(t) for _, t in batch)
                if size > bucket.capacity:  # one oversized group
                    bucket = _Bucket(size)
                bucket.clear()
                for name, tensor in batch:
                    bucket.add(name, tensor)
                del batch
                dist.send_object_list([(bucket.entries, bucket.used)], dst=driver)
                dist.send(bucket.buffer[:bucket.used], dst=driver)
                stats.buckets += 1
                if bucket.capacity > self.bucket_bytes:
                    bucket = _Bucket(self.bucket_bytes)
            dist.send_object_list([None], dst=driver)  # end of this stage
        if self.options.freeze_vision:
            self._vision_sent = True
        stats.seconds = time.perf_counter() - start
        return stats

    @staticmethod
    def _load(engine: RolloutEngine, tensors: list[tuple[str, torch.Tensor]], stats: SyncStats) -> None:
        start = time.perf_counter()
        engine.load_weights(tensors)
        stats.engine_seconds += time.perf_counter() - start
        stats.buckets += 1

    def _receive_from(self, sender: int, engine: RolloutEngine, stats: SyncStats) -> None:
        bucket = _Bucket(self.bucket_bytes)
        while True:
            message = [None]
            dist.recv_object_list(message, src=sender)
            if message[0] is None:
                return
            entries, used = message[0]
            if used > bucket.capacity:
                bucket = _Bucket(used)  # a tensor larger than a bucket
            if bucket.buffer is None:
                bucket.buffer = torch.empty(bucket.capacity, dtype=torch.uint8)
            dist.recv(bucket.buffer[:used], src=sender)
            bucket.entries, bucket.used = entries, used
            self._load(engine, bucket.tensors(), stats)
            for name, dtype, shape, _ in entries:
                numel = 1
                for s in shape:
                    numel *= s
                stats.tensors += 1
                stats.bytes += numel * torch.empty((), dtype=dtype).element_size()
                stats.names.append(name)
            if used > self.bucket_bytes:
                bucket = _Bucket(self.bucket_bytes)
