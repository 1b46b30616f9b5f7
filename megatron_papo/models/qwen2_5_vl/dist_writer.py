"""Write a megatron-core torch_dist checkpoint of Qwen2.5-VL straight from an HF folder, for any
target TP/PP, in one process or in several that share the work; no model is built.

A torch_dist checkpoint stores each tensor under its megatron sharded key with its global shape, in
chunks that carry their global offsets; megatron loads it at any TP/PP by reading the chunks that
overlap each rank's shard. We write the chunks megatron's own save writes at the target layout: one
per TP shard (fc1's gate and up halves split separately, as megatron's swiglu factory does; the
vocabulary padded for the target TP), one per layer on the stacked layer axis, plus the linear
layers' empty `_extra_state` objects. PP moves no chunk (layers keep their global index).

The work is cut into groups (one layer, or one tensor outside the layers), each written as one file:
its HF tensors are read one at a time and converted (hf_mapping), cut into chunks as the writer asks
for them, and dropped with the group. A process holds one group's tensors twice, as read and in
chunks (`memory_bound`, printed at start); never the model.
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from megatron_papo.models.qwen2_5_vl import hf_mapping
from megatron_papo.models.qwen2_5_vl.dist_io import write_layout_files
from megatron_papo.models.qwen2_5_vl.flavors import Qwen2_5_VLConfig
from megatron_papo.models.qwen2_5_vl.hf_io import HF_CONFIG, HFReader, read_hf_config
from megatron_papo.models.qwen2_5_vl.hf_mapping import Rule
from megatron_papo.progress import Progress

_LINEAR = re.compile(r"(.*\.linear_\w+)\.weight$")  # megatron linear layers save an `_extra_state` object


@dataclass
class Entry:
    """One tensor of the checkpoint: where it comes from and the chunks it is saved in."""
    rule: Rule
    key: str                      # megatron sharded key
    layer: int | None             # index on the stacked layer axis (None: not a layer tensor)
    layers: int                   # length of that axis (1 when none)
    shape: tuple[int, ...]        # the Megatron tensor (one layer's), vocab padded
    boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]  # chunks: (offsets, sizes) within `shape`
    hf_bytes: int                 # its HF inputs


def check_layout(cfg: Qwen2_5_VLConfig, tp: int, pp: int) -> None:
    """The checks megatron's model build does, made before anything is written."""
    if cfg.num_hidden_layers % pp:
        raise ValueError(f"--pp {pp} must divide num_hidden_layers={cfg.num_hidden_layers}")
    for what, heads in (("num_key_value_heads", cfg.num_key_value_heads), ("vision num_heads", cfg.vision.num_heads)):
        if heads % tp:
            raise ValueError(f"--tp {tp} must divide {what}={heads}")


def _boxes(rule: Rule, shape: tuple[int, ...], tp: int):
    """The TP chunks of a Megatron tensor, as megatron's sharded_state_dict cuts it."""
    dim = hf_mapping.split_dim(rule, len(shape))
    if dim is None:
        return [((0,) * len(shape), shape)]
    parts = 2 * tp if rule.layout == "gate_up" else tp  # [gate; up]: each half split over TP
    if shape[dim] % parts:
        raise ValueError(f"{rule.megatron}: dim {dim} of size {shape[dim]} cannot be split in {parts} (tp={tp})")
    n = shape[dim] // parts
    return [(tuple(i * n if d == dim else 0 for d in range(len(shape))),
             tuple(n if d == dim else s for d, s in enumerate(shape))) for i in range(parts)]


def plan_entries(cfg: Qwen2_5_VLConfig, reader: HFReader, tp: int, padded_vocab: int) -> list[list[Entry]]:
    """Every tensor of the checkpoint, grouped (a layer, or one tensor); shapes from the HF headers."""
    rules = hf_mapping.all_rules(cfg)
    keys = [hf_mapping.sharded_key(r.megatron) for r in rules]
    layers = {}
    for key, layer in keys:
        layers[key] = max(layers.get(key, 1), (layer or 0) + 1)
    groups: dict[tuple, list[Entry]] = {}
    for rule, (key, layer) in zip(rules, keys):
        inputs = [reader.meta(h) for h in rule.hf]
        shape = tuple(hf_mapping.to_megatron(rule, inputs, cfg).shape)  # meta tensors: shapes only
        if rule.shard == "vocab":
            shape = (padded_vocab, *shape[1:])
        entry = Entry(rule, key, layer, layers[key], shape, _boxes(rule, shape, tp),
                      sum(t.numel() * t.element_size() for t in inputs))
        group = (key.split(".decoder.")[0], layer) if layer is not None else (key,)
        groups.setdefault(group, []).append(entry)
    return list(groups.values())


def memory_bound(groups: list[list[Entry]], dtype: torch.dtype) -> tuple[int, str]:
    """Bytes of tensors one process holds at most above its baseline, and what they are: the
    largest group's tensors as read (HF bytes; a concatenated form replaces its inputs) plus the
    same tensors cut into chunks (target dtype, vocab padded): torch's FileSystemWriter keeps every
    chunk of a file until the file is closed."""
    size = torch.empty((), dtype=dtype).element_size()

    def need(g: list[Entry]) -> tuple[int, int, int]:
        read = sum(e.hf_bytes for e in g)
        chunks = sum(torch.Size(e.shape).numel() for e in g) * size
        return read + chunks, read, chunks

    (bound, read, chunks), g = max(((need(g), g) for g in groups), key=lambda x: x[0][0])
    where = g[0].key if g[0].layer is None else f"{g[0].key.split('.decoder.')[0]} layer {g[0].layer}"
    return bound, f"{where}, read ({_mib(read)}) and cut into chunks ({_mib(chunks)})"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _extra_state_keys(group: list[Entry]) -> list[str]:
    """The unique keys of the `_extra_state` objects of the group's linear layers."""
    out = []
    for e in group:
        m = _LINEAR.match(hf_mapping.te_name(e.rule.megatron))
        if m:
            key, layer = hf_mapping.sharded_key(m.group(1) + "._extra_state")
            out.append(f"{key}/shard_{layer or 0}_{e.layers}")
    return out


