"""AlignProp: fine-tune Stable Diffusion's UNet (through LoRA) by backpropagating a differentiable reward through the
whole sampling chain (Prabhudesai et al. 2023, arXiv:2310.03739): DDIM for SD 1.x / 2.x / XL, the rectified-flow
Euler loop for SD3 / SD3.5 and FLUX.1 (their transformer in place of the UNet).

    python train.py --reward shapes-count               # no CUDA GPU: the shipped coloured-shapes model, on a CPU
    python train.py --reward compress --model stable-diffusion-v1-5/stable-diffusion-v1-5 --sample-steps 50
    python train.py --reward aesthetic --model stabilityai/stable-diffusion-3.5-medium --backprop onestep:0.3,0.9
    python train.py --resume out/compress --steps 200   # continue a run; flags given here override its saved ones
    torchrun --standalone --nproc_per_node=4 train.py --reward compress --model stable-diffusion-v1-5/stable-diffusion-v1-5

One optimisation step: draw prompts and noise, sample *with gradients on* (each UNet call checkpointed, so
memory stays flat in the number of steps, except the last steps whose activations fit --memory-budget: they skip the
recomputation), decode, score, loss = -mean(reward), backprop into the LoRA weights only, clip the gradient norm,
AdamW. Writes to --out: config.json, metrics.jsonl (one line per step), lora.safetensors
(loads in diffusers with pipe.load_lora_weights), checkpoint.pt (for --resume), samples/step_NNNNNN.png.

Under torchrun each process takes its share of every global batch of prompts and noise, and the LoRA gradients are
averaged across processes once per optimisation step, so N processes give the same weights as one process with an
N times larger --batch-size. Process 0 alone writes files.
"""
import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from grid import image_grid
from flow import flow_sample
from lora import TARGET_SETS
from model import DEFAULT_MODEL, decode, encode_prompts, free_text_encoders, native_resolution
from rewards import REWARDS, without_gradient
from runs import (DTYPES, StopOnSignal, activations_to_keep, agree, average_gradients, check_batch_fits, check_numbers,
                  check_out, die, gather, info, inject_adapters, is_out_of_memory, load_checkpoint,
                  load_model_and_reward, log_metrics, lora_targets, machine_defaults, memory_budget, parse_keep,
                  peak_memory, plot_rewards, read_metrics, refuse_overwrite, reset_peak_memory, resume_args, run_prompts,
                  sampling_defaults, save_checkpoint, start_processes, start_snapshot, undo_start, write_config)
from sampler import ddim_sample, parse_backprop, steps_with_gradient

# -----------------------------------------------------------------------------
# flags

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--reward", default="compress", help=f"what to maximise: {', '.join(REWARDS)}, or a weighted mix "
               "such as aesthetic,compress:0.5")
p.add_argument("--model", default=None, help=f"hub id or local diffusers dir (SD 1.x, 2.x, XL, 3 / 3.5, FLUX.1), "
               f"'shapes' (shipped, trained) or 'tiny' / 'tiny-xl' / 'tiny-sd3' / 'tiny-flux' (random weights) "
               f"(default: {DEFAULT_MODEL} on CUDA, shapes without a GPU)")
p.add_argument("--prompts", default=None, help="training prompts, one per line (default: prompts/shapes.txt for "
               "the shapes model, else prompts/animals.txt)")
p.add_argument("--eval-prompts", default=None, help="held-out prompts for the eval grids (default: the -eval.txt "
               "beside the default --prompts)")
p.add_argument("--steps", type=int, default=None, help="optimisation steps in total (default 50; the count demo: 100)")
p.add_argument("--batch-size", type=int, default=4, help="images per micro-batch")
p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimisation step")
p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: 1e-3, AlignProp's for SD; "
               "1e-2 for the tiny models)")
p.add_argument("--lora-rank", type=int, default=4, help="rank of the LoRA adapters (alpha = rank)")
p.add_argument("--lora-targets", default=None, help=f"layers that get adapters: {', '.join(TARGET_SETS)} "
               "(the attention projections; the ResNet blocks' convolutions) or module names, joined with '+' "
               "(default attn; the count demo: attn+conv)")
