"""A built-in, vision-dependent task: coloured shapes on a white canvas, questions only the image answers.

Generated on the fly; sample i of a dataset is a pure function of (seed, i), so images, questions
and answers are bitwise reproducible. Levels:
  1: one shape; "what colour / which shape" (7 answer classes)
  2: 1-4 shapes in a 2x2 grid; "how many (red) shapes" (answers 0-4)
  3: 2-3 shapes of distinct colours in distinct columns; "which shape / colour is left / right of the X one"
Images are `image_size` px square, a multiple of 28, so the Qwen2-VL processor does not resize them
(within its min/max pixels). Each sample carries an SFT target `<think>scene</think> \\boxed{answer}`.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from megatron_papo.data.prompts import IMAGE_PLACEHOLDER, PROMPT_TEMPLATES, render_prompt
from megatron_papo.data.sample import Sample

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 30), "blue": (30, 60, 220), "yellow": (230, 200, 20)}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (255, 255, 255)  # white, so a masked (black) patch is never mistaken for a shape
LEVELS = (1, 2, 3)
COUNTS = ("0", "1", "2", "3", "4")  # level 2's answers


@dataclass
class SyntheticConfig:
    seed: int = 0                       # the whole dataset is a function of this seed
    levels: tuple[int, ...] = (1, 2)    # difficulty levels drawn uniformly per sample (subset of 1, 2, 3)
    image_size: int = 84                # canvas side in px; multiple of 28, at least 56
    num_samples: int = 10_000           # samples per epoch (sample ids 0..num_samples-1)
    target_noise: float = 0.0           # fraction of samples whose SFT target answers wrong (a random other answer
                                        # of the same kind in \boxed{}, the description kept): imperfect
                                        # demonstrations; the answer RL and evaluation grade is always the true one
    prompt_template: str = PROMPT_TEMPLATES["synthetic"]  # `{content}` = the question with its <image>

    def __post_init__(self) -> None:
        self.levels = tuple(self.levels)
        if not self.levels or any(lv not in LEVELS for lv in self.levels):
            raise ValueError(f"SyntheticConfig.levels {self.levels} must be a non-empty subset of {LEVELS}")
        if self.image_size % 28 or self.image_size < 56:
            raise ValueError(f"SyntheticConfig.image_size {self.image_size} must be a multiple of 28 and >= 56")
        if not 0.0 <= self.target_noise < 1.0:
            raise ValueError(f"SyntheticConfig.target_noise {self.target_noise} must be in [0, 1)")
        if self.num_samples <= 0:
            raise ValueError(f"SyntheticConfig.num_samples must be positive, got {self.num_samples}")


@dataclass(frozen=True)
class Shape:
    kind: str     # one of SHAPES
    colour: str   # one of COLOURS
    cx: int       # centre, px from the left
    cy: int       # centre, px from the top
    r: int        # half the side / the radius, px

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    level: int
    shapes: tuple[Shape, ...]
    question: str   # without the image placeholder
    answer: str

    def description(self) -> str:
        """Shapes left to right: the `<think>` part of the SFT target."""
        return ", ".join(s.name for s in sorted(self.shapes, key=lambda s: s.cx))


def _shape(rng: np.random.Generator, x0: int, y0: int, cell: int, colour: str | None = None) -> Shape:
    """A random shape inside the square cell [x0, x0+cell) x [y0, y0+cell), 2 px clear of its border."""
    r = int(rng.integers(max(5, cell // 6), cell // 3 + 1))
    cx = x0 + int(rng.integers(r + 2, cell - r - 2 + 1))
    cy = y0 + int(rng.integers(r + 2, cell - r - 2 + 1))
    kind = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = colour or list(COLOURS)[int(rng.integers(len(COLOURS)))]
    return Shape(kind, colour, cx, cy, r)


def make_scene(rng: np.random.Generator, level: int, size: int) -> Scene:
    if level == 1:
        s = _shape(rng, 0, 0, size)
        if rng.integers(2):
            return Scene(1, (s,), "What colour is the shape?", s.colour)
        return Scene(1, (s,), "Which shape is it?", s.kind)
    if level == 2:
        half = size // 2
        cells = rng.permutation(4)[: int(rng.integers(1, 5))]
        shapes = tuple(_shape(rng, (c % 2) * half, (c // 2) * half, half) for c in sorted(cells))
        if rng.integers(2):
            return Scene(2, shapes, "How many shapes are there?", str(len(shapes)))
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        count = sum(s.colour == colour for s in shapes)
        return Scene(2, shapes, f"How many {colour} shapes are there?", str(count))
    # level 3: distinct columns (so left/right is unambiguous) and distinct colours (so "the X one" is)
    third = size // 3
    cols = sorted(rng.permutation(3)[: int(rng.integers(2, 4))])
    colours = [list(COLOURS)[i] for i in rng.permutation(len(COLOURS))[: len(cols)]]
    y0s = [int(rng.integers(0, size - third + 1)) for _ in cols]
    shapes = tuple(_shape(rng, c * third, y0, third, colour) for c, y0, colour in zip(cols, y0s, colours))
    # the reference shape has exactly one neighbour on the asked side
    if rng.integers(2):
        ref, other = shapes[1], shapes[0]
        return Scene(3, shapes, f"Which shape is left of the {ref.colour} one?", other.kind)
    ref, other = shapes[-2], shapes[-1]
    return Scene(3, shapes, f"What colour is right of the {ref.colour} one?", other.colour)


def render(scene: Scene, size: int) -> np.ndarray:
    """RGB uint8 [size, size, 3]; no anti-aliasing, so each shape's pixels are exactly its colour."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        box = (s.cx - s.r, s.cy - s.r, s.cx + s.r, s.cy + s.r)
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(s.cx, s.cy - s.r), (s.cx - s.r, s.cy + s.r), (s.cx + s.r, s.cy + s.r)], fill=fill)
    return np.asarray(img, dtype=np.uint8).copy()


