"""Vocab-parallel ops: multi-rank correctness (tests/dist/ops_worker.py at TP 1, 2, 4) and, in
process, chunking invariance, saved-state size and input validation."""
import pytest
import torch

from megatron_papo.ops import vocab_parallel_kl, vocab_parallel_logprob, vocab_parallel_stats
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
