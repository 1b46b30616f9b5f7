"""Time of one PAPO step vs one GRPO step on the same batch, per phase, excluding the rollout.

The batch is fixed (synthetic-task prompts, their reference responses, seeded random rewards), so
both objectives see identical data; the phases are the trainer's own methods (the no-grad
log-prob passes and the PPO update). PAPO's extra cost is the masked half of the old-policy
forward over [real; masked] (reference mode); in exact mode the masked branch rides in the update's
forward instead.

    python benchmarks/step_time.py [--repeats 11] [--prompts 16] [key=value overrides]

The objectives, and a second GRPO as the run's noise floor, are built in one process and timed in
interleaved rounds (module code: why).
Last line: `papo_over_grpo=<(logprobs + train) PAPO / GRPO, CPU time> papo_over_grpo_wall=<same,
wall clock> grpo_over_grpo=<the second GRPO / the first, CPU time: 1 but for noise>
one_forward_more=<1 + one GRPO no-grad forward / the GRPO step: PAPO's floor, from this run's times>`
(goal for the first <= 1.20, the issue's estimate of that floor: benchmarks/summary.py).
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


def build(preset: str, overrides: list[str], prompts: int, out: str):
    from megatron_papo.train import resolve_config
    from megatron_papo.trainer.loop import Trainer

    cfg = resolve_config(CONFIG, [f"output_dir={out}", f"preset={preset}", "sft_steps=0",
                                  f"rollout_batch_size={prompts}", f"global_batch_size={prompts}",
                                  "checkpoint.resume=none", "validation.problems=0", *overrides])
    trainer = Trainer(cfg, with_engine=False)
    return trainer, fixed_experiences(trainer, prompts)


def one_round(trainer, exps) -> dict[str, float]:
    """Seconds of the two phases, wall clock and this process's CPU time (one thread per op here:
    OMP_NUM_THREADS=1, so CPU time is what the work cost, whatever else the machine was doing)."""
    w0, c0 = time.perf_counter(), time.process_time()
    trainer.compute_logprobs(exps)
    w1, c1 = time.perf_counter(), time.process_time()
    trainer.update(exps)
    w2, c2 = time.perf_counter(), time.process_time()
    return {"logprobs": w1 - w0, "train": w2 - w1, "cpu/logprobs": c1 - c0, "cpu/train": c2 - c1}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--repeats", type=int, default=11, help="rounds of each objective (after one warm-up round)")
    p.add_argument("--papo-preset", default="papo_h")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. synthetic.image_size=112")
    args = p.parse_args()
    if args.papo_preset == "grpo":
        p.error("--papo-preset grpo: GRPO against GRPO is already in every run (grpo_over_grpo)")

    from megatron_papo.parallel import destroy_model_parallel, initialize_model_parallel

    initialize_model_parallel(1, 1, seed=1)
    base = ["synthetic.image_size=112", "processor.max_pixels=12544", *args.overrides]
    # A second GRPO trainer, timed like the others, is the run's own noise floor (the same work twice).
    presets = {"grpo": "grpo", "grpo_again": "grpo", args.papo_preset: args.papo_preset}
    names = list(presets)
    with tempfile.TemporaryDirectory() as out:
        jobs = {name: build(presets[name], base, args.prompts, os.path.join(out, name)) for name in names}
        rounds = {name: [] for name in names}
        # Interleaved, in rotating order, so all objectives see the same machine (load, caches, clock)
        # over the run instead of one after the other; the first round of each warms up.
        for r in range(args.repeats + 1):
            for name in names[r % len(names):] + names[:r % len(names)]:
                rounds[name].append(one_round(*jobs[name]))
    destroy_model_parallel()
    med = {name: {k: statistics.median(x[k] for x in rs[1:]) for k in rs[0]} for name, rs in rounds.items()}
    print(f"{'phase':<14} " + " ".join(f"{name + ' s':>13}" for name in names)
          + f" {'ratio':>7}   (medians of {args.repeats} interleaved rounds; ratio: {names[2]} / grpo)")
    total = {name: {"total (wall)": m["logprobs"] + m["train"], "total (cpu)": m["cpu/logprobs"] + m["cpu/train"]}
             for name, m in med.items()}
    for phase in ("logprobs", "train", "cpu/logprobs", "cpu/train", "total (wall)", "total (cpu)"):
        values = [{**med[name], **total[name]}[phase] for name in names]
        print(f"{phase:<14} " + " ".join(f"{v:>13.3f}" for v in values) + f" {values[2] / values[0]:>7.2f}")
    cpu = total[names[2]]["total (cpu)"] / total["grpo"]["total (cpu)"]
    wall = total[names[2]]["total (wall)"] / total["grpo"]["total (wall)"]
    control = total["grpo_again"]["total (cpu)"] / total["grpo"]["total (cpu)"]
    # GRPO's log-prob phase is two forwards of the same architecture (old policy, reference): PAPO's
    # floor is one more of them
    theory = 1 + med["grpo"]["cpu/logprobs"] / 2 / total["grpo"]["total (cpu)"]
    print(f"papo_over_grpo={cpu:.3f} papo_over_grpo_wall={wall:.3f} grpo_over_grpo={control:.3f} "
          f"one_forward_more={theory:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
