"""DDPO: fine-tune Stable Diffusion's UNet (through LoRA) by reinforcement learning, on any reward, differentiable or
not (Black et al. 2023, arXiv:2305.13301): the baseline that AlignProp (train.py) is measured against. On SD3 / FLUX,
Flow-GRPO (Liu et al. 2025, arXiv:2505.05470): the same loop on the rectified-flow sampler made an SDE.

    python ddpo.py --reward jpeg                        # no CUDA GPU: the shipped shapes model, real JPEG size
    python ddpo.py --reward shapes-count-exact --advantage group --group-size 8     # GRPO-style advantages
    python ddpo.py --model stabilityai/stable-diffusion-3.5-medium --reward jpeg --advantage group --group-size 16
    python ddpo.py --resume out/ddpo-jpeg --steps 40    # continue a run; flags given here override its saved ones

One step is a round of sampling and training. Sample --samples-per-step images with DDIM at eta > 0 (a flow model:
the SDE at noise level --eta > 0, flow.flow_rollout), keeping every step's latents x_T .. x_0 and the log-probability
of each transition, log p_old(x_{t-1} | x_t) (sampler.ddim_rollout);
score them: these are the round's reward queries. Turn rewards into advantages normalised per prompt (below). Then
--inner-epochs passes of PPO (Schulman et al. 2017, arXiv:1707.06347) over the stored transitions, treating each
denoising step as an action of a policy (DDPO's MDP, Sec. 4.2): for a --timestep-fraction of the steps,
    ratio = exp(log p_theta(x_{t-1} | x_t) - log p_old(x_{t-1} | x_t))
    loss  = mean( max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) )          eps = --clip-range
averaged over images and steps, backprop into the LoRA weights, clip the gradient norm, AdamW. No gradient ever
flows through the chain or the reward: each step's gradient is that of one Gaussian log-density (the score-function /
REINFORCE estimator), which is why RL needs many samples where reward backprop follows the reward's own gradient.

Advantages (--advantage): "running" is DDPO's per-prompt stat tracking, (r - mean) / std over the last --stat-buffer
rewards of the same prompt (the round's statistics until a prompt has that many); "group" is the group-relative form
of GRPO (Shao et al. 2024, arXiv:2402.03300) used by Flow-GRPO (Liu et al. 2025, arXiv:2505.05470) and DanceGRPO:
each prompt is drawn --group-size times per round, A = (r - group mean) / group std, no value network.

Writes what train.py writes, to --out (default out/ddpo-<reward>): config.json, metrics.jsonl (one line per round,
with reward_mean, images_seen, seconds), samples/step_NNNNNN.png (held-out prompts, fixed seeds), reward.png,
lora.safetensors (loads in diffusers), checkpoint.pt (for --resume); Ctrl-C / SIGTERM finish the round and save.
Under torchrun each process samples and trains on its share of every round; gradients are averaged across processes.
"""
import argparse
import os
import sys
import time

import torch
from tqdm import tqdm

from grid import image_grid
from flow import flow_context, flow_output, flow_rollout, flow_sample, flow_transition
from lora import INITS, TARGET_SETS
from model import DEFAULT_MODEL, decode, encode_prompts, free_text_encoders, native_resolution
from rewards import REWARDS
from runs import (DTYPES, StopOnSignal, agree, average_gradients, check_batch_fits, check_numbers, check_out, die,
                  gather, info, inject_adapters, load_checkpoint, load_model_and_reward, log_metrics, lora_targets,
                  machine_defaults, peak_memory, plot_rewards, read_metrics, refuse_overwrite, reset_peak_memory,
                  resume_args, run_prompts, sampling_defaults, save_checkpoint, start_processes, write_config)
from sampler import ddim_rollout, ddim_sample, ddim_transition, guidance_context, guided_output, step_logprob

# -----------------------------------------------------------------------------
# advantages and the PPO loss: the whole of the method that is not sampling


