"""Benchmark: what one AlignProp training step costs against plain sampling, in seconds and peak memory.

    python -m tools.bench                                     # the tiny model on a CPU, well under a minute
    python -m tools.bench --arch sd15 --resolution 512        # SD 1.5's architecture, random weights (GPU)
    python -m tools.bench --arch sdxl                         # SDXL's, at its native 1024 px (GPU)
    python -m tools.bench --arch sd35m --resolution 1024      # SD 3.5 Medium's rectified-flow transformer (GPU)
    python -m tools.bench --arch flux --resolution 1024       # FLUX.1-dev's (GPU; 24 GB of weights in bf16)
    python -m tools.bench --model tiny-sd3                    # the SD3 / FLUX miniatures (tiny-flux), CPU, seconds
    python -m tools.bench --steps-sweep 10,25,50              # peak memory against DDIM steps, with and without
                                                              # checkpointing
    python -m tools.bench --budget-sweep 0.8,1.0 --resolution 256   # --keep-activations auto under each budget (GB)
    python -m tools.bench --model path/to/diffusers/dir       # anything load_sd accepts
    python -m tools.bench --estimate --arch sdxl --sample-steps 2 --modes all   # will it fit a GPU? no GPU needed

All modes run in this one process on the same batch, steps and guidance: `sample` is the sampler + decode under
no_grad (DDIM for SD 1.x / 2.x / XL, sampler.ddim_sample; the Euler ODE for the rectified-flow models SD3 and FLUX,
flow.flow_sample); the others are one optimisation step (the sampler with grad, decode, reward, backward, AdamW on
LoRA rank 4) with backprop through all steps, the last 1 (DRaFT-1), a random K in 1..T (AlignProp), DRaFT-LV, DRTune
or one step on the re-noised sample (Direct-Align, onestep:F), keeping the
activations of as many steps as --memory-budget allows (`kept`; --keep-activations auto, as train.py). Each is timed as
the median of --repeats runs after --warmup; peak memory is torch.cuda.max_memory_allocated on a GPU, and on a CPU the
peak resident set size sampled every millisecond, with MALLOC_MMAP_THRESHOLD_=65536 (set here) so that RSS follows
live memory.
The default reward is a smoothness proxy (minus the mean |difference| of horizontally adjacent pixels, as in the peer
harness we compare with) that costs nothing, so the figures measure the method's own machinery; --reward NAME uses
one from rewards.py.
--arch sd35m / sd35l / flux: the transformer and VAE as published, random weights; the text encoders, which run once per
prompt and not per step, are one-layer stand-ins of the real widths (tools/archs.py), so that the conditioning the
transformer reads has its real shapes.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository's, where -m tools.bench runs

if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # glibc reads it at start-up: re-run this script with it set
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, "-m", "tools.bench"] + sys.argv[1:])  # argv[0]: the file, under -m

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from flow import flow_sample  # noqa: E402
from lora import inject_lora  # noqa: E402
from memory import activations_to_keep, base_to_fp8, memory_budget  # noqa: E402
from model import (ModelLoadError, check_decode_tile, decode, encode_prompts, latent_shape, load_sd,  # noqa: E402
                   native_resolution)
from rewards import RewardLoadError, load_reward, parse_reward_spec, without_gradient  # noqa: E402
from runs import check_numbers, check_writable, die  # noqa: E402
from sampler import ddim_sample, parse_backprop  # noqa: E402
from tools.archs import FLOW_ARCHS, FLUX_BLOCKS, build_arch, full_depth_text_encoders  # noqa: E402
from tools.step_memory import CudaAutocast, FakeStep, TensorMemory, phase  # noqa: E402



def positive_list(flag, text, kind):
    """ "10,25,50" -> [10, 25, 50]: each a finite number > 0 of `kind` (int or float), else one line and exit 2."""
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        die(f"{flag} must be a comma list of {'integers' if kind is int else 'numbers'} > 0, got {text}")
    return values


p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0])
p.add_argument("--model", default="tiny", help="hub id, local diffusers dir, or a miniature: 'tiny', 'tiny-xl', "
               "'tiny-sd3', 'tiny-flux'")
p.add_argument("--arch", default=None, choices=["sd15", "sd21", "sdxl", "sd35m", "sd35l", "flux"], help="a real "
               "architecture with random weights (no download): sd15 = SD 1.x, sd21 = SD 2.x (v-prediction), sdxl = "
               "SDXL base, sd35m / sd35l = SD 3.5 Medium / Large, flux = FLUX.1-dev (for these the text encoders are "
               "one-layer stand-ins "
               "of the real widths: the conditioning has its real shapes, the per-prompt encoding is not measured); "
               "overrides --model")
p.add_argument("--flux-blocks", default=None, help="D,S: --arch flux with D of its 19 double-stream and S of its 38 "
               "single-stream blocks (1..19, 1..38), for a machine that cannot hold its 12B weights; 1,2 is 1/19 of "
               "each kind, so that the blocks' weights, multiply-adds and activations are 1/19 of the full model's")
p.add_argument("--resolution", type=int, default=0, help="image side in pixels, a multiple of the model's (8 for SD, "
               "16 for FLUX); 0 = the model's native size")
p.add_argument("--batch-size", type=int, default=1, help="images per step")
p.add_argument("--sample-steps", "--ddim-steps", dest="sample_steps", type=int, default=20, help="sampling steps T "
               "(DDIM's or the flow's Euler steps)")
p.add_argument("--guidance", type=float, default=None, help="CFG scale (one batched call for both halves); FLUX: the "
               "guidance embedding's value. Default: each pipeline's own, 7.0 for SD3 (StableDiffusion3Pipeline), 3.5 "
               "for FLUX (FluxPipeline), 7.5 for SD 1.x / 2.x / XL")
p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: bf16 on CUDA, fp32 on CPU")
p.add_argument("--modes", default="sample,all,1,rand,lv:2,drtune:2,onestep:0.6", help="comma list: sample, all, "
               "K, rand (K ~ U{1..T}), lv:N, drtune:N, onestep:F (one call with grad on the sample re-noised to F)")
p.add_argument("--cfg-in-turn", action="store_true", help="a recomputed step's backward takes CFG's two halves one "
               "after the other (sampler.halves_in_turn): less memory, one more batched call per step")
p.add_argument("--checkpoint-blocks", action="store_true", help="checkpointing inside a model call too: in a "
               "step's recomputation each UNet / transformer block keeps its input and is recomputed in backward")
p.add_argument("--base-dtype", default=None, choices=["fp8"], help="fp8: the frozen Linear and conv weights in "
               "float8_e4m3fn (memory.Float8Linear, Float8Conv2d), as train.py --base-dtype fp8")
p.add_argument("--decode-tile", type=int, default=0, help="PX: the decode with gradients in overlapping tiles of PX "
               "pixels, each recomputed on its own (model.decode; not the exact decode), as train.py --decode-tile")
p.add_argument("--keep-activations", default="auto", help="the last n grad steps keep their activations (faster, "
               "more memory); auto = as many as fit --memory-budget (as train.py); 0 = recompute every step")
p.add_argument("--memory-budget", type=float, default=0, help="GB for --keep-activations auto; 0 = train.py's "
               "default (90%% of the free GPU memory, half the RAM on a CPU)")
p.add_argument("--reward", default="smooth", help="smooth (a free proxy) or a reward name from rewards.py")
p.add_argument("--repeats", type=int, default=3, help="timed runs per mode (median reported); --steps-sweep times "
               "one run per point; 0: none, tensor bytes only")
p.add_argument("--warmup", type=int, default=1, help="untimed runs per mode (and per --steps-sweep point) first")
p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
p.add_argument("--channels-last", action="store_true", help="UNet and VAE in channels_last memory format")
p.add_argument("--tensor-memory", action=argparse.BooleanOptionalAction, default=True, help="on a CPU, also count "
               "tensor bytes exactly (one more, slower run per mode)")
p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = one per CPU this process may run on "
               "(os.sched_getaffinity), or OMP_NUM_THREADS if fewer. Where other processes keep those cores busy, "
               "fewer threads run faster (--threads 1): a thread that waits for a busy core stalls the others")
p.add_argument("--steps-sweep", default="", help="e.g. 10,25,50: peak memory of a full-backprop step against T, with "
               "and without checkpointing (replaces the mode table)")
p.add_argument("--budget-sweep", default="", help="e.g. 0.7,0.8,1.2: a full-backprop step with --keep-activations "
               "auto under each --memory-budget in GB: steps kept, seconds, peak (replaces the mode table)")
p.add_argument("--sweep-point", default=None, help=argparse.SUPPRESS)  # "T,keep": one point, in a child
p.add_argument("--estimate", action="store_true", help="no GPU, no weights: each mode's training step on fake "
               "tensors (shapes and dtypes, no arithmetic; step_memory.FakeStep), its tensors counted: weights, LoRA "
               "+ AdamW state, the step's peak and the phase it happens in. Seconds: none. --keep-activations auto "
               "counts as 0 (auto needs the device's free memory)")
p.add_argument("--estimate-device", default="cuda", choices=["cuda", "cpu"], help="--estimate for: cuda, under CUDA's "
               "autocast policy (step_memory.CudaAutocast); cpu, as this CPU runs the step (what --repeats 0 counts)")
p.add_argument("--json", default=None, help="also write the results to this JSON file")
args = p.parse_args()
# every flag checked before any work: a bad value is one line and exit status 2 (die), not a traceback after the model
# has loaded and the first modes have been timed, nor a table of nonsense
check_numbers(args, at_least_1=("sample_steps", "batch_size"),
              at_least_0=("resolution", "repeats", "warmup", "threads", "memory_budget", "guidance"))
steps_sweep = positive_list("--steps-sweep", args.steps_sweep, int) if args.steps_sweep else []
budget_sweep = positive_list("--budget-sweep", args.budget_sweep, float) if args.budget_sweep else []
if steps_sweep and budget_sweep:
    die("--steps-sweep and --budget-sweep each replace the mode table: give one of them")
if budget_sweep and not args.repeats:
    die("--budget-sweep times its points: --repeats must be >= 1")
if args.flux_blocks:
    counts = args.flux_blocks.split(",")
    if (args.arch != "flux" or len(counts) != 2 or not all(n.isdigit() for n in counts)
            or not all(1 <= int(n) <= most for n, most in zip(counts, FLUX_BLOCKS))):
        die(f"--flux-blocks D,S needs --arch flux, 1 <= D <= {FLUX_BLOCKS[0]} double-stream and 1 <= S <= "
            f"{FLUX_BLOCKS[1]} single-stream blocks, got {args.flux_blocks}")
if args.keep_activations != "auto" and not args.keep_activations.isdigit():
    die(f"--keep-activations must be auto or an integer >= 0, got {args.keep_activations}")
if args.estimate and (args.reward != "smooth" or steps_sweep or budget_sweep or args.compile):
    die("--estimate takes the smooth reward and the mode table: no --reward, sweeps or --compile")
if args.reward != "smooth":
    try:
        parse_reward_spec(args.reward)
    except ValueError as e:
        die(f"--reward: {e}")
    if without_gradient(args.reward):  # the step backpropagates the reward
        die(f"--reward {','.join(without_gradient(args.reward))} has no gradient, which the step backpropagates: use "
            "its differentiable stand-in (rewards.py)")
modes = args.modes.split(",")
if not (steps_sweep or budget_sweep):  # the sweeps run full backprop, not --modes
    for mode in modes:
        if mode not in ("sample", "rand"):
            try:
                parse_backprop(mode, args.sample_steps)  # against this T: K <= T, drtune:N <= T, 0 < F <= 1
            except ValueError as e:
                die(f"--modes {e}")
if args.json:  # a file the results can go to, or the whole benchmark runs before the error
    if os.path.isdir(args.json):
        die(f"--json {args.json} is a directory, not a file")
    check_writable("--json", args.json, os.path.dirname(os.path.abspath(args.json)))

device = "cuda" if torch.cuda.is_available() and not args.estimate else "cpu"  # an estimate's fake tensors: "cpu"
target = args.estimate_device if args.estimate else device  # the device the figures are for
args.dtype = args.dtype or ("bf16" if target == "cuda" else "fp32")
if args.dtype == "fp16" and target == "cpu":
    die("--dtype fp16 is a GPU's: use fp32 or bf16 on a CPU (or --estimate for a GPU's figures)")
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
# torch's default thread count is OMP_NUM_THREADS or the cores it sees; at most the CPUs this process may run on (a
# container's or a taskset's share): more threads than CPUs take turns on them, many times slower
args.threads = args.threads or min(torch.get_num_threads(), len(os.sched_getaffinity(0)))
torch.set_num_threads(args.threads)
torch.manual_seed(0)

# -----------------------------------------------------------------------------
# the model


try:
    blocks = tuple(map(int, args.flux_blocks.split(","))) if args.flux_blocks else FLUX_BLOCKS
    build_device = "meta" if args.estimate else device  # meta: shapes without memory, for FakeStep.fake
    sd = build_arch(args.arch, build_device, dtype, blocks) if args.arch else load_sd(args.model, device, dtype)
except ModelLoadError as e:
    die(str(e))
resolution = args.resolution or native_resolution(sd)
try:
    latent_shape(sd, resolution)  # the model's multiple: its VAE's downsampling (times SD3's / FLUX's 2x2 tokens)
except ValueError as e:
    die(f"--{e}")
try:
    check_decode_tile(sd, args.decode_tile, resolution)
except ValueError as e:
    die(f"--decode-tile {e}")
if args.cfg_in_turn and sd.flux:
    die("--cfg-in-turn takes CFG's two halves in turn: FLUX has none (its guidance is an embedding)")
parts = dict(unet=sd.unet, vae=sd.vae, text_encoders=[sd.text_encoder, sd.text_encoder_2, sd.text_encoder_3])
fake = FakeStep() if args.estimate else contextlib.nullcontext()  # an estimate: every tensor fake from here on
# an estimate for a GPU: wherever the CPU's autocast is on (the recomputations in backward too), CUDA's policy
cuda_policy = CudaAutocast() if args.estimate and target == "cuda" else contextlib.nullcontext()
if args.base_dtype == "fp8":  # before the weights are made fake: quantizing reads them. As train.py: the text encoders
    for m in (sd.unet, *sd.text_encoders):  # too
        base_to_fp8(m)
if args.estimate:
    for m in (sd.unet, sd.vae, *parts["text_encoders"]):
        if m is not None:
            fake.fake(m)
if args.guidance is None:  # each pipeline's default: StableDiffusion3Pipeline's, FluxPipeline's, SD's
    args.guidance = 3.5 if sd.flux else 7.0 if sd.flow else 7.5
if args.checkpoint_blocks:  # diffusers' own, per block: active wherever the model runs with grad (a recomputation)
    sd.unet.enable_gradient_checkpointing()
sample_chain = flow_sample if sd.flow else ddim_sample  # the same arguments: the flow's SDE noise level for eta (0)
model_mb = sum(t.numel() * t.element_size() for m in (sd.unet, sd.vae, sd.text_encoder, sd.text_encoder_2,
                                                      sd.text_encoder_3) if m
               for t in [*m.parameters(), *m.buffers()]) / 2**20
with fake:
    params = inject_lora(sd.unet, rank=4, dtype=torch.float32)
opt = torch.optim.AdamW(params, lr=1e-4)
if args.channels_last:
    sd.unet.to(memory_format=torch.channels_last)
    sd.vae.to(memory_format=torch.channels_last)
if args.compile:
    sd.unet = torch.compile(sd.unet)
autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)
scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16 and not args.estimate)  # fake: no inf checks
try:
    reward_fn = ((lambda images, prompts: -(images[..., 1:] - images[..., :-1]).abs().mean((1, 2, 3)))  # smooth
                 if args.reward == "smooth" else load_reward(args.reward, device, dtype))
except RewardLoadError as e:  # its weights neither in the cache nor downloadable
    die(str(e))
prompts = ["a photo of a cat", "a dog", "a horse", "a monkey"]
prompts = [prompts[i % len(prompts)] for i in range(args.batch_size)]
with torch.no_grad(), autocast, fake, cuda_policy:
    cond, uncond = encode_prompts(sd, prompts), encode_prompts(sd, [""] * len(prompts))
    noise = torch.randn(args.batch_size, *latent_shape(sd, resolution), generator=torch.Generator().manual_seed(0))
    noise = noise.to(device)

# -----------------------------------------------------------------------------
# one run of each mode, and how to measure it


rng = torch.Generator().manual_seed(1)  # random K and DRaFT-LV noise: a new draw on every run


def run(mode, steps, keep_activations):
    """One run of a mode, its phases labelled for TensorMemory's peak (step_memory.phase)."""
    phase("chain forward")
    if mode == "sample":
        with torch.no_grad(), autocast:
            latents = sample_chain(sd, cond, uncond, noise, steps, args.guidance, 0.0)
            phase("decoder forward")
            decode(sd, latents)
        return
    backprop = backprop_of(mode, steps)
    with autocast:
        latents = sample_chain(sd, cond, uncond, noise, steps, args.guidance, 0.0, backprop, rng, keep_activations,
                               args.cfg_in_turn)
        latents.register_hook(lambda grad: phase("chain backward"))  # the decoder's backward is done
        phase("decoder forward")
        images = decode(sd, latents, args.decode_tile)
        phase("reward")
        loss = -reward_fn(images.float(), prompts * (len(images) // len(prompts))).mean()
    phase("decoder backward")
    scaler.scale(loss).backward()
    phase("optimiser step")
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


def describe(mode, steps):
    name, _, n = mode.partition(":")
    return {"sample": "none (no_grad)", "all": f"all {steps}", "rand": f"K ~ U{{1..{steps}}}", "lv": f"DRaFT-LV, N={n}",
            "drtune": f"DRTune, N={n}", "onestep": f"Direct-Align, F={n}"}.get(name, f"last {mode}")


def backprop_of(mode, steps):
    return (1, steps) if mode == "rand" else parse_backprop(mode, steps)


def keep_for(mode, steps):
    """--keep-activations for this mode: N as given, or with auto what train.py would choose: the steps whose
    measured activations fit the budget above the peak of a run that recomputes every step (measured here)."""
    if args.keep_activations != "auto":
        return int(args.keep_activations)
    for _ in range(args.warmup):  # allocator caches and optimiser state first, as train.py's first step has them
        run(mode, steps, 0)
    peak = memory(lambda: run(mode, steps, 0), tensors=False)[0] * 2**20
    with autocast:
        return activations_to_keep(sd, cond, uncond, noise, steps, args.guidance, 0.0, backprop_of(mode, steps), peak,
                                   memory_budget(args.memory_budget, device))[0]


def sync():
    if device == "cuda":
        torch.cuda.synchronize()


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory(fn, tensors=True, rss=True):
    """(peak MB of the process while fn() runs, peak MB that fn() itself allocated, the phase of run() at the latter).
    On a GPU both come from CUDA's allocator (no phase); on a CPU the first is the resident set size sampled every
    millisecond, the second TensorMemory's (each a run of its own: rss=False skips the first, NaN)."""
    if device == "cuda":
        sync()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync()
        return torch.cuda.max_memory_allocated() / 2**20, (torch.cuda.max_memory_allocated() - before) / 2**20, None, {}
    if not rss:
        with TensorMemory() as tensors:
            fn()
        return float("nan"), tensors.peak / 2**20, tensors.peak_phase, mb_by_phase(tensors.peaks)
    peaks, done = [rss_mb()], threading.Event()

    def watch():
        while not done.wait(0.001):
            peaks.append(rss_mb())
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        fn()
    finally:
        done.set()
        watcher.join()
    if not (args.tensor_memory and tensors):
        return max(peaks + [rss_mb()]), float("nan"), None, {}
    with TensorMemory() as tensors:  # a second run: the dispatch mode slows it, so RSS is sampled without it
        fn()
    return max(peaks + [rss_mb()]), tensors.peak / 2**20, tensors.peak_phase, mb_by_phase(tensors.peaks)


def mb_by_phase(peaks):
    return {name: v / 2**20 for name, v in peaks.items()}


def seconds(fn, repeats, warmup):
    """The median of `repeats` timed runs of fn after `warmup` untimed ones; NaN with repeats 0 (memory only)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] if times else float("nan")


memory_name = "peak alloc" if device == "cuda" else "peak RSS"
blocks = (f" with {args.flux_blocks} double,single blocks (of {FLUX_BLOCKS[0]},{FLUX_BLOCKS[1]})" if args.flux_blocks
          else "")
header = (f"{args.arch or args.model}{blocks}: {resolution}px, batch {args.batch_size}, "
          f"{'guidance (embedded)' if sd.flux else 'CFG'} {args.guidance}, {args.dtype}, "
          f"{device} ({torch.cuda.get_device_name() if device == 'cuda' else f'{torch.get_num_threads()} threads'})"
          f"{', compiled' if args.compile else ''}{', channels_last' if args.channels_last else ''}; "
          f"model {model_mb:.0f} MB")
results = dict(config=dict(vars(args), device=device, resolution=resolution, model_mb=model_mb), rows=[])

# -----------------------------------------------------------------------------
# the sweeps: each point a full-backprop step, timed in a fresh process (sweep_point)

if args.sweep_point:
    steps, keep = args.sweep_point.split(",")
    steps = int(steps)
    keep = keep_for("all", steps) if keep == "auto" else int(keep)
    for _ in range(args.warmup):  # allocator caches, lazy initialisations, optimiser state
        run("all", steps, keep)
    s = seconds(lambda: run("all", steps, keep), args.repeats, 0) if args.repeats else float("nan")  # 0: untimed
    peak, step_peak, _, _ = memory(lambda: run("all", steps, keep), rss=args.repeats > 0)  # untimed: tensor bytes only
    print(json.dumps(dict(ddim_steps=steps, checkpointed=keep == 0, kept=keep, seconds=s, peak_mb=peak,
                          step_mb=step_peak)))
    sys.exit(0)


def sweep_point(steps, keep, budget=0.0, repeats=1):
    """One full-backprop step with `keep` ("auto" or N) as a table row. Timed (repeats > 0) in a fresh process, so that
    no run inherits another's heap; untimed, it counts tensor bytes only, which are exact in any process: here."""
    if not repeats:
        return dict(ddim_steps=steps, checkpointed=keep == 0, kept=keep, seconds=float("nan"), peak_mb=float("nan"),
                    step_mb=memory(lambda: run("all", steps, keep), rss=False)[1])
    model = os.path.abspath(args.model) if os.path.exists(args.model) else args.model  # a directory, from ROOT too
    child = [sys.executable, "-m", "tools.bench", "--model", model, "--resolution", str(resolution),
             "--batch-size", str(args.batch_size), "--guidance", str(args.guidance), "--dtype", args.dtype,
             "--threads", str(args.threads), "--reward", args.reward, "--warmup", str(args.warmup),
             "--repeats", str(repeats), "--memory-budget", str(budget),
             *(["--arch", args.arch] if args.arch else []), *(["--no-tensor-memory"] if not args.tensor_memory else []),
             *(["--flux-blocks", args.flux_blocks] if args.flux_blocks else []),
             *(["--compile"] if args.compile else []), *(["--channels-last"] if args.channels_last else []),
             *(["--cfg-in-turn"] if args.cfg_in_turn else []),
             *(["--checkpoint-blocks"] if args.checkpoint_blocks else []),
             *(["--base-dtype", args.base_dtype] if args.base_dtype else []),
             "--decode-tile", str(args.decode_tile)]
    out = subprocess.run(child + ["--sweep-point", f"{steps},{keep}"], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        sys.exit(f"sweep point T={steps}, keep {keep}, budget {budget} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if args.estimate:
    T = args.sample_steps  # sampling only if --modes asks: each mode costs as many calls of the model as it runs

    def mb(tensors):
        return sum(t.numel() * t.element_size() for t in tensors) / 2**20
    lora_mb = mb(params)
    unet_mb = mb([*sd.unet.parameters(), *sd.unet.buffers()]) - lora_mb
    vae_mb = mb([*sd.vae.parameters(), *sd.vae.buffers()])
    encoders = full_depth_text_encoders(sd, dtype) if args.arch in FLOW_ARCHS else sd.text_encoders
    for m in encoders if args.base_dtype == "fp8" and args.arch in FLOW_ARCHS else ():
        base_to_fp8(m)
    text_mb = mb(t for m in encoders for t in [*m.parameters(), *m.buffers()])  # alone on the device, encoding
    fake.real_scalars = True
    with fake:
        for w in params:  # AdamW's state as a first step leaves it: two fp32 moments per LoRA weight
            w.grad = torch.zeros_like(w)
        opt.step()
        opt.zero_grad(set_to_none=True)
    state_mb = mb(t for state in opt.state.values() for t in state.values())
    kept = args.keep_activations if args.keep_activations != "auto" else "0 (auto needs the device's free memory)"
    policy_note = " under CUDA's autocast policy" if target == "cuda" and dtype != torch.float32 else ""
    print(f"{args.arch or args.model}{blocks}: {resolution}px, batch {args.batch_size}, {T} steps, "
          f"{'guidance (embedded)' if sd.flux else 'CFG'} {args.guidance}, {args.dtype}; an estimate for {target}"
          f"{policy_note}, on fake tensors; "
          f"--keep-activations {kept}")
    print(f"weights: UNet {unet_mb:.0f} MB, VAE {vae_mb:.0f} MB, LoRA rank 4 {lora_mb:.1f} MB, AdamW state "
          f"{state_mb:.1f} MB; the text encoders' {text_mb:.0f} MB are on the device alone, before the rest, while "
          f"they encode the prompts (train.py then frees them)")
    print(f"{'mode':>11} {'backprop':>18} {'kept':>5} {'step MB':>9} {'peak in':>17} {'total GB':>9} {'whole GB':>9}")

    def counted(mode, steps, keep):
        """Each phase's peak bytes in one step of `mode` with `steps` sampling steps, on fake tensors."""
        with fake, cuda_policy, TensorMemory() as mem:
            run(mode, steps, keep)
        return mem.peaks

    def takes(mode, steps):
        try:
            return mode == "sample" or backprop_of(mode, steps) is not None
        except ValueError:
            return False

    def estimate(mode, steps, keep):
        """Each phase's peak at `steps` sampling steps. A phase's peak is affine in the number of steps (each step adds
        what its checkpoint keeps, or nothing; a step's own activations are the same at every step), so it is counted
        at the two smallest step counts the mode takes (at least `keep`, so that as many steps keep activations) and
        extended along that line: T = 20 costs what 3 + 4 steps cost (tests/test_bench.py checks every phase against
        real steps)."""
        first = next(t for t in range(max(keep, 1), steps + 1) if takes(mode, t))
        # with gradients the line starts where each kind of step the mode has is there, the last (its gradient from
        # the decoder), the window's first and one between: a window that reaches the chain's first step (T = K,
        # DRTune's N) gives it the initial noise, which needs no gradient (docs/speed-and-memory.md: on tiny, full
        # backprop's third step adds more than a latent to the chain's backward, every step after it one latent)
        if mode != "sample":
            first += 2 if mode == "all" or mode.startswith("drtune:") else 1
        if steps <= first + 1:
            return counted(mode, steps, keep)
        a, b = counted(mode, first, keep), counted(mode, first + 1, keep)
        if a.keys() != b.keys():  # a phase that only more steps have: no line to extend
            return counted(mode, steps, keep)
        return {name: a[name] + (steps - first) * (b[name] - a[name]) for name in a}

    for mode in modes:
        keep = 0 if mode == "sample" or args.keep_activations == "auto" else int(args.keep_activations)
        what = describe(mode, T)
        if mode == "rand":  # a random K: the worst draw, the largest, K = T
            what, mode = what + ", at its largest", "all"
        peaks = estimate(mode, T, keep)
        peak_in = max(peaks, key=peaks.get)
        peak = peaks[peak_in]
        total = (unet_mb + vae_mb + lora_mb + state_mb + peak / 2**20) / 2**10
        whole = max(total, text_mb / 2**10)  # the step's total or the prompt encoding's weights, the larger
        results["rows"].append(dict(mode=mode, backprop=what, kept=keep, step_mb=peak / 2**20, peak_in=peak_in,
                                    total_gb=total, whole_run_gb=whole, phases_mb=mb_by_phase(peaks)))
        print(f"{mode:>11} {what:>18} {keep:>5} {peak / 2**20:>9.1f} {peak_in:>17} {total:>9.2f} {whole:>9.2f}")
    results.update(weights_mb=dict(unet=unet_mb, vae=vae_mb, text_encoders=text_mb, lora=lora_mb, adamw=state_mb))
    print("total: UNet + VAE + LoRA + AdamW + the step's peak, in GB (2^30 bytes); whole: the run's, the larger of "
          "total and the text encoders' weights" + (" (at their real depth: --arch builds one-layer stand-ins)" if
          args.arch in FLOW_ARCHS else "") + ". Not counted: the CUDA context, cuDNN / cuBLAS workspaces, the "
          "allocator's rounding and cache (reserved above allocated), the encoding's activations")

elif budget_sweep:
    print(header)
    T = args.sample_steps
    base = seconds(lambda: run("sample", T, 0), args.repeats, args.warmup)
    print(f"sampling: {base:.3f} s; a full-backprop step ({T} steps) against --memory-budget:")
    print(f"{'budget GB':>10} {'kept':>5} {'s/step':>8} {'x sample':>9} {memory_name + ' MB':>13} {'step MB':>9}")
    points = [("recompute all", "0", 0.0)] + [(f"{b:g}", "auto", b) for b in budget_sweep] + [("keep all", str(T), 0.0)]
    for name, keep, budget in points:
        row = dict(sweep_point(T, keep, budget, args.repeats), budget_gb=budget if keep == "auto" else None)
        row["ratio"] = row["seconds"] / base
        results["rows"].append(row)
        print(f"{name:>10} {row['kept']:>5} {row['seconds']:>8.3f} {row['ratio']:>9.2f} {row['peak_mb']:>13.1f} "
              f"{row['step_mb']:>9.1f}")

elif steps_sweep:
    print(header)
    print(f"{'steps':>10} {'checkpointed':>12} {'s/step':>8} {memory_name + ' MB':>13} {'step MB':>9} "
          f"{'step growth MB':>15}")
    if not args.repeats:  # untimed points run here: AdamW's state first, so that it does not count at the first alone
        run("all", min(steps_sweep), 0)
    for ckpt in (True, False):
        first = None
        for steps in steps_sweep:
            row = sweep_point(steps, 0 if ckpt else steps, repeats=min(args.repeats, 1))
            first = first if first is not None else row["step_mb"]
            row["growth_mb"] = row["step_mb"] - first
            results["rows"].append(row)
            print(f"{steps:>10} {'yes' if ckpt else 'no':>12} {row['seconds']:>8.2f} {row['peak_mb']:>13.1f} "
                  f"{row['step_mb']:>9.2f} {row['growth_mb']:>15.2f}")

# -----------------------------------------------------------------------------
# the modes

else:
    print(header)
    T = args.sample_steps
    modes = ["sample"] + [m for m in modes if m != "sample"]  # ratios are to sampling
    print(f"{'mode':>11} {'backprop':>18} {'kept':>5} {'s/step':>8} {'x sample':>9} {memory_name + ' MB':>13} "
          f"{'step MB':>9}")
    base = None
    for mode in modes:
        keep = 0 if mode == "sample" else keep_for(mode, T)
        s = seconds(lambda: run(mode, T, keep), args.repeats, args.warmup)
        peak, step_peak, peak_in, phases = memory(lambda: run(mode, T, keep), rss=args.repeats > 0)  # untimed: tensors
        base = base or s
        what = describe(mode, T)
        results["rows"].append(dict(mode=mode, backprop=what, kept=keep, seconds=s, ratio=s / base, peak_mb=peak,
                                    step_mb=step_peak, peak_in=peak_in, phases_mb=phases))
        print(f"{mode:>11} {what:>18} {keep:>5} {s:>8.3f} {s / base:>9.2f} {peak:>13.1f} {step_peak:>9.1f}")

if args.json:
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
