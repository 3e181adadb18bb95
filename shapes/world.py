"""The coloured-shapes world: the grammar of its captions, the renderer of its images, and describe(), its exact judge.

    caption(3, "red", "circle")                          # "three red circles"; parse_caption inverts it
    image = render(3, "red", "circle", seed=0)           # uint8 (3, 64, 64): deterministic in the seed
    images, captions = sample_batch(16, seed)            # float (16, 3, 64, 64) in [0, 1], captions uniform
    describe(images)                                     # [{"count": 3, "colour": "red", "shape": "circle"}, ...]
    score(describe(images), captions)                    # {"count": 1.0, "colour": 1.0, "shape": 1.0, "all": 1.0}
    python -m shapes --show                              # a grid of examples and what describe() says of them

Captions come from a small grammar: a count (one to four, as words), a colour and a shape, e.g. "a blue square",
"four yellow triangles". An image holds `count` non-overlapping shapes of that colour and shape, of random size and
position, with hard edges on a plain background. `describe` reads an image back without any learning: it classifies
each pixel to the nearest palette colour, labels the connected components of non-background pixels, and tells the
shapes apart by where their mass lies and how much of their bounding box they fill. It is exact on rendered images
(tests/test_shapes.py checks thousands) and tolerant of blur and noise, so on a diffusion model's samples it is the
ground truth for count, colour and shape accuracy, in the spirit of GenEval's object-level checks (Ghosh et al. 2023,
arXiv:2310.11513).

This file is all that a reward or a run needs to know of the world, and it needs torch alone: the count rewards
(counter.py), runs.py (its check for words the models never saw) and the models' training import it.

Reference: connected-component labelling by label propagation with pointer jumping (Shiloach & Vishkin 1982).
"""
import functools
import itertools
import math
import random

import torch

# -----------------------------------------------------------------------------
# the grammar

COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}  # "a" reads as the singular: "a blue square"
COLOURS = {  # saturated, pairwise >= 180 apart in RGB, and far from the background (see BACKGROUND)
    "red": (230, 25, 25),
    "green": (20, 170, 40),
    "blue": (30, 70, 230),
    "yellow": (245, 205, 20),
}
SHAPES = ("circle", "square", "triangle")
# Light grey: far from every colour (>= 180), so noise and blur move few pixels across the colour/background boundary,
# yet no blend of a colour with it (a blurred edge) is nearer to a third colour. On white, red's blurred edge (pink) is
# nearer to yellow; on mid grey (nearer the colours) shapes survive blur and noise less well.
BACKGROUND = (200, 200, 200)
RESOLUTION = 64


def caption(count, colour, shape):
    """(3, "red", "circle") -> "three red circles"."""
    return f"{COUNT_WORDS[count]} {colour} {shape}{'s' if count > 1 else ''}"


def parse_caption(text):
    """"three red circles" -> (3, "red", "circle"); ValueError for anything the grammar cannot produce."""
    for words in _grammar():
        if caption(*words) == text:
            return words
    raise ValueError(f"{text!r} is not a caption of the shapes grammar, e.g. 'three red circles'")


def all_captions():
    """The 4 * 4 * 3 = 48 captions, count-major."""
    return [caption(*words) for words in _grammar()]


def unknown_words(prompts):
    """The words of `prompts` that no caption uses, in order of first appearance. The shapes model's text encoder has
    never seen them (its tokenizer spells them letter by letter): it draws such a prompt as if they were not there."""
    known = {word for text in all_captions() for word in text.split()}
    return list(dict.fromkeys(word for text in prompts for word in text.lower().split() if word not in known))


def unknown_words_warning(prompts):
    """What a script says before a shapes model sees `prompts` with words it never saw ("" if none): the words, and
    the captions it knows."""
    words = unknown_words(prompts)
    if not words:
        return ""
    more = " ..." if len(words) > 8 else ""
    return (f"the shapes model has never seen the words {', '.join(map(repr, words[:8]))}{more}; it knows captions "
            f"such as 'three red circles' ({', '.join(COUNT_WORDS.values())}; {', '.join(COLOURS)}; "
            f"{', '.join(SHAPES)}), and draws other words as if they were not there")


def _grammar():
    return list(itertools.product(COUNT_WORDS, COLOURS, SHAPES))


def split_captions():
    """(train, eval): eval holds the 12 captions whose count, colour and shape indices sum to 0 mod 4. Every count,
    colour and shape appears in both, and every pair of words of an eval caption (colour + shape, count + shape,
    count + colour) also appears in some training caption: only the combination of all three is new."""
    index = {}
    for i, n in enumerate(COUNT_WORDS):
        for j, c in enumerate(COLOURS):
            for k, s in enumerate(SHAPES):
                index[caption(n, c, s)] = (i + j + k) % 4 == 0
    return [t for t, e in index.items() if not e], [t for t, e in index.items() if e]


# -----------------------------------------------------------------------------
# rendering

