"""Where the gradient enters: which backprop truncation, and which layers, align the shapes model's count.

    python studies/truncation_study.py            # every setting, two at a time (~50 min on 2 cores), then the table
    python studies/truncation_study.py --only drtune:4/attn+conv   # one setting (10 CPU minutes + judging)
    python studies/truncation_study.py --levers   # then the other levers in LEVERS, on the grid's findings
    python studies/truncation_study.py --onestep  # the last lever: a one-step x0 reward from early, 3 seeds (~40 min)
    python studies/truncation_study.py --onestep --model shapes-flow   # the same on the rectified-flow sibling
    python studies/truncation_study.py --report   # the tables, from studies/truncation-study-results.jsonl

Every run is `train.py --model shapes --reward shapes-count` (or --model shapes-flow; reward backprop on the learned
counter, the defaults otherwise) with one --backprop mode and one --lora-targets set, for the same budget of CPU time:
BUDGET_MINUTES of one core (the training process's own user + system time, read from /proc, so that runs sharing the
machine with each other or with anything else get the same compute). When the budget is spent the run gets SIGTERM,
finishes its step and saves (train.py's own signal handling). Its LoRA is then judged by describe() on the held-out
prompts (JUDGE_N samples, fixed seeds, the runs' DDIM steps): count, colour and shape accuracy; the counter's reward on
the same images; and how often the counter's rounded count agrees with describe()'s - a counter fooled by the run's
images (reward hacking) shows there first. Each judged run is a line of studies/truncation-study-results.jsonl
(committed: docs/shapes.md's table is --report's output). A stopped study continues: judged runs are skipped, a run in
progress resumes from its last checkpoint with the CPU time it had used (out/truncation-study/<setting>/cpu_seconds).

Modes (sampler.py): all = full backprop (AlignProp); 1 = the last step only (DRaFT-1); 1,T = K drawn per micro-batch
(AlignProp's randomised truncation); drtune:N = DRTune (Wu et al. 2024, arXiv:2405.00760): every step passes the
gradient on through DDIM's linear term, N evenly spaced steps train the UNet. Targets (lora.py): attn = the attention
projections (the default for Stable Diffusion), attn+conv = also the ResNet blocks' 3x3 convolutions, the layers that
work at every resolution, where layout is decided. onestep:lo,hi = Direct-Align / SRPO's one-step reward (Shen et al.
2025, arXiv:2509.06942): the chain without gradients, the sample re-noised to a level drawn in lo..hi, one call with
gradients and its clean prediction scored: with lo,hi early in the chain (ONESTEP) the gradient reaches the noisy
times where the layout, and so the count, is decided. --model shapes-flow runs on the rectified-flow sibling (its
rows carry "model"; a row without it is the DDIM model's).
"""
import argparse
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: studies/..
sys.path.insert(0, ROOT)  # run as python studies/<this file>: the project's modules live one level up
OUT = os.path.join(ROOT, "out", "truncation-study")
RESULTS = os.path.join(ROOT, "studies", "truncation-study-results.jsonl")
EVAL_PROMPTS = os.path.join(ROOT, "prompts", "shapes-eval.txt")
BUDGET_MINUTES = 10  # CPU minutes of one core per run
DDIM_STEPS = 20  # train.py's default, in training and judging
JUDGE_N, JUDGE_GUIDANCE, JUDGE_SEED = 256, 7.5, 0
MODES = ("all", "1", f"1,{DDIM_STEPS}", "drtune:4")
TARGETS = ("attn", "attn+conv")
LEVERS = [  # (name, mode, targets, more train.py flags): runs once the grid was measured (README), in this order;
    # the two seed-1 runs are measured, the other two not yet
    ("seed 1", f"1,{DDIM_STEPS}", "attn+conv", ["--seed", "1"]),  # the grid's best again: is its lead the draw?
    ("seed 1", "all", "attn", ["--seed", "1"]),  # the runner-up again
    ("lr 3e-4", "drtune:4", "attn", ["--lr", "3e-4"]),  # DRTune's training reward fell at lr 1e-3: too fast?
    ("guidance 3 in training", "all", "attn", ["--guidance", "3"]),  # a weaker prompt pull while training
]
# The one-step lever (--onestep): the noise level drawn per micro-batch in the chain's first half, where the counter's
# gradient can still add or remove a shape; three seeds, since one setting's runs spread 5-6 points on this budget
ONESTEP_MODE, ONESTEP_TARGETS, ONESTEP_SEEDS = "onestep:0.5,0.9", "attn", (0, 1, 2)
MODELS = ("shapes", "shapes-flow")  # the DDIM model and its rectified-flow sibling (the shapes package)
COMMON = ["--reward", "shapes-count", "--ddim-steps", str(DDIM_STEPS), "--steps", "100000",
          "--save-every", "5", "--eval-every", "0", "--eval-n", "4",  # --steps: the budget stops the run, not this
          "--keep-activations", "0"]  # every step recomputed, as the committed results were measured: train.py's
