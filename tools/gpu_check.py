"""The GPU check: what the CPU test suite cannot tell, in one call of a few minutes on one CUDA GPU.

    python -m tools.gpu_check                # from the repository root: prints each check, writes gpu_check.json
    python -m tools.gpu_check --skip-bench   # the parity and gradient checks only

1. Parity on CUDA, fp32, on the offline miniatures (random weights, real classes): ddim_sample against diffusers'
   StableDiffusionPipeline and flow_sample against StableDiffusion3Pipeline, same weights and initial noise;
   LoRA gradients through the checkpointed chain (sampler.checkpoint: recomputed in backward) against the same chain
   keeping every activation (plain autograd), and against the CPU's. Tolerances are CUDA's rounding (TF32 off).
2. SD 1.5 at 512 px and SDXL at 1024 px (random weights, bf16, CFG 7.5, batch 1, every step recomputed): the mode
   table of tools/bench.py on the GPU at 20 steps, seconds per training step against sampling and
   torch.cuda.max_memory_allocated above the weights; then full backprop with --cfg-in-turn at 2 steps, its measured
   peak beside what tools/bench.py --estimate counted for the same step on a CPU (docs/estimates/*.json, made by the
   commands in docs/speed-and-memory.md): the estimate leaves out kernel workspaces and the allocator's rounding.

Nothing in tests/ depends on this script; the README's GPU figures come from its output, with the device's name.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository's
BENCH = {"sd15": ("512", "sd15-512-in-turn.json"), "sdxl": ("1024", "sdxl-1024-in-turn.json")}
MODES = "all,1,drtune:2"  # full backprop, K = 1, DRTune: the README's estimate table

p = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--skip-bench", action="store_true", help="the parity and gradient checks only")
p.add_argument("--json", default="gpu_check.json", help="where the results go")
args = p.parse_args()
if not torch.cuda.is_available():
    sys.exit("tools/gpu_check.py needs a CUDA GPU (the CPU's checks are the test suite: python -m pytest -q tests)")

from lora import inject_lora  # noqa: E402  (after the check: a clear message first)
from model import decode, encode_prompts, latent_shape, load_sd, native_resolution  # noqa: E402
from sampler import ddim_sample  # noqa: E402
from flow import flow_sample  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 in the parity
PROMPTS = ["a cat", "a red dog on the grass"]
results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, checks=[], bench={})


def check(name, error, tolerance):
    ok = error <= tolerance
    results["checks"].append(dict(name=name, error=error, tolerance=tolerance, ok=ok))
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max relative error {error:.2e} (tolerance {tolerance:.0e})", flush=True)


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def noise(sd, n=2, seed=0):
    return torch.randn(n, *latent_shape(sd, native_resolution(sd)), generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# 1. parity and gradients on CUDA

def sampler_parity(model):
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline
    sd = load_sd(model, "cuda")
    x = noise(sd).cuda()
    cond, uncond = encode_prompts(sd, PROMPTS), encode_prompts(sd, [""] * len(PROMPTS))
    with torch.no_grad():
        if sd.flow:
            ours = flow_sample(sd, cond, uncond, x, 12, 7.0, 0.0)
            pipe = StableDiffusion3Pipeline(transformer=sd.unet, vae=sd.vae, scheduler=sd.scheduler,
                                            text_encoder=sd.text_encoder, tokenizer=sd.tokenizer,
                                            text_encoder_2=sd.text_encoder_2, tokenizer_2=sd.tokenizer_2,
                                            text_encoder_3=sd.text_encoder_3, tokenizer_3=sd.tokenizer_3)
            pipe.set_progress_bar_config(disable=True)
            want = pipe(PROMPTS, latents=x.clone(), num_inference_steps=12, guidance_scale=7.0,
                        max_sequence_length=sd.max_sequence_length, output_type="latent").images
        else:
            ours = ddim_sample(sd, cond, uncond, x, 12, 7.5, 0.0)
            pipe = StableDiffusionPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer,
                                           unet=sd.unet, scheduler=sd.scheduler, safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
            pipe.set_progress_bar_config(disable=True)
            want = pipe(PROMPTS, latents=x.clone(), num_inference_steps=12, guidance_scale=7.5,
                        output_type="latent").images
    check(f"{model}: our sampler == diffusers' pipeline on CUDA (12 steps, CFG)", rel(ours, want), 1e-4)


def lora_gradients(model, device, keep):
    """LoRA gradients of a reward through all 6 steps of the chain and the decoder."""
    sd = load_sd(model, device)
    params = inject_lora(sd.unet, rank=2)
    generator = torch.Generator().manual_seed(0)  # drawn on the CPU: the same LoRA weights on either device
    with torch.no_grad():
        for w in params:  # non-zero up matrices, so that every LoRA tensor gets a gradient
            w.copy_(torch.randn(w.shape, generator=generator) * 0.05)
    cond, uncond = encode_prompts(sd, PROMPTS), encode_prompts(sd, [""] * len(PROMPTS))
    sample = flow_sample if sd.flow else ddim_sample
    latents = sample(sd, cond, uncond, noise(sd).to(device), 6, 5.0, 0.0, "all", None, keep)
    images = decode(sd, latents)
    loss = -(images[..., 1:] - images[..., :-1]).abs().mean()  # tools/bench.py's smooth reward
    return torch.cat([g.flatten().cpu() for g in torch.autograd.grad(loss, params)])


for model in ("tiny", "tiny-sd3"):
    sampler_parity(model)
    recomputed = lora_gradients(model, "cuda", keep=0)
    check(f"{model}: checkpointed gradients == kept activations' (plain autograd), CUDA",
          rel(recomputed, lora_gradients(model, "cuda", keep=6)), 1e-4)
    check(f"{model}: CUDA gradients == the CPU's", rel(recomputed, lora_gradients(model, "cpu", keep=0)), 1e-3)

# -----------------------------------------------------------------------------
# 2. the real architectures: measured beside the estimate


def bench(arch, resolution, *flags):
    """tools/bench.py's mode table on this GPU: its rows (seconds per step, ratio to sampling, step_mb:
    max_memory_allocated above what was allocated before the step), or the error's last lines."""
    out = os.path.join(ROOT, f".gpu_check_{arch}.json")
    proc = subprocess.run([sys.executable, "-m", "tools.bench", "--arch", arch, "--resolution", resolution,
                           "--dtype", "bf16", "--keep-activations", "0", "--warmup", "1", "--json", out, *flags],
                          cwd=ROOT, capture_output=True, text=True)
    print(proc.stdout, proc.stderr[-2000:] if proc.returncode else "", flush=True)
    if proc.returncode:
        return dict(error=proc.stderr[-2000:])
    with open(out) as f:
        rows = json.load(f)["rows"]
    os.remove(out)
    return rows


