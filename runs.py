"""A training run, shared by train.py (reward backprop) and ddpo.py (reinforcement learning), so that each script
shows its method and loop and nothing else: the shared flags and settings, the model, reward, LoRA and optimiser, the
prompts encoded once, the held-out eval, the run directory (checkpoints, --resume), signals and torchrun.

    p = argparse.ArgumentParser()
    add_run_flags(p, reward="compress", steps=50, lr=1e-3, grad_accum=1, eta=0.0, every=10)   # the shared flags
    p.add_argument("--backprop", ...)                    # the script's own
    args = parse_run_args(p, "train.py")                 # --resume, every open setting (settle), checks
    run = Run(args, "train.py")                          # model, reward, LoRA, AdamW, prompts encoded; nothing written
    run.start()                                          # the run directory: a fresh run's step-0 eval, or the resumed
    for step in run.progress("compress"):                # tqdm over the steps left
        ...                                              # the script's step, with run.sd, run.opt, run.cond_all ...
        run.end_step(step + 1, log)                      # the log line, eval grid, plot, checkpoint; a signal stops
    run.finish()                                         # held-out reward before -> after

Bad input: one line, exit status 2 (die), before anything is written; a start that fails or is interrupted before
its first step leaves the disk as it found it. A run directory: config.json, metrics.jsonl, checkpoint.pt,
lora.safetensors, samples/ (eval grids), reward.png.
"""
import json
import math
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from flow import flow_sample
from grid import image_grid, reward_plot
from lora import TARGET_SETS, inject_lora, parse_targets, save_lora
from memory import base_to_fp8, check_fits, over_budget
from model import (DEFAULT_MODEL, SHAPES_DIR, SHAPES_FLOW_DIR, ModelLoadError, decode, encode_prompts,
                   free_text_encoders, latent_shape, load_sd, native_resolution)
from rewards import REWARDS, RewardLoadError, check_prompts, load_reward, parse_reward_spec
from sampler import ddim_sample

PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GUIDANCE = {"ddim": 7.5, "sd3": 7.0, "flux": 3.5}  # --guidance's default: AlignProp's CFG; SD3's and FLUX's pipelines'
SCRIPTS = {"train.py": "reward backprop", "ddpo.py": "reinforcement learning"}
FIXED = {"its LoRA was made for it": ("model", "lora_rank", "lora_targets"),  # what a resumed run cannot change,
         "before and after would not compare": ("eval_prompts", "eval_n")}  # and why

# -----------------------------------------------------------------------------
# processes and messages. Under torchrun (RANK in the environment) every process runs the same script on its share of
# each batch: rank 0 alone prints and writes, and agree() makes a decision one rank took (a signal) everyone's


def is_master():  # rank 0 writes; read from the environment, so it holds before the process group exists
    return int(os.environ.get("RANK", "0")) == 0


def info(*msg):
    if is_master():
        print(*msg)


def die(msg, status=2):
    """Bad input: one line, exit status 2, no traceback (every rank sees the same input and stops)."""
    if is_master():
        print(f"error: {msg}", file=sys.stderr)
    sys.exit(status)


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


class StopOnSignal:
    """The first SIGTERM / Ctrl-C sets .name and lets the current step finish and save; a second one stops at once."""

    def __init__(self):
        self.name = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.name = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL)


# -----------------------------------------------------------------------------
# flags and settings


