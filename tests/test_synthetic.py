"""The synthetic shapes task: deterministic, answers true to the rendered pixels, levels that differ."""
import re

import numpy as np
import pytest

from megatron_papo.data.synthetic import BACKGROUND, COLOURS, SHAPES, SyntheticConfig, SyntheticShapes


def _answer_from_scene(question: str, shapes) -> str:
    """Independent re-derivation of the answer from the scene and the question text."""
    if question == "What colour is the shape?":
        return shapes[0].colour
    if question == "Which shape is it?":
        return shapes[0].kind
    if question == "How many shapes are there?":
        return str(len(shapes))
    m = re.fullmatch(r"How many (\w+) shapes are there\?", question)
    if m:
        return str(sum(s.colour == m.group(1) for s in shapes))
    m = re.fullmatch(r"(Which shape|What colour) is (left|right) of the (\w+) one\?", question)
    ref = next(s for s in shapes if s.colour == m.group(3))
    side = [s for s in shapes if (s.cx < ref.cx if m.group(2) == "left" else s.cx > ref.cx)]
    assert len(side) == 1, "the question must have exactly one shape on the asked side"
    return side[0].kind if m.group(1) == "Which shape" else side[0].colour


def test_same_seed_same_samples_bitwise():
    a = SyntheticShapes(SyntheticConfig(seed=5, levels=(1, 2, 3)))
    b = SyntheticShapes(SyntheticConfig(seed=5, levels=(1, 2, 3)))
    c = SyntheticShapes(SyntheticConfig(seed=6, levels=(1, 2, 3)))
    for i in (0, 1, 17, 9999):
        x, y = a[i], b[i]
        assert x.images[0].tobytes() == y.images[0].tobytes()
        assert (x.prompt, x.answer, x.target, x.sample_id) == (y.prompt, y.answer, y.target, i)
    assert any(a[i].images[0].tobytes() != c[i].images[0].tobytes() for i in range(5))


@pytest.mark.parametrize("size", [56, 84, 112])
def test_answers_match_rendered_pixels(size):
    ds = SyntheticShapes(SyntheticConfig(seed=1, levels=(1, 2, 3), image_size=size, num_samples=300))
    for i in range(len(ds)):
        scene, sample = ds.scene(i), ds[i]
        img = sample.images[0]
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
        for s in scene.shapes:  # each shape is painted in its colour at its centre
            assert tuple(img[s.cy, s.cx]) == COLOURS[s.colour], (i, s)
        # a colour is on the canvas iff some shape has it; nothing else but background
        present = {name for name, rgb in COLOURS.items() if (img == rgb).all(-1).any()}
        assert present == {s.colour for s in scene.shapes}
        palette = np.array([BACKGROUND, *COLOURS.values()])
        assert (img[:, :, None, :] == palette).all(-1).any(-1).all()
        question = scene.question
        assert sample.prompt == f"<image>{question} Answer in \\boxed{{}}."
        assert sample.answer == scene.answer == _answer_from_scene(question, scene.shapes)
        assert sample.target == f"<think>{scene.description()}</think> \\boxed{{{sample.answer}}}"


def test_levels_differ():
    def summary(level):
        ds = SyntheticShapes(SyntheticConfig(seed=0, levels=(level,), num_samples=200))
        scenes = [ds.scene(i) for i in range(len(ds))]
        return {len(s.shapes) for s in scenes}, {s.answer for s in scenes}, {s.question.split()[0] for s in scenes}

    n1, a1, q1 = summary(1)
    n2, a2, q2 = summary(2)
    n3, a3, q3 = summary(3)
    assert n1 == {1} and a1 == set(COLOURS) | set(SHAPES) and q1 == {"What", "Which"}
    assert n2 == {1, 2, 3, 4} and a2 == {"0", "1", "2", "3", "4"} and q2 == {"How"}
    assert n3 == {2, 3} and a3 <= set(COLOURS) | set(SHAPES)
    assert not (a1 & a2)  # level 2 answers are counts, level 1 answers are names


def test_sft_targets_earn_full_reward_and_prompts_are_short():
    from megatron_papo.data.rewards import papo_reward
    from megatron_papo.data.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    ds = SyntheticShapes(SyntheticConfig(seed=2, levels=(1, 2, 3), num_samples=60))
    for i in range(len(ds)):
        s = ds[i]
        assert papo_reward(s.target, s.answer).reward == 1.0
        text = tok.apply_chat_template(s.messages, tokenize=False, add_generation_prompt=True)
        assert len(tok(text, add_special_tokens=False)["input_ids"]) <= 40  # plus the image's pads
        assert len(tok(s.target, add_special_tokens=False)["input_ids"]) <= 48


def test_target_noise_answers_wrong_in_that_fraction_and_changes_nothing_else():
    from megatron_papo.data.rewards import papo_reward

    clean = SyntheticShapes(SyntheticConfig(seed=3, levels=(1, 2, 3), num_samples=2000))
    noisy = SyntheticShapes(SyntheticConfig(seed=3, levels=(1, 2, 3), num_samples=2000, target_noise=0.25))
    wrong = 0
    for i in range(len(clean)):
        a, b = clean[i], noisy[i]
        assert a.answer == b.answer and a.prompt == b.prompt and np.array_equal(a.images[0], b.images[0])
        think = re.match(r"<think>.*</think>", a.target).group(0)
        assert b.target.startswith(think)  # the description stays the true one
        if b.target != a.target:
            wrong += 1
            assert papo_reward(b.target, b.answer).accuracy == 0.0 and papo_reward(b.target, b.answer).format == 1.0
            boxed = re.search(r"\\boxed\{(.*)\}", b.target).group(1)  # another answer of the same kind
            kind = COLOURS if a.answer in COLOURS else SHAPES if a.answer in SHAPES else "01234"
            assert boxed in kind and boxed != a.answer
    assert abs(wrong / len(clean) - 0.25) < 0.03, wrong  # binomial sd ~0.01
    with pytest.raises(ValueError, match="target_noise"):
        SyntheticConfig(target_noise=1.0)


def test_unresized_by_processor():
    from transformers import Qwen2VLImageProcessorPil

    ds = SyntheticShapes(SyntheticConfig(image_size=112))
    out = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)(images=ds[0].images, return_tensors="np")
    assert out["image_grid_thw"].tolist() == [[1, 8, 8]]


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="image_size 100"):
        SyntheticConfig(image_size=100)
    with pytest.raises(ValueError, match="levels"):
        SyntheticConfig(levels=(4,))
    with pytest.raises(IndexError, match="out of range"):
        SyntheticShapes(SyntheticConfig(num_samples=3))[3]
