"""Building what the loop runs: models (policy + reference), optimizer + LR schedule, data, the
rollout engine and the weight sync into it. One function per thing, called from trainer/loop.py."""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_papo.data.dataset import PapoDataset, ResumableIterator
from megatron_papo.data.processor import VLProcessor
from megatron_papo.data.synthetic import SyntheticConfig, SyntheticShapes
from megatron_papo.models.qwen2_5_vl.dist_io import load_dist_checkpoint
from megatron_papo.models.qwen2_5_vl.flavors import Qwen2_5_VLConfig, get_flavor
from megatron_papo.models.qwen2_5_vl.hf_io import HFReader, load_hf_weights, read_hf_config
from megatron_papo.models.qwen2_5_vl.model import ModelParallelOptions, build_model
from megatron_papo.parallel.context import ParallelContext
from megatron_papo.rollout.engine import RolloutRequest, SamplingConfig
from megatron_papo.trainer.config import TrainConfig, sft_seed


# ------------------------------------------------------------------ models
@dataclass
class Models:
    model_cfg: Qwen2_5_VLConfig
    processor: VLProcessor
    policy: list                      # DDP-wrapped pipeline stage (a list: megatron's model-chunk API)
    reference: torch.nn.Module | None  # frozen copy for the KL to the reference policy (None when beta = 0)
    offload_reference: bool = False

    def sampling(self, cfg: TrainConfig) -> SamplingConfig:
        r = cfg.rollout
        return SamplingConfig(n=r.n, temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
                              stop_token_ids=[self.model_cfg.eos_token_id], seed=cfg.seed)

    @torch.no_grad()
    def copy_policy_to_reference(self) -> None:
        if self.reference is not None:
            self.reference.load_state_dict(self.policy[0].module.state_dict())

    @contextlib.contextmanager
    def reference_on_device(self):
        """GPU with ref_offload: the reference lives in host memory except during its forward."""
        if self.offload_reference and torch.cuda.is_available():
            self.reference.cuda()
            try:
                yield
            finally:
                self.reference.cpu()
        else:
            yield

    def write_model_files(self, folder: Path) -> None:
        """config.json, the layout file, tokenizer and image-processor config: what makes a
        checkpoint (or the engine's folder) readable by tools/ and the eval without the run's config."""
        from megatron_papo.models.qwen2_5_vl.dist_io import write_checkpoint_metadata

        folder.mkdir(parents=True, exist_ok=True)
        write_checkpoint_metadata(self.policy[0].module, folder)
        self.processor.tokenizer.save_pretrained(folder)
        self.processor.image_processor.save_pretrained(folder)

    def checkpoint_modules(self) -> dict:
        out = {"model": self.policy[0].module}  # unwrapped: DDP would prefix every key with "module."
        if self.reference is not None:
            out["ref_model"] = self.reference
        return out


def model_config(cfg: TrainConfig) -> Qwen2_5_VLConfig:
    if cfg.model.hf_dir:
        return read_hf_config(cfg.model.hf_dir)
    if cfg.model.load:
        return read_hf_config(cfg.model.load)  # checkpoints carry their config.json
    return get_flavor(cfg.model.flavor)


def parallel_options(cfg: TrainConfig) -> ModelParallelOptions:
    p = cfg.parallel
    return ModelParallelOptions(
        tp=p.tp, pp=p.pp, sequence_parallel=p.sequence_parallel,
        recompute_granularity="full" if p.recompute else None, recompute_method="uniform" if p.recompute else None,
        recompute_num_layers=1 if p.recompute else None,
        params_dtype=torch.bfloat16 if p.bf16 else torch.float32,
        # transformer-engine's attention has no fp32 kernel for the ViT's packed windows: fp32 runs the
        # plain-torch specs (None: TE when it imports)
        use_te=None if p.bf16 else False)


def _init_weights(model, cfg: TrainConfig) -> None:
    if cfg.model.hf_dir:
        load_hf_weights(model, HFReader(cfg.model.hf_dir), show_progress=dist.get_rank() == 0)
    elif cfg.model.load:
        load_dist_checkpoint(model, cfg.model.load)
    # else: megatron's seeded random init (the tiny demo starts from scratch + SFT warm-up)


