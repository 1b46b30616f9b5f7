"""Stream Megatron weights into the rollout engine, one tensor gathered at a time, in buckets.

Who does what (one rollout replica; the engine runs in-process on one designated rank):
  * the DRIVER hosts the engine: pipeline stage 0, TP rank 0, DP rank 0 (global rank 0 in
    megatron's rank order). Only it calls the engine.
  * each pipeline stage's SENDER is its (TP rank 0, DP rank 0) rank; the senders form the driver's
    pipeline group, so every sender finds the driver without global communication.
  * DP ranks > 0 hold the same weights and do nothing.
Per stage, every TP rank walks its parameters in the same order; each tensor is gathered from the
TP group, the sender converts it to HF names / layouts with hf_mapping and collects tensors into
batches of at most `bucket_mb`, never splitting an engine "load group" (vLLM: the tensors of one
module, e.g. q/k/v weights and biases -> qkv_proj). The driver hands its own stage's batches
straight to the engine; a later stage's sender packs each batch into a preallocated byte bucket and
sends it point-to-point to the driver (metadata object, then the bytes), which loads it. Stages are
taken in order 0, 1, ...: a later stage's sender blocks on its first send until the driver gets to
it. At the end the driver resets the engine's caches.

The TP gather: when the stage's parameters are on CPU and its TP ranks share one host, through
shared memory (`SharedBuffer`): the other TP ranks copy a chunk of their shards (a bucket / TP
size) into their own /dev/shm file, a barrier, the sender reads them in place, a barrier, the next
chunk. On the benchmark box this moves the bytes ~10x faster than gloo's loopback all-gather.
Otherwise (GPU tensors, TP across hosts) with `dist.all_gather`, one tensor at a time.

Peak extra memory: batches are computed while they are packed, so the driver holds one bucket
(the engine adapter's transfer buffer: vllm_engine uses a /dev/shm file kept for the whole sync)
plus one load group (the lookahead that ends a batch), a later stage's sender the same in its own
bucket, and the stage's ranks one gathered tensor (its TP shards and full copy); with the
shared-memory gather, a bucket / TP size of staged shards on each non-sender TP rank, which the
sender maps too. A load group larger than a bucket travels alone in a buffer grown to its size.
Buffers are freed when `sync` returns.

Bytes moved per sync (P = parameters in HF layout, element size e, TP t, PP p):
  TP gather: the sender receives (t-1)/t of its stage's tensors (all-gather: every TP rank does);
  sender -> driver: P_s * e for each stage s > 0; the driver's engine receives P * e (less the
  vision tower when frozen after the first sync). `SyncStats` reports what one call moved.
"""
from __future__ import annotations

import os
import socket
import tempfile
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
    shared_memory_gather: bool = True         # TP gather via /dev/shm when the TP ranks share a host (CPU tensors)


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
    engine_seconds: float = 0.0   # driver: time inside engine.load_weights (its own stage's tensors are
                                  # computed, i.e. gathered, while the engine consumes them)
    seconds: float = 0.0
    names: list[str] = field(default_factory=list)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _padded_nbytes(tensor: torch.Tensor) -> int:
    return _aligned(tensor.numel() * tensor.element_size())


def shared_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class SharedBuffer:
    """Bytes in a file under /dev/shm, mapped here; other processes on this host map it by `path`.

    Meant to be reused for every bucket of a sync: writing into fresh shared memory costs ~10x the
    copy itself (page faults), paid once per buffer. `close` frees it (mappings elsewhere keep
    their pages until dropped)."""

    def __init__(self, nbytes: int):
        fd, self.path = tempfile.mkstemp(prefix="megatron_papo_weights_", dir=shared_dir())
        os.close(fd)
        self.bytes = torch.from_file(self.path, shared=True, size=max(nbytes, 1), dtype=torch.uint8)

    def unlink(self) -> None:
        """Remove the file name (the pages live on while mapped)."""
        if self.path is not None:
            os.unlink(self.path)
            self.path = None

    def close(self) -> None:
        self.unlink()
        self.bytes = torch.empty(0, dtype=torch.uint8)


