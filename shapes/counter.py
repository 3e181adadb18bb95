"""The shapes world's count rewards, which rewards.py serves under their names: `shapes-count`, a small learned
counter with a gradient, and `shapes-count-exact`, describe()'s exact count, without one.

    reward = load_counter_reward()                       # ShapesCount over the shipped counter (models/shapes)
    reward(images, ["three red circles"] * 4)            # (4,): 0 where the soft count rounds to 3, else below
    shapes_count_exact(images, prompts)                  # (B,): -|describe()'s count - n|, no gradient

The counter is trained by train_unet.py (python -m shapes --train, or --train --counter-only for it alone) on rendered
images and on the shapes model's own samples counted by describe(), as real reward models learn from people's labels
of generated images. This file imports shapes.world only: loading a reward loads no training code.
"""
import os

import torch

from shapes.world import describe, parse_caption

COUNTER_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "shapes",
                               "counter.safetensors")


class ShapeCounter(torch.nn.Module):
    """images (B, 3, H, W) in [0, 1] -> soft count of shapes (B,): a small CNN predicts a density map, one unit of
    mass per shape, and sums it (counting by density, Lempitsky & Zisserman 2010). `python -m shapes --train` fits
    it to rendered images of 0 to 5 shapes, blurred and noised, and to the shapes model's own samples counted by
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
    no gradient. Why not -|c - n| as for OWL-ViT: a counter that reads right images a little high (as the first one,
    trained on renders alone, did) makes -|c - n| push every right image towards fewer shapes with full force: with
    that counter it emptied "a ..." images and cost count accuracy, where this form cost neither colour nor shape
    (docs/shapes.md, "reward hacking, caught", has the measurements)."""

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
