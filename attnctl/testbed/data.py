"""Procedural "shapes" data: 1-3 coloured shapes on a plain background, with captions and boxes.

Everything is deterministic by seed. Two- and three-object combinations are split once (by
`HELDOUT_SEED`) into training combinations and held-out combinations; the training generator never
renders a held-out combination, and the compositional benchmark only asks for held-out ones. Head
searches (HeadHunter) ask for training combinations only, so no search prompt is a benchmark prompt.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 195, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND: tuple[int, int, int] = (245, 245, 245)
IMAGE_SIZE = 32
MIN_SIDE, MAX_SIDE = 9, 14
# Gap kept between objects so that every object is its own connected component.
MIN_GAP = 2
HELDOUT_SEED = 20_241_117
HELDOUT_FRACTION = 0.25
SEARCH_PROMPT_SEED = HELDOUT_SEED + 100
CAPTION_WORDS: tuple[str, ...] = ("a", "and", *COLORS, *SHAPES)


@dataclass(frozen=True)
class ShapeObject:
    """One rendered object; `box` is (x0, y0, x1, y1) in pixels, x1/y1 exclusive."""

    color: str
    shape: str
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class Sample:
    """An image (H, W, 3 uint8), its caption, its objects in caption order and their pixel masks.

    `masks` is (objects, H, W) bool: the pixels each object was drawn on (a later object covers an
    earlier one where they meet, which the gap between boxes rules out for random samples).
    """

    image: np.ndarray
    caption: str
    objects: tuple[ShapeObject, ...]
    masks: np.ndarray


def caption_for(objects: list[tuple[str, str]] | tuple[ShapeObject, ...]) -> str:
    """'a red circle and a blue square' from (colour, shape) pairs or objects."""
    pairs = [(o.color, o.shape) if isinstance(o, ShapeObject) else o for o in objects]
    return " and ".join(f"a {c} {s}" for c, s in pairs)


def parse_caption(caption: str) -> list[tuple[str, str]]:
    """Inverse of `caption_for`: the (colour, shape) pairs a caption asks for."""
    pairs = []
    for part in caption.strip().split(" and "):
        words = part.split()
        if len(words) != 3 or words[0] != "a" or words[1] not in COLORS or words[2] not in SHAPES:
            raise ValueError(f"caption part {part!r} is not 'a <colour> <shape>' with known words")
        pairs.append((words[1], words[2]))
    return pairs


def combo_key(pairs: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Order-free identity of a caption's content."""
    return tuple(sorted(pairs))


def heldout_combos() -> frozenset[tuple[tuple[str, str], ...]]:
    """Two- and three-object combinations (distinct colours, distinct shapes) never used in training."""
    rng = np.random.default_rng(HELDOUT_SEED)
    held: set[tuple[tuple[str, str], ...]] = set()
    for n in (2, 3):
        combos = sorted(_distinct_combos(n))
        picked = rng.choice(len(combos), size=max(1, round(HELDOUT_FRACTION * len(combos))), replace=False)
        held.update(combos[i] for i in sorted(picked))
    return frozenset(held)


def bench_prompts(n_objects: int) -> list[str]:
    """The fixed, ordered benchmark prompts with `n_objects` objects.

    One object: all colour x shape captions (they must be in training for the model to know the
    words; the benchmark's seeds and positions are new). Two and three: held-out combinations only.
    """
    rng = np.random.default_rng(HELDOUT_SEED + n_objects)
    if n_objects == 1:
        prompts = [caption_for([(c, s)]) for s in SHAPES for c in COLORS]
    else:
        prompts = []
        for key in sorted(k for k in heldout_combos() if len(k) == n_objects):
            order = rng.permutation(len(key))
            prompts.append(caption_for([key[i] for i in order]))
    order = rng.permutation(len(prompts))
    return [prompts[i] for i in order]


def search_prompts() -> list[str]:
    """The fixed, ordered prompts of head searches: every two- and three-object training combination.

    Disjoint from the benchmark by construction: `bench_prompts` asks for every single object and for
    held-out combinations only, and these are multi-object combinations that are not held out.
    """
    rng = np.random.default_rng(SEARCH_PROMPT_SEED)
    held = heldout_combos()
    prompts = []
    for n in (2, 3):
        for key in sorted(_distinct_combos(n) - held):
            order = rng.permutation(len(key))
            prompts.append(caption_for([key[i] for i in order]))
    order = rng.permutation(len(prompts))
    return [prompts[i] for i in order]


def generate(
    seed: int, n: int, size: int = IMAGE_SIZE, n_objects: int | None = None, allow_heldout: bool = False
) -> list[Sample]:
    """`n` samples, deterministic by `seed`; held-out combinations are skipped unless allowed."""
    rng = np.random.default_rng(seed)
    held = frozenset() if allow_heldout else heldout_combos()
    samples: list[Sample] = []
    while len(samples) < n:
        sample = render_random(rng, size, n_objects)
        if combo_key([(o.color, o.shape) for o in sample.objects]) not in held:
            samples.append(sample)
    return samples


def render_random(rng: np.random.Generator, size: int = IMAGE_SIZE, n_objects: int | None = None) -> Sample:
    """One random sample: distinct (colour, shape) pairs at non-overlapping random boxes."""
    n = int(rng.integers(1, 4)) if n_objects is None else n_objects
    all_pairs = [(c, s) for c in COLORS for s in SHAPES]
    pairs = [all_pairs[i] for i in rng.choice(len(all_pairs), size=n, replace=False)]
    scale = size / IMAGE_SIZE
    while True:
        boxes = []
        for _ in range(n):
            side = int(round(rng.integers(MIN_SIDE, MAX_SIDE + 1) * scale))
            x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            boxes.append((x0, y0, x0 + side, y0 + side))
        if all(_apart(a, b, MIN_GAP) for a, b in itertools.combinations(boxes, 2)):
            break
    return render(list(zip(pairs, boxes, strict=True)), size)


def render(spec: list[tuple[tuple[str, str], tuple[int, int, int, int]]], size: int = IMAGE_SIZE) -> Sample:
    """Draw ((colour, shape), square box) items; the returned boxes are the drawn pixels' extents."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    objects, masks = [], []
    for (color, shape), (x0, y0, x1, y1) in spec:
        mask = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(mask)
        # PIL boxes are inclusive, ours exclusive.
        if shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=255)
        elif shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=255)
        elif shape == "triangle":
            draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=255)
        else:
            raise ValueError(f"shape {shape!r} not in {SHAPES}")
        image.paste(COLORS[color], mask=mask)
        drawn = np.asarray(mask) > 0
        masks.append(drawn)
        ys, xs = np.nonzero(drawn)
        objects.append(
            ShapeObject(color, shape, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
        )
    return Sample(
        np.asarray(image).copy(),
        caption_for(tuple(objects)),
        tuple(objects),
        np.stack(masks) if masks else np.zeros((0, size, size), bool),
    )


def _apart(a: tuple[int, ...], b: tuple[int, ...], gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _distinct_combos(n: int) -> set[tuple[tuple[str, str], ...]]:
    combos = set()
    for shapes in itertools.combinations(SHAPES, n):
        for colors in itertools.permutations(COLORS, n):
            combos.add(combo_key(list(zip(colors, shapes, strict=True))))
    return combos
