"""Direct reshard: Megatron train-TP shards -> the slice each vLLM rollout-TP rank holds, in vLLM's layout.

Pure functions (no communication) and a plan saying which train rank sends which bytes to which
rollout rank. Any train TP t and rollout TP r work (r | t and t | r are the usual cases); every
tensor is described by its `hf_mapping.Rule` (shard kind + fused layout).

vLLM's per-rank layouts (vLLM 0.32: layers/linear.py, layers/vocab_parallel_embedding.py,
models/qwen2.py, models/qwen2_5_vl.py), as produced here:
  LM q/k/v        -> `qkv_proj` (QKVParallelLinear): [q_j; k_j; v_j], rank j holds query heads
                     [j*H/r, (j+1)*H/r) and KV heads [j*G/r, (j+1)*G/r); when G < r each rank holds
                     one KV head, head j // (r/G) (replicated over r/G ranks). Same for biases.
  vision qkv      -> `qkv` (QKVParallelLinear, G = H): [q_j; k_j; v_j], weight and bias.
  gate/up (LM, ViT MLP) -> `gate_up_proj` (MergedColumnParallelLinear): [gate_j; up_j], weight and bias.
  column (merger mlp.0) : rows [j*N/r, (j+1)*N/r), weight and bias.
  row (o_proj, down_proj, ViT proj, merger mlp.2): weight columns [j*K/r, ...); biases are whole.
  vocab (embed_tokens, lm_head): vocabulary padded to a multiple of 64 (DEFAULT_VOCAB_PADDING_SIZE),
                     rank j rows [j*Vp/r, (j+1)*Vp/r), rows >= vocab_size are zero.
  replicated (norms, patch embedding): the HF tensor (patch embedding in HF's Conv3d shape).
Megatron's train-TP layouts are hf_mapping's: qkv grouped per KV group, gate_up shards [gate_i; up_i],
vocab padded to the train TP's padded vocabulary, row biases replicated.

Who sends what: every tensor is a set of "components" (q, k, v / gate, up / the whole tensor), each
split into contiguous ranges along one dimension on both sides. Rollout rank j receives, from each
train rank i, the overlap of i's range and j's range, per component. With r | t, rollout rank j
receives from the t/r train ranks [j*t/r, (j+1)*t/r) (each sends its whole shard: bytes moved =
the vLLM shard); with t | r, from the one train rank j // (r/t) (which sends only the part j needs).
Vocab tensors break the pattern: Megatron pads the vocabulary to a multiple of 128 * t, vLLM to a
multiple of 64, so row boundaries differ and a rollout rank may need rows from a neighbouring train
rank too. Replicated tensors come from train rank 0. Per rollout rank, the bytes received equal its vLLM
shard's bytes (less vocab padding, plus nothing else); `ReshardPlan.bytes_received` /
`bytes_sent` compute them.

Where this is used: a direct, per-rank push (each vLLM TP worker copies its slices into its own
parameters via vLLM's kernel-format reload) on GPU. The CPU build runs rollout TP 1 and its
weights are repacked after loading, so weight_sync there sends full HF tensors instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_papo.models.qwen2_5_vl.flavors import Qwen2_5_VLConfig
from megatron_papo.models.qwen2_5_vl.hf_mapping import Rule, head_counts, split_dim, to_hf

VLLM_VOCAB_PADDING = 64  # vllm.model_executor.layers.vocab_parallel_embedding.DEFAULT_VOCAB_PADDING_SIZE


def vllm_padded_vocab(vocab_size: int) -> int:
    return -(-vocab_size // VLLM_VOCAB_PADDING) * VLLM_VOCAB_PADDING


def vllm_split_sizes(cfg) -> dict[str, int]:
    """The dimensions of Qwen2.5-VL (a flavors.ModelConfig) that a vLLM engine splits over its TP
    ranks (the layouts above): a rollout.tp must divide each (KV heads: or be a multiple of them)."""
    v = cfg.vision
    return {"num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
            "intermediate_size": cfg.intermediate_size, "vision num_heads": v.num_heads,
            "vision intermediate_size": v.intermediate_size,
            "vision merger width (hidden_size x spatial_merge_size^2)": v.hidden_size * v.spatial_merge_size**2,
            "padded vocab_size": vllm_padded_vocab(cfg.vocab_size)}


@dataclass(frozen=True)
class Component:
    """A part of a tensor split contiguously along `dim`: global units [0, total) with `unit` rows each."""

    name: str
    total: int      # global number of units (heads, rows, columns)
    unit: int = 1   # rows (or columns) per unit along dim


def components(rule: Rule, cfg: Qwen2_5_VLConfig, full_shape: tuple[int, ...]) -> list[Component]:
    """The split components of a tensor whose HF-equivalent full shape (unpadded) is `full_shape`."""
    if rule.layout in ("qkv", "fused_qkv"):
        heads, groups, head_dim = head_counts(cfg, rule.scope)
        return [Component("q", heads, head_dim), Component("k", groups, head_dim), Component("v", groups, head_dim)]
    dim = split_dim(rule, len(full_shape))
    if rule.layout == "gate_up":
        return [Component("gate", full_shape[0] // 2), Component("up", full_shape[0] // 2)]
    return [Component("all", full_shape[dim])]


def _range(total: int, rank: int, size: int) -> tuple[int, int]:
    if total % size:
        raise ValueError(f"{total} units do not split over {size} ranks")
    per = total // size
    return rank * per, (rank + 1) * per


def train_ranges(rule: Rule, comp: Component, rank: int, tp: int, vocab_rows: int | None = None) -> tuple[int, int]:
    """Units of `comp` that train TP rank `rank` holds (vocab: in Megatron's padded row space)."""
    return _range(vocab_rows if rule.shard == "vocab" else comp.total, rank, tp)


def rollout_ranges(rule: Rule, comp: Component, rank: int, tp: int) -> tuple[int, int]:
    """Units of `comp` that rollout TP rank `rank` holds (vocab: in vLLM's padded row space)."""
    if rule.shard == "vocab":
        return _range(vllm_padded_vocab(comp.total), rank, tp)
    if comp.name in ("k", "v") and comp.total < tp:  # vLLM replicates KV heads when G < r
        if tp % comp.total:
            raise ValueError(f"rollout tp {tp} must be a multiple of the {comp.total} KV heads")
        head = rank // (tp // comp.total)
        return head, head + 1
    return _range(comp.total, rank, tp)


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int] | None:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else None


