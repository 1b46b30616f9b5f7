"""Micro-batches through the (pipeline-parallel) model with megatron-core's schedules.

`run_micro_batches` is the one place the trainer calls megatron's forward/backward schedule. The
per-micro-batch function `on_logits(mb, logits)` runs on the last pipeline stage with this
stage's vocab-parallel logits [B, S', V_padded/TP] from the micro-batch's `logits_start` on, and
`mb` its `window` from there (losses read response positions only: logits of positions before the
shortest prompt's last token are never computed). It returns (loss, outputs):
- training (forward_only=False): `loss` is what megatron back-propagates (it divides it by the
  number of micro-batches, which is the reference's "mean over micro-batches");
- forward_only: `loss` is ignored; `outputs` (per-token tensors, metrics) are collected.
Returns the list of `outputs` on the last stage and [] elsewhere.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_papo.models.qwen2_5_vl.rope import mrope_position_ids
from megatron_papo.trainer.batch import MicroBatch


def add_position_ids(mb: MicroBatch, model_cfg) -> MicroBatch:
    """mrope positions [3, B, S] (the same on every rank: a pure function of the ids). Images count
    in the prompt only: generated tokens continue as text from the prompt's largest position, as in
    vLLM's and transformers' decoding, even if the model emitted an image-pad id."""
    if mb.position_ids is None:
        grid = mb.image_grid_thw if mb.image_grid_thw.numel() else None
        in_prompt = mb.prompt_mask
        positions, deltas = mrope_position_ids(mb.input_ids, grid, model_cfg.image_token_id,
                                               model_cfg.vision.spatial_merge_size, in_prompt)
        generated = (torch.arange(mb.input_ids.shape[1])[None, :] + deltas).expand(3, -1, -1)
        mb.position_ids = torch.where(in_prompt, positions, generated)
    return mb


IMAGE_BRANCHES = ("real", "both")


def model_inputs(mb: MicroBatch, images: str, image_token_id: int) -> tuple:
    """(input_ids, position_ids, pixel_values, image_grid_thw, image_mask) of the micro-batch with its
    real images, or "both" = the batch twice, [real; masked] (PAPO's masked branch: the same tokens,
    the masked images; logits then come as [2B, S, V/TP])."""
    has_images = mb.image_grid_thw.numel() > 0
    image_mask = (mb.input_ids == image_token_id) & mb.prompt_mask  # generated image-pad ids stay tokens
    if images == "both":
        ids, pos = torch.cat([mb.input_ids, mb.input_ids]), torch.cat([mb.position_ids, mb.position_ids], dim=1)
        pixels = torch.cat([mb.pixel_values, mb.masked_pixel_values]) if has_images else None
        grid = torch.cat([mb.image_grid_thw, mb.image_grid_thw]) if has_images else None
        return ids, pos, pixels, grid, torch.cat([image_mask, image_mask])
    return (mb.input_ids, mb.position_ids, mb.pixel_values if has_images else None,
            mb.image_grid_thw if has_images else None, image_mask)


def run_micro_batches(model_chunks: list[torch.nn.Module], micro_batches: list[MicroBatch],
                      on_logits: Callable[[MicroBatch, torch.Tensor], tuple[torch.Tensor, dict]], *,
                      forward_only: bool, images: str = "real") -> list[dict]:
    """Run every micro-batch through the pipeline (see the module doc); `images` picks the branch
    (see model_inputs)."""
    if images not in IMAGE_BRANCHES:
        raise ValueError(f"images must be one of {IMAGE_BRANCHES}, got {images!r}")
    if not micro_batches:
        return []
    model_cfg, config = _unwrap(model_chunks[0]).model_cfg, _unwrap(model_chunks[0]).config
    device = next(model_chunks[0].parameters()).device
    # on the device one at a time, as the schedule reaches them: the step's whole share (images included)
    # is not in the memory plan, which counts the micro-batches 1F1B keeps in flight (docs/scaling.md)
    batches = [add_position_ids(mb, model_cfg) for mb in micro_batches]
    sequence_split = config.tensor_model_parallel_size if config.sequence_parallel else 1
    outputs: list[dict] = []

    def loss_func(mb: MicroBatch, logits: torch.Tensor):
        loss, out = on_logits(mb, logits)
        outputs.append(out)
        return loss, {}

    def forward_step(data_iterator, model):
        mb = next(data_iterator).to(device)
        ids, pos, pixels, grid, image_mask = model_inputs(mb, images, model_cfg.image_token_id)
        start = mb.logits_start(sequence_split)
        # right padding + causal attention: real tokens never attend to padding, so no mask is needed
        return model(ids, pos, None, pixels, grid, image_mask, logits_from=start), partial(loss_func, mb.window(start))

    if not _unwrap(model_chunks[0]).config.variable_seq_lengths:
        raise ValueError("run_micro_batches needs config.variable_seq_lengths=True (set when the models are built)")
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=model_chunks,
        num_microbatches=len(batches), seq_length=batches[0].input_ids.shape[1],
        micro_batch_size=batches[0].input_ids.shape[0], forward_only=forward_only)
    return outputs


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    while hasattr(module, "module"):
        module = module.module
    return module
