"""A fixed multimodal batch built from a config alone, and the two forwards it is compared with:
transformers' Qwen2_5_VLForConditionalGeneration and our Megatron stages (via megatron-core's
pipeline schedules). Used by tools/verify_conversion.py and the parity tests."""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_papo.models.qwen2_5_vl.flavors import Qwen2_5_VLConfig
from megatron_papo.models.qwen2_5_vl.rope import mrope_position_ids

# Patch grids (h, w) per image, per sample: two samples, images of different sizes.
DEFAULT_IMAGES = (((4, 6),), ((8, 4), (4, 4)))


def synthetic_batch(cfg: Qwen2_5_VLConfig, images=DEFAULT_IMAGES, text_len: int = 12, seed: int = 0) -> dict:
    """input_ids [B, S] (seeded text tokens, vision_start / image pads / vision_end per image),
    pixel_values [patches, patch_dim], image_grid_thw [images, 3], position_ids [3, B, S]."""
    g = torch.Generator().manual_seed(seed)
    merge = cfg.vision.spatial_merge_size
    text_vocab = min(cfg.vocab_size, cfg.bos_token_id, cfg.image_token_id, cfg.vision_start_token_id)
    samples, grids = [], []
    for sample_images in images:
        ids = [torch.randint(0, text_vocab, (text_len,), generator=g)]
        for h, w in sample_images:
            if h % merge or w % merge:
                raise ValueError(f"image grid {h}x{w} must be a multiple of spatial_merge_size {merge}")
            grids.append((1, h, w))
            ids += [torch.tensor([cfg.vision_start_token_id]),
                    torch.full((h * w // merge**2,), cfg.image_token_id),
                    torch.tensor([cfg.vision_end_token_id]),
                    torch.randint(0, text_vocab, (text_len // 2,), generator=g)]
        samples.append(torch.cat(ids))
    seq = max(len(s) for s in samples)
    input_ids = torch.stack([torch.cat([s, torch.randint(0, text_vocab, (seq - len(s),), generator=g)])
                             for s in samples])
    image_grid_thw = torch.tensor(grids, dtype=torch.long) if grids else None
    num_patches = sum(t * h * w for t, h, w in grids)
    pixel_values = torch.randn(num_patches, cfg.vision.patch_dim, generator=g) if grids else None
    position_ids, _ = mrope_position_ids(input_ids, image_grid_thw, cfg.image_token_id, merge)
    return dict(input_ids=input_ids, position_ids=position_ids, pixel_values=pixel_values,
                image_grid_thw=image_grid_thw)


def hf_logits(hf_model, batch: dict) -> torch.Tensor:
    """transformers' logits for the batch. mm_token_type_ids is required (else 1-D positions) and
    the cached rope_deltas are reset so unrelated calls do not leak into each other."""
    hf_model.model.rope_deltas = None
    image_token = hf_model.config.image_token_id
    return hf_model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                    image_grid_thw=batch["image_grid_thw"],
                    mm_token_type_ids=(batch["input_ids"] == image_token).int(),
                    attention_mask=torch.ones_like(batch["input_ids"])).logits


def gather_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Vocab-parallel logits [..., V_padded/TP] -> full logits [..., vocab_size] on every TP rank."""
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)[..., :vocab_size]


def run_model(model, batch: dict, loss_weight: torch.Tensor | None = None, logits_from: int = 0):
    """One microbatch through all pipeline stages with megatron-core's schedule.

    loss_weight None: forward only. Otherwise backward of loss = sum(logits * loss_weight) (weight
    [B, S - logits_from, vocab], full vocab; padding columns get zero). Returns (full logits
    [B, S - logits_from, vocab], loss) on the last stage and (None, None) elsewhere."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    result = {}

    def loss_func(logits):
        local_vocab = logits.shape[-1]
        result["logits"] = gather_vocab(logits.detach(), model.vocab_size)
        if loss_weight is None:
            return logits.sum() * 0.0, {}
        padded = torch.zeros(*loss_weight.shape[:-1], local_vocab * dist.get_world_size(
            parallel_state.get_tensor_model_parallel_group()), dtype=logits.dtype, device=logits.device)
        padded[..., : model.vocab_size] = loss_weight.to(logits.device)
        loss = (logits * padded[..., tp_rank * local_vocab:(tp_rank + 1) * local_vocab]).sum()
        total = loss.detach().clone()
        dist.all_reduce(total, group=parallel_state.get_tensor_model_parallel_group())
        result["loss"] = total
        return loss, {}

    def forward_step(data_iterator, stage):
        data = next(data_iterator)
        return stage(data["input_ids"], data["position_ids"], None, data["pixel_values"],
                     data["image_grid_thw"], logits_from=logits_from), partial(loss_func)

    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([batch]), model=[model], num_microbatches=1,
        seq_length=batch["input_ids"].shape[1], micro_batch_size=batch["input_ids"].shape[0],
        forward_only=loss_weight is None)
    return result.get("logits"), result.get("loss")