p.add_argument("--sample-steps", "--ddim-steps", type=int, default=20, help="denoising steps per sample")
p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale, <= 1 disables CFG; on "
               "FLUX.1-dev the value of its guidance embedding (default: 7.5 SD, 7.0 SD3, 3.5 FLUX)")
p.add_argument("--eta", type=float, default=0.0, help="sampler noise: DDIM's eta (0 = deterministic DDIM, 1 = "
               "DDPM-like); on flow models the noise level of Flow-GRPO's SDE (0 = the Euler ODE)")
p.add_argument("--backprop", default=None, help="gradient through: all steps | K (the last K) | lo,hi (K drawn "
               "uniformly per trajectory) | lv:N (DRaFT-LV: the last step, N noise draws averaged) | drtune:N "
               "(DRTune: every step, the UNet's input detached, N evenly spaced steps train it) | onestep:F or "
               "onestep:lo,hi (Direct-Align: the sample re-noised to noise level F, one UNet call's clean prediction) "
               "(default all; the count demo: 1,T)")
p.add_argument("--keep-activations", default="auto", help="the last N steps with gradients keep their UNet "
               "activations instead of recomputing them in backward: faster, more memory; auto = as many as fit "
               "--memory-budget, measured on the first step; 0 = recompute all (flat memory)")
p.add_argument("--cfg-in-turn", action="store_true", help="a recomputed step's backward takes CFG's two halves one "
               "after the other: about half the peak of the chain's backward, for one more batched call per step "
               "(turned on by itself when a step recomputing every step is over --memory-budget)")
p.add_argument("--memory-budget", type=float, default=0, help="GB (2^30 bytes) a step may use at its peak (CUDA: "
               "allocated; CPU: the process's RSS, each step's own), spent by --keep-activations auto; 0 = 90%% of the GPU memory "
               "free to this run, half the RAM on a CPU")
p.add_argument("--resolution", type=int, default=0, help="image side in pixels; 0 = the model's native size")
p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="precision of the frozen model and "
               "autocast (default: bf16 on CUDA, fp32 on CPU); LoRA weights stay fp32")
p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clip; 0 = no clipping")
p.add_argument("--max-skips", type=int, default=5, help="stop after this many steps in a row with a non-finite "
               "loss or gradient (each one is skipped: no update)")
p.add_argument("--seed", type=int, default=0, help="seeds the LoRA init, prompts, noise and eval images")
p.add_argument("--out", default=None, help="output directory (default: out/<reward>)")
p.add_argument("--resume", default=None, help="continue the run in this directory from its last checkpoint")
p.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps; 0 = only at the end")
p.add_argument("--eval-every", type=int, default=10, help="eval grid every N steps; 0 = only at start and end")
p.add_argument("--eval-n", type=int, default=8, help="eval images (held-out prompts x fixed seeds)")
args = resume_args(p, p.parse_args())  # --resume DIR: the saved flags become the defaults; these still win

# torchrun: one process per GPU (or CPU process, with gloo); rank 0 writes logs, grids and checkpoints, and every rank
# computes the same decisions from the same data
ddp, rank, world = start_processes()
master = rank == 0
device_type, device = machine_defaults(args)  # --model, --prompts, --eval-prompts and --dtype for this machine
if without_gradient(args.reward):
    die(f"--reward {','.join(without_gradient(args.reward))} has no gradient, which reward backprop follows: train "
        "on its differentiable stand-in (jpeg -> compress, shapes-count-exact -> shapes-count), or use ddpo.py")
if args.lr is None:
    args.lr = 1e-2 if args.model in ("tiny", "tiny-xl", "tiny-sd3", "tiny-flux") else 1e-3
# The count demo (the shapes model, --reward shapes-count) runs studies/truncation_study.py's best setting (docs); a
# run resumed from before --lora-targets existed had attention-only adapters
demo = (args.model, args.reward) == ("shapes", "shapes-count") and not args.resume
if args.steps is None:
    args.steps = 100 if demo else 50
if args.backprop is None:
    args.backprop = f"1,{args.sample_steps}" if demo else "all"  # random K in 1..T
if args.lora_targets is None:
    args.lora_targets = "attn+conv" if demo else "attn"
args.out = args.out or os.path.join("out", args.reward.replace(",", "+").replace(":", ""))
prompts, eval_prompts = run_prompts(args)
try:
    backprop = parse_backprop(args.backprop, args.sample_steps)
