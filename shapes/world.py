"""Coloured shapes: a synthetic text-to-image world to train a tiny model on from scratch, and its exact evaluator.

    caption(3, "red", "circle")                          # "three red circles"; parse_caption inverts it
    image = render(3, "red", "circle", seed=0)           # uint8 (3, 64, 64): deterministic in the seed
    images, captions = sample_batch(16, seed)            # float (16, 3, 64, 64) in [0, 1], captions uniform
    describe(images)                                     # [{"count": 3, "colour": "red", "shape": "circle"}, ...]
    score(describe(images), captions)                    # {"count": 1.0, "colour": 1.0, "shape": 1.0, "all": 1.0}
    tokenizer = build_tokenizer("out/shapes/tokenizer")  # CLIP's BPE, one token per word of the grammar
    python shapes.py --show                              # a grid of examples and what describe() says of them
    python shapes.py --eval --lora out/shapes-count/lora.safetensors   # describe()'s verdict on base vs LoRA samples
    python shapes.py --train                             # the model in models/shapes, from scratch (~1 hour, 2 cores)
    python shapes.py --train --counter-only              # only its counter, anew (~15 min)
    python shapes.py --train --flow                      # the rectified-flow sibling in models/shapes-flow (~1 hour)
    python shapes.py --eval --model shapes-flow          # describe()'s verdict on it

Captions come from a small grammar: a count (one to four, as words), a colour and a shape, e.g. "a blue square",
"four yellow triangles". An image holds `count` non-overlapping shapes of that colour and shape, of random size and
position, with hard edges on a plain background. `describe` reads an image back without any learning: it classifies
each pixel to the nearest palette colour, labels the connected components of non-background pixels, and tells the
shapes apart by where their mass lies and how much of their bounding box they fill. It is exact on rendered images
(tests/test_shapes.py checks thousands) and tolerant of blur and noise, so on a diffusion model's samples it is the
ground truth for count, colour and shape accuracy, in the spirit of GenEval's object-level checks (Ghosh et al. 2023,
arXiv:2310.11513).

The model (`load_sd("shapes")`, trained by `train` below and shipped in models/shapes) is a Stable Diffusion in
miniature: the same diffusers / transformers classes (AutoencoderKL 64 px <-> 16x16x4, CLIPTextModel over the grammar's
tokens, UNet2DConditionModel, DDIMScheduler on SD's noise schedule), trained from scratch on rendered images. A small
CNN counter, trained on rendered images and on the model's own samples counted by describe() (as real reward models
learn from people's labels of generated images), is the learned reward `shapes-count` (served by rewards.py).
Its sibling `load_sd("shapes-flow")` (train_flow below, shipped in models/shapes-flow) is an SD3 in miniature on the
same VAE and renders: SD3Transformer2DModel (an MMDiT), two CLIPTextModelWithProjection and a T5EncoderModel over the
grammar's words, trained by rectified flow, sampled by flow.py (or diffusers' StableDiffusion3Pipeline).

References: DDPM, Ho et al. 2020 (arXiv:2006.11239); rectified flow and SD3, Liu et al. 2022 (arXiv:2209.03003),
Esser et al. 2024 (arXiv:2403.03206); classifier-free guidance, Ho & Salimans 2022
(arXiv:2207.12598); latent diffusion, Rombach et al. 2022 (arXiv:2112.10752); connected-component labelling by label propagation with pointer jumping (Shiloach & Vishkin 1982);
byte-pair encoding, Sennrich et al. 2016 (arXiv:1508.07909), as CLIP's tokenizer uses it (Radford et al. 2021).
"""
import collections
import copy
import functools
import itertools
import json
import math
import os
import random
import time

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
# corners, and a noisy pixel beside an edge widens the box: with sigma 1 px and noise 0.05, 1% of squares fill less
# than 0.86) and leaves a circle's, so that threshold sits below the halfway point 0.89.
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
    (a rendered image takes 5 passes; the 2080-pixel serpentine in tests/test_shapes.py 69)."""
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


# -----------------------------------------------------------------------------
# the count rewards: describe()'s exact count, and a learned counter with a gradient (rewards.py serves both, as
# shapes-count-exact and shapes-count)

COUNTER_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "shapes",
                               "counter.safetensors")


class ShapeCounter(torch.nn.Module):
    """images (B, 3, H, W) in [0, 1] -> soft count of shapes (B,): a small CNN predicts a density map, one unit of
    mass per shape, and sums it (counting by density, Lempitsky & Zisserman 2010). `python shapes.py --train` fits it
    to rendered images of 0 to 5 shapes, blurred and noised, and to the shapes model's own samples counted by
    describe(); like any learned reward it can still be fooled, which is what describe() is there to catch."""

    def __init__(self, width=32):
        super().__init__()
        w, nn = width, torch.nn
        self.net = nn.Sequential(  # 64 px -> 8x8 density cells, each seeing ~40 px: a whole shape
            nn.Conv2d(3, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1, stride=2), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1, stride=2), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, stride=2), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 1, 1))

    def forward(self, images):
        return torch.nn.functional.softplus(self.net(images * 2 - 1)).sum((1, 2, 3))


class ShapesCount(torch.nn.Module):
    """-max(|counted shapes - n| - 1/2, 0) for captions of the grammar ("three red circles": n = 3, by
    parse_caption): how far the soft count is from rounding to n. An image whose count rounds to n scores 0 and sends
    no gradient. Why not -|c - n| as for OWL-ViT: a counter that reads right images a little high (the first one,
    trained on renders alone, read four right shapes as 4.17 on average) makes -|c - n| push every right image towards
    fewer shapes with full force; measured with that counter (global batch 32, lr 2e-3, 25 steps), it emptied a third
    of the "a ..." images and cost 13 points of count accuracy, where this form at lr 3e-3 lost none of colour or
    shape."""

    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def forward(self, images, prompts):
        targets = torch.tensor([parse_caption(p)[0] for p in prompts], dtype=torch.float32, device=images.device)
        error = (self.counter(images.to(next(self.counter.parameters()).dtype)).float() - targets).abs()
        return -(error - 0.5).clamp(min=0)


def shapes_count_exact(images, prompts):
    """-|describe()'s count - n| for captions of the grammar: the exact count error, no gradient."""
    targets = torch.tensor([parse_caption(p)[0] for p in prompts], dtype=torch.float32)
    counts = torch.tensor([d["count"] for d in describe(images)], dtype=torch.float32)
    return -(counts - targets).abs().to(images.device)


