"""Compare the base model and a trained LoRA side by side, on the same prompts and seeds.

    python sample.py --lora out/compress/lora.safetensors --prompts "a cat" "a dog" --n 4 --reward compress

Writes a PNG grid: one row per prompt, the base model's n samples on the left, the LoRA model's on the right (same
initial noise). With --reward, prints the mean reward of both. The model, resolution, sampling steps and guidance
default to those in the config.json that train.py (or ddpo.py) wrote beside the LoRA file, so a run's own settings are
reproduced. SD 1.x / 2.x / XL sample with DDIM (sampler.py), SD3 and FLUX with the rectified-flow ODE (flow.py).
"""
import argparse
import json
import os

import torch

from grid import image_grid
from flow import flow_sample
from lora import load_lora, read_lora_config
from model import DEFAULT_MODEL, decode, encode_prompts, free_text_encoders
from rewards import REWARDS, RewardLoadError, load_reward, parse_reward_spec
from runs import check_numbers, check_writable, die, is_shapes, load_model, settle, warn_unknown_words
from sampler import ddim_sample

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--lora", required=True, help="a LoRA file written by train.py (or lora.save_lora)")
p.add_argument("--prompts", nargs="+", default=None, help="prompts, one grid row each (default: two of the model's "
               "held-out prompts)")
p.add_argument("--n", type=int, default=4, help="samples per prompt and model")
p.add_argument("--model", default=None, help="hub id, local diffusers dir or 'tiny' (default: the run's)")
p.add_argument("--reward", default=None,
               help=f"also score both models: {', '.join(REWARDS)}, or a weighted mix such as aesthetic,compress:0.5")
p.add_argument("--sample-steps", "--ddim-steps", type=int, default=None, help="denoising steps (default: the run's, "
               "else 50)")
p.add_argument("--guidance", type=float, default=None, help="CFG scale, or FLUX.1-dev's guidance embedding (default: "
               "the run's, else 7.5 SD, 7.0 SD3, 3.5 FLUX)")
p.add_argument("--eta", type=float, default=0.0, help="sampler noise: DDIM's eta, or a flow model's SDE noise level; "
               "0 = deterministic")
p.add_argument("--resolution", type=int, default=0, help="image side in pixels; 0 = the run's or the model's native")
p.add_argument("--seed", type=int, default=0, help="seeds the initial noise shared by both models")
p.add_argument("--out", default=None, help="output PNG (default: compare.png beside the LoRA file)")
args = p.parse_args()


check_numbers(args, at_least_1=("n", "sample_steps"), at_least_0=("eta", "resolution", "guidance"))
if not 0 <= args.seed < 2**63:
    die(f"--seed must be an integer in 0 .. 2^63 - 1, got {args.seed}")
if not os.path.isfile(args.lora):
    die(f"--lora {args.lora}: no such file")
if args.reward is not None:
    try:
        parse_reward_spec(args.reward)
    except ValueError as e:
        die(str(e))
run_cfg = {}
if os.path.isfile(os.path.join(os.path.dirname(args.lora), "config.json")):
    with open(os.path.join(os.path.dirname(args.lora), "config.json")) as f:
        run_cfg = json.load(f)
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
model = args.model or run_cfg.get("model") or (DEFAULT_MODEL if device == "cuda" else "tiny")
args.prompts = args.prompts or (["three red circles", "a blue square"] if is_shapes(model) else ["a cat", "a dog"])
warn_unknown_words(model, args.prompts)
args.sample_steps = args.sample_steps or run_cfg.get("sample_steps", 50)
out = os.path.join(os.path.dirname(args.lora) or ".", "compare.png") if args.out is None else args.out
out_dir = os.path.dirname(out) or "."
if not os.path.isdir(out_dir):  # found now, not when the grid is saved after all the sampling
    die(f"--out {out}: no such directory {out_dir}")
if os.path.isdir(out) or not out.strip():
    die(f"--out {out!r} is a directory; name the PNG file to write")
if os.path.splitext(out)[1].lower() not in (".png", ".jpg", ".jpeg", ".webp"):
    die(f"--out {out}: name a .png (or .jpg, .webp) file, the grid's format")
check_writable("--out", out, out_dir)

reward_fn = None
if args.reward:  # before sampling: a reward whose weights are missing fails in seconds
    try:
        reward_fn = load_reward(args.reward, device, dtype)
    except RewardLoadError as e:
        die(str(e))
try:  # the LoRA file's header, before sampling with the base model (after the reward: a wrong --reward is named first)
    read_lora_config(args.lora)
except Exception as e:  # safetensors' SafetensorError (not a safetensors file), or ValueError (no LoRA metadata)
    die(f"--lora {args.lora}: not a LoRA file written by train.py or ddpo.py ({str(e).strip().splitlines()[0]})")
sd, resolution, shape = load_model(model, device, dtype, args.resolution or run_cfg.get("resolution") or 0)
if args.guidance is None:
    args.guidance = run_cfg.get("guidance")
settle(args, "sample.py", sd)  # still None: the model family's default
sample_chain = flow_sample if sd.flow else ddim_sample  # the same arguments; eta is a flow's SDE noise level
prompts = [p for p in args.prompts for _ in range(args.n)]  # (P * n,), prompt-major
noise = torch.randn(len(prompts), *shape, generator=torch.Generator().manual_seed(args.seed))
autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)


with torch.no_grad(), autocast:  # once for both models: the LoRA is on the denoiser, not on the text encoders
    cond, uncond = encode_prompts(sd, prompts), encode_prompts(sd, [""] * len(prompts))
free_text_encoders(sd)  # their memory (T5-XXL's above all) is free for sampling


@torch.no_grad()
def generate():
    with autocast:
        latents = sample_chain(sd, cond, uncond, noise.to(device), args.sample_steps, args.guidance, args.eta,
                               generator=torch.Generator().manual_seed(args.seed + 1))
        return decode(sd, latents).float()  # (P * n, 3, H, W)


base = generate()
try:
    load_lora(sd.unet, args.lora)
except ValueError as e:  # another model's LoRA: its layers are not this model's
    die(f"--lora {args.lora}: {e}" + ("" if "another model" in str(e) else "; was it trained on another model?"))
tuned = generate()

# one row per prompt: n base samples, then n LoRA samples
rows = torch.cat([base.unflatten(0, (len(args.prompts), args.n)), tuned.unflatten(0, (len(args.prompts), args.n))], 1)
labels = [f"{name}: {p}" for p in args.prompts for name in ["base"] * args.n + ["LoRA"] * args.n]
image_grid(rows.flatten(0, 1), nrow=2 * args.n, labels=labels,
           title=f"{model}: base (left) and {args.lora} (right), same noise").save(out)
print(f"{model}, {resolution}px, {args.sample_steps} {'flow' if sd.flow else 'DDIM'} steps, guidance "
      f"{args.guidance:g}: wrote {out} (left: base, right: LoRA)")
if reward_fn is not None:  # the reward, then each part of a mix
    scores = []
    for images in (base, tuned):
        scores.append({args.reward: reward_fn(images, prompts).mean().item()})
        if len(reward_fn.components) > 1:
            scores[-1].update({name: r.mean().item() for name, r in reward_fn.components.items()})
    for name in scores[0]:
        print(f"{name} reward, mean over {len(prompts)} images: base {scores[0][name]:.4f} -> "
              f"LoRA {scores[1][name]:.4f}")
