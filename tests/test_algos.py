"""algos: the PAPO loss against docs/papo.md formulas worked out by hand, aggregation modes,
advantages and the DAPO filter, and the exact (logits) path against plain full-vocab torch."""
import math

import pytest
import torch

from megatron_papo.algos import (
    PAPOConfig,
    aggregate,
    dynamic_sampling_keep,
    fill_with_informative_groups,
    grpo_advantages,
    load_preset,
    overlong_penalty,
    papo_loss,
    papo_loss_from_logits,
)

# Two responses, 4 token slots each. Response 0 has A = +1 and 3 tokens (last slot is padding);
# response 1 has A = -2 and 4 tokens. Ratios pi/pi_old chosen to hit every clip branch.
ADV = [1.0, -2.0]
RATIOS = [[1.5, 1.1, 0.5, 1.0],   # A>0: high clip (1.5 > 1.3), none, none (r < 1 is not clipped for A>0), pad
          [0.5, 4.0, 1.2, 1.0]]   # A<0: low clip (0.5 < 0.8), dual clip (-A r = 8 > -3A = 6), none, none
MASK = [[1, 1, 1, 0], [1, 1, 1, 1]]
OLD = [[-1.2, -0.7, -2.0, -0.3], [-1.6, -2.5, -0.9, -0.4]]
REF = [[-1.0, -0.9, -1.5, -0.2], [-1.1, -1.3, -1.0, -0.5]]
MSK = [[-2.0, -0.6, -1.4, -3.0], [-1.9, -0.8, -1.2, -0.4]]


def hand_token_loss(logp, old, ref, msk, adv, gamma, eta1, eta2, beta, clip_low, clip_high, dual=3.0):
    """One token of docs/papo.md's reference-mode loss, in plain Python floats."""
    def k3(a, b):
        x = min(max(b - a, -20.0), 20.0)
        return min(max(math.exp(x) - x - 1, -10.0), 10.0)
    r = math.exp(min(max(logp - old, -20.0), 20.0))
    pg = max(-adv * r, -adv * min(max(r, 1 - clip_low), 1 + clip_high))
    if adv < 0:
        pg = min(pg, -dual * adv)
    return pg + beta * k3(logp, ref) - gamma * k3(logp, msk) + eta1 * (-logp) + eta2 * (-msk)


def hand_loss(logp, coef):
    total, count = 0.0, 0
    for b in range(2):
        for t in range(4):
            if MASK[b][t]:
                total += hand_token_loss(logp[b][t], OLD[b][t], REF[b][t], MSK[b][t], ADV[b], **coef)
                count += 1
    return total / count


def tensors():
    t = lambda v: torch.tensor(v, dtype=torch.float64)
    logp = t(OLD) + torch.log(t(RATIOS))
    return logp, t(OLD), t(REF), t(MSK), t(ADV), t(MASK)


PAPO_H = dict(gamma=0.02, eta1=0.05, eta2=0.05, beta=0.01, clip_low=0.2, clip_high=0.3)


def test_reference_loss_matches_hand_computation_values_grads_and_clip_metrics():
    logp, old, ref, msk, adv, mask = tensors()
    logp.requires_grad_()
    loss, metrics = papo_loss(PAPOConfig(**PAPO_H), logp=logp, old_logp=old, ref_logp=ref, masked_logp=msk,
                              advantages=adv, response_mask=mask)
    expected = hand_loss(logp.tolist(), PAPO_H)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # gradient: central finite differences of the hand formula
    loss.backward()
    h = 1e-6
    for b in range(2):
        for t in range(4):
            up, down = logp.tolist(), logp.tolist()
            up[b][t] += h
            down[b][t] -= h
            fd = (hand_loss(up, PAPO_H) - hand_loss(down, PAPO_H)) / (2 * h)
            assert logp.grad[b, t].item() == pytest.approx(fd, abs=1e-7), (b, t)
    # clipped tokens get no policy gradient: only the KL/perception/entropy terms remain
    assert logp.grad[0, 3] == 0  # padding
    # one token of 7 in each clip class
    assert metrics["clipfrac_high"].item() == pytest.approx(1 / 7)
    assert metrics["clipfrac_low"].item() == pytest.approx(1 / 7)
    assert metrics["clipfrac_dual"].item() == pytest.approx(1 / 7)
    ratios = [RATIOS[b][t] for b in range(2) for t in range(4) if MASK[b][t]]
    assert metrics["ratio_mean"].item() == pytest.approx(sum(ratios) / 7)
    ent = [-logp[b, t].item() for b in range(2) for t in range(4) if MASK[b][t]]
    assert metrics["entropy"].item() == pytest.approx(sum(ent) / 7)


