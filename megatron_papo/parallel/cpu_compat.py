"""Remedies for megatron-core's CUDA assumptions, applied only when CUDA is absent.

On a GPU machine `apply_cpu_remedies()` returns False and changes nothing. On CPU (gloo) it:
  1. gives every loaded `megatron.core.*` module a view of `torch` (`_CpuTorch`) in which
     `torch.cuda.current_device()` is the CPU, `synchronize`/`current_stream` are no-ops and
     factory functions map device="cuda" to the CPU (megatron-core 0.16.1: rotary embedding,
     tensor_parallel layers/mappings, p2p + schedules, optimizer, clip_grads, dist_checkpointing);
  2. makes the model-parallel RNG tracker keep CPU generator states (`CpuRNGStatesTracker`);
     TP>1 attention always forks it and `model_parallel_cuda_manual_seed` needs CUDA (0.16.1);
  3. lets clip_grad_by_total_norm_fp32 accept CPU grads (it asserts 'torch.cuda.FloatTensor', 0.16.1);
  4. gives gloo a reduce_scatter_tensor (gloo lacks it; sequence parallel needs it; 0.16.1);
  5. lets LanguageModule.setup_embeddings_and_output_layer (tied embeddings with PP > 1) keep the
     weight on CPU: it calls `weight.data.cuda()` (0.16.1).
The bf16 optimizers (Float16Optimizer, DistributedOptimizer) still test `param.type()` against
'torch.cuda.*': CPU training uses fp32 params (FP32Optimizer), so that path is left alone.
Sequence parallel without TE/apex is handled by `megatron_papo.parallel.norm.RMSNorm`, not here.
dist_checkpointing save needs psutil (it is a dependency) and spawns processes: scripts need an
`if __name__ == "__main__":` guard.
"""
from __future__ import annotations

import contextlib
import importlib
import sys

import torch
import torch.distributed as dist

_APPLIED = False

# megatron-core modules whose code we run; imported before the `torch` view is installed.
_MEGATRON_MODULES = (
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.dist_checkpointing",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.distributed",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.transformer.utils",
)


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int) or torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


class _NullStream:
    """Stands in for a CUDA stream: every call is a no-op."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _CpuCuda:
    """`torch.cuda` as megatron-core sees it on CPU; anything not overridden is the real one."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return torch.device("cpu")

    @staticmethod
    def synchronize(*args, **kwargs):
        return None

    @staticmethod
    def current_stream(*args, **kwargs):
        return _NullStream()

    default_stream = current_stream

    @staticmethod
    def stream(*args, **kwargs):
        return contextlib.nullcontext()


def _on_cpu(factory):
    def wrapped(*args, device=None, **kwargs):
        return factory(*args, device=_cpu_device(device), **kwargs)

    wrapped.__name__ = factory.__name__
    return wrapped


class _CpuTorch:
    """`torch` as megatron-core modules see it on CPU (see the module docstring, item 1)."""

    cuda = _CpuCuda()

    def __getattr__(self, name):
        return getattr(torch, name)


for _name in ("zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint"):
    setattr(_CpuTorch, _name, staticmethod(_on_cpu(getattr(torch, _name))))

CPU_TORCH = _CpuTorch()


class CpuRNGStatesTracker:
    """Model-parallel RNG tracker on the CPU generator (same interface as megatron's tracker).

    `fork(name)` swaps the default CPU generator's state with the named one, so dropout inside a
    TP region draws from a per-TP-rank stream, exactly as megatron does with CUDA generators.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = states

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"rng seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _get_cpu_rng_state(device=None, clone=False, graph_safe=False):
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _reduce_scatter_tensor(output, input_, group=None, op=dist.ReduceOp.SUM, async_op=False):
    """reduce_scatter_tensor for backends without it (gloo): all-reduce, keep this rank's slice."""
    if dist.get_backend(group) != "gloo":
        return dist.reduce_scatter_tensor(output, input_, op=op, group=group, async_op=async_op)
    summed = input_.clone()
    dist.all_reduce(summed, op=op, group=group)
    output.copy_(summed.chunk(dist.get_world_size(group))[dist.get_rank(group)])
    return None


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """CPU version of megatron's clip_grad_by_total_norm_fp32 (same math, no CUDA type assert)."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff >= 1.0:
        return
    for param in parameters:
        grad = param.decoupled_grad if use_decoupled_grad else param.grad
        if grad is not None:
            grad.detach().mul_(clip_coeff)


def _tensor_stays_on_cpu(method):
    """Run `method` with Tensor.cuda() returning the tensor itself (only for that call)."""
    def wrapped(*args, **kwargs):
        saved = torch.Tensor.cuda
        torch.Tensor.cuda = lambda tensor, *a, **k: tensor
        try:
            return method(*args, **kwargs)
        finally:
            torch.Tensor.cuda = saved

    return wrapped


def seed_model_parallel_rng(seed: int, tp_rank: int, ep_rank: int = 0, etp_rank: int = 0) -> None:
    """model_parallel_cuda_manual_seed for CPU: the same seeds, on CPU generator states."""
    from megatron.core.tensor_parallel import random as mp_random

    torch.manual_seed(seed)
    tracker = mp_random.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add(mp_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)


def remedies_applied() -> bool:
    return _APPLIED


def apply_cpu_remedies() -> bool:
    """Apply the remedies once when CUDA is absent; returns whether they are (now) in effect."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    for name in _MEGATRON_MODULES:
        importlib.import_module(name)
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and getattr(module, "torch", None) is torch:
            module.torch = CPU_TORCH

    from megatron.core.optimizer import clip_grads
    from megatron.core.tensor_parallel import mappings
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = _get_cpu_rng_state
    mp_random._set_cuda_rng_state = _set_cpu_rng_state
    mp_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mp_random.model_parallel_cuda_manual_seed = (
        lambda seed, *args, **kwargs: seed_model_parallel_rng(seed, _tp_rank()))

    mappings.dist_reduce_scatter_func = _reduce_scatter_tensor
    from megatron.core.models.common.language_module.language_module import LanguageModule
    LanguageModule.setup_embeddings_and_output_layer = _tensor_stays_on_cpu(
        LanguageModule.setup_embeddings_and_output_layer)
    original_clip = clip_grads.clip_grad_by_total_norm_fp32  # before the loop rebinds clip_grads' own name
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and getattr(module, "clip_grad_by_total_norm_fp32", None) is original_clip:
            module.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    _APPLIED = True
    return True


def _tp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank()