def add_run_flags(p, reward, steps, lr, grad_accum, eta, every, unit="step"):
    """The flags train.py and ddpo.py share, with the script's defaults. `unit`: what --steps counts."""
    p.add_argument("--reward", default=reward, help=f"what to maximise: {', '.join(REWARDS)}, or a weighted mix such "
                   "as aesthetic,compress:0.5 (default %(default)s)")
    p.add_argument("--model", default=None, help="hub id or local diffusers dir (SD 1.x, 2.x, XL, 3 / 3.5, FLUX.1), "
                   f"shapes, shapes-flow, or tiny[-xl|-sd3|-flux] (default: {DEFAULT_MODEL} on CUDA, else shapes)")
    p.add_argument("--prompts", default=None, help="training prompts, one per line (default: prompts/shapes.txt for "
                   "the shapes models, prompts/count.txt for a count reward, else prompts/animals.txt)")
    p.add_argument("--eval-prompts", default=None, help="held-out prompts for the eval grids (default: the -eval.txt "
                   "beside the default --prompts)")
    p.add_argument("--steps", type=int, default=steps, help=f"{unit}s in total (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="images per model call (default %(default)s)")
    p.add_argument("--grad-accum", type=int, default=grad_accum, help="micro-batches per optimisation step "
                   "(default %(default)s)")
    p.add_argument("--lr", type=float, default=lr, help="AdamW learning rate (default %(default)s)")
    p.add_argument("--lora-rank", type=int, default=4, help="rank of the LoRA adapters, alpha = rank (default 4)")
    p.add_argument("--lora-targets", default="attn", help=f"layers that get adapters: {', '.join(TARGET_SETS)} (the "
                   "attention projections; the ResNet blocks' convolutions) or module names, joined with '+'")
    p.add_argument("--sample-steps", "--ddim-steps", type=int, default=20, help="denoising steps per sample")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale, <= 1 disables CFG; on "
                   "FLUX.1-dev the value of its guidance embedding (default: 7.5 SD, 7.0 SD3, 3.5 FLUX)")
    p.add_argument("--eta", type=float, default=eta, help="sampler noise: DDIM's eta (0 = deterministic, 1 = "
                   "DDPM-like), on flow models the noise level of Flow-GRPO's SDE (0 = the Euler ODE) (default: "
                   + ("%(default)s)" if eta is not None else "1 DDIM, 0.7 flow)"))
    p.add_argument("--resolution", type=int, default=0, help="image side in pixels; 0 = the model's native size")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="precision of the frozen model and autocast "
                   "(default: bf16 on CUDA, fp32 on a CPU); LoRA weights stay fp32")
    p.add_argument("--base-dtype", default=None, choices=["fp8"], help="fp8: the frozen denoiser's and text encoders' "
                   "Linear and conv weights in float8_e4m3fn, dequantized a layer at a time (memory.Float8Linear, "
                   "Float8Conv2d); LoRA and the computation stay in --dtype (default: --dtype)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clip; 0 = no clipping")
    p.add_argument("--seed", type=int, default=0, help="seeds the LoRA init, prompts, noise and eval images")
    p.add_argument("--out", default=None, help="output directory (default: out/<reward>, ddpo.py out/ddpo-<reward>)")
    p.add_argument("--resume", default=None, help="continue the run in this directory; flags given override its own")
    p.add_argument("--save-every", type=int, default=every, help=f"checkpoint every N {unit}s; 0 = only at the end")
    p.add_argument("--eval-every", type=int, default=every, help=f"eval grid every N {unit}s; 0 = at start and end")
    p.add_argument("--eval-n", type=int, default=8, help="eval images (held-out prompts x fixed seeds)")


def parse_run_args(parser, script):
    """Parse the command line; with --resume DIR, DIR's saved flags are the defaults (this command's win, but for
    FIXED) and --out is DIR. Then every setting left open is decided (settle) and the shared flags are checked."""
    args, real = parser.parse_args(), os.path.realpath
    cfg, done = read_run(args.resume, script) if args.resume else ({}, 0)  # damaged, or the other script's: one line
    if args.out is not None and (not args.out.strip() or args.resume and real(args.out) != real(args.resume)):
        die(f"--out {args.out!r}: " + ("a run continues where it is, in --resume's directory" if args.resume else
                                        "name a directory"))
    if args.resume:
        parser.set_defaults(**{k: v for k, v in cfg.items() if k in vars(args)})
        args = parser.parse_args()
        for why, names in FIXED.items():
            for name in (n for n in names if n in cfg and getattr(args, n) != cfg[n]):
                die(f"--resume {args.resume}: the run was trained with --{name.replace('_', '-')} {cfg[name]}, this "
                    f"command says {getattr(args, name)}; {why}: start a new run (--out)")
        args.out = args.resume
    settle(args, script)
    check_numbers(args, at_least_1=("steps", "batch_size", "grad_accum", "lora_rank", "sample_steps", "eval_n"),
                  at_least_0=("eta", "guidance", "max_grad_norm", "resolution", "save_every", "eval_every"),
                  above_0=("lr",))  # NaN and inf included: one line, exit 2
    if args.resume and args.steps <= done:
        die(f"--steps {args.steps}: the run in {args.resume} has done {done} already; give more to continue it")
    if not 0 <= args.seed < 2**63:
        die(f"--seed must be an integer in 0 .. 2^63 - 1, got {args.seed}")
    try:
        parse_targets(args.lora_targets)
    except ValueError as e:
        die(f"--lora-targets {e}")
    if not args.resume and os.path.isfile(os.path.join(args.out, "checkpoint.pt")):
        die(f"{args.out} already holds a run: continue it with --resume {args.out}, or pick another --out")
    check_out(args.out)
    return args


