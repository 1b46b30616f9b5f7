"""Test helpers for the rollout tests: a tiny Qwen2.5-VL HF folder that vLLM can load offline.

The folder holds random fp32 weights (the `tiny` flavor, or any flavor keeping tiny's
special-token ids), the project's tiny tokenizer (specials at ids
1016..1022, Qwen chat template) and an image-processor config.
The image is small (56x56 px -> 4x4 patches -> 4 LLM tokens) so everything runs in seconds.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from megatron_papo.data.tokenizer import TINY_SPECIAL_START, save_tiny_tokenizer
from megatron_papo.data.tokenizer import CHAT_SPECIAL_TOKENS as _SPECIALS_IN_ORDER

# Qwen special tokens at the tiny flavor's ids (megatron_papo.data.tokenizer puts them there).
TINY_SPECIAL_TOKENS = {tok: TINY_SPECIAL_START + i for i, tok in enumerate(_SPECIALS_IN_ORDER)}
IMAGE_SIDE = 56          # pixels; 56 / 14 = 4 patches per side, 2x2 merge -> 4 image tokens


def rollout_test_flavor():
    """The `tiny` flavor (head_dim 32: vLLM's CPU attention supports head sizes 32, 64, 80, ...)."""
    from megatron_papo.models.qwen2_5_vl.flavors import get_flavor

    cfg = get_flavor("tiny")
    assert cfg.head_dim >= 32, "vLLM's CPU attention needs head_dim in (32, 64, 80, ...)"
    return cfg


def build_tiny_hf_folder(path: Path, seed: int = 0, cfg=None, scale: float = 4.0) -> Path:
    """Save a random-init tiny Qwen2.5-VL (fp32) with tokenizer + processor configs to `path`."""
    import transformers

    cfg = cfg or rollout_test_flavor()
    torch.manual_seed(seed)
    hf_cfg = transformers.Qwen2_5_VLConfig(**cfg.to_hf_dict())
    model = transformers.Qwen2_5_VLForConditionalGeneration(hf_cfg).float().eval()
    # Random init has tiny std (0.02): scale the LM so logits spread and sampling is non-trivial.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and p.ndim == 2:
                p.mul_(scale)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    save_tiny_tokenizer(path)  # the project's tiny tokenizer: specials at ids 1016..1022
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "rescale_factor": 1 / 255, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "min_pixels": 28 * 28, "max_pixels": 112 * 112,
    }))
    return path


def random_image(seed: int, side: int = IMAGE_SIDE) -> np.ndarray:
    """An (H, W, 3) uint8 RGB array."""
    return np.random.default_rng(seed).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
