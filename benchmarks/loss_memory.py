"""Peak memory and time of the exact-mode PAPO loss at TP=2 (CPU, gloo): ours (vocab-parallel,
chunked, megatron_papo.algos.papo_loss_from_logits) vs the naive path (all-gather the full
vocabulary, then plain torch log_softmax / entropy / KL, the same loss combination, backward, and
the local slice of the full gradient).

Both compute logp + entropy of both branches + KL(real || masked) + ref KL + policy loss, and the
gradient to both logits (masked_branch_grad=True). Each variant runs in 2 fresh processes.

Memory figure: per rank, the peak resident set (VmHWM, reset through /proc/self/clear_refs right
before the measured iterations) minus the resident set at that moment (inputs already built), i.e.
the extra physical memory the loss forward + backward needed, gradients included. Time: median
wall time of the measured iterations (forward + backward), max over ranks.

Last line: peak_mem_ratio=<ours/naive> time_ratio=<ours/naive>
"""
import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_papo.algos import load_preset, papo_loss_from_logits
from megatron_papo.algos.losses import combine_loss_terms

TP = 2


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _inputs(tokens, vocab, rank):
    g = torch.Generator().manual_seed(0)
    local = vocab // TP
    shape = (1, tokens, vocab)  # built full (same on every rank), then only this rank's shard is kept
    full = torch.randn(shape, generator=g, dtype=torch.bfloat16).mul_(3)
    logits = full[..., rank * local:(rank + 1) * local].clone()
    full.add_(torch.randn(shape, generator=g, dtype=torch.bfloat16))
    masked = full[..., rank * local:(rank + 1) * local].clone()
    del full
    target = torch.randint(0, vocab, (1, tokens), generator=g)
    old = -torch.rand(1, tokens, generator=g) * 5
    ref = -torch.rand(1, tokens, generator=g) * 5
    adv = torch.randn(1, generator=g)
    mask = torch.ones(1, tokens)
    return logits.requires_grad_(), masked.requires_grad_(), target, old, ref, adv, mask


def _ours(logits, masked, target, old, ref, adv, mask, cfg, group):
    loss, _ = papo_loss_from_logits(logits, target, old, ref, adv, mask, cfg, group, masked_logits=masked)
    loss.backward()


def _naive(logits, masked, target, old, ref, adv, mask, cfg, group):
    rank, world = dist.get_rank(group), dist.get_world_size(group)

    def gather(x):
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.detach().contiguous(), group=group)
        return torch.cat(parts, dim=-1).float().requires_grad_()

    full_p, full_q = gather(logits), gather(masked)
    lp, lq = torch.log_softmax(full_p, -1), torch.log_softmax(full_q, -1)
    p = lp.exp()
    logp = lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    entropy = -(p * lp).sum(-1)
    masked_entropy = -(lq.exp() * lq).sum(-1)
    kl = (p * (lp - lq)).sum(-1)
    loss, _ = combine_loss_terms(logp, old, ref, adv, mask, cfg, kl_prcp=kl, entropy=entropy,
                                 masked_entropy=masked_entropy)
    loss.backward()
    local = logits.shape[-1]
    for x, full in ((logits, full_p), (masked, full_q)):
        x.grad = full.grad[..., rank * local:(rank + 1) * local].to(x.dtype)


def _worker(rank, variant, port, tokens, vocab, iters, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=TP)
    cfg = load_preset("papo_h", perception_mode="exact", entropy_mode="exact", masked_branch_grad=True)
    inputs = _inputs(tokens, vocab, rank)
    step = {"ours": _ours, "naive": _naive}[variant]
    dist.barrier()
    base_kib = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    times = []
    for _ in range(iters):
        for x in inputs[:2]:
            x.grad = None
        dist.barrier()
        t0 = time.perf_counter()
        step(*inputs, cfg, dist.group.WORLD)
        times.append(time.perf_counter() - t0)
    peak_kib = _rss_kib("VmHWM") - base_kib
    results.put((variant, rank, peak_kib, statistics.median(times)))
    dist.barrier()
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(variant, tokens, vocab, iters):
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(variant, _free_port(), tokens, vocab, iters, results), nprocs=TP,
                       start_method="spawn")
    rows = [results.get() for _ in range(TP)]
    return max(r[2] for r in rows) / 1024, max(r[3] for r in rows)  # MiB, s (worst rank)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=512,
                        help="tokens per micro-batch (naive needs ~6.4 MiB/token/rank: 512 keeps both ranks ~7 GB)")
    parser.add_argument("--vocab", type=int, default=152064, help="(padded) vocabulary, Qwen2.5-VL's")
    parser.add_argument("--iters", type=int, default=3, help="measured forward+backward iterations")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    figures = {v: run(v, args.tokens, args.vocab, args.iters) for v in ("ours", "naive")}
    print(f"exact PAPO loss fwd+bwd, TP={TP} gloo CPU, {args.tokens} tokens, vocab {args.vocab}, bf16 logits")
    print(f"{'variant':<8} {'peak extra RSS / rank (MiB)':>28} {'time / iter (s)':>16}")
    for v, (mem, sec) in figures.items():
        print(f"{v:<8} {mem:>28.0f} {sec:>16.3f}")
    (m_o, t_o), (m_n, t_n) = figures["ours"], figures["naive"]
    print(f"peak_mem_ratio={m_o / m_n:.3f} time_ratio={t_o / t_n:.3f}")


if __name__ == "__main__":
    main()
