"""A training run's plumbing, shared by train.py (reward backprop) and ddpo.py (reinforcement learning), so that each
script keeps only its own loop: the run directory, checkpoints and --resume, signals, torchrun, the log and its plot.

    args = resume_args(parser, args)            # --resume DIR: its config.json's flags become the defaults
    device_type, device = machine_defaults(args)   # fills --model, --prompts, --eval-prompts, --dtype
    prompts, eval_prompts = run_prompts(args)   # read and checked; bad input ends in one line, exit 2 (die)
    check_numbers(args, at_least_1=("steps",), above_0=("lr",))   # a flag out of range or NaN: one line, exit 2
    targets = lora_targets(args.lora_targets)   # "attn+conv" -> layer names; a bad name: one line, exit 2
    sd, shape, reward_fn = load_model_and_reward(args, device)
    params = inject_adapters(sd.unet, args.lora_rank, targets)   # LoRA in fp32; no such layer: one line, exit 2
    refuse_overwrite(out, args.resume); write_config(out, config)
    save_checkpoint(out, unet, params, opt, scaler, rng, step=...)   # checkpoint.pt + lora.safetensors, atomically
    state = load_checkpoint(out, unet, opt, scaler, rng, lr)   # all restored; metrics.jsonl cut to state["step"]
    log_metrics(out, dict(step=..., reward_mean=...))   # a line of metrics.jsonl
    plot_rewards(out, title, eval_before)       # reward.png: training and held-out reward against steps
    keep, per_step = activations_to_keep(sd, cond, uncond, noise, steps, guidance, eta, backprop,
                                         peak_memory("cuda"), memory_budget(gb, "cuda"))   # --keep-activations auto

A run directory holds config.json (the flags of the latest start), metrics.jsonl (one JSON line per step),
checkpoint.pt (for --resume), lora.safetensors (loads in diffusers), samples/ (eval grids) and reward.png.

Under torchrun (RANK in the environment) every process runs the same script on its share of each batch: rank 0 alone
prints and writes; average_gradients averages the LoRA gradients in one all-reduce; save_checkpoint checks that
every rank holds the same weights; agree() makes a decision that one rank took (a signal) everyone's.
"""
import json
import math
import os
import resource
import shutil
import signal
import sys
import tempfile

import torch
import torch.distributed as dist

from flow import flow_step_activation_bytes
from lora import inject_lora, parse_targets, save_lora
from model import (DEFAULT_MODEL, SHAPES_DIR, SHAPES_FLOW_DIR, ModelLoadError, latent_shape, load_sd,
                   native_resolution, pixel_multiple)
from rewards import RewardLoadError, check_prompts, load_reward, parse_reward_spec
from sampler import step_activation_bytes, steps_with_gradient

PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# -----------------------------------------------------------------------------
# processes


def is_master():  # rank 0 writes; read from the environment, so it holds before the process group exists
    return int(os.environ.get("RANK", "0")) == 0


def info(*msg):
    if is_master():
        print(*msg)


def die(msg):
    """Bad input: one line, exit status 2, no traceback (every rank sees the same input and stops)."""
    if is_master():
        print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def check_numbers(args, at_least_1=(), at_least_0=(), above_0=(), finite=()):
    """Each named flag in its range, else one line and exit 2 (die). NaN and inf never pass (argparse's type=float
    takes "nan" and "inf", and such a value would otherwise surface as a traceback from the optimiser or the sampler);
    `finite` names the flags that may be any finite number. A flag left at None (a default filled in later) passes."""
    rules = ((at_least_1, lambda v: v >= 1, " >= 1"), (at_least_0, lambda v: v >= 0, " >= 0"),
             (above_0, lambda v: v > 0, " > 0"), (finite, lambda v: True, ""))
    for names, in_range, bound in rules:
        for name in names:
            value = getattr(args, name)
            if value is not None and not (math.isfinite(value) and in_range(value)):
                kind = "a finite number" if isinstance(value, float) else "an integer"
                die(f"--{name.replace('_', '-')} must be {kind}{bound}, got {value}")


