"""AlignProp: fine-tune a text-to-image diffusion model (through LoRA) by backpropagating a differentiable reward
through the whole sampling chain (Prabhudesai et al. 2023, arXiv:2310.03739): DDIM for SD 1.x / 2.x / XL
(sampler.py), the rectified-flow Euler loop for SD3 / SD3.5 and FLUX.1 (flow.py: a transformer in place of the UNet).

    python train.py --reward compress                   # no CUDA GPU: the shipped coloured-shapes model, on a CPU
    python train.py --reward shapes-count --steps 100 --backprop 1,20 --lora-targets attn+conv   # the count demo
    python train.py --reward compress --model stable-diffusion-v1-5/stable-diffusion-v1-5 --sample-steps 50
    python train.py --reward aesthetic --model stabilityai/stable-diffusion-3.5-medium --backprop onestep:0.3,0.9
    python train.py --resume out/compress --steps 200   # continue a run; flags given here override its saved ones
    torchrun --standalone --nproc_per_node=4 train.py --reward compress --batch-size 2   # 4 GPUs, SD 1.5

One optimisation step: draw prompts and noise, sample *with gradients on* (each model call checkpointed, so memory
stays flat in the number of steps, but for the last steps whose activations fit --memory-budget: they skip the
recomputation), decode, score, loss = -mean(reward), backprop into the LoRA weights only, clip the gradient norm,
AdamW. Writes to --out: config.json, metrics.jsonl (one line per step), lora.safetensors (loads in diffusers with
pipe.load_lora_weights), checkpoint.pt (for --resume), samples/step_NNNNNN.png, reward.png. The plumbing shared with
ddpo.py (flags, setup, eval, checkpoints, signals) is runs.py's.

Under torchrun each process takes its share of every global batch of prompts and noise, and the LoRA gradients are
averaged across processes once per optimisation step, so N processes give the same weights as one process with an
N times larger --batch-size. Process 0 alone writes files.
"""
import argparse
import time

import torch

from memory import (LEVERS, activations_to_keep, base_to_fp8, is_out_of_memory, memory_budget, next_lever, parse_keep,
                    peak_memory, reset_peak_memory)
from model import check_decode_tile, decode
from rewards import without_gradient
from runs import Run, add_run_flags, average_gradients, check_numbers, die, gather, info, parse_run_args, write_config
from sampler import parse_backprop, steps_with_gradient

# -----------------------------------------------------------------------------
# flags: the shared ones (runs.add_run_flags: --model, --reward, --steps, --lr, ...), then reward backprop's own

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
add_run_flags(p, reward="compress", steps=50, lr=1e-3, grad_accum=1, eta=0.0, every=10)
p.add_argument("--backprop", default="all", help="gradient through: all steps | K (the last K) | lo,hi (K drawn "
               "uniformly, once per micro-batch) | lv:N (DRaFT-LV: the last step, N noise draws averaged) | drtune:N "
               "(DRTune: every step, the model's input detached, N evenly spaced steps train it) | onestep:F or "
               "onestep:lo,hi (Direct-Align: the sample re-noised to noise level F, one model call's clean "
               "prediction) (default all)")
p.add_argument("--keep-activations", default="auto", help="the last N steps with gradients keep their activations "
               "instead of recomputing them in backward: faster, more memory; auto = as many as fit --memory-budget, "
               "measured on the first step; 0 = recompute all (flat memory)")
p.add_argument("--cfg-in-turn", action="store_true", help="a recomputed step's backward takes CFG's two halves one "
               "after the other: about half the peak of the chain's backward, for one more batched call per step "
               "(turned on by itself when a step recomputing every step is over --memory-budget)")
p.add_argument("--checkpoint-blocks", action="store_true", help="checkpointing inside each model call too: in a "
               "step's recomputation every UNet / transformer block keeps only its input and runs again when backward "
               "reaches it (the same gradients; one more forward of each block per step; turned on by itself after "
               "--cfg-in-turn when a step is over --memory-budget)")
p.add_argument("--decode-tile", type=int, default=0, help="PX: the VAE decodes the images to be scored in "
               "overlapping tiles of PX pixels (diffusers' tiled decode; a multiple of 4 latent pixels, 32 px on SD, "
               "at least 8 of them, below the image's size), each recomputed on its own in backward: the decoder's "
               "backward holds one tile. Not the exact decode: each tile's GroupNorms see only the tile "
               "(docs/speed-and-memory.md). Eval grids decode whole. 0 = off (default; turned on, at half the image, "
               "last of the levers, when a step is over --memory-budget)")
p.add_argument("--memory-budget", type=float, default=0, help="GB (2^30 bytes) a step may use at its peak (CUDA: "
               "allocated; CPU: the process's RSS), spent by --keep-activations auto, which first turns on "
               "--cfg-in-turn, --checkpoint-blocks, --base-dtype fp8 (at loading if the denoiser alone is over it), "
               "then --decode-tile while a step is over it; 0 = 90%% of the GPU memory free to this run, half the RAM "
               "on a CPU")
