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

Memory and time: both passes walk the tokens in chunks of `chunk_size` rows whose fp32 [chunk,
vocab/TP] work buffers (a handful, allocated once per call and reused) stay in the CPU's cache;
fp32 logits at T = 1 are read in place, other dtypes or temperatures are scaled into a buffer.
Each chunk's softmax is torch's fused row kernel. The forward computes statistics of this rank's
vocabulary slice (max, log-sum-exp, E[z - max], z[target] - max and, for the KL, a two-pass
E[z - w]) and combines them across ranks in ONE all-gather at the end (log-sum-exp rescaling; the
entropy of a mixture); it saves only the input logits (no copy) and a few [tokens] statistics.
The backward recomputes each chunk's local softmax and needs no communication. Vocab padding
(global ids >= valid_vocab_size) is excluded from every sum and gets zero gradient. Results are
fp32; gradients come back in the logits' dtype.
"""
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

# Default chunk, in fp32 elements per [chunk, vocab/TP] work buffer. CPU: 2^20 (4 MiB; 13 tokens at
# 152k vocab / TP2), so that the buffers stay in cache while the per-chunk Python cost stays ~5% of
# the arithmetic. Elsewhere (GPU): 2^24 (64 MiB), few large kernels; not measured on this CPU box.
CHUNK_ELEMENTS = 1 << 20
CHUNK_ELEMENTS_ACCELERATOR = 1 << 24


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


class _Chunks:
    """Row chunks of a [tokens, vocab/TP] logits tensor as fp32 logits / T over the valid columns,
    with reusable fp32 [chunk, n_valid] work buffers (allocated once, sliced per chunk)."""

    def __init__(self, n_tokens, n_valid, chunk_size, temperature, device):
        self.rows, self.n_valid, self.temperature = min(chunk_size, n_tokens), n_valid, temperature
        self.device, self._buffers = device, {}

    def buffer(self, name, rows):
        if name not in self._buffers:
            self._buffers[name] = torch.empty(self.rows, self.n_valid, dtype=torch.float32, device=self.device)
        return self._buffers[name][:rows]

    def scaled(self, logits, s, e, name):
        """logits[s:e, :n_valid] / T in fp32: the logits themselves when already fp32 at T = 1."""
        x = logits[s:e, :self.n_valid]
        if x.dtype == torch.float32:
            return x if self.temperature == 1.0 else torch.div(x, self.temperature, out=self.buffer(name, e - s))
        z = self.buffer(name, e - s).copy_(x)
        return z if self.temperature == 1.0 else z.div_(self.temperature)

    def ranges(self, n_tokens):
        return ((s, min(s + self.rows, n_tokens)) for s in range(0, n_tokens, max(self.rows, 1)))


def _local_stats(z, softmax_buf, shift_buf, local_target, on_rank):
    """Statistics of one branch over this rank's slice: (max m, log S, E_softmax[z - m], z[target] - m,
    sigma) with S = sum exp(z - m); softmax_buf holds the kernel's local softmax afterwards (its rows
    sum to sigma, see below), shift_buf is clobbered."""
    m = z.amax(dim=1)
    p = torch.softmax(z, dim=1, out=softmax_buf)
    # torch's fused kernel normalises by a sum accumulated in plain fp32 lanes (relative error ~1e-5
    # at 76k columns): its softmax is e^a / S' with sigma = sum(softmax) = S / S' off 1 by that much.
    # The kernel's value at the max is exactly 1 / S', so S = sigma / max(softmax), with sigma summed
    # by torch.sum (cascaded, accurate); every expectation below is divided by sigma.
    sigma = p.sum(dim=1)
    log_s = sigma.log() - p.amax(dim=1).log_()
    a = torch.sub(z, m.unsqueeze(1), out=shift_buf)
    if local_target is None:
        at = torch.zeros_like(m)
    else:
        at = a.gather(1, local_target.clamp(0, a.shape[1] - 1).unsqueeze(1)).squeeze(1)
        at = torch.where(on_rank, at, torch.zeros_like(at))
    return m, log_s, a.mul_(p).sum(dim=1).div_(sigma), at, sigma


def _combine(every, owner):
    """Global statistics of one branch from every rank's local ones ([tp, 4, n]: m, log S, E[z - m],
    z[target] - m): log p(target), the entropy, and per rank log pi_r (pi_r = the probability mass of
    rank r's slice) and d_r = m_r - M (M = the global max)."""
    m, log_s, mean_a, at = every.unbind(1)
    d = m - m.amax(dim=0)                      # -inf on a rank that holds only padding
    log_mass = log_s + d                       # log(S_r e^(m_r - M))
    log_total = torch.logsumexp(log_mass, dim=0)
    log_pi = log_mass - log_total
    pi = log_pi.exp()
    # H = sum_r pi_r (H_r - log pi_r), H_r = log S_r - E_r the entropy of rank r's local softmax
    entropy = torch.where(pi > 0, pi * (log_s - mean_a - log_pi), torch.zeros_like(pi)).sum(dim=0)
    logp = None if owner is None else torch.where(owner, at + d, torch.zeros_like(at)).sum(dim=0) - log_total
    return logp, entropy, log_pi, pi, d, log_total


class _VocabParallelStats(torch.autograd.Function):
    """Notation per token and rank r: z, w = logits / T of p and q over r's slice; m = max z,
    a = z - m, S = sum e^a, p_loc = e^a / S (r's local softmax), pi_r = r's share of p's mass, so
    p = pi_r p_loc and log p = a + kappa_r - H with kappa_r = log pi_r - log S_r + H (b, q_loc, rho_r,
    kappa^q_r likewise for w). KL: r = z - w, c_r = E_{p_loc}[r] (first pass), K_r = E_{p_loc}[r - c_r]
    (second pass, exact where r is large), E_p[r] = sum_s pi_s (c_s + K_s) and
    KL = E_p[r] - lse_p + lse_q; D_r = E_p[r] - c_r."""

    @staticmethod
    def forward(ctx, logits, masked_logits, target, group, temperature, valid_vocab_size, chunk_size):
        rank, tp = _rank_and_size(group)
        local_vocab = logits.shape[1]
        vocab_start = rank * local_vocab
        n_valid = min(max(valid_vocab_size - vocab_start, 0), local_vocab)  # non-padding columns here
        has_q, has_target = masked_logits is not None, target is not None
        n_tokens = logits.shape[0]
        local_target = on_rank = None
        if has_target:
            local_target = target - vocab_start
            on_rank = (local_target >= 0) & (local_target < n_valid)
        # this rank's statistics, one row each: m, log S, E[a], a[target] [, the same 4 of q, c, K]
        local = torch.zeros(10 if has_q else 4, n_tokens, dtype=torch.float32, device=logits.device)
        if n_valid == 0:  # vocab padding only: no mass, never the max
            local[0:2] = float("-inf")
            if has_q:
                local[4:6] = float("-inf")
        else:
            work = _Chunks(n_tokens, n_valid, chunk_size, temperature, logits.device)
            for s, e in work.ranges(n_tokens):
                rows = e - s
                z = work.scaled(logits, s, e, "z")
                t = None if local_target is None else local_target[s:e]
                on = None if on_rank is None else on_rank[s:e]
                p_loc = work.buffer("p", rows)
                *stats_p, sigma = _local_stats(z, p_loc, work.buffer("a", rows), t, on)
                local[0:4, s:e] = torch.stack(stats_p)
                if has_q:
                    w = work.scaled(masked_logits, s, e, "w")
                    local[4:8, s:e] = torch.stack(_local_stats(w, work.buffer("q", rows), work.buffer("b", rows), t, on)[:4])
                    r = torch.sub(z, w, out=work.buffer("b", rows))
                    c = torch.mul(r, p_loc, out=work.buffer("a", rows)).sum(dim=1).div_(sigma)
                    local[8, s:e] = c
                    local[9, s:e] = r.sub_(c.unsqueeze(1)).mul_(p_loc).sum(dim=1).div_(sigma)
            del work
        if tp > 1:
            every = torch.empty(tp, *local.shape, dtype=local.dtype, device=local.device)
            dist.all_gather(list(every.unbind(0)), local, group=group)  # gloo has no all_gather_into_tensor
        else:
            every = local.unsqueeze(0)
        owner = None
        if has_target:
            owner = torch.arange(tp, device=target.device).unsqueeze(1) == (target // local_vocab).unsqueeze(0)
        logp, entropy, log_pi, pi, d, lse = _combine(every[:, 0:4], owner)
        # saved for the backward (this rank): m, pi, kappa [, m_q, rho, kappa_q, c, D]
        kappa = torch.where(pi[rank] > 0, d[rank] - lse + entropy, torch.zeros_like(entropy))
        saved = [local[0], pi[rank], kappa]
        outs = [logp, entropy, None, None, None]
        if has_q:
            logp_q, entropy_q, log_rho, rho, d_q, lse_q = _combine(every[:, 4:8], owner)
            kappa_q = torch.where(rho[rank] > 0, d_q[rank] - lse_q + entropy_q, torch.zeros_like(entropy_q))
            c, k = every[:, 8], every[:, 9]
            max_p, max_q = every[:, 0].amax(dim=0), every[:, 4].amax(dim=0)
            # KL = sum_s pi_s (c_s - M_p + M_q + K_s) + (lse_q - M_q) - (lse_p - M_p)
            kl = (pi * (c - max_p + max_q + k)).sum(dim=0) + (lse_q - lse)
            dev = (pi * (c - c[rank] + k)).sum(dim=0)  # D = E_p[r] - c_rank
            saved += [local[4], rho[rank], kappa_q, local[8], dev]
            outs[2:] = [logp_q, entropy_q, kl]
        ctx.save_for_backward(logits, masked_logits, target, torch.stack(saved))
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.vocab_start, ctx.n_valid = vocab_start, n_valid
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_logp_q, g_ent_q, g_kl):
        logits, masked_logits, target, saved = ctx.saved_tensors
        temperature, chunk_size, n_valid = ctx.temperature, ctx.chunk_size, ctx.n_valid
        need_p, need_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        has_q = masked_logits is not None
        n_tokens = logits.shape[0]
        g_kl = g_kl if has_q else None
        grad_p = grad_q = None
        if need_p:
            grad_p = torch.empty_like(logits)
            grad_p[:, n_valid:] = 0
        if need_q:
            grad_q = torch.empty_like(masked_logits)
            grad_q[:, n_valid:] = 0
        if n_valid == 0:
            return grad_p, grad_q, None, None, None, None, None
        zero = torch.zeros(n_tokens, dtype=torch.float32, device=logits.device)
        fl = lambda g: zero if g is None else g.float()
        # With 1[y] the one-hot of the target, per rank (p = pi p_loc, log p + H = a + kappa):
        # dL/dz = g_logp 1[y] - pi p_loc (g_ent a + g_logp + g_ent kappa - g_kl (r - c) + g_kl D)
        # dL/dw = g_logp_q 1[y] - rho q_loc (g_ent_q b + g_logp_q + g_ent_q kappa_q - g_kl) - g_kl pi p_loc
        # all divided by T (dz/dlogits = 1/T); the per-token parts are folded into column constants.
        pi, kappa = saved[1], saved[2]
        scale = -pi / temperature
        alpha = None if g_ent is None else scale * g_ent.float()               # times a
        beta = scale * (fl(g_logp) + fl(g_ent) * kappa)                        # constant
        gamma = delta = None
        if g_kl is not None:
            beta = beta + scale * g_kl.float() * saved[7]
            gamma = -scale * g_kl.float()                                      # times r - c
        if has_q:
            rho, kappa_q = saved[4], saved[5]
            scale_q = -rho / temperature
            alpha_q = None if g_ent_q is None else scale_q * g_ent_q.float()
            beta_q = scale_q * (fl(g_logp_q) + fl(g_ent_q) * kappa_q - fl(g_kl))
            delta = None if g_kl is None else scale * g_kl.float()              # times p_loc
        if target is not None:
            local_target = target - ctx.vocab_start
            on_rank = (local_target >= 0) & (local_target < n_valid)
        col = lambda t, s, e: t[s:e].unsqueeze(1)

        def add_one_hot(grad_chunk, g, s, e):  # + g / T at the target column (fp32, before the cast)
            if target is not None and g is not None:
                rows = torch.nonzero(on_rank[s:e]).squeeze(1)
                grad_chunk[rows, local_target[s:e][rows]] += g[s:e][rows].float() / temperature
            return grad_chunk

        def factor(x, buf, shift, a, b, s, e, sigma):
            """(a (x - shift) + b) / sigma per row: in buf, or the [rows, 1] column b / sigma if a is None."""
            b = (b[s:e] / sigma).unsqueeze(1)
            if a is None:
                return b
            return torch.sub(x, col(shift, s, e), out=buf).mul_((a[s:e] / sigma).unsqueeze(1)).add_(b)

        work = _Chunks(n_tokens, n_valid, chunk_size, temperature, logits.device)
        need_p_loc = need_p or (need_q and delta is not None)
        for s, e in work.ranges(n_tokens):
            rows = e - s
            z = work.scaled(logits, s, e, "z")
            w = work.scaled(masked_logits, s, e, "w") if has_q else None
            if need_p_loc:  # the kernel's softmax, rows summing to sigma (see _local_stats)
                p_loc = torch.softmax(z, dim=1, out=work.buffer("p", rows))
                sigma = p_loc.sum(dim=1)
            if need_p:
                f = factor(z, work.buffer("a", rows), saved[0], alpha, beta, s, e, sigma)
                if gamma is not None:
                    f = (torch.sub(z, w, out=work.buffer("b", rows)).sub_(col(saved[6], s, e))
                         .mul_((gamma[s:e] / sigma).unsqueeze(1)).add_(f))
                out = grad_p[s:e, :n_valid]
                if out.dtype == torch.float32:  # straight into the gradient
                    add_one_hot(torch.mul(f, p_loc, out=out), g_logp, s, e)
                else:
                    out.copy_(add_one_hot(torch.mul(f, p_loc, out=work.buffer("a", rows)), g_logp, s, e))
            if need_q:
                q_loc = torch.softmax(w, dim=1, out=work.buffer("q", rows))
                f = factor(w, work.buffer("b", rows), saved[3], alpha_q, beta_q, s, e, q_loc.sum(dim=1))
                f = torch.mul(f, q_loc, out=work.buffer("b", rows))
                if delta is not None:  # p_loc's last use
                    f.add_(p_loc.mul_((delta[s:e] / sigma).unsqueeze(1)))
                grad_q[s:e, :n_valid].copy_(add_one_hot(f, g_logp_q, s, e))
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
    work buffer at CHUNK_ELEMENTS (peak extra memory: a handful of those plus the gradients). Every returned tensor is
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
        per_chunk = CHUNK_ELEMENTS if logits.device.type == "cpu" else CHUNK_ELEMENTS_ACCELERATOR
        chunk_size = max(1, per_chunk // logits.shape[-1])
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