def load_counter_reward(path=COUNTER_WEIGHTS):
    """ShapesCount with the counter's weights from `path` (shipped in models/shapes), frozen, in eval mode."""
    from safetensors.torch import load_file
    counter = ShapeCounter()
    counter.load_state_dict(load_file(path))
    return ShapesCount(counter).requires_grad_(False).eval()


# -----------------------------------------------------------------------------
# the tokenizer

MAX_TOKENS = 8  # token ids per caption, padded: start + count + colour + shape + end, and room to spare
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"  # as model.py's tiny tokenizer
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def build_tokenizer(directory):
    """A CLIPTokenizer for the grammar, saved in `directory`: each word of it ("a", "two", "red", "circle",
    "circles", ...) is one token, so the text encoder sees words, not letters. Other text falls back to single
    characters. Pads with the end token to MAX_TOKENS, as CLIP does; "" encodes to start, end, padding."""
    from transformers import CLIPTokenizer
    words = sorted({w for c in all_captions() for w in c.split()})
    merges = _learn_merges(words)
    symbols = list(CHARS) + [c + "</w>" for c in CHARS] + [a + b for a, b in merges] + [BOS, EOS]
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump({s: i for i, s in enumerate(symbols)}, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer.from_pretrained(directory, model_max_length=MAX_TOKENS, bos_token=BOS, eos_token=EOS,
                                              pad_token=EOS, unk_token=EOS)
    tokenizer.save_pretrained(directory)  # so that CLIPTokenizer.from_pretrained(directory) gives this one back
    split = [w for w in words if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]
    if split:
        raise RuntimeError(f"the merges do not build these words into one token each: {split}")
    return tokenizer


def _learn_merges(words):
    """Byte-pair encoding's training (Sennrich et al. 2016) on the words, each once, until every word is one symbol:
    repeatedly merge the most frequent adjacent pair (ties: the first in sorted order). A BPE tokenizer applies merges
    lowest rank first, which replays this training, so it rebuilds each word whole. Merges written by hand, one chain
    per word, can break one another: "r e" (from "red") ranked before "t h" would split "three" as "th", "re", "e</w>"."""
    corpus = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in words]  # CLIP marks a word's last symbol with </w>
    merges = []
    while any(len(w) > 1 for w in corpus):
        pairs = collections.Counter(p for w in corpus for p in zip(w, w[1:]))
        pair = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(pair)
        corpus = [_merge(w, pair) for w in corpus]
    return merges


def _merge(word, pair):
    out, i = [], 0
    while i < len(word):
        if word[i:i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


# -----------------------------------------------------------------------------
# the model (trained by python shapes.py --train)

MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "shapes")
VAE_CONFIG = dict(  # three blocks: 64 px images <-> 16x16x4 latents (SD's VAE has four: 8x smaller latents)
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8,
    sample_size=RESOLUTION)
TEXT_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=MAX_TOKENS)
UNET_CONFIG = dict(  # cross-attention at 8x8 and 4x4, where a shape is a few cells and counting is a global question
    in_channels=4, out_channels=4, block_out_channels=(32, 64, 128), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16)
