"""Log-probs, entropies and KL on vocab-parallel logits, without gathering the vocabulary.

Each rank of the tensor-parallel `group` holds logits [..., V/TP] for the contiguous vocab slice
[rank * V/TP, (rank + 1) * V/TP) (megatron's partition). `group=None` means a single rank.

Everything goes through one fused autograd function, `vocab_parallel_stats`, which shares the
max / sum-exp reductions between the outputs (the exact-mode PAPO loss needs all of them):

    logp           log p(target)                     p = softmax(logits / T)
    entropy        H(p) over the full vocabulary
    masked_logp    log q(target)                     q = softmax(masked_logits / T)
    masked_entropy H(q)
    kl             KL(p || q) = sum_v p (log p - log q)

Memory: the forward works on `chunk_size` tokens at a time in fp32 and saves only the input
logits (no copy) and a few [tokens] statistics; the backward recomputes the softmax per chunk and
needs no communication (all saved statistics are already global over the vocabulary). Vocab
padding (global ids >= valid_vocab_size) is excluded from every sum and gets zero gradient.
Results are fp32; gradients come back in the logits' dtype.
"""
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

CHUNK_ELEMENTS = 1 << 24  # default chunk: 2^24 fp32 elements (64 MiB) per [chunk, vocab/TP] temporary


class VocabParallelStats(NamedTuple):
    """Per-token results, fp32, shaped like the logits' leading dims; None when not requested."""
    logp: Optional[torch.Tensor]            # log p(target); needs target
    entropy: torch.Tensor                   # H(p)
    masked_logp: Optional[torch.Tensor]     # log q(target); needs target and masked_logits
    masked_entropy: Optional[torch.Tensor]  # H(q); needs masked_logits
    kl: Optional[torch.Tensor]              # KL(p || q); needs masked_logits


def _rank_and_size(group) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t


