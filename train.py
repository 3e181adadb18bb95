"""AlignProp: fine-tune Stable Diffusion's UNet (through LoRA) by backpropagating a differentiable reward through the
whole DDIM sampling chain (Prabhudesai et al. 2023, arXiv:2310.03739).

    python train.py --reward shapes-count               # no CUDA GPU: the shipped coloured-shapes model, on a CPU
    python train.py --reward compress --model stable-diffusion-v1-5/stable-diffusion-v1-5 --ddim-steps 50
    python train.py --resume out/compress --steps 200   # continue a run; flags given here override its saved ones
    torchrun --standalone --nproc_per_node=4 train.py --reward compress --model stable-diffusion-v1-5/stable-diffusion-v1-5

One optimisation step: draw prompts and noise, sample with DDIM *with gradients on* (each UNet call checkpointed, so
memory stays flat in the number of steps), decode, score, loss = -mean(reward), backprop into the LoRA weights only,
clip the gradient norm, AdamW. Writes to --out: config.json, metrics.jsonl (one line per step), lora.safetensors
(loads in diffusers with pipe.load_lora_weights), checkpoint.pt (for --resume), samples/step_NNNNNN.png.

Under torchrun each process takes its share of every global batch of prompts and noise, and the LoRA gradients are
averaged across processes once per optimisation step, so N processes give the same weights as one process with an
N times larger --batch-size. Process 0 alone writes files.
"""
import argparse
import json
import os
import resource
import signal
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from lora import inject_lora, save_lora
from rewards import REWARDS, RewardLoadError, check_prompts, load_reward, parse_reward_spec
from sampler import (DEFAULT_MODEL, ModelLoadError, ddim_sample, decode, encode_prompts, image_grid, latent_shape,
                     load_sd, native_resolution, parse_backprop, vae_scale_factor)

# -----------------------------------------------------------------------------
# flags

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--reward", default="compress", help=f"what to maximise: {', '.join(REWARDS)}, or a weighted mix "
               "such as aesthetic,compress:0.5")
p.add_argument("--model", default=None, help=f"hub id, local diffusers dir, 'shapes' (shipped, trained) or 'tiny' "
               f"(random weights) (default: {DEFAULT_MODEL} on CUDA, shapes without a GPU)")
p.add_argument("--prompts", default=None, help="training prompts, one per line (default: prompts/shapes.txt for "
               "the shapes model, else prompts/animals.txt)")
p.add_argument("--eval-prompts", default=None, help="held-out prompts for the eval grids (default: the -eval.txt "
               "beside the default --prompts)")
p.add_argument("--steps", type=int, default=50, help="optimisation steps in total")
p.add_argument("--batch-size", type=int, default=4, help="images per micro-batch")
p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimisation step")
p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: 1e-3, AlignProp's for SD; "
               "1e-2 for the tiny model)")
p.add_argument("--lora-rank", type=int, default=4, help="rank of the LoRA adapters (alpha = rank)")
p.add_argument("--ddim-steps", type=int, default=20, help="denoising steps per sample")
p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale; <= 1 disables CFG")
p.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 = deterministic DDIM, 1 = DDPM-like")
p.add_argument("--backprop", default="all", help="gradient through: all steps | K (the last K) | lo,hi (K drawn "
               "uniformly per trajectory) | lv:N (DRaFT-LV: the last step, N noise draws averaged)")
p.add_argument("--keep-activations", type=int, default=0, help="the last N steps with gradients keep their UNet "
               "activations instead of recomputing them: faster, more memory; 0 = recompute all (flat memory)")
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
args = p.parse_args()

ddp = "RANK" in os.environ  # started by torchrun: one process per GPU (or CPU process, with gloo)
if ddp:
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
master = rank == 0  # writes logs, grids and checkpoints; every rank computes the same decisions from the same data


def info(*msg):
    if master:
        print(*msg)


def die(msg):  # bad input: one line, exit status 2, no traceback (every rank sees the same input and stops)
    if master:
        print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


if args.resume:  # the saved flags become the defaults; flags on this command line still win
    cfg_path = os.path.join(args.resume, "config.json")
    if not os.path.isfile(os.path.join(args.resume, "checkpoint.pt")) or not os.path.isfile(cfg_path):
        die(f"--resume {args.resume}: no checkpoint.pt and config.json there")
    with open(cfg_path) as f:
        p.set_defaults(**{k: v for k, v in json.load(f).items() if k in vars(args)})
    args = p.parse_args()
    args.out = args.resume

