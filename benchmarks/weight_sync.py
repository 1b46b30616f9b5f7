"""Benchmark: in-memory Megatron -> vLLM weight sync vs the disk round trip, on CPU (gloo, TP2).

A ~100M-parameter Qwen2.5-VL flavor is trained one step at TP2 (2 ranks), then pushed into vLLM
(one TP1 engine per rank, vLLM's SPMD mode, as the trainer runs them) with rollout.weight_sync for
each bucket size, and by the naive route: gather the HF tensors, rank 0 saves safetensors, every
engine reloads its weights from that folder. Reports seconds, bytes moved and the peak extra
resident memory per rank (the engines run in the ranks' own processes; vLLM's reload rebuilds
modules). A greedy generation after each route must give the same log-probs (both routes deliver
the same weights). A bucket smaller
than the largest load group (here the 64 MB embedding) rises to it; `bucket_mb` reports the size used.

Both routes deliver the same tensors to the same engine. Each route runs --repeats times, the routes
interleaved (the box's load drifts); the fastest run is reported, with that run's peak memory. Peak
memory is measured the same way for both routes: RSS sampled during the call minus RSS just before
(the sync's buffers live only for the call, so nothing allocated by an earlier run hides in the
baseline).
Run:  OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --nproc-per-node 2 \\
          benchmarks/weight_sync.py [--workdir DIR] [--buckets 16,64,256]
Last line: sync_s=<s> disk_roundtrip_s=<s> ratio=<sync/disk> peak_extra_mb=<mb> bucket_mb=<best's size used>
"""
import argparse
import shutil
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout: the package and tests/dist's offline HF-folder builder


def bench_flavor():
    """~98M parameters; head_dim 64 (vLLM's CPU attention needs >= 32); tiny's special-token ids."""
    from megatron_papo.models.qwen2_5_vl.flavors import get_flavor

    return get_flavor("tiny", hidden_size=512, intermediate_size=1408, num_hidden_layers=16, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=32768, mrope_section=(8, 12, 12),
                      vision=dict(depth=8, hidden_size=384, intermediate_size=1024, num_heads=6,
                                  fullatt_block_indexes=(3, 7)))


