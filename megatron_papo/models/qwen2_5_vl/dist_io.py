"""megatron-core torch_dist checkpoint I/O for Qwen2.5-VL: the layout files written next to a
checkpoint (config.json, tp/pp/padded vocab), .metadata read with an allow-list (it is a pickle),
loading into a model at any layout, and reading a checkpoint as HF tensors in one plain process.
Writing one straight from an HF folder: dist_writer. HF folders: hf_io.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import extract_matching_values
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_papo.folders import write_text_atomic
from megatron_papo.models.qwen2_5_vl import hf_mapping
from megatron_papo.models.qwen2_5_vl.flavors import Qwen2_5_VLConfig
from megatron_papo.models.qwen2_5_vl.hf_io import HF_CONFIG
from megatron_papo.progress import Progress

LAYOUT_FILE = "megatron_papo_layout.json"  # written next to a dist checkpoint: tp, pp, dtype


def write_checkpoint_metadata(model, folder: str | Path) -> None:
    """config.json (+ dtype) and the layout file next to a checkpoint of `model`: what tools need to read it."""
    write_layout_files(folder, model.model_cfg.to_hf_dict(), tp=model.opts.tp, pp=model.opts.pp,
                       padded_vocab_size=model.padded_vocab_size, dtype=model.opts.params_dtype)


def write_layout_files(folder: str | Path, config_json: dict, tp: int, pp: int, padded_vocab_size: int,
                       dtype: torch.dtype) -> None:
    """config.json (`config_json`, HF's dict, + dtype) and the layout file (tp, pp, padded vocab, dtype)."""
    dtype = str(dtype).removeprefix("torch.")
    hf = dict(config_json)
    hf.setdefault("torch_dtype", dtype)
    hf.setdefault("dtype", dtype)
    write_text_atomic(Path(folder) / HF_CONFIG, json.dumps(hf, indent=2))
    write_text_atomic(Path(folder) / LAYOUT_FILE, json.dumps({"tp": tp, "pp": pp, "padded_vocab_size": padded_vocab_size,
                                                              "dtype": dtype}))


# torch.distributed.checkpoint's .metadata is a pickle of these classes only (torch 2.13).
_METADATA_CLASSES = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    *(("torch.distributed.checkpoint.planner", name) for name in ("SavePlan", "WriteItem", "WriteItemType",
                                                                  "TensorWriteData")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    *(("torch", name) for name, v in vars(torch).items() if isinstance(v, torch.dtype)),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _METADATA_CLASSES:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which is not a checkpoint metadata class")
        return super().find_class(module, name)


def read_dist_metadata(ckpt_dir: str | Path):
    """A torch_dist checkpoint's .metadata (a pickle) read with an allow-list of its classes, so that
    a tampered one raises pickle.UnpicklingError instead of running code. torch and megatron-core
    read it again with plain pickle: check first."""
    with open(Path(ckpt_dir) / ".metadata", "rb") as f:
        return _MetadataUnpickler(f).load()


def weights_only_common_load():
    """megatron-core's common.pt reader, with weights_only=True whatever torch's default."""
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonLoadStrategy

    class WeightsOnly(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir):
            return torch.load(Path(checkpoint_dir) / COMMON_STATE_FNAME, map_location="cpu", weights_only=True)

    return WeightsOnly()


def load_dist_checkpoint(model, ckpt_dir: str | Path) -> None:
    """Load a torch_dist checkpoint written at any TP/PP layout into this rank's stage."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / ".metadata").is_file():
        raise FileNotFoundError(f"{ckpt_dir}: not a torch_dist checkpoint (no .metadata)")
    read_dist_metadata(ckpt_dir)  # a tampered .metadata raises here, before megatron-core unpickles it
    # Tensors only: the layers' `_extra_state` objects (empty without transformer-engine fp8) are
    # pickles, and training checkpoints (megatron_papo.trainer.checkpoint) leave them out.
    _, tensors = extract_matching_values(model.sharded_state_dict(), lambda v: isinstance(v, ShardedObject))
    state = dist_checkpointing.load(tensors, str(ckpt_dir), common_strategy=weights_only_common_load())
    model.load_state_dict(state, strict=False)
    missing = [k for k in model.state_dict() if k not in state and not k.endswith("_extra_state")]
    if missing:
        raise KeyError(f"{ckpt_dir}: checkpoint lacks {missing[:5]}")


def checkpoint_layout(ckpt_dir: str | Path) -> dict:
    """{tp, pp, padded_vocab_size, dtype} the checkpoint was written with."""
    path = Path(ckpt_dir) / LAYOUT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected the layout file that the trainer and "
                                f"tools/convert_hf_to_megatron.py write next to a checkpoint")
    return json.loads(path.read_text())


class _SlicePlanner:
    """torch.distributed.checkpoint load planner reading given slices (offsets, shape) of saved tensors
    into plain tensors; megatron's own load cannot read part of a stacked tensor on one rank."""

    def __init__(self, requests: dict[str, tuple[str, tuple[int, ...], torch.Tensor]]):
        self.requests = requests  # name -> (checkpoint key, offsets, destination)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False, **kwargs):
        self.metadata = metadata

    def create_local_plan(self):
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        items = []
        for name, (key, offsets, dest) in self.requests.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            for item in create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk]):
                items.append(dataclasses_replace_fqn(item, name))
        return LoadPlan(items)

    def create_global_plan(self, plans):
        return plans

    def finish_plan(self, plan):
        return plan

    def resolve_tensor(self, read_item):
        dest = self.requests[read_item.dest_index.fqn][2]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, start, length)
        return dest

    def commit_tensor(self, read_item, tensor):
        pass

    def load_bytes(self, read_item, value):
        raise ValueError(f"unexpected non-tensor item {read_item.dest_index.fqn}")


