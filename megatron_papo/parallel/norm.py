"""RMSNorm for local (non-TE) layer specs that also works with sequence parallelism.

megatron-core's WrappedTorchNorm refuses sequence parallel without TE/apex (0.16.1) only because
it cannot mark its weight for the TP all-reduce of norm grads; this module marks it
(`param.sequence_parallel = True`, which megatron's finalize_model_grads all-reduces over TP).
The math is Qwen2's RMSNorm: normalise in fp32, cast back, then scale.
"""
import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)
