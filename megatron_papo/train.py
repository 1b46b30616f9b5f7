"""PAPO / GRPO / DAPO training of Qwen2.5-VL on megatron-core.

    torchrun --nproc-per-node N -m megatron_papo.train --config examples/configs/papo_tiny.yaml \\
        parallel.tp=2 parallel.pp=2 preset=papo_h steps=50

Options: the dataclasses in megatron_papo/trainer/config.py (and the sections they include), set by
the YAML file and then `section.key=value` overrides. `preset=<name>` picks the objective
(examples/configs/presets/); `algo.*` keys override single fields of it. `--resume auto|none|PATH`
is checkpoint.resume. `--print-config` shows the resolved configuration and exits.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from megatron_papo.config import ConfigError, dump_yaml, load_config


def resolve_config(config_path: str | None, overrides: list[str]):
    from megatron_papo.algos import load_preset
    from megatron_papo.trainer.config import TrainConfig

    first = load_config(TrainConfig, config_path, overrides)  # only to learn the preset's name
    base = dataclasses.replace(TrainConfig(), preset=first.preset, algo=load_preset(first.preset))
    cfg = load_config(TrainConfig, config_path, overrides, base=base)
    cfg.validate()
    if not cfg.checkpoint.save_dir:
        cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(
            cfg.checkpoint, save_dir=os.path.join(cfg.output_dir, "checkpoints")))
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron_papo.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file (examples/configs/*.yaml)")
    parser.add_argument("--resume", help="auto | none | checkpoint directory (= checkpoint.resume)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    try:
        cfg = resolve_config(args.config, overrides)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_yaml(cfg))
        return 0

    from megatron_papo.parallel import destroy_model_parallel, initialize_model_parallel
    from megatron_papo.trainer import checkpoint as ckpt
    from megatron_papo.trainer.loop import Trainer

    initialize_model_parallel(cfg.parallel.tp, cfg.parallel.pp, seed=cfg.seed)
    rank0 = int(os.environ.get("RANK", 0)) == 0
    try:
        resume_from = ckpt.preflight(cfg)  # before models and engine are built: a refusal costs seconds
        done = ckpt.read_train_state(resume_from)["step"] if resume_from is not None else -1
        if done >= cfg.steps:
            if rank0:
                print(f"nothing to do: checkpoint at step {done} >= steps={cfg.steps}", flush=True)
            return 0
        Trainer(cfg).run()
    except ckpt.CheckpointError as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy_model_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