except ValueError as e:
    die(f"--backprop {e}")
targets = lora_targets(args.lora_targets)
keep = parse_keep(args.keep_activations)  # None: auto, chosen after the first step
check_numbers(args, at_least_1=("steps", "batch_size", "grad_accum", "lora_rank", "sample_steps", "eval_n",
                                "max_skips"),
              at_least_0=("memory_budget", "eta", "max_grad_norm", "resolution", "save_every", "eval_every"),
              above_0=("lr",), finite=("guidance",))  # NaN and inf included: one line, exit 2
refuse_overwrite(args.out, args.resume)
made = check_out(args.out)  # a file, or a place this process may not write: one line now, not a traceback later

# -----------------------------------------------------------------------------
# setup

sd, shape, reward_fn = load_model_and_reward(args, device)  # frozen, in the run's dtype; shape (C, H/f, W/f)
sampling_defaults(args, sd)  # --guidance by the model's family
sample_chain = flow_sample if sd.flow else ddim_sample  # the same arguments; eta is a flow's SDE noise level
dtype = DTYPES[args.dtype]
resolution = args.resolution or native_resolution(sd)
smaller = "lower --batch-size (--grad-accum N keeps the images per step: N micro-batches of --batch-size)"
per_image = 4 * torch.Size(shape).numel() + dtype.itemsize * 3 * resolution ** 2  # its noise (fp32) and its image
check_batch_fits(f"--batch-size {args.batch_size}", args.batch_size * per_image, device_type, smaller)
torch.manual_seed(args.seed)  # the LoRA init depends on the seed alone, not on what loading drew
params = inject_adapters(sd.unet, args.lora_rank, targets)  # the only trainable weights, kept in fp32
opt = torch.optim.AdamW(params, lr=args.lr)
autocast = torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32)
scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)  # fp16 gradients underflow without it
eval_prompts = [eval_prompts[i % len(eval_prompts)] for i in range(args.eval_n)]
with torch.no_grad(), autocast:  # the text encoder is frozen: encode every prompt once
    cond_all = encode_prompts(sd, prompts)  # (N, L, D)
    eval_cond = encode_prompts(sd, eval_prompts)
    uncond = encode_prompts(sd, [""])  # (1, L, D)
freed = free_text_encoders(sd)  # needed no more: SD3's and FLUX's T5-XXL alone holds 9.5 GB in bf16
if device_type == "cuda":
    torch.cuda.empty_cache()  # their memory back to the driver, and to this run's peak-memory budget
eval_noise = torch.randn(args.eval_n, *shape, generator=torch.Generator().manual_seed(args.seed + 1))

# One CPU generator, in the same state on every rank, draws each global batch of prompts and initial noise; a rank
# keeps its rows. The run is reproducible, resumable, and the same for any number of processes.
rng = torch.Generator().manual_seed(args.seed)
rows = slice(rank * args.batch_size, (rank + 1) * args.batch_size)
global_batch = args.batch_size * args.grad_accum * world
config = dict(vars(args), script="train.py", world_size=world, global_batch=global_batch)
snapshot = start_snapshot(args.out, made)  # a start that fails before its first step puts the disk back as it was
if not args.resume:  # a resumed run's config.json is rewritten once its checkpoint has loaded
    write_config(args.out, config)  # the latest (re)start's flags
step, eval_before = 0, None


def loop_generator(step, micro):
    """Eta noise and random K inside the sampler: different on every rank, and a function of the step alone, so a
    resumed run draws what the uninterrupted one did (hash() of a tuple of ints does not change between runs)."""
    return torch.Generator().manual_seed(hash((args.seed, step, micro, rank)) % 2**63)


def checkpoint_run(done):  # after `done` optimisation steps; called on every rank
    save_checkpoint(args.out, sd.unet, params, opt, scaler, rng, step=done, eval_before=eval_before)


def sample(cond, noise, generator, backprop):  # noise (B, C, h, w) -> images (B, 3, H, W) in [0, 1]
    with autocast:
        latents = sample_chain(sd, cond, uncond.expand(len(cond), -1, -1), noise.to(device), args.sample_steps,
                               args.guidance, args.eta, backprop, generator, keep or 0, args.cfg_in_turn)
        return decode(sd, latents)