SCHEDULER_CONFIG = dict(  # SD 1.x's noise schedule and DDIM conventions, so the model samples like SD
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
    set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
CAPTION_DROPOUT = 0.1  # captions replaced by "" in training: the unconditional model classifier-free guidance needs
EMA_DECAY = 0.999  # the shipped UNet and text encoder are exponential moving averages of the trained weights


SAVE_EVERY = 250  # optimisation steps between training checkpoints: a stopped --train resumes from the last one


def _optimise(name, modules, steps, lr, loss_fn, generator, state_dir, after_step=None):
    """AdamW on the parameters of `modules` (a ModuleList) for `steps` steps of loss_fn(step), with a linear warm-up
    and a cosine decay, a progress bar, and a checkpoint in state_dir/name.pt every SAVE_EVERY steps (the modules,
    optimiser, data generator and step), from which a new call continues."""
    from tqdm import tqdm
    params = [p for p in modules.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = min(200, steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    path, start = os.path.join(state_dir, f"{name}.pt"), 0
    if os.path.isfile(path):
        state = torch.load(path, weights_only=True)
        modules.load_state_dict(state["modules"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        generator.set_state(state["generator"])
        start = state["step"]
    for step in tqdm(range(start, steps), initial=start, total=steps, desc=name, dynamic_ncols=True):
        loss_fn(step).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if after_step:
            after_step(step)
        if (step + 1) % SAVE_EVERY == 0 or step + 1 == steps:
            state = dict(modules=modules.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(),
                         generator=generator.get_state(), step=step + 1)
            torch.save(state, path + ".tmp")
            os.replace(path + ".tmp", path)


def _update_ema(ema, live, step):
    """ema's parameters move towards live's after optimisation step `step`; the decay warms up to EMA_DECAY, so that
    the random initial weights fade fast."""
    decay = min(EMA_DECAY, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), live.parameters()):
            e.lerp_(p, 1 - decay)


def train_vae(steps, batch, generator, state_dir, n_scale=512):
    """An AutoencoderKL for rendered images: L1 + MSE reconstruction and a small KL term (as SD's, which keeps the
    latents near N(0, I) in scale but lets them carry detail). Returns it with scaling_factor set to 1 / the std of
    its latents (over `n_scale` renders), the role of SD's 0.18215."""
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(**VAE_CONFIG)

    def loss(step):
        x = sample_batch(batch, generator)[0] * 2 - 1  # (B, 3, 64, 64): the VAE works in [-1, 1], as SD's
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        return (recon - x).abs().mean() + (recon - x).square().mean() + 1e-6 * posterior.kl().mean()

    _optimise("vae", torch.nn.ModuleList([vae]), steps, 1e-3, loss, generator, state_dir)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = vae.encode(sample_batch(n_scale, torch.Generator().manual_seed(0))[0] * 2 - 1).latent_dist.mode()
    vae.register_to_config(scaling_factor=1 / z.std().item())
    return vae


@torch.no_grad()
def encode_pool(vae, n, generator, chunk=256):
    """n rendered training images as scaled latents (n, 4, 16, 16) and their captions: rendering and encoding once
    is cheaper than doing it for every UNet step."""
    latents, captions = [], []
    for i in range(0, n, chunk):
        images, caps = sample_batch(min(chunk, n - i), generator)
        latents.append(vae.encode(images * 2 - 1).latent_dist.mode() * vae.config.scaling_factor)
        captions += caps
    return torch.cat(latents), captions


def train_text_to_image(latents, captions, tokenizer, steps, batch, generator, state_dir):
    """The UNet and the text encoder, from scratch and together: the epsilon objective of DDPM (Ho et al. 2020,
    Eq. 14) on SD's schedule, with captions dropped to "" at random so one model is both conditional and
    unconditional (classifier-free guidance, Ho & Salimans 2022). Returns EMA copies of both."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **TEXT_CONFIG))
    unet = UNet2DConditionModel(sample_size=latents.shape[-1], **UNET_CONFIG)
    models = torch.nn.ModuleList([unet, text_encoder, copy.deepcopy(unet), copy.deepcopy(text_encoder)])
    ema = models[2:].requires_grad_(False)  # checkpointed with the rest: a resumed run keeps its average
    alphas = DDIMScheduler(**SCHEDULER_CONFIG).alphas_cumprod  # (1000,): a_t, the fraction of signal variance at t
    ids = tokenizer(captions + [""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
    ids, empty = ids[:-1], ids[-1]  # (N, MAX_TOKENS): every caption tokenised once

    def loss(step):
        i = torch.randint(len(latents), (batch,), generator=generator)
        x0, tokens = latents[i], ids[i].clone()  # (B, 4, 16, 16), (B, MAX_TOKENS)
        tokens[torch.rand(batch, generator=generator) < CAPTION_DROPOUT] = empty
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(len(alphas), (batch,), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise  # DDPM Eq. 4: the forward process in one jump
        eps = unet(x_t, t, text_encoder(tokens)[0]).sample
        return (eps - noise).square().mean()

    _optimise("unet", models, steps, 1e-3, loss, generator, state_dir,
              after_step=functools.partial(_update_ema, ema, models[:2]))
    return ema[0], ema[1]


def train_counter(steps, batch, generator, state_dir, samples):
    """ShapeCounter, supervised half on rendered images with 0 to MAX_COUNT + 1 shapes of any colours and kinds,
    blurred and noised a little, and half on `samples` = (images uint8 (N, 3, H, W), counts (N,)): the model's own
    samples counted by describe(), flipped left-right at random. A reward model trained only on clean renders reads a
    diffusion model's blobs badly (merged shapes, smears), and fine-tuning climbs exactly those errors; learned
    rewards for real models are trained on the generator's outputs labelled by people (ImageReward, PickScore), and
    describe() plays the people here."""
    counter = ShapeCounter()
    images, counts = samples
    half = batch // 2

    def loss(step):
        rendered, rendered_counts = counting_batch(batch - half, generator)
        i = torch.randint(len(images), (half,), generator=generator)
        flip = torch.rand(half, 1, 1, 1, generator=generator) < 0.5
        drawn = images[i].float() / 255
        drawn = torch.where(flip, drawn.flip(3), drawn)
        return (counter(torch.cat([rendered, drawn])) - torch.cat([rendered_counts, counts[i].float()])).square().mean()

    _optimise("counter", torch.nn.ModuleList([counter]), steps, 2e-3, loss, generator, state_dir)
    return counter.eval().requires_grad_(False)


@torch.no_grad()
def model_samples(sd, captions, n, generator, steps=20, batch=64):
    """n samples of `sd` for captions drawn from `captions`, each batch at a guidance scale drawn from 2 to 10 (a
    range of sharpness and of errors), read by describe(): (images uint8 (n, 3, H, W), counts (n,))."""
    from model import latent_shape
    picks = [captions[i] for i in torch.randint(len(captions), (n,), generator=generator).tolist()]
    noise = torch.randn(n, *latent_shape(sd, RESOLUTION), generator=generator)
    images = torch.cat([draw(sd, picks[i:i + batch], noise[i:i + batch], steps,
                             2 + 8 * torch.rand(1, generator=generator).item(), batch) for i in range(0, n, batch)])
    images = (images * 255).round().to(torch.uint8)
    return images, torch.tensor([d["count"] for d in describe(images)])


def counting_batch(n, generator, size=RESOLUTION):
    """(images (n, 3, size, size) in [0, 1], counts (n,)): shapes of mixed colours and kinds, 0 to 5 of them."""
    counts = torch.randint(len(COUNT_WORDS) + 2, (n,), generator=generator)
    images = []
    for c in counts.tolist():
        seed = int(torch.randint(2 ** 62, (1,), generator=generator))
        rng = random.Random(seed)
        image = torch.tensor(BACKGROUND, dtype=torch.uint8)[:, None, None].repeat(1, size, size)
        for x, y, s in (_layout(c, size, rng) if c else []):
            image[:, y:y + s, x:x + s][:, _mask(rng.choice(SHAPES), s)] = torch.tensor(
                COLOURS[rng.choice(list(COLOURS))], dtype=torch.uint8)[:, None]
        images.append(image)
    images = torch.stack(images).float() / 255
    sigma = 0.3 + 0.7 * torch.rand(n, 1, 1, 1, generator=generator)  # blur of 0.3 to 1 px, as generated images have
    images = _blur(images, sigma) + 0.03 * torch.randn(images.shape, generator=generator)
    return images.clamp(0, 1), counts.float()


def _blur(images, sigma):  # Gaussian blur, one sigma (n, 1, 1, 1) per image, 5x5 taps
    x = torch.arange(-2, 3, dtype=images.dtype)
    k = torch.exp(-x.square() / (2 * sigma.view(-1, 1).square()))
    k = k / k.sum(1, keepdim=True)  # (n, 5)
    n, c, h, w = images.shape
    flat = torch.nn.functional.pad(images, (2, 2, 2, 2), mode="replicate").reshape(1, n * c, h + 4, w + 4)
    kh = k.repeat_interleave(c, 0)[:, None, None, :]  # (n * c, 1, 1, 5)
    flat = torch.nn.functional.conv2d(flat, kh, groups=n * c)
    flat = torch.nn.functional.conv2d(flat, kh.transpose(2, 3), groups=n * c)
    return flat.reshape(n, c, h, w)


def save_model(out, vae, unet, text_encoder, tokenizer):
    """A diffusers-format directory that model.load_sd (and StableDiffusionPipeline.from_pretrained) reads, weights
    in fp16 safetensors (half the size; load_sd casts them to the run's dtype)."""
    from diffusers import DDIMScheduler
    for name, module in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder)):
        module.to(torch.float16).save_pretrained(os.path.join(out, name))
        module.to(torch.float32)
    tokenizer.save_pretrained(os.path.join(out, "tokenizer"))
    DDIMScheduler(**SCHEDULER_CONFIG).save_pretrained(os.path.join(out, "scheduler"))
    index = dict(_class_name="StableDiffusionPipeline", vae=["diffusers", "AutoencoderKL"],
                 unet=["diffusers", "UNet2DConditionModel"], text_encoder=["transformers", "CLIPTextModel"],
                 tokenizer=["transformers", "CLIPTokenizer"], scheduler=["diffusers", "DDIMScheduler"],
                 safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)


@torch.no_grad()
def draw(sd, captions, noise, steps, guidance, batch=64):
    """Images (n, 3, H, W) float in [0, 1]: captions[i] sampled from noise[i] (n, 4, h, w), `batch` at a time, with
    DDIM (shapes-flow: the Euler ODE of its velocity) and classifier-free guidance."""
    from flow import flow_sample
    from model import decode, encode_prompts
    from sampler import ddim_sample
    sample = flow_sample if sd.flow else ddim_sample
    images = []
    for i in range(0, len(captions), batch):
        cond = encode_prompts(sd, captions[i:i + batch])
        uncond = encode_prompts(sd, [""]).expand(len(cond), -1, -1)
        images.append(decode(sd, sample(sd, cond, uncond, noise[i:i + batch], steps, guidance)).float())
    return torch.cat(images)


@torch.no_grad()
def evaluate(sd, prompts, n=256, steps=20, guidance=7.5, seed=0, batch=64, reward_fn=None):
    """Sample n images over `prompts` (cycled; fixed seeds) and read them with describe(): the accuracy of count,
    colour and shape (and all three), plus the mean of reward_fn if given. Returns (results, images)."""
    from model import latent_shape
    captions = [prompts[i % len(prompts)] for i in range(n)]
    noise = torch.randn(n, *latent_shape(sd, RESOLUTION), generator=torch.Generator().manual_seed(seed))
    images = draw(sd, captions, noise, steps, guidance, batch)
    results = score(describe(images), captions)
    if reward_fn is not None:
        results["reward"] = reward_fn(images, captions).mean().item()
    return results, images


def train(out=MODEL_DIR, vae_steps=1500, unet_steps=8000, counter_steps=1500, pool=40000, counter_samples=1536,
          seed=0, counter_only=False, checks=512):
    """The whole model, from nothing: VAE, then UNet + text encoder on a pool of encoded images, saved to `out`; then
    the counter, on renders and on `counter_samples` of the saved model's own images for the training captions.
    Every phase checkpoints to out/.train, so an interrupted run picks up where it stopped. counter_only: keep the
    model in `out` and train its counter afresh. checks: renders for the VAE's latent scale and the counter's check
    (half as many for the VAE's round trip and the counter's check on samples); a smoke run passes fewer."""
    state_dir = os.path.join(out, ".train")
    os.makedirs(state_dir, exist_ok=True)
    t0 = time.time()
    if not counter_only:
        vae = train_vae(vae_steps, 32, torch.Generator().manual_seed(seed), state_dir, checks)
        check = sample_batch(checks // 2, torch.Generator().manual_seed(seed + 1))
        with torch.no_grad():  # the VAE's round trip must keep what describe() reads, or no diffusion model can
            recon = (vae.decode(vae.encode(check[0] * 2 - 1).latent_dist.mode()).sample / 2 + 0.5).clamp(0, 1)
        print(f"vae: {time.time() - t0:.0f} s, describe() on its reconstructions: {score(describe(recon), check[1])}")
        latents, captions = encode_pool(vae, pool, torch.Generator().manual_seed(seed + 2))
        tokenizer = build_tokenizer(os.path.join(state_dir, "tokenizer"))
        unet, text_encoder = train_text_to_image(latents, captions, tokenizer, unet_steps, 64,
                                                 torch.Generator().manual_seed(seed + 3), state_dir)
        save_model(out, vae, unet, text_encoder, tokenizer)
        print(f"unet + text encoder: {time.time() - t0:.0f} s")
    train_and_save_counter(out, counter_steps, counter_samples, seed, state_dir, fresh=counter_only, checks=checks)
    print(f"saved to {out} after {(time.time() - t0) / 60:.1f} minutes")


def train_and_save_counter(out, steps, n_samples, seed, state_dir, fresh, checks=512):
    """The counter phase of train(): samples of the model in `out` (cached in state_dir, redrawn when the UNet
    checkpoint is newer, or when `fresh`), train_counter, its agreement with describe(), out/counter.safetensors."""
    from safetensors.torch import save_file
    from model import load_sd
    samples_path, counter_state, unet_state = (os.path.join(state_dir, name)
                                               for name in ("counter_samples.pt", "counter.pt", "unet.pt"))
    stale = (os.path.isfile(samples_path) and os.path.isfile(unet_state)
             and os.path.getmtime(samples_path) < os.path.getmtime(unet_state))
    if fresh or stale:  # samples of an older UNet, and the counter trained on them, are thrown away
        for path in (samples_path, counter_state):
            if os.path.isfile(path):
                os.remove(path)
    sd = load_sd(out)
    if os.path.isfile(samples_path):
        samples = torch.load(samples_path, weights_only=True)
    else:
        samples = model_samples(sd, split_captions()[0], n_samples, torch.Generator().manual_seed(seed + 6))
        torch.save(samples, samples_path)
    counter = train_counter(steps, 64, torch.Generator().manual_seed(seed + 4), state_dir, samples)
    rendered, rendered_counts = counting_batch(checks, torch.Generator().manual_seed(seed + 5))
    drawn, drawn_counts = model_samples(sd, split_captions()[1], min(checks // 2, n_samples),
                                        torch.Generator().manual_seed(seed + 7))
    with torch.no_grad():
        right = [(counter(x).round() == c).float().mean().item()
                 for x, c in ((rendered, rendered_counts), (drawn.float() / 255, drawn_counts))]
    print(f"counter: rounded count = the true one on {right[0]:.3f} of blurred, noised renders and "
          f"{right[1]:.3f} of the model's samples for the held-out captions (by describe())")
    save_file(counter.state_dict(), os.path.join(out, "counter.safetensors"))


# -----------------------------------------------------------------------------
# the rectified-flow model (python shapes.py --train --flow): SD3's recipe in miniature, on the same world

FLOW_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "shapes-flow")
FLOW_TEXT_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=MAX_TOKENS, projection_dim=32)  # CLIP-L's and CLIP-G's stand-ins
T5_CONFIG = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=8)
FLOW_CONFIG = dict(  # an MMDiT: 16x16x4 latents in 2x2 patches (64 image tokens) beside 8 CLIP + 8 T5 text tokens
    patch_size=2, in_channels=4, out_channels=4, num_layers=6, attention_head_dim=16, num_attention_heads=6,
    joint_attention_dim=T5_CONFIG["d_model"], caption_projection_dim=96, qk_norm="rms_norm",  # SD3.5's QK norm
    pooled_projection_dim=2 * FLOW_TEXT_CONFIG["projection_dim"], pos_embed_max_size=16)
FLOW_SHIFT = 1.0  # SD3's timestep shift (3.0 at 1024 px) grows with the latent's size; 16x16x4 latents need none


def build_t5_tokenizer(directory):
    """A T5-style tokenizer for the grammar, saved in `directory` (T5TokenizerFast.from_pretrained reads it back):
    a Unigram model in which each word of the grammar is one piece ("▁three", "▁red", "▁circles"), single characters
    the fallback, T5's ids (<pad> 0, </s> 1, <unk> 2) and </s> after every caption; MAX_TOKENS long, padded."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = sorted({w for c in all_captions() for w in c.split()})
    pieces = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)] + [("\u2581" + w, 0.0) for w in words]
              + [(c, -5.0) for c in CHARS])  # a word's piece scores above its letters: it is always taken whole
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()  # a space becomes "▁", the start of a word, as in T5
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                        model_max_length=MAX_TOKENS)
    tokenizer.save_pretrained(directory)
    return tokenizer


def train_flow_text_to_image(latents, captions, tokenizer, t5_tokenizer, steps, batch, generator, state_dir):
    """SD3's parts from scratch and together: the MMDiT, two CLIP text encoders with projections and a T5 encoder,
    trained by rectified flow (SD3, Esser et al. 2024, Eq. 1-3): x_s = (1 - s) x0 + s eps, the transformer regresses
    the velocity eps - x0 at timestep 1000 s, s drawn logit-normal (their best, rf/lognorm(0, 1): sigmoid of a standard
    normal, most draws mid-path where the velocity is hardest to tell). The conditioning is model.encode_prompts' for
    SD3, so what is trained reads prompts as StableDiffusion3Pipeline feeds them; captions drop to "" as for the UNet.
    Returns EMA copies (transformer, text_encoder, text_encoder_2, text_encoder_3)."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    from model import SD, encode_prompts
    torch.manual_seed(0)
    clip = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **FLOW_TEXT_CONFIG)
    transformer = SD3Transformer2DModel(sample_size=latents.shape[-1], **FLOW_CONFIG)
    encoders = [CLIPTextModelWithProjection(clip), CLIPTextModelWithProjection(clip),
                T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), pad_token_id=0, eos_token_id=1,
                                        decoder_start_token_id=0, **T5_CONFIG))]
    models = torch.nn.ModuleList([transformer, *encoders])
    models.extend(copy.deepcopy(m) for m in list(models))
    ema = models[4:].requires_grad_(False)
    sd = SD(unet=transformer, vae=None, text_encoder=encoders[0], tokenizer=tokenizer, scheduler=None,
            text_encoder_2=encoders[1], tokenizer_2=tokenizer, text_encoder_3=encoders[2], tokenizer_3=t5_tokenizer,
            max_sequence_length=MAX_TOKENS)

    def loss(step):
        i = torch.randint(len(latents), (batch,), generator=generator)
        drop = (torch.rand(batch, generator=generator) < CAPTION_DROPOUT).tolist()
        x0 = latents[i]  # (B, 4, 16, 16)
        context = encode_prompts(sd, ["" if d else captions[j] for j, d in zip(i.tolist(), drop)])  # (B, 17, 64)
        noise = torch.randn(x0.shape, generator=generator)
        s = torch.sigmoid(torch.randn(batch, generator=generator)).view(-1, 1, 1, 1)  # logit-normal (0, 1)
        x_s = (1 - s) * x0 + s * noise  # the straight path from data to noise
        v = transformer(x_s, context[:, :-1], context[:, -1, :FLOW_CONFIG["pooled_projection_dim"]],
                        s.flatten() * 1000).sample
        return (v - (noise - x0)).square().mean()

    _optimise("flow", models, steps, 1e-3, loss, generator, state_dir,
              after_step=functools.partial(_update_ema, ema, models[:4]))
    return list(ema)