def test_policy_gradient_is_zero_exactly_where_clipped():
    logp, old, ref, msk, adv, mask = tensors()
    logp.requires_grad_()
    cfg = PAPOConfig(gamma=0.0, eta1=0.0, eta2=0.0, beta=0.0)
    papo_loss(cfg, logp=logp, old_logp=old, advantages=adv, response_mask=mask)[0].backward()
    clipped = torch.tensor([[1, 0, 0, 1], [1, 1, 0, 0]], dtype=torch.bool)  # high, pad / low, dual
    assert (logp.grad[clipped] == 0).all()
    # unclipped: d(-A r)/dlogp / 7 = -A r / 7
    for b, t in ((0, 1), (0, 2), (1, 2), (1, 3)):
        assert logp.grad[b, t].item() == pytest.approx(-ADV[b] * RATIOS[b][t] / 7, rel=1e-10)


# docs/papo.md preset table: gamma, eta1 = eta2, ref KL beta, clip low/high, dynamic sampling
SPEC_PRESETS = {
    "grpo": (0.0, 0.0, 0.01, 0.2, 0.3, False),
    "papo_g": (0.02, 0.0, 0.01, 0.2, 0.3, False),
    "papo_h": (0.02, 0.05, 0.01, 0.2, 0.3, False),
    "dapo": (0.0, 0.0, 0.0, 0.2, 0.28, True),
    "papo_d": (0.01, 0.03, 0.0, 0.2, 0.28, True),
}


@pytest.mark.parametrize("name", sorted(SPEC_PRESETS))
def test_preset_values_and_loss_terms(name):
    gamma, eta, beta, clip_low, clip_high, dynamic = SPEC_PRESETS[name]
    cfg = load_preset(name)
    assert (cfg.gamma, cfg.eta1, cfg.eta2, cfg.beta, cfg.clip_low, cfg.clip_high, cfg.dynamic_sampling) == \
        (gamma, eta, eta, beta, clip_low, clip_high, dynamic)
    assert (cfg.perception_mode, cfg.entropy_mode, cfg.loss_agg_mode) == ("reference", "reference", "token_mean")
    if dynamic:
        assert (cfg.dynamic_sampling_low, cfg.dynamic_sampling_high) == (0.01, 0.99)
    logp, old, ref, msk, adv, mask = tensors()
    # terms a preset does not use must not be needed: pass None for them
    loss, metrics = papo_loss(cfg, logp=logp, old_logp=old, ref_logp=ref if beta else None,
                              masked_logp=msk if gamma or eta else None, advantages=adv, response_mask=mask)
    coef = dict(gamma=gamma, eta1=eta, eta2=eta, beta=beta, clip_low=clip_low, clip_high=clip_high)
    assert loss.item() == pytest.approx(hand_loss(logp.tolist(), coef), rel=1e-12)
    assert ("ref_kl" in metrics) == (beta > 0)
    # and no hidden term: adding the inputs of unused terms does not change the loss
    loss_all, _ = papo_loss(cfg, logp=logp, old_logp=old, ref_logp=ref, masked_logp=msk, advantages=adv,
                            response_mask=mask)
    assert loss_all.item() == pytest.approx(loss.item(), rel=1e-12)


def test_missing_inputs_and_bad_config_are_clear_errors():
    logp, old, ref, msk, adv, mask = tensors()
    with pytest.raises(ValueError, match="ref_logp"):
        papo_loss(load_preset("grpo"), logp=logp, old_logp=old, masked_logp=msk, advantages=adv, response_mask=mask)
    with pytest.raises(ValueError, match="masked_logp"):
        papo_loss(load_preset("papo_g"), logp=logp, old_logp=old, ref_logp=ref, advantages=adv, response_mask=mask)
    with pytest.raises(ValueError, match="papo_loss_from_logits"):
        papo_loss(load_preset("papo_g", perception_mode="exact"), logp=logp, old_logp=old, ref_logp=ref,
                  masked_logp=msk, advantages=adv, response_mask=mask)
    with pytest.raises(ValueError, match="response_mask shape"):
        papo_loss(load_preset("grpo"), logp=logp, old_logp=old, ref_logp=ref, masked_logp=msk, advantages=adv,
                  response_mask=mask[:, :3])
    with pytest.raises(ValueError, match="valid presets: .*papo_d"):
        load_preset("papo_x")
    with pytest.raises(ValueError, match="unknown PAPOConfig keys \\['gama'\\].*valid keys"):
        load_preset("papo_g", gama=0.1)
    with pytest.raises(ValueError, match="perception_mode"):
        PAPOConfig(perception_mode="full")
    with pytest.raises(ValueError, match="masked_branch_grad"):
        PAPOConfig(masked_branch_grad=True)
    assert load_preset("papo_h", gamma=0.04).gamma == 0.04


