"""The PAPO / GRPO / DAPO objective: pure tensor math (advantages, losses, presets)."""
from megatron_papo.algos.advantages import dynamic_sampling_keep, fill_with_informative_groups, grpo_advantages, overlong_penalty
from megatron_papo.algos.config import PAPOConfig
from megatron_papo.algos.losses import (
                                            aggregate,
                                            count_global_tokens,
                                            k3,
                                            kl_penalty,
                                            papo_loss,
                                            papo_loss_from_logits,
                                            policy_loss,
)
from megatron_papo.algos.presets import load_preset, preset_names

__all__ = ["dynamic_sampling_keep", "fill_with_informative_groups", "grpo_advantages", "overlong_penalty", "PAPOConfig",
           "aggregate", "count_global_tokens", "k3", "kl_penalty", "papo_loss", "papo_loss_from_logits", "policy_loss",
           "load_preset", "preset_names"]