def save_flow_model(out, vae, transformer, encoders, tokenizer, t5_tokenizer):
    """A diffusers StableDiffusion3Pipeline directory (model.load_sd reads it; so does the stock pipeline, given
    max_sequence_length=8), fp16 safetensors. The VAE is the UNet model's with SD3's shift (0: its latents are scaled
    only)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    vae = copy.deepcopy(vae)
    vae.register_to_config(shift_factor=0.0)
    for name, module in (("vae", vae), ("transformer", transformer), ("text_encoder", encoders[0]),
                         ("text_encoder_2", encoders[1]), ("text_encoder_3", encoders[2])):
        module.to(torch.float16).save_pretrained(os.path.join(out, name))
        module.to(torch.float32)
    for name, tok in (("tokenizer", tokenizer), ("tokenizer_2", tokenizer), ("tokenizer_3", t5_tokenizer)):
        tok.save_pretrained(os.path.join(out, name))
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT).save_pretrained(
        os.path.join(out, "scheduler"))
    index = dict(_class_name="StableDiffusion3Pipeline", vae=["diffusers", "AutoencoderKL"],
                 transformer=["diffusers", "SD3Transformer2DModel"],
                 text_encoder=["transformers", "CLIPTextModelWithProjection"],
                 tokenizer=["transformers", "CLIPTokenizer"],
                 text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                 tokenizer_2=["transformers", "CLIPTokenizer"], text_encoder_3=["transformers", "T5EncoderModel"],
                 tokenizer_3=["transformers", "T5TokenizerFast"],
                 scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"], image_encoder=[None, None],
                 feature_extractor=[None, None])
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)


def train_flow(out=FLOW_DIR, steps=8000, pool=40000, seed=0, vae_from=MODEL_DIR):
    """The flow model: the shapes model's VAE (models/shapes, frozen: the same latents, so the two models differ in
    the denoiser and its objective only), the same pool of encoded renders (the same seed), then the transformer and
    text encoders; checkpoints in out/.train, so an interrupted run picks up where it stopped."""
    from diffusers import AutoencoderKL
    state_dir = os.path.join(out, ".train")
    os.makedirs(state_dir, exist_ok=True)
    t0 = time.time()
    vae = AutoencoderKL.from_pretrained(os.path.join(vae_from, "vae"), torch_dtype=torch.float32).eval()
    latents, captions = encode_pool(vae, pool, torch.Generator().manual_seed(seed + 2))
    print(f"pool of {pool} encoded renders: {time.time() - t0:.0f} s")
    tokenizer = build_tokenizer(os.path.join(state_dir, "tokenizer"))
    t5_tokenizer = build_t5_tokenizer(os.path.join(state_dir, "tokenizer_3"))
    transformer, *encoders = train_flow_text_to_image(latents, captions, tokenizer, t5_tokenizer, steps, 64,
                                                      torch.Generator().manual_seed(seed + 3), state_dir)
    save_flow_model(out, vae, transformer, encoders, tokenizer, t5_tokenizer)
    print(f"saved to {out} after {(time.time() - t0) / 60:.1f} minutes")


# -----------------------------------------------------------------------------
# command line

SHOW_CAPTIONS = ["a red circle", "two green squares", "three blue triangles", "four yellow circles",
                 "a yellow triangle", "two red triangles", "three green circles", "four blue squares"]


def show(out, seed):
    """Write a grid of rendered examples (a row per seed, a column per caption); print what describe() reads."""
    from grid import image_grid
    seeds = range(seed, seed + 2)
    images = torch.stack([render(*parse_caption(c), s) for s in seeds for c in SHOW_CAPTIONS])
    image_grid(images.float() / 255, nrow=len(SHOW_CAPTIONS), labels=[c for _ in seeds for c in SHOW_CAPTIONS],
               title="rendered: a row per seed").save(out)
    for (s, c), d in zip([(s, c) for s in seeds for c in SHOW_CAPTIONS], describe(images)):
        print(f"seed {s:<4} {c:<22} -> {d}")
    print(f"wrote {out}")


def eval_table(model, lora, prompts, n, steps, guidance, seed, grid):
    """Print describe()'s accuracy (and the shapes-count reward) of the base model and, with `lora`, of the LoRA
    model, on the same prompts and initial noise; write their first samples to `grid` (base above, LoRA below)."""
    from grid import image_grid
    from lora import load_lora
    from model import load_sd
    sd, reward_fn = load_sd(model), load_counter_reward()
    with open(prompts) as f:
        prompts = [line.strip() for line in f if line.strip()]
    rows = [("base", *evaluate(sd, prompts, n, steps, guidance, seed, reward_fn=reward_fn))]
    if lora:
        load_lora(sd.unet, lora)
        rows.append(("LoRA", *evaluate(sd, prompts, n, steps, guidance, seed, reward_fn=reward_fn)))
    steps_of = f"{steps} {'Euler (flow ODE)' if sd.flow else 'DDIM'} steps"
    print(f"{n} samples over {len(prompts)} prompts, {steps_of}, guidance {guidance}, read by describe():")
    print(f"{'':6}{'count':>8}{'colour':>8}{'shape':>8}{'all':>8}{'shapes-count reward':>21}")
    for name, r, _ in rows:
        print(f"{name:6}{r['count']:8.3f}{r['colour']:8.3f}{r['shape']:8.3f}{r['all']:8.3f}{r['reward']:21.3f}")
    if grid:
        labels = [f"{name}: {prompts[i % len(prompts)]}" for name, _, _ in rows for i in range(16)]  # cycled
        image_grid(torch.cat([images[:16] for _, _, images in rows]), nrow=16, labels=labels,
                   title=f"{model}, {steps_of}, guidance {guidance}: base above" + (
                       f", LoRA {lora} below (same noise)" if lora else "")).save(grid)
        print(f"wrote {grid}")


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--show", action="store_true", help="render examples into --out and print what describe() reads")
    p.add_argument("--train", action="store_true", help="train the model from scratch into --out (default "
                   "models/shapes; about an hour on 2 CPU cores); an interrupted run continues where it stopped")
    p.add_argument("--eval", action="store_true", help="describe() accuracy of --model's samples, with and without "
                   "--lora, on --prompts")
    p.add_argument("--out", default=None, help="--show: the grid PNG (shapes_grid.png); --train: the model directory")
    p.add_argument("--seed", type=int, default=0, help="the first seed --show renders; --eval's noise seed")
    p.add_argument("--model", default="shapes", help="--eval: 'shapes', 'shapes-flow' or a diffusers directory")
    p.add_argument("--lora", default=None, help="--eval: a LoRA file from train.py, compared with the base model")
    p.add_argument("--prompts", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   "prompts", "shapes-eval.txt"), help="--eval: prompts, cycled")
    p.add_argument("--n", type=int, default=256, help="--eval: samples per model")
    p.add_argument("--ddim-steps", type=int, default=20, help="--eval: denoising steps")
    p.add_argument("--guidance", type=float, default=7.5, help="--eval: classifier-free guidance scale")
    p.add_argument("--grid", default=None, help="--eval: also write the first 16 samples of each model to this PNG")
    p.add_argument("--vae-steps", type=int, default=1500, help="--train: VAE steps (batch 32)")
    p.add_argument("--unet-steps", type=int, default=8000, help="--train: UNet + text encoder steps (batch 64)")
    p.add_argument("--counter-steps", type=int, default=1500, help="--train: counter steps (batch 64)")
    p.add_argument("--counter-samples", type=int, default=1536, help="--train: the model's own samples the counter "
                   "learns from, beside renders")
    p.add_argument("--counter-only", action="store_true", help="--train: keep --out's model, train its counter anew")
    p.add_argument("--flow", action="store_true", help="--train: the rectified-flow model (SD3's recipe) into "
                   "models/shapes-flow instead, on the shapes model's VAE; --unet-steps counts its steps")
    args = p.parse_args()
    if args.show:
        show(args.out or "shapes_grid.png", args.seed)
    elif args.train and args.flow:
        train_flow(args.out or FLOW_DIR, args.unet_steps)
    elif args.train:
        train(args.out or MODEL_DIR, args.vae_steps, args.unet_steps, args.counter_steps,
              counter_samples=args.counter_samples, counter_only=args.counter_only)
    elif args.eval:
        eval_table(args.model, args.lora, args.prompts, args.n, args.ddim_steps, args.guidance, args.seed, args.grid)
    else:
        p.print_help()
