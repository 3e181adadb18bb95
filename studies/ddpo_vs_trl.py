"""Is ddpo.py as strong as the best packaged RL? ddpo.py against TRL 0.23.1's DDPOTrainer on the shapes model, paired
seeds, the same settings, judged alike: the held-out real JPEG size of 64 samples in a stock diffusers pipeline
(../shared/peers/trl/jpeg_eval.py, the harness's own judge; our LoRA loaded with load_lora_weights).

    python studies/ddpo_vs_trl.py --trl-python /tmp/trl/bin/python    # runs what is missing, one line per run
                                                                        # (one at a time: TRL's harness takes 2 threads)
    python studies/ddpo_vs_trl.py --report                              # the table, from the results file

Settings (the issue's): 20 DDIM steps, eta 1, CFG 7.5, rounds of 32 images, 8 images per optimisation step, lr 3e-3,
PPO clip 1e-2, per-prompt statistics (buffer 16), LoRA rank 4 on the attention layers, prompts/shapes.txt, one thread
per run. Arms: trl (../shared/peers/trl/run_ddpo.py), ours (ddpo.py as it is), ours-lr1e-2 (a larger step), and in the
results ours-gaussian, TRL's PEFT init of the LoRA down matrices (the one difference reading the two trainers found),
run with a ddpo.py flag removed after its verdict: it did not help (docs/rl-vs-backprop.md). Each finished run is one line of studies/ddpo-vs-trl-results.jsonl; a stopped
study starts again at the first missing (arm, seed), and an interrupted ddpo.py run resumes from its checkpoint.
TRL's venv (it brings accelerate and peft, which the project does not depend on): ../shared/peers/trl/README.md.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.join(os.path.dirname(ROOT), "shared", "peers", "trl")
RESULTS = os.path.join(ROOT, "studies", "ddpo-vs-trl-results.jsonl")
MODEL = os.path.join(ROOT, "models", "shapes")
PROMPTS = os.path.join(ROOT, "prompts", "shapes.txt")
EVAL_PROMPTS = os.path.join(ROOT, "prompts", "shapes-eval.txt")
ROUND, STEPS, GUIDANCE, LR, CLIP = 32, 20, 7.5, 3e-3, 1e-2
ARMS = {"trl": [], "ours": [], "ours-lr1e-2": ["--lr", "1e-2"]}

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--seeds", default="0,1,2,3", help="paired seeds, comma-separated")
p.add_argument("--queries", type=int, default=512, help="reward queries per run (a multiple of 32)")
p.add_argument("--arms", default=",".join(ARMS), help=f"which of {', '.join(ARMS)}")
p.add_argument("--trl-python", default="/tmp/trl/bin/python", help="the python of TRL's venv")
p.add_argument("--work", default=os.path.join(ROOT, "out", "ddpo-vs-trl"), help="run directories")
p.add_argument("--results", default=RESULTS, help="the results file (JSON lines)")
p.add_argument("--report", action="store_true", help="print the table from the results file and stop")
args = p.parse_args()
if args.queries % ROUND:
    p.error(f"--queries must be a multiple of {ROUND}, got {args.queries}")
arms = args.arms.split(",")
if set(arms) - set(ARMS):
    p.error(f"--arms: unknown {sorted(set(arms) - set(ARMS))}; expected some of {', '.join(ARMS)}")
seeds = [int(s) for s in args.seeds.split(",")]
env = dict(os.environ, OMP_NUM_THREADS="1")


def results():
    if not os.path.isfile(args.results):
        return []
    with open(args.results) as f:
        return [json.loads(line) for line in f if line.strip()]


def judge(lora):
    """Held-out real JPEG kB of the shapes model with `lora` (None: the base model), by the harness's judge."""
    sys.path.insert(0, PEERS)
    import torch
    from diffusers import StableDiffusionPipeline
    from jpeg_eval import held_out
    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False,
                                                   torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if lora:
        pipe.load_lora_weights(lora)
    with open(EVAL_PROMPTS) as f:
        prompts = [line.strip() for line in f if line.strip()]
    return held_out(pipe, prompts, n=64, steps=STEPS, guidance=GUIDANCE)


def run(arm, seed):
    """One run to args.queries reward queries: its result line."""
    rounds = args.queries // ROUND
    if arm == "trl":
        proc = subprocess.run([args.trl_python, os.path.join(PEERS, "run_ddpo.py"), "--model", MODEL, "--prompts",
                               PROMPTS, "--eval-prompts", EVAL_PROMPTS, "--epochs", str(rounds), "--per-epoch",
                               str(ROUND), "--lr", str(LR), "--clip", str(CLIP), "--steps", str(STEPS), "--seed",
                               str(seed)], capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"trl seed {seed} failed:\n{proc.stderr[-2000:]}")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        return dict(arm=arm, seed=seed, queries=args.queries, kb_before=out["heldout_kb_before"],
                    kb_after=out["heldout_kb_after"], train_s=out["train_s"])
    out = os.path.join(args.work, f"{arm}-seed{seed}-q{args.queries}")
    flags = (["--resume", out] if os.path.isfile(os.path.join(out, "checkpoint.pt")) else
             ["--out", out, "--model", "shapes", "--reward", "jpeg", "--prompts", PROMPTS, "--eval-prompts",
              EVAL_PROMPTS, "--steps", str(rounds), "--samples-per-step", str(ROUND), "--batch-size", "8",
              "--grad-accum", "1", "--lr", str(LR), "--clip-range", str(CLIP), "--sample-steps", str(STEPS),
              "--guidance", str(GUIDANCE), "--eta", "1", "--stat-buffer", "16", "--seed", str(seed), "--save-every",
              "1", "--eval-every", "0", *ARMS[arm]])
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "ddpo.py"), *flags], capture_output=True, text=True,
                          env=env)
    if proc.returncode:
        sys.exit(f"{arm} seed {seed} failed:\n{proc.stderr[-2000:]}")
    seconds = sum(json.loads(line)["seconds"] for line in open(os.path.join(out, "metrics.jsonl")) if line.strip())
    return dict(arm=arm, seed=seed, queries=args.queries, kb_before=base_kb,
                kb_after=judge(os.path.join(out, "lora.safetensors")), train_s=round(seconds, 1))


def report(rows):
    print(f"{'arm':>14} {'seeds':>5} {'queries':>7} {'held-out kB change, each seed':>40} {'mean':>7}")
    for arm in dict.fromkeys(r["arm"] for r in rows):  # the removed arm's rows included
        mine = sorted((r for r in rows if r["arm"] == arm), key=lambda r: (r["queries"], r["seed"]))
        for q in sorted({r["queries"] for r in mine}):
            change = [100 * (r["kb_after"] / r["kb_before"] - 1) for r in mine if r["queries"] == q]
            each = " ".join(f"{c:+.1f}%" for c in change)
            print(f"{arm:>14} {len(change):>5} {q:>7} {each:>40} {statistics.mean(change):>+6.1f}%")


if args.report:
    report(results())
    sys.exit(0)
done = {(r["arm"], r["seed"], r["queries"]) for r in results()}
base_kb = next((r["kb_before"] for r in results() if r["arm"] != "trl"), None)
for seed in seeds:  # seed-major: every arm of a seed before the next seed, so that a stop leaves paired results
    for arm in arms:
        if (arm, seed, args.queries) in done:
            continue
        if arm != "trl" and base_kb is None:
            base_kb = judge(None)
        row = run(arm, seed)
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
report(results())