def test_aggregation_modes_over_micro_batches_of_different_sizes():
    v1 = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m1 = torch.tensor([[1, 1, 1], [1, 0, 0]])          # 4 tokens: 1 2 3 | 4
    v2 = torch.tensor([[10.0, 20.0, 30.0], [7.0, 8.0, 9.0], [1.0, 1.0, 1.0]])
    m2 = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 0, 0]])  # 2 tokens: 10 20, two empty sequences
    mbs = [(v1, m1), (v2, m2)]
    tok = sum(aggregate(v, m, "token_mean", num_micro_batches=2) for v, m in mbs)
    assert tok.item() == pytest.approx(((1 + 2 + 3 + 4) / 4 + (10 + 20) / 2) / 2)
    glob = sum(aggregate(v, m, "global_token_mean", global_token_count=6) for v, m in mbs)
    assert glob.item() == pytest.approx((1 + 2 + 3 + 4 + 10 + 20) / 6)
    seq = sum(aggregate(v, m, "seq_mean", num_micro_batches=2) for v, m in mbs)
    assert seq.item() == pytest.approx((((1 + 2 + 3) / 3 + 4) / 2 + 15) / 2)
    with pytest.raises(ValueError, match="global_token_count"):
        aggregate(v1, m1, "global_token_mean")


def test_grpo_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.2, 0.2, 0.2, 0.2])  # 2 prompts x 4 responses
    adv = grpo_advantages(rewards, group_size=4)
    mean = 1.5 / 4
    std = math.sqrt(((1 - mean) ** 2 + 2 * mean ** 2 + (0.5 - mean) ** 2) / 3)  # unbiased
    expected = [(r - mean) / (std + 1e-6) for r in (1.0, 0.0, 0.5, 0.0)] + [0.0] * 4
    assert adv.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-6)
    with pytest.raises(ValueError, match="multiple of group_size"):
        grpo_advantages(rewards[:7], group_size=4)


def test_dapo_filter_keeps_groups_strictly_inside_bounds():
    n = 100
    # group means: 0, 0.01, 0.02, 0.5, 0.98, 0.99, 1.0
    correct = [0, 1, 2, 50, 98, 99, 100]
    acc = torch.cat([torch.tensor([1.0] * c + [0.0] * (n - c)) for c in correct])
    keep = dynamic_sampling_keep(acc, group_size=n, low=0.01, high=0.99)
    assert keep.tolist() == [False, False, True, True, True, False, False]


def _dapo_fill(draws, batch_size, max_extra_draws, n=4):
    """fill_with_informative_groups over scripted draws (one list of group accuracies per draw)."""
    calls = []

    def draw(attempt):
        calls.append(attempt)
        return [list(g) for g in draws[attempt]]  # fresh lists: equal values, distinct groups

    def informative(groups):
        return dynamic_sampling_keep(torch.tensor(groups).flatten(), n, 0.01, 0.99).tolist()

    kept, drawn = fill_with_informative_groups(draw, batch_size, informative, max_extra_draws)
    return kept, drawn, calls


def test_dapo_refill_draws_until_the_batch_is_informative():
    right, wrong, mixed, half = [1.0] * 4, [0.0] * 4, [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]
    # enough in the first draw: one draw, the first informative groups in order
    kept, drawn, calls = _dapo_fill([[right, mixed, wrong, half, mixed]], batch_size=2, max_extra_draws=3)
    assert calls == [0] and kept == [mixed, half] and len(drawn) == 5
    # a second draw completes the batch
    kept, drawn, calls = _dapo_fill([[right, mixed, wrong], [wrong, half, right]], batch_size=2, max_extra_draws=3)
    assert calls == [0, 1] and kept == [mixed, half] and len(drawn) == 6
    assert kept[0] is drawn[1] and kept[1] is drawn[4]


def test_dapo_refill_pads_with_distinct_uninformative_groups_when_draws_run_out():
    right, wrong, mixed = [1.0] * 4, [0.0] * 4, [1.0, 0.0, 0.0, 0.0]
    draws = [[right, mixed, right], [right, wrong, right], [wrong, wrong, mixed]]
    kept, drawn, calls = _dapo_fill(draws, batch_size=3, max_extra_draws=2)
    assert calls == [0, 1, 2]  # the first draw and max_extra_draws more
    assert len(kept) == 3 and len({id(g) for g in kept}) == 3  # equal values, yet distinct groups
    assert kept[0] is drawn[1] and kept[1] is drawn[8]  # the informative ones first, in order
    assert kept[2] is drawn[0]  # then the first uninformative group drawn
    assert len(drawn) == 9


