"""Reward backprop (train.py, AlignProp) against reinforcement learning (ddpo.py, DDPO) at equal reward queries, on
the shapes model: the claim this method exists for, measured. With --model shapes-flow the same study on the
rectified-flow sibling, where RL is Flow-GRPO's (ddpo.py: group-relative advantages on the flow SDE).

    python studies/rl_vs_backprop.py --task compress --seeds 0 --budget 256   # one seed, one task (~10 min, 2 cores)
    python studies/rl_vs_backprop.py                           # both tasks x both methods x 3 seeds, then the report
    python studies/rl_vs_backprop.py --sweep --task compress   # the tuning sweep (seed 0) behind the settings in RUNS
    python studies/rl_vs_backprop.py --report                  # plots in docs/ and the table, from what is measured
    python studies/rl_vs_backprop.py --model shapes-flow --sweep   # the flow model: its own sweeps, then
    python studies/rl_vs_backprop.py --model shapes-flow           # each method's best setting in them, compared

Tasks (TASKS): each method trains on what it can use and both are judged by the same exact measure.
  compress  backprop trains on `compress` (the differentiable JPEG-size estimate), RL on `jpeg` (Pillow's real size);
            judged by the real JPEG size (kB) of held-out samples, lower is better.
  count     backprop trains on `shapes-count` (the learned counter), RL on `shapes-count-exact` (describe()'s count);
            judged by describe()'s count accuracy, with colour and shape accuracy beside it to catch hacking.

Every run goes through the scripts' own command lines, in stages: train to Q reward queries (--steps), judge the
LoRA (JUDGE_N samples of the 12 held-out prompts, fixed seeds, DDIM eta 0, guidance 7.5, the runs' DDIM_STEPS),
--resume to the next Q. Each judged stage is a line of studies/rl-vs-backprop-results.jsonl (committed, so that
--report redraws the plots and tables of docs/rl-vs-backprop.md from a clean clone; a row without "model" is the
shapes model's), so a stopped experiment
continues where it was: finished stages are skipped, an unfinished run resumes from its checkpoint in
out/rl-vs-backprop/ (or starts again where that is gone: runs are deterministic in their seed). Minutes are
training time (metrics.jsonl `seconds`), judging excluded. Start afresh: delete the results file and
out/rl-vs-backprop/.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: studies/..
sys.path.insert(0, ROOT)  # run as python studies/<this file>: the project's modules live one level up
OUT = os.path.join(ROOT, "out", "rl-vs-backprop")
DOCS = os.path.join(ROOT, "docs")
RESULTS = os.path.join(ROOT, "studies", "rl-vs-backprop-results.jsonl")  # each judged stage; --report redraws
EVAL_PROMPTS = os.path.join(ROOT, "prompts", "shapes-eval.txt")
DDIM_STEPS = 10  # in training and judging alike: half the quick start's 20, so that the study fits 2 hours on 2 cores
JUDGE_N, JUDGE_GUIDANCE, JUDGE_SEED = 128, 7.5, 0
BUDGET = 1024  # reward queries per compared run: 32 rounds of RL's 32 images, 4x the sweeps', to see where RL goes
STAGES = (8, 16, 32, 64, 128, 192, 256, 512, BUDGET)  # where each run is judged (those its images per step divide)
SWEEP_BUDGET = 256  # reward queries per sweep run: 8 rounds of 32, as TRL's DDPOTrainer was measured (README)
GRADIENT_RES, GRADIENT_STEPS, GRADIENT_REF = 32, 4, 2048  # --gradients: tiny model, small and short enough for 2048

TASKS = {  # task -> (metric judged, higher is better?, {method: training reward})
    "compress": ("jpeg_kb", False, {"backprop": "compress", "rl": "jpeg"}),
    "count": ("count", True, {"backprop": "shapes-count", "rl": "shapes-count-exact"}),
}
MODELS = ("shapes", "shapes-flow")  # the DDIM model and its rectified-flow sibling (the shapes package)
COMMON = ["--ddim-steps", str(DDIM_STEPS), "--guidance", "7.5", "--lora-rank", "4", "--eval-every", "0",
          "--eval-n", "4"]  # same model, sampler, LoRA rank and prompts for both methods
BACKPROP = ["--keep-activations", "0"]  # train.py: every step recomputed (flat memory), as the committed results were
# measured; its default since, auto, keeps activations up to a memory budget: fewer minutes, more peak memory
# The settings compared: each method's best in its sweep below (README: "Reward backprop against RL").
RUNS = {
    ("compress", "backprop"): ["--batch-size", "4", "--lr", "1e-2"],
    ("compress", "rl"): ["--samples-per-step", "32", "--lr", "3e-3", "--clip-range", "1e-2", "--batch-size", "8",
                         "--grad-accum", "1"],
    ("count", "backprop"): ["--batch-size", "4", "--lr", "1e-3"],
    ("count", "rl"): ["--samples-per-step", "32", "--lr", "1e-2", "--clip-range", "1e-2"],
}
# The sweeps: five settings per method (the same sweep budget), each run to SWEEP_BUDGET queries, seed 0, judged at the
# end.
SWEEPS = {
    "backprop": {"lr 1e-3 (AlignProp's)": ["--batch-size", "4", "--lr", "1e-3"],
                 "lr 3e-3": ["--batch-size", "4", "--lr", "3e-3"],
                 "lr 1e-2": ["--batch-size", "4", "--lr", "1e-2"],
                 "lr 3e-3, random K in 1..10": ["--batch-size", "4", "--lr", "3e-3", "--backprop", "1,10"],
                 "lr 3e-4": ["--batch-size", "4", "--lr", "3e-4"]},
    "rl": {"DDPO's defaults (lr 3e-4, clip 1e-4)": ["--samples-per-step", "32", "--lr", "3e-4", "--clip-range",
                                                     "1e-4"],
           "lr 3e-3, clip 1e-2": ["--samples-per-step", "32", "--lr", "3e-3", "--clip-range", "1e-2"],
           "lr 1e-2, clip 1e-2": ["--samples-per-step", "32", "--lr", "1e-2", "--clip-range", "1e-2"],
           "lr 3e-3, clip 1e-2, GRPO groups of 8": ["--samples-per-step", "32", "--lr", "3e-3", "--clip-range",
                                                    "1e-2", "--advantage", "group", "--group-size", "8"],
           "lr 3e-3, clip 1e-2, 8 images per optimisation step": ["--samples-per-step", "32", "--lr", "3e-3",
                                                                  "--clip-range", "1e-2", "--batch-size", "8",
                                                                  "--grad-accum", "1"]},
}
# On the flow model RL is Flow-GRPO's: group-relative advantages (groups of 8: 4 prompts a round) on the flow SDE
# (ddpo.py's default noise level there, 0.7), swept over the same five kinds of change; backprop's sweep is as above.
# The compared runs there take each method's best sweep setting (tuned()), as RUNS records it for the DDIM model.
GROUP = ["--samples-per-step", "32", "--advantage", "group", "--group-size", "8"]
FLOW_SWEEPS = {
    "backprop": SWEEPS["backprop"],
    "rl": {"Flow-GRPO's lr 3e-4, clip 1e-4": [*GROUP, "--lr", "3e-4", "--clip-range", "1e-4"],
           "lr 3e-3, clip 1e-2": [*GROUP, "--lr", "3e-3", "--clip-range", "1e-2"],
           "lr 1e-2, clip 1e-2": [*GROUP, "--lr", "1e-2", "--clip-range", "1e-2"],
           "lr 3e-3, clip 1e-2, groups of 4": ["--samples-per-step", "32", "--advantage", "group", "--group-size",
                                               "4", "--lr", "3e-3", "--clip-range", "1e-2"],
           "lr 3e-3, clip 1e-2, 8 images per optimisation step": [*GROUP, "--lr", "3e-3", "--clip-range", "1e-2",
                                                                  "--batch-size", "8", "--grad-accum", "1"]},
}


def images_per_step(method, flags):
    if method == "rl":
        return int(flags[flags.index("--samples-per-step") + 1])
    grad_accum = int(flags[flags.index("--grad-accum") + 1]) if "--grad-accum" in flags else 1
    return int(flags[flags.index("--batch-size") + 1]) * grad_accum


# -----------------------------------------------------------------------------
# the judge: one set of held-out samples, read two ways


_judge_sd = {}


@torch.no_grad()
def judge(lora, model):
    """Held-out samples of `model` (with the LoRA file, if any): real JPEG kB and describe()'s accuracies."""
    from lora import load_lora
    from model import load_sd
    from rewards import real_jpeg_kilobytes
    from shapes.evaluate import evaluate
    if model not in _judge_sd:
        _judge_sd[model] = load_sd(model)
    sd = _judge_sd[model]
    if lora:
        load_lora(sd.unet, lora)  # replaces the previous stage's adapters
    else:
        from lora import lora_layers
        for layer in lora_layers(sd.unet):  # the base model: adapters (if injected before) at zero
            layer.up.zero_()
    with open(EVAL_PROMPTS) as f:
        prompts = [line.strip() for line in f if line.strip()]
    scores, images = evaluate(sd, prompts, n=JUDGE_N, steps=DDIM_STEPS, guidance=JUDGE_GUIDANCE, seed=JUDGE_SEED)
    return dict(jpeg_kb=real_jpeg_kilobytes(images).mean().item(), **scores)


