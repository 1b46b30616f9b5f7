"""THE one Hugging Face <-> Megatron name and layout map for Qwen2.5-VL.

Rules are data: a Megatron parameter name (full model, `{i}` = global layer/block index), the HF
hub-layout name(s) it is built from (`model.*` LM, `visual.*`, `lm_head.*`), how its Megatron
"full" tensor is assembled from them (`layout`) and how that full tensor is split over tensor
parallel ranks (`shard`). Conversion, verification and vLLM weight sync use only this module (and
param_binding, which binds a pipeline stage's parameters to these rules).

Megatron full-tensor layouts:
  qkv      linear_qkv rows grouped per KV group: [g0: q heads of g0, k0, v0][g1: ...] (GQA aware);
           from HF q/k/v (LM) or HF's fused [q; k; v] (vision, `fused_qkv`).
  gate_up  linear_fc1 = [gate; up]; a TP shard is [gate_r; up_r] (each half split separately).
  plain    the HF tensor as is.
  conv_linear  the vision patch embedding: HF's Conv3d weight (out, C, T, P, P), stride = kernel,
           is the linear weight (out, C*T*P*P) on pixel_values rows; flattened / reshaped back.
Shard kinds: column (dim 0), row (dim 1), vocab (rows padded to the TP-padded vocab, then dim 0),
replicated.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from megatron_papo.models.qwen2_5_vl.flavors import Qwen2_5_VLConfig

LM_PREFIX = "language_model."     # Qwen2_5_VLModel attribute holding the megatron GPTModel
VISION_PREFIX = "vision_model."   # Qwen2_5_VLModel attribute holding Qwen2_5_VisionModel
HF_VISION_PREFIX = "visual."
EMBEDDING = LM_PREFIX + "embedding.word_embeddings.weight"
OUTPUT_LAYER = LM_PREFIX + "output_layer.weight"  # no rule of its own when the config ties it to EMBEDDING

SHARD_KINDS = ("column", "row", "vocab", "replicated")
LAYOUTS = ("plain", "qkv", "fused_qkv", "gate_up", "conv_linear")


@dataclass(frozen=True)
class Rule:
    megatron: str              # Megatron parameter name; `{i}` = global layer (LM) or block (vision) index
    hf: tuple[str, ...]        # HF hub-layout names, in the order `layout` expects
    shard: str = "replicated"  # one of SHARD_KINDS
    layout: str = "plain"      # one of LAYOUTS
    scope: str = "lm"          # "lm" or "vision": which head counts / layer count apply

    def __post_init__(self):
        if self.shard not in SHARD_KINDS or self.layout not in LAYOUTS or self.scope not in ("lm", "vision"):
            raise ValueError(f"bad rule {self}")

    def at(self, i: int) -> "Rule":
        """This rule for layer/block i (names with `{i}` filled in)."""
        return Rule(self.megatron.format(i=i), tuple(h.format(i=i) for h in self.hf), self.shard,
                    self.layout, self.scope)


def lm_rules(cfg: Qwen2_5_VLConfig) -> list[Rule]:
    """Language-model rules (local-spec names; checkpoints use megatron's sharded keys: `sharded_key`)."""
    layer, hf_layer = LM_PREFIX + "decoder.layers.{i}.", "model.layers.{i}."
    rules = [
        Rule(EMBEDDING, ("model.embed_tokens.weight",), "vocab"),
        Rule(layer + "input_layernorm.weight", (hf_layer + "input_layernorm.weight",)),
        Rule(layer + "self_attention.linear_qkv.weight",
             tuple(hf_layer + f"self_attn.{p}_proj.weight" for p in "qkv"), "column", "qkv"),
        Rule(layer + "self_attention.linear_qkv.bias",
             tuple(hf_layer + f"self_attn.{p}_proj.bias" for p in "qkv"), "column", "qkv"),
        Rule(layer + "self_attention.linear_proj.weight", (hf_layer + "self_attn.o_proj.weight",), "row"),
        Rule(layer + "pre_mlp_layernorm.weight", (hf_layer + "post_attention_layernorm.weight",)),
        Rule(layer + "mlp.linear_fc1.weight",
             (hf_layer + "mlp.gate_proj.weight", hf_layer + "mlp.up_proj.weight"), "column", "gate_up"),
        Rule(layer + "mlp.linear_fc2.weight", (hf_layer + "mlp.down_proj.weight",), "row"),
        Rule(LM_PREFIX + "decoder.final_layernorm.weight", ("model.norm.weight",)),
    ]
    if not cfg.tie_word_embeddings:  # tied: the output layer reuses the embedding (param_binding)
        rules.append(Rule(OUTPUT_LAYER, ("lm_head.weight",), "vocab"))
    return rules


# ======================= VISION SECTION (owned by the vision engineer) =======================
# Rules for Qwen2_5_VisionModel. Megatron names are relative to the vision module (all_rules adds
# VISION_PREFIX), HF names relative to `visual.` (all_rules adds HF_VISION_PREFIX); `{i}` is the
# block index; use scope="vision" (head counts from cfg.vision). Layouts: "fused_qkv" for HF's
# fused [q; k; v] qkv weight/bias, "gate_up" for the SwiGLU fc1 (weight and bias).
def vision_rules(cfg: Qwen2_5_VLConfig) -> list[Rule]:
    layer, block = "decoder.layers.{i}.", "blocks.{i}."
    rules = [Rule("patch_embed.weight", ("patch_embed.proj.weight",), "replicated", "conv_linear")]
    for suffix in ("weight", "bias"):
        rules += [
            Rule(layer + f"self_attention.linear_qkv.{suffix}", (block + f"attn.qkv.{suffix}",), "column", "fused_qkv"),
            Rule(layer + f"self_attention.linear_proj.{suffix}", (block + f"attn.proj.{suffix}",), "row"),
            Rule(layer + f"mlp.linear_fc1.{suffix}",
                 (block + f"mlp.gate_proj.{suffix}", block + f"mlp.up_proj.{suffix}"), "column", "gate_up"),
            Rule(layer + f"mlp.linear_fc2.{suffix}", (block + f"mlp.down_proj.{suffix}",), "row"),
            Rule(f"merger.linear_fc1.{suffix}", (f"merger.mlp.0.{suffix}",), "column"),
            Rule(f"merger.linear_fc2.{suffix}", (f"merger.mlp.2.{suffix}",), "row"),
        ]
    rules += [
        Rule(layer + "input_layernorm.weight", (block + "norm1.weight",)),
        Rule(layer + "pre_mlp_layernorm.weight", (block + "norm2.weight",)),
        Rule("merger.norm.weight", ("merger.ln_q.weight",)),
    ]
    return [Rule(r.megatron, r.hf, r.shard, r.layout, "vision") for r in rules]
# ===================== END VISION SECTION ====================================================


def all_rules(cfg: Qwen2_5_VLConfig, with_vision: bool = True) -> list[Rule]:
    """Every rule, layer-expanded: one Rule per Megatron parameter of the full model."""
    out = []
    for rule in lm_rules(cfg):
        out += [rule.at(i) for i in range(cfg.num_hidden_layers)] if "{i}" in rule.megatron else [rule]
    if with_vision:
        for rule in vision_rules(cfg):
            rule = Rule(VISION_PREFIX + rule.megatron, tuple(HF_VISION_PREFIX + h for h in rule.hf),
                        rule.shard, rule.layout, "vision")
            out += [rule.at(i) for i in range(cfg.vision.depth)] if "{i}" in rule.megatron else [rule]
    return out


def hf_hub_name(name: str) -> str:
    """transformers-5 in-memory names (`model.language_model.*`, `model.visual.*`) -> hub layout."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return HF_VISION_PREFIX + name[len("model.visual."):]
    return name


# ---------------------------------------------------------------- layouts
def split_dim(rule: Rule, ndim: int) -> int | None:
    """The dimension of an `ndim`-d tensor that TP splits, or None for one every rank holds whole
    (replicated tensors and row-parallel biases)."""
    if rule.shard == "replicated" or (rule.shard == "row" and ndim == 1):
        return None
    return 1 if rule.shard == "row" else 0


def head_counts(cfg: Qwen2_5_VLConfig, scope: str) -> tuple[int, int, int]:
    """(query heads, kv groups, head_dim) for the rule's scope."""
    if scope == "vision":
        return cfg.vision.num_heads, cfg.vision.num_heads, cfg.vision.head_dim
    return cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim


def to_megatron(rule: Rule, hf_tensors: list[torch.Tensor], cfg: Qwen2_5_VLConfig) -> torch.Tensor:
    """HF tensor(s) of a rule -> the Megatron full tensor (unpadded, unsharded)."""
    if rule.layout == "plain":
        return hf_tensors[0]
    if rule.layout == "gate_up":
        return torch.cat(hf_tensors, dim=0)
    if rule.layout == "conv_linear":
        return hf_tensors[0].flatten(1)
    heads, groups, head_dim = head_counts(cfg, rule.scope)
    q, k, v = hf_tensors[0].chunk(3, dim=0) if rule.layout == "fused_qkv" else hf_tensors
    rest = q.shape[1:]
    per_group = heads // groups
    q = q.reshape(groups, per_group * head_dim, *rest)
    k, v = k.reshape(groups, head_dim, *rest), v.reshape(groups, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def to_hf(rule: Rule, full: torch.Tensor, cfg: Qwen2_5_VLConfig) -> list[torch.Tensor]:
    """The Megatron full tensor (unpadded) -> the rule's HF tensor(s); inverse of `to_megatron`."""
    return shards_to_hf(rule, [full], cfg)


def shards_to_hf(rule: Rule, shards: list[torch.Tensor], cfg: Qwen2_5_VLConfig) -> list[torch.Tensor]:
    """All TP ranks' Megatron shards (in rank order; vocab rows padded or not) -> the HF tensor(s)."""
    outs = [torch.empty(shape, dtype=shards[0].dtype, device=shards[0].device)
            for shape in hf_shapes(rule, tuple(shards[0].shape), len(shards), cfg)]
    for tp_rank, local in enumerate(shards):
        write_hf_shard(rule, local, tp_rank, len(shards), cfg, outs)
    return outs


def hf_shapes(rule: Rule, shard_shape: tuple[int, ...], tp_size: int, cfg: Qwen2_5_VLConfig) -> list[tuple[int, ...]]:
    """Shapes of the rule's HF tensors, from the shape of one TP rank's Megatron shard."""
    rest = tuple(shard_shape[1:])
    if rule.layout == "conv_linear":
        v = cfg.vision
        return [(shard_shape[0], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)]
    dim = split_dim(rule, len(shard_shape))
    if dim is None:
        return [tuple(shard_shape)]
    if dim == 1:
        return [(shard_shape[0], shard_shape[1] * tp_size, *shard_shape[2:])]
    if rule.shard == "vocab":
        return [(cfg.vocab_size, *rest)]
    rows = shard_shape[0] * tp_size
    if rule.layout == "gate_up":
        return [(rows // 2, *rest)] * 2
    if rule.layout == "qkv":
        heads, groups, head_dim = head_counts(cfg, rule.scope)
        return [(heads * head_dim, *rest), (groups * head_dim, *rest), (groups * head_dim, *rest)]
    return [(rows, *rest)]


def write_hf_shard(rule: Rule, local: torch.Tensor, tp_rank: int, tp_size: int, cfg: Qwen2_5_VLConfig,
                   outs: list[torch.Tensor]) -> None:
    """Copy TP rank `tp_rank`'s Megatron shard `local` into its part of the rule's HF tensors `outs`
    (contiguous, shapes from `hf_shapes`; e.g. views of a transfer buffer, cast on copy). Every rank
    writes a disjoint part (a tensor every rank holds whole: rank 0 writes it), so the ranks together
    fill `outs` exactly, in any order, with no temporary."""
    dim = split_dim(rule, local.dim())
    if dim is None:
        if tp_rank == 0:
            outs[0].view(local.shape).copy_(local)  # conv_linear: the Conv3d weight viewed as the linear one
        return
    if dim == 1:
        n = local.shape[1]
        outs[0][:, tp_rank * n:(tp_rank + 1) * n].copy_(local)
        return
    n = local.shape[0]
    if rule.shard == "vocab":  # Megatron's padding rows (beyond the true vocabulary) are dropped
        lo, hi = tp_rank * n, min((tp_rank + 1) * n, outs[0].shape[0])
        if hi > lo:
            outs[0][lo:hi].copy_(local[:hi - lo])
        return
    if rule.layout == "gate_up":  # a shard is [gate_r; up_r]
        for out, half in zip(outs, local.chunk(2, dim=0)):
            out[tp_rank * (n // 2):(tp_rank + 1) * (n // 2)].copy_(half)
        return
    if rule.layout == "plain":
        outs[0][tp_rank * n:(tp_rank + 1) * n].copy_(local)
        return
    # qkv: the shard holds KV groups [r*g, (r+1)*g), each [its q heads; k; v]
    heads, groups, head_dim = head_counts(cfg, rule.scope)
    per_group, local_groups, rest = heads // groups, groups // tp_size, local.shape[1:]
    parts = local.reshape(local_groups, (per_group + 2) * head_dim, *rest).split(
        [per_group * head_dim, head_dim, head_dim], dim=1)
    if rule.layout == "fused_qkv":  # HF's one tensor [q; k; v]
        outs = list(outs[0].split([heads * head_dim, groups * head_dim, groups * head_dim], dim=0))
    for out, part in zip(outs, parts):
        out.view(groups, -1, *rest)[tp_rank * local_groups:(tp_rank + 1) * local_groups].copy_(part)


# ---------------------------------------------------------------- tensor-parallel sharding
def padded_vocab_size(vocab_size: int, tp_size: int, divisible_by: int = 128) -> int:
    """Megatron's padding: round up to a multiple of divisible_by * tp_size."""
    multiple = divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple


def shard(rule: Rule, full: torch.Tensor, tp_rank: int, tp_size: int, padded_vocab: int | None = None) -> torch.Tensor:
    """Megatron full tensor -> this TP rank's local shard (contiguous)."""
    dim = split_dim(rule, full.dim())
    if dim is None:
        return full.contiguous()
    if rule.shard == "vocab":
        if padded_vocab is None or padded_vocab < full.shape[0]:
            raise ValueError(f"{rule.megatron}: padded_vocab {padded_vocab} must be >= vocab {full.shape[0]}")
        full = torch.cat([full, full.new_zeros(padded_vocab - full.shape[0], *full.shape[1:])])
    if full.shape[dim] % tp_size:
        raise ValueError(f"{rule.megatron}: dim {dim} of size {full.shape[dim]} not divisible by tp {tp_size}")
    if rule.layout == "gate_up":
        return torch.cat([half.chunk(tp_size, dim)[tp_rank] for half in full.chunk(2, dim)], dim).contiguous()
    return full.chunk(tp_size, dim)[tp_rank].contiguous()


def unshard(rule: Rule, shards: list[torch.Tensor], true_vocab: int | None = None) -> torch.Tensor:
    """All TP ranks' shards (in rank order) -> the Megatron full tensor (vocab padding removed)."""
    dim = split_dim(rule, shards[0].dim())
    if dim is None:
        return shards[0]
    if rule.layout == "gate_up":
        halves = [s.chunk(2, dim) for s in shards]
        return torch.cat([torch.cat([h[j] for h in halves], dim) for j in (0, 1)], dim)
    full = torch.cat(shards, dim)
    return full[:true_vocab] if rule.shard == "vocab" else full


# transformer-engine specs fuse the LM pre-attention/pre-MLP norms into the next linear.
_TE_FUSED_NORMS = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                   "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


def te_name(name: str) -> str:
    """A local-spec Megatron LM name -> the transformer-engine-spec parameter name."""
    if name.startswith(LM_PREFIX):
        for local, te in _TE_FUSED_NORMS.items():
            if name.endswith("." + local):
                return name[: -len(local)] + te
    return name


def sharded_key(name: str) -> tuple[str, int | None]:
    """A full-model Megatron name -> (its key in megatron-core's torch_dist checkpoints, its index on
    their stacked layer axis or None). Checkpoints name the fused LM norms as transformer-engine specs
    do, whichever spec built the model (local specs map them: sharded_state_dict_keys_map)."""
    name = te_name(name)
    m = re.match(r"(.*\.decoder\.layers\.)(\d+)\.(.*)", name)
    if m:
        return m.group(1) + m.group(3), int(m.group(2))
    return name, None


def layer_index(name: str) -> int | None:
    """The layer/block index in a Megatron name (`...layers.{i}.` / `...blocks.{i}.`), or None."""
    m = re.search(r"\.(?:layers|blocks)\.(\d+)\.", name)
    return int(m.group(1)) if m else None