def test_overlong_penalty():
    lengths = torch.tensor([100, 768, 896, 1024, 1100])
    pen = overlong_penalty(lengths, max_response_length=1024, buffer_len=256, penalty_factor=1.0)
    assert pen.tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])
    assert overlong_penalty(lengths, 1024, 0).tolist() == [0.0] * 5


def _plain_exact_loss(logits, masked_logits, target, old, ref, adv, mask, cfg, temperature):
    """Exact-mode PAPO loss with plain full-vocabulary torch (no ops)."""
    lp = torch.log_softmax(logits.double() / temperature, -1)
    lq = torch.log_softmax(masked_logits.double() / temperature, -1)
    logp = lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    ent_p = -(lp.exp() * lp).sum(-1)
    ent_q = -(lq.exp() * lq).sum(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    ratio = (logp - old).clamp(-20, 20).exp()
    a = adv.unsqueeze(-1)
    pg = torch.maximum(-a * ratio, -a * ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high))
    pg = torch.where(a < 0, torch.minimum(pg, -cfg.dual_clip * a), pg)
    x = (ref - logp).clamp(-20, 20)
    ref_kl = (x.exp() - x - 1).clamp(-10, 10)
    tok = pg + cfg.beta * ref_kl - cfg.gamma * kl + cfg.eta1 * ent_p + cfg.eta2 * ent_q
    return (tok * mask).sum() / mask.sum()


@pytest.mark.parametrize("masked_branch_grad", [False, True])
def test_exact_loss_from_logits_matches_plain_torch(masked_branch_grad):
    g = torch.Generator().manual_seed(3)
    B, T, V = 3, 5, 37
    logits = (torch.randn(B, T, V, generator=g) * 2).requires_grad_()
    masked = (logits.detach() + torch.randn(B, T, V, generator=g)).requires_grad_()
    target = torch.randint(0, V, (B, T), generator=g)
    with torch.no_grad():
        base = torch.log_softmax(logits / 0.9, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    old = base + 0.3 * torch.randn(B, T, generator=g)
    ref = base + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.tensor([1.0, -1.0, 0.5])
    mask = torch.ones(B, T)
    mask[2, 3:] = 0
    cfg = load_preset("papo_h", perception_mode="exact", entropy_mode="exact", masked_branch_grad=masked_branch_grad)
    loss, metrics = papo_loss_from_logits(cfg, None, logits=logits, target=target, old_logp=old, ref_logp=ref,
                                          advantages=adv, response_mask=mask, masked_logits=masked, temperature=0.9,
                                          chunk_size=4)
    loss.backward()
    ref_logits = logits.detach().double().requires_grad_()
    ref_masked = masked.detach().double().requires_grad_(masked_branch_grad)
    expected = _plain_exact_loss(ref_logits, ref_masked, target, old.double(), ref.double(), adv.double(),
                                 mask.double(), cfg, 0.9)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=1e-5, atol=1e-6)
    if masked_branch_grad:
        torch.testing.assert_close(masked.grad.double(), ref_masked.grad, rtol=1e-5, atol=1e-6)
    else:
        assert masked.grad is None
    assert {"kl_prcp", "entropy", "masked_entropy", "ref_kl", "clipfrac_high"} <= set(metrics)


def test_reference_mode_from_logits_equals_papo_loss():
    g = torch.Generator().manual_seed(5)
    B, T, V = 2, 4, 16
    logits = torch.randn(B, T, V, generator=g).requires_grad_()
    target = torch.randint(0, V, (B, T), generator=g)
    logp, old, ref, msk, adv, mask = (x.float() for x in tensors())
    cfg = load_preset("papo_h")
    loss, _ = papo_loss_from_logits(cfg, None, logits=logits, target=target, old_logp=old, ref_logp=ref,
                                    advantages=adv, response_mask=mask, masked_logp=msk)
    logp = torch.log_softmax(logits.detach(), -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    expected, _ = papo_loss(cfg, logp=logp, old_logp=old, ref_logp=ref, masked_logp=msk, advantages=adv,
                            response_mask=mask)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="masked_logp"):
        papo_loss_from_logits(cfg, None, logits=logits, target=target, old_logp=old, ref_logp=ref, advantages=adv,
                              response_mask=mask)


def test_loss_tensors_are_keyword_only():
    """Both entry points take their tensors by name: a positional call (in either one's old order) fails."""
    logp, old, ref, msk, adv, mask = tensors()
    with pytest.raises(TypeError):
        papo_loss(load_preset("papo_h"), logp, old, ref, msk, adv, mask)
    with pytest.raises(TypeError):
        papo_loss_from_logits(load_preset("papo_h"), None, logp[..., None], old.long(), old, ref, adv, mask)
