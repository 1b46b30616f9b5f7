"""Vocab-parallel ops: multi-rank correctness (tests/dist/ops_worker.py at TP 1, 2, 4) and, in
process, chunking invariance, saved-state size and input validation."""
import pytest
import torch

from megatron_papo.ops import vocab_parallel_entropy, vocab_parallel_kl, vocab_parallel_logprob, vocab_parallel_stats
from tests.distributed import run_distributed


def test_ops_match_full_vocab_reference_tp1_tp2_tp4():
    out = run_distributed("tests/dist/ops_worker.py", nproc=4, timeout=240)
    assert "OPS_WORKER_OK" in out


def _inputs(tokens=13, vocab=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, vocab, generator=g) * 3
    y = x + torch.randn(tokens, vocab, generator=g)
    return x, y, torch.randint(0, vocab, (tokens,), generator=g)


def test_chunk_size_does_not_change_results():
    x, y, t = _inputs()
    ref = vocab_parallel_stats(x, None, target=t, masked_logits=y, chunk_size=10_000)
    for chunk in (1, 4, 7):
        got = vocab_parallel_stats(x, None, target=t, masked_logits=y, chunk_size=chunk)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_full_size_vocab_matches_float64_to_fp32_accuracy():
    """At Qwen2.5-VL's 152,064 columns (default chunking, several chunks), every output and both
    gradients stay within 4e-6 of float64 torch: a softmax normalised by a sum accumulated in plain
    fp32 lanes (relative error ~1e-5 at this width) fails this; the small-vocab tests cannot see it."""
    g = torch.Generator().manual_seed(3)
    tokens, vocab = 11, 152064
    x = torch.randn(tokens, vocab, generator=g) * 4
    y = x + torch.randn(tokens, vocab, generator=g)
    t = torch.randint(0, vocab, (tokens,), generator=g)
    w = torch.randn(5, tokens, generator=g, dtype=torch.float64)
    xd, yd = x.double().requires_grad_(), y.double().requires_grad_()
    lp, lq = torch.log_softmax(xd, -1), torch.log_softmax(yd, -1)
    pick = lambda l: l.gather(1, t[:, None])[:, 0]
    refs = [pick(lp), -(lp.exp() * lp).sum(-1), pick(lq), -(lq.exp() * lq).sum(-1), (lp.exp() * (lp - lq)).sum(-1)]
    sum((r * c).sum() for r, c in zip(refs, w)).backward()
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    out = vocab_parallel_stats(xs, None, target=t, masked_logits=ys)
    sum((o * c.float()).sum() for o, c in zip(out, w)).backward()
    tol = dict(rtol=2e-7, atol=4e-6)
    for field, o, r in zip(out._fields, out, refs):
        torch.testing.assert_close(o.double(), r, **tol, msg=lambda m: f"{field}: {m}")
    torch.testing.assert_close(xs.grad.double(), xd.grad, **tol)
    torch.testing.assert_close(ys.grad.double(), yd.grad, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_output_gradients_match_torch(dtype):
    """logp alone and entropy alone (the backward's shortcuts for absent output gradients), with a
    temperature, vocab padding and chunks that do not divide the tokens."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(9, 50, generator=g) * 3).to(dtype)
    x[:, 45:] = 1e4  # padding columns: ignored, zero gradient
    t = torch.randint(0, 45, (9,), generator=g)
    lp_ref = lambda v: torch.log_softmax(v[:, :45].double() / 0.8, -1)
    for name, ours, ref in (
            ("logp", lambda v: vocab_parallel_logprob(v, t, None, 0.8, valid_vocab_size=45, chunk_size=4),
             lambda v: lp_ref(v).gather(1, t[:, None])[:, 0]),
            ("entropy", lambda v: vocab_parallel_entropy(v, None, 0.8, valid_vocab_size=45, chunk_size=4),
             lambda v: -(lp_ref(v).exp() * lp_ref(v)).sum(-1))):
        xs, xd = x.clone().requires_grad_(), x.double().requires_grad_()
        out, expected = ours(xs), ref(xd)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
        w = torch.randn(9, generator=g, dtype=torch.float64)
        (out * w.float()).sum().backward()
        (expected * w).sum().backward()
        assert xs.grad.dtype == dtype and (xs.grad[:, 45:] == 0).all(), name
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
        torch.testing.assert_close(xs.grad.double(), xd.grad, **tol, msg=lambda m: f"{name} grad: {m}")


def test_saves_only_the_input_logits_and_per_token_stats():
    x, y, t = _inputs(tokens=64, vocab=256)
    x.requires_grad_()
    y.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        out = vocab_parallel_stats(x, None, target=t, masked_logits=y, chunk_size=8)
    big = [s for s in saved if s.numel() >= x.numel()]
    assert {s.data_ptr() for s in big} == {x.data_ptr(), y.data_ptr()}, "logits were copied"
    small = sum(s.numel() for s in saved if s.numel() < x.numel())
    assert small <= 16 * 64, f"saved {small} extra elements for 64 tokens"
    sum(o.sum() for o in out).backward()
    assert x.grad.shape == x.shape and y.grad.shape == y.shape


def test_bad_inputs_name_the_argument():
    x, y, t = _inputs()
    with pytest.raises(ValueError, match="target ids"):
        vocab_parallel_logprob(x, t + 100, None)
    with pytest.raises(ValueError, match="target shape"):
        vocab_parallel_logprob(x, t[:-1], None)
    with pytest.raises(ValueError, match="integer token ids"):
        vocab_parallel_logprob(x, t.float(), None)
    with pytest.raises(ValueError, match="masked_logits shape"):
        vocab_parallel_kl(x, y[:, :-1], None)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprob(x, t, None, temperature=0.0)
    with pytest.raises(ValueError, match="valid_vocab_size"):
        vocab_parallel_logprob(x, t, None, valid_vocab_size=x.shape[1] + 1)
    with pytest.raises(ValueError, match="chunk_size"):
        vocab_parallel_logprob(x, t, None, chunk_size=0)
