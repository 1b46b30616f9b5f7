"""Micro-batches by sequence count vs by padded tokens (`micro_batch_tokens`), on RL-like lengths.

The same experiences (synthetic-task prompts with images, responses of seeded random lengths
between --min-response and --max-response tokens, as RL rollouts vary) go through the trainer's
no-grad log-prob passes (old, reference, masked) twice: micro-batches of `micro_batch_size`
sequences in rollout order, and micro-batches packed by padded tokens (length-sorted) with the same
average number of tokens per micro-batch. Reports padded tokens, micro-batches and seconds.

    python benchmarks/micro_batching.py [--prompts 16] [--micro-batch-size 8] [key=value overrides]

Last line: `padding_fixed=<share> padding_tokens=<share> time_ratio=<tokens / fixed>`
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from step_time import CONFIG, fixed_experiences  # noqa: E402


def vary_responses(exps, vocab: int, low: int, high: int, seed: int = 0) -> None:
    """Responses of seeded random lengths in [low, high] (random non-special tokens)."""
    gen = torch.Generator().manual_seed(seed)
    for e in exps:
        n = int(torch.randint(low, high + 1, (), generator=gen))
        e.response_ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
        e.rollout_logp = [0.0] * n


def padding(batches) -> tuple[int, int]:
    """(real tokens, padded tokens) over micro-batches."""
    real = sum(e.length for b in batches for e in b)
    return real, sum(len(b) * max(e.length for e in b) for b in batches)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--min-response", type=int, default=8)
    p.add_argument("--max-response", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("overrides", nargs="*", help="config overrides")
    args = p.parse_args()

    from megatron_papo.parallel import destroy_model_parallel, initialize_model_parallel
    from megatron_papo.train import resolve_config
    from megatron_papo.trainer.batch import make_micro_batches
    from megatron_papo.trainer.loop import Trainer

    initialize_model_parallel(1, 1, seed=1)
    with tempfile.TemporaryDirectory() as out:
        cfg = resolve_config(CONFIG, [f"output_dir={out}", "sft_steps=0", f"rollout_batch_size={args.prompts}",
                                      f"global_batch_size={args.prompts}", "checkpoint.resume=none",
                                      f"micro_batch_size={args.micro_batch_size}", "rollout.max_prompt_tokens=1024",
                                      *args.overrides])
        trainer = Trainer(cfg, with_engine=False)
        exps = fixed_experiences(trainer, args.prompts)
        vary_responses(exps, min(trainer.model_cfg.bos_token_id, trainer.model_cfg.image_token_id),
                       args.min_response, args.max_response)
        budget = round(args.micro_batch_size * statistics.mean(e.length for e in exps))
        rows = {}
        for name, tokens in (("fixed", 0), ("tokens", budget)):
            trainer.cfg.micro_batch_tokens = tokens
            real, padded = padding(make_micro_batches(exps, args.micro_batch_size, tokens))
            times = []
            for _ in range(args.repeats + 1):  # the first round warms up
                start = time.perf_counter()
                trainer.compute_logprobs(exps)
                times.append(time.perf_counter() - start)
            rows[name] = (len(make_micro_batches(exps, args.micro_batch_size, tokens)), real, padded,
                          statistics.median(times[1:]))
    destroy_model_parallel()
    print(f"{len(exps)} sequences, responses {args.min_response}-{args.max_response} tokens; "
          f"fixed = {args.micro_batch_size} sequences, tokens = micro_batch_tokens={budget} (same mean size)")
    print(f"{'batching':<8} {'micro-batches':>14} {'real tokens':>12} {'padded tokens':>14} {'padding':>8} "
          f"{'log-prob passes s':>18}")
    for name, (count, real, padded, seconds) in rows.items():
        print(f"{name:<8} {count:>14} {real:>12} {padded:>14} {1 - real / padded:>8.1%} {seconds:>18.3f}")
    (_, rf, pf, tf), (_, rt, pt, tt) = rows["fixed"], rows["tokens"]
    print(f"padding_fixed={1 - rf / pf:.3f} padding_tokens={1 - rt / pt:.3f} time_ratio={tt / tf:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