# -----------------------------------------------------------------------------
# runs, in stages


def results(model):
    """The recorded rows of `model` (a row without "model": the shapes model's, recorded before the flow model)."""
    if not os.path.isfile(RESULTS):
        return []
    with open(RESULTS) as f:
        return [r for r in map(json.loads, f) if r.get("model", "shapes") == model]


def record(row):
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")


def base_row(task, model):
    done = [r for r in results(model) if r["task"] == task and r["queries"] == 0]
    if done:
        return done[0]
    row = dict(model=model, task=task, method="base", setting="base", seed=None, queries=0, minutes=0.0,
               peak_mem_mb=None, **judge(None, model))
    record(row)
    return row


def run_stages(task, method, setting, flags, seed, stages, model, **note):
    """Train one run to each of `stages` reward queries in turn, judging after each; skips what is recorded. `note`:
    more fields for the rows (the sweep setting a compared run was tuned to)."""
    script = "train.py" if method == "backprop" else "ddpo.py"
    name = "".join(c if c.isalnum() or c in ".-" else "_" for c in setting)
    out = os.path.join(OUT, *(["flow"] if model == "shapes-flow" else []), task, method, name, f"seed{seed}")
    per_step = images_per_step(method, flags)
    have = {r["queries"] for r in results(model) if (r["task"], r["method"], r["setting"], r["seed"]) ==
            (task, method, setting, seed)}
    for queries in stages:
        if queries % per_step or queries in have:
            continue
        steps = queries // per_step
        if os.path.isfile(os.path.join(out, "checkpoint.pt")):
            cmd = [script, "--resume", out, "--steps", str(steps)]
        else:
            cmd = [script, "--out", out, "--reward", TASKS[task][2][method], "--seed", str(seed), "--steps",
                   str(steps), "--save-every", str(max(1, 32 // per_step)), "--model", model, *COMMON,
                   *flags]  # a kill loses <= 32 queries
            if method == "backprop":
                cmd += BACKPROP
        print(f"[{task} {method} {setting} seed {seed}] to {queries} queries: python {' '.join(cmd)}", flush=True)
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # glibc returns freed blocks: peak RSS means memory
        t0 = time.time()
        proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"failed: {proc.stderr.strip()[-2000:]}")
        with open(os.path.join(out, "metrics.jsonl")) as f:
            m = [json.loads(line) for line in f]
        t1 = time.time()
        scores = judge(os.path.join(out, "lora.safetensors"), model)
        row = dict(model=model, task=task, method=method, setting=setting, seed=seed, queries=queries, **note,
                   minutes=sum(x["seconds"] for x in m) / 60, peak_mem_mb=max(x["peak_mem_mb"] for x in m),
                   train_reward=m[-1]["reward_mean"], **scores,
                   wall_minutes=dict(run=(t1 - t0) / 60, judge=(time.time() - t1) / 60))  # the study's own cost
        record(row)
        print(f"    {TASKS[task][0]} {row[TASKS[task][0]]:.4f} after {row['minutes']:.1f} min", flush=True)


# -----------------------------------------------------------------------------
# why: the two methods' gradient estimates, on the same samples


def gradient_estimates(sd, params, reward_fn, prompt, n, seed, resolution, steps, guidance, chunk=64):
    """Two estimates of d E[reward] / d LoRA from the same n trajectories (DDIM at eta 1, noise from `seed`):
    score function, what RL's update follows (DDPO at ratio 1: the reward's own gradient is never used),
        mean over samples of (r - mean r) * sum_t grad log p(x_{t-1} | x_t),
    and pathwise, what reward backprop follows: mean of grad r through the chain, with the same noise. Both are
    unbiased estimates of one gradient (Stein's lemma makes them equal in expectation); they differ in variance.
    Returns the two as flat vectors."""
    from model import decode, encode_prompts, latent_shape
    from sampler import step_logprob, ddim_rollout, ddim_sample, ddim_transition, guidance_context, guided_output
    cond, uncond = encode_prompts(sd, [prompt]), encode_prompts(sd, [""])
    x_T = torch.randn(n, *latent_shape(sd, resolution), generator=torch.Generator().manual_seed(seed))

    def eta_noise(i):  # the chunk starting at row i draws its eta noise from its own seed: twice the same noise
        return torch.Generator().manual_seed(hash((seed, i)) % 2**63)
    trajectories = []  # (xs (T + 1, b, ...), timesteps, rewards (b,)) per chunk
    for i in range(0, n, chunk):
        b = len(x_T[i:i + chunk])
        xs, _, ts = ddim_rollout(sd, cond.expand(b, -1, -1), uncond.expand(b, -1, -1), x_T[i:i + chunk], steps,
                                 guidance, 1.0, eta_noise(i))
        with torch.no_grad():
            trajectories.append((xs, ts, reward_fn(decode(sd, xs[-1]), [prompt] * b)))
    mean_reward = torch.cat([r for _, _, r in trajectories]).mean()
    score, path = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    for i, (xs, ts, r) in zip(range(0, n, chunk), trajectories):
        b = len(r)
        context = guidance_context(cond.expand(b, -1, -1), uncond.expand(b, -1, -1), guidance, sd.unet.dtype)
        logp = 0  # sum over steps of log p(x_{t-1} | x_t), summed over the latent's dimensions (b,)
        for j, t in enumerate(ts):
            mean, sigma = ddim_transition(sd, guided_output(sd, xs[j], t, context, guidance), xs[j], t, steps, 1.0)
            logp = logp + step_logprob(xs[j + 1], mean, sigma) * xs[j][0].numel()
        for acc, g in zip(score, torch.autograd.grad(((r - mean_reward) * logp).sum() / n, params)):
            acc += g
        latents = ddim_sample(sd, cond.expand(b, -1, -1), uncond.expand(b, -1, -1), x_T[i:i + chunk], steps,
                              guidance, 1.0, generator=eta_noise(i))
        for acc, g in zip(path, torch.autograd.grad(reward_fn(decode(sd, latents), [prompt] * b).sum() / n, params)):
            acc += g
    return torch.cat([g.flatten() for g in score]), torch.cat([g.flatten() for g in path])


def gradients():
    """Print how close each method's gradient estimate from n samples comes to the gradient itself (a pathwise
    estimate from GRADIENT_REF samples), at the first training step, on the tiny model (cheap enough for thousands of
    samples): cosine, and the estimate's norm over the gradient's (noise makes it larger)."""
    from lora import inject_lora
    from model import load_sd
    from rewards import load_reward
    sd = load_sd("tiny")
    torch.manual_seed(0)
    params = inject_lora(sd.unet, rank=4)
    reward_fn = load_reward("compress", "cpu", torch.float32)
    run = lambda n, seed: gradient_estimates(sd, params, reward_fn, "a cat", n, seed, GRADIENT_RES, GRADIENT_STEPS,
                                              1.0)
    _, ref = run(GRADIENT_REF, 0)
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b, 0).item()
    print(f"tiny model, {GRADIENT_RES} px, {GRADIENT_STEPS} DDIM steps at eta 1, no CFG, compress reward; the "
          f"gradient: pathwise from {GRADIENT_REF} samples")
    print("| samples | seed | RL (score function): cosine with the gradient | norm / gradient's | reward backprop "
          "(pathwise): cosine | norm / gradient's |")
    print("|---|---|---|---|---|---|")
    for n in (16, 64, 256, 1024):
        for seed in (1, 2):
            score, path = run(n, seed)
            print(f"| {n} | {seed} | {cos(score, ref):+.2f} | {score.norm() / ref.norm():.1f} | {cos(path, ref):+.2f} "
                  f"| {path.norm() / ref.norm():.2f} |", flush=True)


