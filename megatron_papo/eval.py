"""avg@k accuracy of a checkpoint with the rollout engine (vLLM).

    python -m megatron_papo.eval --ckpt outputs/papo_tiny/checkpoints/step_00000040 --data synthetic --k 8
    python -m megatron_papo.eval --ckpt hf_folder --data mathverse.parquet --k 8 --temperature 1.0

--ckpt is an HF folder (safetensors) or a Megatron checkpoint (a training step directory or the
output of tools/convert_hf_to_megatron.py, at any TP/PP); a Megatron checkpoint is converted to a
temporary HF folder first, one layer at a time. Prints one line per metric and, as its last line,
`avg@k=<accuracy> pass@k=<fraction> format=<fraction> samples=<n>`.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def hf_folder_for(ckpt: Path, workdir: Path) -> Path:
    """An HF folder vLLM can load: `ckpt` itself, or a conversion of the Megatron checkpoint."""
    if any(ckpt.glob("*.safetensors")):
        return ckpt
    from megatron_papo.models.qwen2_5_vl.checkpoint_io import (
        copy_model_files,
        iter_dist_checkpoint_as_hf,
        read_hf_config,
        write_hf_folder,
    )

    cfg = read_hf_config(ckpt)
    out = workdir / "hf"
    write_hf_folder(out, cfg, iter_dist_checkpoint_as_hf(ckpt, cfg, show_progress=True))
    copy_model_files(ckpt, out)  # tokenizer and processor files travel along
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megatron_papo.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="HF folder or Megatron checkpoint directory")
    p.add_argument("--data", default="synthetic", help="PAPO-format parquet/jsonl, or 'synthetic'")
    p.add_argument("--k", type=int, default=8, help="samples per problem (avg@k, pass@k)")
    p.add_argument("--limit", type=int, default=256, help="problems to evaluate (first N in file order)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.99)
    p.add_argument("--max-new-tokens", type=int, default=2048)
    p.add_argument("--min-pixels", type=int, help="default: the checkpoint's preprocessor_config.json (as trained)")
    p.add_argument("--max-pixels", type=int, help="default: the checkpoint's preprocessor_config.json (as trained)")
    p.add_argument("--synthetic-seed", type=int, default=12345, help="synthetic task: a seed unseen in training")
    p.add_argument("--synthetic-levels", default="1,2", help="synthetic task: difficulty levels")
    p.add_argument("--synthetic-image-size", type=int, default=56)
    p.add_argument("--dtype", default="bfloat16", help="vLLM dtype (float32 on CPU for exactness)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reward", default="papo", help="reward function (data/rewards.py): papo or exact_match")
    p.add_argument("--out", help="write per-sample results as jsonl here")
    args = p.parse_args(argv)

    from megatron_papo.data.dataset import DataConfig, PapoDataset
    from megatron_papo.data.processor import ProcessorConfig, VLProcessor
    from megatron_papo.data.rewards import get_reward_fn
    from megatron_papo.data.synthetic import SyntheticConfig, SyntheticShapes
    from megatron_papo.models.qwen2_5_vl.checkpoint_io import read_hf_config
    from megatron_papo.rollout.engine import SamplingConfig
    from megatron_papo.rollout.vllm_engine import VLLMEngine, VLLMEngineConfig
    from megatron_papo.trainer.build import rollout_requests

    ckpt = Path(args.ckpt)
    if not ckpt.is_dir():
        print(f"error: --ckpt {ckpt}: not a directory", file=sys.stderr)
        return 2
    if args.data == "synthetic":
        levels = tuple(int(x) for x in args.synthetic_levels.split(","))
        dataset = SyntheticShapes(SyntheticConfig(seed=args.synthetic_seed, levels=levels,
                                                  image_size=args.synthetic_image_size, num_samples=args.limit))
    else:
        dataset = PapoDataset(DataConfig(path=args.data))
    samples = [s for s in (dataset[i] for i in range(min(args.limit, len(dataset)))) if s is not None]
    if not samples:
        why = dataset.stats.summary() if isinstance(dataset, PapoDataset) else f"--limit {args.limit}"
        print(f"error: --data {args.data}: no usable rows to evaluate ({why})", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        folder = hf_folder_for(ckpt, Path(tmp))
        if not (folder / "preprocessor_config.json").is_file():
            print(f"error: --ckpt {ckpt}: no preprocessor_config.json (nor tokenizer files?); the trainer writes them "
                  f"into every checkpoint, tools/convert_*.py carry them along", file=sys.stderr)
            return 2
        trained = json.loads((folder / "preprocessor_config.json").read_text()).get("size", {})
        defaults = ProcessorConfig()
        processor = VLProcessor.from_config(ProcessorConfig(
            tokenizer_path=str(folder), min_pixels=args.min_pixels or trained.get("shortest_edge", defaults.min_pixels),
            max_pixels=args.max_pixels or trained.get("longest_edge", defaults.max_pixels)))
        config = read_hf_config(folder)  # flat, or nested under text_config as transformers 5 saves it
        engine = VLLMEngine(VLLMEngineConfig(model_path=str(folder), dtype=args.dtype, seed=args.seed,
                                             max_model_len=min(4096 + args.max_new_tokens,
                                                               config.max_position_embeddings),
                                             max_images_per_prompt=max(1, max(len(s.images) for s in samples))))
        outputs = engine.generate(rollout_requests(processor, samples), SamplingConfig(
            n=args.k, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
            stop_token_ids=[config.eos_token_id], seed=args.seed))
    reward_fn = get_reward_fn(args.reward)
    rows, solved = [], 0
    for s, outs in zip(samples, outputs):
        graded = [reward_fn(processor.tokenizer.decode(o.response_token_ids, skip_special_tokens=True), s.answer,
                            s.choices) for o in outs]
        solved += any(g.accuracy > 0 for g in graded)
        rows += [{"sample_id": s.sample_id, "answer": s.answer, "accuracy": g.accuracy, "format": g.format}
                 for g in graded]
    acc = sum(r["accuracy"] for r in rows) / max(len(rows), 1)
    fmt = sum(r["format"] for r in rows) / max(len(rows), 1)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"problems {len(samples)}  samples {len(rows)}  k {args.k}")
    print(f"avg@{args.k}={acc:.4f} pass@{args.k}={solved / max(len(samples), 1):.4f} format={fmt:.4f} samples={len(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
