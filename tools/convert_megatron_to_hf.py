"""Convert a megatron-core torch_dist checkpoint (written by convert_hf_to_megatron.py or the
trainer, at any TP/PP) back to a Hugging Face folder that transformers' from_pretrained loads.

Runs as one plain process (python tools/convert_megatron_to_hf.py --ckpt C --out D): it reads the
checkpoint one layer at a time (full tensors, resharded by dist_checkpointing), converts them with
hf_mapping and writes safetensors shards as they fill, so only one layer plus one output shard are
in memory. The tokenizer, chat template and processor files of the checkpoint (or of
--tokenizer-dir) go along, so transformers, vLLM and megatron_papo.eval load D as is. --out must be a
new or empty folder (or --overwrite), never the checkpoint or a folder inside or around it; the
export is written next to it and renamed to D when complete.
"""
import argparse
import sys
from pathlib import Path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, type=Path, help="torch_dist checkpoint directory (with config.json)")
    parser.add_argument("--out", required=True, type=Path, help="output HF folder (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace what a non-empty --out holds")
    parser.add_argument("--tokenizer-dir", type=Path, help="where the tokenizer and processor files come from "
                        "(default: --ckpt; give the HF folder for a checkpoint that lacks them)")
    parser.add_argument("--max-shard-gb", type=float, default=4.0)
    args = parser.parse_args(argv)

    from megatron_papo.folders import OutputFolderError, check_output_folder, staged_folder

    try:
        inputs = {"--ckpt": args.ckpt, **({"--tokenizer-dir": args.tokenizer_dir} if args.tokenizer_dir else {})}
        check_output_folder(args.out, inputs, args.overwrite)
    except OutputFolderError as e:
        parser.error(str(e))

    from megatron_papo.models.qwen2_5_vl.dist_io import iter_dist_checkpoint_as_hf
    from megatron_papo.models.qwen2_5_vl.hf_io import copy_model_files, read_hf_config, write_hf_folder

    cfg = read_hf_config(args.ckpt)
    with staged_folder(args.out) as staging:
        write_hf_folder(staging, cfg, iter_dist_checkpoint_as_hf(args.ckpt, cfg, show_progress=True),
                        max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
        source = args.tokenizer_dir or args.ckpt
        copied = copy_model_files(source, staging)
    print(f"wrote {args.out} (weights, config.json, {', '.join(copied) or 'no tokenizer or processor files'})")
    missing = [name for name in ("tokenizer_config.json", "preprocessor_config.json") if name not in copied]
    if missing:
        print(f"warning: {source} has no {' or '.join(missing)}, which evaluating or serving {args.out} needs; "
              f"pass --tokenizer-dir <the HF folder>", file=sys.stderr)


if __name__ == "__main__":
    main()