@torch.no_grad()
def evaluate(step):  # the same held-out prompts and seeds every time, so grids and rewards compare across steps
    generator = torch.Generator().manual_seed(args.seed + 2)  # eta noise, also fixed
    images = torch.cat([sample(eval_cond[i:i + args.batch_size], eval_noise[i:i + args.batch_size], generator, "all")
                        for i in range(0, args.eval_n, args.batch_size)])
    title = f"train.py {args.out}, step {step}: held-out prompts, fixed seeds"
    grid = image_grid(images, nrow=min(args.eval_n, 8), labels=eval_prompts, title=title)
    grid.save(os.path.join(args.out, "samples", f"step_{step:06d}.png"))
    return reward_fn(images.float(), eval_prompts).mean().item()


if args.resume:
    ckpt = load_checkpoint(args.out, sd.unet, opt, scaler, rng, args.lr)  # this run's --lr wins
    write_config(args.out, config)
    step, eval_before = ckpt["step"], ckpt["eval_before"]
    info(f"resuming {args.out} at step {step}")
else:
    if master:
        open(os.path.join(args.out, "metrics.jsonl"), "w").close()
        eval_before = evaluate(0)
    checkpoint_run(0)

n_params = sum(p.numel() for p in params)
info(f"{args.model}: {resolution}px, {len(params) // 2} LoRA layers ({n_params / 1e6:.2f}M params), {device_type} "
     f"{args.dtype}, global batch {global_batch} images/step = {args.batch_size} x {args.grad_accum} grad-accum x "
     f"{world} processes, text encoders freed ({freed / 2**30:.2f} GB)" + (f", eval reward {eval_before:.4f}"
                                                                        if master else ""))

# -----------------------------------------------------------------------------
# training loop

signals, skipped, skipped_in_a_row = StopOnSignal(), 0, 0  # a signal finishes the step, saves, then stops
first_step = step
pbar = tqdm(range(step, args.steps), initial=step, total=args.steps, desc=args.reward, dynamic_ncols=True,
            disable=not master)
