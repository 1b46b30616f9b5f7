"""Worker for tests/test_checkpoint.py. `save OUT`: a complete checkpoint of step 1, then a save of
step 2 that is SIGKILLed right after megatron-core wrote its files (before our rename/`latest`).
`load OUT`: resume as the trainer does and print the step and a weight checksum."""
import os
import signal
import sys

import torch


def trainer(out: str):
    from megatron_papo.parallel import initialize_model_parallel
    from megatron_papo.train import resolve_config
    from megatron_papo.trainer.loop import Trainer

    cfg = resolve_config(None, [f"output_dir={out}", "sft_steps=0", "rollout_batch_size=4", "global_batch_size=4",
                                "monitor.tensorboard=false", "checkpoint.keep_last=0"])
    initialize_model_parallel(1, 1, seed=1)
    return Trainer(cfg, with_engine=False)


def checksum(t) -> float:
    return float(sum(p.double().sum() for p in t.models.policy[0].module.parameters()))


def main(mode: str, out: str) -> None:
    t = trainer(out)
    if mode == "save":
        t.state.step = 1
        t._save()
        print(f"saved step 1 checksum={checksum(t)!r}", flush=True)
        from megatron.core import dist_checkpointing

        original = dist_checkpointing.save

        def save_then_die(*args, **kwargs):
            original(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)  # the files of step 2 exist, the rename has not happened

        dist_checkpointing.save = save_then_die
        with torch.no_grad():
            for p in t.models.policy[0].module.parameters():
                p.add_(1.0)
        t.state.step = 2
        t._save()
        raise AssertionError("unreachable: the save of step 2 should have been killed")
    print(f"resumed step {t.state.step} checksum={checksum(t)!r}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
