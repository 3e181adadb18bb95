"""tools/bench.py runs and prints its table, on the DDIM and the rectified-flow miniatures; memory is flat in the number
of DDIM steps with checkpointing (measured, not timed: tensor bytes counted exactly, which needs no fresh process per
point, unlike RSS). All run in the test process (conftest.run_here): nothing they check depends on the process's RSS.
The tensor counter itself (step_memory.TensorMemory) is checked against bytes computed by hand."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_here
from tools.step_memory import CudaAutocast, FakeStep, TensorMemory


def bench(tmp_path, monkeypatch, *args):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # already "set": bench does not re-execute itself
    out = tmp_path / "bench.json"
    proc = run_here("tools/bench.py", *args, "--json", out)
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.parametrize("args, message", [
    (["--modes", "all,nonsense"], "--modes 'nonsense': expected all, K, lo,hi, lv:N, drtune:N or onestep:F"),
    (["--modes", "onestep:2"], "--modes 'onestep:2': the one-step noise level F needs 0 < F <= 1"),  # was: a traceback
    (["--modes", "drtune:5", "--sample-steps", "4"], "'drtune:5': DRTune trains N steps, 1 <= N <= the number of "
     "sampling steps (4)"),  # checked against --sample-steps, before the sample mode is timed
    (["--threads", "-1"], "--threads must be an integer >= 0, got -1"),
    (["--steps-sweep", "a,b"], "--steps-sweep must be a comma list of integers > 0, got a,b"),
    (["--steps-sweep", "10,0"], "--steps-sweep must be a comma list of integers > 0, got 10,0"),
    (["--budget-sweep", "-1"], "--budget-sweep must be a comma list of numbers > 0, got -1"),  # was: nonsense rows
    (["--budget-sweep", "0.8,nan"], "--budget-sweep must be a comma list of numbers > 0, got 0.8,nan"),
    (["--budget-sweep", "1", "--repeats", "0"], "--budget-sweep times its points: --repeats must be >= 1"),
    (["--budget-sweep", "1", "--steps-sweep", "2"], "give one of them"),  # the budget sweep once won, silently
    (["--json", "/proc/bench.json"], "--json /proc/bench.json: cannot write in /proc ("),  # was: after the benchmark
    (["--json", "{tmp}"], "is a directory, not a file"),
    (["--flux-blocks", "99,99", "--arch", "flux"], "1 <= D <= 19 double-stream and 1 <= S <= 38 single-stream "
     "blocks, got 99,99"),  # was: a model of 99 + 99 blocks, silently
    (["--flux-blocks", "1,2"], "--flux-blocks D,S needs --arch flux"),
    (["--resolution", "50"], "--resolution 50 is not divisible by 8 (the VAE's downsampling factor)"),  # was: an
    (["--resolution", "72", "--model", "tiny-flux"], "--resolution 72 is not divisible by 16"),  # AssertionError
    (["--resolution", "-64"], "--resolution must be an integer >= 0, got -64"),
    (["--repeats", "-1"], "--repeats must be an integer >= 0, got -1"),
    (["--warmup", "-1"], "--warmup must be an integer >= 0, got -1"),
    (["--sample-steps", "0"], "--sample-steps must be an integer >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--memory-budget", "nan"], "--memory-budget must be a finite number >= 0, got nan"),
    (["--memory-budget", "-1"], "--memory-budget must be a finite number >= 0, got -1.0"),
    (["--guidance", "inf"], "--guidance must be a finite number >= 0, got inf"),
    (["--guidance", "-1"], "--guidance must be a finite number >= 0, got -1.0"),
    (["--dtype", "fp16"], "--dtype fp16 is a GPU's"),
    (["--cfg-in-turn", "--model", "tiny-flux"], "FLUX has none (its guidance is an embedding)"),
    (["--keep-activations", "most"], "--keep-activations must be auto or an integer >= 0, got most"),
    (["--reward", "nonsense"], "--reward: unknown reward 'nonsense'"),  # was: a traceback after the model loaded
    (["--reward", "jpeg"], "--reward jpeg has no gradient"),  # was: a traceback from backward
    (["--estimate", "--reward", "compress"], "--estimate takes the smooth reward and the mode table"),
    (["--model", "{tmp}/no/such/dir"], "no such model directory"),
    (["--decode-tile", "48"], "--decode-tile must be 0 (off) or a multiple of 32 pixels, at least 64"),
    (["--decode-tile", "64"], "--decode-tile 64: a tile of the whole 64-px image or more decodes it whole"),
])
def test_bad_flags_are_one_line_and_exit_2_before_any_work(tmp_path, monkeypatch, args, message):
    # each refused before anything is timed (nothing on stdout: no header, no row), most before the model loads
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # already "set": bench does not re-execute itself
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = run_here("tools/bench.py", *args, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
    assert proc.stdout == ""


def test_bench_reexecutes_itself_as_a_module(tmp_path):
    # python -m tools.bench from the root, as the docs run it: without MALLOC_MMAP_THRESHOLD_ it re-executes itself,
    # as -m tools.bench (under -m, argv[0] is the file, which run as a script would not find the root's modules), and
    # the re-executed process refuses a bad flag in one line
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    proc = subprocess.run([sys.executable, "-m", "tools.bench", "--modes", "nonsense"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.splitlines() == ["error: --modes 'nonsense': expected all, K, lo,hi, lv:N, drtune:N or "
                                        "onestep:F"], proc.stderr


def test_memory_is_flat_in_the_number_of_steps(tmp_path, monkeypatch):
    # 128 px: one step's activations (12 MB) dwarf the tiny model's 5 MB of weights. The tensor bytes it checks are
    # exact in any process (fresh processes and warm-up runs are for the timing and RSS columns)
    _, res = bench(tmp_path, monkeypatch, "--steps-sweep", "2,6", "--resolution", "128", "--warmup", "0",
                   "--repeats", "0")
    model_mb = res["config"]["model_mb"]
    growth = {row["checkpointed"]: row["growth_mb"] for row in res["rows"] if row["ddim_steps"] == 6}
    assert 0 <= growth[True] < 0.05 * model_mb, growth  # 4 more latents of 4 KB, nothing else
    assert growth[False] > 5 * model_mb, growth  # the measurement does see activations when they are kept


def test_bench_prints_every_mode(tmp_path, monkeypatch):
    stdout, res = bench(tmp_path, monkeypatch, "--repeats", "1", "--warmup", "0", "--ddim-steps", "4")
    assert [row["mode"] for row in res["rows"]] == ["sample", "all", "1", "rand", "lv:2", "drtune:2", "onestep:0.6"]
    assert all(row["seconds"] > 0 and row["step_mb"] > 0 for row in res["rows"])
    kept = {row["mode"]: row["kept"] for row in res["rows"]}  # auto on a CPU: half the RAM fits every step here
    assert kept == {"sample": 0, "all": 4, "1": 1, "rand": 4, "lv:2": 1, "drtune:2": 2, "onestep:0.6": 1}
    assert "x sample" in stdout and "DRaFT-LV, N=2" in stdout and "DRTune, N=2" in stdout
    assert "Direct-Align, F=0.6" in stdout
    assert 1 <= res["config"]["threads"] <= len(os.sched_getaffinity(0))  # never more threads than CPUs to run on


def test_bench_runs_the_flow_miniatures(tmp_path, monkeypatch):
    # SD3 and FLUX go through flow.flow_sample, each at its pipeline's default guidance (SD3's CFG 7.0, FLUX's
    # embedded 3.5); --sample-steps is the flag's neutral name (--ddim-steps above: its alias)
    for model, guidance in (("tiny-sd3", "CFG 7.0"), ("tiny-flux", "guidance (embedded) 3.5")):
        stdout, res = bench(tmp_path, monkeypatch, "--model", model, "--modes", "sample,all,onestep:0.6",
                            "--sample-steps", "2", "--repeats", "1", "--warmup", "0", "--no-tensor-memory")
        assert [row["mode"] for row in res["rows"]] == ["sample", "all", "onestep:0.6"], model
        assert all(row["seconds"] > 0 and row["peak_mb"] > 0 for row in res["rows"]), model
        assert f"{model}: 64px, batch 1, {guidance}" in stdout and "Direct-Align, F=0.6" in stdout


def test_tensor_memory_counts_new_storages_only():
    # fp32, 4 bytes a number. A Linear 64 -> 32 on x (8, 64): forward makes y (8, 32) = 1024 bytes (its weight's
    # transpose is a view, not memory); backward from a given gradient makes dW (32, 64) = 8192 and db (32,) = 128
    lin, x, g = torch.nn.Linear(64, 32), torch.randn(8, 64), torch.randn(8, 32)
    with TensorMemory() as mem:
        y = lin(x)
        assert mem.live == 8 * 32 * 4
        y.backward(g)
    assert mem.peak == mem.live == (8 * 32 + 32 * 64 + 32) * 4
    with TensorMemory() as mem:  # weights are never counted: under no_grad only the output is new
        with torch.no_grad():
            lin(x)
        views = x.view(64, 8).t()[2:].unsqueeze(0).transpose(1, 2)  # a chain of views: nothing new
        x.mul_(2)  # in place: nothing new
        assert mem.live == 0 and mem.peak == 8 * 32 * 4
        z = views * 2  # out of place: exactly its output, (1, 64, 6)
        assert mem.live == 64 * 6 * 4
        del z
        assert mem.live == 0 and mem.peak == 64 * 6 * 4  # freed, and the peak was z's


def test_bench_measures_memory_without_timing(tmp_path, monkeypatch):
    # --repeats 0 outside a sweep: no timed run, the tensor bytes only (it used to end in an IndexError)
    stdout, res = bench(tmp_path, monkeypatch, "--repeats", "0", "--warmup", "0", "--sample-steps", "2", "--modes",
                        "all", "--keep-activations", "0")
    assert [row["mode"] for row in res["rows"]] == ["sample", "all"]
    assert all(math.isnan(row["seconds"]) and row["step_mb"] > 0 for row in res["rows"]), res["rows"]


@pytest.mark.parametrize("levers", [[], ["--checkpoint-blocks"], ["--resolution", "128", "--decode-tile", "64"],
                                    ["--base-dtype", "fp8"]])
def test_estimate_equals_the_real_step_to_the_byte(tmp_path, monkeypatch, levers):
    # the same step on fake tensors (--estimate, for this CPU) and for real (--repeats 0: counted, not timed), fp32:
    # the same tensors, so the same bytes at every moment: the same peak in every phase (but the optimiser's, where
    # the real run makes AdamW's state: the estimate counts it apart). At 5 steps the estimate counts 3 and 4 steps
    # (K = 1: 2 and 3) and extends the line to 5: exact too
    common = ["--sample-steps", "5", "--modes", "all,1", "--keep-activations", "0", "--repeats", "0",
              "--warmup", "0", *levers]  # AdamW's state, made after the first step's peak, is not at its peak
    _, real = bench(tmp_path, monkeypatch, *common)
    stdout, fake = bench(tmp_path, monkeypatch, *common, "--estimate", "--estimate-device", "cpu")
    def phases(row):
        return {name: mb for name, mb in row["phases_mb"].items() if name != "optimiser step"}
    assert [(r["mode"], phases(r), r["step_mb"], r["peak_in"]) for r in fake["rows"]] == \
        [(r["mode"], phases(r), r["step_mb"], r["peak_in"]) for r in real["rows"][1:]]  # [0]: sampling
    peak_in = "chain backward" if "--decode-tile" in levers else "decoder backward"  # a tile's backward is small
    assert [r["peak_in"] for r in fake["rows"]] == [peak_in, peak_in]
    assert "an estimate for cpu" in stdout and "Not counted: the CUDA context" in stdout


def test_cuda_autocast_policy_on_the_cpu():
    # a GroupNorm (8 groups of 32 channels) on bf16 activations x (2, 32, 8, 8), 4096 numbers, under autocast. CUDA's
    # runs it in fp32: x's fp32 copy and the fp32 output (16384 bytes each), mean and rstd (2, 8) in fp32 (64 each),
    # its weight's fp32 copy, saved for backward (128), and its bias's (128), freed at once. The CPU's runs it in bf16:
    # the output (8192) and mean and rstd in bf16 (32 each)
    norm = torch.nn.GroupNorm(8, 32).to(torch.bfloat16)
    x = torch.randn(2, 32, 8, 8, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), CudaAutocast(), TensorMemory() as cuda:
        y = norm(x)
    assert y.dtype == torch.float32
    assert (cuda.live, cuda.peak) == (2 * 16384 + 2 * 64 + 128, 2 * 16384 + 2 * 64 + 2 * 128)
    with torch.autocast("cpu", dtype=torch.bfloat16), TensorMemory() as cpu:
        y = norm(x)
    assert y.dtype == torch.bfloat16
    assert cpu.live == cpu.peak == 8192 + 2 * 32


def test_cuda_autocast_policy_holds_in_the_recomputation_in_backward():
    # a checkpointed stage recomputes its forward inside backward, under the forward's autocast (sampler.checkpoint):
    # CUDA's runs its GroupNorm in fp32 both times. A mode's handler runs with the mode off, so without CudaAutocast
    # running backward itself the recomputation was the CPU's, in bf16 (SD 1.5's estimate at 512 px missed 641 MB of
    # the 1844 MB an H200 measured in the decoder's backward)
    from sampler import checkpoint
    norm, conv = torch.nn.GroupNorm(8, 32).to(torch.bfloat16), torch.nn.Conv2d(32, 32, 1).to(torch.bfloat16)
    dtypes = []
    norm.register_forward_hook(lambda module, inputs, out: dtypes.append(out.dtype))
    weights = [w.requires_grad_() for w in conv.parameters()]
    x = torch.randn(2, 32, 8, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), CudaAutocast(), TensorMemory() as cuda:
        checkpoint([lambda t: conv(norm(t))], x, weights).float().sum().backward()
    assert dtypes == [torch.float32, torch.float32]  # the forward, then its recomputation in backward
    assert all(w.grad is not None for w in weights)
    dtypes.clear()  # nested: the inner stage is recomputed inside the outer's torch.autograd.grad (as the halves of
    with torch.autocast("cpu", dtype=torch.bfloat16), CudaAutocast():  # --cfg-in-turn are inside a chain step's)
        checkpoint([lambda t: checkpoint([lambda u: conv(norm(u))], t, weights)], x, weights).float().sum().backward()
    assert dtypes == [torch.float32] * 3  # the forward, the outer recomputation, the inner one
    with torch.autocast("cpu", dtype=torch.bfloat16), TensorMemory() as cpu:
        checkpoint([lambda t: conv(norm(t))], x, weights).float().sum().backward()
    # the recomputation's fp32 copy of x and fp32 output (16384 bytes each) where the CPU's holds a bf16 output (8192)
    assert cuda.peak - cpu.peak >= 2 * 16384 - 8192


def test_decode_runs_a_half_precision_vae_in_its_own_dtype():
    # train.py on a GPU runs under autocast; the VAE decodes in its own dtype with autocast off, as diffusers' pipelines
    # run it: its GroupNorms in bf16, forward and recomputation alike, where CUDA's policy would hold fp32 copies of
    # full-resolution activations (SD 1.5 at 512 px, --cfg-in-turn: the step's peak 1779 -> 1203 MB by the estimate).
    # backward is called inside autocast here: the recomputation restores the forward's autocast, off
    from model import decode, latent_shape, load_sd, native_resolution
    sd = load_sd("tiny", "cpu", torch.bfloat16)
    dtypes = []
    sd.vae.decoder.conv_norm_out.register_forward_hook(lambda module, inputs, out: dtypes.append(out.dtype))
    latents = torch.randn(1, *latent_shape(sd, native_resolution(sd)), requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), CudaAutocast():
        decode(sd, latents).mean().backward()
    assert dtypes == [torch.bfloat16, torch.bfloat16] and latents.grad is not None


def test_fake_step_keeps_fake_what_fake_tensor_mode_runs_inside_an_op():
    """A bf16 Linear on the CPU goes through addmm's decomposition, which makes fp32 copies with empty_strided (no
    tensor argument): FakeStep once ran that for real, and every activation after it (SD 1.5's estimate at 512 px
    took 605 s instead of 85). Its output, and the bytes, are fake; a real scalar op still runs for real."""
    from torch._subclasses.fake_tensor import FakeTensor
    mode = FakeStep()
    linear = mode.fake(torch.nn.Linear(32, 64).to("meta", torch.bfloat16))
    with mode:
        x = torch.randn(8, 32, dtype=torch.bfloat16)
    mode.real_scalars = True
    with mode, torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear(x)
        t = torch.arange(4) * 2  # no fake tensor in sight: a real table, as the sampler reads
    assert isinstance(y, FakeTensor) and y.shape == (8, 64)
    assert not isinstance(t, FakeTensor) and t.tolist() == [0, 2, 4, 6]


def test_estimate_runs_the_flow_miniatures(tmp_path, monkeypatch):
    # the default estimate, for a GPU in bf16, through flow.flow_sample: SD3's CFG batch and FLUX's packed tokens
    for model, mode in (("tiny-sd3", "all"), ("tiny-flux", "onestep:0.6")):
        stdout, res = bench(tmp_path, monkeypatch, "--model", model, "--estimate", "--sample-steps", "1", "--modes",
                            mode)
        assert [r["mode"] for r in res["rows"]] == [mode], model
        assert all(r["step_mb"] > 0 and r["total_gb"] > 0 for r in res["rows"]), model
        assert "bf16; an estimate for cuda under CUDA's autocast policy" in stdout, stdout


def test_the_real_architectures_have_their_published_sizes():
    """--arch builds the published configs (on the meta device here: shapes without memory): the denoisers' parameter
    counts are the model cards' (SD 3.5 Large 8.1B, SD 3.5 Medium 2.2B of MMDiT-X)."""
    from tools.archs import build_arch
    for arch, billions in (("sd35m", 2.24), ("sd35l", 8.06)):
        sd = build_arch(arch, "meta", torch.bfloat16)
        assert sum(p.numel() for p in sd.unet.parameters()) / 1e9 == pytest.approx(billions, abs=0.01), arch


