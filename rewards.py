"""Differentiable rewards: fn(images (B, 3, H, W) in [0, 1], prompts) -> Tensor (B,), higher is better.

    reward_fn = load_reward("aesthetic,compress:0.5", device, dtype)  # a name, or a weighted mix of them
    r = reward_fn(images, prompts)      # (B,) fp32; r.mean().backward() reaches the pixels
    reward_fn.components                # {"aesthetic": (B,), "compress": (B,)}: each reward alone, detached

This file holds what a reward is, the hand-coded rewards (a differentiable JPEG size, below) and the registry of every
name. The learned rewards, models from the Hugging Face hub (aesthetic, hps, pickscore, clip, count), are in
reward_models.py; the shapes model's count rewards in shapes/counter.py, in the package that owns that world.

  compress    minus the estimated JPEG file size in kB; `incompress` is plus. Nothing to download. The estimate is a
              hand-written, differentiable model of baseline JPEG (ITU-T T.81; the steps of Wallace 1991): RGB ->
              YCbCr (JFIF), 4:2:0 chroma subsampling, 8x8 block DCT, division by the standard quantisation tables
              (T.81 Annex K, Tables K.1/K.2) scaled to a quality setting as libjpeg does, then a smooth count of the
              bits the quantised coefficients cost. DDPO (Black et al. 2023, arXiv:2305.13301) rewards the real JPEG
              size, which has no gradient; AlignProp (arXiv:2310.03739) needs one, so we estimate it.
  jpeg        minus the *real* JPEG size in kB, Pillow's encoder at the quality `compress` models (DDPO's
              compressibility reward). No gradient: for reinforcement learning (ddpo.py), or to judge `compress`.
  aesthetic, hps, pickscore, clip, count
              learned scorers of images and prompts (reward_models.py says what each is and what it downloads).
  shapes-count  minus the count error beyond rounding for the shapes model's prompts, from a small learned counter
              (shapes.counter.ShapeCounter; its weights ship in models/shapes). Nothing to download.
  shapes-count-exact
              minus |count - n| as shapes.world.describe() reads it, for the shapes model's prompts: the exact count
              error, with no gradient (for ddpo.py); `shapes-count` is its learned, differentiable stand-in.

The rewards in NO_GRADIENT return values without a graph: train.py refuses them (its method needs a gradient),
ddpo.py takes every reward. A mix "name[:weight],..." (weight 1 by default) trains on the weighted sum; weight 0
computes and logs a reward without training on it. A reward whose weights cannot be had raises RewardLoadError with
a one-line message (reward_models.py: where weights come from, and how to point to a local copy).

To add a reward: write `fn(images, prompts) -> Tensor[B]` (a function or an nn.Module that takes its models, so that
tests can pass tiny ones) and register a loader(device, dtype) -> fn in REWARDS.
"""
import contextlib
import math
import os

import torch
import torch.nn.functional as F

from reward_models import (RewardLoadError, frozen, from_hub, load_aesthetic, load_clip_score, load_count,
                           load_hps_clip, parse_count)


# -----------------------------------------------------------------------------
# JPEG size estimate

# T.81 Annex K, Table K.1 (luminance) and K.2 (chrominance), the quality-50 base tables, row-major 8x8.
JPEG_LUMA_Q50 = [
    16, 11, 10, 16, 24, 40, 51, 61,   12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56,   14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77,   24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101,   72, 92, 95, 98, 112, 100, 103, 99]
JPEG_CHROMA_Q50 = [
    17, 18, 24, 47, 99, 99, 99, 99,   18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99,   47, 66, 99, 99, 99, 99, 99, 99] + [99] * 32

# The bit model: a quantised coefficient q costs nothing if it rounds to 0, else about BITS_BASE + BITS_PER_OCTAVE *
# log2(1 + |q|) bits (its Huffman-coded (run, size) symbol plus its magnitude bits); every block pays an end-of-block
# code; the file a fixed header (JFIF markers, quantisation and Huffman tables). The four numbers were fitted by least
# squares (relative error) to Pillow's byte counts at quality 75 on the 96 varied images of tests/test_rewards.py, which
# checks the fit (its errors and rank correlation: docs/rewards.md).
BITS_BASE = 2.6
BITS_PER_OCTAVE = 1.6
BITS_PER_BLOCK = 4.6
HEADER_BYTES = 628
ROUNDING_SHARPNESS = 8.0  # slope of the smooth "rounds to nonzero" step at |q| = 0.5; larger is closer to a hard step
SMOOTH_ABS = 0.1  # |q| is smoothed as sqrt(q^2 + SMOOTH_ABS^2)


