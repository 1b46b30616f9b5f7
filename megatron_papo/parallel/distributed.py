"""Distributed + megatron-core model-parallel initialisation: the one entry the trainer and tools call."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from megatron_papo.parallel.cpu_compat import apply_cpu_remedies, seed_model_parallel_rng


def initialize_model_parallel(tp: int = 1, pp: int = 1, seed: int = 1234, backend: str | None = None,
                              timeout_s: float = 600.0):
    """Init torch.distributed from the torchrun env (gloo on CPU, nccl on GPU), apply the CPU
    remedies when CUDA is absent, init megatron's parallel_state (DP = world / (tp * pp)) and seed
    the model-parallel RNG tracker. Returns megatron's ProcessGroupCollection for this rank.
    Without torchrun env vars it runs as a single rank (world size 1)."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    on_cpu = apply_cpu_remedies()
    if not dist.is_initialized():
        # kept set for a single rank too: the vLLM engine names its shared memory after them
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if not on_cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        # a single rank needs no TCP store: the port picked above can be taken (by another job's
        # connection) before a store listens on it, which failed runs started side by side
        store = dist.HashStore() if world == 1 else None
        dist.init_process_group(backend or ("gloo" if on_cpu else "nccl"), rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s), store=store)
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by tp*pp = {tp}*{pp}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    if on_cpu:
        seed_model_parallel_rng(seed, parallel_state.get_tensor_model_parallel_rank())
    else:
        model_parallel_cuda_manual_seed(seed)
    return ProcessGroupCollection.use_mpu_process_groups()


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where a tensor must live for a collective on `group` (None: the default group): NCCL reduces
    CUDA tensors only, gloo CPU tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def destroy_model_parallel() -> None:
    """Tear down megatron's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
