"""Sampling a shapes model and reading its samples with describe(): how often count, colour and shape are right.

    results, images = evaluate(load_sd("shapes"), prompts, n=256)   # {"count", "colour", "shape", "all"}, images
    images = draw(sd, captions, noise, steps=20, guidance=7.5)      # (n, 3, H, W) in [0, 1]
    python -m shapes --eval --lora out/shapes-count/lora.safetensors   # describe()'s verdict on base vs LoRA samples
    python -m shapes --eval --model shapes-flow          # describe()'s verdict on the rectified-flow sibling

The studies judge their runs with evaluate(); train_unet.py draws with draw() the model's samples its counter
learns from.
"""
import torch

from shapes.world import RESOLUTION, describe, score


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