def dataclasses_replace_fqn(item, name):
    """A read item whose destination is our request `name` (the storage side keeps the checkpoint key)."""
    import dataclasses

    return dataclasses.replace(item, dest_index=dataclasses.replace(item.dest_index, fqn=name))


def iter_dist_checkpoint_as_hf(ckpt_dir: str | Path, cfg: Qwen2_5_VLConfig, show_progress: bool = False):
    """Yield (HF hub name, tensor) from a torch_dist checkpoint, reading one layer's tensors at a time
    (full tensors, whatever TP/PP wrote them). Runs in one plain process."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    metadata = read_dist_metadata(ckpt_dir).state_dict_metadata
    groups: dict = {}
    for rule in hf_mapping.all_rules(cfg):
        key, layer = hf_mapping.sharded_key(rule.megatron)
        if key not in metadata:
            raise KeyError(f"{ckpt_dir}: no checkpoint tensor {key} for {rule.megatron}")
        groups.setdefault((key.split(".decoder.")[0], layer), []).append((rule, key, layer))
    items = groups.values()
    if show_progress:
        items = Progress(list(items), desc="convert", unit="layers")
    for group in items:
        requests = {}
        for rule, key, layer in group:
            md = metadata[key]
            if layer is None:
                requests[rule.megatron] = (key, (0,) * len(md.size), torch.empty(md.size, dtype=md.properties.dtype))
            else:
                shape = (1, *md.size[1:])
                requests[rule.megatron] = (key, (layer,) + (0,) * (len(md.size) - 1),
                                           torch.empty(shape, dtype=md.properties.dtype))
        dcp_load({}, storage_reader=FileSystemReader(str(ckpt_dir)), planner=_SlicePlanner(requests), no_dist=True)
        for rule, _, layer in group:
            full = requests[rule.megatron][2]
            full = full[0] if layer is not None else full  # vocab padding rows are dropped by to_hf
            yield from zip(rule.hf, hf_mapping.to_hf(rule, full, cfg))
