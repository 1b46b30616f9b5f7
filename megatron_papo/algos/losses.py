"""The PAPO objective on [batch, tokens] tensors: PPO policy loss with dual clip, reference KL,
perception KL, double entropy, and the aggregation of token losses into a micro-batch loss.

Two entry points share one loss core (`combine_loss_terms`):
- `papo_loss`: the reference mode, from per-token log-probs (masked_logp precomputed);
- `papo_loss_from_logits`: from vocab-parallel logits (real and masked image) through the ops,
  for the `exact` perception / entropy modes (and, with masked_logp, the reference ones).
"""
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_papo.algos.config import PAPOConfig
from megatron_papo.ops.vocab_parallel import vocab_parallel_stats
from megatron_papo.parallel.distributed import collective_device

LOG_RATIO_CLAMP = 20.0  # log-ratios are clamped to +-20 before exp
K3_CLAMP = 10.0  # k3 values are clamped to +-10


def k3(logp: torch.Tensor, other_logp: torch.Tensor) -> torch.Tensor:
    """Low-variance KL(pi || other) estimate on tokens sampled from pi:
    clamp(e^x - x - 1, -10, 10) with x = clamp(other_logp - logp, -20, 20)."""
    x = (other_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (x.exp() - x - 1).clamp(-K3_CLAMP, K3_CLAMP)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate: 'k1' = logp - ref_logp, 'k2' = (logp - ref_logp)^2 / 2,
    'k3' = k3(logp, ref_logp) (clamped as above; k1 and k2 are not clamped, as in verl)."""
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k2":
        return 0.5 * (logp - ref_logp).square()
    if estimator == "k3":
        return k3(logp, ref_logp)
    raise ValueError(f"kl estimator must be one of ('k1', 'k2', 'k3'), got {estimator!r}")


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, cfg: PAPOConfig):
    """PPO clipped token loss with separate low/high clip and dual clip for A < 0.

    Returns (token_loss, ratio, clipped_high, clipped_low, clipped_dual), all [batch, tokens]; the
    three masks mark tokens whose gradient the clip removed: the ratio clipped at 1 + clip_high
    (A > 0), at 1 - clip_low (A < 0), or the dual-clip bound -dual_clip * A taking over (A < 0).
    """
    ratio = (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    clipped = loss_clipped > loss_unclipped
    dual_bound = -advantages * cfg.dual_clip
    negative = advantages < 0
    clipped_dual = negative & (loss > dual_bound)
    loss = torch.where(negative, torch.minimum(loss, dual_bound), loss)
    return loss, ratio, clipped & (ratio > 1), clipped & (ratio < 1), clipped_dual


def aggregate(values: torch.Tensor, response_mask: torch.Tensor, mode: str, num_micro_batches: int = 1,
              global_token_count: Optional[float] = None) -> torch.Tensor:
    """Micro-batch loss from token values [batch, tokens] (mask 1 = response token).

    Each mode returns the share of one micro-batch such that SUMMING the returned losses over the
    micro-batches of a step (gradient accumulation) gives:
    - 'token_mean': the mean over micro-batches of each micro-batch's token mean (the reference):
      returns sum(v * m) / sum(m) / num_micro_batches;
    - 'seq_mean': the mean over micro-batches of the mean over sequences of each sequence's token
      mean: returns mean_seq(sum_t v * m / sum_t m) / num_micro_batches (sequences with no response
      token are left out);
    - 'global_token_mean': sum over all tokens of the step / global_token_count, where the caller
      passes the token count over all micro-batches AND data-parallel ranks (`count_global_tokens`):
      returns sum(v * m) / global_token_count. Summed over micro-batches and DP ranks this is the
      global token mean, so if the DP gradient reduction AVERAGES, scale the loss by the DP size.
    The first two also give the right result under an averaging DP reduction (mean over ranks).
    """
    m = response_mask.to(values.dtype)
    if mode == "token_mean":
        return (values * m).sum() / m.sum().clamp(min=1) / num_micro_batches
    if mode == "seq_mean":
        tokens = m.sum(dim=-1)
        per_seq = (values * m).sum(dim=-1) / tokens.clamp(min=1)
        has_tokens = (tokens > 0).to(values.dtype)
        return (per_seq * has_tokens).sum() / has_tokens.sum().clamp(min=1) / num_micro_batches
    if mode == "global_token_mean":
        if global_token_count is None or global_token_count <= 0:
            raise ValueError("loss_agg_mode 'global_token_mean' needs global_token_count > 0, "
                             f"got {global_token_count}")
        return (values * m).sum() / global_token_count
    raise ValueError(f"loss_agg_mode must be one of ('token_mean', 'global_token_mean', 'seq_mean'), got {mode!r}")


def count_global_tokens(response_masks: Sequence[torch.Tensor], dp_group: Optional[dist.ProcessGroup]) -> float:
    """Response tokens in all the given micro-batches, summed over the data-parallel group."""
    n = torch.stack([m.sum().double() for m in response_masks]).sum().cpu()
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        n = n.to(collective_device(dp_group))
        dist.all_reduce(n, group=dp_group)
    return float(n)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(torch.float32)
    return ((values.detach().float() * m).sum() / m.sum().clamp(min=1))


def combine_loss_terms(logp, old_logp, ref_logp, advantages, response_mask, cfg: PAPOConfig, *,
                       kl_prcp=None, entropy, masked_entropy=None, num_micro_batches: int = 1,
                       global_token_count: Optional[float] = None):
    """The loss core both entry points use. Per token:
        policy + beta * KL_ref - gamma * KL_prcp + eta1 * entropy + eta2 * masked_entropy,
    aggregated by cfg.loss_agg_mode. kl_prcp / entropy / masked_entropy are per-token [batch, tokens]
    (sampled-token estimates or full-vocabulary values, depending on the mode)."""
    if advantages.dim() == logp.dim() - 1:  # one advantage per response: broadcast over its tokens
        advantages = advantages.unsqueeze(-1)
    pg, ratio, clip_high, clip_low, clip_dual = policy_loss(logp, old_logp, advantages, cfg)
    token_loss = pg
    mask = response_mask
    metrics = {"policy_loss": _masked_mean(pg, mask), "ratio_mean": _masked_mean(ratio, mask),
               "clipfrac_high": _masked_mean(clip_high, mask), "clipfrac_low": _masked_mean(clip_low, mask),
               "clipfrac_dual": _masked_mean(clip_dual, mask), "entropy": _masked_mean(entropy, mask)}
    if cfg.beta > 0:
        ref_kl = kl_penalty(logp, ref_logp, cfg.kl_estimator)
        token_loss = token_loss + cfg.beta * ref_kl
        metrics["ref_kl"] = _masked_mean(ref_kl, mask)
    if kl_prcp is not None:
        metrics["kl_prcp"] = _masked_mean(kl_prcp, mask)
        if cfg.gamma > 0:
            token_loss = token_loss - cfg.gamma * kl_prcp
    if cfg.eta1 > 0:
        token_loss = token_loss + cfg.eta1 * entropy
    if masked_entropy is not None:
        metrics["masked_entropy"] = _masked_mean(masked_entropy, mask)
        if cfg.eta2 > 0:
            token_loss = token_loss + cfg.eta2 * masked_entropy
    loss = aggregate(token_loss, mask, cfg.loss_agg_mode, num_micro_batches, global_token_count)
    metrics["loss"] = loss.detach()
    return loss, metrics


def _require(value, name: str, why: str):
    if value is None:
        raise ValueError(f"{name} is required when {why}")


def _check_shapes(logp, response_mask, advantages, **others):
    if response_mask.shape != logp.shape:
        raise ValueError(f"response_mask shape {tuple(response_mask.shape)} != logp shape {tuple(logp.shape)}")
    if advantages.shape not in (logp.shape, logp.shape[:-1]):
        raise ValueError(f"advantages must be [batch] or [batch, tokens] = {tuple(logp.shape)}, "
                         f"got {tuple(advantages.shape)}")
    for name, t in others.items():
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != logp shape {tuple(logp.shape)}")


def papo_loss(cfg: PAPOConfig, *, logp, old_logp, advantages, response_mask, ref_logp=None, masked_logp=None,
              num_micro_batches: int = 1, global_token_count: Optional[float] = None):
    """Reference-mode PAPO loss of one micro-batch from per-token log-probs [batch, tokens]. The
    tensors are keyword-only (both entry points take them by name, in no order to remember).

    logp: current policy (with grad); old_logp, ref_logp, masked_logp: old policy, reference policy
    and old policy on the masked image (no grad; ref_logp may be None when beta = 0, masked_logp when
    gamma = eta2 = 0); advantages: [batch] or [batch, tokens]; response_mask: 1 on response tokens.
    Returns (loss, metrics): see `aggregate` for what the loss is per mode; metrics are detached
    tensors: token means over this micro-batch of each term (policy_loss, ref_kl, kl_prcp, entropy,
    masked_entropy), of the ratio and of the clip classes (clipfrac_high/low/dual), and `loss`.
    """
    if cfg.needs_logits:
        raise ValueError("papo_loss computes the reference modes from log-probs; exact perception/entropy "
                         "modes need logits: use papo_loss_from_logits")
    _check_shapes(logp, response_mask, advantages, old_logp=old_logp, ref_logp=ref_logp, masked_logp=masked_logp)
    if cfg.beta > 0:
        _require(ref_logp, "ref_logp", f"beta={cfg.beta} > 0")
    if cfg.gamma > 0 or cfg.eta2 > 0:
        _require(masked_logp, "masked_logp", f"gamma={cfg.gamma} or eta2={cfg.eta2} > 0")
    masked_logp = None if masked_logp is None else masked_logp.detach()
    return combine_loss_terms(
        logp, old_logp, ref_logp, advantages, response_mask, cfg,
        kl_prcp=None if masked_logp is None else k3(logp, masked_logp),
        entropy=-logp, masked_entropy=None if masked_logp is None else -masked_logp,
        num_micro_batches=num_micro_batches, global_token_count=global_token_count)


def papo_loss_from_logits(cfg: PAPOConfig, tp_group: Optional[dist.ProcessGroup], *, logits, target, old_logp,
                          advantages, response_mask, ref_logp=None, masked_logits=None, masked_logp=None,
                          temperature: float = 1.0, valid_vocab_size: Optional[int] = None,
                          chunk_size: Optional[int] = None, num_micro_batches: int = 1,
                          global_token_count: Optional[float] = None):
    """PAPO loss of one micro-batch from vocab-parallel logits [batch, tokens, vocab/TP] of the
    real image (and `masked_logits` of the masked image), sampled `target` ids [batch, tokens].

    logp, the full-vocabulary entropies and KL(real || masked) come from the ops in one fused pass
    over the TP-sharded vocabulary. Exact modes use those; reference modes use the precomputed
    `masked_logp`. masked_logits is detached unless cfg.masked_branch_grad. Other arguments and the
    result as in `papo_loss`.
    """
    exact_prcp, exact_ent = cfg.perception_mode == "exact", cfg.entropy_mode == "exact"
    if cfg.needs_masked_logits:
        _require(masked_logits, "masked_logits", "the exact perception/entropy mode uses the masked branch")
    if cfg.needs_masked_logp:
        _require(masked_logp, "masked_logp", "a reference perception/entropy mode uses the masked branch")
    if cfg.beta > 0:
        _require(ref_logp, "ref_logp", f"beta={cfg.beta} > 0")
    if masked_logits is not None and not cfg.masked_branch_grad:
        masked_logits = masked_logits.detach()
    stats = vocab_parallel_stats(logits, tp_group, target=target, masked_logits=masked_logits,
                                 temperature=temperature, valid_vocab_size=valid_vocab_size, chunk_size=chunk_size)
    logp = stats.logp
    _check_shapes(logp, response_mask, advantages, old_logp=old_logp, ref_logp=ref_logp, masked_logp=masked_logp)
    masked_logp = None if masked_logp is None else masked_logp.detach()
    if exact_prcp:
        kl_prcp = stats.kl
    else:
        kl_prcp = None if masked_logp is None else k3(logp, masked_logp)
    if exact_ent:
        entropy, masked_entropy = stats.entropy, stats.masked_entropy
    else:
        entropy, masked_entropy = -logp, None if masked_logp is None else -masked_logp
    return combine_loss_terms(logp, old_logp, ref_logp, advantages, response_mask, cfg, kl_prcp=kl_prcp,
                              entropy=entropy, masked_entropy=masked_entropy,
                              num_micro_batches=num_micro_batches, global_token_count=global_token_count)
