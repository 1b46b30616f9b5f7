"""Core attention of the plain-torch (no transformer-engine) specs, on torch's fused
`scaled_dot_product_attention`.

megatron's own local `DotProductAttention` materialises the [b, heads, s, s] scores and softmax
(and a dense boolean mask), and has no variable-length form. This module takes the same inputs and
lets torch pick its fused kernel (on CPU the profile shows its flash kernel; on GPU torch chooses
among its fused kernels, not measured here: no GPU was lent):
- the language model: causal (attn_mask_type causal, attention_mask None), or megatron's boolean
  mask [b, 1, sq, sk] with True = masked out;
- the vision tower (attn_mask_type padding): `segments`, each row's segment id [s] (rows of a segment are contiguous): a row
  attends within its segment only (a window or a whole image). Segments of equal length run as one
  batch, so the work is that of the segments, not of the dense [s, s] block-diagonal.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class TorchAttention(MegatronModule):
    """Drop-in core attention (megatron's constructor and forward signature): query [sq, b, np, hn],
    key / value [sk, b, ng, hn] -> context [sq, b, np * hn]."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout or config.context_parallel_size != 1 or config.softmax_type != "vanilla" \
                or config.apply_query_key_layer_scaling:
            raise ValueError("TorchAttention supports attention_dropout=0, context_parallel_size=1, "
                             "softmax_type='vanilla' and no query-key layer scaling (Qwen2.5-VL's settings); "
                             "use the transformer-engine spec for others")
        self.attn_mask_type = attn_mask_type
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("TorchAttention takes no packed_seq_params or attention_bias")
        mask_type = attn_mask_type or self.attn_mask_type
        if mask_type == AttnMaskType.padding:  # the ViT's spans
            if attention_mask is None or attention_mask.dim() != 1:
                raise ValueError("TorchAttention with attn_mask_type padding takes each row's segment id [s] "
                                 f"as attention_mask, got {None if attention_mask is None else tuple(attention_mask.shape)}")
            return self._segments(query, key, value, attention_mask)
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, hn]
        mask = None if attention_mask is None else ~attention_mask
        causal = attention_mask is None and mask_type == AttnMaskType.causal
        out = self._sdpa(q, k, v, mask, causal)
        return out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)

    def _sdpa(self, q, k, v, mask, causal):
        # [..., heads, s, hn]: fewer key/value heads than query heads is grouped-query attention
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
                                              enable_gqa=k.shape[-3] != q.shape[-3])

    def _segments(self, query, key, value, segments):
        """Block-diagonal attention of contiguous segments ([s, b=1, heads, hn] inputs)."""
        if query.shape[1] != 1:
            raise ValueError(f"segment attention takes one packed sequence (b=1), got b={query.shape[1]}")
        q, k, v = (x.squeeze(1) for x in (query, key, value))  # [s, heads, hn]
        lengths = torch.unique_consecutive(segments, return_counts=True)[1]
        starts = F.pad(lengths.cumsum(0)[:-1], (1, 0))
        distinct = lengths.unique().tolist()
        if len(distinct) == 1:  # one size (all windows full, or one image): a view, no gather
            n, length = len(lengths), distinct[0]
            qs, ks, vs = (x.view(n, length, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
            return self._sdpa(qs, ks, vs, None, False).transpose(1, 2).reshape(q.shape[0], 1, -1)
        out = torch.empty_like(q)
        for length in distinct:
            rows = (starts[lengths == length, None] + torch.arange(length, device=q.device)).flatten()
            n = rows.numel() // length
            qs, ks, vs = (x[rows].view(n, length, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
            out[rows] = self._sdpa(qs, ks, vs, None, False).transpose(1, 2).reshape(-1, *q.shape[1:])
        return out.reshape(q.shape[0], 1, -1)
