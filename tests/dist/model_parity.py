"""Worker (4 ranks): logits and grads of our Megatron Qwen2.5-VL vs transformers and vs TP1PP1,
at TP1PP1, TP2PP1, TP1PP2, TP2PP2, TP2 with sequence parallel, TP2PP2 with full recompute; and in
every layout, logits from a middle position on only (`logits_from`) vs transformers' logits there and
the grads of the loss on those positions.

Grads are compared tensor by tensor, relative to that tensor's own largest grad: they span 5e-3
(ViT norms) to 3e2 (embeddings), so an error measured against the largest grad anywhere would let a
small tensor be wholly wrong. GRAD_FLOOR bounds the denominator from below: a grad that (nearly)
cancels out keeps the fp32 rounding error of its terms, which is relative to the terms, not to the
sum; 1e-2 is under every tensor's grad here and allows at most 1e-7 absolute error on such a tensor.
Every decoder layer (ViT and LM) must run its forward once per forward+backward, and twice with
full recompute (the recomputation in the backward): a recompute that never happens fails.
"""
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.transformer_layer import TransformerLayer
from transformers import Qwen2_5_VLForConditionalGeneration

from megatron_papo.models.qwen2_5_vl import parity
from megatron_papo.models.qwen2_5_vl.hf_io import HFReader, gather_hf_tensors, load_hf_weights, read_hf_config
from megatron_papo.models.qwen2_5_vl.hf_mapping import hf_hub_name
from megatron_papo.models.qwen2_5_vl.model import ModelParallelOptions, build_model
from megatron_papo.parallel import destroy_model_parallel, initialize_model_parallel

LAYOUTS = [dict(tp=1, pp=1), dict(tp=2, pp=1), dict(tp=1, pp=2), dict(tp=2, pp=2),
           dict(tp=2, pp=1, sequence_parallel=True),
           dict(tp=2, pp=2, recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)]
GRAD_RTOL = 1e-5   # observed <= 2e-6
GRAD_FLOOR = 1e-2  # see the module docstring


def grad_error(grads, reference):
    """max over tensors of max|g - ref| / max(max|ref|, GRAD_FLOOR), and the worst tensor's name."""
    errors = {n: (g - reference[n]).abs().max().item() / max(reference[n].abs().max().item(), GRAD_FLOOR)
              for n, g in grads.items()}
    worst = max(errors, key=errors.get)
    return errors[worst], worst


def count_layer_forwards(model):
    """{layer name: forward calls}, counted by hooks on every transformer layer of `model`."""
    calls = {}
    for name, module in model.named_modules():
        if isinstance(module, TransformerLayer):
            calls[name] = 0
            module.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    return calls


def full_grads(model, layout) -> dict[str, torch.Tensor]:
    """The model's grads as full HF tensors. Norm-weight grads are partial per sequence chunk under SP:
    megatron all-reduces params marked `sequence_parallel` over TP (finalize_model_grads); so do we."""
    for p in model.parameters():
        if getattr(p, "sequence_parallel", False) and layout.get("sequence_parallel"):
            dist.all_reduce(p.grad, group=parallel_state.get_tensor_model_parallel_group())
    return gather_hf_tensors(model, grads=True)


def main(hf_dir):
    cfg = read_hf_config(hf_dir)
    batch = parity.synthetic_batch(cfg)
    weight = torch.randn(*batch["input_ids"].shape, cfg.vocab_size, generator=torch.Generator().manual_seed(1))
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    ref_logits = parity.hf_logits(hf, batch)
    (ref_logits * weight).sum().backward()
    hf_grads = {hf_hub_name(n): p.grad for n, p in hf.named_parameters()}
    # logits from position `start` on only (the output layer skips the prompt in RL): the same logits
    # and the grads of the same loss restricted to those positions; S - start even, for SP at TP2
    seq = batch["input_ids"].shape[1]
    start = seq // 2 - (seq - seq // 2) % 2
    window_weight = weight[:, start:]
    hf.zero_grad(set_to_none=True)  # hf_grads keeps the first loss's
    (parity.hf_logits(hf, batch)[:, start:] * window_weight).sum().backward()
    hf_window_grads = {hf_hub_name(n): p.grad for n, p in hf.named_parameters()}
    tp1_grads = None
    for layout in LAYOUTS:
        initialize_model_parallel(layout["tp"], layout["pp"], seed=5)
        model = build_model(cfg, ModelParallelOptions(make_vocab_size_divisible_by=8, **layout))
        load_hf_weights(model, HFReader(hf_dir))
        calls = count_layer_forwards(model)
        logits, _ = parity.run_model(model, batch, loss_weight=weight)
        runs = 2 if layout.get("recompute_granularity") == "full" else 1
        assert calls and set(calls.values()) == {runs}, (layout, calls)
        print(f"rank{dist.get_rank()} {layout} {len(calls)} layers forward_runs={runs}", flush=True)
        grads = full_grads(model, layout)
        if logits is not None:
            logit_diff = (logits - ref_logits).abs().max().item()
            assert logit_diff <= 1e-4, (layout, logit_diff)
            print(f"rank{dist.get_rank()} {layout} max_abs_logit_diff_vs_hf={logit_diff:.2e}", flush=True)
        hf_diff, worst = grad_error(grads, hf_grads)
        assert hf_diff <= GRAD_RTOL, (layout, worst, hf_diff)
        if tp1_grads is None:
            assert len(grads) == len(hf_grads), "TP1PP1 stage must hold every HF parameter"
            tp1_grads = grads
        else:
            diff, worst = grad_error(grads, tp1_grads)
            assert diff <= GRAD_RTOL, (layout, worst, diff)
            print(f"rank{dist.get_rank()} {layout} {len(grads)} grads max_rel_diff_vs_tp1={diff:.2e} "
                  f"vs_hf={hf_diff:.2e} (per tensor)", flush=True)
        model.zero_grad(set_to_none=True)
        logits, _ = parity.run_model(model, batch, loss_weight=window_weight, logits_from=start)
        window_diff, worst = grad_error(full_grads(model, layout), hf_window_grads)
        assert window_diff <= GRAD_RTOL, (layout, "logits_from", worst, window_diff)
        if logits is not None:
            assert logits.shape[1] == seq - start, (layout, logits.shape)
            logit_diff = (logits - ref_logits[:, start:]).abs().max().item()
            assert logit_diff <= 1e-4, (layout, "logits_from", logit_diff)
            print(f"rank{dist.get_rank()} {layout} logits_from={start} max_abs_logit_diff_vs_hf={logit_diff:.2e} "
                  f"grads_vs_hf={window_diff:.2e}", flush=True)
        parallel_state.destroy_model_parallel()
    destroy_model_parallel()


if __name__ == "__main__":
    main(sys.argv[1])
