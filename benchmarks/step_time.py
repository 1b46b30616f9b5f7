"""Time of one PAPO step vs one GRPO step on the same batch, per phase, excluding the rollout.

The batch is fixed (synthetic-task prompts, their reference responses, seeded random rewards), so
both objectives see identical data; the phases are the trainer's own methods (the no-grad
log-prob passes and the PPO update). PAPO's extra cost is the masked half of the old-policy
forward over [real; masked] (reference mode); in exact mode the masked branch rides in the update's
forward instead.

    python benchmarks/step_time.py [--repeats 3] [--prompts 16] [key=value overrides]

Last line: `papo_over_grpo=<(logprobs + train) PAPO / GRPO>` (goal <= 1.20: one more no-grad
forward, benchmarks/summary.py).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

CONFIG = os.path.join(os.path.dirname(__file__), "..", "examples", "configs", "papo_tiny.yaml")


def fixed_experiences(trainer, prompts: int, seed: int = 0):
    """n copies of each prompt's reference response, with seeded random rewards -> advantages."""
    from megatron_papo.algos import grpo_advantages
    from megatron_papo.trainer.batch import Experience

    cfg, n = trainer.cfg, trainer.cfg.rollout.n
    gen = torch.Generator().manual_seed(seed)
    exps = []
    for g, sample in enumerate(trainer.data.next_sft_batch(prompts)):
        enc = trainer.processor.encode_sample(sample, mask=cfg.mask)
        response = trainer.processor.tokenizer(sample.target, add_special_tokens=False)["input_ids"]
        response = response + [trainer.model_cfg.eos_token_id]
        for _ in range(n):
            reward = float(torch.rand((), generator=gen) < 0.5)
            exps.append(Experience(sample_id=sample.sample_id, group=g, prompt_ids=enc.input_ids.tolist(),
                                   response_ids=response, pixel_values=enc.pixel_values,
                                   masked_pixel_values=enc.masked_pixel_values, image_grid_thw=enc.image_grid_thw,
                                   rollout_logp=[0.0] * len(response), reward=reward, accuracy=reward))
    for e, a in zip(exps, grpo_advantages(torch.tensor([e.reward for e in exps]), n).tolist()):
        e.advantage = a
    return exps


def time_preset(preset: str, overrides: list[str], prompts: int, repeats: int) -> dict[str, float]:
    from megatron_papo.train import resolve_config
    from megatron_papo.trainer.loop import Trainer

    with tempfile.TemporaryDirectory() as out:
        cfg = resolve_config(CONFIG, [f"output_dir={out}", f"preset={preset}", "sft_steps=0",
                                      f"rollout_batch_size={prompts}", f"global_batch_size={prompts}",
                                      "checkpoint.resume=none", *overrides])
        trainer = Trainer(cfg, with_engine=False)
        exps = fixed_experiences(trainer, prompts)
        times = {"logprobs": [], "train": []}
        for _ in range(repeats + 1):  # the first round warms up allocators and caches
            t0 = time.perf_counter()
            trainer.compute_logprobs(exps)
            t1 = time.perf_counter()
            trainer.update(exps)
            t2 = time.perf_counter()
            times["logprobs"].append(t1 - t0)
            times["train"].append(t2 - t1)
        return {k: statistics.median(v[1:]) for k, v in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--papo-preset", default="papo_h")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. synthetic.image_size=112")
    args = p.parse_args()

    from megatron_papo.parallel import destroy_model_parallel, initialize_model_parallel

    initialize_model_parallel(1, 1, seed=1)
    base = ["synthetic.image_size=112", "processor.max_pixels=12544", *args.overrides]
    grpo = time_preset("grpo", base, args.prompts, args.repeats)
    papo = time_preset(args.papo_preset, base, args.prompts, args.repeats)
    destroy_model_parallel()
    print(f"{'phase':<10} {'grpo s':>9} {args.papo_preset + ' s':>9} {'ratio':>7}")
    for phase in ("logprobs", "train"):
        print(f"{phase:<10} {grpo[phase]:>9.3f} {papo[phase]:>9.3f} {papo[phase] / grpo[phase]:>7.2f}")
    g, q = sum(grpo.values()), sum(papo.values())
    print(f"{'total':<10} {g:>9.3f} {q:>9.3f} {q / g:>7.2f}")
    print(f"papo_over_grpo={q / g:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
