"""avg@k accuracy of a checkpoint with the rollout engine (vLLM).

    python -m megatron_papo.eval --ckpt outputs/papo_tiny/checkpoints/step_00000040 --data synthetic --k 8
    python -m megatron_papo.eval --ckpt hf_folder --data mathverse.parquet --k 8 --temperature 1.0

--ckpt is an HF folder (safetensors) or a Megatron checkpoint (a training step directory or the
output of tools/convert_hf_to_megatron.py, at any TP/PP); a Megatron checkpoint is converted to a
temporary HF folder first, one layer at a time. Prints one line per metric and, as its last line,
`avg@k=<accuracy> pass@k=<fraction> format=<fraction> samples=<n>`.

--masked also evaluates every problem on its masked image, masked exactly as training masks it
(the checkpoint's run_config.yaml `mask` section; MaskConfig's defaults for a folder without one),
and prints `masked: avg@k=... pass@k=... format=...` before the last line. The difference in avg@k
is the perception gap: what the answers owe to the image.

From Python (megatron_papo.study uses it): `Evaluator(ckpt, ...)` builds one engine, `load(ckpt)`
swaps in another checkpoint's weights, `run(samples, k, mask=...)` returns an `EvalResult` with one
row per response (its text included).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import yaml

from megatron_papo.data.rewards import EvalResult


def hf_folder_for(ckpt: Path, workdir: Path) -> Path:
    """An HF folder vLLM can load: `ckpt` itself, or a conversion of the Megatron checkpoint."""
    if any(ckpt.glob("*.safetensors")):
        return ckpt
    from megatron_papo.models.qwen2_5_vl.dist_io import iter_dist_checkpoint_as_hf
    from megatron_papo.models.qwen2_5_vl.hf_io import copy_model_files, read_hf_config, write_hf_folder

    cfg = read_hf_config(ckpt)
    out = workdir / "hf"
    write_hf_folder(out, cfg, iter_dist_checkpoint_as_hf(ckpt, cfg, show_progress=True))
    copy_model_files(ckpt, out)  # tokenizer and processor files travel along
    return out


class EvalError(ValueError):
    """A checkpoint or data set that cannot be evaluated; one line saying why."""


def mask_config_for(ckpt: Path):
    """The mask a training checkpoint was trained with (its run_config.yaml), or None."""
    from megatron_papo.data.processor import MaskConfig

    f = Path(ckpt) / "run_config.yaml"
    if not f.is_file():
        return None
    section = (yaml.safe_load(f.read_text()) or {}).get("mask") or {}
    return MaskConfig(**section)


def masked_samples(samples: list, mask) -> list:
    """The samples with every image masked as training masks it (data/processor.py, `reference`
    method: the raw image, cells of mask.patch_size px set to mask.fill with probability mask.ratio,
    seeded by (mask.seed, sample_id, image index)); the engine's processor then sees what the
    trainer's masked branch sees. `patch_aligned` masks processed pixel rows, which an engine that
    takes images cannot be given."""
    from megatron_papo.data.processor import to_rgb_array
    from megatron_papo.ops import masking

    if mask.method != "reference":
        raise EvalError(f"masked evaluation needs mask.method=reference (raw images); got {mask.method!r}")
    out = []
    for s in samples:
        if s.images:
            n = len(s.images)
            images = masking.mask_raw_images([to_rgb_array(im) for im in s.images], seed=mask.seed,
                                             sample_ids=[s.sample_id] * n, image_indices=list(range(n)),
                                             ratio=mask.ratio, patch_size=mask.patch_size, fill=mask.fill)
            s = dataclasses.replace(s, images=images)
        out.append(s)
    return out


class Evaluator:
    """One vLLM engine for the checkpoints of one model: `load(ckpt)` swaps the weights in (the
    architecture, tokenizer and image processor must be the first checkpoint's)."""

    def __init__(self, ckpt: str | Path, *, dtype: str = "bfloat16", max_new_tokens: int = 2048, seed: int = 0,
                 min_pixels: int | None = None, max_pixels: int | None = None, max_images_per_prompt: int = 1):
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self._tmp = tempfile.TemporaryDirectory()
        self._loads = 0
        self.ckpt = Path(ckpt)
        try:
            self._build(dtype, min_pixels, max_pixels, max_images_per_prompt)
        except BaseException:
            self._tmp.cleanup()
            raise

    def _build(self, dtype, min_pixels, max_pixels, max_images_per_prompt) -> None:
        from megatron_papo.data.processor import ProcessorConfig, VLProcessor
        from megatron_papo.rollout.vllm_engine import VLLMEngine, VLLMEngineConfig

        ckpt = self.ckpt
        folder = self._hf_folder(ckpt)
        if not (folder / "preprocessor_config.json").is_file():
            raise EvalError(f"--ckpt {ckpt}: no preprocessor_config.json (nor tokenizer files?); the trainer writes "
                            f"them into every checkpoint, tools/convert_*.py carry them along")
        trained = json.loads((folder / "preprocessor_config.json").read_text()).get("size", {})
        defaults = ProcessorConfig()
        min_pixels = min_pixels or trained.get("shortest_edge", defaults.min_pixels)
        max_pixels = max_pixels or trained.get("longest_edge", defaults.max_pixels)
        self.pixels = (min_pixels, max_pixels)  # the processor's and the engine's (the folder's may differ)
        self.processor = VLProcessor.from_config(ProcessorConfig(
            tokenizer_path=str(folder), min_pixels=min_pixels, max_pixels=max_pixels))
        from megatron_papo.models.qwen2_5_vl.hf_io import read_hf_config

        self.config = json.loads((folder / "config.json").read_text())
        # flat, or nested under text_config as transformers 5 saves it
        self.model_cfg = read_hf_config(folder)
        self.engine = VLLMEngine(VLLMEngineConfig(
            model_path=str(folder), dtype=dtype, seed=self.seed,
            max_model_len=min(4096 + self.max_new_tokens, self.model_cfg.max_position_embeddings),
            max_images_per_prompt=max_images_per_prompt, min_pixels=min_pixels, max_pixels=max_pixels))

    def _hf_folder(self, ckpt: Path) -> Path:
        if not ckpt.is_dir():
            raise EvalError(f"--ckpt {ckpt}: not a directory")
        self._loads += 1
        work = Path(self._tmp.name) / str(self._loads)
        work.mkdir()
        return hf_folder_for(ckpt, work)

    def load(self, ckpt: str | Path) -> None:
        """Evaluate `ckpt` from now on (same model config as the first checkpoint)."""
        ckpt = Path(ckpt)
        if ckpt == self.ckpt:
            return
        folder = self._hf_folder(ckpt)
        config = json.loads((folder / "config.json").read_text())
        if config != self.config:
            differ = sorted(k for k in config.keys() | self.config.keys() if config.get(k) != self.config.get(k))
            raise EvalError(f"{ckpt}: its model config differs from {self.ckpt}'s ({', '.join(differ[:5])}); "
                            "evaluate it with its own Evaluator")
        self.engine.load_weights_from_folder(str(folder))
        self.ckpt = ckpt

    def run(self, samples: list, k: int, temperature: float = 1.0, top_p: float = 0.99, mask=None,
            reward: str = "papo") -> EvalResult:
        """k responses per sample, graded; `mask` (a MaskConfig): on the masked images instead.
        The sampling seeds depend on (seed, problem index, response index) only, so the real and the
        masked run of a checkpoint draw the same random numbers."""
        from megatron_papo.data.rewards import get_reward_fn
        from megatron_papo.rollout.engine import SamplingConfig
        from megatron_papo.trainer.build import check_engine_prompt, rollout_requests

        shown = masked_samples(samples, mask) if mask is not None else samples
        outputs = self.engine.generate(rollout_requests(self.processor, shown), SamplingConfig(
            n=k, temperature=temperature, top_p=top_p, max_new_tokens=self.max_new_tokens,
            stop_token_ids=[self.model_cfg.eos_token_id], seed=self.seed))
        reward_fn = get_reward_fn(reward)
        result = EvalResult(k=k, problems=len(samples))
        for s, shown_sample, outs in zip(samples, shown, outputs):
            try:
                check_engine_prompt(s.sample_id, outs[0].prompt_token_ids,
                                    self.processor.encode_sample(shown_sample).input_ids.tolist())
            except ValueError as e:
                raise EvalError(f"{e}; --min-pixels/--max-pixels: {self.pixels}") from None
            for o in outs:
                text = self.processor.tokenizer.decode(o.response_token_ids, skip_special_tokens=True)
                g = reward_fn(text, s.answer, s.choices)
                result.rows.append({"sample_id": s.sample_id, "answer": s.answer, "accuracy": g.accuracy,
                                    "format": g.format, "response": text})
        return result

    def close(self) -> None:
        self.engine.close()
        self._tmp.cleanup()


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
    p.add_argument("--masked", action="store_true",
                   help="also on the masked images, masked as in training (the checkpoint's run_config.yaml mask)")
    p.add_argument("--out", help="write per-response results (with their text) as jsonl here")
    args = p.parse_args(argv)

    from megatron_papo.data.dataset import DataConfig, PapoDataset
    from megatron_papo.data.processor import MaskConfig
    from megatron_papo.data.synthetic import SyntheticConfig, SyntheticShapes

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
    mask = (mask_config_for(ckpt) or MaskConfig()) if args.masked else None
    try:
        if mask is not None:
            masked_samples(samples[:1], mask)  # an unsupported mask method, before the engine is built
        evaluator = Evaluator(ckpt, dtype=args.dtype, max_new_tokens=args.max_new_tokens, seed=args.seed,
                              min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                              max_images_per_prompt=max(1, max(len(s.images) for s in samples)))
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        real = evaluator.run(samples, args.k, args.temperature, args.top_p, reward=args.reward)
        masked = (evaluator.run(samples, args.k, args.temperature, args.top_p, mask=mask, reward=args.reward)
                  if mask else None)
    finally:
        evaluator.close()
    if args.out:
        rows = real.rows + [dict(r, masked=True) for r in (masked.rows if masked else [])]
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"problems {len(samples)}  samples {len(real.rows)}  k {args.k}")
    if masked is not None:
        print(f"masked: avg@{args.k}={masked.avg:.4f} pass@{args.k}={masked.pass_at_k:.4f} format={masked.format:.4f} "
              f"perception_gap={real.avg - masked.avg:+.4f} (mask ratio {mask.ratio}, seed {mask.seed})")
    print(f"avg@{args.k}={real.avg:.4f} pass@{args.k}={real.pass_at_k:.4f} format={real.format:.4f} samples={len(real.rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