def group_advantages(rewards, prompts, eps=1e-6):
    """GRPO: (r - mean) / std over the images of the same prompt in this round (population std; a group whose
    rewards are all equal gets advantage 0)."""
    adv = torch.zeros_like(rewards)
    for prompt in set(prompts):
        idx = torch.tensor([i for i, q in enumerate(prompts) if q == prompt])
        r = rewards[idx]
        adv[idx] = (r - r.mean()) / (r.std(unbiased=False) + eps)
    return adv


class RunningPromptStats:
    """DDPO's per-prompt stat tracking: each prompt's last `buffer` rewards, this round's included; advantages use
    their mean and std once a prompt has `buffer` of them, and the whole round's until then."""

    def __init__(self, buffer, eps=1e-6):
        self.buffer, self.eps, self.seen = buffer, eps, {}  # prompt -> its latest rewards (a list, for the checkpoint)

    def advantages(self, rewards, prompts):
        adv = torch.zeros_like(rewards)
        for prompt in set(prompts):
            idx = torch.tensor([i for i, q in enumerate(prompts) if q == prompt])
            self.seen[prompt] = (self.seen.get(prompt, []) + rewards[idx].tolist())[-self.buffer:]
            ref = torch.tensor(self.seen[prompt]) if len(self.seen[prompt]) >= self.buffer else rewards
            adv[idx] = (rewards[idx] - ref.mean()) / (ref.std(unbiased=False) + self.eps)
        return adv


def ppo_loss(logp, logp_old, adv, clip_range):
    """PPO's clipped surrogate (B,) -> scalar, and the ratio exp(logp - logp_old) (B,) for the log."""
    ratio = torch.exp(logp - logp_old)
    return torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range)).mean(), ratio.detach()


# -----------------------------------------------------------------------------
# flags

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--reward", default="jpeg", help=f"what to maximise: {', '.join(REWARDS)}, or a weighted mix such as "
               "jpeg,compress:0.5; a gradient is never used (default: jpeg, DDPO's compressibility)")
p.add_argument("--model", default=None, help=f"hub id, local diffusers dir (SD 1.x, 2.x, XL, 3 / 3.5, FLUX.1), "
               f"'shapes' (shipped, trained) or 'tiny' / 'tiny-xl' / 'tiny-sd3' / 'tiny-flux' (random weights) "
               f"(default: {DEFAULT_MODEL} on CUDA, shapes without a GPU)")
p.add_argument("--prompts", default=None, help="training prompts, one per line (default: as train.py's)")
p.add_argument("--eval-prompts", default=None, help="held-out prompts for the eval grids (default: as train.py's)")
p.add_argument("--steps", type=int, default=20, help="rounds of sampling + training in total (default %(default)s)")
p.add_argument("--samples-per-step", type=int, default=32, help="images sampled and scored per round: the reward "
               "queries (default %(default)s; DDPO: 256 per epoch over 8 GPUs)")
p.add_argument("--batch-size", type=int, default=4, help="images per UNet call, in sampling and training")
p.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimisation step (the defaults: 2 "
               "optimisation steps per round and inner epoch)")
p.add_argument("--inner-epochs", type=int, default=1, help="PPO passes over each round's samples (DDPO: 1)")
p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (DDPO: 3e-4)")
p.add_argument("--clip-range", type=float, default=1e-4, help="PPO's ratio clip eps (DDPO: 1e-4)")
p.add_argument("--adv-clip-max", type=float, default=5.0, help="advantages clipped to +-this (DDPO: 5)")
p.add_argument("--timestep-fraction", type=float, default=1.0, help="fraction of each trajectory's denoising steps "
               "trained on, drawn at random per micro-batch (DDPO: 1.0)")
p.add_argument("--advantage", default="running", choices=["running", "group"], help="per-prompt normalisation: "
               "running = DDPO's stat tracking, group = GRPO's per-round groups (needs --group-size >= 2)")
p.add_argument("--group-size", type=int, default=1, help="images per prompt in a round (1 = a prompt per image, "
               "DDPO's draw; Flow-GRPO uses 16 or more)")
