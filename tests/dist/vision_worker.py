"""Vision tower checks, one launch: Qwen2_5_VisionModel at TP = world size vs a single-rank (TP1)
copy of the same weights and vs transformers' Qwen2.5-VL visual tower; outputs and gradients.

The helpers here (HF reference, loading through hf_mapping, gradient unsharding) are shared with
tests/test_vision.py, which runs the TP1 case in-process.
"""
import os

import torch
import torch.distributed as dist

from megatron_papo.models.qwen2_5_vl import hf_mapping
from megatron_papo.models.qwen2_5_vl.flavors import get_flavor
from megatron_papo.models.qwen2_5_vl.vision import Qwen2_5_VisionModel, vision_transformer_config

GRIDS = [(1, 4, 6), (1, 8, 8), (1, 6, 4)]  # several windows per image, partial edge windows
TOL = dict(rtol=0, atol=1e-5)


def tiny_config():
    return get_flavor("tiny")


def hf_visual(cfg, seed=0):
    """transformers' vision tower of a randomly initialised tiny Qwen2.5-VL (fp32, eval)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**cfg.to_hf_dict()))
    visual = model.model.visual.float().eval()
    with torch.no_grad():  # O(1) activations and attention logits, norms != 1, biases != 0
        for name, p in visual.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if "norm" in name or "ln_q" in name else 0.0) + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, p[0].numel() ** -0.5)
    return visual


def hf_state(visual):
    """HF hub-layout names (visual.*) -> tensors."""
    return {hf_mapping.HF_VISION_PREFIX + k: v.detach() for k, v in visual.state_dict().items()}


def vision_rules(cfg):
    return [r for r in hf_mapping.all_rules(cfg) if r.scope == "vision"]


def local_name(rule):
    return rule.megatron[len(hf_mapping.VISION_PREFIX):]


def load_from_hf(model, hf_tensors, cfg, tp_rank, tp_size):
    """Fill every vision parameter from HF tensors through the hf_mapping rules (each rule once)."""
    params = dict(model.named_parameters())
    missing = set(params)
    with torch.no_grad():
        for rule in vision_rules(cfg):
            full = hf_mapping.to_megatron(rule, [hf_tensors[h] for h in rule.hf], cfg)
            params[local_name(rule)].copy_(hf_mapping.shard(rule, full, tp_rank, tp_size))
            missing.remove(local_name(rule))
    assert not missing, f"parameters without an hf_mapping rule: {sorted(missing)}"


def build(cfg, pg_collection, tp_size, **config_overrides):
    tc = vision_transformer_config(cfg.vision, tensor_model_parallel_size=tp_size, **config_overrides)
    return Qwen2_5_VisionModel(cfg, tc, pg_collection, use_te=False)


def inputs(cfg, grids=GRIDS, seed=1):
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor(grids)
    pixels = torch.randn(int(grid.prod(-1).sum()), cfg.vision.patch_dim, generator=g)
    tokens = int(grid.prod(-1).sum()) // cfg.vision.spatial_merge_size**2
    # loss = sum(out * out_weight): scaled so that parameter gradients are O(1)
    out_weight = torch.randn(tokens, cfg.hidden_size, generator=g) / (tokens * cfg.hidden_size) ** 0.5
    return pixels, grid, out_weight


def full_grads(model, cfg, tp_group):
    """Megatron full (unsharded) gradient per vision rule name, gathered over tp_group."""
    params = dict(model.named_parameters())
    out = {}
    for rule in vision_rules(cfg):
        grad = params[local_name(rule)].grad
        shards = [torch.empty_like(grad) for _ in range(dist.get_world_size(tp_group))]
        dist.all_gather(shards, grad.contiguous(), group=tp_group)
        out[rule.megatron] = hf_mapping.unshard(rule, shards)
    return out


def run(cfg, pg_collection, tp_size, tp_rank, weights, **overrides):
    """Output and full gradients (of a fixed linear functional of the output) of a loaded model."""
    model = build(cfg, pg_collection, tp_size, **overrides)
    load_from_hf(model, weights, cfg, tp_rank, tp_size)
    pixels, grid, out_weight = inputs(cfg)
    out = model(pixels, grid)
    (out * out_weight).sum().backward()
    return out.detach(), full_grads(model, cfg, pg_collection.tp)


def main():
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_papo.parallel import destroy_model_parallel, initialize_model_parallel

    world = int(os.environ["WORLD_SIZE"])
    pgs = initialize_model_parallel(tp=world)
    rank = dist.get_rank()
    cfg = tiny_config()
    visual = hf_visual(cfg)
    weights = hf_state(visual)
    pixels, grid, _ = inputs(cfg)
    with torch.no_grad():
        reference = visual(pixels, grid_thw=grid).pooler_output

    # TP1: the same weights on a one-rank group (process groups are passed explicitly)
    single = None
    for r in range(world):  # every rank takes part in each new_group call
        group = dist.new_group([r])
        single = group if r == rank else single
    out1, grads1 = run(cfg, ProcessGroupCollection(tp=single, cp=single, pp=single), 1, 0, weights)
    torch.testing.assert_close(out1, reference, **TOL)

    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2)
    for overrides in ({}, recompute):
        out, grads = run(cfg, pgs, world, rank, weights, **overrides)
        assert out.shape == reference.shape, (out.shape, reference.shape)
        torch.testing.assert_close(out, reference, **TOL)
        torch.testing.assert_close(out, out1, **TOL)
        assert grads.keys() == grads1.keys()
        for name in grads:
            assert grads1[name].abs().max() > 0, f"{name}: zero TP1 gradient"
            torch.testing.assert_close(grads[name], grads1[name], **TOL, msg=lambda m: f"{name}: {m}")
        grad_diff = max((grads[k] - grads1[k]).abs().max().item() for k in grads)
        grad_scale = max(g.abs().max().item() for g in grads1.values())
        print(f"rank {rank} TP{world} recompute={bool(overrides)}: max|out-HF| "
              f"{(out - reference).abs().max().item():.2e} max|out-TP1| {(out - out1).abs().max().item():.2e} "
              f"max|grad-TP1| {grad_diff:.2e} (max|grad| {grad_scale:.2e}, {len(grads)} params)", flush=True)
    dist.barrier()
    destroy_model_parallel()


if __name__ == "__main__":
    main()