# Side of a shape's (square) bounding box, in pixels at RESOLUTION, scaled with the image size. describe() needs
# 10 px: a rasterised circle of 9 px fills its box as much as a blurred square, so it is exact from size 64 up.
MIN_SIZE, MAX_SIZE = 10, 20
GAP = 3  # pixels at least between two shapes' bounding boxes: a blur of sigma <~ 1 px does not join them
BORDER = 2  # pixels at least between a shape and the image edge, so blurred edges stay inside the image
MAX_TRIES = 100  # placements tried for one shape before the whole layout is drawn again


@functools.lru_cache(maxsize=None)
def _mask(shape, side):
    """Boolean (side, side) mask of a shape filling its bounding box, sampled at pixel centres: a circle inscribed in
    the box, the box itself, an upright isosceles triangle with its apex at the top-centre and its base the box's
    bottom edge (as tall as wide). Positions are whole pixels, so one mask per (shape, side) serves every image."""
    v, u = torch.meshgrid(torch.arange(side) + 0.5, torch.arange(side) + 0.5, indexing="ij")
    half = side / 2
    if shape == "circle":
        return (u - half) ** 2 + (v - half) ** 2 <= half ** 2
    if shape == "square":
        return torch.ones(side, side, dtype=torch.bool)
    return (u - half).abs() <= v / 2  # the triangle's half-width grows from 0 at the apex to half at the base


def _layout(count, size, rng):
    """`count` square boxes (x, y, side) inside the image, GAP apart, by rejection sampling."""
    lo, hi = round(MIN_SIZE * size / RESOLUTION), round(MAX_SIZE * size / RESOLUTION)
    gap, border = max(1, round(GAP * size / RESOLUTION)), round(BORDER * size / RESOLUTION)
    while True:
        boxes = []
        for _ in range(count):
            for _ in range(MAX_TRIES):
                s = rng.randint(lo, hi)
                x, y = rng.randint(border, size - border - s), rng.randint(border, size - border - s)
                if all(x >= bx + bs + gap or bx >= x + s + gap or y >= by + bs + gap or by >= y + s + gap
                       for bx, by, bs in boxes):
                    boxes.append((x, y, s))
                    break
            else:
                break  # this shape found no room: start the layout again
        if len(boxes) == count:
            return boxes


def render(count, colour, shape, seed, size=RESOLUTION):
    """The image of caption(count, colour, shape) for this seed: uint8 (3, size, size), the same on every call. The
    layout (sizes, positions) depends on the seed and count only: one seed draws "two red circles" and "two blue
    squares" in the same places."""
    if count not in COUNT_WORDS or colour not in COLOURS or shape not in SHAPES:
        raise ValueError(f"({count}, {colour!r}, {shape!r}) is outside the grammar")
    image = torch.tensor(BACKGROUND, dtype=torch.uint8)[:, None, None].repeat(1, size, size)
    fill = torch.tensor(COLOURS[colour], dtype=torch.uint8)[:, None]
    for x, y, s in _layout(count, size, random.Random(seed)):
        box = image[:, y:y + s, x:x + s]  # a view: writing into it draws on the image
        box[:, _mask(shape, s)] = fill
    return image


def sample_batch(n, generator, size=RESOLUTION):
    """n training pairs: (images float (n, 3, size, size) in [0, 1], captions), captions drawn uniformly from
    all_captions(), each image from its own seed. `generator` is a torch.Generator or an int seed."""
    if not isinstance(generator, torch.Generator):
        generator = torch.Generator().manual_seed(generator)
    grammar = _grammar()
    picks = [grammar[i] for i in torch.randint(len(grammar), (n,), generator=generator).tolist()]
    seeds = torch.randint(2 ** 62, (n,), generator=generator).tolist()
    images = torch.stack([render(*words, seed, size) for words, seed in zip(picks, seeds)])
    return images.float() / 255, [caption(*words) for words in picks]


# -----------------------------------------------------------------------------
# the evaluator

# Components smaller than this (pixels at RESOLUTION, scaled with the image's area) are noise, not shapes: the
# smallest rendered shape, a 10 px triangle, covers 50.
MIN_AREA = 16
# The shape test reads two numbers per component. Skew: the skewness of the rows its pixels lie in. An upright
# triangle widens downwards, so its mass piles up at the bottom: skewness -2 sqrt(2) / 5 = -0.57 (a row's density
# grows linearly), against 0 for anything symmetric top to bottom. Blur erodes a triangle's apex, which shortens its
# bounding box and fills it more, like a circle's, but hardly moves the skewness. Fill: area / bounding-box area, 1 for
# a square, pi/4 = 0.785 for a circle (0.78 to 0.81 once rasterised). Blur only lowers a square's fill (it rounds the
# corners, and a noisy pixel beside an edge widens the box; docs/shapes.md says how often) and leaves a circle's, so
# that threshold sits below the halfway point 0.89.
TRIANGLE_SKEW = -math.sqrt(2) / 5  # halfway between 0 and -0.57
SQUARE_FILL = 0.85
CHUNK = 256  # images labelled at once: bounds the memory of the label propagation


