"""4-rank worker: vocab-parallel ops at TP = 1 (no group), 2 (subgroups {0,1}, {2,3}) and 4 (world),
against a plain full-vocabulary float64 torch computation of the same logits; and the exact-mode
PAPO loss on shards against the same loss on the full logits."""
import os

import torch
import torch.distributed as dist

from megatron_papo.algos import load_preset, papo_loss_from_logits
from megatron_papo.ops import (vocab_parallel_entropy, vocab_parallel_kl, vocab_parallel_logprob,
                               vocab_parallel_stats)

TOKENS, VOCAB = 11, 64
TOL = dict(rtol=1e-5, atol=1e-5)


def reference(x, y, target, temperature, valid):
    """float64 full-vocabulary logp, entropy, masked logp, masked entropy, KL(p||q)."""
    lp = torch.log_softmax(x[:, :valid].double() / temperature, -1)
    lq = torch.log_softmax(y[:, :valid].double() / temperature, -1)
    p, q = lp.exp(), lq.exp()
    pick = lambda l: l.gather(1, target[:, None])[:, 0]
    return pick(lp), -(p * lp).sum(-1), pick(lq), -(q * lq).sum(-1), (p * (lp - lq)).sum(-1)


def shard(full, rank, tp):
    n = full.shape[-1] // tp
    return full[:, rank * n:(rank + 1) * n].clone()


