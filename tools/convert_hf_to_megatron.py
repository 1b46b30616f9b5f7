"""Convert a Hugging Face Qwen2.5-VL folder to a megatron-core torch_dist checkpoint for TP x PP.

    python tools/convert_hf_to_megatron.py --hf-dir D --out C --tp T --pp P [--dtype bf16]

One plain process writes the whole checkpoint, every (tp, pp) shard of the target layout; no model is
built and no GPU is needed. It streams: one layer at a time, its HF tensors are read one by one,
converted, cut into the chunks megatron's own save writes at T x P, written, and dropped, so memory
stays at one layer's (or the embedding's) tensors, twice; the bound is printed at start. Several
processes (even on several nodes sharing the filesystem) can share the work and write the same
checkpoint faster:
    torchrun --nproc-per-node N tools/convert_hf_to_megatron.py --hf-dir D --out C --tp T --pp P

The checkpoint loads at any TP/PP layout (model.load=C in the trainer); at T x P each rank reads
exactly its own chunks. T also sets the vocabulary padding, which the loading model must share: give
the training TP. C also gets the HF config.json, the layout file and the HF folder's tokenizer, chat
template and processor files (the export back to HF and megatron_papo.eval read them). --out must
be a new or empty folder (or --overwrite), never the HF folder or a folder inside or around it; the
checkpoint is written next to it and renamed to C when complete.
"""
import argparse
import os
from contextlib import nullcontext
from pathlib import Path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, type=Path, help="HF folder: config.json + safetensors")
    parser.add_argument("--out", required=True, type=Path, help="output checkpoint directory (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace what a non-empty --out holds")
    parser.add_argument("--tp", type=int, default=1, help="target tensor-parallel size (chunks, vocab padding)")
    parser.add_argument("--pp", type=int, default=1, help="target pipeline-parallel size (recorded; must divide the layers)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--vocab-divisible-by", type=int, default=128, help="megatron vocab padding (per TP rank)")
    args = parser.parse_args(argv)

    from megatron_papo.folders import OutputFolderError, check_output_folder, staged_folder

    try:
        check_output_folder(args.out, {"--hf-dir": args.hf_dir}, args.overwrite)
    except OutputFolderError as e:
        parser.error(str(e))

    import torch
    import torch.distributed as dist

    from megatron_papo.models.qwen2_5_vl import dist_writer
    from megatron_papo.models.qwen2_5_vl.hf_io import HFReader, copy_model_files, read_hf_config

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    try:
        HFReader(args.hf_dir)  # every shard's header: a truncated file is named before anything is written
        cfg = read_hf_config(args.hf_dir)
        dist_writer.check_layout(cfg, args.tp, args.pp)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: the processes share the groups
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if rank == 0:
        print(f"converting {args.hf_dir} -> {args.out} for tp={args.tp} pp={args.pp} dtype={args.dtype} in "
              f"{world} process(es)", flush=True)
    with staged_folder(args.out) if rank == 0 else nullcontext() as staging:
        folder = [staging]
        if world > 1:
            dist.broadcast_object_list(folder)  # every process writes into rank 0's staging folder
        dist_writer.write_dist_checkpoint(args.hf_dir, folder[0], args.tp, args.pp, dtype, args.vocab_divisible_by,
                                          show_progress=rank == 0)
        if rank == 0:
            copy_model_files(args.hf_dir, folder[0])
    if rank == 0:
        print(f"wrote {args.out} (tp={args.tp} pp={args.pp} dtype={args.dtype})")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
