"""PAPO / GRPO / DAPO training of Qwen2.5-VL on megatron-core.

    torchrun --nproc-per-node N -m megatron_papo.train --config examples/configs/papo_tiny.yaml \\
        parallel.tp=2 parallel.pp=2 preset=papo_h steps=50

Options: the dataclasses in megatron_papo/trainer/config.py (and the sections they include), set by
the YAML file and then `section.key=value` overrides. `preset=<name>` picks the objective
(megatron_papo/algos/preset_configs/); `algo.*` keys override single fields of it. `--resume auto|none|PATH`
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
        return _error(e)
    if args.print_config:
        print(dump_yaml(cfg))
        return 0

    from megatron_papo.parallel import ParallelContext, destroy_model_parallel, initialize_model_parallel
    from megatron_papo.trainer import checkpoint as ckpt
    from megatron_papo.trainer.loop import Trainer

    try:
        check_layout(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        return _error(e)
    initialize_model_parallel(cfg.parallel.tp, cfg.parallel.pp, seed=cfg.seed)
    rank0 = int(os.environ.get("RANK", 0)) == 0
    try:
        resume_from = ckpt.preflight(cfg)  # before models and engine are built: a refusal costs seconds
        done = ckpt.read_train_state(resume_from)["step"] if resume_from is not None else -1
        if done >= cfg.steps:
            if rank0:
                print(f"nothing to do: checkpoint at step {done} >= steps={cfg.steps}", flush=True)
            return 0
        trainer = Trainer(cfg, ParallelContext.from_megatron(cfg.rollout.tp))
        try:
            trainer.run()
        finally:
            trainer.close()
    except ckpt.CheckpointError as e:
        return _error(e)
    finally:
        destroy_model_parallel()
    return 0


def _error(e: Exception) -> int:
    """A configuration error: one line, from rank 0 only (every rank finds it), exit code 2."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"error: {e}", file=sys.stderr)
    return 2


def check_layout(cfg) -> None:
    """The training and rollout layout against the job (torchrun's variables) and the model, before
    any process group or model exists."""
    import torch

    from megatron_papo.parallel.context import check_rollout_tp, ranks_per_host
    from megatron_papo.rollout.reshard import vllm_split_sizes
    from megatron_papo.trainer.build import model_config

    world = int(os.environ.get("WORLD_SIZE", 1))
    p = cfg.parallel
    if not torch.cuda.is_available():
        for name in ("bf16", "distributed_optimizer"):
            if getattr(p, name):
                raise ValueError(f"parallel.{name}=true needs CUDA: megatron-core's mixed-precision and distributed "
                                 f"optimizers wrap CUDA tensors only (set parallel.{name}=false on CPU)")
    if world % (p.tp * p.pp):
        raise ValueError(f"the job's {world} ranks are not divisible by parallel.tp * parallel.pp = {p.tp} * {p.pp}")
    dp = world // (p.tp * p.pp)
    per_update = cfg.global_batch_size * cfg.rollout.n
    if per_update % dp:  # each update splits its responses evenly over the data-parallel ranks
        raise ValueError(f"global_batch_size * rollout.n = {per_update} responses per update must divide over the "
                         f"{dp} data-parallel ranks (world / (parallel.tp * parallel.pp))")
    if cfg.sft_steps > 0 and cfg.sft_batch_size % dp:
        raise ValueError(f"sft_batch_size={cfg.sft_batch_size} must divide over the {dp} data-parallel ranks "
                         f"(world / (parallel.tp * parallel.pp))")
    m = model_config(cfg)
    if cfg.model.hf_dir:
        from megatron_papo.models.qwen2_5_vl.hf_io import HFReader

        HFReader(cfg.model.hf_dir)  # a missing or truncated safetensors shard, named before any rank loads it
    check_rollout_tp(cfg.rollout.tp, world, ranks_per_host(), vllm_split_sizes(m))


if __name__ == "__main__":
    sys.exit(main())