def quant_table(base, quality):
    """libjpeg's jpeg_quality_scaling + jpeg_add_quant_table (baseline: entries clamped to 1..255)."""
    assert 1 <= quality <= 100
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    q = torch.tensor(base, dtype=torch.float64)
    return ((q * scale + 50) // 100).clamp(1, 255).reshape(8, 8)


def dct_matrix(n=8):
    """Orthonormal DCT-II: D[k, i] = c_k cos(pi (2i + 1) k / 2n). D X D^T is JPEG's forward DCT of a block."""
    i = torch.arange(n, dtype=torch.float64)
    d = torch.cos(math.pi * (2 * i[None, :] + 1) * i[:, None] / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d


def _blocks(x):
    """(B, H, W) -> (B, H/8, W/8, 8, 8), padding by edge replication as encoders do."""
    B, H, W = x.shape
    x = F.pad(x[:, None], (0, -W % 8, 0, -H % 8), mode="replicate")[:, 0]
    return x.unflatten(1, (-1, 8)).unflatten(3, (-1, 8)).transpose(2, 3)


def _coefficient_bits(q):
    """Smooth bit cost of quantised coefficients q (real-valued: before rounding), 0 at q = 0."""
    def bits(a):  # ~0 where round(a) == 0; grows like log2(a) beyond
        return torch.sigmoid(ROUNDING_SHARPNESS * (a - 0.5)) * (BITS_BASE + BITS_PER_OCTAVE * torch.log2(1 + a))
    a = (q.square() + SMOOTH_ABS ** 2).sqrt()  # |q|, smoothed so that a flat block is a smooth optimum, not a kink
    return bits(a) - bits(torch.tensor(SMOOTH_ABS))


JPEG_QUALITY = 75  # DDPO's compressibility reward encodes at Pillow's default quality; the estimate models the same


def jpeg_kilobytes(images, quality=JPEG_QUALITY):
    """Differentiable estimate of the baseline-JPEG size, in kB, of each image (B, 3, H, W) in [0, 1]."""
    x = images.float() * 255
    r, g, b = x.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b - 128  # JFIF YCbCr, level-shifted by 128
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b
    pad2 = lambda c: F.pad(c[:, None], (0, c.shape[-1] % 2, 0, c.shape[-2] % 2), mode="replicate")  # noqa: E731
    cb, cr = (F.avg_pool2d(pad2(c), 2)[:, 0] for c in (cb, cr))  # 4:2:0, Pillow's default
    d = dct_matrix().to(x.device, x.dtype)
    bits = torch.zeros(x.shape[0], device=x.device)
    for channel, base in ((y, JPEG_LUMA_Q50), (cb, JPEG_CHROMA_Q50), (cr, JPEG_CHROMA_Q50)):
        coef = d @ _blocks(channel) @ d.T / quant_table(base, quality).to(x.device, x.dtype)  # (B, h, w, 8, 8)
        ac = coef.flatten(-2)[..., 1:]
        dc = coef[..., 0, 0].flatten(1)  # DC is coded as the difference to the previous block's
        dc_diff = torch.cat([dc[:, :1], dc[:, 1:] - dc[:, :-1]], 1)
        bits = bits + _coefficient_bits(ac).sum((1, 2, 3)) + _coefficient_bits(dc_diff).sum(1)
        bits = bits + BITS_PER_BLOCK * dc.shape[1]
    return (bits / 8 + HEADER_BYTES) / 1000  # fp32 whatever the images' dtype


def real_jpeg_kilobytes(images, quality=JPEG_QUALITY):
    """Pillow's baseline-JPEG size in kB (4:2:0, its default) of each image (B, 3, H, W) in [0, 1], as 8-bit pixels.
    The real thing that jpeg_kilobytes estimates; no gradient."""
    import io

    from PIL import Image
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for arr in pixels:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


# -----------------------------------------------------------------------------
# shapes-count and shapes-count-exact: the shapes world's own (shapes/counter.py), served here under their names


def load_shapes_count(device, dtype):
    from shapes.counter import COUNTER_WEIGHTS, load_counter_reward
    if not os.path.isfile(COUNTER_WEIGHTS):
        raise RewardLoadError(f"no counter weights at {COUNTER_WEIGHTS}: they ship with the repository, or train them "
                              "with python -m shapes --train")
    return frozen(load_counter_reward(COUNTER_WEIGHTS), device, dtype)


def load_shapes_count_exact(device, dtype):
    from shapes.counter import shapes_count_exact
    return shapes_count_exact


# -----------------------------------------------------------------------------
# the registry


def compress(images, prompts=None):
    return -jpeg_kilobytes(images)


def jpeg(images, prompts=None):
    return -real_jpeg_kilobytes(images)


def incompress(images, prompts=None):
    return jpeg_kilobytes(images)


REWARDS = {  # name -> loader(device, dtype) -> fn(images, prompts) -> (B,)
    "compress": lambda device, dtype: compress,
    "incompress": lambda device, dtype: incompress,
    "aesthetic": load_aesthetic,
    # HPSv2 scores with the longest side resized to 224 and zero padding, the same as laion's shortest side and centre
    # crop for the square images Stable Diffusion makes
    "hps": lambda device, dtype: load_clip_score("clip-h14", load_hps_clip(device, dtype), device, dtype),
    "pickscore": lambda device, dtype: load_clip_score(
        "clip-h14", from_hub("pickscore", "CLIPModel", device, dtype), device, dtype, use_logit_scale=True),
    "clip": lambda device, dtype: load_clip_score(
        "clip-l14", from_hub("clip-l14", "CLIPModel", device, dtype), device, dtype),
    "count": load_count,
    "shapes-count": load_shapes_count,
    "jpeg": lambda device, dtype: jpeg,
    "shapes-count-exact": load_shapes_count_exact,
}
NO_GRADIENT = ("jpeg", "shapes-count-exact")  # measured, not modelled: their values carry no gradient to the pixels


def without_gradient(spec):
    """The rewards of a spec that have no gradient and a weight != 0 (a weight-0 one is only logged)."""
    return [name for name, weight in parse_reward_spec(spec) if name in NO_GRADIENT and weight != 0]


def parse_reward_spec(spec):
    """"aesthetic,compress:0.5" -> [("aesthetic", 1.0), ("compress", 0.5)]; ValueError says what is wrong."""
    terms = {}
    for part in spec.split(","):
        name, colon, weight = (s.strip() for s in part.partition(":"))
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r}; valid: {', '.join(REWARDS)} (or a mix: aesthetic,compress:0.5)")
        if name in terms:
            raise ValueError(f"reward {name!r} is given twice in {spec!r}")
        try:
            terms[name] = float(weight) if colon else 1.0
        except ValueError:
            terms[name] = math.nan
        if not math.isfinite(terms[name]):
            raise ValueError(f"bad weight {weight!r} for reward {name!r}: want a number, as in {name}:0.5")
    if not any(terms.values()):
        raise ValueError(f"every weight in {spec!r} is 0: nothing to train on")
    return list(terms.items())


class WeightedSum:
    """fn(images, prompts) -> sum of weight * reward, (B,) fp32. After each call, `components` maps each reward's name
    to its own value (B,), unweighted and detached, for logging (a single reward is a mix of one: one entry);
    `weights` maps it to its weight. A reward of weight 0 runs under no_grad."""

    def __init__(self, terms):  # [(name, weight, fn)]
        self.terms, self.weights, self.components = terms, {name: w for name, w, _ in terms}, {}

    def __call__(self, images, prompts):
        total, self.components = 0, {}
        for name, weight, fn in self.terms:
            with torch.no_grad() if weight == 0 else contextlib.nullcontext():
                r = fn(images, prompts).float()
            self.components[name] = r.detach()
            total = total + weight * r
        return total


SHAPES_REWARDS = ("shapes-count", "shapes-count-exact")  # they read the count from the shapes grammar's captions


def check_prompts(spec, prompts):
    """ValueError for the first prompt that a reward of `spec` cannot score: run it before training, not at the first
    step that draws the prompt. `count` needs a count in every prompt (parse_count); the shapes rewards need captions
    of the shapes grammar (shapes.world.parse_caption)."""
    names = {name for name, _ in parse_reward_spec(spec)}
    for prompt in prompts:
        if "count" in names:
            parse_count(prompt)  # reward_models.py: the count and noun a prompt asks for
        if names & set(SHAPES_REWARDS):
            from shapes.world import parse_caption
            parse_caption(prompt)


def load_reward(spec, device="cpu", dtype=torch.float32):
    """The reward for a spec, a name or a weighted mix ("aesthetic,compress:0.5"), as a WeightedSum (which has
    .components). ValueError for a bad spec; RewardLoadError, naming the reward, if its weights cannot be had."""
    terms = []
    for name, weight in parse_reward_spec(spec):
        try:
            terms.append((name, weight, REWARDS[name](device, dtype)))
        except RewardLoadError as e:
            raise RewardLoadError(f"reward {name!r}: {e}") from None
    return WeightedSum(terms)
