"""Convert a Hugging Face Qwen2.5-VL folder to a megatron-core torch_dist checkpoint.

Run it under torchrun with exactly TP*PP ranks (they may span nodes):
    torchrun --nproc-per-node $((T*P)) tools/convert_hf_to_megatron.py --hf-dir D --out C --tp T --pp P
Each rank builds only its (tp, pp) stage without initialising it, reads the HF safetensors one
tensor at a time (keeping only its shard) and megatron's dist_checkpointing writes the shards; no
process ever holds the whole model. The checkpoint loads at any TP/PP layout. It is written to
C.tmp and renamed to C when complete; C also gets the HF config.json.
"""
import argparse

import torch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="HF folder: config.json + safetensors")
    parser.add_argument("--out", required=True, help="output checkpoint directory")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--vocab-divisible-by", type=int, default=128, help="megatron vocab padding (per TP rank)")
    args = parser.parse_args(argv)

    import torch.distributed as dist

    from megatron_papo.models.qwen2_5_vl.checkpoint_io import (HFReader, load_hf_weights, read_hf_config,
                                                               save_dist_checkpoint)
    from megatron_papo.models.qwen2_5_vl.model import ModelParallelOptions, build_model
    from megatron_papo.parallel import destroy_model_parallel, initialize_model_parallel

    import json
    from pathlib import Path

    cfg = read_hf_config(args.hf_dir)
    initialize_model_parallel(args.tp, args.pp)
    if dist.get_world_size() != args.tp * args.pp:
        raise SystemExit(f"--tp {args.tp} --pp {args.pp}: run under torchrun with exactly "
                         f"{args.tp * args.pp} ranks (got {dist.get_world_size()})")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    opts = ModelParallelOptions(tp=args.tp, pp=args.pp, params_dtype=dtype, perform_initialization=False,
                                make_vocab_size_divisible_by=args.vocab_divisible_by, use_te=False)
    model = build_model(cfg, opts)
    load_hf_weights(model, HFReader(args.hf_dir), show_progress=dist.get_rank() == 0)
    hf_config = json.loads((Path(args.hf_dir) / "config.json").read_text())
    save_dist_checkpoint(model, args.out, hf_config=hf_config)
    if dist.get_rank() == 0:
        print(f"wrote {args.out} (tp={args.tp} pp={args.pp} dtype={args.dtype})")
    destroy_model_parallel()


if __name__ == "__main__":
    main()