p.add_argument("--stat-buffer", type=int, default=16, help="running advantages: rewards kept per prompt, and "
               "needed before its own statistics are used (DDPO: 16)")
p.add_argument("--lora-rank", type=int, default=4, help="rank of the LoRA adapters (alpha = rank; DDPO: 4)")
p.add_argument("--lora-init", default="kaiming", choices=INITS, help="the LoRA down matrices' init: kaiming "
               "(nn.Linear's, as train.py) or gaussian (N(0, 1/rank^2): PEFT's, TRL's and DDPO's)")
p.add_argument("--lora-targets", default="attn", help=f"layers that get adapters: {', '.join(TARGET_SETS)} "
               "(the attention projections, DDPO's; the ResNet blocks' convolutions) or module names, joined with '+'")
p.add_argument("--sample-steps", "--ddim-steps", type=int, default=20, help="denoising steps per sample (DDPO: 50; "
               "Flow-GRPO: 10)")
p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale in sampling and "
               "training, as train.py's; <= 1 disables CFG (default: 7.5 SD, 7.0 SD3, 3.5 FLUX; DDPO: 5, Flow-GRPO: "
               "4.5)")
p.add_argument("--eta", type=float, default=None, help="sampler noise, > 0: the policy must be stochastic; DDIM's eta "
               "(default 1, DDPO's) or on flow models the noise level of Flow-GRPO's SDE (default 0.7, its value)")
p.add_argument("--resolution", type=int, default=0, help="image side in pixels; 0 = the model's native size")
p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="precision of the frozen model and "
               "autocast (default: bf16 on CUDA, fp32 on CPU); LoRA weights stay fp32")
p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clip; 0 = no clipping (DDPO: 1)")
p.add_argument("--seed", type=int, default=0, help="seeds the LoRA init, prompts, noise and eval images")
p.add_argument("--out", default=None, help="output directory (default: out/ddpo-<reward>)")
p.add_argument("--resume", default=None, help="continue the run in this directory from its last checkpoint")
p.add_argument("--save-every", type=int, default=5, help="checkpoint every N rounds; 0 = only at the end")
p.add_argument("--eval-every", type=int, default=5, help="eval grid every N rounds; 0 = only at start and end")
p.add_argument("--eval-n", type=int, default=8, help="eval images (held-out prompts x fixed seeds)")
args = resume_args(p, p.parse_args())

ddp, rank, world = start_processes()  # torchrun: each process samples and trains on its rows of every round
master = rank == 0
device_type, device = machine_defaults(args)  # --model, --prompts, --eval-prompts and --dtype for this machine
args.out = args.out or os.path.join("out", "ddpo-" + args.reward.replace(",", "+").replace(":", ""))
prompts, eval_prompts = run_prompts(args)
if args.eta == 0:
    die("--eta must be > 0: eta 0 is a deterministic sampler, which has no policy density to train")
check_numbers(args, at_least_1=("steps", "samples_per_step", "batch_size", "grad_accum", "inner_epochs",
                                "group_size", "stat_buffer", "lora_rank", "sample_steps", "eval_n"),
              at_least_0=("max_grad_norm", "resolution", "save_every", "eval_every"),
              above_0=("lr", "clip_range", "adv_clip_max", "eta", "timestep_fraction"), finite=("guidance",))
if args.timestep_fraction > 1:
    die("--timestep-fraction must be in (0, 1]")
micro = args.batch_size * world  # images per micro-batch over all processes
if args.samples_per_step % (micro * args.grad_accum) or args.samples_per_step % args.group_size:
    die(f"--samples-per-step {args.samples_per_step} must be a multiple of --batch-size x --grad-accum x processes "
        f"({micro * args.grad_accum}) and of --group-size ({args.group_size})")
if args.advantage == "group" and args.group_size < 2:
    die("--advantage group needs --group-size >= 2: the advantage compares images of the same prompt")
targets = lora_targets(args.lora_targets)
refuse_overwrite(args.out, args.resume)
check_out(args.out)  # a file, or a place this process may not write: one line now, not a traceback later

