"""The training run's configuration: one dataclass tree, read by megatron_papo.config.load_config.

Sections owned elsewhere are reused, not repeated: the objective (algos.PAPOConfig, chosen by
`preset`), the data (data.*Config), checkpoints and monitoring (trainer.checkpoint / metrics).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from megatron_papo.algos.config import PAPOConfig
from megatron_papo.data.dataset import DataConfig
from megatron_papo.data.processor import MaskConfig, ProcessorConfig
from megatron_papo.data.synthetic import SyntheticConfig
from megatron_papo.trainer.checkpoint import CheckpointConfig
from megatron_papo.trainer.metrics import MonitorConfig


def sft_seed(synthetic_seed: int) -> int:
    """The warm-up's synthetic seed: disjoint from the RL prompts', so RL prompts are new to the model."""
    return synthetic_seed + 1_000_003


@dataclass
class ModelConfig:
    flavor: str = "tiny"            # architecture from the flavor registry (ignored when hf_dir is set)
    hf_dir: str = ""                # start from this HF Qwen2.5-VL folder (weights converted on load)
    load: str = ""                  # or from a Megatron checkpoint written by tools/convert_hf_to_megatron.py
    freeze_vision: bool = False     # keep the vision tower fixed (then it is synced to vLLM once)
    ref_offload: bool = False       # GPU: keep the reference model in host memory between its forwards


@dataclass
class ParallelConfig:
    tp: int = 1                     # tensor-parallel size
    pp: int = 1                     # pipeline-parallel size (DP = world / (tp * pp))
    sequence_parallel: bool = False  # shard activations along the sequence in TP regions (needs tp > 1)
    recompute: bool = False         # full activation recomputation of every layer (needed at 72B)
    bf16: bool = False              # bf16 params + fp32 main weights (GPU; transformer-engine specs when TE imports,
                                    # fp32 runs the plain-torch specs)
    distributed_optimizer: bool = False  # shard optimizer state over DP (megatron distributed optimizer; GPU)


@dataclass
class RolloutConfig:
    tp: int = 1                     # ranks per vLLM engine: world / tp engines of tp consecutive ranks, each on
                                    # one host, share every step's prompts (parallel/context.py)
    n: int = 5                      # responses per prompt (PAPO: 5)
    temperature: float = 1.0        # sampling temperature (PAPO: 1.0)
    top_p: float = 0.99             # nucleus sampling (PAPO: 0.99)
    max_new_tokens: int = 2048      # response length cap (PAPO: 2048)
    max_prompt_tokens: int = 4096   # longest prompt (image tokens included); a longer one is an error naming the sample
    engine_dtype: str = "bfloat16"  # vLLM weights dtype ("float32" for exact CPU runs)
    gpu_memory_utilization: float = 0.5  # GPU: vLLM's share of memory while colocated with training
    bucket_mb: int = 256            # weight sync: bytes per bucket pushed into vLLM
    dynamic_sampling_max_tries: int = 4  # DAPO: extra rollout batches drawn to refill filtered groups
    dump: bool = False              # write each step's responses (token ids, rewards) to output_dir/rollouts/


@dataclass
class OptimConfig:
    lr: float = 1e-6                # AdamW learning rate (PAPO: 1e-6, constant)
    warmup_steps: int = 0           # linear warm-up steps, then constant
    weight_decay: float = 1e-2      # AdamW weight decay (PAPO: 1e-2)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8          # Adam's epsilon
    clip_grad: float = 1.0          # gradient-norm clip (PAPO: 1.0)


@dataclass
class ValidationConfig:
    """Held-out accuracy during a run: the engines answer the synthetic task's split at `seed` with the
    rollout's sampling (temperature, top_p, max_new_tokens), sample seeds from `seed` as
    `megatron_papo.eval --seed` draws them, so that tool reproduces a checkpoint's figure."""
    problems: int = 0               # held-out synthetic problems scored by the rollout engines before RL (the
                                    # SFT checkpoint) and after the last step; 0 = no validation
    k: int = 4                      # responses per problem: avg@k (mean accuracy) and pass@k
    seed: int = 777                 # synthetic seed of the validation split: never a training or warm-up seed
                                    # (checked), and not a seed the study evaluates on (its --eval-seed)
    interval: int = 0               # also after every this many RL steps (0: before RL and at the end only)