# -----------------------------------------------------------------------------
# the report


def curves(rows, task, method, setting):
    """{seed: [(queries, minutes, value)]} of one setting, base (queries 0) included."""
    metric = TASKS[task][0]
    base = [r for r in rows if r["task"] == task and r["queries"] == 0]
    out = {}
    for r in rows:
        if (r["task"], r["method"], r["setting"]) == (task, method, setting):
            out.setdefault(r["seed"], [(0, 0.0, base[0][metric])] if base else []).append(
                (r["queries"], r["minutes"], r[metric]))
    return {s: sorted(v) for s, v in out.items()}


def first_reaching(points, target, higher):
    """(queries, minutes) of the first judged stage at which a curve is at or past `target` (no interpolation: a
    stage is the resolution of what was measured); None if it never is."""
    for q, m, v in points[1:]:  # points[0] is the base model
        if (v >= target) if higher else (v <= target):
            return q, m
    return None


def mean_curve(per_seed):
    """Mean over seeds at the stages every seed has (a stopped experiment leaves some seeds part-way: their further
    stages are plotted seed by seed, not averaged): [(queries, minutes, value, lowest, highest)]."""
    common = set.intersection(*[{q for q, _, _ in pts} for pts in per_seed.values()])
    out = []
    for q in sorted(common):
        pts = [next(p for p in pts if p[0] == q) for pts in per_seed.values()]
        vals = [v for _, _, v in pts]
        out.append((q, sum(m for _, m, _ in pts) / len(pts), sum(vals) / len(vals), min(vals), max(vals)))
    return out