def build_models(cfg: TrainConfig) -> Models:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    model_cfg = model_config(cfg)
    # the model's folder holds its tokenizer and processor config (converted checkpoints carry them too)
    tokenizer_path = cfg.processor.tokenizer_path or cfg.model.hf_dir or cfg.model.load or None
    processor = VLProcessor.from_config(dataclasses.replace(cfg.processor, tokenizer_path=tokenizer_path))
    _check_tokenizer(processor, model_cfg)
    opts = parallel_options(cfg)
    policy = build_model(model_cfg, opts)
    policy.config.variable_seq_lengths = True  # micro-batches differ in length: pipeline stages exchange shapes
    _init_weights(policy, cfg)
    if cfg.model.freeze_vision and policy.vision_model is not None:
        policy.vision_model.requires_grad_(False)
    if torch.cuda.is_available():
        policy.cuda()
    ddp = DistributedDataParallel(
        config=policy.config, module=policy,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                 use_distributed_optimizer=cfg.parallel.distributed_optimizer))
    policy.config.finalize_model_grads_func = finalize_model_grads  # DP reduce, tied-embedding and SP grads
    reference = None
    if cfg.algo.beta > 0:
        reference = build_model(model_cfg, opts)
        reference.config.variable_seq_lengths = True
        reference.requires_grad_(False)
        reference.eval()
        if torch.cuda.is_available():
            # megatron builds its layers on the GPU already; an offloaded reference lives in host memory
            # except during its forward (reference_on_device), from the start
            if cfg.model.ref_offload:
                reference.cpu()
            else:
                reference.cuda()
    models = Models(model_cfg, processor, [ddp], reference, offload_reference=cfg.model.ref_offload)
    models.copy_policy_to_reference()
    return models


def _check_tokenizer(processor: VLProcessor, model_cfg: Qwen2_5_VLConfig) -> None:
    tok = processor.tokenizer
    expected = {"<|image_pad|>": model_cfg.image_token_id, "<|vision_start|>": model_cfg.vision_start_token_id,
                "<|vision_end|>": model_cfg.vision_end_token_id, "<|im_end|>": model_cfg.eos_token_id}
    wrong = {t: (tok.convert_tokens_to_ids(t), i) for t, i in expected.items() if tok.convert_tokens_to_ids(t) != i}
    if wrong:
        raise ValueError(f"tokenizer and model config disagree on special token ids (tokenizer, config): {wrong}")
    if len(tok) > model_cfg.vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} tokens but the model's vocab_size is {model_cfg.vocab_size}")


# ------------------------------------------------------------------ optimizer
def build_optimizer(cfg: TrainConfig, policy: list, lr: float):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optim
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=lr, min_lr=lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad, bf16=cfg.parallel.bf16,
        params_dtype=torch.bfloat16 if cfg.parallel.bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer), policy)
    horizon = max(cfg.steps, cfg.sft_steps, 1) * max(cfg.ppo_epochs, 1) * (cfg.rollout_batch_size // cfg.global_batch_size) + 1
    horizon = max(horizon, o.warmup_steps + 1)  # megatron asserts warmup < decay steps: a warm-up longer than the run
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if o.warmup_steps else lr, max_lr=lr, min_lr=lr, lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=horizon, lr_decay_style="constant", start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=horizon, wd_incr_style="constant")
    return optimizer, scheduler