if not args.skip_bench:
    for arch, (resolution, estimate_file) in BENCH.items():
        start = time.time()
        # 20 steps, CFG batched: seconds against sampling, the measured peak
        batched = bench(arch, resolution, "--sample-steps", "20", "--modes", MODES, "--repeats", "2")
        # 2 steps, CFG's halves in turn: the measured peak beside the estimate of the same step
        in_turn = bench(arch, resolution, "--sample-steps", "2", "--modes", "all", "--cfg-in-turn", "--repeats", "1")
        results["bench"][arch] = dict(resolution=int(resolution), batched=batched, in_turn=in_turn)
        estimate_path = os.path.join(ROOT, "docs", "estimates", estimate_file)
        if isinstance(in_turn, list) and os.path.isfile(estimate_path):
            with open(estimate_path) as f:
                estimate = {row["mode"]: row for row in json.load(f)["rows"]}
            for row in in_turn:
                if row["mode"] in estimate:
                    row["estimate_mb"] = estimate[row["mode"]]["step_mb"]
                    ratio = row["step_mb"] / row["estimate_mb"]
                    print(f"{arch} {resolution} px, --cfg-in-turn, 2 steps, {row['mode']}: measured "
                          f"{row['step_mb']:.1f} MB, estimated {row['estimate_mb']:.1f} MB ({ratio:.2f}x); "
                          f"{row['seconds']:.3f} s/step", flush=True)
        print(f"{arch}: {time.time() - start:.0f} s", flush=True)

with open(args.json, "w") as f:
    json.dump(results, f, indent=2)
failed = [c["name"] for c in results["checks"] if not c["ok"]]
print(f"{len(results['checks']) - len(failed)} of {len(results['checks'])} checks passed on {results['device']}; "
      f"results in {args.json}")
sys.exit(1 if failed else 0)