try:
    reward_names = [name for name, _ in parse_reward_spec(args.reward)]
except ValueError as e:
    die(str(e))
device_type = "cuda" if torch.cuda.is_available() else "cpu"
device = f"cuda:{torch.cuda.current_device()}" if device_type == "cuda" else "cpu"
if args.model is None:
    args.model = DEFAULT_MODEL if device_type == "cuda" else "shapes"
    if device_type == "cpu":
        info("no CUDA GPU: using --model shapes (coloured shapes, 64 px); full-size SD would take hours per step here")
prompt_set = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts", "shapes" if args.model == "shapes"
                          else "count" if "count" in reward_names else "animals")
args.prompts = args.prompts or prompt_set + ".txt"
args.eval_prompts = args.eval_prompts or prompt_set + "-eval.txt"
if args.lr is None:
    args.lr = 1e-2 if args.model == "tiny" else 1e-3
if args.dtype is None:
    args.dtype = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device_type == "cuda" else "fp32"
args.out = args.out or os.path.join("out", args.reward.replace(",", "+").replace(":", ""))
texts = {}  # flag -> its prompts
for name, path in (("--prompts", args.prompts), ("--eval-prompts", args.eval_prompts)):
    if not os.path.isfile(path):
        die(f"{name} {path}: no such file")
    with open(path) as f:
        texts[name] = lines = [line.strip() for line in f if line.strip()]
    if not lines:
        die(f"{name} {path}: the file has no prompts")
    try:
        check_prompts(args.reward, lines)
    except ValueError as e:
        die(f"{name} {path}: {e} (the count rewards need one in every prompt)")
try:
    backprop = parse_backprop(args.backprop, args.ddim_steps)
except ValueError as e:
    die(f"--backprop {e}")
if args.dtype == "fp16" and device_type == "cpu":
    die("--dtype fp16 needs a CUDA GPU; use fp32 or bf16 on a CPU")
for name in ("steps", "batch_size", "grad_accum", "lora_rank", "ddim_steps", "eval_n", "max_skips"):
    if getattr(args, name) < 1:
        die(f"--{name.replace('_', '-')} must be >= 1")
if args.keep_activations < 0 or args.eta < 0 or args.lr <= 0:
    die("--keep-activations and --eta must be >= 0, --lr > 0")
if not args.resume and os.path.isfile(os.path.join(args.out, "checkpoint.pt")):
    die(f"{args.out} already holds a run: continue it with --resume {args.out}, or pick another --out")
if ddp:
    dist.barrier()  # every rank has checked the output directory before rank 0 writes to it

# -----------------------------------------------------------------------------
# setup

torch.manual_seed(args.seed)
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
try:
    sd = load_sd(args.model, device, dtype)  # frozen, in the run's precision: half the memory in bf16/fp16
except ModelLoadError as e:
    die(str(e))
if args.resolution % vae_scale_factor(sd):
    die(f"--resolution {args.resolution} is not divisible by {vae_scale_factor(sd)} (the VAE's downsampling factor)")
resolution = args.resolution or native_resolution(sd)
shape = latent_shape(sd, resolution)  # (4, H/f, W/f), f = the VAE's factor: 8 for SD
params = inject_lora(sd.unet, rank=args.lora_rank, dtype=torch.float32)  # the only trainable weights, kept in fp32
opt = torch.optim.AdamW(params, lr=args.lr)
autocast = torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32)
scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)  # fp16 gradients underflow without it
try:
    reward_fn = load_reward(args.reward, device, dtype)  # .components: each reward of a mix, for the log
except RewardLoadError as e:
    die(str(e))

prompts, eval_prompts = texts["--prompts"], texts["--eval-prompts"]
eval_prompts = [eval_prompts[i % len(eval_prompts)] for i in range(args.eval_n)]
with torch.no_grad(), autocast:  # the text encoder is frozen: encode every prompt once
    cond_all = encode_prompts(sd, prompts)  # (N, L, D)
    eval_cond = encode_prompts(sd, eval_prompts)
    uncond = encode_prompts(sd, [""])  # (1, L, D)
eval_noise = torch.randn(args.eval_n, *shape, generator=torch.Generator().manual_seed(args.seed + 1))