# -----------------------------------------------------------------------------
# setup

sd, shape, reward_fn = load_model_and_reward(args, device)  # frozen, in the run's dtype; shape (C, h, w)
sampling_defaults(args, sd, eta_default={"ddim": 1.0, "flow": 0.7})  # --guidance, --eta by the model's family
# The two families' pieces take the same arguments (eta: DDIM's, or the flow SDE's noise level); the loop uses these
sample_chain, rollout, transition, model_output = ((flow_sample, flow_rollout, flow_transition, flow_output) if sd.flow
                                                   else (ddim_sample, ddim_rollout, ddim_transition, guided_output))
dtype = DTYPES[args.dtype]
resolution = args.resolution or native_resolution(sd)
# a round keeps every image's latents x_T .. x_0 and its decoded image, on every rank (a lower bound: no activations)
per_image = (args.sample_steps + 1) * 4 * torch.Size(shape).numel() + 4 * 3 * resolution ** 2
check_batch_fits(f"--samples-per-step {args.samples_per_step}", args.samples_per_step // world * per_image,
                 device_type, "lower --samples-per-step")
torch.manual_seed(args.seed)  # the LoRA init depends on the seed alone, not on what loading drew
params = inject_adapters(sd.unet, args.lora_rank, targets, args.lora_init)  # the only trainable weights, in fp32
opt = torch.optim.AdamW(params, lr=args.lr)
autocast = torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32)
scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
eval_prompts = [eval_prompts[i % len(eval_prompts)] for i in range(args.eval_n)]
with torch.no_grad(), autocast:
    cond_all = encode_prompts(sd, prompts)  # (N, L, D)
    eval_cond = encode_prompts(sd, eval_prompts)
    uncond = encode_prompts(sd, [""])  # (1, L, D)
freed = free_text_encoders(sd)  # needed no more: SD3's and FLUX's T5-XXL alone holds 9.5 GB in bf16
if device_type == "cuda":
    torch.cuda.empty_cache()  # their memory back to the driver, and to this run's peak-memory budget
eval_noise = torch.randn(args.eval_n, *shape, generator=torch.Generator().manual_seed(args.seed + 1))
rng = torch.Generator().manual_seed(args.seed)  # prompts and initial noise of every round, the same on every rank
stats = RunningPromptStats(args.stat_buffer)
n_local = args.samples_per_step // world  # this rank's images per round
rows = slice(rank * n_local, (rank + 1) * n_local)
train_steps = max(1, round(args.timestep_fraction * args.sample_steps))  # denoising steps trained per micro-batch
config = dict(vars(args), script="ddpo.py", world_size=world)
if not args.resume:  # a resumed run's config.json is rewritten once its checkpoint has loaded
    write_config(args.out, config)
step, eval_before = 0, None


def round_generator(step, purpose):
    """Eta noise (purpose 0) and epoch e's shuffles (purpose e + 1): a function of the round alone, so a resumed run
    draws what the uninterrupted one did (hash() of a tuple of ints does not change between runs), different per
    rank."""
    return torch.Generator().manual_seed(hash((args.seed, step, purpose, rank)) % 2**63)


def checkpoint_run(done):
    save_checkpoint(args.out, sd.unet, params, opt, scaler, rng, step=done, eval_before=eval_before, stats=stats.seen)


@torch.no_grad()
def evaluate(step):  # as train.py's: the same held-out prompts, seeds and eta noise every time
    generator = torch.Generator().manual_seed(args.seed + 2)
    images = []
    for i in range(0, args.eval_n, args.batch_size):
        cond = eval_cond[i:i + args.batch_size]
        with autocast:
            latents = sample_chain(sd, cond, uncond.expand(len(cond), -1, -1), eval_noise[i:i + args.batch_size].to(
                device), args.sample_steps, args.guidance, args.eta, generator=generator)
            images.append(decode(sd, latents))
    images = torch.cat(images)
    title = f"ddpo.py {args.out}, step {step}: held-out prompts, fixed seeds"
    grid = image_grid(images, nrow=min(args.eval_n, 8), labels=eval_prompts, title=title)
    grid.save(os.path.join(args.out, "samples", f"step_{step:06d}.png"))
    return reward_fn(images.float(), eval_prompts).mean().item()


