"""Process groups, distributed init and the megatron-core CPU remedies."""
from megatron_papo.parallel.context import ParallelContext, RolloutTopology, check_rollout_tp
from megatron_papo.parallel.cpu_compat import apply_cpu_remedies, remedies_applied
from megatron_papo.parallel.distributed import collective_device, destroy_model_parallel, initialize_model_parallel
from megatron_papo.parallel.norm import RMSNorm

__all__ = ["ParallelContext", "RolloutTopology", "check_rollout_tp", "apply_cpu_remedies", "remedies_applied",
           "initialize_model_parallel", "destroy_model_parallel", "collective_device", "RMSNorm"]