# One CPU generator, in the same state on every rank, draws each global batch of prompts and initial noise; a rank
# keeps its rows. The run is reproducible, resumable, and the same for any number of processes.
rng = torch.Generator().manual_seed(args.seed)
rows = slice(rank * args.batch_size, (rank + 1) * args.batch_size)
global_batch = args.batch_size * args.grad_accum * world
if master:
    os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as f:  # the flags of the latest (re)start
        json.dump(dict(vars(args), world_size=world, global_batch=global_batch), f, indent=2)
step, eval_before = 0, None


def loop_generator(step, micro):
    """Eta noise and random K inside the sampler: different on every rank, and a function of the step alone, so a
    resumed run draws what the uninterrupted one did (hash() of a tuple of ints does not change between runs)."""
    return torch.Generator().manual_seed(hash((args.seed, step, micro, rank)) % 2**63)


def gather(t):  # this rank's values (n,) -> the global batch's (world * n,), for the log
    if not ddp:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t)
    return torch.cat(parts)


def weights_in_sync():  # max |difference| between this rank's LoRA weights and rank 0's, over all ranks
    flat = torch.cat([p.detach().flatten() for p in params])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


def atomic_save(save, path):  # a crash mid-write leaves the previous file intact
    save(path + ".tmp")
    os.replace(path + ".tmp", path)


def checkpoint_run(done):  # after `done` optimisation steps; called on every rank
    if ddp and weights_in_sync() != 0:  # cheap insurance against silently wrong gradient synchronisation
        die(f"the LoRA weights differ between ranks at step {done}: the gradient all-reduce is broken")
    if not master:
        return
    state = dict(step=done, lora={n: p.detach() for n, p in sd.unet.named_parameters() if p.requires_grad},
                 opt=opt.state_dict(), scaler=scaler.state_dict(), rng=rng.get_state(),
                 torch_rng=torch.get_rng_state(), eval_before=eval_before)
    atomic_save(lambda path: torch.save(state, path), os.path.join(args.out, "checkpoint.pt"))
    atomic_save(lambda path: save_lora(sd.unet, path), os.path.join(args.out, "lora.safetensors"))


def sample(cond, noise, generator, backprop):  # noise (B, 4, h, w) -> images (B, 3, H, W) in [0, 1]
    with autocast:
        latents = ddim_sample(sd, cond, uncond.expand(len(cond), -1, -1), noise.to(device), args.ddim_steps,
                              args.guidance, args.eta, backprop, generator, args.keep_activations)
        return decode(sd, latents)


@torch.no_grad()
def evaluate(step):  # the same held-out prompts and seeds every time, so grids and rewards compare across steps
    generator = torch.Generator().manual_seed(args.seed + 2)  # eta noise, also fixed
    images = torch.cat([sample(eval_cond[i:i + args.batch_size], eval_noise[i:i + args.batch_size], generator, "all")
                        for i in range(0, args.eval_n, args.batch_size)])
    image_grid(images, nrow=min(args.eval_n, 8)).save(os.path.join(args.out, "samples", f"step_{step:06d}.png"))
    return reward_fn(images.float(), eval_prompts).mean().item()


if args.resume:
    ckpt = torch.load(os.path.join(args.out, "checkpoint.pt"), map_location="cpu", weights_only=True)
    named = dict(sd.unet.named_parameters())
    with torch.no_grad():
        for n, v in ckpt["lora"].items():
            named[n].copy_(v)
    opt.load_state_dict(ckpt["opt"])
    for group in opt.param_groups:  # the checkpoint brings its own lr: this run's --lr wins
        group["lr"] = args.lr
    scaler.load_state_dict(ckpt["scaler"])
    rng.set_state(ckpt["rng"])
    torch.set_rng_state(ckpt["torch_rng"])
    step, eval_before = ckpt["step"], ckpt["eval_before"]
    if master:
        with open(os.path.join(args.out, "metrics.jsonl")) as f:  # one line per step: drop those after the checkpoint
            kept = f.readlines()[:step]
        with open(os.path.join(args.out, "metrics.jsonl"), "w") as f:
            f.writelines(kept)
    info(f"resuming {args.out} at step {step}")
else:
    if master:
        open(os.path.join(args.out, "metrics.jsonl"), "w").close()
        eval_before = evaluate(0)
    checkpoint_run(0)

