"""Qwen2.5-VL architecture hyperparameters: one dataclass, one registry of flavors.

The real flavors carry the published Hugging Face values (config.json of Qwen/Qwen2.5-VL-*-Instruct);
`param_count` reproduces the published totals exactly (checked in tests/test_flavors.py). `tiny`
exists for tests and the CPU demo. Conversion to/from an HF config.json dict lives here too, so
tools, tests and weight sync read one definition.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 32                        # ViT blocks
    hidden_size: int = 1280                # ViT width
    intermediate_size: int = 3420          # SwiGLU width of the ViT MLP (with biases)
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14                   # pixels per patch side
    temporal_patch_size: int = 2           # frames per patch (an image is repeated twice)
    spatial_merge_size: int = 2            # 2x2 patches merge into one LLM token
    window_size: int = 112                 # window attention side, in pixels
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)  # blocks with full (per-image) attention
    rms_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Width of one pixel_values row: channels x temporal x patch x patch (1176 for the real model)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclass(frozen=True)
class Qwen2_5_VLConfig:
    """Language model + vision tower hyperparameters (HF names where they exist)."""

    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    vocab_size: int = 152064
    tie_word_embeddings: bool = False
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)  # (t, h, w) rotary pairs; sums to head_dim/2
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 128000
    # special tokens (the Qwen2 tokenizer's ids; a tokenizer may override them)
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision: VisionConfig = field(default_factory=VisionConfig)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def replace(self, **overrides: Any) -> "Qwen2_5_VLConfig":
        """Copy with top-level overrides; `vision={...}` overrides vision fields."""
        vision = overrides.pop("vision", None)
        if isinstance(vision, dict):
            vision = dataclasses.replace(self.vision, **vision)
        if vision is not None:
            overrides["vision"] = vision
        return dataclasses.replace(self, **overrides)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} not divisible by "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if 2 * sum(self.mrope_section) != self.head_dim:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}")
        if self.vision.hidden_size % self.vision.num_heads:
            raise ValueError("vision.hidden_size must be divisible by vision.num_heads")
        if any(i >= self.vision.depth for i in self.vision.fullatt_block_indexes):
            raise ValueError(f"vision.fullatt_block_indexes {self.vision.fullatt_block_indexes} exceed depth {self.vision.depth}")

    # ---- parameter count (from the config alone; used by tests and docs/scaling.md) ----
    def vision_param_count(self) -> int:
        v = self.vision
        h, i = v.hidden_size, v.intermediate_size
        block = 2 * h + (3 * h * h + 3 * h) + (h * h + h) + (3 * h * i + 2 * i + h)
        patch_embed = h * v.patch_dim
        m = h * v.spatial_merge_size**2
        merger = h + (m * m + m) + (m * self.hidden_size + self.hidden_size)
        return v.depth * block + patch_embed + merger

    def lm_layer_param_count(self) -> int:
        h, hd = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attn = h * q + q + 2 * (h * kv + kv) + q * h
        return 2 * h + attn + 3 * h * self.intermediate_size

    def embedding_param_count(self) -> int:
        """Input embedding plus output layer (once when tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    def param_count(self) -> int:
        return (self.num_hidden_layers * self.lm_layer_param_count() + self.hidden_size
                + self.embedding_param_count() + self.vision_param_count())

    # ---- Hugging Face config.json <-> this dataclass ----
    def to_hf_dict(self) -> dict[str, Any]:
        v = self.vision
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta,
                                "mrope_section": list(self.mrope_section)},
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_config": {
                "model_type": "qwen2_5_vl",
                "depth": v.depth,
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads,
                "in_chans": v.in_channels,
                "in_channels": v.in_channels,
                "patch_size": v.patch_size,
                "spatial_patch_size": v.patch_size,
                "temporal_patch_size": v.temporal_patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "window_size": v.window_size,
                "fullatt_block_indexes": list(v.fullatt_block_indexes),
                "out_hidden_size": self.hidden_size,
                "hidden_act": "silu",
                "tokens_per_second": 2,
            },
        }

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "Qwen2_5_VLConfig":
        """Read an HF Qwen2.5-VL config.json (transformers 4.x `rope_scaling` or 5.x `rope_parameters`).

        transformers 5 may nest the language-model fields under `text_config`; both are accepted.
        """
        text = dict(hf.get("text_config") or {})
        get = lambda k, d=None: hf.get(k, text.get(k, d))  # noqa: E731
        rope = get("rope_parameters") or get("rope_scaling") or {}
        vc = hf.get("vision_config") or {}
        vision = VisionConfig(
            depth=vc.get("depth", 32),
            hidden_size=vc.get("hidden_size", 1280),
            intermediate_size=vc.get("intermediate_size", 3420),
            num_heads=vc.get("num_heads", 16),
            in_channels=vc.get("in_chans", vc.get("in_channels", 3)),
            patch_size=vc.get("patch_size", vc.get("spatial_patch_size", 14)),
            temporal_patch_size=vc.get("temporal_patch_size", 2),
            spatial_merge_size=vc.get("spatial_merge_size", 2),
            window_size=vc.get("window_size", 112),
            fullatt_block_indexes=tuple(vc.get("fullatt_block_indexes", (7, 15, 23, 31))),
        )
        out_hidden = vc.get("out_hidden_size", get("hidden_size"))
        if out_hidden != get("hidden_size"):
            raise ValueError(f"vision_config.out_hidden_size {out_hidden} != hidden_size {get('hidden_size')}")
        eos = get("eos_token_id", 151645)
        return cls(
            hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"),
            num_hidden_layers=get("num_hidden_layers"),
            num_attention_heads=get("num_attention_heads"),
            num_key_value_heads=get("num_key_value_heads", get("num_attention_heads")),
            vocab_size=get("vocab_size"),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            rope_theta=float(rope.get("rope_theta", get("rope_theta", 1_000_000.0))),
            mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
            rms_norm_eps=get("rms_norm_eps", 1e-6),
            max_position_embeddings=get("max_position_embeddings", 128000),
            bos_token_id=get("bos_token_id", 151643),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            vision_start_token_id=get("vision_start_token_id", 151652),
            vision_end_token_id=get("vision_end_token_id", 151653),
            image_token_id=get("image_token_id", 151655),
            video_token_id=get("video_token_id", 151656),
            vision=vision,
        )