def _scaled(logits_chunk: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 logits / T as a fresh tensor (the caller's logits are never modified)."""
    return logits_chunk.float() / temperature


def _pick(values: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """values[t, index[t]] where valid[t], else 0."""
    if values.shape[1] == 0:
        return values.new_zeros(values.shape[0])
    picked = values.gather(1, index.clamp(0, values.shape[1] - 1).unsqueeze(1)).squeeze(1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def _global_max_and_pivot(z: torch.Tensor, w: Optional[torch.Tensor], r: Optional[torch.Tensor], group):
    """Global row max of z (and of w) and the pivot r[argmax z], in one all-gather of local stats.

    The pivot is the log-ratio z - w at the most likely token of p; the KL is accumulated relative
    to it so that KL and its gradient keep fp32 precision when logits are huge (+-1e4).
    """
    n = z.shape[0]
    if z.shape[1] == 0:  # this rank holds vocab padding only: it never owns the max
        local = [z.new_full((n,), float("-inf"))]
        if w is not None:
            local += [z.new_full((n,), float("-inf")), z.new_zeros(n)]
    else:
        m_z, arg_z = z.max(dim=1)
        local = [m_z]
        if w is not None:
            local += [w.amax(dim=1), r.gather(1, arg_z.unsqueeze(1)).squeeze(1)]
    local = torch.stack(local)  # [k, n]
    if group is not None and dist.get_world_size(group) > 1:
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local, group=group)
        every = torch.stack(gathered)  # [tp, k, n]
        m_z, owner = every[:, 0].max(dim=0)  # first rank on ties, the same on every rank
        if w is None:
            return m_z, None, None
        return m_z, every[:, 1].amax(dim=0), every[:, 2].gather(0, owner.unsqueeze(0)).squeeze(0)
    return (local[0], None, None) if w is None else (local[0], local[1], local[2])


class _VocabParallelStats(torch.autograd.Function):
    """Notation per token: z, w = logits / T of p and q; a = z - max z, b = w - max w (<= 0);
    S = sum e^a, E_a = sum e^a a / S (so log p = a - log S, H(p) = log S - E_a);
    r = z - w, c = r at argmax z, K = sum p (r - c) (so KL = K + c - lse_p + lse_q)."""

    @staticmethod
    def forward(ctx, logits, masked_logits, target, group, temperature, valid_vocab_size, chunk_size):
        rank, _ = _rank_and_size(group)
        local_vocab = logits.shape[1]
        vocab_start = rank * local_vocab
        n_valid = min(max(valid_vocab_size - vocab_start, 0), local_vocab)  # non-padding columns here
        has_q, has_target = masked_logits is not None, target is not None
        n_tokens = logits.shape[0]
        # per-token statistics, one row each: max_p, log S_p, E_a, logp [, max_q, log S_q, E_b, logp_q, c, K]
        stats = torch.zeros(10 if has_q else 4, n_tokens, dtype=torch.float32, device=logits.device)
        if has_target:
            local_target = target - vocab_start
            on_rank = (local_target >= 0) & (local_target < n_valid)

        for s in range(0, n_tokens, chunk_size):
            e = min(s + chunk_size, n_tokens)
            z = _scaled(logits[s:e, :n_valid], temperature)
            w = _scaled(masked_logits[s:e, :n_valid], temperature) if has_q else None
            r = z - w if has_q else None
            max_p, max_q, pivot = _global_max_and_pivot(z, w, r, group)
            a = z.sub_(max_p.unsqueeze(1))
            ea = a.exp()
            # local partial sums over this rank's vocab, reduced over the group in one all-reduce:
            # S_p, S_p * E_a, a[target] [, S_q, S_q * E_b, b[target], S_p * K]
            at_target = lambda v: (_pick(v, local_target[s:e], on_rank[s:e]) if has_target
                                   else v.new_zeros(v.shape[0]))
            sums = [ea.sum(1), (ea * a).sum(1), at_target(a)]
            if has_q:
                b = w.sub_(max_q.unsqueeze(1))
                eb = b.exp()
                sums += [eb.sum(1), (eb * b).sum(1), at_target(b), (ea * r.sub_(pivot.unsqueeze(1))).sum(1)]
                del b, eb, r
            del a, ea, z, w
            sums = _all_reduce_sum(torch.stack(sums), group)
            log_sp = sums[0].log()
            stats[0:4, s:e] = torch.stack([max_p, log_sp, sums[1] / sums[0], sums[2] - log_sp])
            if has_q:
                log_sq = sums[3].log()
                stats[4:10, s:e] = torch.stack([max_q, log_sq, sums[4] / sums[3], sums[5] - log_sq,
                                                pivot, sums[6] / sums[0]])

        ctx.save_for_backward(logits, masked_logits, target, stats)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.vocab_start, ctx.n_valid = vocab_start, n_valid
        ctx.set_materialize_grads(False)
        entropy = stats[1] - stats[2]
        logp = stats[3].clone() if has_target else None
        if not has_q:
            return logp, entropy, None, None, None
        masked_entropy = stats[5] - stats[6]
        masked_logp = stats[7].clone() if has_target else None
        kl = stats[9] + (stats[8] - stats[0] + stats[4]) + (stats[5] - stats[1])
        return logp, entropy, masked_logp, masked_entropy, kl

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_logp_q, g_ent_q, g_kl):
        logits, masked_logits, target, stats = ctx.saved_tensors
        temperature, chunk_size, n_valid = ctx.temperature, ctx.chunk_size, ctx.n_valid
        need_p, need_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        has_q = masked_logits is not None
        n_tokens = logits.shape[0]
        zero = torch.zeros(n_tokens, dtype=torch.float32, device=logits.device)
        g_logp, g_ent, g_logp_q, g_ent_q, g_kl = (
            zero if g is None else g.float() for g in (g_logp, g_ent, g_logp_q, g_ent_q, g_kl))
        # With 1[y] the one-hot of the target:
        # dL/dz = g_logp 1[y] - p (g_logp + g_ent (a - E_a) - g_kl (r - c - K))
        # dL/dw = g_logp_q 1[y] - q (g_logp_q + g_ent_q (b - E_b)) + g_kl (q - p)
        # (the per-token parts folded into one constant each); both divided by T at the end.
        const_p = g_logp - g_ent * stats[2] + (g_kl * stats[9] if has_q else 0)
        const_q = g_logp_q - g_ent_q * stats[6] if has_q else None
        grad_p = torch.zeros_like(logits) if need_p else None
        grad_q = torch.zeros_like(masked_logits) if need_q else None
        col = lambda t, s, e: t[s:e].unsqueeze(1)
        if target is not None:
            local_target = target - ctx.vocab_start
            on_rank = (local_target >= 0) & (local_target < n_valid)

        def add_one_hot(grad_chunk, g, s, e):  # + g / T at the target column (fp32, before the cast)
            if target is not None:
                rows = torch.nonzero(on_rank[s:e]).squeeze(1)
                grad_chunk[rows, local_target[s:e][rows]] += g[s:e][rows] / temperature
            return grad_chunk

        for s in range(0, n_tokens, chunk_size):
            e = min(s + chunk_size, n_tokens)
            z = _scaled(logits[s:e, :n_valid], temperature)
            w = _scaled(masked_logits[s:e, :n_valid], temperature) if has_q else None
            if has_q and need_p:
                r_c = (z - w).sub_(col(stats[8], s, e))
            a = z.sub_(col(stats[0], s, e))
            p = (a - col(stats[1], s, e)).exp_()
            if need_p:
                factor = a.mul_(col(g_ent, s, e)).add_(col(const_p, s, e))
                if has_q:
                    factor.sub_(r_c.mul_(col(g_kl, s, e)))
                    del r_c
                grad_p[s:e, :n_valid] = add_one_hot(factor.mul_(p).div_(-temperature), g_logp, s, e)
            del a, z
            if need_q:
                b = w.sub_(col(stats[4], s, e))
                q = (b - col(stats[5], s, e)).exp_()
                factor = b.mul_(col(g_ent_q, s, e)).add_(col(const_q, s, e)).mul_(q)
                factor.add_(p.mul_(col(g_kl, s, e))).sub_(q.mul_(col(g_kl, s, e)))
                grad_q[s:e, :n_valid] = add_one_hot(factor.div_(-temperature), g_logp_q, s, e)
                del b, q, factor
        return grad_p, grad_q, None, None, None, None, None


def vocab_parallel_stats(
    logits: torch.Tensor,
    group: Optional[dist.ProcessGroup],
    target: Optional[torch.Tensor] = None,
    masked_logits: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    valid_vocab_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
) -> VocabParallelStats:
    """Fused per-token log-prob / entropy / KL on vocab-parallel logits (see the module doc).

    logits, masked_logits: [..., V/TP] (same shape, any float dtype); target: [...] global token ids
    (< valid_vocab_size) or None; valid_vocab_size: the real vocabulary size (default: V/TP * TP,
    i.e. no padding); chunk_size: tokens per chunk, None = as many as keep a [chunk, vocab/TP] fp32
    temporary at CHUNK_ELEMENTS (peak extra memory is a handful of those). Every returned tensor is
    differentiable w.r.t. both logits tensors (detach masked_logits to keep the masked branch out).
    """
    rank, tp = _rank_and_size(group)
    if logits.dim() < 2:
        raise ValueError(f"logits must be [..., vocab/TP], got shape {tuple(logits.shape)}")
    if masked_logits is not None and masked_logits.shape != logits.shape:
        raise ValueError(f"masked_logits shape {tuple(masked_logits.shape)} != logits shape {tuple(logits.shape)}")
    lead = logits.shape[:-1]
    if target is not None:
        if target.shape != lead:
            raise ValueError(f"target shape {tuple(target.shape)} must equal the logits' leading dims {tuple(lead)}")
        if target.dtype.is_floating_point:
            raise ValueError(f"target must hold integer token ids, got dtype {target.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // logits.shape[-1])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    full_vocab = logits.shape[-1] * tp
    valid_vocab_size = full_vocab if valid_vocab_size is None else valid_vocab_size
    if not 0 < valid_vocab_size <= full_vocab:
        raise ValueError(f"valid_vocab_size must be in [1, {full_vocab}] (vocab/TP x TP), got {valid_vocab_size}")
    if target is not None and target.numel() and (target.min() < 0 or target.max() >= valid_vocab_size):
        raise ValueError(f"target ids must be in [0, {valid_vocab_size}), got range "
                         f"[{int(target.min())}, {int(target.max())}]")

    flat = lambda t: None if t is None else t.reshape(-1, t.shape[-1])
    outs = _VocabParallelStats.apply(
        flat(logits), flat(masked_logits), None if target is None else target.reshape(-1).long(),
        group, float(temperature), int(valid_vocab_size), int(chunk_size))
    return VocabParallelStats(*(None if o is None else o.view(lead) for o in outs))


def vocab_parallel_logprob(logits, target, group, temperature=1.0, valid_vocab_size=None,
                           chunk_size=None) -> torch.Tensor:
    """log softmax(logits / T)[target] per token, fp32 [...]."""
    return vocab_parallel_stats(logits, group, target=target, temperature=temperature,
                                valid_vocab_size=valid_vocab_size, chunk_size=chunk_size).logp


def vocab_parallel_entropy(logits, group, temperature=1.0, valid_vocab_size=None,
                           chunk_size=None) -> torch.Tensor:
    """Full-vocabulary entropy of softmax(logits / T) per token, fp32 [...]."""
    return vocab_parallel_stats(logits, group, temperature=temperature,
                                valid_vocab_size=valid_vocab_size, chunk_size=chunk_size).entropy


def vocab_parallel_kl(logits_p, logits_q, group, temperature=1.0, valid_vocab_size=None,
                      chunk_size=None) -> torch.Tensor:
    """KL(softmax(logits_p / T) || softmax(logits_q / T)) per token, fp32 [...]; grads to both."""
    return vocab_parallel_stats(logits_p, group, masked_logits=logits_q, temperature=temperature,
                                valid_vocab_size=valid_vocab_size, chunk_size=chunk_size).kl
