"""Worker for tests/test_checkpoint.py: `python checkpoint_kill.py MODE OUT [key=value ...]` builds the
trainer (tiny model, no rollout engine) with the overrides and runs MODE (below).

`python checkpoint_kill.py serve` does the imports once, then reads one job per stdin line
({"mode", "out", "extra", "log"}) and runs each in a forked child of its own: the child starts a
new process group, writes its output to "log" and ends as the job ends (SIGKILLed where the mode
says so). The server answers {"pid": <child>} as the child starts and {"rc": <exit status>} when it
has ended, negative for a signal as in subprocess. The imports are most of a job's time.

Modes:

    save             a complete checkpoint of step 1 of a trainer moved off its seeded start (weights of
                     policy and reference perturbed, one optimizer step, three scheduler steps, 3 prompts
                     drawn), then a save of step 2 SIGKILLed right after megatron-core wrote its files
                     (before our rename); OUT/state_fresh.pt and OUT/state_saved.pt hold `state`
                     as built and as saved
    load             resume as the trainer does, print the step and a weight checksum, write
                     OUT/state_loaded.pt
    step1            a checkpoint of step 1
    prune            (with checkpoint.keep_last=1) checkpoints of steps 1, 2, 3; SIGKILLed while the save of
                     step 3 deletes step 2, after it deleted two files
    optim            one optimizer step on seeded gradients (Adam moments exist), then a checkpoint of step 1
    load_save        resume, then save the next step (under torchrun: at another layout)
    preflight        only megatron_papo.train's checks before a run (print the checkpoint it would resume)
    poison_objects   a checkpoint of step 1 whose RNG state is a pickle that writes OUT/pwned when loaded
    poison_metadata  a checkpoint of step 1 whose .metadata is such a pickle
"""
import json
import os
import pickle
import shutil
import signal
import sys
from pathlib import Path

import torch

# Also what tests pass to `python -m megatron_papo.train`, whose config must match the worker's.
OVERRIDES = ["sft_steps=0", "rollout_batch_size=4", "global_batch_size=4", "monitor.tensorboard=false",
             "monitor.plots=false", "checkpoint.keep_last=0", "rollout.n=2", "rollout.max_new_tokens=8",
             "rollout.max_prompt_tokens=256",
             "synthetic.image_size=56", "processor.min_pixels=3136", "processor.max_pixels=12544"]


def trainer(out: str, extra=()):
    from megatron_papo.parallel import initialize_model_parallel
    from megatron_papo.train import resolve_config
    from megatron_papo.trainer.loop import Trainer

    cfg = resolve_config(None, [f"output_dir={out}", *OVERRIDES, *extra])
    initialize_model_parallel(cfg.parallel.tp, cfg.parallel.pp, seed=cfg.seed)
    return Trainer(cfg, with_engine=False)


def checksum(t) -> float:
    return float(sum(p.double().sum() for p in t.models.policy[0].module.parameters()))


def state(t) -> dict:
    """What a resume must restore, by name: every tensor of the checkpointed modules, the Adam state of
    every parameter and the optimizer's param-group numbers (lr, ...), the scheduler's numbers, this
    rank's RNG states and the data position."""
    from megatron_papo.trainer.checkpoint import rng_state

    out = {f"{name}.{k}": v.detach().clone() for name, m in t.models.checkpoint_modules().items()
           for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}
    names = {p: n for n, p in t.models.policy[0].module.named_parameters()}
    for i, inner in enumerate(getattr(t.optimizer, "chained_optimizers", [t.optimizer])):
        for j, group in enumerate(inner.optimizer.param_groups):
            out.update({f"optimizer{i}.group{j}.{k}": torch.tensor(float(v), dtype=torch.float64)
                        for k, v in group.items() if isinstance(v, (int, float))})
            for p in group["params"]:
                for k, v in inner.optimizer.state.get(p, {}).items():
                    out[f"optimizer{i}.{names[p]}.{k}"] = torch.as_tensor(v).clone()
    out.update({f"scheduler.{k}": torch.tensor(float(v), dtype=torch.float64)
                for k, v in t.scheduler.state_dict().items() if isinstance(v, (int, float))})
    out.update({f"rng.{k}": v.clone() for k, v in rng_state().items()})
    out["data"] = json.dumps(t.data.state_dict(), sort_keys=True)
    return out


