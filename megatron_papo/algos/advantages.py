"""Outcome advantages (GRPO), DAPO's dynamic-sampling filter and soft overlong punishment.

Responses are laid out prompt-major: the n responses of prompt k are rows k*n .. k*n + n - 1.
"""
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

Group = TypeVar("Group")


def _groups(values: torch.Tensor, group_size: int, name: str) -> torch.Tensor:
    if values.dim() != 1:
        raise ValueError(f"{name} must be 1-D [num_prompts * group_size], got shape {tuple(values.shape)}")
    if group_size < 1 or values.numel() % group_size:
        raise ValueError(f"{name} has {values.numel()} entries, not a multiple of group_size={group_size}")
    return values.view(-1, group_size)


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i - mean_group(r)) / (unbiased std_group(r) + eps), one per response [N].

    Broadcast to the tokens of each response by the caller. Needs group_size >= 2 (the unbiased
    std of one sample is undefined).
    """
    if group_size < 2:
        raise ValueError(f"GRPO needs group_size >= 2 responses per prompt, got {group_size}")
    g = _groups(rewards, group_size, "rewards").float()
    adv = (g - g.mean(dim=1, keepdim=True)) / (g.std(dim=1, unbiased=True, keepdim=True) + eps)
    return adv.reshape(-1)


def dynamic_sampling_keep(accuracy: torch.Tensor, group_size: int, low: float = 0.01,
                          high: float = 0.99) -> torch.Tensor:
    """DAPO's filter: True for each prompt group whose mean accuracy lies in (low, high) [num_prompts].

    Groups that are all right or all wrong have zero advantage everywhere and are dropped.
    """
    mean = _groups(accuracy, group_size, "accuracy").float().mean(dim=1)
    return (mean > low) & (mean < high)


def fill_with_informative_groups(draw: Callable[[int], list[Group]], batch_size: int,
                                 informative: Callable[[list[Group]], Sequence[bool]],
                                 max_extra_draws: int) -> tuple[list[Group], list[Group]]:
    """DAPO dynamic sampling: draw batches of prompt groups (`draw(attempt)`, attempt = 0, 1, ...) and
    keep the informative ones (`informative(groups)`, e.g. from `dynamic_sampling_keep`) until
    `batch_size` are kept or `max_extra_draws` draws beyond the first were made. Short of that, the
    batch is padded with uninformative groups in the order drawn (the step still trains on a full
    batch; their advantages are zero). Returns (the batch, every group drawn)."""
    kept: list[Group] = []
    drawn: list[Group] = []
    for attempt in range(max_extra_draws + 1):
        groups = draw(attempt)
        drawn += groups
        kept += [g for g, keep in zip(groups, informative(groups)) if keep]
        if len(kept) >= batch_size:
            return kept[:batch_size], drawn
    taken = {id(g) for g in kept}  # by identity: two groups can hold equal values
    kept += [g for g in drawn if id(g) not in taken][:batch_size - len(kept)]
    return kept, drawn


def overlong_penalty(response_lengths: torch.Tensor, max_response_length: int, buffer_len: int,
                     penalty_factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment, added to the reward [N]: 0 up to max - buffer, then falling
    linearly to -penalty_factor at max, and -penalty_factor beyond. buffer_len = 0 turns it off."""
    if buffer_len == 0:
        return torch.zeros(response_lengths.shape, dtype=torch.float32)
    if not 0 < buffer_len <= max_response_length:
        raise ValueError(f"overlong buffer_len must be in [0, max_response_length={max_response_length}], "
                         f"got {buffer_len}")
    over = response_lengths.float() - (max_response_length - buffer_len)
    return -(over / buffer_len).clamp(0, 1) * penalty_factor
