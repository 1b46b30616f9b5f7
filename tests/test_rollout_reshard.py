"""Reshard Megatron train-TP shards to vLLM rollout-TP slices, checked against slicing the full HF
tensors the way vLLM's weight loaders do (written here from the HF side, independently)."""
import functools

import pytest
import torch

from megatron_papo.models.qwen2_5_vl import hf_mapping
from megatron_papo.models.qwen2_5_vl.flavors import get_flavor
from megatron_papo.rollout.reshard import ReshardPlan, vllm_padded_vocab, vllm_shard

# 8 query heads; KV heads 2 (so rollout TP 4 replicates KV heads) or 4 (so train TP 4 is allowed).
# vocab 1100: vLLM pads to 1152, Megatron to 1152 / 1280 / 1536 at TP 1 / 2 / 4.
FLAVOR_OVERRIDES = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=8,
                        mrope_section=(2, 3, 3), vocab_size=1100,
                        vision=dict(depth=1, hidden_size=64, intermediate_size=96, num_heads=4, fullatt_block_indexes=(0,)))


@functools.lru_cache(maxsize=None)
def hf_state(kv_heads: int):
    """Random full HF tensors (hub names) for the test flavor; every entry distinct."""
    import transformers

    cfg = get_flavor("tiny", num_key_value_heads=kv_heads, **FLAVOR_OVERRIDES)
    model = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**cfg.to_hf_dict()))
    gen = torch.Generator().manual_seed(kv_heads)
    state = {hf_mapping.hf_hub_name(k): torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
    return cfg, state


def vllm_reference(name: str, state: dict, cfg, j: int, r: int) -> torch.Tensor:
    """What vLLM rank j of r holds for the HF tensor `name` (q_proj stands for the fused qkv_proj,
    gate_proj for gate_up_proj), following vLLM 0.32's weight loaders."""
    def rows(t, lo, n):
        return t.narrow(0, lo, n)

    hd, heads, kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    if ".self_attn.q_proj." in name:
        q, k, v = (state[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj"))
        kv_head0, kv_n = (j * kv // r, kv // r) if kv >= r else (j // (r // kv), 1)
        return torch.cat([rows(q, j * heads // r * hd, heads // r * hd),
                          rows(k, kv_head0 * hd, kv_n * hd), rows(v, kv_head0 * hd, kv_n * hd)])
    if ".attn.qkv." in name:  # vision: fused [q; k; v], KV heads = heads
        q, k, v = state[name].chunk(3)
        n = q.shape[0] // r
        return torch.cat([rows(q, j * n, n), rows(k, j * n, n), rows(v, j * n, n)])
    if ".mlp.gate_proj." in name:
        gate, up = state[name], state[name.replace("gate_proj", "up_proj")]
        n = gate.shape[0] // r
        return torch.cat([rows(gate, j * n, n), rows(up, j * n, n)])
    if name.startswith("visual.merger.mlp.0."):  # ColumnParallelLinear
        n = state[name].shape[0] // r
        return rows(state[name], j * n, n)
    if any(s in name for s in (".o_proj.", ".down_proj.", ".attn.proj.", "merger.mlp.2.")):  # RowParallelLinear
        t = state[name]
        if t.dim() == 1:
            return t  # bias: whole on every rank
        n = t.shape[1] // r
        return t.narrow(1, j * n, n)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):  # VocabParallelEmbedding / ParallelLMHead
        t = state[name]
        padded = torch.cat([t, t.new_zeros(vllm_padded_vocab(t.shape[0]) - t.shape[0], t.shape[1])])
        n = padded.shape[0] // r
        return rows(padded, j * n, n)
    return state[name]  # norms, patch embedding: replicated


CASES = [(kv, t, r) for kv in (2, 4) for t in (1, 2, 4) for r in (1, 2, 4) if t <= kv]


@pytest.mark.parametrize("kv_heads,train_tp,rollout_tp", CASES)
def test_reshard_equals_vllm_slicing_of_full_tensors(kv_heads, train_tp, rollout_tp):
    cfg, state = hf_state(kv_heads)
    rules = hf_mapping.all_rules(cfg)
    padded = hf_mapping.padded_vocab_size(cfg.vocab_size, train_tp)
    shards = {}
    for rule in rules:
        full = hf_mapping.to_megatron(rule, [state[h] for h in rule.hf], cfg)
        shards[rule.megatron] = [hf_mapping.shard(rule, full, i, train_tp, padded) for i in range(train_tp)]
    plan = ReshardPlan(rules, {n: s[0].shape for n, s in shards.items()}, cfg, train_tp, rollout_tp,
                       element_size=4)
    kinds_seen = set()
    for rule in rules:
        kinds_seen.add((rule.shard, rule.layout, shards[rule.megatron][0].dim()))
        for j in range(rollout_tp):
            sources = plan.sources(rule.megatron, j)
            got = vllm_shard(rule, cfg, {i: shards[rule.megatron][i] for i in sources}, train_tp, j, rollout_tp)
            want = vllm_reference(rule.hf[0], state, cfg, j, rollout_tp)
            assert got.shape == want.shape, (rule.megatron, j, got.shape, want.shape)
            assert torch.equal(got, want), (rule.megatron, j)
            # bytes planned = the vLLM shard minus vLLM's zero vocab padding
            planned = sum(tr.numel for tr in plan.transfers[rule.megatron] if tr.dst == j)
            pad_rows = max(0, min(want.shape[0] * (j + 1), vllm_padded_vocab(cfg.vocab_size))
                           - max(cfg.vocab_size, want.shape[0] * j)) if rule.shard == "vocab" else 0
            assert planned == want.numel() - pad_rows * (want.numel() // want.shape[0]), rule.megatron
            # the simple source pattern (vocab differs: Megatron and vLLM pad the vocabulary differently)
            if rule.shard not in ("replicated", "vocab") and not (rule.shard == "row" and want.dim() == 1):
                if rollout_tp <= train_tp:
                    assert sources == list(range(j * train_tp // rollout_tp, (j + 1) * train_tp // rollout_tp))
                if rollout_tp >= train_tp:
                    assert sources == [j // (rollout_tp // train_tp)]
    # every parameter kind is covered: qkv / fused qkv (weight, bias), gate_up (2-D, 1-D), column,
    # row (weight, replicated bias), vocab, replicated (norm, conv patch embedding)
    assert kinds_seen >= {("column", "qkv", 2), ("column", "qkv", 1), ("column", "fused_qkv", 2),
                          ("column", "fused_qkv", 1), ("column", "gate_up", 2), ("column", "gate_up", 1),
                          ("column", "plain", 2), ("column", "plain", 1), ("row", "plain", 2), ("row", "plain", 1),
                          ("vocab", "plain", 2), ("replicated", "plain", 1), ("replicated", "conv_linear", 2)}
    total_received = sum(plan.bytes_received(j) for j in range(rollout_tp))
    assert total_received == sum(plan.bytes_sent(i) for i in range(train_tp))


def test_plan_bytes_for_a_7b_layer():
    """Documented figure: one 7B LM layer's qkv, train TP 4 -> rollout TP 2, bf16."""
    cfg = get_flavor("7B")
    rule = next(r for r in hf_mapping.lm_rules(cfg) if r.megatron.endswith("linear_qkv.weight")).at(0)
    qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    plan = ReshardPlan([rule], {rule.megatron: (qkv_rows // 4, cfg.hidden_size)}, cfg, 4, 2)
    assert plan.sources(rule.megatron, 0) == [0, 1] and plan.sources(rule.megatron, 1) == [2, 3]
    assert plan.bytes_received(0) == qkv_rows // 2 * cfg.hidden_size * 2
    assert plan.bytes_sent(3) == qkv_rows // 4 * cfg.hidden_size * 2