class WritesMarker:
    """Unpickling it runs code: it writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def main(mode: str, out: str, extra: list[str]) -> None:
    from megatron.core import dist_checkpointing

    if mode == "preflight":
        from megatron_papo.parallel import initialize_model_parallel
        from megatron_papo.train import resolve_config
        from megatron_papo.trainer.checkpoint import preflight

        cfg = resolve_config(None, [f"output_dir={out}", *OVERRIDES, *extra])
        initialize_model_parallel(cfg.parallel.tp, cfg.parallel.pp, seed=cfg.seed)
        print(f"resume from: {preflight(cfg)}", flush=True)
        return
    t = trainer(out, extra)
    marker = Path(out) / "pwned"
    if mode == "save":
        torch.save(state(t), Path(out) / "state_fresh.pt")
        generator = torch.Generator().manual_seed(123)
        with torch.no_grad():  # what a process that builds the same seeded model does not have
            for name, m in t.models.checkpoint_modules().items():
                for p in m.parameters():
                    p.add_(torch.randn(p.shape, generator=generator))
        for p in t.models.policy[0].module.parameters():
            p.main_grad.copy_(torch.randn(p.shape, generator=generator))
        t.optimizer.step()
        for _ in range(3):
            t.scheduler.step(increment=1)
        t.data.next_batch(3)
        t.state.step = 1
        t._save()
        torch.save(state(t), Path(out) / "state_saved.pt")
        print(f"saved step 1 checksum={checksum(t)!r}", flush=True)
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
    if mode == "poison_objects":
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        original = dist_checkpointing.save

        def save_poisoned(sd, *args, **kwargs):
            # what an attacker ships: the RNG state as an object (megatron-core pickles those)
            sd["rng_state"] = ShardedObject("rng_state", WritesMarker(marker), (1, 1, 1), (0, 0, 0), replica_id=0)
            original(sd, *args, **kwargs)

        dist_checkpointing.save = save_poisoned
    if mode == "prune":
        for step in (1, 2):
            t.state.step = step
            t._save()
        rmtree = shutil.rmtree

        def rmtree_then_die(path, *args, **kwargs):
            if Path(path).name.startswith("step_00000002"):
                for f in sorted(Path(path).iterdir())[:2]:
                    f.unlink()
                os.kill(os.getpid(), signal.SIGKILL)
            rmtree(path, *args, **kwargs)

        shutil.rmtree = rmtree_then_die
        t.state.step = 3
        t._save()
        raise AssertionError("unreachable: the pruning of step 2 should have been killed")
    if mode == "optim":
        torch.manual_seed(0)
        for p in t.models.policy[0].module.parameters():
            p.main_grad.copy_(torch.randn_like(p.main_grad))
        t.optimizer.step()
    if mode in ("step1", "optim"):
        t.state.step = 1
        t._save()
        print(f"saved step 1 checksum={checksum(t)!r}", flush=True)
        return
    if mode in ("poison_objects", "poison_metadata"):
        t.state.step = 1
        t._save()
        if mode == "poison_metadata":
            (Path(out) / "checkpoints" / "step_00000001" / ".metadata").write_bytes(pickle.dumps(WritesMarker(marker)))
        assert not marker.exists()
        print("poisoned checkpoint written", flush=True)
        return
    print(f"resumed step {t.state.step} checksum={checksum(t)!r}", flush=True)
    if mode == "load":
        torch.save(state(t), Path(out) / "state_loaded.pt")
    if mode == "load_save":
        t.state.step += 1
        t._save()


def serve() -> None:
    import megatron.core.dist_checkpointing  # noqa: F401  the imports every job needs, done once

    import megatron_papo.train  # noqa: F401
    import megatron_papo.trainer.loop  # noqa: F401

    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the job: its own group (the test checks what outlives it), its own output
            os.setpgid(0, 0)
            fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = 0
            try:
                main(job["mode"], job["out"], job["extra"])
            except BaseException:
                import traceback
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        status = os.waitpid(pid, 0)[1]
        print(json.dumps({"rc": -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)}),
              flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve()
    else:
        main(sys.argv[1], sys.argv[2], sys.argv[3:])
