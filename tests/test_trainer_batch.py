"""Micro-batch collation: targets/response masks aligned so position t predicts token t+1."""
import pytest
import torch

from megatron_papo.trainer.batch import Experience, collate, make_micro_batches, split_response_values


def _exp(i, prompt, response, rows=4):
    return Experience(sample_id=i, group=0, prompt_ids=prompt, response_ids=response,
                      pixel_values=torch.full((rows, 6), float(i)), masked_pixel_values=torch.zeros(rows, 6),
                      image_grid_thw=torch.tensor([[1, 2, 2]]), rollout_logp=[-0.5] * len(response),
                      advantage=float(i) - 0.5, old_logp=torch.arange(len(response), dtype=torch.float32) - 10)


def test_collate_alignment_and_round_trip():
    exps = [_exp(0, [5, 6, 7], [8, 9]), _exp(1, [5, 6], [10, 11, 12, 13])]
    mb = collate(exps, pad_id=0)
    assert mb.input_ids.tolist() == [[5, 6, 7, 8, 9, 0], [5, 6, 10, 11, 12, 13]]
    assert mb.targets.tolist() == [[6, 7, 8, 9, 0, 0], [6, 10, 11, 12, 13, 0]]
    # response_mask marks the positions whose *target* is a response token
    for b in range(2):
        picked = mb.targets[b][mb.response_mask[b].bool()].tolist()
        assert picked == exps[b].response_ids
    assert (mb.prompt_lengths + mb.response_mask.sum(1).long()).tolist() == [5, 6]  # real tokens per row
    assert mb.advantages[0][mb.response_mask[0].bool()].tolist() == [-0.5, -0.5]
    assert mb.pixel_values.shape == (8, 6) and mb.image_grid_thw.shape == (2, 3)
    back = split_response_values(mb.old_logp, exps)
    assert [t.tolist() for t in back] == [e.old_logp.tolist() for e in exps]
    assert mb.ref_logp is None  # not computed yet
    assert collate(exps, pad_id=0, pad_to_multiple=4).input_ids.shape == (2, 8)


def test_window_from_the_logits_start():
    """A loss reads logits from the shortest prompt's last token on; the window of the batch there
    lines up every per-position field with those logits, and its values map back to the responses."""
    exps = [_exp(0, [5, 6, 7, 4], [8, 9]), _exp(1, [5, 6, 7], [10, 11, 12]), _exp(2, [5, 6, 7, 4, 4], [3])]
    mb = collate(exps, pad_id=0)  # S = 6
    assert mb.logits_start() == 2 and mb.logits_start(multiple=4) == 2 and mb.logits_start(multiple=3) == 0
    w = mb.window(2)
    assert w.first_position == 2 and w.input_ids.tolist() == [row[2:] for row in mb.input_ids.tolist()]
    for name in ("targets", "response_mask", "advantages", "old_logp"):
        assert torch.equal(getattr(w, name), getattr(mb, name)[:, 2:]), name
    assert w.response_mask.sum() == mb.response_mask.sum()  # no response position is cut off
    assert torch.equal(w.prompt_mask, mb.prompt_mask[:, 2:]) and torch.equal(w.pixel_values, mb.pixel_values)
    ww = w.window(1)  # a window of a window counts from the sequence's start
    assert ww.first_position == 3 and torch.equal(ww.targets, mb.targets[:, 3:])
    back = split_response_values(w.old_logp, exps, w.first_position)
    assert [t.tolist() for t in back] == [e.old_logp.tolist() for e in exps]
    with pytest.raises(ValueError, match="sample 1's response starts before column 0"):
        split_response_values(ww.old_logp, exps, ww.first_position)


def test_single_row_window_is_at_most_the_response_plus_2tp_minus_1():
    """The memory plan (scaling.py) counts a micro-batch of one row's logits as its response + 2 tp - 1
    positions under sequence parallelism: the padded end rounds up, the start down. Both bounds hold
    here for every prompt and response length, and the plan's bound is reached."""
    reached = set()
    for tp in (1, 2, 4, 8):
        for p in range(1, 20):
            for r in range(1, 12):
                mb = collate([_exp(0, [5] * p, [6] * r)], pad_id=0, pad_to_multiple=tp)
                width = mb.input_ids.shape[1] - mb.logits_start(multiple=tp)
                assert width % tp == 0 and r <= width <= r + 2 * tp - 1, (tp, p, r, width)
                reached.add(width == r + 2 * tp - 1)
    assert reached == {True, False}


def test_errors_and_chunks():
    with pytest.raises(ValueError, match="empty response"):
        collate([_exp(0, [1, 2], [])], pad_id=0)
    with pytest.raises(ValueError, match="micro_batch_size"):
        make_micro_batches([], 0)
    assert [len(c) for c in make_micro_batches(list(range(5)), 2)] == [2, 2, 1]


def test_micro_batches_by_token_budget():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 40, (50,), generator=gen).tolist()
    exps = [_exp(i, [1] * 2, [2] * (n - 2)) for i, n in enumerate(lengths)]
    budget = 96
    batches = make_micro_batches(exps, micro_batch_size=4, max_tokens=budget)
    assert sorted(id(e) for b in batches for e in b) == sorted(id(e) for e in exps)  # each exactly once
    for b in batches:
        padded = len(b) * max(e.length for e in b)
        assert padded <= budget or len(b) == 1
    flat = [e for b in batches for e in b]
    assert [e.length for e in flat] == sorted(lengths, reverse=True)
    # greedy: the next sequence would have broken the budget of the batch before it
    for b, after in zip(batches, batches[1:]):
        assert (len(b) + 1) * b[0].length > budget
    padded_fixed = sum(len(c) * max(e.length for e in c) for c in make_micro_batches(exps, 4))
    padded_tokens = sum(len(b) * b[0].length for b in batches)
    assert padded_tokens < padded_fixed and padded_tokens <= 1.1 * sum(lengths)
    alone = make_micro_batches([_exp(0, [1], [2] * 200)] + exps[:3], 4, max_tokens=budget)
    assert len(alone[0]) == 1 and alone[0][0].length == 201  # longer than the budget: alone
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        make_micro_batches(exps, 4, max_tokens=-1)
