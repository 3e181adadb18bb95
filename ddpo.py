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
import time

import torch

from flow import flow_context, flow_output, flow_rollout, flow_transition
from memory import peak_memory, reset_peak_memory
from model import decode
from runs import (Run, add_run_flags, average_gradients, check_batch_fits, check_numbers, die, gather, info,
                  parse_run_args)
from sampler import ddim_rollout, ddim_transition, guidance_context, guided_output, step_logprob

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
# flags: the shared ones (runs.add_run_flags: --model, --reward, --steps, --lr, ...), then RL's own

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
add_run_flags(p, reward="jpeg", steps=20, lr=3e-4, grad_accum=4, eta=None, every=5, unit="round")
p.add_argument("--samples-per-step", type=int, default=32, help="images sampled and scored per round: the reward "
               "queries (default %(default)s; DDPO: 256 per epoch over 8 GPUs)")
p.add_argument("--inner-epochs", type=int, default=1, help="PPO passes over each round's samples (DDPO: 1)")
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
args = parse_run_args(p, "ddpo.py")  # --resume, every default the command leaves open (runs.settle), checks
if args.eta == 0:
    die("--eta must be > 0: eta 0 is a deterministic sampler, which has no policy density to train")
check_numbers(args, at_least_1=("samples_per_step", "inner_epochs", "group_size", "stat_buffer"),
              above_0=("clip_range", "adv_clip_max", "timestep_fraction"))
if args.timestep_fraction > 1:
    die(f"--timestep-fraction must be in (0, 1], got {args.timestep_fraction}")
world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's processes
micro = args.batch_size * world  # images per micro-batch over all processes
if args.samples_per_step % (micro * args.grad_accum) or args.samples_per_step % args.group_size:
    die(f"--samples-per-step {args.samples_per_step} must be a multiple of --batch-size x --grad-accum x processes "
        f"({micro * args.grad_accum}) and of --group-size ({args.group_size})")
if args.advantage == "group" and args.group_size < 2:
    die("--advantage group needs --group-size >= 2: the advantage compares images of the same prompt")

# -----------------------------------------------------------------------------
# setup: the model, reward, LoRA and optimiser, the prompts encoded once (runs.Run)

run = Run(args, "ddpo.py")
sd, device = run.sd, run.device
# The two families' pieces take the same arguments (eta: DDIM's, or the flow SDE's noise level); the loop uses these
rollout, transition, model_output = ((flow_rollout, flow_transition, flow_output) if sd.flow
                                     else (ddim_rollout, ddim_transition, guided_output))
# a round keeps every image's latents x_T .. x_0 and its decoded image, on every rank (a lower bound: no activations)
per_image = (args.sample_steps + 1) * 4 * torch.Size(run.shape).numel() + 4 * 3 * run.resolution ** 2
check_batch_fits(f"--samples-per-step {args.samples_per_step}", args.samples_per_step // world * per_image,
                 run.device_type, "lower --samples-per-step")
stats = RunningPromptStats(args.stat_buffer)
n_local = args.samples_per_step // world  # this rank's images per round
rows = slice(run.rank * n_local, (run.rank + 1) * n_local)
train_steps = max(1, round(args.timestep_fraction * args.sample_steps))  # denoising steps trained per micro-batch
stats.seen = run.start(state=lambda: dict(stats=stats.seen)).get("stats", {})
info(f"{args.model}: {run.resolution}px, {len(run.params) // 2} LoRA layers, {run.device_type} {args.dtype}, "
     f"{args.samples_per_step} images per round in {args.samples_per_step // (micro * args.grad_accum)} optimisation "
     f"steps x {args.inner_epochs} inner epochs, {train_steps} of {args.sample_steps} denoising steps trained, "
     f"{args.advantage} advantages, text encoders freed ({run.freed / 2**30:.2f} GB)"
     + (f", eval reward {run.eval_before:.4f}" if run.master else ""))


def round_generator(step, purpose):
    """Eta noise (purpose 0) and epoch e's shuffles (purpose e + 1): a function of the round alone, so a resumed run
    draws what the uninterrupted one did (hash() of a tuple of ints does not change between runs), different per
    rank."""
    return torch.Generator().manual_seed(hash((args.seed, step, purpose, run.rank)) % 2**63)


# -----------------------------------------------------------------------------
# training loop: one round = sample and score, then PPO on what was sampled

