"""The rollout engine interface and its request / sampling / output dataclasses.

The trainer talks to a `RolloutEngine` only; `vllm_engine.VLLMEngine` is the one implementation
(all vLLM specifics live there).

What the returned log-probs are (read this before using them in a loss)
-----------------------------------------------------------------------
`RolloutSample.response_logprobs[t]` is log q(o_t | prefix) where q is the distribution the token
was actually drawn from:
  * temperature T > 0, top_p = 1: q = softmax(logits / T) over the full vocabulary, i.e.
    log_softmax(logits / T)[o_t] -- the same quantity the trainer computes from its own logits.
  * top_p < 1: q is that distribution truncated to the nucleus (the smallest set of most likely
    tokens whose mass reaches top_p) and renormalised. For a sampled token
    log q = log_softmax(logits / T)[o_t] - log(nucleus mass), so it exceeds the full-vocabulary
    value by -log(nucleus mass), which lies in [0, -log(top_p)] (<= 0.01005 for top_p = 0.99).
  * temperature 0 (greedy): log_softmax(logits)[o_t] (no temperature).
The PPO/PAPO importance ratio must use old log-probs that the TRAINER recomputes with the same
formula as the new ones (log_softmax(logits / T) over the full vocabulary, as the PAPO reference
code does); the engine's values are then a diagnostic of the train/inference mismatch (and the
input of a truncated-importance-sampling correction, if one is added), not the ratio's denominator.
"""
from __future__ import annotations

import abc
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from .packing import PackedTensor, SharedBuffer, pack_layout, packed_end


@dataclass
class RolloutRequest:
    """One prompt. `prompt_token_ids` holds ONE image-pad token per image (inside
    <|vision_start|>..<|vision_end|>); the engine's processor expands it to the image's token count."""

    prompt_token_ids: list[int]
    images: list[Any] = field(default_factory=list)  # PIL images or (H, W, 3) uint8 arrays, in prompt order


@dataclass
class SamplingConfig:
    """How responses are sampled (one config per generate call)."""

    n: int = 1                          # responses per prompt
    temperature: float = 1.0            # 0 = greedy
    top_p: float = 1.0                  # nucleus sampling; < 1 changes the returned log-probs (see module doc)
    max_new_tokens: int = 64            # response length cap; reaching it gives finish_reason "length"
    stop_token_ids: list[int] = field(default_factory=list)  # besides the tokenizer's EOS
    seed: int | None = None             # None: not reproducible; else per-sample seeds via sample_seed()


@dataclass
class RolloutSample:
    """One response to one prompt."""

    prompt_index: int                   # position of the request in the generate() call
    sample_index: int                   # 0..n-1
    prompt_token_ids: list[int]         # as the model saw them: image pads expanded
    response_token_ids: list[int]       # includes the stop token when finish_reason == "stop"
    response_logprobs: list[float]      # log q of each response token, q = sampling distribution (module doc)
    finish_reason: Literal["stop", "length"]


def sample_seed(seed: int, step: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed for one sample, derived from (seed, step, prompt index, sample index).

    Distinct tuples give statistically independent streams; the same tuple always gives the
    same seed, so a step's n samples per prompt are reproducible regardless of batching."""
    words = np.random.SeedSequence([seed, step, prompt_index, sample_index]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class RolloutEngine(abc.ABC):
    """Generates responses and receives new weights (HF names, full tensors).

    Weights arrive packed: the caller writes tensors into the engine's `weight_buffer` (shared
    memory: other processes on this host may write into it too, by its path) and `load_packed`
    loads them from there; `load_weights` does both for tensors at hand. One update is any number
    of loads followed by `reset_caches`; the buffer is reused across its loads and freed at the end."""

    @abc.abstractmethod
    def generate(self, requests: list[RolloutRequest], sampling: SamplingConfig, step: int = 0,
                 prompt_indices: list[int] | None = None) -> list[list[RolloutSample]]:
        """n samples for each request: result[i][sample_index]. Sample k of request i is seeded by
        (sampling.seed, step, prompt_indices[i], k) (default index: i), so a prompt's responses do
        not depend on which engine or batch it is in."""

    _weight_buffer: SharedBuffer | None = None

    def weight_buffer(self, nbytes: int) -> SharedBuffer:
        """The buffer `load_packed` reads, at least `nbytes` long (contents are not kept when it
        grows); kept for the whole update, released by `release_weight_buffer` (in reset_caches)."""
        if self._weight_buffer is None or self._weight_buffer.nbytes < nbytes:
            self.release_weight_buffer()
            self._weight_buffer = SharedBuffer(nbytes)
        return self._weight_buffer

    def release_weight_buffer(self) -> None:
        if self._weight_buffer is not None:
            self._weight_buffer.close()
            self._weight_buffer = None

    @abc.abstractmethod
    def load_packed(self, entries: list[PackedTensor], source: str | None = None) -> None:
        """Copy (a subset of) the weights in place from `weight_buffer()`, or from the SharedBuffer
        at path `source` (another process's on this host); HF checkpoint names and layouts. Tensors
        with the same `load_group` must come in the same call. Caches derived from the old weights
        stay until reset_caches()."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """`load_packed` for (HF name, tensor) pairs at hand: packed into the weight buffer first."""
        weights = list(weights)
        entries = pack_layout((name, t.dtype, tuple(t.shape)) for name, t in weights)
        if not entries:
            return
        buffer = self.weight_buffer(packed_end(entries)).bytes
        for entry, (_, tensor) in zip(entries, weights):
            entry.view(buffer).copy_(tensor.detach())
        self.load_packed(entries)

    @staticmethod
    def load_group(hf_name: str) -> str:
        """Tensors that must arrive in one load call share this key (default: none need to)."""
        return hf_name

    @abc.abstractmethod
    def reset_caches(self) -> None:
        """Drop everything computed with old weights (prefix/KV cache, vision encoder cache)."""

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """load_weights then reset_caches: the engine follows the new weights."""
        self.load_weights(weights)
        self.reset_caches()

    def sleep(self) -> None:
        """Free accelerator memory between rollout phases (no-op where unsupported)."""

    def wake_up(self) -> None:
        """Undo sleep() before the next generate (no-op where unsupported)."""
