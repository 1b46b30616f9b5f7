"""From rollout samples to model micro-batches.

An `Experience` is one (prompt, image, response) with everything the update needs. `collate`
pads a list of them into a `MicroBatch` on the right; per-token tensors are aligned with the
*targets*: position t predicts token t+1, so `targets[:, t] = input_ids[:, t+1]` and
`response_mask[:, t]` is 1 exactly where that next token is a response token.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

import torch


@dataclass
class Experience:
    sample_id: int                 # dataset sample id (seeds the image mask)
    group: int                     # index of the prompt group (n responses share it)
    prompt_ids: list[int]          # with the image pad tokens expanded
    response_ids: list[int]
    pixel_values: torch.Tensor     # [rows, patch_dim] for this prompt's images ([0, D] without images)
    masked_pixel_values: torch.Tensor  # same shape, from the masked raw images
    image_grid_thw: torch.Tensor   # [num_images, 3]
    rollout_logp: list[float]      # sampling log-probs of response_ids (post-temperature)
    finish_reason: str = "stop"
    reward: float = 0.0
    accuracy: float = 0.0
    format_score: float = 0.0
    advantage: float = 0.0
    # filled by the no-grad passes, one value per response token
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    masked_logp: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    @classmethod
    def from_encoded(cls, enc, response_ids: list[int], rollout_logp: list[float], patch_dim: int,
                     **outcome) -> "Experience":
        """The experience of an encoded prompt (data.processor.Encoded) and one response. A prompt
        without images gets empty pixel tensors: its masked branch is the prompt itself (KL_prcp 0)."""
        if enc.pixel_values is None:
            pixels = masked = torch.zeros(0, patch_dim)
            grid = torch.zeros(0, 3, dtype=torch.long)
        else:
            pixels, grid = enc.pixel_values, enc.image_grid_thw
            masked = pixels if enc.masked_pixel_values is None else enc.masked_pixel_values
        return cls(sample_id=enc.sample_id, prompt_ids=enc.input_ids.tolist(), response_ids=response_ids,
                   pixel_values=pixels, masked_pixel_values=masked, image_grid_thw=grid, rollout_logp=rollout_logp,
                   **outcome)


@dataclass
class MicroBatch:
    input_ids: torch.Tensor        # [B, S] long, right-padded with pad_id (right padding + causal attention:
                                   # real tokens never attend to padding, so no attention mask is needed)
    targets: torch.Tensor          # [B, S] long: input_ids shifted left (pad where none)
    response_mask: torch.Tensor    # [B, S] float: 1 where targets[:, t] is a response token
    pixel_values: torch.Tensor     # [rows of all images, patch_dim]
    masked_pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor   # [num_images, 3]
    advantages: torch.Tensor       # [B, S] float, the sequence advantage on response positions
    prompt_lengths: torch.Tensor   # [B] long: tokens before the response (for the rope positions)
    old_logp: torch.Tensor | None = None   # [B, S], zeros off the response
    ref_logp: torch.Tensor | None = None
    masked_logp: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None  # [3, B, S] mrope positions (set by the model side)
    first_position: int = 0        # sequence position of column 0: > 0 in a window() of the batch

    # the fields with one value per sequence position, in their last dimension
    PER_POSITION = ("input_ids", "targets", "response_mask", "advantages", "old_logp", "ref_logp", "masked_logp",
                    "position_ids")

    @property
    def prompt_mask(self) -> torch.Tensor:
        """[B, S] bool: True on prompt tokens (where images enter and count for the rope)."""
        steps = torch.arange(self.input_ids.shape[1], device=self.input_ids.device) + self.first_position
        return steps[None, :] < self.prompt_lengths[:, None]

    def logits_start(self, multiple: int = 1) -> int:
        """The first position whose logits a loss reads: the shortest prompt's last token (it predicts
        that row's first response token), moved back so that the positions from it on are a multiple
        of `multiple` (sequence parallel splits them over TP)."""
        seq = self.input_ids.shape[1]
        start = int(self.prompt_lengths.min()) - 1
        return max(seq - -(-(seq - start) // multiple) * multiple, 0)

    def window(self, start: int) -> "MicroBatch":
        """The batch seen from sequence position `start` on: per-position fields cut there (they line
        up with logits from `start` on); images and per-row fields unchanged."""
        cut = {name: v[..., start:] for name in self.PER_POSITION if (v := getattr(self, name)) is not None}
        return dataclasses.replace(self, **cut, first_position=self.first_position + start)

    def to(self, device) -> "MicroBatch":
        moved = {f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
                 for f in fields(self)}
        return MicroBatch(**moved)


def _per_token(exps: list[Experience], attr: str, shape) -> torch.Tensor | None:
    """Scatter each experience's per-response-token values to its target positions."""
    if any(getattr(e, attr) is None for e in exps):
        return None
    out = torch.zeros(shape, dtype=torch.float32)
    for b, e in enumerate(exps):
        p, r = len(e.prompt_ids), len(e.response_ids)
        out[b, p - 1: p - 1 + r] = getattr(e, attr).float()
    return out


