"""Worker for tests/test_train.py: `python failing_step.py ARGS...` runs `megatron_papo.train` with
ARGS, its RL step replaced by one that raises, as a bug inside a step would."""
import sys

from megatron_papo.trainer.loop import Trainer


def failing_step(self, step: int):
    raise RuntimeError(f"step {step} failed on purpose (tests/dist/failing_step.py)")


if __name__ == "__main__":  # the engine's worker processes import this file too
    from megatron_papo.train import main

    Trainer.rl_step = failing_step
    sys.exit(main(sys.argv[1:]))