_VISION_32B_72B = VisionConfig(intermediate_size=3456)

# Each flavor is the 7B defaults plus what differs; nothing is repeated.
FLAVORS: dict[str, Qwen2_5_VLConfig] = {
    "3B": Qwen2_5_VLConfig(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                           num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                           tie_word_embeddings=True),
    "7B": Qwen2_5_VLConfig(),
    "32B": Qwen2_5_VLConfig(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                            num_attention_heads=40, num_key_value_heads=8, vision=_VISION_32B_72B),
    "72B": Qwen2_5_VLConfig(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                            num_attention_heads=64, num_key_value_heads=8, vision=_VISION_32B_72B),
    # Tests and the CPU demo: GQA (4 q heads, 2 kv heads), 4 LLM layers (PP2 -> 2 per stage),
    # 4 ViT blocks with full attention at 1 and 3, windows of 2x2 merged tokens (56 px).
    # head_dim 32 because vLLM's CPU attention supports head sizes 32, 64, 80, ... only.
    # Special token ids sit at the top of the 1024-token vocabulary (see data/tokenizer).
    "tiny": Qwen2_5_VLConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1024, mrope_section=(4, 6, 6), max_position_embeddings=4096,
        bos_token_id=1016, eos_token_id=1017, vision_start_token_id=1018, vision_end_token_id=1019,
        image_token_id=1020, video_token_id=1021,
        vision=VisionConfig(depth=4, hidden_size=32, intermediate_size=64, num_heads=2,
                            window_size=56, fullatt_block_indexes=(1, 3)),
    ),
}

# Published totals of the Hugging Face checkpoints (safetensors metadata), for the registry test.
PUBLISHED_PARAM_COUNTS = {"3B": 3_754_622_976, "7B": 8_292_166_656, "32B": 33_452_718_336,
                          "72B": 73_410_777_344}


def get_flavor(name: str, **overrides: Any) -> Qwen2_5_VLConfig:
    if name not in FLAVORS:
        raise ValueError(f"unknown flavor {name!r}; expected one of {sorted(FLAVORS)}")
    return FLAVORS[name].replace(**overrides) if overrides else FLAVORS[name]