p.add_argument("--max-skips", type=int, default=5, help="stop after this many steps in a row with a non-finite "
               "loss or gradient (each one is skipped: no update)")
args = parse_run_args(p, "train.py")  # --resume, every default the command leaves open (runs.settle), checks
if without_gradient(args.reward):
    die(f"--reward {','.join(without_gradient(args.reward))} has no gradient, which reward backprop follows: train "
        "on its differentiable stand-in (jpeg -> compress, shapes-count-exact -> shapes-count), or use ddpo.py")
try:
    backprop = parse_backprop(args.backprop, args.sample_steps)
except ValueError as e:
    die(f"--backprop {e}")
try:
    keep = parse_keep(args.keep_activations)  # None: auto, chosen after the first step
except ValueError as e:
    die(f"--keep-activations {e}")
check_numbers(args, at_least_1=("max_skips",), at_least_0=("memory_budget", "decode_tile"))

# -----------------------------------------------------------------------------
# setup: the model, reward, LoRA and optimiser, the prompts encoded once (runs.Run)

run = Run(args, "train.py")
sd, device = run.sd, run.device
if args.cfg_in_turn and (sd.flux or args.guidance <= 1):
    die("--cfg-in-turn takes CFG's two halves in turn: " + ("FLUX has none (its guidance is an embedding)" if sd.flux
                                                            else f"--guidance {args.guidance:g} runs no CFG"))
try:
    check_decode_tile(sd, args.decode_tile, run.resolution)
except ValueError as e:
    die(f"--decode-tile {e}")
if args.checkpoint_blocks:  # diffusers' per-block checkpointing, which acts where the model runs with grad: inside
    sd.unet.enable_gradient_checkpointing()  # sampler.checkpoint's recomputation of a step, nested in it
rows = slice(run.rank * args.batch_size, (run.rank + 1) * args.batch_size)  # this rank's rows of a global batch
global_batch = args.batch_size * args.grad_accum * run.world
run.start(global_batch=global_batch)
n_params = sum(p.numel() for p in run.params)
info(f"{args.model}: {run.resolution}px, {len(run.params) // 2} LoRA layers ({n_params / 1e6:.2f}M params), "
     f"{run.device_type} {args.dtype}, global batch {global_batch} images/step = {args.batch_size} x "
     f"{args.grad_accum} grad-accum x {run.world} processes, text encoders freed ({run.freed / 2**30:.2f} GB)"
     + (f", decoded in {args.decode_tile}-px tiles" if args.decode_tile else "")
     + (f", eval reward {run.eval_before:.4f}" if run.master else ""))


def loop_generator(step, micro):
    """Eta noise and random K inside the sampler: different on every rank, and a function of the step alone, so a
    resumed run draws what the uninterrupted one did (hash() of a tuple of ints does not change between runs)."""
    return torch.Generator().manual_seed(hash((args.seed, step, micro, run.rank)) % 2**63)


def sample(cond, noise, generator):  # cond (B, L, D), noise (B, C, h, w) -> images (B, 3, H, W) in [0, 1], with grad
    with run.autocast:
        latents = run.sample(sd, cond, run.uncond.expand(len(cond), -1, -1), noise.to(device), args.sample_steps,
                             args.guidance, args.eta, backprop, generator, keep or 0, args.cfg_in_turn)
        return decode(sd, latents, args.decode_tile)  # in tiles with --decode-tile: the reward sees their blend


