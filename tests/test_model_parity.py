"""Megatron Qwen2.5-VL vs transformers (fp32, tiny flavor, images of different sizes): logits at
TP1PP1/TP2PP1/TP1PP2/TP2PP2 (+SP, +recompute) within 1e-4, grads equal TP1PP1's and transformers' within
1e-5 of each tensor's own largest grad, also with logits from a middle position on only; the
recompute layout really re-runs every layer's forward;
mrope position ids equal transformers' get_rope_index; spec selection picks local without TE."""
import re

import pytest
import torch

from megatron_papo.models.qwen2_5_vl.flavors import get_flavor
from megatron_papo.models.qwen2_5_vl.rope import mrope_position_ids
from megatron_papo.parallel.backend import te_available, use_transformer_engine
from tests.distributed import run_distributed
from tests.helpers_hf import save_tiny_hf_folder, tiny_hf_model


def test_parallel_layouts_match_transformers(tmp_path):
    hf_dir = save_tiny_hf_folder(tmp_path / "hf")
    out = run_distributed("tests/dist/model_parity.py", 4, args=(hf_dir,), timeout=500)
    # ranks print concurrently, so a line may run straight into another rank's text: match the number only
    diffs = [float(x) for x in re.findall(r"max_abs_logit_diff_vs_hf=(\d+(?:\.\d*)?(?:e[-+]?\d+)?)", out)]
    # every last-stage rank prints: 4 + 4 + 2 + 2 + 4 (SP) + 2 (recompute), for all positions and
    # again for logits from a middle position on (with its grads, checked in the worker)
    assert len(diffs) == 2 * 18 and max(diffs) <= 1e-4, out[-3000:]
    assert len(re.findall(r"logits_from=\d+ max_abs_logit_diff_vs_hf=", out)) == 18, out[-3000:]
    assert len(re.findall(r"max_rel_diff_vs_tp1=", out)) == 4 * 5
    # layer forwards per forward+backward, every rank of every layout: twice only under full recompute
    runs = re.findall(r"forward_runs=(\d)", out)
    assert sorted(runs) == ["1"] * 4 * 5 + ["2"] * 4, out[-3000:]


@pytest.mark.parametrize("images,attention", [
    ((((4, 6),), ((8, 4), (4, 4))), False),
    ((((4, 4), (2, 6), (6, 2)), ()), True),
])
def test_mrope_matches_get_rope_index(images, attention):
    from megatron_papo.models.qwen2_5_vl import parity

    cfg = get_flavor("tiny")
    hf = tiny_hf_model(cfg)
    batch = parity.synthetic_batch(cfg, images=images, seed=3)
    ids = batch["input_ids"]
    mask = torch.ones_like(ids)
    if attention:  # left padding on the second sample
        mask[1, :5] = 0
    ours, deltas = mrope_position_ids(ids, batch["image_grid_thw"], cfg.image_token_id, 2, mask)
    ref, ref_deltas = hf.model.get_rope_index(ids, (ids == cfg.image_token_id).int(), batch["image_grid_thw"],
                                              attention_mask=mask)
    assert torch.equal(ours, ref) and torch.equal(deltas, ref_deltas.to(deltas.dtype))


def test_mrope_rejects_grid_mismatch():
    cfg = get_flavor("tiny")
    ids = torch.tensor([[1, cfg.image_token_id, cfg.image_token_id, 2]])
    with pytest.raises(ValueError, match="image run of 2 tokens"):
        mrope_position_ids(ids, torch.tensor([[1, 4, 4]]), cfg.image_token_id, 2)
    with pytest.raises(ValueError, match="more rows"):
        mrope_position_ids(ids, torch.tensor([[1, 2, 4], [1, 2, 2]]), cfg.image_token_id, 2)


def test_spec_selection_picks_local_without_te():
    assert not te_available()  # this CPU environment has no transformer-engine
    assert use_transformer_engine(None) is False
    with pytest.raises(ValueError, match="use_te=True"):
        use_transformer_engine(True)