def settle(args, script, sd=None):
    """Every setting a command line leaves open, decided here and nowhere else, top to bottom. Called once before the
    model loads (the machine, the prompts, the output) and once after (sd: what the model's family decides)."""
    if sd is not None:
        if args.guidance is None:  # each pipeline's own default
            args.guidance = GUIDANCE["flux" if sd.flux else "sd3" if sd.flow else "ddim"]
        if args.eta is None:  # ddpo.py: a policy needs noise; DDPO's eta 1, Flow-GRPO's noise level 0.7
            args.eta = 0.7 if sd.flow else 1.0
        if args.eta > 1 and not sd.flow:  # DDIM's sigma outgrows the step's whole noise: sqrt(1 - a_prev - sigma^2)
            die(f"--eta must be <= 1 on a DDIM model (1 is DDPM-like), got {args.eta:g}")
        most = sd.scheduler.config.num_train_timesteps
        if args.sample_steps > most:
            die(f"--sample-steps {args.sample_steps}: the model's scheduler has {most} timesteps; take at most that")
        return
    try:
        names = [name for name, _ in parse_reward_spec(args.reward)]
    except ValueError as e:
        die(str(e))
    cuda = torch.cuda.is_available()
    if args.model is None:  # full-size SD on a GPU; on a CPU the shipped shapes model (SD would take hours a step)
        args.model = DEFAULT_MODEL if cuda else "shapes"
        if not cuda:
            info("no CUDA GPU: using --model shapes (coloured shapes, 64 px); full-size SD would take hours here")
    prompt_set = os.path.join(PROMPTS, "shapes" if is_shapes(args.model) else "count" if "count" in names
                              else "animals")
    args.prompts = args.prompts or prompt_set + ".txt"
    args.eval_prompts = args.eval_prompts or prompt_set + "-eval.txt"
    if args.dtype is None:
        args.dtype = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if args.dtype == "fp16" and not cuda:
        die("--dtype fp16 needs a CUDA GPU; use fp32 or bf16 on a CPU")
    name = "ddpo-" * (script == "ddpo.py") + args.reward.replace(",", "+").replace(":", "")
    args.out = args.out or os.path.join("out", name)


def check_numbers(args, at_least_1=(), at_least_0=(), above_0=(), finite=()):
    """Each named flag in its range (`finite`: any finite number), else one line and exit 2. NaN and inf never pass
    (argparse's type=float takes them); a flag left at None (a default filled in later) passes."""
    rules = ((at_least_1, lambda v: v >= 1, " >= 1"), (at_least_0, lambda v: v >= 0, " >= 0"),
             (above_0, lambda v: v > 0, " > 0"), (finite, lambda v: True, ""))
    for names, in_range, bound in rules:
        for name in names:
            value = getattr(args, name)
            if value is not None and not (math.isfinite(value) and in_range(value)):
                kind = "a finite number" if isinstance(value, float) else "an integer"
                die(f"--{name.replace('_', '-')} must be {kind}{bound}, got {value}")


def is_shapes(model):  # --model names one of the shapes models ("shapes", "shapes-flow" or their directories)
    return model in ("shapes", "shapes-flow") or os.path.realpath(model) in map(os.path.realpath,
                                                                                (SHAPES_DIR, SHAPES_FLOW_DIR))


