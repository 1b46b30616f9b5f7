"""HF folder and megatron dist-checkpoint I/O for Qwen2.5-VL, shared by tools/, the trainer and tests.

All name/layout knowledge comes from hf_mapping; this module only moves tensors: HF safetensors ->
this rank's shards (tensor by tensor), this rank's shards -> full HF tensors (TP all-gather), HF
folders written in the hub layout, and torch_dist checkpoints.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.dict_utils import extract_matching_values
from megatron.core.dist_checkpointing.mapping import ShardedObject
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_papo.models.qwen2_5_vl import hf_mapping
from megatron_papo.models.qwen2_5_vl.flavors import Qwen2_5_VLConfig
from megatron_papo.models.qwen2_5_vl.hf_mapping import Rule
from megatron_papo.progress import Progress

HF_CONFIG = "config.json"
LAYOUT_FILE = "megatron_papo_layout.json"  # written next to a dist checkpoint: tp, pp, dtype
# What transformers' and vLLM's loaders read besides config.json and the weights: tokenizer (any of
# the HF formats), chat template, image/video processor, generation defaults. The trainer writes
# some into every checkpoint; the converters carry them from folder to folder.
MODEL_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
               "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
               "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
               "generation_config.json")


def read_hf_config(hf_dir: str | Path) -> Qwen2_5_VLConfig:
    path = Path(hf_dir) / HF_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected a Hugging Face Qwen2.5-VL config.json")
    hf = json.loads(path.read_text())
    if hf.get("model_type") not in ("qwen2_5_vl", None):
        raise ValueError(f"{path}: model_type {hf.get('model_type')!r}, expected 'qwen2_5_vl'")
    return Qwen2_5_VLConfig.from_hf_dict(hf)


class HFReader:
    """Reads one tensor at a time from an HF folder's safetensors (hub or transformers-5 names)."""

    def __init__(self, hf_dir: str | Path):
        hf_dir = Path(hf_dir)
        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (hf_dir / "model.safetensors").is_file():
            with safe_open(hf_dir / "model.safetensors", "pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
        for fname in sorted(set(weight_map.values())):  # headers only: a damaged shard is named up front
            try:
                with safe_open(hf_dir / fname, "pt"):
                    pass
            except Exception as e:  # safetensors raises its own error type for a bad header
                raise ValueError(f"{hf_dir / fname}: not a complete safetensors file ({e}); truncated by an "
                                 "interrupted download or copy?") from None
        self.dir = hf_dir
        self.files = {hf_mapping.hf_hub_name(k): (fname, k) for k, fname in weight_map.items()}

    def names(self) -> list[str]:
        return sorted(self.files)

    def get(self, hub_name: str) -> torch.Tensor:
        fname, key = self._where(hub_name)
        with safe_open(self.dir / fname, "pt") as f:
            return f.get_tensor(key)

    def meta(self, hub_name: str) -> torch.Tensor:
        """The tensor's shape and dtype, as a meta tensor (the file header only is read)."""
        fname, key = self._where(hub_name)
        with safe_open(self.dir / fname, "pt") as f:
            header = f.get_slice(key)
            dtype = _SAFETENSORS_DTYPES.get(header.get_dtype())
            if dtype is None:
                raise ValueError(f"{self.dir / fname}: tensor {key} has dtype {header.get_dtype()}, expected one of "
                                 f"{sorted(_SAFETENSORS_DTYPES)}")
            return torch.empty(header.get_shape(), dtype=dtype, device="meta")

    def _where(self, hub_name: str) -> tuple[str, str]:
        if hub_name not in self.files:
            raise KeyError(f"{self.dir}: tensor {hub_name!r} not in the checkpoint")
        return self.files[hub_name]


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


# ------------------------------------------------------------------ model param <-> rule
def _global_name(model, local_name: str) -> str:
    """A stage-local parameter name -> the full-model name used by the rules."""
    prefix = hf_mapping.LM_PREFIX + "decoder.layers."
    if local_name.startswith(prefix):
        i, rest = local_name[len(prefix):].split(".", 1)
        return f"{prefix}{int(i) + model.layer_offset}.{rest}"
    if local_name == hf_mapping.LM_PREFIX + "output_layer.weight" and model.hf_config.tie_word_embeddings:
        return hf_mapping.LM_PREFIX + "embedding.word_embeddings.weight"  # last stage's copy of the tied weight
    return local_name


def param_rules(model) -> list[tuple[str, torch.nn.Parameter, Rule]]:
    """(local name, parameter, rule) for every parameter of this stage; errors on unmapped ones."""
    rules = {r.megatron: r for r in hf_mapping.all_rules(model.hf_config, with_vision=model.vision_model is not None)}
    if model.use_te:
        rules = {hf_mapping.te_name(k): r for k, r in rules.items()}
    out = []
    for name, param in model.named_parameters():
        rule = rules.get(_global_name(model, name))
        if rule is None:
            raise KeyError(f"parameter {name} has no rule in hf_mapping")
        out.append((name, param, rule))
    return out


@torch.no_grad()
def load_hf_weights(model, reader: HFReader, show_progress: bool = False) -> None:
    """Fill this rank's parameters from an HF folder, one HF tensor group at a time."""
    tp_rank, tp_size = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()
    items = param_rules(model)
    if show_progress:
        items = Progress(items, desc=f"load tp{tp_rank}", unit="tensors")
    for name, param, rule in items:
        full = hf_mapping.to_megatron(rule, [reader.get(h) for h in rule.hf], model.hf_config)
        local = hf_mapping.shard(rule, full, tp_rank, tp_size, model.padded_vocab_size)
        if local.shape != param.shape:
            raise ValueError(f"{name}: HF {rule.hf} give shard {tuple(local.shape)}, parameter is {tuple(param.shape)}")
        param.copy_(local)


def gather_hf_tensors(model, grads: bool = False) -> dict[str, torch.Tensor]:
    """This stage's parameters (or their grads) as full HF hub-layout tensors (TP all-gathered).

    The tied output layer on a non-first last stage is skipped (HF has no lm_head then); its grad is
    added to the embedding's by megatron's finalize_model_grads, not here."""
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_size = dist.get_world_size(tp_group)
    out = {}
    for name, param, rule in param_rules(model):
        if model.hf_config.tie_word_embeddings and name.endswith("output_layer.weight"):
            continue
        local = (param.main_grad if hasattr(param, "main_grad") and param.main_grad is not None else param.grad) \
            if grads else param.detach()
        if local is None:
            raise ValueError(f"{name} has no grad")
        shards = [torch.empty_like(local) for _ in range(tp_size)]
        dist.all_gather(shards, local.contiguous(), group=tp_group)
        out.update(zip(rule.hf, hf_mapping.shards_to_hf(rule, shards, model.hf_config)))
    return out


# ------------------------------------------------------------------ HF folders
def write_hf_folder(out_dir: str | Path, cfg: Qwen2_5_VLConfig, tensors: Iterable[tuple[str, torch.Tensor]],
                    max_shard_bytes: int = 4 << 30) -> None:
    """Write (hub name, tensor) pairs as model-0000x-of-0000y.safetensors + index + config.json,
    flushing a shard whenever it reaches max_shard_bytes (so at most one shard is in memory)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], {}, 0

    def flush():
        nonlocal current, size
        if current:
            tmp_name = f"part-{len(shards):05d}.safetensors"
            save_file(current, out_dir / tmp_name, metadata={"format": "pt"})
            shards.append((tmp_name, list(current)))
            current, size = {}, 0

    total, dtype = 0, torch.float32
    for name, tensor in tensors:
        dtype = tensor.dtype
        current[name] = tensor.contiguous()
        size += tensor.numel() * tensor.element_size()
        total += tensor.numel() * tensor.element_size()
        if size >= max_shard_bytes:
            flush()
    flush()
    weight_map = {}
    for i, (tmp_name, names) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(out_dir / tmp_name, out_dir / final)
        weight_map.update({n: final for n in names})
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = hf["dtype"] = str(dtype).removeprefix("torch.")
    (out_dir / HF_CONFIG).write_text(json.dumps(hf, indent=2))


def copy_model_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the MODEL_FILES that `src` has into `dst`; returns their names."""
    found = [name for name in MODEL_FILES if (Path(src) / name).is_file()]
    for name in found:
        shutil.copyfile(Path(src) / name, Path(dst) / name)
    return found


# ------------------------------------------------------------------ megatron dist checkpoints
def write_checkpoint_metadata(model, folder: str | Path) -> None:
    """config.json (+ dtype) and the layout file next to a checkpoint of `model`: what tools need to read it."""
    write_layout_files(folder, model.hf_config.to_hf_dict(), tp=model.opts.tp, pp=model.opts.pp,
                       padded_vocab_size=model.padded_vocab_size, dtype=model.opts.params_dtype)


def write_layout_files(folder: str | Path, hf_config: dict, tp: int, pp: int, padded_vocab_size: int,
                       dtype: torch.dtype) -> None:
    """config.json (`hf_config` + dtype) and the layout file (tp, pp, padded vocab, dtype)."""
    dtype = str(dtype).removeprefix("torch.")
    hf = dict(hf_config)
    hf.setdefault("torch_dtype", dtype)
    hf.setdefault("dtype", dtype)
    (Path(folder) / HF_CONFIG).write_text(json.dumps(hf, indent=2))
    (Path(folder) / LAYOUT_FILE).write_text(json.dumps({"tp": tp, "pp": pp, "padded_vocab_size": padded_vocab_size,
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


def dist_checkpoint_key(name: str) -> tuple[str, int | None]:
    """Our full-model name -> (megatron sharded key, layer index on the stacked axis or None)."""
    m = re.match(r"(.*\.decoder\.layers\.)(\d+)\.(.*)", name)
    if m:
        return m.group(1) + m.group(3), int(m.group(2))
    return name, None


def checkpoint_layout(ckpt_dir: str | Path) -> dict:
    """{tp, pp, padded_vocab_size, dtype} the checkpoint was written with."""
    path = Path(ckpt_dir) / LAYOUT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected the layout file that the trainer and "
                                f"tools/convert_hf_to_megatron.py write next to a checkpoint")
    return json.loads(path.read_text())


def _checkpoint_key_candidates(key: str) -> list[str]:
    """Local-spec layers save their norms under transformer-engine names (sharded_state_dict_keys_map)."""
    return [key, key.replace(".input_layernorm.", ".self_attention.linear_qkv.layer_norm_")
            .replace(".pre_mlp_layernorm.", ".mlp.linear_fc1.layer_norm_")]


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
        key, layer = dist_checkpoint_key(rule.megatron)
        found = [k for k in _checkpoint_key_candidates(key) if k in metadata]
        if not found:
            raise KeyError(f"{ckpt_dir}: no checkpoint tensor for {rule.megatron} (tried {key})")
        groups.setdefault((key.split(".decoder.")[0], layer), []).append((rule, found[0], layer))
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
