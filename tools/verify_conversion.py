"""Check a Megatron Qwen2.5-VL against transformers: logits of a fixed multimodal batch.

    torchrun --nproc-per-node $((T*P)) tools/verify_conversion.py --hf-dir D [--ckpt C] --tp T --pp P [--tol 1e-4]

It runs the model, so it needs exactly T*P processes (one plain process when T = P = 1); with
another count it exits 2 and prints the torchrun line to use. It builds the Megatron model at TP=T,
PP=P (fp32) from the HF folder D, or from the dist checkpoint C when given, runs a batch built from
config.json alone (two samples, three images of different sizes, seeded text tokens; no tokenizer
needed) and compares with transformers' fp32 forward of D.
The last line printed is `max_abs_logit_diff=<float>`; the exit code is 1 when it exceeds --tol.
"""
import argparse
import os
import shlex
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != args.tp * args.pp:
        command = shlex.join(["torchrun", "--nproc-per-node", str(args.tp * args.pp), sys.argv[0],
                              *map(str, sys.argv[1:] if argv is None else argv)])
        parser.error(f"--tp {args.tp} --pp {args.pp} runs the model on exactly {args.tp * args.pp} processes, this "
                     f"run has {world}; run:\n  {command}")

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_papo.models.qwen2_5_vl import parity
    from megatron_papo.models.qwen2_5_vl.dist_io import checkpoint_layout, load_dist_checkpoint
    from megatron_papo.models.qwen2_5_vl.hf_io import HFReader, load_hf_weights, read_hf_config
    from megatron_papo.models.qwen2_5_vl.model import ModelParallelOptions, build_model
    from megatron_papo.parallel import collective_device, destroy_model_parallel, initialize_model_parallel

    cfg = read_hf_config(args.hf_dir)
    initialize_model_parallel(args.tp, args.pp, seed=args.seed)
    padded_vocab = checkpoint_layout(args.ckpt)["padded_vocab_size"] if args.ckpt else None
    model = build_model(cfg, ModelParallelOptions(tp=args.tp, pp=args.pp, params_dtype=torch.float32,
                                                  padded_vocab_size=padded_vocab, use_te=False))
    if args.ckpt:
        load_dist_checkpoint(model, args.ckpt)
    else:
        load_hf_weights(model, HFReader(args.hf_dir))
    if torch.cuda.is_available():
        model.cuda()  # megatron builds its layers there; ours (patch embedding, norms) follow
    model.eval()
    batch = parity.synthetic_batch(cfg, seed=args.seed)  # on the CPU, where transformers' model runs
    on_device = {k: v.to(torch.cuda.current_device()) if torch.cuda.is_available() and v is not None else v
                 for k, v in batch.items()}
    with torch.no_grad():
        logits, _ = parity.run_model(model, on_device)
    diff = torch.zeros(())
    if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
        hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.hf_dir, dtype=torch.float32,
                                                                attn_implementation="eager").eval()
        with torch.no_grad():
            diff = (logits.cpu() - parity.hf_logits(hf, batch)).abs().max()
    diff = diff.to(collective_device())
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    ok = diff.item() <= args.tol
    if dist.get_rank() == 0:
        print(f"max_abs_logit_diff={diff.item():.3e}", flush=True)
    destroy_model_parallel()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