def collate(exps: list[Experience], pad_id: int, pad_to_multiple: int = 1) -> MicroBatch:
    if not exps:
        raise ValueError("collate: empty list of experiences")
    seq = max(e.length for e in exps)
    seq = -(-seq // pad_to_multiple) * pad_to_multiple
    shape = (len(exps), seq)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    response_mask = torch.zeros(shape, dtype=torch.float32)
    advantages = torch.zeros(shape, dtype=torch.float32)
    for b, e in enumerate(exps):
        if not e.response_ids:
            raise ValueError(f"collate: sample {e.sample_id} has an empty response")
        ids = e.prompt_ids + e.response_ids
        p, r = len(e.prompt_ids), len(e.response_ids)
        input_ids[b, : len(ids)] = torch.tensor(ids)
        response_mask[b, p - 1: p - 1 + r] = 1.0
        advantages[b, p - 1: p - 1 + r] = e.advantage
    targets = torch.full(shape, pad_id, dtype=torch.long)
    targets[:, :-1] = input_ids[:, 1:]
    return MicroBatch(
        input_ids=input_ids, targets=targets, response_mask=response_mask,
        pixel_values=torch.cat([e.pixel_values for e in exps]),
        masked_pixel_values=torch.cat([e.masked_pixel_values for e in exps]),
        image_grid_thw=torch.cat([e.image_grid_thw for e in exps]).long(),
        advantages=advantages,
        prompt_lengths=torch.tensor([len(e.prompt_ids) for e in exps], dtype=torch.long),
        old_logp=_per_token(exps, "old_logp", shape),
        ref_logp=_per_token(exps, "ref_logp", shape),
        masked_logp=_per_token(exps, "masked_logp", shape),
    )


def split_response_values(values: torch.Tensor, exps: list[Experience], first_position: int = 0) -> list[torch.Tensor]:
    """Inverse of the scatter in `collate`: [B, S] per-target values (column 0 at sequence position
    `first_position`: a MicroBatch.window's) -> per-experience response values."""
    out = []
    for b, e in enumerate(exps):
        p, r = len(e.prompt_ids) - first_position, len(e.response_ids)
        if p < 1:
            raise ValueError(f"split_response_values: sample {e.sample_id}'s response starts before column 0 "
                             f"(first_position={first_position})")
        out.append(values[b, p - 1: p - 1 + r].detach().float().clone())
    return out


def make_micro_batches(exps: list[Experience], micro_batch_size: int,
                       max_tokens: int = 0) -> list[list[Experience]]:
    """The experiences in micro-batches.

    max_tokens = 0: consecutive chunks of `micro_batch_size` experiences, in the caller's order.
    max_tokens > 0: by padded size instead (micro_batch_size is not used): experiences sorted by
    length, longest first, and each micro-batch takes the next ones while (count x its longest)
    stays within max_tokens; a sequence longer than that goes alone. Sorting leaves little padding,
    and short sequences share a micro-batch."""
    if max_tokens < 0:
        raise ValueError(f"micro_batch_tokens must be >= 0, got {max_tokens}")
    if not max_tokens:
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        return [exps[i: i + micro_batch_size] for i in range(0, len(exps), micro_batch_size)]
    batches: list[list[Experience]] = []
    for e in sorted(exps, key=lambda e: -e.length):  # stable: ties keep the caller's order
        if batches and (len(batches[-1]) + 1) * batches[-1][0].length <= max_tokens:
            batches[-1].append(e)
        else:
            batches.append([e])
    return batches
