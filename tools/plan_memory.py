"""Print the PAPO scaling tables (markdown) for a Qwen2.5-VL flavor: per-GPU memory per layout, the
smallest GPU count, and weight-sync traffic. docs/scaling.md pastes this output verbatim (a test
checks it still matches).

    python tools/plan_memory.py --flavor 72B [--gpu-gb 80] [--margin 0.10]
"""
import argparse
import sys
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from megatron_papo.models.qwen2_5_vl.flavors import get_flavor
from megatron_papo.models.qwen2_5_vl.scaling import (
    GB,
    RECOMMENDED_72B_LAYOUT,
    Layout,
    Links,
    RolloutSetup,
    TrainingSetup,
    busiest_stage,
    fits,
    memory_fields,
    naive_sync_traffic,
    plan_memory,
    smallest_gpu_count,
    stage_params,
    weight_sync_traffic,
)

SHOWN_LAYOUTS = [Layout(8, 4), Layout(8, 2), Layout(4, 8)]
SYNC_TRAIN_LAYOUT = Layout(8, 4)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _gb(x: float) -> str:
    return f"{x / GB:.2f}"


def render(flavor: str = "72B", gpu_gb: float = 80.0, margin: float = 0.10) -> str:
    cfg = get_flavor(flavor)
    gpu_bytes = gpu_gb * GB
    train, rollout, links = TrainingSetup(), RolloutSetup(), Links()
    out = ["### Assumptions (defaults of scaling.py)", ""]
    out += _table(["setting", "value"],
                  [[f"{obj.__class__.__name__}.{f.name}", getattr(obj, f.name)]
                   for obj in (train, rollout, links) for f in fields(obj)]
                  + [["GPU memory (GB)", gpu_gb], ["safety margin", margin]])

    out += ["", f"### Parameters per GPU at {SYNC_TRAIN_LAYOUT} ({flavor})", ""]
    stages = stage_params(cfg, SYNC_TRAIN_LAYOUT)
    rows = [[st.name, st.lm_layers, "yes" if st.has_vision else "no", f"{st.rank_params:,}", f"{st.replicated:,}",
             f"{st.padding:,}", f"{st.unique_params(SYNC_TRAIN_LAYOUT.tp):,}"] for st in stages]
    rows.append(["total", cfg.num_hidden_layers, "", "", "", "",
                 f"{sum(st.unique_params(SYNC_TRAIN_LAYOUT.tp) for st in stages):,}"])
    out += _table(["stage", "LM layers", "ViT", "params per GPU", "replicated", "vocab padding (x TP)",
                   "unique params"], rows)

    smallest = {sleep: smallest_gpu_count(cfg, gpu_bytes, margin, sleep) for sleep in (True, False)}
    layouts = SHOWN_LAYOUTS + [lay for lay in (smallest[True][0], smallest[False][0], RECOMMENDED_72B_LAYOUT)
                               if lay not in SHOWN_LAYOUTS]
    plans = [plan_memory(cfg, lay, train, rollout) for lay in layouts]
    tops = [busiest_stage(p, sleep_mode=True) for p in plans]
    out += ["", f"### Per-GPU memory (GB) of the busiest stage ({flavor}, sleep-mode peak decides)", ""]
    rows = [["busiest stage"] + [t.stage for t in tops],
            ["params per GPU (B)"] + [f"{t.params / 1e9:.3f}" for t in tops]]
    rows += [[name] + [_gb(getattr(t, name)) for t in tops] for name in memory_fields()]
    rows += [[name] + [_gb(getattr(t, name)) for t in tops]
             for name in ("resident", "activations", "vllm", "train_phase", "rollout_phase")]
    rows.append(["**peak, vLLM sleep mode**"] + [_gb(t.peak(True)) for t in tops])
    rows.append(["**peak, no sleep mode** (busiest stage)"] + [_gb(busiest_stage(p, False).peak(False)) for p in plans])
    limit = gpu_bytes * (1 - margin)
    rows.append([f"fits {gpu_gb:g} GB - {margin:.0%} (sleep / no sleep)"]
                + [f"{'yes' if fits(t.peak(True), gpu_bytes, margin) else 'no'} / "
                   f"{'yes' if fits(busiest_stage(p, False).peak(False), gpu_bytes, margin) else 'no'}"
                   for t, p in zip(tops, plans)])
    rows.append(["vLLM gpu_memory_utilization to set"] + [f"{t.vllm / gpu_bytes:.3f}" for t in tops])
    out += _table(["component"] + [f"{lay} ({lay.world} GPUs)" for lay in layouts], rows)

    out += ["", "### Last stage (output layer, loss): activations in GB, reference and exact PAPO mode", ""]
    exact = TrainingSetup(papo_mode="exact")
    lasts = [(plan_memory(cfg, lay, train, rollout)[-1], plan_memory(cfg, lay, exact, rollout)[-1]) for lay in layouts]
    rows = [[name] + [f"{_gb(getattr(ref, name))} / {_gb(getattr(ex, name))}" for ref, ex in lasts]
            for name in ("act_checkpoints", "act_recompute", "logits", "papo_buffers", "train_phase")]
    rows.append(["peak, sleep mode"] + [f"{_gb(ref.peak(True))} / {_gb(ex.peak(True))}" for ref, ex in lasts])
    out += _table(["reference / exact"] + [str(lay) for lay in layouts], rows)

    out += ["", f"### Smallest GPU count on {gpu_gb:g} GB GPUs (limit {_gb(limit)} GB per GPU)", ""]
    out += _table(["vLLM sleep mode", "layout", "GPUs", "busiest stage", "peak (GB)"],
                  [["on" if sleep else "off", str(lay), lay.world, top.stage, _gb(top.peak(sleep))]
                   for sleep, (lay, top) in smallest.items()])

    out += ["", f"### Weight sync, {flavor} bf16, busiest rank (GB; time at NVLink "
            f"{links.nvlink_bytes_per_s / GB:g} GB/s, IB {links.ib_bytes_per_s / GB:g} GB/s per GPU)", ""]
    traffic = [weight_sync_traffic(cfg, SYNC_TRAIN_LAYOUT, r, links) for r in (8, 4)]
    traffic += [naive_sync_traffic(cfg, SYNC_TRAIN_LAYOUT, 8, links)]
    out += _table(["route", "received", "of which same GPU", "NVLink", "InfiniBand", "sent", "seconds"],
                  [[t.route, _gb(t.received), _gb(t.received_same_gpu), _gb(t.received_nvlink),
                    _gb(t.received_ib), _gb(t.sent), f"{t.seconds:.2f}"] for t in traffic])
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flavor", default="72B")
    ap.add_argument("--gpu-gb", type=float, default=80.0, help="GPU memory in decimal GB")
    ap.add_argument("--margin", type=float, default=0.10, help="fraction kept free (fragmentation, NCCL, CUDA context)")
    args = ap.parse_args()
    print(render(args.flavor, args.gpu_gb, args.margin), end="")


if __name__ == "__main__":
    main()