def choose_kept_steps(peak, cond, noise):
    """--keep-activations auto, after a step that recomputed every step and peaked at `peak` bytes: the steps whose
    activations the budget's rest can keep, measured on this micro-batch. Over the budget already: the next lever of
    LEVERS, measured again on the next step (None); over it with all: one line, and the disk as it was."""
    budget = memory_budget(args.memory_budget, run.device_type)
    if args.memory_budget and peak > budget:
        lever = next_lever(args, sd, run.resolution)
        if lever:  # the next lever, then measure again
            setattr(args, *lever)
            run.config[lever[0]] = lever[1]
            write_config(args.out, run.config)  # a resumed run keeps it
            if lever[0] == "checkpoint_blocks":
                sd.unet.enable_gradient_checkpointing()
            if lever[0] == "base_dtype":  # LoRA's own weights are Parameters, not layers: only the frozen ones change
                info(f"--base-dtype fp8: {base_to_fp8(sd.unet) / 2**30:.2f} GB of frozen weights saved")
            info(f"--memory-budget {args.memory_budget:g} GB: a step recomputing every step peaked at "
                 f"{peak / 2**30:.2f} GB; from the next step on {LEVERS[lever[0]]}"
                 + (f" of {lever[1]} px" if lever[0] == "decode_tile" else "") + ", then kept steps are chosen")
            return None
        run.pbar.close()
        run.undo_start()  # within this start's first steps: the disk as it was
        on = "".join(f", {LEVERS[k].split(' (')[0]}" for k in LEVERS if getattr(args, k))
        die(f"--memory-budget {args.memory_budget:g} GB is below what a step needs with every step recomputed{on} "
            f"({peak / 2**30:.2f} GB): raise it, or lower --batch-size or --resolution")
    with run.autocast:
        n, per_step = activations_to_keep(sd, cond, run.uncond.expand(len(cond), -1, -1), noise.to(device),
                                          args.sample_steps, args.guidance, args.eta, backprop, peak, budget)
    info(f"--keep-activations auto: {n} of {steps_with_gradient(backprop, args.sample_steps)} steps keep their "
         f"activations ({per_step / 2**20:.1f} MB each); recomputing all, a step peaked at {peak / 2**30:.2f} GB, "
         f"budget {budget / 2**30:.2f} GB")
    run.config.update(kept_steps=n, activation_mb_per_step=per_step / 2**20, peak_gb_recomputing_all=peak / 2**30,
                      memory_budget_gb=budget / 2**30)
    write_config(args.out, run.config)
    return n


# -----------------------------------------------------------------------------
# training loop: sample with gradients -> score -> backward -> AdamW

skipped, skipped_in_a_row, first_step = 0, 0, run.step
for step in run.progress(args.reward):
    t0 = time.time()
    reset_peak_memory(run.device_type)  # the budget's measure, this step's alone
    rewards, components = [], {}
    try:
        for micro in range(args.grad_accum):
            # one CPU generator, in the same state on every rank, draws the global batch; a rank keeps its rows
            idx = torch.randint(len(run.prompts), (run.world * args.batch_size,), generator=run.rng)[rows]
            noise = torch.randn(run.world * args.batch_size, *run.shape, generator=run.rng)[rows]  # (B, C, h, w)
            images = sample(run.cond_all[idx], noise, loop_generator(step, micro))  # (B, ...); (N * B, ...) for lv:N
            r = run.reward_fn(images, [run.prompts[i] for i in idx] * (len(images) // args.batch_size))
            loss = -r.mean() / args.grad_accum
            run.scaler.scale(loss).backward()  # gradients add up locally: no communication per micro-batch
            rewards.append(r.detach().float())
            for name, value in run.reward_fn.components.items():  # each reward of a mix on its own
                components.setdefault(name, []).append(value.float())
    except RuntimeError as e:  # the allocator's error, on the first step: one line, and the disk as it was
        if not is_out_of_memory(e) or step > first_step:
            raise
        run.pbar.close()
        run.undo_start()
        die(f"--batch-size {args.batch_size} does not fit in memory: the first step ran out of it; lower --batch-size "
            "(--grad-accum N keeps the images per step: N micro-batches of --batch-size)")
    rewards = gather(torch.cat(rewards))
    average_gradients(run.params)  # torchrun: one all-reduce per step, none per micro-batch
    run.scaler.unscale_(run.opt)  # so that clipping sees the true gradient norm
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, args.max_grad_norm or float("inf"))
    finite = bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(rewards).all())
    if finite:  # a non-finite loss or gradient would poison the weights and AdamW's moments: skip the update
        run.scaler.step(run.opt)
    run.scaler.update()  # fp16: a non-finite step also lowers the loss scale
    run.opt.zero_grad(set_to_none=True)
    skipped, skipped_in_a_row = skipped + (not finite), 0 if finite else skipped_in_a_row + 1
    peak = peak_memory(run.device_type)  # this step's: CUDA allocated, CPU resident
    log = dict(step=step + 1, reward_mean=rewards.mean().item(),
               reward_std=rewards.std().item() if len(rewards) > 1 else float("nan"), loss=-rewards.mean().item(),
               grad_norm=grad_norm.item(), seconds=time.time() - t0, peak_mem_mb=peak / 2**20, kept_steps=keep or 0,
               images_seen=(step + 1) * global_batch, skipped=not finite, skipped_total=skipped)
    if len(components) > 1:
        log.update({f"reward_{name}": gather(torch.cat(v)).mean().item() for name, v in components.items()})
    if keep is None:  # --keep-activations auto: this step recomputed every step, at the least memory a step needs
        keep = choose_kept_steps(peak, run.cond_all[idx], noise)
    run.end_step(step + 1, log)  # the log line; eval grid, plot and checkpoint when due; a signal stops here
    if skipped_in_a_row >= args.max_skips:
        run.pbar.close()
        die(f"{skipped_in_a_row} steps in a row had a non-finite loss or gradient; stopping. The last checkpoint in "
            f"{args.out} is intact: lower --lr or check the reward, then --resume.", status=3)
run.finish()