def check_case(name, x, y, target, group, rank, tp, temperature=1.0, valid=VOCAB, token_mask=None,
               chunk_size=4, dtype=torch.float32, tol=TOL, grad_tol=TOL):
    weights = torch.randn(5, TOKENS, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    if token_mask is not None:  # a padding token: its loss contribution and gradient must be zero
        weights = weights * token_mask
    # ours, on this rank's shard
    xs = shard(x, rank, tp).to(dtype).requires_grad_()
    ys = shard(y, rank, tp).to(dtype).requires_grad_()
    outs = vocab_parallel_stats(xs, group, target=target, masked_logits=ys, temperature=temperature,
                                valid_vocab_size=valid, chunk_size=chunk_size)
    loss = sum((o * w.float()).sum() for o, w in zip(outs, weights))
    loss.backward()
    # reference, on the full (dtype-rounded) logits
    xr = x.to(dtype).double().requires_grad_()
    yr = y.to(dtype).double().requires_grad_()
    refs = reference(xr, yr, target, temperature, valid)
    ref_loss = sum((o * w).sum() for o, w in zip(refs, weights))
    ref_loss.backward()
    for field, o, r in zip(outs._fields, outs, refs):
        assert o.dtype == torch.float32, (name, field, o.dtype)
        torch.testing.assert_close(o.double(), r, **tol, msg=lambda m: f"{name} TP{tp} {field}: {m}")
    torch.testing.assert_close(loss.double(), ref_loss, **tol)
    for which, ours, ref in (("logits", xs.grad, xr.grad), ("masked_logits", ys.grad, yr.grad)):
        assert ours.dtype == dtype, (name, which, ours.dtype)
        torch.testing.assert_close(ours.double(), shard(ref, rank, tp), **grad_tol,
                                   msg=lambda m: f"{name} TP{tp} grad {which}: {m}")
        if token_mask is not None:
            assert (ours[token_mask == 0] == 0).all(), f"{name}: masked token got a gradient"
    return outs


def check_wrappers(x, y, target, group, rank, tp, temperature):
    """The single-output functions agree with the reference, with grads to both KL inputs."""
    refs = reference(x, y, target, temperature, VOCAB)
    xs = shard(x, rank, tp).requires_grad_()
    lp = vocab_parallel_logprob(xs, target, group, temperature)
    torch.testing.assert_close(lp.double(), refs[0], **TOL)
    ent = vocab_parallel_entropy(xs, group, temperature)
    torch.testing.assert_close(ent.double(), refs[1], **TOL)
    ys = shard(y, rank, tp).requires_grad_()
    kl = vocab_parallel_kl(xs, ys, group, temperature)
    torch.testing.assert_close(kl.double(), refs[4], **TOL)
    kl.sum().backward()
    xr, yr = x.double().requires_grad_(), y.double().requires_grad_()
    reference(xr, yr, target, temperature, VOCAB)[4].sum().backward()
    torch.testing.assert_close(xs.grad.double(), shard(xr.grad, rank, tp), **TOL)
    torch.testing.assert_close(ys.grad.double(), shard(yr.grad, rank, tp), **TOL)
    # detached masked branch: gradient to p only, same values
    xs.grad = None
    kl_d = vocab_parallel_kl(xs, ys.detach(), group, temperature)
    kl_d.sum().backward()
    torch.testing.assert_close(kl_d, kl.detach(), rtol=0, atol=0)
    torch.testing.assert_close(xs.grad.double(), shard(xr.grad, rank, tp), **TOL)
    # leading dims are kept: [2, tokens/…] layout in, same layout out
    lp2 = vocab_parallel_logprob(xs.detach()[:10].view(2, 5, -1), target[:10].view(2, 5), group, temperature)
    torch.testing.assert_close(lp2.reshape(-1), lp.detach()[:10], rtol=0, atol=0)


def check_exact_loss(x, y, target, group, rank, tp):
    """The exact-mode PAPO loss on TP shards equals the same loss on the full logits (one rank)."""
    cfg = load_preset("papo_h", perception_mode="exact", entropy_mode="exact", masked_branch_grad=True)
    g = torch.Generator().manual_seed(11)
    old = -torch.rand(TOKENS, generator=g) * 3
    ref = -torch.rand(TOKENS, generator=g) * 3
    adv = torch.randn(TOKENS, generator=g)
    mask = (torch.rand(TOKENS, generator=g) > 0.2).float()
    results = []
    for xs, ys, grp in ((shard(x, rank, tp), shard(y, rank, tp), group), (x.clone(), y.clone(), None)):
        xs.requires_grad_(), ys.requires_grad_()
        loss, _ = papo_loss_from_logits(cfg, grp, logits=xs[None], target=target[None], old_logp=old[None],
                                        ref_logp=ref[None], advantages=adv[None], response_mask=mask[None],
                                        masked_logits=ys[None], temperature=0.8, valid_vocab_size=VOCAB - 5)
        loss.backward()
        results.append((loss, xs.grad, ys.grad))
    (loss, gx, gy), (loss1, gx1, gy1) = results
    torch.testing.assert_close(loss, loss1, **TOL)
    torch.testing.assert_close(gx, shard(gx1, rank, tp), **TOL)
    torch.testing.assert_close(gy, shard(gy1, rank, tp), **TOL)


def run_tp(tp, group, rank_in_group):
    g = torch.Generator().manual_seed(1234)  # same data on every rank
    x = torch.randn(TOKENS, VOCAB, generator=g) * 4
    y = x + torch.randn(TOKENS, VOCAB, generator=g)
    target = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    r = rank_in_group
    check_case("random", x, y, target, group, r, tp)
    check_case("temperature", x, y, target, group, r, tp, temperature=0.7, chunk_size=3)
    check_case("one_chunk", x, y, target, group, r, tp, chunk_size=1000)
    # extreme logits: +-1e4 entries (one-hot-like rows, huge KL where q puts no mass)
    xe, ye = x.clone(), y.clone()
    xe[::2, 5] = 1e4
    xe[1::3, 40] = -1e4
    ye[::2, 5] = -1e4
    ye[1::2, 60] = 1e4
    te = target.clone()
    te[0] = 5
    check_case("extreme", xe, ye, te, group, r, tp)
    # padded vocab: garbage (huge) logits in the padding must not matter; 40 valid ids leaves
    # the last TP4 rank with padding only
    for valid in (VOCAB - 13, 40):
        xp, yp = x.clone(), y.clone()
        xp[:, valid:] = 3e4
        yp[:, valid:] = -3e4
        check_case(f"padded{valid}", xp, yp, target % valid, group, r, tp, valid=valid)
    # a padding token in the batch: zero contribution, zero gradient
    token_mask = torch.ones(TOKENS, dtype=torch.float64)
    token_mask[3] = 0
    check_case("masked_token", x, y, target, group, r, tp, token_mask=token_mask)
    # bf16 logits: fp32 results equal the fp32 math on the bf16 values; grads come back in bf16
    check_case("bf16", x, y, target, group, r, tp, temperature=0.7, dtype=torch.bfloat16,
               grad_tol=dict(rtol=1e-2, atol=1e-3))
    # Qwen2.5-VL's vocabulary, default chunking, fp32 accuracy (the ranks' statistics combined)
    gl = torch.Generator().manual_seed(99)
    xl = torch.randn(TOKENS, 152064, generator=gl) * 4
    yl = xl + torch.randn(TOKENS, 152064, generator=gl)
    fine = dict(rtol=2e-7, atol=4e-6)
    check_case("vocab152k", xl, yl, torch.randint(0, 152064, (TOKENS,), generator=gl), group, r, tp,
               valid=152064, chunk_size=None, tol=fine, grad_tol=fine)
    check_wrappers(x, y, target, group, r, tp, temperature=1.3)
    check_exact_loss(x, y, target % (VOCAB - 5), group, r, tp)


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 4, "run on 4 ranks"
    torch.manual_seed(0)
    run_tp(1, None, 0)
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    run_tp(2, pairs[rank // 2], rank % 2)
    run_tp(4, dist.group.WORLD, rank)
    dist.barrier()
    if rank == 0:
        print("OPS_WORKER_OK", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