def warn_unknown_words(model, prompts):
    """The shapes models know their grammar's words only: say up front which words of the prompts they never saw,
    since they draw them without a word of complaint (an orange square for "a cat")."""
    if is_shapes(model) and is_master():
        from shapes.world import unknown_words_warning
        message = unknown_words_warning(prompts)
        if message:
            print(f"warning: {message}", file=sys.stderr)


def read_prompts(flag, path, reward):
    """The non-empty lines of a prompt file, each one the reward can score; else one line naming the flag, exit 2."""
    if not os.path.isfile(path):
        die(f"{flag} {path}: " + ("a directory, not a file" if os.path.isdir(path) else "not a regular file"
                                  if os.path.exists(path) else "no such file"))
    try:
        with open(path) as f:
            lines = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as e:
        die(f"{flag} {path}: not a text file ({e.reason} at byte {e.start}); prompts are lines of UTF-8 text")
    if not lines:
        die(f"{flag} {path}: the file has no prompts")
    try:
        check_prompts(reward, lines)
    except ValueError as e:
        die(f"{flag} {path}: {e} (the count rewards need one in every prompt)")
    return lines


def load_model(model, device, dtype, resolution=0):
    """(sd, image side, latent shape (C, h, w)): load_sd, and `resolution` (0: native) checked for the family."""
    try:
        sd = load_sd(model, device, dtype)
    except ModelLoadError as e:
        die(str(e))
    resolution = resolution or native_resolution(sd)
    try:
        return sd, resolution, latent_shape(sd, resolution)
    except ValueError as e:  # not a multiple of what the model's latents need
        die(f"--{e}")


def check_batch_fits(flag, need, device_type, advice):  # memory.check_fits: one line, exit 2, before any work
    try:
        check_fits(need, device_type)
    except ValueError as e:
        die(f"{flag} {e}; {advice}")


# -----------------------------------------------------------------------------
# the run