class PeakRSS:
    """Samples RSS in a thread: this process alone, and with its children (vLLM's engine core and
    worker on rank 0; shared-memory pages mapped by both sides count twice there).
    `extra_mb` / `extra_own_mb` = peak - baseline."""

    def __init__(self, interval_s: float = 0.002):
        self.proc, self.interval_s = psutil.Process(), interval_s

    def rss(self) -> tuple[int, int]:
        own = total = self.proc.memory_info().rss
        for child in self.proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return own, total

    def __enter__(self):
        self.baseline = self.peak = self.rss()
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        own, total = self.rss()
        self.peak = (max(self.peak[0], own), max(self.peak[1], total))

    def _run(self):
        while self.running:
            self._sample()
            time.sleep(self.interval_s)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self._sample()

    @property
    def extra_own_mb(self) -> float:
        return (self.peak[0] - self.baseline[0]) / 2**20

    @property
    def extra_mb(self) -> float:
        return (self.peak[1] - self.baseline[1]) / 2**20


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/megatron_papo_bench_weight_sync")
    parser.add_argument("--buckets", default="16,64,256")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per route; the fastest is reported")
    args = parser.parse_args()
    buckets = [float(b) for b in args.buckets.split(",")]

    from megatron_papo.models.qwen2_5_vl import parity
    from megatron_papo.models.qwen2_5_vl.hf_io import (
        HFReader,
        copy_model_files,
        gather_hf_tensors,
        load_hf_weights,
        write_hf_folder,
    )
    from megatron_papo.models.qwen2_5_vl.model import ModelParallelOptions, build_model
    from megatron_papo.models.qwen2_5_vl.param_binding import hf_param_rules
    from megatron_papo.parallel import ParallelContext, destroy_model_parallel, initialize_model_parallel
    from megatron_papo.rollout.engine import RolloutRequest, SamplingConfig
    from megatron_papo.rollout.vllm_engine import vllm_load_group
    from megatron_papo.rollout.weight_sync import SyncGroups, WeightSync, WeightSyncConfig
    from tests.dist.rollout_common import build_tiny_hf_folder, random_image

    initialize_model_parallel(tp=2, pp=1, seed=1)
    rank = dist.get_rank()
    cfg = bench_flavor()
    workdir = Path(args.workdir)
    init_dir, disk_dir = workdir / "init", workdir / "disk_roundtrip"
    if rank == 0 and not (init_dir / "config.json").exists():
        build_tiny_hf_folder(init_dir, seed=0, cfg=cfg, scale=1.0)
    dist.barrier()
    model = build_model(cfg, ModelParallelOptions(tp=2))
    load_hf_weights(model, HFReader(init_dir))
    batch = parity.synthetic_batch(cfg, images=(((4, 4),),), text_len=32)
    weight = torch.randn(*batch["input_ids"].shape, cfg.vocab_size, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    parity.run_model(model, batch, loss_weight=weight)
    optimizer.step()  # "trained": the weights now differ from the folder vLLM starts from
    del optimizer
    n_params = sum(p.numel() for p in model.parameters())
    all_params = [None] * dist.get_world_size()
    dist.all_gather_object(all_params, n_params)

    from megatron_papo.rollout.vllm_engine import VLLMEngine, VLLMEngineConfig
    engine = VLLMEngine(VLLMEngineConfig(model_path=str(init_dir), dtype="float32", max_model_len=512))
    probe = [RolloutRequest([1022, 30, 1018, 1020, 1019, 40, 41, 1017, 1022, 50], [random_image(0)])]
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=8)

    def timed_once(fn):
        """(result, seconds, peak extra MB per rank as (own, with children))."""
        dist.barrier()
        with PeakRSS() as mem:
            start = time.perf_counter()
            out = fn()
            dist.barrier()
            seconds = time.perf_counter() - start
        peaks = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, (mem.extra_own_mb, mem.extra_mb))
        return out, seconds, peaks

    groups = SyncGroups.from_context(ParallelContext.from_megatron())
    syncers = {b: WeightSync(cfg, groups, WeightSyncConfig(bucket_mb=b), vllm_load_group) for b in buckets}

    def disk_roundtrip():
        tensors = gather_hf_tensors(model)  # every rank gathers (TP all-gather), rank 0 writes
        if rank == 0:
            shutil.rmtree(disk_dir, ignore_errors=True)
            write_hf_folder(disk_dir, cfg, tensors.items())
            # vLLM's reload makes this the model folder, whose processor it reads for the next images
            copy_model_files(init_dir, disk_dir)
        dist.barrier()
        engine.load_weights_from_folder(str(disk_dir))
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def probe_logprobs():
        return torch.tensor(engine.generate(probe, greedy)[0][0].response_logprobs)

    def restore_init_weights():
        engine.load_weights_from_folder(str(init_dir))

    routes = {**{b: (lambda s=s: s.sync(hf_param_rules(model), engine)) for b, s in syncers.items()}, "disk": disk_roundtrip}
    best, logprobs = {}, {"init": probe_logprobs()}
    for _ in range(args.repeats):  # interleaved: every route once per round
        for route, fn in routes.items():
            if route not in logprobs:  # first run: start from the initial weights, so the probe shows this route's
                restore_init_weights()
            run = timed_once(fn)
            if route not in logprobs:
                logprobs[route] = probe_logprobs()
            if route not in best or run[1] < best[route][1]:
                best[route] = run
    rows = []
    for bucket_mb in buckets:
        stats, seconds, peaks = best[bucket_mb]
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, stats.gathered_bytes)
        rows.append(dict(route=f"in-memory {bucket_mb:g} MB", seconds=seconds, peaks=peaks,
                         to_engine_mb=stats.bytes / 2**20, buckets=stats.buckets, engine_s=stats.engine_seconds,
                         gathered_mb=[g / 2**20 for g in gathered], bucket_mb=stats.capacity_bytes / 2**20))
    disk_bytes, disk_seconds, disk_peaks = best["disk"]
    if rank == 0:
        init = logprobs.pop("init")
        diffs = {route: (lp - logprobs["disk"]).abs().max().item() for route, lp in logprobs.items()}
        assert max(diffs.values()) < 1e-5, f"the routes must deliver the same weights: {diffs}"
        print(f"probe logprobs: routes agree within {max(diffs.values()):.1e}; "
              f"the initial weights differ by {(init - logprobs['disk']).abs().max().item():.1e}")
        rows.append(dict(route="disk round trip", seconds=disk_seconds, peaks=disk_peaks,
                         to_engine_mb=disk_bytes / 2**20, buckets=0, gathered_mb=[], bucket_mb=None, engine_s=None))
        print(f"\nmodel: {cfg.param_count() / 1e6:.1f}M parameters, fp32, TP2 (per-rank shard params: {all_params})")
        print(f"{'route':<22}{'seconds':>9}{'engine load s':>15}{'to vLLM MB':>12}{'buckets':>9}"
              f"{'bucket used MB':>16}{'peak extra MB r0 / r1':>24}")
        for row in rows:
            (own0, _), (own1, _) = row["peaks"][0], row["peaks"][1]
            peaks = f"{own0:.0f} / {own1:.0f}"
            engine_s = "-" if row["engine_s"] is None else f"{row['engine_s']:.2f}"
            used = "-" if row["bucket_mb"] is None else f"{row['bucket_mb']:.1f}"
            print(f"{row['route']:<22}{row['seconds']:>9.2f}{engine_s:>15}{row['to_engine_mb']:>12.1f}"
                  f"{row['buckets']:>9}{used:>16}{peaks:>24}")
        print(f"TP peers' shard bytes per rank (MB): {[round(g, 1) for g in rows[0]['gathered_mb']]}; a bucket "
              "rises to the largest load group (vLLM loads a module from whole tensors)")
        best = min((r for r in rows if r["bucket_mb"] is not None), key=lambda r: r["seconds"])
        print(f"sync_s={best['seconds']:.2f} disk_roundtrip_s={disk_seconds:.2f} "
              f"ratio={best['seconds'] / disk_seconds:.2f} peak_extra_mb={max(p[0] for p in best['peaks']):.0f} "
              f"bucket_mb={best['bucket_mb']:g}", flush=True)
    dist.barrier()
    engine.close()
    destroy_model_parallel()


if __name__ == "__main__":
    main()