def tuned(task, method, model):
    """(setting, flags): the best of `model`'s sweep for this task and method, by the judged metric at SWEEP_BUDGET
    queries (seed 0); None before the sweep has run."""
    metric, higher, _ = TASKS[task]
    swept = [r for r in results(model) if (r["task"], r["method"], r["queries"]) == (task, method, SWEEP_BUDGET)
             and r["setting"] != "main"]
    if not swept:
        return None
    best = (max if higher else min)(swept, key=lambda r: r[metric])["setting"]
    return best, FLOW_SWEEPS[method][best]


def report(model):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = results(model)
    flow = model == "shapes-flow"
    os.makedirs(DOCS, exist_ok=True)
    for task, (metric, higher, _) in TASKS.items():
        seeds = {m: c for m in ("backprop", "rl") if (c := curves(rows, task, m, "main"))}
        main = {m: mean_curve(c) for m, c in seeds.items()}
        if len(main) < 2:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
        for method, colour in (("backprop", "tab:blue"), ("rl", "tab:orange")):
            label = {"backprop": "reward backprop (train.py)",
                     "rl": "RL (ddpo.py, Flow-GRPO's advantages)" if flow else "RL (ddpo.py)"}[method]
            n_seeds = len(seeds[method])
            q, minutes, mean, lo, hi = zip(*main[method])
            for ax, x in zip(axes, (q, minutes)):
                ax.plot(x, mean, "o-", color=colour, ms=3, label=f"{label}, " + (
                    f"mean of {n_seeds} seeds" if n_seeds > 1 else "one seed"))
                ax.fill_between(x, lo, hi, color=colour, alpha=0.2)
            for pts in seeds[method].values():  # each seed, thin: the stages past the common ones show here alone
                sq, sm, sv = zip(*pts)
                for ax, x in zip(axes, (sq, sm)):
                    ax.plot(x, sv, ":", color=colour, lw=0.8, alpha=0.7)
        for ax, xlabel in zip(axes, ("reward queries (images scored)", "training minutes (one CPU thread)")):
            ax.set(xlabel=xlabel, ylabel={"jpeg_kb": "held-out real JPEG size, kB (lower is better)",
                                          "count": "held-out exact count accuracy"}[metric])
            ax.grid(alpha=0.3)
        axes[0].set_xscale("symlog", base=2, linthresh=8)  # the first stages (8, 16, ...) and the last (1024) alike
        axes[0].set_xticks([0, 8, 32, 128, 512, 1024], ["0", "8", "32", "128", "512", "1024"])
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{task}: reward backprop vs RL on the {'rectified-flow ' if flow else ''}shapes model (band: "
                     "lowest to highest seed; dotted: each seed)")
        fig.tight_layout()
        fig.savefig(os.path.join(DOCS, f"rl-vs-backprop-{'flow-' if flow else ''}{task}.png"))
        plt.close(fig)
        rl_final = main["rl"][-1][2]
        print(f"\n{model}, {task}: judged by {metric} ({'higher' if higher else 'lower'} is better); RL's final value "
              f"{rl_final:.4f} at {main['rl'][-1][0]} queries; seeds: " +
              ", ".join(f"{m} {sorted(seeds[m])}" for m in seeds))
        print("| method | queries (all seeds) | final value (each seed) | colour | shape | queries to reach RL's final "
              "(first stage) | minutes | peak MB |")
        print("|---|---|---|---|---|---|---|---|")
        for method in ("backprop", "rl"):
            reach = first_reaching([(q, m, v) for q, m, v, _, _ in main[method]], rl_final, higher)
            last = [r for r in rows if (r["task"], r["method"], r["setting"], r["queries"]) ==
                    (task, method, "main", main[method][-1][0])]
            colour, shape = (sum(r[k] for r in last) / len(last) for k in ("colour", "shape"))
            peak = max(r["peak_mem_mb"] for r in rows if (r["task"], r["method"], r["setting"]) ==
                       (task, method, "main"))
            each = " / ".join(f"{r[metric]:.3f}" for r in sorted(last, key=lambda r: r["seed"]))
            print(f"| {method} | {main[method][-1][0]} | {main[method][-1][2]:.4f} ({each}) | {colour:.3f} | "
                  f"{shape:.3f} | "
                  f"{f'{reach[0]:.0f}' if reach else 'not reached'} | {f'{reach[1]:.1f}' if reach else '-'} | "
                  f"{peak:.0f} |")
    for task, (metric, _, _) in TASKS.items():
        swept = [r for r in rows if r["task"] == task and r["setting"] != "main" and r["queries"] == SWEEP_BUDGET]
        if swept:
            cols = list(dict.fromkeys([metric, "count", "colour", "shape"]))  # count judged: one column
            print(f"\nsweep, {model}, {task}, seed 0, {SWEEP_BUDGET} queries:")
            print(f"| method | setting | {' | '.join(cols)} | minutes |")
            print("|---" * (len(cols) + 3) + "|")
            for r in sorted(swept, key=lambda r: (r["method"], r["setting"])):
                print(f"| {r['method']} | {r['setting']} | {' | '.join(f'{r[c]:.3f}' for c in cols)} | "
                      f"{r['minutes']:.1f} |")


