"""Hugging Face folder I/O for Qwen2.5-VL, shared by tools/, the trainer and tests.

Names and layouts come from hf_mapping, each parameter's rule from param_binding; this module only
moves tensors: HF safetensors -> this rank's shards (tensor by tensor), this rank's shards -> full HF
tensors (TP all-gather), and HF folders written in the hub layout. torch_dist checkpoints: dist_io.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_papo.folders import write_text_atomic
from megatron_papo.models.qwen2_5_vl import hf_mapping
from megatron_papo.models.qwen2_5_vl.flavors import Qwen2_5_VLConfig
from megatron_papo.models.qwen2_5_vl.param_binding import hf_param_rules, param_rules
from megatron_papo.progress import Progress

HF_CONFIG = "config.json"
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


# ------------------------------------------------------------------ HF tensors <-> a model stage
@torch.no_grad()
def load_hf_weights(model, reader: HFReader, show_progress: bool = False) -> None:
    """Fill this rank's parameters from an HF folder, one HF tensor group at a time."""
    tp_group = model.pg_collection.tp  # the model's own process groups, not megatron's globals
    tp_rank, tp_size = dist.get_rank(tp_group), dist.get_world_size(tp_group)
    items = param_rules(model)
    if show_progress:
        items = Progress(items, desc=f"load tp{tp_rank}", unit="tensors")
    for name, param, rule in items:
        full = hf_mapping.to_megatron(rule, [reader.get(h) for h in rule.hf], model.model_cfg)
        local = hf_mapping.shard(rule, full, tp_rank, tp_size, model.padded_vocab_size)
        if local.shape != param.shape:
            raise ValueError(f"{name}: HF {rule.hf} give shard {tuple(local.shape)}, parameter is {tuple(param.shape)}")
        param.copy_(local)


def gather_hf_tensors(model, grads: bool = False) -> dict[str, torch.Tensor]:
    """This stage's parameters (or their grads) as full HF hub-layout tensors (TP all-gathered); a
    tied output copy is none (param_binding)."""
    tp_group = model.pg_collection.tp
    tp_size = dist.get_world_size(tp_group)
    out = {}
    for name, param, rule in hf_param_rules(model):
        local = (param.main_grad if hasattr(param, "main_grad") and param.main_grad is not None else param.grad) \
            if grads else param.detach()
        if local is None:
            raise ValueError(f"{name} has no grad")
        shards = [torch.empty_like(local) for _ in range(tp_size)]
        dist.all_gather(shards, local.contiguous(), group=tp_group)
        out.update(zip(rule.hf, hf_mapping.shards_to_hf(rule, shards, model.model_cfg)))
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
    write_text_atomic(out_dir / "model.safetensors.index.json", json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = hf["dtype"] = str(dtype).removeprefix("torch.")
    write_text_atomic(out_dir / HF_CONFIG, json.dumps(hf, indent=2))


def copy_model_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the MODEL_FILES that `src` has into `dst`; returns their names."""
    found = [name for name in MODEL_FILES if (Path(src) / name).is_file()]
    for name in found:
        shutil.copyfile(Path(src) / name, Path(dst) / name)
    return found