def _unpack_train_shard(rule: Rule, cfg: Qwen2_5_VLConfig, shard: torch.Tensor, tp: int,
                        comps: list[Component]) -> list[torch.Tensor]:
    """A train rank's Megatron shard -> one tensor per component (split dim first for row tensors)."""
    if rule.layout in ("qkv", "fused_qkv"):
        heads, groups, head_dim = head_counts(cfg, rule.scope)
        per_group = heads // groups
        rest = shard.shape[1:]
        grouped = shard.reshape(groups // tp, (per_group + 2) * head_dim, *rest)
        q, k, v = grouped.split([per_group * head_dim, head_dim, head_dim], dim=1)
        return [t.reshape(-1, *rest) for t in (q, k, v)]
    if rule.layout == "gate_up":
        return list(shard.chunk(2, dim=0))
    return [shard]


def vllm_shard(rule: Rule, cfg: Qwen2_5_VLConfig, train_shards: dict[int, torch.Tensor], train_tp: int,
               rollout_rank: int, rollout_tp: int) -> torch.Tensor:
    """The tensor rollout rank `rollout_rank` holds for `rule`, in vLLM's layout (module doc).

    `train_shards` maps train TP rank -> its Megatron shard; it must contain at least the ranks
    `ReshardPlan.sources` names for this rollout rank (others are ignored)."""
    any_shard = next(iter(train_shards.values()))
    dim = split_dim(rule, any_shard.dim())
    if dim is None:
        if rule.layout == "conv_linear":
            return to_hf(rule, train_shards[0], cfg)[0]
        return train_shards[min(train_shards)]
    full_shape = list(any_shard.shape)
    vocab_rows = None
    if rule.shard == "vocab":
        vocab_rows = any_shard.shape[0] * train_tp          # Megatron's padded vocabulary
        full_shape[0] = cfg.vocab_size
    else:
        full_shape[dim] = any_shard.shape[dim] * train_tp
    comps = components(rule, cfg, tuple(full_shape))
    unpacked = {i: _unpack_train_shard(rule, cfg, s, train_tp, comps) for i, s in train_shards.items()}
    parts = []
    for c, comp in enumerate(comps):
        want = rollout_ranges(rule, comp, rollout_rank, rollout_tp)
        pieces, covered = [], want[0]
        for i in range(train_tp):
            have = train_ranges(rule, comp, i, train_tp, vocab_rows)
            if rule.shard == "vocab":  # Megatron's padding rows are not sent; vLLM's are zeros
                have = (have[0], min(have[1], comp.total))
            hit = _overlap(have, want)
            if hit is None:
                continue
            if i not in train_shards:
                raise KeyError(f"{rule.megatron}: rollout rank {rollout_rank} needs train rank {i}")
            if hit[0] > covered:
                raise AssertionError("train ranges must tile the component")
            src = unpacked[i][c]
            pieces.append(src.narrow(dim, (hit[0] - have[0]) * comp.unit, (hit[1] - hit[0]) * comp.unit))
            covered = hit[1]
        if covered < want[1]:  # only vLLM's vocab padding is left uncovered
            if rule.shard != "vocab":
                raise AssertionError(f"{rule.megatron}: units [{covered}, {want[1]}) of {comp.name} not found")
            pad_shape = list(any_shard.shape)
            pad_shape[dim] = (want[1] - covered) * comp.unit
            pieces.append(any_shard.new_zeros(pad_shape))
        parts.append(torch.cat(pieces, dim) if len(pieces) > 1 else pieces[0])
    return torch.cat(parts, dim).contiguous() if len(parts) > 1 else parts[0].contiguous()


@dataclass(frozen=True)
class Transfer:
    """Train rank `src` sends `numel` elements of a rule's tensor to rollout rank `dst`."""

    src: int
    dst: int
    numel: int


class ReshardPlan:
    """Which train rank sends how much of which tensor to which rollout rank.

    Built from the rules and the Megatron shard shapes (name -> shape of one train rank's shard)."""

    def __init__(self, rules: list[Rule], shard_shapes: dict[str, tuple[int, ...]], cfg: Qwen2_5_VLConfig,
                 train_tp: int, rollout_tp: int, element_size: int = 2):
        self.cfg, self.train_tp, self.rollout_tp, self.element_size = cfg, train_tp, rollout_tp, element_size
        self.transfers: dict[str, list[Transfer]] = {}
        for rule in rules:
            shape = shard_shapes[rule.megatron]
            self.transfers[rule.megatron] = self._plan_one(rule, tuple(shape))

    def _plan_one(self, rule: Rule, shape: tuple[int, ...]) -> list[Transfer]:
        t, r = self.train_tp, self.rollout_tp
        dim = split_dim(rule, len(shape))
        numel = 1
        for s in shape:
            numel *= s
        if dim is None:
            return [Transfer(0, j, numel) for j in range(r)]
        full_shape = list(shape)
        vocab_rows = shape[0] * t if rule.shard == "vocab" else None
        full_shape[dim] = self.cfg.vocab_size if rule.shard == "vocab" else shape[dim] * t
        per_unit_row = numel // shape[dim]  # elements per row (or column) along the split dim
        sent: dict[tuple[int, int], int] = {}
        for comp in components(rule, self.cfg, tuple(full_shape)):
            for j in range(r):
                want = rollout_ranges(rule, comp, j, r)
                for i in range(t):
                    have = train_ranges(rule, comp, i, t, vocab_rows)
                    if rule.shard == "vocab":
                        have = (have[0], min(have[1], comp.total))
                    hit = _overlap(have, want)
                    if hit:
                        sent[(i, j)] = sent.get((i, j), 0) + (hit[1] - hit[0]) * comp.unit * per_unit_row
        return [Transfer(i, j, n) for (i, j), n in sorted(sent.items())]

    def sources(self, name: str, rollout_rank: int) -> list[int]:
        """Train ranks that send (part of) tensor `name` to `rollout_rank`."""
        return [tr.src for tr in self.transfers[name] if tr.dst == rollout_rank]

    def bytes_received(self, rollout_rank: int) -> int:
        return self.element_size * sum(tr.numel for trs in self.transfers.values() for tr in trs
                                       if tr.dst == rollout_rank)

    def bytes_sent(self, train_rank: int) -> int:
        return self.element_size * sum(tr.numel for trs in self.transfers.values() for tr in trs
                                       if tr.src == train_rank)
