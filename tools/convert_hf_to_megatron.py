"""Convert a Hugging Face Qwen2.5-VL folder to a megatron-core torch_dist checkpoint.

Run it under torchrun with exactly TP*PP ranks (they may span nodes):
    torchrun --nproc-per-node $((T*P)) tools/convert_hf_to_megatron.py --hf-dir D --out C --tp T --pp P
Each rank builds only its (tp, pp) stage without initialising it, reads the HF safetensors one
tensor at a time (keeping only its shard) and megatron's dist_checkpointing writes the shards; no
process ever holds the whole model. The checkpoint loads at any TP/PP layout; C also gets the HF
config.json and its tokenizer, chat template and processor files (the export back to HF and
megatron_papo.eval read them). --out must be a new or empty folder (or --overwrite), never the HF folder or a folder
inside or around it; the checkpoint is written next to it and renamed to C when complete.
"""
import argparse
from contextlib import nullcontext
from pathlib import Path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, type=Path, help="HF folder: config.json + safetensors")
    parser.add_argument("--out", required=True, type=Path, help="output checkpoint directory (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace what a non-empty --out holds")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--vocab-divisible-by", type=int, default=128, help="megatron vocab padding (per TP rank)")
    args = parser.parse_args(argv)

    from megatron_papo.folders import OutputFolderError, check_output_folder, staged_folder

    try:
        check_output_folder(args.out, {"--hf-dir": args.hf_dir}, args.overwrite)
    except OutputFolderError as e:
        parser.error(str(e))

    import json

    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_papo.models.qwen2_5_vl.checkpoint_io import (HFReader, copy_model_files, load_hf_weights,
                                                               read_hf_config, write_checkpoint_metadata)
    from megatron_papo.models.qwen2_5_vl.model import ModelParallelOptions, build_model
    from megatron_papo.parallel import destroy_model_parallel, initialize_model_parallel

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
    hf_config = json.loads((args.hf_dir / "config.json").read_text())
    rank0 = dist.get_rank() == 0
    with staged_folder(args.out) if rank0 else nullcontext() as staging:
        staging = [staging]
        dist.broadcast_object_list(staging)  # every rank writes its shards into rank 0's staging folder
        dist_checkpointing.save(model.sharded_state_dict(), str(staging[0]))
        if rank0:
            write_checkpoint_metadata(model, staging[0], hf_config)
            copy_model_files(args.hf_dir, staging[0])
    dist.barrier()
    if rank0:
        print(f"wrote {args.out} (tp={args.tp} pp={args.pp} dtype={args.dtype})")
    destroy_model_parallel()


if __name__ == "__main__":
    main()