def side_by_side():
    """One table of both models: per task, RL's final value, the queries backprop took to reach it, their ratio."""
    lines = []
    for model in MODELS:
        rows = results(model)
        for task, (metric, higher, _) in TASKS.items():
            main = {m: mean_curve(c) for m in ("backprop", "rl") if (c := curves(rows, task, m, "main"))}
            if len(main) < 2:
                continue
            base = next(r[metric] for r in rows if r["task"] == task and r["queries"] == 0)
            (rl_q, _, rl_final, _, _), (bp_q, _, bp_final, _, _) = main["rl"][-1], main["backprop"][-1]
            reach = first_reaching([(q, m, v) for q, m, v, _, _ in main["backprop"]], rl_final, higher)
            rl_gained = (rl_final > base) if higher else (rl_final < base)
            ratio = ("- (RL ends no better than the base)" if not rl_gained else
                     f"{rl_q / reach[0]:.0f}x fewer" if reach else "not reached")
            lines.append(f"| {model} | {task} ({metric}) | {base:.3f} | {rl_final:.3f} at {rl_q} | {bp_final:.3f} at "
                         f"{bp_q} | {reach[0] if reach else '-'} | {ratio} |")
    if lines:
        print("\nboth models, mean of the seeds (base -> each method's final judged value):")
        print("| model | task | base | RL's final (queries) | backprop's final (queries) | backprop's queries to "
              "reach RL's final | backprop's queries against RL's |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(lines))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS, default="shapes", help="the DDIM shapes model or its rectified-flow "
                   "sibling (default %(default)s)")
    p.add_argument("--task", choices=list(TASKS), default=None, help="one task (default: both)")
    p.add_argument("--method", choices=["backprop", "rl"], default=None, help="one method (default: both); two "
                   "processes, one per method, each with OMP_NUM_THREADS=1, use 2 cores better than one with 2 threads")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of the compared runs")
    p.add_argument("--budget", type=int, default=BUDGET, help=f"reward queries per compared run (default {BUDGET}; "
                   "256 makes one seed of one task ~10 min)")
    p.add_argument("--sweep", action="store_true", help="run the tuning sweeps (seed 0) instead of the comparison")
    p.add_argument("--report", action="store_true", help="only write the plots and print the tables")
    p.add_argument("--gradients", action="store_true", help="only compare the two methods' gradient estimates with "
                   "the gradient itself, on the tiny model (~8 min on one thread)")
    args = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    tasks = [args.task] if args.task else list(TASKS)
    methods = [args.method] if args.method else ["backprop", "rl"]
    if args.gradients:
        gradients()
        sys.exit()
    flow = args.model == "shapes-flow"
    if not args.report:
        for task in tasks:
            base_row(task, args.model)
            if args.sweep:
                for method in methods:
                    for setting, flags in (FLOW_SWEEPS if flow else SWEEPS)[method].items():
                        run_stages(task, method, setting, flags, 0, [SWEEP_BUDGET], args.model)
                continue
            for method in methods:
                note, flags = {}, RUNS[(task, method)]
                if flow:
                    best = tuned(task, method, args.model)
                    if best is None:
                        sys.exit(f"no sweep on {args.model} for {task} {method} yet: run --sweep first")
                    setting, flags = best
                    note = dict(tuned=setting)
                for seed in (int(s) for s in args.seeds.split(",")):
                    run_stages(task, method, "main", flags, seed, [q for q in STAGES if q <= args.budget],
                               args.model, **note)
    report(args.model)
    side_by_side()
