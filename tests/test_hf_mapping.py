"""hf_mapping's per-rank writer: each TP rank's Megatron shard written into its part of the HF tensors
(as weight sync does into a transfer buffer) rebuilds the HF tensors exactly, for every rule kind.
The shards come from the load path (to_megatron + shard), which is checked against transformers'
forward elsewhere (test_model_parity), so this is the inverse checked against an independent path."""
import functools

import pytest
import torch

from megatron_papo.models.qwen2_5_vl import hf_mapping
from megatron_papo.models.qwen2_5_vl.flavors import get_flavor

# 8 query heads / 4 KV heads (LM), 4 vision heads; vocab 1100 is padded by Megatron at every TP.
CFG = get_flavor("tiny", hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=8,
                 num_key_value_heads=4, mrope_section=(2, 3, 3), vocab_size=1100, tie_word_embeddings=False,
                 vision=dict(depth=1, hidden_size=64, intermediate_size=96, num_heads=4, fullatt_block_indexes=(0,)))



@pytest.mark.parametrize("tp", [1, 2, 4])
def test_ranks_writing_their_shards_rebuild_the_hf_tensors(tp):
    gen = torch.Generator().manual_seed(tp)
    padded = hf_mapping.padded_vocab_size(CFG.vocab_size, tp)
    kinds = set()
    for rule in hf_mapping.all_rules(CFG):
        hf = [torch.randn(shape, generator=gen) for shape in hf_shapes_from_transformers(rule)]
        full = hf_mapping.to_megatron(rule, hf, CFG)
        shards = [hf_mapping.shard(rule, full, r, tp, padded) for r in range(tp)]
        assert hf_mapping.hf_shapes(rule, tuple(shards[0].shape), tp, CFG) == [tuple(t.shape) for t in hf], rule
        buffer = torch.full((sum(t.numel() for t in hf),), float("nan"), dtype=torch.float64)
        outs, offset = [], 0
        for t in hf:  # views of one flat buffer, as in a transfer bucket; cast on copy
            outs.append(buffer[offset:offset + t.numel()].view(t.shape))
            offset += t.numel()
        for r in reversed(range(tp)):  # any order: the ranks' parts are disjoint
            hf_mapping.write_hf_shard(rule, shards[r], r, tp, CFG, outs)
        for out, expected in zip(outs, hf):
            assert torch.equal(out, expected.double()), rule.megatron
        assert torch.equal(torch.cat([t.flatten() for t in hf_mapping.shards_to_hf(rule, shards, CFG)]),
                           torch.cat([t.flatten() for t in hf])), rule.megatron
        kinds.add((rule.shard, rule.layout, len(hf[0].shape)))
    assert {("vocab", "plain", 2), ("column", "qkv", 2), ("column", "qkv", 1), ("column", "fused_qkv", 2),
            ("column", "gate_up", 2), ("column", "gate_up", 1), ("row", "plain", 2), ("row", "plain", 1),
            ("column", "plain", 2), ("replicated", "conv_linear", 5), ("replicated", "plain", 1)} <= kinds


@functools.lru_cache(maxsize=None)
def transformers_shapes() -> dict[str, tuple[int, ...]]:
    import transformers

    model = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**CFG.to_hf_dict()))
    return {hf_mapping.hf_hub_name(k): tuple(v.shape) for k, v in model.state_dict().items()}


def hf_shapes_from_transformers(rule):
    """The rule's HF shapes as transformers builds them (independent of hf_shapes)."""
    return [transformers_shapes()[name] for name in rule.hf]
