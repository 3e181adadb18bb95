"""The shapes world's command line: examples of it, describe()'s verdict on a model's samples, and its models' training.

    python -m shapes --show                              # a grid of examples and what describe() says of them
    python -m shapes --eval --lora out/shapes-count/lora.safetensors   # describe()'s verdict on base vs LoRA samples
    python -m shapes --eval --model shapes-flow          # describe()'s verdict on the rectified-flow sibling
    python -m shapes --train                             # the model in models/shapes, from scratch
    python -m shapes --train --counter-only              # only its counter, anew
    python -m shapes --train --flow                      # the rectified-flow sibling in models/shapes-flow

Run it from the repository root. A stopped --train continues where it stopped; docs/shapes.md has how long each takes.
"""
import argparse
import os

import torch

from shapes.counter import load_counter_reward
from shapes.evaluate import evaluate
from shapes.train_flow import FLOW_DIR, train_flow
from shapes.train_unet import MODEL_DIR, train
from shapes.world import describe, parse_caption, render

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


def main():
    p = argparse.ArgumentParser(prog="python -m shapes", description=__doc__.split("\n\n")[0])
    p.add_argument("--show", action="store_true", help="render examples into --out and print what describe() reads")
    p.add_argument("--train", action="store_true", help="train the model from scratch into --out (default "
                   "models/shapes; docs/shapes.md says how long it takes); an interrupted run continues where it "
                   "stopped")
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


if __name__ == "__main__":
    main()
