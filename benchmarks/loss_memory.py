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

Peer column: per-token log-prob + entropy only (fp32 logits, forward + backward of a random
per-token combination of the two), at --peer-tokens sizes, ours (`ops.vocab_parallel_stats`) vs the
peer path of verl's Megatron actor, both in one process pair on the same inputs, interleaved:
megatron-core's `vocab_parallel_cross_entropy` on a clone of the logits (it writes into its input)
for the log-prob, plus an entropy autograd function that keeps the softmax for its backward (the
algorithm of `_VocabParallelEntropy` in verl's verl/utils/megatron/tensor_parallel.py, rewritten here
from its description). Results and gradients must agree to 1e-4 (asserted; the max abs differences
are printed: log-probs and entropies of every token, gradients of 256 sampled tokens). Memory: the
same VmHWM figure, per measured iteration, after malloc_trim (freed heap returned before the
baseline, so neither variant reuses the other's pages); time and memory are medians over iterations.

Last line: peak_mem_ratio=<ours/naive> time_ratio=<ours/naive> peer_time_ratio=<ours/peer>
peer_mem_ratio=<ours/peer> (the peer ratios: the worst over the --peer-tokens sizes)
"""
import argparse
import ctypes
import gc
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_papo.algos import load_preset, papo_loss_from_logits
from megatron_papo.algos.losses import combine_loss_terms
from megatron_papo.ops import vocab_parallel_stats

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
    loss, _ = papo_loss_from_logits(cfg, group, logits=logits, target=target, old_logp=old, ref_logp=ref,
                                    advantages=adv, response_mask=mask, masked_logits=masked)
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


class _PeerEntropy(torch.autograd.Function):
    """Entropy on vocab-parallel logits as verl's Megatron actor computes it (algorithm of
    `_VocabParallelEntropy`, verl/utils/megatron/tensor_parallel.py, written anew): global max by
    all-reduce, softmax = exp(x - max) / all-reduced sum, E_softmax[x] all-reduced, entropy =
    max + log(sum) - E[x]. It saves the logits and the full softmax; the backward works in place
    on the saved softmax (softmax * (E[x] - x) * grad), shifting the logits in place and back.
    verl torch.compile's the softmax * x reduction; here it is eager (one [tokens, V/TP] temporary)."""

    @staticmethod
    def forward(ctx, logits, group):
        x = logits.float()
        top = x.max(dim=-1, keepdim=True).values
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        softmax = (x - top).exp_()
        total = softmax.sum(dim=-1, keepdim=True)
        dist.all_reduce(total, group=group)
        softmax.div_(total)
        mean_x = (softmax * x).sum(dim=-1, keepdim=True)
        dist.all_reduce(mean_x, group=group)
        ctx.save_for_backward(x, softmax, mean_x)
        return (top + total.log() - mean_x).squeeze(-1)

    @staticmethod
    def backward(ctx, grad):
        x, softmax, mean_x = ctx.saved_tensors
        x.sub_(mean_x)
        softmax.mul_(x).mul_(grad.unsqueeze(-1)).neg_()
        x.add_(mean_x)
        return softmax, None