@dataclass
class TrainConfig:
    output_dir: str = "outputs/run"  # metrics, plots, tensorboard, checkpoints, vLLM's HF folder
    seed: int = 1                    # model init and rollout sampling (data order: data.seed / synthetic.seed; masks: mask.seed)
    steps: int = 100                 # RL steps (one rollout batch each)
    rollout_batch_size: int = 384    # prompts per RL step (PAPO: 384)
    global_batch_size: int = 128     # prompts per optimizer step (PAPO: 128 -> 640 responses)
    micro_batch_size: int = 4        # sequences per micro-batch per DP rank
    micro_batch_tokens: int = 0      # > 0: micro-batches by padded tokens instead (length-sorted, so little
                                     # padding; trainer/batch.py make_micro_batches). Used by the no-grad
                                     # log-prob passes, and by the update only with algo.loss_agg_mode=
                                     # global_token_mean (the other modes average per micro-batch, so their
                                     # loss would depend on where batches are cut)
    ppo_epochs: int = 1              # passes over each rollout batch (PAPO: 1)
    sft_steps: int = 0               # supervised warm-up steps on the synthetic task's targets before RL
    sft_lr: float = 1e-3             # learning rate of the warm-up
    sft_batch_size: int = 32         # samples per warm-up step
    reward: str = "papo"             # reward function (data/rewards.py REWARD_FNS): papo = 0.9 accuracy + 0.1 format
    preset: str = "papo_h"           # objective preset (megatron_papo/algos/preset_configs/<name>.yaml); `algo.*` overrides it
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    algo: PAPOConfig = field(default_factory=PAPOConfig)
    data: DataConfig = field(default_factory=DataConfig)          # file data (data.path); empty = synthetic
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    processor: ProcessorConfig = field(default_factory=ProcessorConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def validate(self) -> "TrainConfig":
        """Cross-field checks of the whole run (sections check their own fields when built)."""
        for name, value, low in (("steps", self.steps, 0), ("rollout_batch_size", self.rollout_batch_size, 1),
                                 ("global_batch_size", self.global_batch_size, 1),
                                 ("micro_batch_size", self.micro_batch_size, 1), ("ppo_epochs", self.ppo_epochs, 1),
                                 ("sft_steps", self.sft_steps, 0), ("rollout.max_new_tokens", self.rollout.max_new_tokens, 1),
                                 ("rollout.tp", self.rollout.tp, 1), ("parallel.tp", self.parallel.tp, 1),
                                 ("parallel.pp", self.parallel.pp, 1)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        from megatron_papo.data.rewards import REWARD_FNS

        if self.reward not in REWARD_FNS:
            raise ValueError(f"reward={self.reward!r} is not one of {sorted(REWARD_FNS)}")
        if self.rollout.n < 2:  # GRPO's advantage compares a prompt's responses with each other
            raise ValueError(f"rollout.n must be >= 2 (group-relative advantages need several responses per "
                             f"prompt), got {self.rollout.n}")
        if self.data.path and not os.path.isfile(self.data.path):
            raise ValueError(f"data.path={self.data.path}: no such file")
        resume = self.checkpoint.resume
        if resume not in ("auto", "none") and not os.path.isdir(resume):
            raise ValueError(f"checkpoint.resume={resume}: no such checkpoint directory (or use auto / none)")
        if self.rollout_batch_size % self.global_batch_size:
            raise ValueError(f"rollout_batch_size {self.rollout_batch_size} must be a multiple of "
                             f"global_batch_size {self.global_batch_size}")
        if self.micro_batch_tokens < 0:
            raise ValueError(f"micro_batch_tokens must be >= 0 (0 = micro_batch_size sequences), got {self.micro_batch_tokens}")
        if not 0 <= self.rollout.dynamic_sampling_max_tries < 1000:  # a step's rollout seeds: step * 1000 + try
            raise ValueError(f"rollout.dynamic_sampling_max_tries must be in [0, 999] (a step's draws are seeded "
                             f"step * 1000 + try), got {self.rollout.dynamic_sampling_max_tries}")
        if self.parallel.sequence_parallel and self.parallel.tp == 1:
            raise ValueError("parallel.sequence_parallel=true needs parallel.tp > 1")
        if self.algo.overlong_buffer_len > self.rollout.max_new_tokens:
            raise ValueError(f"algo.overlong_buffer_len={self.algo.overlong_buffer_len} exceeds rollout.max_new_tokens="
                             f"{self.rollout.max_new_tokens}: the penalty's buffer ends at the response limit")
        v = self.validation
        if v.problems < 0 or v.k < 1 or v.interval < 0:
            raise ValueError(f"validation: problems >= 0, k >= 1 and interval >= 0 expected, got problems={v.problems}, "
                             f"k={v.k}, interval={v.interval}")
        if v.problems and self.data.path:
            raise ValueError(f"validation.problems={v.problems}: validation scores the synthetic task's split, but "
                             f"data.path={self.data.path!r} trains on a data file; set validation.problems=0")
        if v.problems and v.seed in (self.synthetic.seed, sft_seed(self.synthetic.seed)):
            raise ValueError(f"validation.seed={v.seed} is a seed the run trains on (synthetic.seed={self.synthetic.seed}, "
                             f"warm-up seed {sft_seed(self.synthetic.seed)}): choose another")
        if self.sft_steps and self.data.path:
            raise ValueError("sft_steps > 0 warms up on the synthetic task's targets; set sft_steps=0 with data.path")
        return self
