"""Benchmark: rollout topology on 2 ranks (CPU, gloo): one engine on rank 0 (the former topology)
vs two TP1 engines vs one TP2 engine, the same prompts and seeds; plus one weight sync to each.

A ~100M-parameter Qwen2.5-VL flavor (benchmarks/weight_sync.py's) generates n responses for each of
P image prompts. Three jobs, each timed from a barrier to a barrier:
  * 1 engine: one process, one TP1 engine, every prompt (what rank 0 did while rank 1 idled);
  * 2 engines: torchrun 2 ranks, rollout TP1 each, half the prompts each (global-index seeds);
  * 1 TP2 engine: torchrun 2 ranks, one engine over both.
The responses must be identical token for token in all three (asserted). The torchrun jobs also
hold the policy at training TP2 and sync it: into both engines (t2) and, as before, into rank 0's
engine only (t1, rank 1 passes no engine). Bytes per rollout rank: what each engine worker is given
(full HF tensors, measured) and what the sliced route would send it (reshard.ReshardPlan, computed:
design only). Peak extra memory: RSS during the sync minus RSS before it, the larger rank's.
This machine has 2 cores, so 2 ranks is the honest maximum.
Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rollout_scaling.py [--prompts 16 --responses 4 --max-tokens 32]
Last line: engines=2 gen_speedup=<t(1 engine)/t(2 engines)> sync_ratio=<t2/t1> bytes_per_rollout_rank=<b>
           peak_extra_mb=<mb> (plus sliced_bytes_per_rollout_rank and tp2_gen_speedup)
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout: the package and tests' helpers
sys.path.insert(0, str(REPO / "benchmarks"))


def worker(args) -> None:
    import torch.distributed as dist
    from weight_sync import PeakRSS, bench_flavor

    from megatron_papo.models.qwen2_5_vl.hf_io import HFReader, load_hf_weights
    from megatron_papo.models.qwen2_5_vl.model import ModelParallelOptions, build_model
    from megatron_papo.models.qwen2_5_vl.param_binding import hf_param_rules
    from megatron_papo.parallel import ParallelContext, destroy_model_parallel, initialize_model_parallel
    from megatron_papo.rollout.engine import RolloutRequest, SamplingConfig
    from megatron_papo.rollout.reshard import ReshardPlan
    from megatron_papo.rollout.vllm_engine import VLLMEngine, VLLMEngineConfig, vllm_load_group
    from megatron_papo.rollout.weight_sync import SyncGroups, WeightSync, WeightSyncConfig
    from tests.dist.rollout_common import random_image

    world = int(os.environ.get("WORLD_SIZE", 1))
    initialize_model_parallel(tp=world, pp=1, seed=1)
    ctx = ParallelContext.from_megatron(args.rollout_tp)
    topology = ctx.rollout
    engine = VLLMEngine(VLLMEngineConfig(model_path=str(args.folder), dtype="float32", max_model_len=512,
                                         tensor_parallel_size=args.rollout_tp))
    requests = [RolloutRequest([1022, 30 + i % 50, 1018, 1020, 1019, *range(40, 48), 1017, 1022, 50],
                               [random_image(i)]) for i in range(args.prompts)]
    sampling = SamplingConfig(n=args.responses, temperature=1.0, max_new_tokens=args.max_tokens, seed=7)
    mine = topology.prompt_range(len(requests))
    engine.generate([requests[i] for i in mine][:1], sampling, prompt_indices=list(mine)[:1])  # warm-up
    times = []
    for _ in range(args.repeats):
        dist.barrier()
        start = time.perf_counter()
        outputs = engine.generate([requests[i] for i in mine], sampling, step=1, prompt_indices=list(mine))
        dist.barrier()
        times.append(time.perf_counter() - start)
    responses = {i: [o.response_token_ids for o in outs] for i, outs in zip(mine, outputs)}
    everyone = [None] * topology.world
    dist.all_gather_object(everyone, responses if topology.engine_rank == 0 else {})
    result = {"gen_s": min(times), "responses": {i: r for part in everyone for i, r in part.items()}}

    if world > 1:  # the policy at training TP2, synced into the engines
        cfg = bench_flavor()
        model = build_model(cfg, ModelParallelOptions(tp=world))
        load_hf_weights(model, HFReader(args.folder))
        sync = WeightSync(cfg, SyncGroups.from_context(ctx), WeightSyncConfig(bucket_mb=64), vllm_load_group)
        for label, target in (("all_engines", engine), ("rank0_only", engine if ctx.rank == 0 else None)):
            best = None
            for _ in range(args.repeats):
                dist.barrier()
                with PeakRSS() as mem:
                    start = time.perf_counter()
                    stats = sync.sync(hf_param_rules(model), target)
                    dist.barrier()
                    seconds = time.perf_counter() - start
                if best is None or seconds < best[0]:
                    best = (seconds, mem.extra_own_mb, stats.bytes)
            peaks = [None] * world
            dist.all_gather_object(peaks, best)
            result[label] = {"sync_s": max(p[0] for p in peaks), "peak_extra_mb": max(p[1] for p in peaks),
                             "bytes_per_rollout_rank": max(p[2] for p in peaks)}
        rules = hf_param_rules(model)
        plan = ReshardPlan([r for _, _, r in rules], {r.megatron: tuple(p.shape) for _, p, r in rules}, cfg,
                           train_tp=world, rollout_tp=2, element_size=4)
        result["sliced_bytes_per_rollout_rank"] = max(plan.bytes_received(j) for j in range(2))
    if ctx.rank == 0:
        Path(args.out).write_text(json.dumps(result))
    dist.barrier()
    engine.close()
    destroy_model_parallel()


def launch(args, nproc: int, rollout_tp: int, out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), VLLM_CPU_KVCACHE_SPACE="1",
               PYTHONWARNINGS="ignore")
    job = [__file__, "--worker", "--folder", str(args.folder), "--rollout-tp", str(rollout_tp), "--out", str(out),
           "--prompts", str(args.prompts), "--responses", str(args.responses), "--max-tokens", str(args.max_tokens),
           "--repeats", str(args.repeats)]
    if nproc == 1:
        cmd = [sys.executable, *job]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone", *job]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-5000:]}")
    return json.loads(out.read_text())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/megatron_papo_bench_rollout_scaling")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--responses", type=int, default=4, help="responses per prompt (n)")
    parser.add_argument("--max-tokens", type=int, default=32, help="max new tokens per response")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs; the fastest is reported")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--rollout-tp", type=int, default=1)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    from weight_sync import bench_flavor

    from tests.dist.rollout_common import build_tiny_hf_folder

    work = Path(args.workdir)
    args.folder = work / "model"
    if not (args.folder / "config.json").exists():
        build_tiny_hf_folder(args.folder, seed=0, cfg=bench_flavor(), scale=1.0)
    one = launch(args, 1, 1, work / "one_engine.json")
    two = launch(args, 2, 1, work / "two_engines.json")
    tp2 = launch(args, 2, 2, work / "one_tp2_engine.json")
    assert one["responses"] == two["responses"] == tp2["responses"], "the topologies must give the same responses"
    tokens = sum(len(r) for rs in one["responses"].values() for r in rs)
    print(f"model: {bench_flavor().param_count() / 1e6:.1f}M parameters, fp32; {args.prompts} prompts x n={args.responses}, "
          f"<= {args.max_tokens} new tokens ({tokens} generated, identical in every topology)")
    print(f"{'topology (2 ranks)':<34}{'gen s':>8}{'tokens/s':>10}{'sync s':>9}{'peak extra MB':>15}{'MB per rollout rank':>21}")
    rows = [("1 engine on rank 0 (former)", one, two["rank0_only"]), ("2 engines, rollout TP1 each", two,
                                                                       two["all_engines"]),
            ("1 engine, rollout TP2", tp2, tp2["all_engines"])]
    for name, gen, sync in rows:
        print(f"{name:<34}{gen['gen_s']:>8.2f}{tokens / gen['gen_s']:>10.0f}{sync['sync_s']:>9.2f}"
              f"{sync['peak_extra_mb']:>15.0f}{sync['bytes_per_rollout_rank'] / 2**20:>21.1f}")
    print(f"sliced route (design only): {two['sliced_bytes_per_rollout_rank'] / 2**20:.1f} MB per rollout-TP2 rank")
    print(f"engines=2 gen_speedup={one['gen_s'] / two['gen_s']:.2f} "
          f"sync_ratio={two['all_engines']['sync_s'] / two['rank0_only']['sync_s']:.2f} "
          f"bytes_per_rollout_rank={two['all_engines']['bytes_per_rollout_rank']} "
          f"sliced_bytes_per_rollout_rank={two['sliced_bytes_per_rollout_rank']} "
          f"peak_extra_mb={two['all_engines']['peak_extra_mb']:.0f} "
          f"tp2_gen_speedup={one['gen_s'] / tp2['gen_s']:.2f}", flush=True)


if __name__ == "__main__":
    main()