def is_shapes(model):
    """--model names one of the shapes models ("shapes", "shapes-flow" or their directories)."""
    return model in ("shapes", "shapes-flow") or os.path.realpath(model) in map(os.path.realpath,
                                                                                (SHAPES_DIR, SHAPES_FLOW_DIR))


def warn_unknown_words(model, prompts):
    """The shapes models know their grammar's words only ("three red circles"): say up front which words of the
    prompts they have never seen, since they draw them without a word of complaint (an orange square for "a cat")."""
    if not is_shapes(model):
        return
    from shapes import COLOURS, SHAPES, unknown_words
    words = unknown_words(prompts)
    if words and is_master():
        print(f"warning: the shapes model has never seen the words {', '.join(map(repr, words[:8]))}"
              f"{' ...' if len(words) > 8 else ''}; it knows captions such as 'three red circles' (a, two, three, "
              f"four; {', '.join(COLOURS)}; {', '.join(SHAPES)}), and draws other words as if they were not there",
              file=sys.stderr)


def start_processes():
    """(ddp, rank, world): under torchrun, join the process group (NCCL on GPUs, else gloo); else one process."""
    if "RANK" not in os.environ:
        return False, 0, 1
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return True, dist.get_rank(), dist.get_world_size()


def gather(t):
    """This rank's values (n,) -> every rank's (world * n,), in rank order, for the log."""
    if not dist.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts)