# default since, auto, keeps activations where memory allows, which buys the modes with more steps with gradients
# more steps per CPU minute (full backprop the most), so it would be a different study
ENV = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")  # one core per process
lock = threading.Lock()


def results(model):
    """The judged rows of one model (a row without "model" is the DDIM shapes model's)."""
    if not os.path.isfile(RESULTS):
        return []
    with open(RESULTS) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if r.get("model", "shapes") == model]


def tagged(model):
    """The "model" field of a row: absent for the DDIM shapes model (every row before the flow model had none)."""
    return {"model": model} if model != "shapes" else {}


def record(row):
    with lock, open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")


def cpu_seconds(pid):
    """User + system CPU time of a running process, from /proc/<pid>/stat (fields 14 and 15, in clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def judge_in_child(lora, model):
    """Run --judge in a fresh one-thread process (so that a judge never slows a training run's clock) -> its row."""
    proc = subprocess.run([sys.executable, __file__, "--judge", lora or "base", "--model", model], cwd=ROOT, env=ENV,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"judging {lora} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(model, mode, targets, lever="", extra=()):
    """Train one setting for BUDGET_MINUTES of CPU (resuming a stopped run with the time it had used), judge it."""
    name = f"{mode}/{targets}" + (f"/{lever}" if lever else "")
    folder = "".join(c if c.isalnum() else "_" for c in name)
    out = os.path.join(OUT, *(["flow"] if model == "shapes-flow" else []), folder)
    spent_file = os.path.join(out, "cpu_seconds")
    spent = float(open(spent_file).read()) if os.path.isfile(spent_file) else 0.0
    if os.path.isfile(os.path.join(out, "checkpoint.pt")):
        cmd = ["train.py", "--resume", out]
    else:
        cmd = ["train.py", "--out", out, "--model", model, *COMMON, "--backprop", mode, "--lora-targets", targets,
               *extra]
    print(f"[{name}] python {' '.join(cmd)} ({spent / 60:.1f} CPU minutes spent before)", flush=True)
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    used, stopped = 0.0, False
    while proc.poll() is None:
        time.sleep(2)
        try:
            used = cpu_seconds(proc.pid)
        except OSError:  # it has just exited
            break
        if os.path.isdir(out):
            with open(spent_file, "w") as f:  # what a restarted study starts from (a stop loses <= 5 steps)
                f.write(str(spent + used))
        if not stopped and spent + used >= BUDGET_MINUTES * 60:
            proc.send_signal(signal.SIGTERM)  # train.py finishes the step and saves
            stopped = True
    err = proc.stderr.read()
    if proc.returncode not in (0, 143):
        raise RuntimeError(f"[{name}] train.py failed ({proc.returncode}):\n{err[-2000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        m = [json.loads(line) for line in f]
    row = dict(**tagged(model), mode=mode, targets=targets, lever=lever,
               steps=len(m), images=m[-1]["images_seen"],
               cpu_minutes=(spent + used) / 60,
               train_reward_first=sum(x["reward_mean"] for x in m[:10]) / len(m[:10]),
               train_reward_last=sum(x["reward_mean"] for x in m[-10:]) / len(m[-10:]),
               **judge_in_child(os.path.join(out, "lora.safetensors"), model), wall_minutes=(time.time() - t0) / 60)
    record(row)
    print(f"[{name}] {row['steps']} steps: count {row['count']:.3f} colour {row['colour']:.3f} shape "
          f"{row['shape']:.3f}, counter agrees {row['agreement']:.3f}", flush=True)


def judge(lora, model):
    """describe()'s accuracies of held-out samples (with the LoRA, or of the base model), the counter's reward on
    them, and the fraction where the counter's rounded count equals describe()'s."""
    import torch
    from lora import load_lora
    from model import load_sd
    from rewards import load_shapes_count
    from shapes.evaluate import evaluate
    from shapes.world import describe
    sd = load_sd(model)  # sd.unet: the UNet, or on the flow model its transformer
    if lora != "base":
        load_lora(sd.unet, lora)
    reward = load_shapes_count("cpu", torch.float32)
    with open(EVAL_PROMPTS) as f:
        prompts = [line.strip() for line in f if line.strip()]
    scores, images = evaluate(sd, prompts, n=JUDGE_N, steps=DDIM_STEPS, guidance=JUDGE_GUIDANCE, seed=JUDGE_SEED,
                              reward_fn=reward)
    with torch.no_grad():
        counted = reward.counter(images).round()
    read = torch.tensor([d["count"] for d in describe(images)], dtype=counted.dtype)
    return dict(scores, agreement=(counted == read).float().mean().item())


def report(model):
    rows = results(model)
    if not rows:
        return
    base = [r for r in rows if r["mode"] == "base"]
    sampler = "Euler" if model == "shapes-flow" else "DDIM"
    print(f"{model} model, reward backprop on shapes-count, {BUDGET_MINUTES} CPU minutes per run; judged by describe() "
          f"on {JUDGE_N} held-out samples ({DDIM_STEPS} {sampler} steps, guidance {JUDGE_GUIDANCE}):")
    print("| backprop | LoRA on | other | steps | training reward, first -> last 10 steps | count | colour | shape | "
          "all | counter's reward | counter agrees |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in base + sorted((r for r in rows if r["mode"] != "base"), key=lambda r: -r["count"]):
        trained = f"{r['train_reward_first']:.3f} -> {r['train_reward_last']:.3f}" if r["steps"] else ""
        print(f"| {r['mode']} | {r['targets']} | {r.get('lever', '')} | {r['steps']} | {trained} | {r['count']:.3f} | "
              f"{r['colour']:.3f} | {r['shape']:.3f} | {r['all']:.3f} | {r['reward']:.3f} | {r['agreement']:.3f} |")
    seeds = {}  # a setting run on several seeds (the grid's row is seed 0; a lever "seed N" reruns it): their mean
    for r in rows:
        if r["mode"] != "base" and (r.get("lever", "") == "" or r["lever"].startswith("seed ")):
            seeds.setdefault((r["mode"], r["targets"]), []).append(r)
    for (mode, targets), rs in seeds.items():
        if len(rs) > 1:
            counts = [r["count"] for r in rs]
            print(f"{mode} on {targets}, {len(rs)} seeds: count {sum(counts) / len(counts):.3f} "
                  f"({min(counts):.3f} to {max(counts):.3f}), all {sum(r['all'] for r in rs) / len(rs):.3f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS, default="shapes", help="the DDIM shapes model or its rectified-flow "
                   "sibling (default %(default)s)")
    p.add_argument("--only", default=None, help="one setting, MODE/TARGETS (e.g. drtune:4/attn+conv)")
    p.add_argument("--levers", action="store_true", help="run the LEVERS instead of the grid")
    p.add_argument("--onestep", action="store_true", help=f"run {ONESTEP_MODE} on {ONESTEP_TARGETS}, seeds "
                   f"{ONESTEP_SEEDS}, instead of the grid")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time, one core each")
    p.add_argument("--report", action="store_true", help="only print the tables")
    p.add_argument("--judge", default=None, help=argparse.SUPPRESS)  # a LoRA file or "base": one judged row, in a child
    args = p.parse_args()
    if args.judge:
        import torch
        torch.set_num_threads(1)
        print(json.dumps(judge(args.judge, args.model)))
        sys.exit()
    if not args.report:
        os.makedirs(OUT, exist_ok=True)
        done = {(r["mode"], r["targets"], r.get("lever", "")) for r in results(args.model)}
        if ("base", "-", "") not in done:
            record(dict(**tagged(args.model), mode="base", targets="-", steps=0, images=0, cpu_minutes=0.0,
                        **judge_in_child(None, args.model)))
        if args.onestep:
            settings = [(ONESTEP_MODE, ONESTEP_TARGETS, f"seed {s}", ["--seed", str(s)]) for s in ONESTEP_SEEDS]
        elif args.levers:
            settings = [(m, t, name, extra) for name, m, t, extra in LEVERS]
        else:
            grid = [tuple(args.only.split("/", 1))] if args.only else [(m, t) for t in TARGETS for m in MODES]
            settings = [(m, t, "", ()) for m, t in grid]
        with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
            for future in [pool.submit(run, args.model, *s) for s in settings if s[:3] not in done]:
                future.result()
    for model in MODELS:
        report(model)
