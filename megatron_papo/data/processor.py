"""Text + images -> model inputs for Qwen2.5-VL: input_ids, pixel_values, image_grid_thw, masked pixel_values.

Why not `AutoProcessor`: `Qwen2_5_VLProcessor` builds a video processor that needs torchvision, which
cannot be installed on CPU machines here (DEPENDENCY_NOTES). We load the two parts it wraps
separately: the tokenizer (`AutoTokenizer`, tokenizer files of the model folder) and the image
processor (`Qwen2VLImageProcessorPil` by default, or the torchvision `Qwen2VLImageProcessor`, from
preprocessor_config.json of the model folder), and do the
processor's only other job ourselves: expand each `<|image_pad|>` to grid_t*grid_h*grid_w/merge^2
copies.

The masked image (PAPO_SPEC, "The masked image"): `reference` masks the RAW image (before resize)
with ops.masking, seeded by (seed, sample_id, image_index), and runs the same image processor, so
tokens and image_grid_thw are identical and only pixel_values differ. `patch_aligned` overwrites
whole rows of the processed pixel_values with the normalised fill (a different method).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from megatron_papo.data.sample import Sample

IMAGE_PAD = "<|image_pad|>"
MASK_METHODS = ("reference", "patch_aligned")


@dataclass
class ProcessorConfig:
    tokenizer_path: str | None = None  # HF model folder (tokenizer files + preprocessor_config.json); None = the
                                       # trainer's model.hf_dir / model.load folder, else the built-in tiny tokenizer
    min_pixels: int = 256 * 28 * 28    # images with fewer pixels are upscaled (PAPO: 256*28^2)
    max_pixels: int = 1280 * 28 * 28   # images with more pixels are downscaled (PAPO: 1280*28^2)
    image_backend: str = "pil"         # "pil" (works without torchvision) or "torchvision"; resized images differ slightly

    def __post_init__(self) -> None:
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"ProcessorConfig needs 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")
        if self.image_backend not in ("pil", "torchvision"):
            raise ValueError(f"ProcessorConfig.image_backend {self.image_backend!r} must be 'pil' or 'torchvision'")


@dataclass
class MaskConfig:
    seed: int = 0                 # with (sample_id, image_index), fixes every mask (same on all ranks and after resume)
    ratio: float = 0.6            # probability that a cell is masked (PAPO: 0.6)
    patch_size: int = 14          # cell side in raw pixels (reference method)
    fill: int = 0                 # value written to masked cells (0 = black)
    method: str = "reference"     # "reference" (raw image, then processor) or "patch_aligned" (processed rows)

    def __post_init__(self) -> None:
        if self.method not in MASK_METHODS:
            raise ValueError(f"MaskConfig.method {self.method!r} must be one of {MASK_METHODS}")


@dataclass
class Encoded:
    input_ids: torch.Tensor                    # [L] int64, image pads expanded
    pixel_values: torch.Tensor | None          # [N, patch_dim] float32 (None without images)
    image_grid_thw: torch.Tensor | None        # [num_images, 3] int64
    masked_pixel_values: torch.Tensor | None = None  # like pixel_values, from the masked images
    sample_id: int | None = None
    answer: str | None = None


def to_rgb_array(image) -> np.ndarray:
    """PIL image or HxW(xC) array -> RGB uint8 [H, W, 3]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise ValueError(f"image must be a PIL image or a uint8 HxW(xC) array, got {arr.dtype} {arr.shape}")
    return to_rgb_array(Image.fromarray(arr)) if arr.ndim == 2 or arr.shape[2] != 3 else arr


class VLProcessor:
    def __init__(self, tokenizer, image_processor):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.merge = image_processor.merge_size

    @classmethod
    def from_config(cls, config: ProcessorConfig) -> "VLProcessor":
        import transformers

        from megatron_papo.data.tokenizer import build_tiny_tokenizer, load_tokenizer

        # transformers 5: Qwen2VLImageProcessor is the torchvision backend, ...Pil the PIL one
        image_cls = getattr(transformers, "Qwen2VLImageProcessorPil" if config.image_backend == "pil"
                            else "Qwen2VLImageProcessor")
        sizes = dict(min_pixels=config.min_pixels, max_pixels=config.max_pixels)
        if config.tokenizer_path is None:
            return cls(build_tiny_tokenizer(), image_cls(**sizes))
        path = config.tokenizer_path
        if not os.path.isfile(os.path.join(path, "preprocessor_config.json")):
            raise FileNotFoundError(f"{path}: no preprocessor_config.json (expected an HF Qwen2.5-VL model folder)")
        saved = image_cls.from_pretrained(path, local_files_only=True).to_dict()
        saved.pop("image_processor_type", None)
        # the file's mean/std/patch sizes, with the config's pixel bounds (what PAPO sets)
        return cls(load_tokenizer(path), image_cls(**{**saved, **sizes}))

    def chat_text(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _pixels(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.image_processor(images=images, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"].long()

    def __call__(self, text: str | list[dict], images=(), mask: MaskConfig | None = None,
                 sample_id: int = 0) -> Encoded:
        """Encode a chat-rendered string (or messages) with its images, in placeholder order."""
        if not isinstance(text, str):
            text = self.chat_text(text)
        images = [to_rgb_array(im) for im in images]
        pieces = text.split(IMAGE_PAD)
        if len(pieces) - 1 != len(images):
            raise ValueError(f"text has {len(pieces) - 1} {IMAGE_PAD} tokens but {len(images)} images were given")
        if not images:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return Encoded(torch.tensor(ids, dtype=torch.long), None, None, sample_id=sample_id)
        pixel_values, grid = self._pixels(images)
        counts = (grid.prod(-1) // self.merge**2).tolist()
        expanded = pieces[0] + "".join(IMAGE_PAD * n + piece for n, piece in zip(counts, pieces[1:]))
        ids = torch.tensor(self.tokenizer(expanded, add_special_tokens=False)["input_ids"], dtype=torch.long)
        masked = self.mask_pixel_values(images, pixel_values, grid, mask, sample_id) if mask else None
        return Encoded(ids, pixel_values, grid, masked, sample_id=sample_id)

    def mask_pixel_values(self, images: list[np.ndarray], pixel_values: torch.Tensor, grid: torch.Tensor,
                          mask: MaskConfig, sample_id: int) -> torch.Tensor:
        from megatron_papo.ops import masking  # lower layer; imported at call time

        n = len(images)
        seeds = dict(seed=mask.seed, sample_ids=[sample_id] * n, image_indices=list(range(n)), ratio=mask.ratio)
        if mask.method == "patch_aligned":
            fill = masking.processor_fill_values(self.image_processor, mask.fill)
            return masking.mask_pixel_value_rows(pixel_values, grid, fill_values=fill, merge_size=self.merge, **seeds)
        masked_images = masking.mask_raw_images(images, patch_size=mask.patch_size, fill=mask.fill, **seeds)
        masked, masked_grid = self._pixels(masked_images)
        if not torch.equal(masked_grid, grid):  # the processor resizes by image size only, so this holds
            raise RuntimeError(f"masked image grid {masked_grid.tolist()} != clean grid {grid.tolist()}")
        return masked

    def encode_sample(self, sample: Sample, mask: MaskConfig | None = None) -> Encoded:
        enc = self(sample.messages, sample.images, mask=mask, sample_id=sample.sample_id)
        enc.answer = sample.answer
        return enc