class Run:
    """Everything a training script needs besides its method; nothing is written until start(). _setup makes it: sd,
    reward_fn, params (the LoRA weights, fp32), opt, scaler, autocast, prompts and cond_all (N, L, D), eval_cond,
    uncond (1, L, D), rng (every batch's prompts and noise), sample (ddim_sample or flow_sample), step (steps done)."""

    def __init__(self, args, script):
        self.args, self.script, self.state = args, script, lambda: {}
        self.unit = "round" if script == "ddpo.py" else "step"
        try:
            self._setup()
        except KeyboardInterrupt:  # Ctrl-C while loading: nothing written yet
            die("interrupted before the run started; nothing was written", status=130)

    def _setup(self):
        args = self.args
        _, self.rank, self.world = start_processes()
        self.master = self.rank == 0
        self.device_type = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = f"cuda:{torch.cuda.current_device()}" if self.device_type == "cuda" else "cpu"
        self.prompts = read_prompts("--prompts", args.prompts, args.reward)
        eval_prompts = read_prompts("--eval-prompts", args.eval_prompts, args.reward)
        warn_unknown_words(args.model, self.prompts + eval_prompts)
        self.eval_prompts = [eval_prompts[i % len(eval_prompts)] for i in range(args.eval_n)]
        self.dtype = DTYPES[args.dtype]
        # on the CPU first, each part moved to the device when needed: never the text encoders beside the denoiser
        self.sd, self.resolution, self.shape = load_model(args.model, "cpu", self.dtype, args.resolution)
        settle(args, self.script, self.sd)
        per_image = 4 * torch.Size(self.shape).numel() + self.dtype.itemsize * 3 * self.resolution ** 2  # noise, image
        check_batch_fits(f"--batch-size {args.batch_size} at {self.resolution} px", args.batch_size * per_image,
                         self.device_type, "lower --batch-size (--grad-accum N keeps a step's images) or --resolution")
        try:
            self.reward_fn = load_reward(args.reward, self.device, self.dtype)
        except RewardLoadError as e:
            die(str(e))
        self.sample = flow_sample if self.sd.flow else ddim_sample  # the same arguments; eta: a flow's SDE noise
        self.autocast = torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        if not args.base_dtype and over_budget(self.sd.unet, getattr(args, "memory_budget", 0)):  # train.py's
            args.base_dtype = "fp8"  # a denoiser over --memory-budget in --dtype would not even load: fp8 it is
        if args.base_dtype == "fp8":  # frozen Linears and convs in 8-bit floats, on the CPU (LoRA wraps them)
            saved = sum(base_to_fp8(m) for m in (self.sd.unet, *self.sd.text_encoders))
            info(f"--base-dtype fp8: {saved / 2**30:.2f} GB of frozen weights saved (the denoiser, the text encoders)")
        with torch.no_grad(), self.autocast:  # the text encoders are frozen: every prompt encoded once
            for encoder in self.sd.text_encoders:
                encoder.to(self.device)
            self.cond_all = encode_prompts(self.sd, self.prompts)  # (N, L, D)
            self.eval_cond = encode_prompts(self.sd, self.eval_prompts)
            self.uncond = encode_prompts(self.sd, [""])  # (1, L, D)
        self.freed = free_text_encoders(self.sd)  # needed no more: SD3's and FLUX's T5-XXL is the largest of them
        for part in (self.sd.unet, self.sd.vae):  # the device's from here on
            part.to(self.device)
        torch.manual_seed(args.seed)  # the LoRA init depends on the seed alone, not on what loading drew
        try:  # the only trainable weights, kept in fp32 whatever the frozen model's dtype
            self.params = inject_lora(self.sd.unet, rank=args.lora_rank, targets=parse_targets(args.lora_targets),
                                      dtype=torch.float32)
        except ValueError as e:  # a target that names no layer of this model
            die(f"--lora-targets {e}")
        self.opt = torch.optim.AdamW(self.params, lr=args.lr)
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=self.dtype == torch.float16)  # fp16 underflows
        self.eval_noise = torch.randn(args.eval_n, *self.shape, generator=torch.Generator().manual_seed(args.seed + 1))
        self.rng = torch.Generator().manual_seed(args.seed)
        self.step, self.eval_before = 0, None

    def start(self, state=None, **config):
        """The run directory: a fresh run evaluates the base model (step 0) and checkpoints it, a resumed one restores
        its checkpoint; either writes config.json (+ `config`). `state()`: the script's additions to each checkpoint,
        which a resumed run returns."""
        args = self.args
        self.state = state or self.state
        self.config = dict(vars(args), script=self.script, world_size=self.world, **config)
        self.snapshot_start(check_out(args.out))
        if dist.is_initialized():
            dist.barrier()  # every rank has checked the output directory before rank 0 writes to it
        saved = {}
        try:
            write_config(args.out, self.config)  # a resumed run's checkpoint was read whole already (read_run)
            if args.resume:
                saved = self.restore()
                self.step, self.eval_before = saved.pop("step"), saved.pop("eval_before")
                info(f"resuming {args.out} at {self.unit} {self.step}")
            else:
                if self.master:
                    open(os.path.join(args.out, "metrics.jsonl"), "w").close()
                    self.eval_before = self.evaluate(0)
                self.checkpoint(0)
        except KeyboardInterrupt:  # Ctrl-C in the first eval: the disk as it was, so the same command runs again
            self.undo_start()
            die("interrupted before the first step; the run directory is as it was", status=130)
        self.signals = StopOnSignal()  # from here a signal finishes the step, saves, then stops
        return saved

    @torch.no_grad()
    def evaluate(self, step):
        """samples/step_NNNNNN.png and the mean reward of the held-out prompts, on the same noise every time."""
        args, generator = self.args, torch.Generator().manual_seed(self.args.seed + 2)  # eta noise, also fixed
        images = []
        for i in range(0, args.eval_n, args.batch_size):
            cond = self.eval_cond[i:i + args.batch_size]
            with self.autocast:
                latents = self.sample(self.sd, cond, self.uncond.expand(len(cond), -1, -1),
                                      self.eval_noise[i:i + args.batch_size].to(self.device), args.sample_steps,
                                      args.guidance, args.eta, generator=generator)
                images.append(decode(self.sd, latents).float())
        images = torch.cat(images)
        title = f"{self.script} {args.out}, step {step}: held-out prompts, fixed seeds"
        grid = image_grid(images, nrow=min(args.eval_n, 8), labels=self.eval_prompts, title=title)
        grid.save(os.path.join(args.out, "samples", f"step_{step:06d}.png"))
        return self.reward_fn(images, self.eval_prompts).mean().item()

    def checkpoint(self, done):
        """checkpoint.pt (LoRA, optimiser, scaler, generators, step, the script's state()) and lora.safetensors, each
        written whole or not at all; on every rank (under torchrun the ranks' weights are compared first)."""
        if dist.is_initialized() and _weights_in_sync(self.params) != 0:  # insurance against a broken all-reduce
            die(f"the LoRA weights differ between ranks at step {done}: the gradient all-reduce is broken")
        if not self.master:
            return
        unet, out = self.sd.unet, self.args.out
        state = dict(step=done, eval_before=self.eval_before, **self.state(), opt=self.opt.state_dict(),
                     lora={n: p.detach() for n, p in unet.named_parameters() if p.requires_grad},
                     scaler=self.scaler.state_dict(), rng=self.rng.get_state(), torch_rng=torch.get_rng_state())
        atomic_save(lambda path: torch.save(state, path), os.path.join(out, "checkpoint.pt"))
        atomic_save(lambda path: save_lora(unet, path), os.path.join(out, "lora.safetensors"))

    def restore(self):
        """Put back what checkpoint() saved (this command's --lr wins); metrics.jsonl keeps the steps up to the
        checkpoint (a killed run logged steps it did not save). Returns step, eval_before and the script's state."""
        state, named = read_checkpoint(self.args.out), dict(self.sd.unet.named_parameters())
        with torch.no_grad():
            for n, v in state.pop("lora").items():
                named[n].copy_(v)
        self.opt.load_state_dict(state.pop("opt"))
        for group in self.opt.param_groups:
            group["lr"] = self.args.lr
        self.scaler.load_state_dict(state.pop("scaler"))
        self.rng.set_state(state.pop("rng"))
        torch.set_rng_state(state.pop("torch_rng"))
        if self.master:  # a line a kill cut short is dropped with the steps after the checkpoint
            kept = [m for m in read_metrics(self.args.out) if m["step"] <= state["step"]]
            Path(self.args.out, "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in kept))
        return state

    def snapshot_start(self, made):
        """What undo_start needs: the first directory this start creates, else what is in the run directory now."""
        out = self.args.out
        self.made, self.names, self.files = made, set(), {}
        if made is None:  # the directory exists: what is in it, and the bytes of what a start rewrites
            self.names = set(os.listdir(out))
            self.files = {name: Path(out, name).read_bytes() for name in ("config.json", "metrics.jsonl",
                          "checkpoint.pt", "lora.safetensors") if os.path.isfile(os.path.join(out, name))}

    def undo_start(self):
        """A start that fails in its first steps leaves the disk as it found it: made files gone, the rest back."""
        if not self.master:
            return
        if self.made is not None:
            shutil.rmtree(self.made, ignore_errors=True)
            return
        for name in set(os.listdir(self.args.out)) - self.names:
            path = os.path.join(self.args.out, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        for name, data in self.files.items():
            Path(self.args.out, name).write_bytes(data)

    def progress(self, desc):  # tqdm over the steps left (rank 0 draws it), counted from 0
        self.pbar = tqdm(range(self.step, self.args.steps), initial=self.step, total=self.args.steps, desc=desc,
                         dynamic_ncols=True, disable=not self.master)
        return self.pbar

    def end_step(self, done, log):
        """After `done` steps: the log line; eval, plot and checkpoint when due; a signal saves and stops here."""
        args = self.args
        evaluating = self.master and (done == args.steps or (args.eval_every and done % args.eval_every == 0))
        if evaluating:
            log["eval_reward"] = self.evaluate(done)
        log_metrics(args.out, log)
        if evaluating:
            plot_rewards(args.out, f"{self.script} --reward {args.reward} ({args.out})", self.eval_before)
        stop = agree(self.signals.name, self.device)  # torchrun: all stop after the step any rank saw a signal in
        if done == args.steps or (args.save_every and done % args.save_every == 0) or stop:
            self.checkpoint(done)
        self.pbar.set_postfix({k.split("_")[0]: f"{log[k]:.4f}" for k in ("reward_mean", "eval_reward") if k in log})
        if stop:  # SIGTERM / Ctrl-C: the step is finished and saved
            self.pbar.close()
            name = self.signals.name or "SIGTERM"  # what another rank received
            info(f"stopped by {name} after {self.unit} {done}, checkpoint saved: continue with --resume {args.out}")
            sys.exit(130 if name == "SIGINT" else 143)

    def finish(self, what=""):  # the last line: the held-out reward before and after, and where the LoRA is
        if dist.is_initialized():
            info(f"LoRA weights identical on all {self.world} processes (checked at every checkpoint)")
            dist.destroy_process_group()
        if self.master:
            after = read_metrics(self.args.out)[-1].get("eval_reward")  # None: NaN, logged as null
            print(f"{self.args.reward} reward on held-out prompts: {self.eval_before:.4f} -> "
                  f"{math.nan if after is None else after:.4f} after {self.args.steps} {self.unit}s{what}; LoRA in "
                  f"{os.path.join(self.args.out, 'lora.safetensors')}")


# -----------------------------------------------------------------------------
# the run directory


def read_run(out, script):
    """(config.json's flags, steps done) of this script's run in `out`; else one line, before any work."""
    cfg_path = os.path.join(out, "config.json")
    if not os.path.isfile(os.path.join(out, "checkpoint.pt")) or not os.path.isfile(cfg_path):
        die(f"--resume {out}: no checkpoint.pt and config.json there")
    try:
        cfg = json.loads(Path(cfg_path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        die(f"{cfg_path} is damaged or not a config of this project ({e})")
    other = cfg.get("script") if isinstance(cfg, dict) else None
    if other not in SCRIPTS:
        die(f"{cfg_path} is not a config of this project (it names no script)")
    if other != script:  # the other script's flags would be refused one by one (ddpo.py: "--eta must be > 0")
        die(f"{out} is a {other} run ({SCRIPTS[other]}), not a {script} run; continue it with python {other} "
            f"--resume {out}")
    return cfg, read_checkpoint(out)["step"]


def check_out(out):
    """--out must be a directory this process can write in or create; returns the first one a run would create."""
    path, made = os.path.abspath(out), None
    while not os.path.lexists(path):  # up to the first part of the path that exists
        path, made = os.path.dirname(path), path
    if not os.path.isdir(path):
        die(f"--out {out}: {'it' if made is None else path} is a file, not a directory")
    check_writable("--out", out, path)
    return made


def check_writable(flag, value, directory):
    """One line, exit 2, unless a file can be created in `directory`: tried (os.access says yes to root in /sys)."""
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        die(f"{flag} {value}: cannot write in {directory} ({e.strerror})")


def write_config(out, config):  # config.json: the flags of the latest start, and what the run chose
    if is_master():
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
        Path(out, "config.json").write_text(json.dumps(config, indent=2))


def atomic_save(save, path):  # a crash mid-write leaves the previous file intact
    save(path + ".tmp")
    os.replace(path + ".tmp", path)


def _weights_in_sync(params):  # max |difference| between this rank's LoRA weights and rank 0's, over all ranks
    flat = torch.cat([p.detach().flatten() for p in params])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


CHECKPOINT_KEYS = {"step", "eval_before", "lora", "opt", "scaler", "rng", "torch_rng"}  # what Run.checkpoint writes


def read_checkpoint(out):
    """checkpoint.pt's state; a damaged file: one line (torch's own advice, weights_only=False, is the wrong one)."""
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


def log_metrics(out, log):
    """One line of metrics.jsonl; NaN is written as null, so that every line is valid JSON."""
    if is_master():
        with open(os.path.join(out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({k: None if v != v else v for k, v in log.items()}) + "\n")


def read_metrics(out):  # metrics.jsonl's lines, but for one a kill cut short
    return [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines() if line.endswith("}")]


def plot_rewards(out, title, eval_before=None):
    """reward.png: the training and held-out rewards against steps (grid.reward_plot)."""
    if is_master():
        fig = reward_plot(read_metrics(out), title, eval_before)
        atomic_save(lambda path: fig.savefig(path, format="png"), os.path.join(out, "reward.png"))
        import matplotlib.pyplot as plt
        plt.close(fig)