def _peer_stats(logits, target, group):
    """verl's path: log p(target) = -megatron-core vocab_parallel_cross_entropy(clone), entropy above."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    logp = -vocab_parallel_cross_entropy(logits.clone(), target)
    return logp, _PeerEntropy.apply(logits, group)


def _ours_stats(logits, target, group):
    stats = vocab_parallel_stats(logits, group, target=target)
    return stats.logp, stats.entropy


def _peer_worker(rank, port, sizes, vocab, iters, results):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(TP))
    from megatron_papo.parallel import destroy_model_parallel, initialize_model_parallel
    initialize_model_parallel(tp=TP)  # megatron-core's TP group, which vocab_parallel_cross_entropy reads
    from megatron.core import parallel_state
    group = parallel_state.get_tensor_model_parallel_group()
    libc = ctypes.CDLL("libc.so.6")
    local = vocab // TP
    for tokens in sizes:
        g = torch.Generator().manual_seed(1000 * tokens + rank)  # this rank's shard of the logits
        logits = torch.randn(tokens, local, generator=g).mul_(3).requires_grad_()
        g = torch.Generator().manual_seed(tokens)  # the same on both ranks
        target = torch.randint(0, vocab, (tokens,), generator=g)
        weights = torch.randn(2, tokens, generator=g)
        rows = torch.randperm(tokens, generator=g)[:256]  # gradients compared on these tokens (memory)
        outputs, mem, sec = {}, {"ours": [], "peer": []}, {"ours": [], "peer": []}
        for i in range(iters):
            for variant in (("ours", "peer") if i % 2 == 0 else ("peer", "ours")):
                logits.grad = None
                gc.collect()
                libc.malloc_trim(0)
                dist.barrier(group)
                base_kib = _rss_kib("VmRSS")
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                t0 = time.perf_counter()
                logp, entropy = (_ours_stats if variant == "ours" else _peer_stats)(logits, target, group)
                (logp * weights[0] + entropy * weights[1]).sum().backward()
                sec[variant].append(time.perf_counter() - t0)
                mem[variant].append((_rss_kib("VmHWM") - base_kib) / 1024)
                outputs[variant] = (logp.detach(), entropy.detach(), logits.grad[rows].clone())
                del logp, entropy
                logits.grad = None
        diff = [float((a - b).abs().max()) for a, b in zip(outputs["ours"], outputs["peer"])]
        assert max(diff) <= 1e-4, f"ours and the peer path disagree at {tokens} tokens: {diff}"
        results.put((tokens, rank, {v: (statistics.median(mem[v]), statistics.median(sec[v])) for v in mem}, diff))
        del logits
    dist.barrier()
    destroy_model_parallel()


def run_peer(sizes, vocab, iters):
    """{tokens: ({variant: (MiB, s)} worst rank, [max |ours - peer| of logp, entropy, grad])}."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_peer_worker, args=(_free_port(), sizes, vocab, iters, results), nprocs=TP,
                       start_method="spawn")
    rows = [results.get() for _ in range(TP * len(sizes))]
    out = {}
    for tokens in sizes:
        mine = [r for r in rows if r[0] == tokens]
        figures = {v: (max(r[2][v][0] for r in mine), max(r[2][v][1] for r in mine)) for v in ("ours", "peer")}
        out[tokens] = (figures, [max(r[3][k] for r in mine) for k in range(3)])
    return out


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
    parser.add_argument("--peer-tokens", default="256,1024,4096",
                        help="token counts of the log-prob + entropy comparison with verl's path")
    parser.add_argument("--peer-iters", type=int, default=5, help="measured iterations per variant and size")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    figures = {v: run(v, args.tokens, args.vocab, args.iters) for v in ("ours", "naive")}
    peer = run_peer([int(t) for t in args.peer_tokens.split(",")], args.vocab, args.peer_iters)
    print(f"exact PAPO loss fwd+bwd, TP={TP} gloo CPU, {args.tokens} tokens, vocab {args.vocab}, bf16 logits")
    print(f"{'variant':<8} {'peak extra RSS / rank (MiB)':>28} {'time / iter (s)':>16}")
    for v, (mem, sec) in figures.items():
        print(f"{v:<8} {mem:>28.0f} {sec:>16.3f}")
    print(f"\nlog-prob + entropy fwd+bwd, TP={TP} gloo CPU, vocab {args.vocab}, fp32 logits: ours vs verl's "
          f"Megatron path (megatron-core vocab_parallel_cross_entropy on a clone + softmax-saving entropy)")
    print(f"{'tokens':>6} {'ours MiB':>9} {'peer MiB':>9} {'mem ratio':>9} {'ours s':>8} {'peer s':>8} "
          f"{'time ratio':>10}  max |ours - peer| logp / entropy / grad")
    time_ratios, mem_ratios = [], []
    for tokens, (fig, diff) in peer.items():
        (mo, so), (mp_, sp) = fig["ours"], fig["peer"]
        time_ratios.append(so / sp)
        mem_ratios.append(mo / mp_)
        print(f"{tokens:>6} {mo:>9.0f} {mp_:>9.0f} {mo / mp_:>9.3f} {so:>8.3f} {sp:>8.3f} {so / sp:>10.3f}  "
              + " / ".join(f"{d:.1e}" for d in diff))
    (m_o, t_o), (m_n, t_n) = figures["ours"], figures["naive"]
    print(f"peak_mem_ratio={m_o / m_n:.3f} time_ratio={t_o / t_n:.3f} "
          f"peer_time_ratio={max(time_ratios):.3f} peer_mem_ratio={max(mem_ratios):.3f}")


if __name__ == "__main__":
    main()
