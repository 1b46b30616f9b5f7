"""scaling.py: per-rank parameter counts against an independent split of the HF model's own tensors,
memory bookkeeping against the published bytes-per-parameter rules, the GPU-count search, the
weight-sync totals, and docs/scaling.md against tools/plan_memory.py's current output."""
import importlib.util
import re
from pathlib import Path

import pytest

from megatron_papo.models.qwen2_5_vl.flavors import PUBLISHED_PARAM_COUNTS, get_flavor
from megatron_papo.models.qwen2_5_vl.scaling import (
    RECOMMENDED_72B_LAYOUT,
    Layout,
    RolloutSetup,
    TrainingSetup,
    busiest_stage,
    candidate_layouts,
    fits,
    naive_sync_traffic,
    plan_memory,
    smallest_gpu_count,
    stage_params,
    vllm_bytes,
    weight_sync_traffic,
)

REPO = Path(__file__).resolve().parent.parent

# Megatron TP rules by HF tensor name, written out independently of scaling.py's closed forms.
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "attn.qkv", "merger.mlp.0")
ROW_PARALLEL = ("o_proj", "down_proj", "attn.proj", "merger.mlp.2")
VOCAB_PARALLEL = ("embed_tokens", "lm_head")


def split_hf_tensors(flavor: str, tp: int, pp: int, vision_on_first_stage: bool = True, **overrides):
    """Per stage: (params one TP rank holds, of which replicated) from the HF model's parameters."""
    torch = pytest.importorskip("torch")
    from transformers import Qwen2_5_VLConfig as HFConfig
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = get_flavor(flavor, **overrides)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(HFConfig(**cfg.to_hf_dict()))
    offset = 0 if vision_on_first_stage else 1
    n_stages = pp + offset
    rank, replicated = [0] * n_stages, [0] * n_stages
    layers_per_stage = cfg.num_hidden_layers // pp
    for name, p in model.named_parameters():
        shape = list(p.shape)
        if ".visual." in name:
            stage = 0
        elif "embed_tokens" in name:
            stage = offset
        elif ".layers." in name:
            stage = offset + int(re.search(r"\.layers\.(\d+)\.", name).group(1)) // layers_per_stage
        else:  # final norm, lm_head
            stage = n_stages - 1
        module = name.rsplit(".", 1)[0]
        if any(module.endswith(k) for k in VOCAB_PARALLEL):
            step = 128 * tp
            shape[0] = -(-shape[0] // step) * step // tp
        elif any(module.endswith(k) for k in COLUMN_PARALLEL):
            assert shape[0] % tp == 0, name
            shape[0] //= tp
        elif any(module.endswith(k) for k in ROW_PARALLEL) and name.endswith("weight"):
            assert shape[1] % tp == 0, name
            shape[1] //= tp
        else:
            replicated[stage] += p.numel()
        rank[stage] += int(torch.Size(shape).numel())
    if cfg.tie_word_embeddings and pp > 1:  # megatron keeps the tied embedding on the last stage too
        step = 128 * tp
        rank[-1] += -(-cfg.vocab_size // step) * step // tp * cfg.hidden_size
    return rank, replicated


@pytest.mark.parametrize("flavor,tp,pp,vision_first,overrides", [
    ("tiny", 2, 2, True, {}),
    ("tiny", 2, 2, False, {}),
    ("tiny", 2, 4, True, {"tie_word_embeddings": True, "vocab_size": 1000}),   # tied copy + padding
    ("72B", 8, 4, True, {}),
])
def test_stage_params_match_split_hf_tensors(flavor, tp, pp, vision_first, overrides):
    cfg = get_flavor(flavor, **overrides)
    stages = stage_params(cfg, Layout(tp, pp, vision_on_first_stage=vision_first))
    rank, replicated = split_hf_tensors(flavor, tp, pp, vision_first, **overrides)
    assert [st.rank_params for st in stages] == rank
    assert [st.replicated for st in stages] == replicated
    assert sum(st.unique_params(tp) for st in stages) == cfg.param_count()


def test_72b_tp8_pp4_multiplies_back_to_published_total():
    cfg, tp = get_flavor("72B"), 8
    stages = stage_params(cfg, Layout(tp, 4))
    padded_vocab = 152576                                  # 152064 rounded up to a multiple of 128 * 8
    assert [st.padding for st in stages] == [(padded_vocab - 152064) * 8192, 0, 0, (padded_vocab - 152064) * 8192]
    total = sum(tp * st.rank_params - (tp - 1) * st.replicated - st.padding for st in stages)
    assert total == PUBLISHED_PARAM_COUNTS["72B"] == 73_410_777_344


def test_optimizer_bytes_per_param_follow_megatron_table():
    """Megatron's distributed-optimizer doc: bf16 params + fp32 grads = 18 bytes/param unsharded,
    6 + 12/d sharded over d DP ranks; ZeRO's 16 bytes/param is the bf16-grad case."""
    cfg = get_flavor("72B")
    no_ref = dict(reference_on_cpu=True)
    for dp, dist, grad_bytes, expect in [(1, False, 4, 18), (4, False, 4, 18), (4, True, 4, 6 + 12 / 4),
                                         (2, True, 4, 12), (1, False, 2, 16)]:
        setup = TrainingSetup(distributed_optimizer=dist, grad_bytes=grad_bytes, **no_ref)
        for st in plan_memory(cfg, Layout(8, 4, dp), setup):
            assert st.resident == pytest.approx(expect * st.params)
    with_ref = plan_memory(cfg, Layout(8, 4, 1))[0]
    assert with_ref.reference_bf16 == 2 * with_ref.params


def test_activation_terms():
    cfg = get_flavor("72B")
    s, h, t = 6144, 8192, 8
    first, *_, last = plan_memory(cfg, Layout(t, 4, 1))
    # first stage: 4 micro-batches in flight, 20 LM layers + 32 ViT blocks (5120 patches of width 1280)
    assert first.act_checkpoints == pytest.approx(4 * 2 * (20 * s * h + 32 * 5120 * 1280) / t)
    assert first.act_recompute == pytest.approx(34 * s * h / t)
    no_flash = plan_memory(cfg, Layout(t, 4, 1), TrainingSetup(flash_attention=False))[0]
    assert no_flash.act_recompute == pytest.approx(s * h * (34 + 5 * 64 * s / h) / t)
    assert first.logits == 0 and last.act_checkpoints == pytest.approx(2 * 20 * s * h / t)
    vocab_rank = 152576 // t
    window = 2048 + 2 * t - 1  # logits from the prompt's last token on: the response, start and end rounded to TP (SP)
    assert last.logits == pytest.approx(2 * window * vocab_rank * 2 + 4 * 1024 * vocab_rank * 4)
    two = plan_memory(cfg, Layout(t, 4, 1), TrainingSetup(micro_batch=2))[-1]  # b > 1: bounded by s
    assert two.logits == pytest.approx(2 * s * 2 * vocab_rank * 2 + 4 * 1024 * vocab_rank * 4)


def test_smallest_gpu_count_is_minimal():
    cfg = get_flavor("72B")
    for sleep in (True, False):
        layout, top = smallest_gpu_count(cfg, 80e9, 0.10, sleep)
        stages = plan_memory(cfg, layout)
        assert top == busiest_stage(stages, sleep)
        assert all(fits(st.peak(sleep), 80e9, 0.10) for st in stages)
        smaller = [lay for lay in candidate_layouts(cfg) if lay.world < layout.world]
        assert smaller, "the search must have had smaller candidates"
        for lay in smaller:
            assert not fits(busiest_stage(plan_memory(cfg, lay), sleep).peak(sleep), 80e9, 0.10), lay
    # sleep mode frees vLLM memory during training, so it never needs more GPUs
    assert smallest_gpu_count(cfg, sleep_mode=True)[0].world <= smallest_gpu_count(cfg, sleep_mode=False)[0].world


def test_recommended_layout_fits_with_and_without_sleep_mode():
    cfg = get_flavor("72B")
    stages = plan_memory(cfg, RECOMMENDED_72B_LAYOUT)
    assert RECOMMENDED_72B_LAYOUT.tp == 8  # TP stays inside an 8-GPU NVLink node
    for sleep in (True, False):
        assert fits(busiest_stage(stages, sleep).peak(sleep), 80e9, 0.10)
    for mode in ("reference", "exact"):
        exact = plan_memory(cfg, RECOMMENDED_72B_LAYOUT, TrainingSetup(papo_mode=mode))
        assert fits(busiest_stage(exact, False).peak(False), 80e9, 0.10)


def test_weight_sync_bytes():
    cfg = get_flavor("72B")
    full = PUBLISHED_PARAM_COUNTS["72B"] * 2
    train = Layout(8, 4)
    for r in (8, 4):
        t = weight_sync_traffic(cfg, train, r)
        # every vLLM rank receives exactly its 1/r slice; at r=8 a train rank keeps its own shard locally
        assert t.received == pytest.approx(full / r)
        assert t.received_same_gpu + t.received_nvlink + t.received_ib == pytest.approx(t.received)
    r8 = weight_sync_traffic(cfg, train, 8)
    assert r8.received_nvlink == 0          # TP index matches: shards come from the same GPU or over IB
    # the busiest sender is a first-stage rank: its (largest) shard goes to the three other nodes
    first_shard = stage_params(cfg, train)[0].unique_params(8) * 2 / 8
    assert r8.sent == pytest.approx(3 * first_shard)
    assert r8.seconds == pytest.approx(max(r8.received_ib, r8.sent) / 50e9)
    naive = naive_sync_traffic(cfg, train, 8)
    assert naive.sent == full and naive.received == pytest.approx(full * 31 / 32)
    assert naive.seconds > 10 * r8.seconds


def _load_plan_memory_tool():
    spec = importlib.util.spec_from_file_location("plan_memory", REPO / "tools" / "plan_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_doc_tables_equal_tool_output():
    doc = (REPO / "docs" / "scaling.md").read_text()
    m = re.search(r"<!-- BEGIN python tools/plan_memory.py --flavor 72B -->\n(.*?)<!-- END -->", doc, re.S)
    assert m, "docs/scaling.md lost its generated block markers"
    assert m.group(1) == _load_plan_memory_tool().render("72B"), \
        "docs/scaling.md is stale: paste the output of `python tools/plan_memory.py --flavor 72B`"
    assert f"**{RECOMMENDED_72B_LAYOUT}**" in doc


def test_doc_prose_numbers_are_computed():
    """Every number docs/scaling.md states in prose, rebuilt here from the code."""
    doc = (REPO / "docs" / "scaling.md").read_text()
    cfg, gb = get_flavor("72B"), 1e9
    rec = plan_memory(cfg, RECOMMENDED_72B_LAYOUT)
    small_layout, small_top = smallest_gpu_count(cfg, sleep_mode=True)
    first, mid, *_ = stage_params(cfg, Layout(8, 4))
    kv_tokens, seq = 262144, 6144
    kv_per_token_gpu = 2 * 80 * 1 * 128 * 2                     # layers, 8 kv heads / TP8, head_dim, bf16
    assert vllm_bytes(cfg, RolloutSetup())[1] == kv_tokens * kv_per_token_gpu
    phrases = [
        f"peaks at {busiest_stage(rec, True).peak(True) / gb:.1f} GB with sleep mode and "
        f"{busiest_stage(rec, False).peak(False) / gb:.1f} GB without",
        f"The smallest layout that fits is {small_layout} ({small_layout.world} GPUs)",
        f"at {small_top.peak(True) / gb:.1f} of {0.9 * 80:.0f} GB",
        f"{first.rank_params / 1e9:.2f} B parameters per GPU against {mid.rank_params / 1e9:.2f} B",
        "152,064 -> 152,576 at t=8, i.e. 512 padding rows",
        f"({kv_per_token_gpu // 1024} KiB per token per GPU at r=8)",
        f"{kv_tokens:,} tokens per engine ({kv_tokens // seq} full {seq}-token sequences)",
        f"bf16 weights, {PUBLISHED_PARAM_COUNTS['72B'] * 2 / gb:.1f} GB for 72B",
        f"cannot hold {PUBLISHED_PARAM_COUNTS['72B'] * 2 / gb:.1f} GB on an 80 GB GPU",
        f"every rank receives all {PUBLISHED_PARAM_COUNTS['72B'] * 2 / gb:.1f} GB",
        # the implemented broadcast route at TP8xPP4: each rank receives the other 3 of 4 stages
        f"3/4 x {PUBLISHED_PARAM_COUNTS['72B'] * 2 / gb:.1f} = {0.75 * PUBLISHED_PARAM_COUNTS['72B'] * 2 / gb:.0f} GB",
        f"at most 90% of 80 GB = {0.9 * 80:.0f} GB; the 10% ({0.1 * 80:.0f} GB)",
    ]
    for phrase in phrases:
        assert phrase in " ".join(doc.split()), phrase
    small = plan_memory(cfg, small_layout)                      # "and only with sleep mode"
    assert not fits(busiest_stage(small, False).peak(False), 80e9, 0.10)
    pp8 = plan_memory(cfg, Layout(8, 8, 1))                     # "TP8xPP8xDP1 fits too, with a lower peak"
    assert fits(busiest_stage(pp8, False).peak(False), 80e9, 0.1)
    assert busiest_stage(pp8, True).peak(True) < busiest_stage(rec, True).peak(True)
    tp4 = plan_memory(cfg, Layout(4, 8, 1))                     # "TP4xPP8 does not fit at 32 GPUs"
    assert not fits(busiest_stage(tp4, True).peak(True), 80e9, 0.1)
    assert 152576 == -(-152064 // 1024) * 1024 and 152576 - 152064 == 512