for step in run.progress(f"ddpo {args.reward}"):
    t0 = time.time()
    reset_peak_memory(run.device_type)  # peak_mem_mb: this round's own

    # 1. sample: the round's prompts (groups of --group-size) and noise, drawn globally; this rank keeps its rows
    idx = torch.randint(len(run.prompts), (args.samples_per_step // args.group_size,), generator=run.rng)
    idx = idx.repeat_interleave(args.group_size)  # (N,): each prompt G times in a row
    noise = torch.randn(args.samples_per_step, *run.shape, generator=run.rng)[rows]  # (n, C, h, w)
    idx_local, generator = idx[rows], round_generator(step, 0)
    xs, logps_old, images = [], [], []
    for i in range(0, n_local, args.batch_size):  # under no_grad: a rollout builds no graph
        cond = run.cond_all[idx_local[i:i + args.batch_size]]
        with run.autocast:
            x, lp, ts = rollout(sd, cond, run.uncond.expand(len(cond), -1, -1), noise[i:i + args.batch_size].to(device),
                                args.sample_steps, args.guidance, args.eta, generator)
            with torch.no_grad():
                images.append(decode(sd, x[-1]).float())
        xs.append(x)
        logps_old.append(lp)
    xs, logps_old = torch.cat(xs, 1), torch.cat(logps_old, 1)  # (T + 1, n, C, h, w): x_T .. x_0; (T, n)

    # 2. score (the reward queries), then advantages from every rank's rewards, so that all normalise alike
    with torch.no_grad():
        local_rewards = run.reward_fn(torch.cat(images), [run.prompts[i] for i in idx_local]).float()
    rewards = gather(local_rewards)  # (N,)
    names = [run.prompts[i] for i in idx]
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
                cond, uncond_mb = run.cond_all[idx_local[mb]], run.uncond.expand(len(mb), -1, -1)
                context = (flow_context(sd, cond, uncond_mb, args.guidance) if sd.flow  # FLUX: cond alone
                           else guidance_context(cond, uncond_mb, args.guidance, sd.unet.dtype))
                for j in trained.tolist():
                    x_t, x_prev = xs[j, mb], xs[j + 1, mb]  # (b, C, h, w): the stored transition x_t -> x_{t-1}
                    with run.autocast:
                        out = model_output(sd, x_t, ts[j], context, args.guidance)
                    mean, sigma = transition(sd, out.float(), x_t.float(), ts[j], args.sample_steps, args.eta)
                    loss, ratio = ppo_loss(step_logprob(x_prev, mean, sigma), logps_old[j, mb], adv[mb],
                                           args.clip_range)
                    run.scaler.scale(loss / (train_steps * args.grad_accum)).backward()  # mean over steps, micro-batches
                    epoch_losses.append(loss.item())
                    clipped.append(((ratio - 1).abs() > args.clip_range).float().mean().item())
                    epoch_dev = max(epoch_dev, (ratio - 1).abs().max().item())
            average_gradients(run.params)
            run.scaler.unscale_(run.opt)
            norm = torch.nn.utils.clip_grad_norm_(run.params, args.max_grad_norm or float("inf"))
            if bool(torch.isfinite(norm)):  # a non-finite gradient would poison AdamW's moments: skip the update
                run.scaler.step(run.opt)
            else:
                skipped += 1
            run.scaler.update()
            run.opt.zero_grad(set_to_none=True)
            norms.append(norm.item())
        ratio_dev.append(epoch_dev)
        losses.append(gather(torch.tensor(epoch_losses, device=device)).mean().item())  # over every rank's

    log = dict(step=step + 1, reward_mean=rewards.mean().item(), reward_std=rewards.std().item(),
               loss=sum(losses) / len(losses), loss_per_epoch=losses, ratio_max_dev=ratio_dev,
               clip_fraction=sum(clipped) / len(clipped), grad_norm=sum(norms) / len(norms),
               seconds=time.time() - t0, peak_mem_mb=peak_memory(run.device_type) / 2**20,
               images_seen=(step + 1) * args.samples_per_step, skipped=skipped)
    if len(run.reward_fn.components) > 1:
        log.update({f"reward_{n}": gather(v.float()).mean().item() for n, v in run.reward_fn.components.items()})
    run.end_step(step + 1, log)  # the log line; eval grid, plot and checkpoint when due; a signal stops here
run.finish(f" ({args.steps * args.samples_per_step} reward queries)")
