"""Qwen2_5_VisionModel (megatron-core layers) against transformers' Qwen2.5-VL visual tower.

TP1 runs in-process; TP2 (gloo, 2 ranks) runs tests/dist/vision_worker.py, which checks outputs
against TP1 and transformers and gradients against TP1, with and without full recompute.
"""
import pytest
import torch
from transformers.vision_utils import get_vision_window_index

from megatron_papo.models.qwen2_5_vl import hf_mapping
from megatron_papo.models.qwen2_5_vl.vision import window_order
from megatron_papo.parallel import destroy_model_parallel, initialize_model_parallel
from tests.dist.vision_worker import (
    GRIDS,
    TOL,
    build,
    hf_state,
    hf_visual,
    inputs,
    load_from_hf,
    local_name,
    tiny_config,
    vision_rules,
)
from tests.distributed import run_distributed


@pytest.fixture(scope="module")
def tp1():
    pgs = initialize_model_parallel(tp=1)
    cfg = tiny_config()
    visual = hf_visual(cfg)
    model = build(cfg, pgs, 1)
    load_from_hf(model, hf_state(visual), cfg, 0, 1)
    yield cfg, visual, model
    destroy_model_parallel()


@pytest.mark.parametrize("grids", [GRIDS, [(2, 4, 8), (1, 10, 6), (1, 2, 2)], [(1, 8, 8)] * 3],
                         ids=["images", "video+images", "equal_images"])
def test_tp1_matches_transformers_outputs_and_grads(tp1, grids):
    """Mixed sizes (segments of several lengths, gathered per length) and equal images (one length: the
    segment attention's no-gather path)."""
    cfg, visual, model = tp1
    visual.zero_grad()
    pixels, grid, out_weight = inputs(cfg, grids)
    reference = visual(pixels, grid_thw=grid).pooler_output
    (reference * out_weight).sum().backward()
    hf_grads = {hf_mapping.HF_VISION_PREFIX + k: p.grad for k, p in visual.named_parameters()}

    model.zero_grad()
    out = model(pixels, grid)
    (out * out_weight).sum().backward()

    n_tokens = sum(t * h * w for t, h, w in grids) // cfg.vision.spatial_merge_size**2
    assert out.shape == (n_tokens, cfg.hidden_size)
    torch.testing.assert_close(out, reference, **TOL)
    params = dict(model.named_parameters())
    for rule in vision_rules(cfg):
        expected = hf_mapping.to_megatron(rule, [hf_grads[h] for h in rule.hf], cfg)
        assert expected.abs().max() > 0, rule.megatron
        torch.testing.assert_close(params[local_name(rule)].grad, expected, **TOL,
                                   msg=lambda m: f"{rule.megatron}: {m}")
    grad_diff = max((params[local_name(r)].grad - hf_mapping.to_megatron(r, [hf_grads[h] for h in r.hf], cfg))
                    .abs().max().item() for r in vision_rules(cfg))
    print(f"TP1 {grids}: max|out-HF| {(out - reference).abs().max().item():.2e} max|grad-HF| {grad_diff:.2e}")


def test_window_and_full_attention_both_matter(tp1):
    """The reference comparison must be able to fail: all-window or all-full attention is far off."""
    cfg, visual, model = tp1
    pixels, grid, _ = inputs(cfg)
    with torch.no_grad():
        reference = visual(pixels, grid_thw=grid).pooler_output
        kinds = [layer.full_attention for layer in model.decoder.layers]
        assert kinds == [i in cfg.vision.fullatt_block_indexes for i in range(cfg.vision.depth)]
        try:
            for everywhere in (False, True):
                for layer in model.decoder.layers:
                    layer.full_attention = everywhere
                assert (model(pixels, grid) - reference).abs().max() > 1e-2
        finally:
            for layer, kind in zip(model.decoder.layers, kinds):
                layer.full_attention = kind


@pytest.mark.parametrize("grids", [GRIDS, [(1, 2, 2)], [(2, 4, 8), (1, 10, 6)]])
def test_window_order_matches_transformers(grids):
    cfg = tiny_config().vision
    grid = torch.tensor(grids)
    order, lengths = window_order(cfg, grid)
    ref_order, ref_cu = get_vision_window_index(grid, cfg.spatial_merge_size, cfg.window_size, cfg.patch_size)
    assert torch.equal(order, ref_order)
    assert torch.equal(torch.nn.functional.pad(lengths.cumsum(0), (1, 0)), ref_cu.long())


@pytest.mark.parametrize("case, match", [
    ("width", "pixel_values must be"),
    ("rows", r"describes 112 patches .* pixel_values has 108 rows"),
    ("odd_h", r"image_grid_thw\[1\] = \(1, 7, 8\)"),
    ("grid_shape", "image_grid_thw must be"),
])
def test_bad_inputs_raise(tp1, case, match):
    cfg, _, model = tp1
    pixels, grid, _ = inputs(cfg)
    if case == "width":
        pixels = pixels[:, :-1]
    elif case == "rows":
        pixels = pixels[:-4]
    elif case == "odd_h":
        grid = grid.clone()
        grid[1, 1] = 7
    elif case == "grid_shape":
        grid = grid[:, :2]
    with pytest.raises(ValueError, match=match):
        model(pixels, grid)


def test_tp2_matches_tp1_and_transformers():
    out = run_distributed("tests/dist/vision_worker.py", 2, timeout=300)
    print(out[-2000:])
    assert out.count("TP2") >= 4  # both ranks, with and without recompute