if args.resume:
    ckpt = load_checkpoint(args.out, sd.unet, opt, scaler, rng, args.lr)  # this run's --lr wins
    write_config(args.out, config)
    step, eval_before, stats.seen = ckpt["step"], ckpt["eval_before"], ckpt["stats"]
    info(f"resuming {args.out} at round {step}")
else:
    if master:
        open(os.path.join(args.out, "metrics.jsonl"), "w").close()
        eval_before = evaluate(0)
    checkpoint_run(0)
info(f"{args.model}: {resolution}px, {len(params) // 2} LoRA layers, {device_type} {args.dtype}, "
     f"{args.samples_per_step} images per round in {args.samples_per_step // (micro * args.grad_accum)} optimisation steps x "
     f"{args.inner_epochs} inner epochs, {train_steps} of {args.sample_steps} denoising steps trained, {args.advantage} "
     f"advantages, text encoders freed ({freed / 2**30:.2f} GB)" + (f", eval reward {eval_before:.4f}" if master
                                                                       else ""))

# -----------------------------------------------------------------------------
# training loop: one round = sample and score, then PPO on what was sampled

signals = StopOnSignal()
pbar = tqdm(range(step, args.steps), initial=step, total=args.steps, desc=f"ddpo {args.reward}", dynamic_ncols=True,
            disable=not master)