def test_the_flow_archs_text_encoders_at_full_depth_have_their_published_sizes():
    """What --estimate counts for encoding the prompts on SD3.5 / FLUX (their --arch has one-layer stand-ins): CLIP
    ViT-L/14's text tower 123M parameters, OpenCLIP bigG/14's 695M, T5-XXL's encoder 4.76B (8.87 GB in bf16)."""
    from tools.archs import build_arch, full_depth_text_encoders
    for arch, millions in (("sd35m", [124, 695, 4762]), ("flux", [123, 4762])):
        encoders = full_depth_text_encoders(build_arch(arch, "meta", torch.bfloat16), torch.bfloat16)
        assert [round(sum(p.numel() for p in m.parameters()) / 1e6) for m in encoders] == millions, arch


def test_a_tiled_decode_holds_one_tile_in_backward():
    """decode(tile=...): the decoder's backward recomputes one tile at a time, so its peak follows the tile's area,
    not the image's (the tiny model at 256 px: 16 tiles of 64 px, each a sixteenth of the image's area)."""
    from model import decode, latent_shape, load_sd
    sd = load_sd("tiny")
    latents = torch.randn(1, *latent_shape(sd, 256))
    peaks = {}
    for tile in (0, 64):
        x = latents.clone().requires_grad_()
        with TensorMemory() as mem:
            decode(sd, x, tile).mean().backward()
        peaks[tile] = mem.peak
    assert peaks[64] < peaks[0] / 4, peaks