class SyntheticShapes:
    """Map-style dataset: `ds[i]` is sample i (0 <= i < num_samples), generated on demand."""

    def __init__(self, config: SyntheticConfig | None = None):
        self.config = config or SyntheticConfig()

    def __len__(self) -> int:
        return self.config.num_samples

    def scene(self, index: int) -> Scene:
        c = self.config
        if not 0 <= index < c.num_samples:
            raise IndexError(f"synthetic sample {index} out of range [0, {c.num_samples})")
        rng = np.random.default_rng([c.seed, index])
        level = c.levels[int(rng.integers(len(c.levels)))]
        return make_scene(rng, level, c.image_size)

    def __getitem__(self, index: int) -> Sample:
        scene = self.scene(index)
        return Sample(
            sample_id=index,
            prompt=render_prompt(self.config.prompt_template, IMAGE_PLACEHOLDER + scene.question),
            answer=scene.answer,
            images=[render(scene, self.config.image_size)],
            target=sft_target(scene, self._noisy_answer(index, scene.answer)),
        )

    def _noisy_answer(self, index: int, answer: str) -> str | None:
        """A wrong answer for sample `index`'s SFT target with probability target_noise, else None.
        Drawn from a stream of its own, so the scenes do not depend on target_noise."""
        if not self.config.target_noise:
            return None
        rng = np.random.default_rng([self.config.seed, index, 1])
        if rng.random() >= self.config.target_noise:
            return None
        kind = next(k for k in (tuple(COLOURS), SHAPES, COUNTS) if answer in k)
        others = [a for a in kind if a != answer]
        return others[int(rng.integers(len(others)))]


def sft_target(scene: Scene, answer: str | None = None) -> str:
    """`<think>` the scene's description `</think>` and the answer (`answer`: a wrong one instead)."""
    return f"<think>{scene.description()}</think> \\boxed{{{answer or scene.answer}}}"


PERCEPTION_ERRORS = ("count", "colour", "shape", "order")
_THINK = re.compile(r"<think>(.*?)</think>", re.S)


def parse_description(response: str) -> list[tuple[str, str]] | None:
    """The (colour, shape) items named by a response's first `<think>` block, in order, when it
    reads as a scene description (`sft_target`'s `colour shape, colour shape`); else None."""
    m = _THINK.search(response)
    if m is None:
        return None
    items = []
    for part in m.group(1).split(","):
        words = part.split()
        if len(words) != 2 or words[0] not in COLOURS or words[1] not in SHAPES:
            return None
        items.append((words[0], words[1]))
    return items


def perception_errors(scene: Scene, response: str) -> list[str] | None:
    """What a response's description of the scene (its `<think>` block) gets wrong, a subset of
    PERCEPTION_ERRORS: "count" (another number of shapes), "colour" / "shape" (a colour / kind the
    scene does not hold in that number), "order" (level 3 only, whose columns are distinct: the
    right shapes in the wrong left-to-right order). [] when the description is right; None when
    the response holds no readable description."""
    said = parse_description(response)
    if said is None:
        return None
    truth = [(s.colour, s.kind) for s in sorted(scene.shapes, key=lambda s: s.cx)]
    errors = []
    if len(said) != len(truth):
        errors.append("count")
    for name, index in (("colour", 0), ("shape", 1)):
        seen, real = Counter(x[index] for x in said), Counter(x[index] for x in truth)
        # with another count, only a colour / kind absent from the scene is certainly wrong
        if (seen != real) if len(said) == len(truth) else bool(seen.keys() - real.keys()):
            errors.append(name)
    if not errors and scene.level == 3 and said != truth:
        errors.append("order")
    return errors


def corpus_lines() -> list[str]:
    """Every question, answer and description word the task can produce (tokenizer training text)."""
    lines = ["What colour is the shape?", "Which shape is it?", "How many shapes are there?"]
    lines += [f"How many {c} shapes are there?" for c in COLOURS]
    lines += [f"Which shape is left of the {c} one?" for c in COLOURS]
    lines += [f"What colour is right of the {c} one?" for c in COLOURS]
    names = [f"{c} {k}" for c in COLOURS for k in SHAPES]
    lines += [f"<think>{a}, {b}</think> \\boxed{{{ans}}}" for a in names for b in names
              for ans in (a.split()[0], a.split()[1])]
    lines += [f"<think>{n}</think> \\boxed{{{d}}}" for n in names for d in range(5)]
    return lines