for step in pbar:
    t0 = time.time()
    reset_peak_memory(device_type)  # peak_mem_mb: this round's own

    # 1. sample: the round's prompts (groups of --group-size) and noise, drawn globally; this rank keeps its rows
    idx = torch.randint(len(prompts), (args.samples_per_step // args.group_size,), generator=rng)
    idx = idx.repeat_interleave(args.group_size)  # (N,): each prompt G times in a row
    noise = torch.randn(args.samples_per_step, *shape, generator=rng)[rows]  # (n, C, h, w)
    idx_local, generator = idx[rows], round_generator(step, 0)
    xs, logps_old, images = [], [], []
    for i in range(0, n_local, args.batch_size):  # under no_grad: a rollout builds no graph
        cond = cond_all[idx_local[i:i + args.batch_size]]
        with autocast:
            x, lp, ts = rollout(sd, cond, uncond.expand(len(cond), -1, -1), noise[i:i + args.batch_size].to(device),
                                args.sample_steps, args.guidance, args.eta, generator)
            with torch.no_grad():
                images.append(decode(sd, x[-1]).float())
        xs.append(x)
        logps_old.append(lp)
    xs, logps_old = torch.cat(xs, 1), torch.cat(logps_old, 1)  # (T + 1, n, C, h, w): x_T .. x_0; (T, n)

    # 2. score (the reward queries), then advantages from every rank's rewards, so that all normalise alike
    with torch.no_grad():
        local_rewards = reward_fn(torch.cat(images), [prompts[i] for i in idx_local]).float()
    rewards = gather(local_rewards)  # (N,)
    names = [prompts[i] for i in idx]
    adv = group_advantages(rewards, names) if args.advantage == "group" else stats.advantages(rewards, names)
    adv = adv.clamp(-args.adv_clip_max, args.adv_clip_max)[rows].to(device)  # (n,)

    # 3. PPO: --inner-epochs passes over this round's transitions, the policy's log-density recomputed with grad
    losses, norms, clipped, ratio_dev, skipped = [], [], [], [], 0  # losses, ratio_dev: per inner epoch
    for epoch in range(args.inner_epochs):
        g = round_generator(step, epoch + 1)
        order = torch.randperm(n_local, generator=g)  # shuffle the trajectories
        epoch_dev, epoch_losses = 0.0, []
        for start in range(0, n_local, args.batch_size * args.grad_accum):  # one optimisation step
            for mb in order[start:start + args.batch_size * args.grad_accum].split(args.batch_size):
                trained = torch.randperm(args.sample_steps, generator=g)[:train_steps]  # which denoising steps
                cond, uncond_mb = cond_all[idx_local[mb]], uncond.expand(len(mb), -1, -1)
                context = (flow_context(sd, cond, uncond_mb, args.guidance) if sd.flow  # FLUX: cond alone
                           else guidance_context(cond, uncond_mb, args.guidance, sd.unet.dtype))
                for j in trained.tolist():
                    x_t, x_prev = xs[j, mb], xs[j + 1, mb]  # (b, C, h, w): the stored transition x_t -> x_{t-1}
                    with autocast:
                        out = model_output(sd, x_t, ts[j], context, args.guidance)
                    mean, sigma = transition(sd, out.float(), x_t.float(), ts[j], args.sample_steps, args.eta)
                    loss, ratio = ppo_loss(step_logprob(x_prev, mean, sigma), logps_old[j, mb], adv[mb],
                                           args.clip_range)
                    scaler.scale(loss / (train_steps * args.grad_accum)).backward()  # mean over steps, micro-batches
                    epoch_losses.append(loss.item())
                    clipped.append(((ratio - 1).abs() > args.clip_range).float().mean().item())
                    epoch_dev = max(epoch_dev, (ratio - 1).abs().max().item())
            average_gradients(params)
            scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm or float("inf"))
            if bool(torch.isfinite(norm)):  # a non-finite gradient would poison AdamW's moments: skip the update
                scaler.step(opt)
            else:
                skipped += 1
            scaler.update()
            opt.zero_grad(set_to_none=True)
            norms.append(norm.item())
        ratio_dev.append(epoch_dev)
        losses.append(gather(torch.tensor(epoch_losses, device=device)).mean().item())  # over every rank's

    peak = peak_memory(device_type) / 2**20
    log = dict(step=step + 1, reward_mean=rewards.mean().item(), reward_std=rewards.std().item(),
               loss=sum(losses) / len(losses), loss_per_epoch=losses, ratio_max_dev=ratio_dev,
               clip_fraction=sum(clipped) / len(clipped), grad_norm=sum(norms) / len(norms),
               seconds=time.time() - t0, peak_mem_mb=peak, images_seen=(step + 1) * args.samples_per_step,
               skipped=skipped)
    if len(reward_fn.components) > 1:
        log.update({f"reward_{name}": gather(v.float()).mean().item() for name, v in reward_fn.components.items()})
    done = step + 1
    evaluating = master and (done == args.steps or (args.eval_every and done % args.eval_every == 0))
    if evaluating:
        log["eval_reward"] = evaluate(done)
    log_metrics(args.out, log)
    if evaluating:
        plot_rewards(args.out, f"ddpo.py --reward {args.reward} ({args.out})", eval_before)
    stop = agree(signals.name, device)
    if done == args.steps or (args.save_every and done % args.save_every == 0) or stop:
        checkpoint_run(done)
    pbar.set_postfix(reward=f"{log['reward_mean']:.4f}", **({"eval": f"{log['eval_reward']:.4f}"}
                                                            if "eval_reward" in log else {}))
    if stop:
        pbar.close()
        name = signals.name or "SIGTERM"
        info(f"stopped by {name} after round {done}, checkpoint saved: continue with --resume {args.out}")
        sys.exit(130 if name == "SIGINT" else 143)

if ddp:
    info(f"LoRA weights identical on all {world} processes (checked at every checkpoint)")
    torch.distributed.destroy_process_group()
if master:
    after = read_metrics(args.out)[-1].get("eval_reward")
    print(f"{args.reward} reward on held-out prompts: {eval_before:.4f} -> {'nan' if after is None else f'{after:.4f}'} "
          f"after {args.steps} rounds ({args.steps * args.samples_per_step} reward queries); LoRA in "
          f"{os.path.join(args.out, 'lora.safetensors')}")
