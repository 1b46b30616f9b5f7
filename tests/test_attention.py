"""TorchAttention (the plain-torch specs' core attention) against a plain softmax(QK^T)V written out,
values and gradients: causal with grouped query heads, megatron's boolean mask, and segments."""
import math

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_papo.models.qwen2_5_vl.attention import TorchAttention


def config(heads, groups, head_dim=8, **options):
    return TransformerConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
                             num_query_groups=groups, kv_channels=head_dim, **{"attention_dropout": 0.0, **options})


def plain(q, k, v, masked):
    """q [s, b, h, d], k / v [s, b, g, d], masked [b, 1, s, s] True = masked out -> [s, b, h*d]."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(q.shape[-1])
    probs = scores.masked_fill(masked, float("-inf")).softmax(-1)
    return torch.einsum("bhst,tbhd->sbhd", probs, v).flatten(2)


def check(module, inputs, reference_mask, mask_arg):
    inputs = [x.clone().requires_grad_() for x in inputs]
    copies = [x.detach().clone().requires_grad_() for x in inputs]
    out = module(*inputs, mask_arg)
    ref = plain(*copies, reference_mask)
    weight = torch.randn_like(ref)
    (out * weight).sum().backward()
    (ref * weight).sum().backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    for x, y in zip(inputs, copies):
        assert y.grad.abs().max() > 0
        torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=1e-5)


def qkv(s, b, heads, groups, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, b, n, d, generator=g) for n in (heads, groups, groups)]


def test_causal_with_grouped_query_heads():
    module = TorchAttention(config(4, 2), 1, AttnMaskType.causal, "self")
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1)[None, None]
    check(module, qkv(7, 3, 4, 2), causal, None)


def test_boolean_mask_true_is_masked_out():
    module = TorchAttention(config(2, 2), 1, AttnMaskType.causal, "self")
    mask = torch.ones(7, 7, dtype=torch.bool).triu(1)[None, None].repeat(2, 1, 1, 1)
    mask[1, :, :, :3] = True  # left padding of the second sample ...
    mask[1, :, :3, :3] = torch.ones(3, 3, dtype=torch.bool).triu(1)  # ... whose pad rows see themselves
    check(module, qkv(7, 2, 2, 2), mask, mask)


@pytest.mark.parametrize("lengths", [[4, 4, 4], [3, 5, 3, 1, 5]], ids=["one_length", "mixed"])
def test_segments_attend_within_themselves(lengths):
    module = TorchAttention(config(2, 2), 1, AttnMaskType.padding, "self")
    segments = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    blocks = (segments[:, None] != segments[None, :])[None, None]
    check(module, qkv(sum(lengths), 1, 2, 2), blocks, segments)


@pytest.mark.parametrize("options", [{"attention_dropout": 0.1}, {"softmax_type": "off-by-one"},
                                     {"apply_query_key_layer_scaling": True, "fp16": True}],
                         ids=["dropout", "softmax_type", "qk_layer_scaling"])
def test_refuses_what_it_does_not_implement(options):
    with pytest.raises(ValueError, match="attention_dropout=0, context_parallel_size=1"):
        TorchAttention(config(2, 2, **options), 1, AttnMaskType.causal, "self")


def test_padding_type_takes_segment_ids_only():
    module = TorchAttention(config(2, 2), 1, AttnMaskType.padding, "self")
    q, k, v = qkv(4, 1, 2, 2)
    for mask in (None, torch.zeros(1, 1, 4, 4, dtype=torch.bool)):
        with pytest.raises(ValueError, match="segment id"):
            module(q, k, v, mask)