def describe(images):
    """Images (B, 3, H, W), float in [0, 1] or uint8 -> per image {"count", "colour", "shape"}: the number of shapes,
    and their colour and shape if all agree, else None (also None when there are no shapes). A shape is a
    4-connected component of non-background pixels of at least MIN_AREA; its colour is its pixels' majority colour;
    it is a triangle if its skew <= TRIANGLE_SKEW, else a square if its fill >= SQUARE_FILL, else a circle."""
    images = images.detach().cpu()
    images = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    out = []
    for chunk in images.split(CHUNK):
        out += _describe_chunk(chunk)
    return out


def _describe_chunk(images):
    B, _, H, W = images.shape
    names = list(COLOURS)
    palette = torch.tensor([BACKGROUND, *COLOURS.values()], dtype=torch.float32) / 255  # class 0 is the background
    # nearest palette entry: argmin over k of |x - p_k|^2 = |x|^2 - 2 x.p_k + |p_k|^2, without |x|^2 (same for all k)
    dist = -2 * torch.einsum("bchw,kc->bkhw", images, palette) + palette.square().sum(1)[:, None, None]
    cls = dist.argmin(1)  # (B, H, W)
    labels = _components(cls > 0)
    fg = labels > 0
    ids, comp, area = labels[fg].unique(return_inverse=True, return_counts=True)
    b, y, x = fg.nonzero(as_tuple=True)
    n = len(ids)

    def per_comp(values, reduce):
        return torch.zeros(n, dtype=values.dtype).scatter_reduce(0, comp, values, reduce, include_self=False)
    y0, y1, x0, x1 = per_comp(y, "amin"), per_comp(y, "amax"), per_comp(x, "amin"), per_comp(x, "amax")
    fill = area / ((y1 - y0 + 1) * (x1 - x0 + 1))
    dy = y - per_comp(y.float(), "mean")[comp]
    skew = per_comp(dy ** 3, "mean") / per_comp(dy ** 2, "mean").clamp(min=1e-6) ** 1.5  # a one-row sliver: 0
    votes = torch.zeros(n, len(palette)).index_put_((comp, cls[fg]), torch.ones(len(comp)), accumulate=True)
    colour = votes[:, 1:].argmax(1)  # the majority among the palette colours (a blurred edge may vote background)
    image = per_comp(b, "amax")
    keep = area >= MIN_AREA * H * W / RESOLUTION ** 2

    found = [[] for _ in range(B)]
    for i, k, f, c in zip(*(v[keep].tolist() for v in (image, skew, fill, colour))):
        shape = "triangle" if k <= TRIANGLE_SKEW else "square" if f >= SQUARE_FILL else "circle"
        found[i].append((names[c], shape))
    return [dict(count=len(f), colour=_agreed(c for c, _ in f), shape=_agreed(s for _, s in f)) for f in found]


def _agreed(values):
    values = set(values)
    return values.pop() if len(values) == 1 else None


def _components(mask):
    """Connected components of a boolean (B, H, W) mask, 4-connected: int32 labels, 0 off the mask, and on it the
    largest flat index + 1 of the component's pixels (so unique across the batch). 4-connectivity, because two shapes
    whose blurred edges meet only at a corner stay two, and a stray pixel attached by a corner becomes its own
    component, dropped by MIN_AREA. Each pass takes the maximum over the 4-neighbourhood, then jumps: a label names a
    pixel of the same component, whose label is at least as large, so the maximum spreads faster than a step per pass
    (the long serpentine in tests/test_shapes.py takes far fewer passes than it has pixels)."""
    B, H, W = mask.shape
    labels = torch.arange(1, B * H * W + 1, dtype=torch.int32).view(B, H, W) * mask
    while True:
        new = labels.clone()
        new[:, 1:] = torch.maximum(new[:, 1:], labels[:, :-1])
        new[:, :-1] = torch.maximum(new[:, :-1], labels[:, 1:])
        new[:, :, 1:] = torch.maximum(new[:, :, 1:], labels[:, :, :-1])
        new[:, :, :-1] = torch.maximum(new[:, :, :-1], labels[:, :, 1:])
        new *= mask
        new = torch.where(mask, new.view(-1)[(new - 1).clamp(min=0).view(-1)].view(B, H, W), 0)
        if torch.equal(new, labels):
            return labels
        labels = new


def score(descriptions, captions):
    """Fractions of images whose count, colour, shape, and all three match their caption."""
    targets = [parse_caption(c) for c in captions]
    right = {k: [d[k] == t[i] for d, t in zip(descriptions, targets)]
             for i, k in enumerate(("count", "colour", "shape"))}
    right["all"] = [all(r) for r in zip(*right.values())]
    return {k: sum(v) / max(len(v), 1) for k, v in right.items()}