class _Bucket:
    """A byte buffer (allocated on first use, `capacity` bytes) holding (name, dtype, shape, offset)
    entries; it grows for a load group larger than a bucket."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.buffer: torch.Tensor | None = None
        self.entries: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []
        self.used = 0

    def reserve(self, nbytes: int) -> None:
        """Room for `nbytes` in all, keeping the bytes used so far."""
        if self.buffer is None or nbytes > self.buffer.numel():
            grown = torch.empty(max(nbytes, self.capacity), dtype=torch.uint8)
            if self.buffer is not None:
                grown[:self.used].copy_(self.buffer[:self.used])
            self.buffer = grown

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        self.reserve(self.used + nbytes)
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
        self._tp_hosts: list[str] | None = None

    def _skip(self, local_name: str, rule: Rule) -> bool:
        if self.cfg.tie_word_embeddings and _is_tied_output_copy(local_name, rule):
            return True
        return rule.scope == "vision" and self.options.freeze_vision and self._vision_sent

    def _transfer(self, param: torch.Tensor) -> torch.Tensor:
        """A parameter as this rank sends it: detached, in transfer_dtype, contiguous."""
        local = param.detach()
        if self.options.transfer_dtype is not None:
            local = local.to(self.options.transfer_dtype)
        return local.contiguous()

    def _transfer_nbytes(self, param: torch.Tensor) -> int:
        return _aligned(param.numel() * (self.options.transfer_dtype or param.dtype).itemsize)

    @torch.no_grad()
    def _hf_tensors(self, params: Iterable[tuple[str, torch.Tensor, Rule]], stats: SyncStats):
        """This stage's parameters as (HF name, full tensor), gathered one at a time (sender only yields)."""
        items = [(param, rule) for name, param, rule in params if not self._skip(name, rule)]
        if dist.get_world_size(self.groups.tp_group) == 1:
            gathered = (([self._transfer(param)], rule) for param, rule in items)
        elif self._gather_through_shared_memory(items):
            gathered = self._gather_shared(items, stats)
        else:
            gathered = self._gather_collective(items, stats)
        for shards, rule in gathered:  # senders only
            full = hf_mapping.unshard(rule, shards, self.cfg.vocab_size)
            del shards  # shared-memory views: must not be used once the gather resumes
            yield from zip(rule.hf, hf_mapping.to_hf(rule, full, self.cfg))

    def _gather_through_shared_memory(self, items) -> bool:
        """CPU parameters and every TP rank on this host (the hosts are asked once)."""
        if not self.options.shared_memory_gather or not all(param.is_cpu for param, _ in items):
            return False
        if self._tp_hosts is None:
            self._tp_hosts = [None] * dist.get_world_size(self.groups.tp_group)
            dist.all_gather_object(self._tp_hosts, socket.gethostname(), group=self.groups.tp_group)
        return len(set(self._tp_hosts)) == 1

    def _gather_collective(self, items, stats: SyncStats):
        """(TP shards, rule) per parameter with dist.all_gather (yielded on the sender)."""
        tp = self.groups.tp_group
        for param, rule in items:
            local = self._transfer(param)
            shards = [torch.empty_like(local) for _ in range(dist.get_world_size(tp))]
            dist.all_gather(shards, local, group=tp)
            stats.gathered_bytes += (len(shards) - 1) * local.numel() * local.element_size()
            if self.groups.is_sender:
                yield shards, rule

    def _gather_shared(self, items, stats: SyncStats):
        """(TP shards, rule) per parameter through /dev/shm (see module doc), yielded on the sender:
        its own shard and views of the other ranks' staging buffers, valid until the next yield.
        All TP ranks hold equal shard shapes, so every rank computes the same chunks and offsets."""
        tp = self.groups.tp_group
        tp_size = dist.get_world_size(tp)
        chunks, used = [], 0
        for param, rule in items:  # at most a bucket / TP size of shards; a larger tensor alone
            size = self._transfer_nbytes(param)
            if not chunks or (chunks[-1] and used + size > self.bucket_bytes // tp_size):
                chunks.append([])
                used = 0
            chunks[-1].append((param, rule))
            used += size
        capacity = max((sum(self._transfer_nbytes(p) for p, _ in chunk) for chunk in chunks), default=0)
        sender = self.groups.is_sender
        staging = None if sender else SharedBuffer(capacity)
        paths = [None] * tp_size
        dist.all_gather_object(paths, None if sender else staging.path, group=tp)
        peers = [torch.from_file(path, shared=True, size=max(capacity, 1), dtype=torch.uint8)
                 for path in paths[1:]] if sender else []
        dist.barrier(group=tp)  # the sender has mapped the files: their names can go
        try:
            if staging is not None:
                staging.unlink()
            for chunk in chunks:
                if not sender:
                    offset = 0
                    for param, _ in chunk:
                        local = self._transfer(param)
                        staging.bytes[offset:offset + local.numel() * local.element_size()].view(
                            local.dtype).copy_(local.reshape(-1))
                        offset += self._transfer_nbytes(param)
                dist.barrier(group=tp)  # the chunk is staged
                if sender:
                    offset = 0
                    for param, rule in chunk:
                        local = self._transfer(param)
                        nbytes = local.numel() * local.element_size()
                        stats.gathered_bytes += (tp_size - 1) * nbytes
                        yield [local] + [peer[offset:offset + nbytes].view(local.dtype).view(local.shape)
                                         for peer in peers], rule
                        offset += self._transfer_nbytes(param)
                dist.barrier(group=tp)  # the sender is done with it: staging may be overwritten
        finally:
            if staging is not None:
                staging.close()

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
        """Batches of at most one bucket's bytes, never splitting a load group (a group larger than a
        bucket is a batch of its own). Each batch is an iterator of (name, tensor) computed while it
        is consumed, so a consumer that packs them as they come holds its bucket plus one group (the
        lookahead that decides where the batch ends). Consume each batch before the next."""
        groups = self._groups(hf_tensors)
        pending = next(groups, None)

        def batch():
            nonlocal pending
            used = 0
            while pending is not None:
                size = sum(_padded_nbytes(t) for _, t in pending)
                if used and used + size > self.bucket_bytes:
                    return
                for name, tensor in pending:
                    stats.tensors += 1
                    stats.bytes += tensor.numel() * tensor.element_size()
                    stats.names.append(name)
                used += size
                group, pending = pending, None
                yield from group
                del group
                pending = next(groups, None)

        while pending is not None:
            yield batch()

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
            for batch in batches:  # the driver's own stage: streamed into the engine, no packing here
                self._load(engine, batch, stats)
            for sender in g.stage_senders[1:]:
                self._receive_from(sender, engine, stats)
            engine.reset_caches()
        else:
            driver = g.stage_senders[0]
            bucket = _Bucket(self.bucket_bytes)
            for batch in batches:
                bucket.clear()
                for name, tensor in batch:
                    bucket.add(name, tensor)
                dist.send_object_list([(bucket.entries, bucket.used)], dst=driver)
                dist.send(bucket.buffer[:bucket.used], dst=driver)
                stats.buckets += 1
                if bucket.buffer.numel() > self.bucket_bytes:  # grown for an oversized group
                    bucket = _Bucket(self.bucket_bytes)
            dist.send_object_list([None], dst=driver)  # end of this stage
        if self.options.freeze_vision:
            self._vision_sent = True
        stats.seconds = time.perf_counter() - start
        return stats

    @staticmethod
    def _load(engine: RolloutEngine, tensors: Iterable[tuple[str, torch.Tensor]], stats: SyncStats) -> None:
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
            bucket.clear()
            entries, used = message[0]
            bucket.reserve(used)
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
            if bucket.buffer.numel() > self.bucket_bytes:  # grown for an oversized group
                bucket = _Bucket(self.bucket_bytes)