def _write_items(group: list[Entry], dtype: torch.dtype) -> list[WriteItem]:
    items = []
    for e in group:
        stacked = e.layer is not None
        size = torch.Size((e.layers, *e.shape) if stacked else e.shape)
        for offsets, sizes in e.boxes:
            offsets, sizes = ((e.layer, *offsets), (1, *sizes)) if stacked else (offsets, sizes)
            items.append(WriteItem(MetadataIndex(e.key, torch.Size(offsets)), WriteItemType.SHARD, tensor_data=
                                   TensorWriteData(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)),
                                                   TensorProperties(dtype=dtype), size)))
    items += [WriteItem(MetadataIndex(key), WriteItemType.BYTE_IO) for key in _extra_state_keys(group)]
    return items


class _GroupData:
    """What FileSystemWriter.write_data asks for each item (resolve_data): the chunk, cut from its
    tensor's Megatron form when the writer wants it."""

    def __init__(self, group: list[Entry], reader: HFReader, cfg: Qwen2_5_VLConfig, dtype: torch.dtype):
        self.dtype = dtype
        self.chunks = {}  # item index -> (Megatron form, offsets, sizes, on the stacked layer axis)
        for e in group:  # one HF tensor group read at a time; its inputs are dropped once converted
            full = hf_mapping.to_megatron(e.rule, [reader.get(h) for h in e.rule.hf], cfg)
            for offsets, sizes in e.boxes:
                stacked = e.layer is not None
                index = MetadataIndex(e.key, torch.Size((e.layer, *offsets) if stacked else offsets))
                self.chunks[index] = (full, offsets, sizes, stacked)

    def resolve_data(self, item: WriteItem):
        if item.type == WriteItemType.BYTE_IO:
            empty = io.BytesIO()
            torch.save([None], empty)  # what megatron saves for a local linear layer's extra state
            return empty
        full, offsets, sizes, stacked = self.chunks[item.index]
        chunk = torch.zeros(sizes, dtype=self.dtype)  # rows past the true vocabulary stay zero (padding)
        part = full
        for d, (o, n) in enumerate(zip(offsets, sizes)):
            part = part.narrow(d, min(o, part.shape[d]), max(0, min(n, part.shape[d] - o)))
        chunk[tuple(slice(0, s) for s in part.shape)].copy_(part)  # casts to the target dtype
        return chunk.unsqueeze(0) if stacked else chunk


class _PlainMetadataWriter(FileSystemWriter):
    """No StorageMeta in .metadata: torch records the folder as a pathlib object there, which the
    allow-listed metadata reader (dist_io.read_dist_metadata) rightly refuses to unpickle;
    megatron-core's own saves record none either."""

    def storage_meta(self):
        return None


def write_dist_checkpoint(hf_dir: Path, out: Path, tp: int, pp: int, dtype: torch.dtype,
                          vocab_divisible_by: int = 128, show_progress: bool = False) -> None:
    """Write the checkpoint of the HF folder `hf_dir` for layout TP x PP into the existing folder
    `out`. Collective when torch.distributed is initialised: rank r writes groups r, r + world, ...
    and rank 0 the metadata; otherwise this one process writes everything."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

    cfg = read_hf_config(hf_dir)
    check_layout(cfg, tp, pp)
    reader = HFReader(hf_dir)
    padded_vocab = hf_mapping.padded_vocab_size(cfg.vocab_size, tp, vocab_divisible_by)
    groups = plan_entries(cfg, reader, tp, padded_vocab)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if show_progress:
        bound, detail = memory_bound(groups, dtype)
        print(f"memory per process: at most {_mib(bound)} of tensors above baseline: {detail}", flush=True)
    plans, metadata = create_default_global_save_plan([SavePlan(_write_items(g, dtype)) for g in groups])
    writer = _PlainMetadataWriter(str(out))
    writer.set_up_storage_writer(is_coordinator=rank == 0)
    plans = writer.prepare_global_plan(plans)  # group g -> file __g_0.distcp, whichever rank writes it
    mine = range(rank, len(groups), world)
    if show_progress:
        mine = Progress(mine, desc=f"convert (process {rank} of {world})", unit="groups")
    results = []
    for g in mine:
        results += writer.write_data(plans[g], _GroupData(groups[g], reader, cfg, dtype)).wait()
    if world > 1:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(results, gathered, dst=0)
        results = [r for part in gathered for r in part] if rank == 0 else []
    if rank == 0:
        writer.finish(metadata, [results])
        torch.save({}, out / COMMON_STATE_FNAME)  # the model's state has nothing outside its tensors
        save_config(CheckpointingConfig("torch_dist", 1), str(out))
        write_layout_files(out, json.loads((hf_dir / HF_CONFIG).read_text()), tp=tp, pp=pp,
                           padded_vocab_size=padded_vocab, dtype=dtype)
