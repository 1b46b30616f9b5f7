"""Tiny Hugging Face Qwen2.5-VL models and folders built locally (no hub), for tests that need an
independent reference. Others may reuse these."""
from __future__ import annotations

from pathlib import Path

import torch

from megatron_papo.models.qwen2_5_vl.flavors import Qwen2_5_VLConfig, get_flavor


def tiny_hf_model(cfg: Qwen2_5_VLConfig | None = None, seed: int = 0):
    """transformers' Qwen2_5_VLForConditionalGeneration, fp32, random init (seeded), eval mode.
    Norm weights are randomised too so that a norm mapped to the wrong place shows up."""
    from transformers import Qwen2_5_VLConfig as HFConfig
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = cfg or get_flavor("tiny")
    torch.manual_seed(seed)
    hf_cfg = HFConfig(**cfg.to_hf_dict())
    hf_cfg._attn_implementation = "eager"
    model = Qwen2_5_VLForConditionalGeneration(hf_cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_tiny_hf_folder(path: str | Path, cfg: Qwen2_5_VLConfig | None = None, seed: int = 0,
                        max_shard_size: str = "200KB") -> Path:
    """Save a tiny random model with transformers' save_pretrained (hub layout, several shards)."""
    model = tiny_hf_model(cfg, seed)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return Path(path)