# ------------------------------------------------------------------ data
class DataSource:
    """RL prompts (synthetic task or a PAPO data file) and, for the warm-up, synthetic SFT samples,
    both resumable through state_dict; and the validation split's problems (synthetic task)."""

    def __init__(self, cfg: TrainConfig):
        if cfg.data.path:
            dataset = PapoDataset(cfg.data)
            self.rl = ResumableIterator(dataset, seed=cfg.data.seed, shuffle=cfg.data.shuffle)
            self.max_images_per_prompt = dataset.max_images  # the rollout engine's limit
        else:
            self.rl = ResumableIterator(SyntheticShapes(cfg.synthetic), seed=cfg.synthetic.seed)
            self.max_images_per_prompt = 1
        sft = SyntheticConfig(**{**cfg.synthetic.__dict__, "seed": sft_seed(cfg.synthetic.seed)})
        self.sft = ResumableIterator(SyntheticShapes(sft), seed=sft.seed)
        v = cfg.validation
        split = SyntheticShapes(SyntheticConfig(**{**cfg.synthetic.__dict__, "seed": v.seed}))
        self.validation = [split[i] for i in range(v.problems)]  # the same problems at every validation

    def skip_metrics(self) -> dict:
        """Bad rows of the data file so far (data/skipped_rows, data/skipped/<reason>)."""
        return self.rl.skip_metrics()

    def next_batch(self, n: int) -> list:
        return self.rl.take(n)

    def next_sft_batch(self, n: int) -> list:
        return self.sft.take(n)

    def state_dict(self) -> dict:
        return {"rl": self.rl.state_dict(), "sft": self.sft.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.rl.load_state_dict(state["rl"])
        self.sft.load_state_dict(state["sft"])


def rollout_requests(processor: VLProcessor, samples) -> list[RolloutRequest]:
    """Chat-rendered prompt ids with ONE image pad per image (the engine's processor expands them)."""
    return [RolloutRequest(processor.tokenizer(processor.chat_text(s.messages), add_special_tokens=False)["input_ids"],
                           list(s.images)) for s in samples]


def check_engine_prompt(sample_id, engine_ids: list[int], expected_ids: list[int]) -> None:
    """The engine's expanded prompt must be the processor's: else its image sizes (min/max pixels)
    differ, and its tokens are not the ones the trainer scores."""
    if engine_ids != expected_ids:
        raise ValueError(f"sample {sample_id}: the rollout engine's prompt ({len(engine_ids)} tokens) differs from "
                         f"the processor's ({len(expected_ids)} tokens): images sized otherwise (min/max pixels)")


# ------------------------------------------------------------------ rollout engine + weight sync
def build_engine(cfg: TrainConfig, models: Models, out: Path, ctx: ParallelContext, max_images_per_prompt: int):
    """This rank's worker of its rollout engine; every rank builds at once (a collective). It is
    returned asleep: it is awake only to take weights (sync_weights) and to generate, so training
    (the warm-up, the log-prob passes, the updates) runs with its memory free (GPU; a no-op on CPU)."""
    from megatron_papo.rollout.vllm_engine import VLLMEngine, VLLMEngineConfig

    folder = out / "rollout_model"  # config + tokenizer + processor; weights arrive by sync (dummy load)
    if ctx.rank == 0:  # the output folder is shared by the job's hosts, as its checkpoints are
        models.write_model_files(folder)
    dist.barrier()
    r = cfg.rollout
    engine = VLLMEngine(VLLMEngineConfig(
        model_path=str(folder), dtype=r.engine_dtype, tensor_parallel_size=r.tp,
        max_model_len=r.max_prompt_tokens + r.max_new_tokens, seed=cfg.seed,
        gpu_memory_utilization=r.gpu_memory_utilization, load_format="dummy",
        max_images_per_prompt=max(max_images_per_prompt, 1)))
    engine.sleep()
    return engine


def build_weight_sync(cfg: TrainConfig, models: Models, ctx: ParallelContext):
    from megatron_papo.rollout.vllm_engine import VLLMEngine
    from megatron_papo.rollout.weight_sync import SyncGroups, WeightSync, WeightSyncConfig

    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[cfg.rollout.engine_dtype]
    return WeightSync(models.model_cfg, SyncGroups.from_context(ctx), WeightSyncConfig(
        bucket_mb=cfg.rollout.bucket_mb, freeze_vision=cfg.model.freeze_vision, transfer_dtype=dtype),
        load_group=VLLMEngine.load_group)


def sync_weights(models: Models, engine, weight_sync) -> None:
    """Push the policy's weights into the rollout engine (collective over all ranks), woken for it."""
    from megatron_papo.models.qwen2_5_vl.param_binding import hf_param_rules

    engine.wake_up()
    weight_sync.sync(hf_param_rules(models.policy[0].module), engine)