def average_gradients(params):
    """Average the gradients over ranks: one all-reduce of one flat buffer (gloo has no average: sum, then divide)."""
    if not dist.is_initialized():
        return
    grads = [p.grad for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    for g, avg in zip(grads, (flat / dist.get_world_size()).split([g.numel() for g in grads])):
        g.copy_(avg.view_as(g))


def agree(flag, device):
    """True on every rank if it is True on any: a signal may reach the ranks at different steps."""
    flag = torch.tensor(float(bool(flag)), device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


def _weights_in_sync(params):  # max |difference| between this rank's LoRA weights and rank 0's, over all ranks
    flat = torch.cat([p.detach().flatten() for p in params])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


# -----------------------------------------------------------------------------
# the run directory


def resume_args(parser, args):
    """With --resume DIR, DIR's saved flags become the parser's defaults (flags on this command line still win) and
    --out is DIR; without it, args as they are."""
    if not args.resume:
        return args
    cfg_path = os.path.join(args.resume, "config.json")
    if not os.path.isfile(os.path.join(args.resume, "checkpoint.pt")) or not os.path.isfile(cfg_path):
        die(f"--resume {args.resume}: no checkpoint.pt and config.json there")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        die(f"{cfg_path} is damaged or not a config of this project ({e})")
    # the other script's run: its flags would make this one refuse them one by one (ddpo.py: "--eta must be > 0")
    script, other = os.path.basename(parser.prog), run_script(cfg)
    if script in SCRIPTS and other != script:
        die(f"{args.resume} is a {other} run ({SCRIPTS[other]}), not a {script} run; continue it with python {other} "
            f"--resume {args.resume}")
    read_checkpoint(args.resume)  # damaged: one line now, before the model loads and anything is written
    for old, new in RENAMED.items():  # a run saved before a flag's rename: its value under the new name
        if old in cfg:
            cfg.setdefault(new, cfg.pop(old))
    parser.set_defaults(**{k: v for k, v in cfg.items() if k in vars(args)})
    args = parser.parse_args()
    args.out = args.resume
    return args


RENAMED = {"ddim_steps": "sample_steps"}  # config.json keys of older runs -> today's (--ddim-steps is an alias)
SCRIPTS = {"train.py": "reward backprop", "ddpo.py": "reinforcement learning"}


def run_script(cfg):
    """The script whose run a config.json describes: its "script" field; a run from before that field by a flag that
    only ddpo.py has."""
    return cfg.get("script") or ("ddpo.py" if "samples_per_step" in cfg else "train.py")


def check_out(out):
    """--out must be a directory this process can write in, or one it can create: else one line, exit 2, before any
    work. Returns the first directory a run would create on the way to `out` (None: `out` exists), for undo_start."""
    path, made = os.path.abspath(out), None
    while not os.path.lexists(path):  # up to the first part of the path that exists
        path, made = os.path.dirname(path), path
    if not os.path.isdir(path):
        die(f"--out {out}: {'it' if made is None else path} is a file, not a directory")
    check_writable("--out", out, path)
    return made


def check_writable(flag, value, directory):
    """One line, exit 2, unless this process can create a file in `directory`. Tried, not asked: os.access says yes
    to root on a read-only mount or in /sys; the probe file is removed at once."""
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        die(f"{flag} {value}: cannot write in {directory} ({e.strerror})")


def start_snapshot(out, made):
    """What undo_start needs to put `out` back as it was before this start: the first directory the start creates
    (check_out), else the names in `out` and the bytes of the files a start rewrites."""
    if made is not None or not os.path.isdir(out):
        return dict(made=made)
    files = {}
    for name in ("config.json", "metrics.jsonl"):
        if os.path.isfile(os.path.join(out, name)):
            with open(os.path.join(out, name), "rb") as f:
                files[name] = f.read()
    return dict(made=None, names=set(os.listdir(out)), files=files)


def undo_start(out, snapshot):
    """A start that failed before its first step leaves the disk as it found it: what it made is removed, the files
    it rewrote are put back."""
    if not is_master():
        return
    if snapshot["made"] is not None:
        shutil.rmtree(snapshot["made"], ignore_errors=True)
        return
    for name in set(os.listdir(out)) - snapshot["names"]:
        path = os.path.join(out, name)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    for name, data in snapshot["files"].items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


def is_out_of_memory(e):
    """The allocator's error: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def device_memory(device_type):
    """Bytes of memory on the device: the GPU's, or the machine's RAM."""
    if device_type == "cuda":
        return torch.cuda.mem_get_info()[1]
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_batch_fits(flag, need, device_type, advice):
    """Refuse, before any work, a batch whose tensors alone (`need` bytes: the caller counts its latents and decoded
    images, a lower bound, since the UNet's activations come on top) exceed the device's memory: one line, exit 2,
    rather than the allocator's error after the model has loaded and the first eval has run."""
    have = device_memory(device_type)
    if need > have:
        die(f"{flag} does not fit in memory: its latents and images alone take {need / 2**30:,.1f} GB, and this "
            f"{'GPU' if device_type == 'cuda' else 'machine'} has {have / 2**30:,.1f} GB; {advice}")


def machine_defaults(args):
    """Fill the flags whose default depends on the machine and the reward: --model (SD 1.5 on CUDA, else the shapes
    model), --prompts / --eval-prompts (the shapes, count or animal prompts), --dtype (bf16 on CUDA, fp32 on a CPU).
    Returns (device_type, device)."""
    try:
        names = [name for name, _ in parse_reward_spec(args.reward)]
    except ValueError as e:
        die(str(e))
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if args.model is None:
        args.model = DEFAULT_MODEL if device_type == "cuda" else "shapes"
        if device_type == "cpu":
            info("no CUDA GPU: using --model shapes (coloured shapes, 64 px); full-size SD would take hours here")
    prompt_set = os.path.join(PROMPTS, "shapes" if is_shapes(args.model) else "count" if "count" in names
                              else "animals")
    args.prompts = args.prompts or prompt_set + ".txt"
    args.eval_prompts = args.eval_prompts or prompt_set + "-eval.txt"
    if args.dtype is None:
        args.dtype = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device_type == "cuda" else "fp32"
    if args.dtype == "fp16" and device_type == "cpu":
        die("--dtype fp16 needs a CUDA GPU; use fp32 or bf16 on a CPU")
    return device_type, f"cuda:{torch.cuda.current_device()}" if device_type == "cuda" else "cpu"


def run_prompts(args):
    """(training prompts, held-out prompts) from --prompts and --eval-prompts, each checked against the reward (the
    count rewards need a count in every prompt)."""
    texts = []
    for name, path in (("--prompts", args.prompts), ("--eval-prompts", args.eval_prompts)):
        texts.append(read_prompts(name, path))
        try:
            check_prompts(args.reward, texts[-1])
        except ValueError as e:
            die(f"{name} {path}: {e} (the count rewards need one in every prompt)")
    warn_unknown_words(args.model, texts[0] + texts[1])
    return texts


def load_model_and_reward(args, device):
    """(sd, latent shape (4, h, w), reward_fn): the frozen model in the run's dtype (half the memory in bf16/fp16),
    --resolution checked against the VAE's factor, and the reward (.components: each reward of a mix, for the log)."""
    dtype = DTYPES[args.dtype]
    try:
        sd = load_sd(args.model, device, dtype)
    except ModelLoadError as e:
        die(str(e))
    factor = pixel_multiple(sd)
    if args.resolution % factor:
        die(f"--resolution {args.resolution} is not divisible by {factor} (the VAE's downsampling factor"
            + (", times FLUX's 2x2 packing)" if sd.flux else ")"))
    try:
        reward_fn = load_reward(args.reward, device, dtype)
    except RewardLoadError as e:
        die(str(e))
    return sd, latent_shape(sd, args.resolution or native_resolution(sd)), reward_fn


GUIDANCE = {"ddim": 7.5, "sd3": 7.0, "flux": 3.5}  # --guidance's default: AlignProp's CFG scale for SD 1.x / 2.x / XL;
# StableDiffusion3Pipeline's CFG scale and FluxPipeline's guidance embedding (FLUX.1-dev), each pipeline's default


def family(sd):
    """"flux", "sd3" (rectified flow: flow.py samples them) or "ddim" (SD 1.x, 2.x, XL: sampler.py)."""
    return "flux" if sd.flux else "sd3" if sd.flow else "ddim"


def sampling_defaults(args, sd, eta_default=None):
    """Fill --guidance (None: GUIDANCE for this model's family) and --eta (None: `eta_default`, a dict by family: DDIM's
    eta, or on a flow model the noise level of Flow-GRPO's SDE, 0 = the ODE) once the model is loaded."""
    if args.guidance is None:
        args.guidance = GUIDANCE[family(sd)]
    if args.eta is None:
        args.eta = eta_default["flow" if sd.flow else "ddim"]


def lora_targets(text):
    """--lora-targets -> the layer names inject_lora takes (lora.parse_targets); bad syntax: one line, exit 2."""
    try:
        return parse_targets(text)
    except ValueError as e:
        die(f"--lora-targets {e}")


def inject_adapters(unet, rank, targets, init="kaiming"):
    """inject_lora with the LoRA weights in fp32 (whatever the frozen model's dtype); a target that names no layer of
    this model: one line, exit 2. Returns the trainable parameters."""
    try:
        return inject_lora(unet, rank=rank, targets=targets, dtype=torch.float32, init=init)
    except ValueError as e:
        die(f"--lora-targets {e}")


def read_prompts(flag, path):
    """The non-empty lines of a prompt file; a missing or empty file is a one-line error naming the flag."""
    if not os.path.isfile(path):
        die(f"{flag} {path}: no such file")
    try:
        with open(path) as f:
            lines = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as e:
        die(f"{flag} {path}: not a text file ({e.reason} at byte {e.start}); prompts are lines of UTF-8 text")
    if not lines:
        die(f"{flag} {path}: the file has no prompts")
    return lines


def refuse_overwrite(out, resume):
    if not resume and os.path.isfile(os.path.join(out, "checkpoint.pt")):
        die(f"{out} already holds a run: continue it with --resume {out}, or pick another --out")
    if dist.is_initialized():
        dist.barrier()  # every rank has checked the output directory before rank 0 writes to it


def write_config(out, config):
    if is_master():
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(config, f, indent=2)


def atomic_save(save, path):  # a crash mid-write leaves the previous file intact
    save(path + ".tmp")
    os.replace(path + ".tmp", path)


def save_checkpoint(out, unet, params, opt, scaler, rng, **state):
    """checkpoint.pt (the LoRA tensors, the optimiser, the grad scaler, the run's generator and torch's RNG, and
    `state`: step, ...) and lora.safetensors. Call it on every rank: under torchrun it first checks that all ranks
    hold the same weights, then rank 0 writes."""
    if dist.is_initialized() and _weights_in_sync(params) != 0:  # cheap insurance against a broken all-reduce
        die(f"the LoRA weights differ between ranks at step {state.get('step')}: the gradient all-reduce is broken")
    if not is_master():
        return
    state.update(lora={n: p.detach() for n, p in unet.named_parameters() if p.requires_grad}, opt=opt.state_dict(),
                 scaler=scaler.state_dict(), rng=rng.get_state(), torch_rng=torch.get_rng_state())
    atomic_save(lambda path: torch.save(state, path), os.path.join(out, "checkpoint.pt"))
    atomic_save(lambda path: save_lora(unet, path), os.path.join(out, "lora.safetensors"))


CHECKPOINT_KEYS = {"step", "eval_before", "lora", "opt", "scaler", "rng", "torch_rng"}  # what save_checkpoint writes


def read_checkpoint(out):
    """checkpoint.pt's state; a truncated file, or one that is not a checkpoint of this project: one line, exit 2
    (torch's own error suggests weights_only=False, the wrong advice for a damaged file)."""
    path = os.path.join(out, "checkpoint.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a pickle of other objects, not a torch file: each raises differently
        reason = f"torch.load: {type(e).__name__}: {str(e).strip().split('. ')[0]}"  # a first line, not torch's essay
        if "Weights only load failed" in reason:
            reason = "it holds Python objects besides tensors"
        die(f"{path} is damaged or not a checkpoint of this project ({reason})")
    missing = CHECKPOINT_KEYS - set(state) if isinstance(state, dict) else CHECKPOINT_KEYS
    if missing:
        die(f"{path} is damaged or not a checkpoint of this project (it has no {', '.join(sorted(missing))})")
    return state


def load_checkpoint(out, unet, opt, scaler, rng, lr):
    """Restore what save_checkpoint saved into `unet`, `opt` (with this run's `lr`, which wins over the saved one),
    `scaler`, `rng` and torch's RNG; return the rest of the state (step, ...). metrics.jsonl keeps only the lines of
    the steps up to the checkpoint (a killed run logged steps it did not save)."""
    state = read_checkpoint(out)
    named = dict(unet.named_parameters())
    with torch.no_grad():
        for n, v in state.pop("lora").items():
            named[n].copy_(v)
    opt.load_state_dict(state.pop("opt"))
    for group in opt.param_groups:
        group["lr"] = lr
    scaler.load_state_dict(state.pop("scaler"))
    rng.set_state(state.pop("rng"))
    torch.set_rng_state(state.pop("torch_rng"))
    if is_master():
        path = os.path.join(out, "metrics.jsonl")
        with open(path) as f:
            kept = [line for line in f if json.loads(line)["step"] <= state["step"]]  # step: steps done (1..N)
        with open(path, "w") as f:
            f.writelines(kept)
    return state


def log_metrics(out, log):
    """One line of metrics.jsonl; NaN is written as null, so that every line is valid JSON."""
    if is_master():
        with open(os.path.join(out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({k: None if v != v else v for k, v in log.items()}) + "\n")


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def plot_rewards(out, title, eval_before=None):
    """reward.png: the training reward of every step and the held-out (eval) reward, from eval_before (at step 0)
    on, against steps."""
    if not is_master():
        return
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    m = read_metrics(out)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([x["step"] for x in m], [x["reward_mean"] for x in m], lw=1, alpha=0.6, label="training batch")
    evals = [(0, eval_before)] * (eval_before is not None)
    evals += [(x["step"], x["eval_reward"]) for x in m if x.get("eval_reward") is not None]
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out prompts, fixed seeds")
    ax.set(xlabel="step", ylabel="reward", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_save(lambda path: fig.savefig(path, format="png"), os.path.join(out, "reward.png"))
    plt.close(fig)


# -----------------------------------------------------------------------------
# memory: how many steps keep their activations (train.py --keep-activations auto --memory-budget GB)

BUDGET_SHARE = {"cuda": 0.9, "cpu": 0.5}  # default budget: of what the GPU has free for us (the rest: CUDA's context
# and the allocator's fragmentation); of the RAM on a CPU
OVERHEAD = 1.15  # a kept step's cost in memory, in units of the activation bytes counted for it (sampler's
# step_activation_bytes), plus one step in reserve. Measured (tiny model, CPU, 0 to 20 steps kept): the tensors' own
# peak (128 px) grew by 0.93x the counted bytes per kept step, the peak RSS (256 px) by 1.04x per step plus one step's
# worth (what the allocator keeps)


def parse_keep(text):
    """--keep-activations: "auto" -> None (chosen from the memory budget), "N" -> N >= 0; else one line, exit 2. An
    integer passes too: a run directory from before auto saved the flag as one."""
    text = str(text)
    if text == "auto":
        return None
    if not text.isdigit():
        die(f"--keep-activations must be auto or an integer >= 0, got {text}")
    return int(text)


def reset_peak_memory(device_type):
    """Start peak_memory's count afresh (each training step does): on CUDA the allocator's peak; on Linux, writing 5
    to /proc/self/clear_refs sets the process's peak resident set size (VmHWM, and ru_maxrss with it) to what it
    holds now. Where that file is missing or not writable, a CPU's peak counts from the process's start."""
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory(device_type):
    """The bytes --memory-budget counts: on CUDA the allocator's peak, on a CPU the process's peak resident set size
    (Linux reports ru_maxrss in KiB), each since reset_peak_memory."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_budget(gb, device_type):
    """--memory-budget in bytes; 0 = the default: on CUDA a share of what this process can hold (the device's free
    memory plus what its allocator has reserved already), on a CPU a share of the RAM."""
    if gb:
        return gb * 2**30
    if device_type == "cuda":
        return BUDGET_SHARE["cuda"] * (torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved())
    return BUDGET_SHARE["cpu"] * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def steps_that_fit(budget, peak, per_step, most):
    """How many steps may keep their activations: (budget - peak) / (OVERHEAD * per_step) - 1, in 0..most. `peak`: a
    step's peak with every step recomputed (flat memory, the least a step needs); `per_step`: one step's activations.
    A kept step's activations live from its forward to its backward, so at any moment K kept steps add at most K
    steps' activations to what the recomputing step holds: its peak plus K * per_step bounds the new peak."""
    return max(0, min(most, int((budget - peak) // (OVERHEAD * per_step)) - 1))


def activations_to_keep(sd, cond, uncond, noise, steps, guidance, eta, backprop, peak, budget):
    """--keep-activations auto, after a step that recomputed every step and peaked at `peak` bytes: (steps to keep,
    one step's activation bytes), the latter measured on this batch (cond, uncond (B, L, D), noise (B, 4, h, w)) in
    the caller's autocast dtype."""
    n = backprop[1] if isinstance(backprop, tuple) and backprop[0] == "lv" else 1  # lv:N trains N * B rows
    measure = flow_step_activation_bytes if sd.flow else step_activation_bytes  # eta: a flow's SDE noise level
    per_step = measure(sd, cond.repeat(n, 1, 1), uncond.repeat(n, 1, 1), noise.repeat(n, 1, 1, 1), steps, guidance,
                       eta)
    return steps_that_fit(budget, peak, per_step, steps_with_gradient(backprop, steps)), per_step


class StopOnSignal:
    """The first SIGTERM / Ctrl-C sets .name and lets the current step finish and save; a second one stops at once."""

    def __init__(self):
        self.name = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.name = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL)
