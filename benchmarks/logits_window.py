"""The output layer on the loss's window only vs on every position, in one trainer's RL step.

Losses read response positions only, so the trainer asks the model for logits from each
micro-batch's shortest prompt's last token on (`MicroBatch.logits_start`,
`Qwen2_5_VLModel.forward(logits_from=...)`); the prompt (here mostly image tokens) still runs through
every layer but skips the output layer and the log-prob ops. The peer path computes logits at every
position, as megatron's GPTModel does by default (verl and NeMo-RL then slice the response). Both run
on the same GRPO trainer and batch (step_time.py's: synthetic-task prompts, reference responses),
in interleaved rounds of the no-grad log-prob passes plus the update; the log-probs must agree.

    python benchmarks/logits_window.py [--repeats 7] [--prompts 16] [key=value overrides]

Last line: `window_time_ratio=<window / every position, CPU time of the step>
window_logits_ratio=<logits elements computed, window / every position>`
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from step_time import build, one_round  # noqa: E402


@contextlib.contextmanager
def every_position():
    """The peer path: every micro-batch's logits start at position 0."""
    from megatron_papo.trainer.batch import MicroBatch

    window = MicroBatch.logits_start
    MicroBatch.logits_start = lambda self, multiple=1: 0
    try:
        yield
    finally:
        MicroBatch.logits_start = window


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7, help="rounds of each path (after one warm-up round)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. synthetic.image_size=112")
    args = p.parse_args()

    from megatron_papo.parallel import destroy_model_parallel, initialize_model_parallel

    initialize_model_parallel(1, 1, seed=1)
    base = ["synthetic.image_size=112", "processor.max_pixels=12544", *args.overrides]
    with tempfile.TemporaryDirectory() as out:
        trainer, exps = build("grpo", base, args.prompts, out)
        counted: list[int] = []
        output_layer = trainer.models.policy[0].module.language_model.output_layer
        output_layer.register_forward_hook(lambda _, __, result: counted.append(result[0].numel()))
        # the same weights for both paths' log-probs: they must agree
        trainer.compute_logprobs(exps)
        window_logp = [e.old_logp.clone() for e in exps]
        with every_position():
            trainer.compute_logprobs(exps)
        diff = max((a - e.old_logp).abs().max().item() for a, e in zip(window_logp, exps))
        if diff > 1e-5:
            raise SystemExit(f"log-probs of the two paths differ by {diff:.2e}")
        rounds = {"window": [], "every position": []}
        for r in range(args.repeats + 1):  # alternating order; the first round of each warms up
            for name in (list(rounds) if r % 2 == 0 else list(rounds)[::-1]):
                counted.clear()
                with every_position() if name == "every position" else contextlib.nullcontext():
                    times = one_round(trainer, exps)
                rounds[name].append({"logprobs": times["cpu/logprobs"], "train": times["cpu/train"],
                                     "logits": float(sum(counted))})
    destroy_model_parallel()
    med = {name: {k: statistics.median(x[k] for x in rs[1:]) for k in rs[0]} for name, rs in rounds.items()}
    for m in med.values():
        m["step"] = m["logprobs"] + m["train"]
    print(f"{'CPU s':<10} {'window':>10} {'every pos.':>10} {'ratio':>7}   (medians of {args.repeats} rounds; "
          f"log-probs agree to {diff:.1e})")
    for key in ("logprobs", "train", "step", "logits"):
        a, b = med["window"][key], med["every position"][key]
        print(f"{key:<10} {a:>10.4g} {b:>10.4g} {a / b:>7.3f}")
    time_ratio = med["window"]["step"] / med["every position"]["step"]
    logits_ratio = med["window"]["logits"] / med["every position"]["logits"]
    print(f"window_time_ratio={time_ratio:.3f} window_logits_ratio={logits_ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