for step in pbar:
    t0 = time.time()
    reset_peak_memory(device_type)  # the budget's measure, this step's alone
    rewards, components = [], {}
    try:
        for micro in range(args.grad_accum):
            idx = torch.randint(len(prompts), (world * args.batch_size,), generator=rng)[rows]  # this rank's rows
            noise = torch.randn(world * args.batch_size, *shape, generator=rng)[rows]  # (B, C, h, w), on the CPU
            images = sample(cond_all[idx], noise, loop_generator(step, micro), backprop)  # (B, ...); (N * B, ...) lv:N
            r = reward_fn(images, [prompts[i] for i in idx] * (len(images) // args.batch_size))
            loss = -r.mean() / args.grad_accum
            scaler.scale(loss).backward()  # gradients add up locally: no communication per micro-batch
            rewards.append(r.detach().float())
            for name, value in reward_fn.components.items():  # each reward of a mix on its own
                components.setdefault(name, []).append(value.float())
    except RuntimeError as e:  # the allocator's error, on the first step: one line, and the disk as it was
        if not is_out_of_memory(e) or step > first_step:
            raise
        pbar.close()
        undo_start(args.out, snapshot)
        die(f"--batch-size {args.batch_size} does not fit in memory: the first step ran out of it; {smaller}")
    rewards = gather(torch.cat(rewards))
    average_gradients(params)  # torchrun: one all-reduce per step, none per micro-batch
    scaler.unscale_(opt)  # so that clipping sees the true gradient norm
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm or float("inf"))
    finite = bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(rewards).all())
    if finite:  # a non-finite loss or gradient would poison the weights and AdamW's moments: skip the update
        scaler.step(opt)
    scaler.update()  # fp16: a non-finite step also lowers the loss scale
    opt.zero_grad(set_to_none=True)
    skipped, skipped_in_a_row = skipped + (not finite), 0 if finite else skipped_in_a_row + 1
    peak = peak_memory(device_type)  # this step's: CUDA allocated, CPU resident
    spread = rewards.std().item() if len(rewards) > 1 else float("nan")  # one image has none (logged as null)
    log = dict(step=step + 1, reward_mean=rewards.mean().item(), reward_std=spread, loss=-rewards.mean().item(),
               grad_norm=grad_norm.item(), seconds=time.time() - t0, peak_mem_mb=peak / 2**20, kept_steps=keep or 0,
               images_seen=(step + 1) * global_batch, skipped=not finite, skipped_total=skipped)
    if keep is None:  # --keep-activations auto: this step recomputed every step, at the least memory a step needs;
        # the budget's rest buys kept steps, each costing one step's activations, measured on this micro-batch
        budget = memory_budget(args.memory_budget, device_type)
        over = args.memory_budget and peak > budget
        if over and not args.cfg_in_turn and args.guidance > 1 and not sd.flux:  # the next lever, then measure again
            args.cfg_in_turn = config["cfg_in_turn"] = True
            write_config(args.out, config)
            info(f"--memory-budget {args.memory_budget:g} GB: a step recomputing every step peaked at "
                 f"{peak / 2**30:.2f} GB; from the next step on CFG's halves backpropagate in turn (--cfg-in-turn: "
                 "the same gradients, one more UNet call per step), then kept steps are chosen")
        elif over:
            pbar.close()
            die(f"--memory-budget {args.memory_budget:g} GB is below what a step needs with every step recomputed "
                + ("and CFG's halves in turn " if args.cfg_in_turn else "")
                + f"({peak / 2**30:.2f} GB, measured on step {step + 1}): raise it, or lower --batch-size or "
                "--resolution")
        else:
            with autocast:
                keep, per_step = activations_to_keep(sd, cond_all[idx], uncond.expand(len(idx), -1, -1),
                                                     noise.to(device), args.sample_steps, args.guidance, args.eta,
                                                     backprop, peak, budget)
            most = steps_with_gradient(backprop, args.sample_steps)
            info(f"--keep-activations auto: {keep} of {most} steps keep their activations ({per_step / 2**20:.1f} "
                 f"MB each); recomputing all, a step peaked at {peak / 2**30:.2f} GB, budget {budget / 2**30:.2f} GB")
            write_config(args.out, dict(config, kept_steps=keep, activation_mb_per_step=per_step / 2**20,
                                        peak_gb_recomputing_all=peak / 2**30, memory_budget_gb=budget / 2**30))
    if len(components) > 1:
        log.update({f"reward_{name}": gather(torch.cat(v)).mean().item() for name, v in components.items()})
    done = step + 1
    evaluating = master and (done == args.steps or (args.eval_every and done % args.eval_every == 0))
    if evaluating:
        log["eval_reward"] = evaluate(done)
    log_metrics(args.out, log)
    if evaluating:
        plot_rewards(args.out, f"train.py --reward {args.reward} ({args.out})", eval_before)
    stop = agree(signals.name, device)  # torchrun: all stop after the first step that any rank saw a signal in
    if done == args.steps or (args.save_every and done % args.save_every == 0) or stop:
        checkpoint_run(done)
    pbar.set_postfix(reward=f"{log['reward_mean']:.4f}", **({"eval": f"{log['eval_reward']:.4f}"}
                                                            if "eval_reward" in log else {}))
    if skipped_in_a_row >= args.max_skips:
        pbar.close()
        if master:
            print(f"error: {skipped_in_a_row} steps in a row had a non-finite loss or gradient; stopping. The "
                  f"last checkpoint in {args.out} is intact: lower --lr or check the reward, then --resume.", file=sys.stderr)
        sys.exit(3)
    if stop:  # SIGTERM / Ctrl-C: the step is finished and saved
        pbar.close()
        name = signals.name or "SIGTERM"  # what another rank received
        info(f"stopped by {name} after step {done}, checkpoint saved: continue with --resume {args.out}")
        sys.exit(130 if name == "SIGINT" else 143)

if ddp:
    info(f"LoRA weights identical on all {world} processes (checked at every checkpoint)")
    dist.destroy_process_group()
if master:
    after = read_metrics(args.out)[-1].get("eval_reward")
    print(f"{args.reward} reward on held-out prompts: {eval_before:.4f} -> {'nan' if after is None else f'{after:.4f}'} "
          f"after {args.steps} steps; LoRA in {os.path.join(args.out, 'lora.safetensors')}")