n_params = sum(p.numel() for p in params)
info(f"{args.model}: {resolution}px, {len(params) // 2} LoRA layers ({n_params / 1e6:.2f}M params), {device_type} "
     f"{args.dtype}, global batch {global_batch} images/step = {args.batch_size} x {args.grad_accum} grad-accum x "
     f"{world} processes" + (f", eval reward {eval_before:.4f}" if master else ""))

# -----------------------------------------------------------------------------
# training loop

stop_signal, skipped, skipped_in_a_row = [], 0, 0


def on_signal(signum, frame):  # the first SIGTERM / Ctrl-C stops cleanly after this step; a second one, at once
    stop_signal.append(signal.Signals(signum).name)
    signal.signal(signum, signal.SIG_DFL)


signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)
pbar = tqdm(range(step, args.steps), initial=step, total=args.steps, desc=args.reward, dynamic_ncols=True,
            disable=not master)
for step in pbar:
    t0 = time.time()
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rewards, components = [], {}
    for micro in range(args.grad_accum):
        idx = torch.randint(len(prompts), (world * args.batch_size,), generator=rng)[rows]  # this rank's rows
        noise = torch.randn(world * args.batch_size, *shape, generator=rng)[rows]  # (B, 4, h, w), on the CPU
        images = sample(cond_all[idx], noise, loop_generator(step, micro), backprop)  # (B, ...); (N * B, ...) lv:N
        r = reward_fn(images, [prompts[i] for i in idx] * (len(images) // args.batch_size))
        loss = -r.mean() / args.grad_accum
        scaler.scale(loss).backward()  # gradients add up locally: no communication per micro-batch
        rewards.append(r.detach().float())
        for name, value in reward_fn.components.items():  # each reward of a mix on its own
            components.setdefault(name, []).append(value.float())
    rewards = gather(torch.cat(rewards))
    if ddp:  # average the gradients over ranks: one all-reduce of one flat buffer
        grads = [p.grad for p in params]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)  # sum; gloo has no average
        for g, avg in zip(grads, (flat / world).split([g.numel() for g in grads])):
            g.copy_(avg.view_as(g))
    scaler.unscale_(opt)  # so that clipping sees the true gradient norm
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm or float("inf"))
    finite = bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(rewards).all())
    if finite:  # a non-finite loss or gradient would poison the weights and AdamW's moments: skip the update
        scaler.step(opt)
    scaler.update()  # fp16: a non-finite step also lowers the loss scale
    opt.zero_grad(set_to_none=True)
    skipped, skipped_in_a_row = skipped + (not finite), 0 if finite else skipped_in_a_row + 1
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device_type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux reports KiB
    log = dict(step=step, reward_mean=rewards.mean().item(), reward_std=rewards.std().item(),
               loss=-rewards.mean().item(), grad_norm=grad_norm.item(), seconds=time.time() - t0, peak_mem_mb=peak,
               skipped=not finite, skipped_total=skipped)
    if len(components) > 1:
        log.update({f"reward_{name}": gather(torch.cat(v)).mean().item() for name, v in components.items()})
    done = step + 1
    if master and (done == args.steps or (args.eval_every and done % args.eval_every == 0)):
        log["eval_reward"] = evaluate(done)
    if master:
        with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({k: None if v != v else v for k, v in log.items()}) + "\n")  # NaN -> null: valid JSON
    stop = torch.tensor(float(bool(stop_signal)), device=device)
    if ddp:  # a signal may reach the ranks at different steps: stop together after the first one that saw it
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
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
        name = stop_signal[0] if stop_signal else "SIGTERM"  # what another rank received
        info(f"stopped by {name} after step {done}, checkpoint saved: continue with --resume {args.out}")
        sys.exit(130 if name == "SIGINT" else 143)

if ddp:
    info(f"LoRA weights identical on all {world} processes (checked at every checkpoint)")
    dist.destroy_process_group()
if master:
    with open(os.path.join(args.out, "metrics.jsonl")) as f:
        after = [json.loads(line) for line in f][-1].get("eval_reward")
    print(f"{args.reward} reward on held-out prompts: {eval_before:.4f} -> {'nan' if after is None else f'{after:.4f}'} "
          f"after {args.steps} steps; LoRA in {os.path.join(args.out, 'lora.safetensors')}")
