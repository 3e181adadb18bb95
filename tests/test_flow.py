"""What flow.py adds beyond the Euler ODE that tests/test_sd3.py checks against the stock pipeline: Flow-GRPO's SDE
(its step's mean and spread against the formula written out here, noise 0 equal to the ODE, the rollout's
log-probabilities those of its own transitions, gradients through the stochastic chain equal to a plain loop) and the
one-step mode (Direct-Align), on SD3 and FLUX miniatures."""
import json
import math
import os

import pytest
import torch

from flow import flow_output, flow_rollout, flow_sample, flow_transition
from memory import step_activation_bytes
from lora import inject_lora
from model import encode_prompts, load_sd
from conftest import held_for_backward, refused, run_here
from sampler import backprop_window, step_logprob
from test_sd3 import PROMPTS, assert_same_gradients, lora, noise, ours, reference, velocity

STEPS = 4


@pytest.fixture
def tiny_sd3():
    return load_sd("tiny-sd3")


def conditioning(sd):
    return encode_prompts(sd, PROMPTS), encode_prompts(sd, [""] * len(PROMPTS))


def sde_step(x, v, s, s_next, s_1, a):
    """Flow-GRPO's SDE step (Liu et al. 2025, Eq. 9 discretised), in float64, as the paper writes it:
    x' = x + [v + sigma^2 / (2 s) (x + (1 - s) v)] dt + sigma sqrt(-dt) z,  sigma = a sqrt(s / (1 - s)), dt = s' - s,
    and at s = 1 the second sigma s_1 in the denominator (the paper's code: the noise scale stays finite)."""
    x, v = x.double(), v.double()
    sigma = a * math.sqrt(s / (1 - (s_1 if s == 1 else s)))
    dt = s_next - s
    return x + (v + sigma ** 2 / (2 * s) * (x + (1 - s) * v)) * dt, sigma * math.sqrt(-dt)


@pytest.mark.parametrize("a", [0.7, 0.0])
def test_sde_step_is_the_formula_and_noise_zero_is_the_ode(tiny_sd3, a):
    cond, uncond = conditioning(tiny_sd3)
    x = noise(tiny_sd3)
    v = velocity(tiny_sd3, 5.0)
    tiny_sd3.scheduler.set_timesteps(STEPS)
    sigmas, ts = tiny_sd3.scheduler.sigmas.clone(), tiny_sd3.scheduler.timesteps.clone()
    with torch.no_grad():
        for i in (0, 2, STEPS - 1):  # s = 1 (the special case), a middle step, the last (to s' = 0)
            out = v(x, ts[i])
            mean, std = flow_transition(tiny_sd3, out, x, ts[i], STEPS, a)
            want_mean, want_std = sde_step(x, out, float(sigmas[i]), float(sigmas[i + 1]), float(sigmas[1]), a)
            torch.testing.assert_close(mean.double(), want_mean, rtol=1e-5, atol=1e-5)
            assert std == pytest.approx(want_std, rel=1e-6, abs=0)
            if a == 0:  # the ODE's Euler step, bit for bit
                assert torch.equal(mean, x + (sigmas[i + 1] - sigmas[i]) * out) and std == 0
    with torch.no_grad():  # the whole sampler: noise level 0 is the Euler ODE, whatever the generator
        torch.testing.assert_close(flow_sample(tiny_sd3, cond, uncond, x, STEPS, 5.0, 0.0),
                                   flow_sample(tiny_sd3, cond, uncond, x, STEPS, 5.0), rtol=0, atol=0)


def test_rollout_samples_the_sde_and_its_logprobs_are_its_transitions(tiny_sd3):
    """flow_rollout gives flow_sample's images for the same generator, its x_{i+1} lie at the transition's mean plus
    std times standard normal noise, and each log-probability recomputed from the stored latents (what ddpo.py's
    PPO ratio does) is the stored one: ratio 1 before any update."""
    cond, uncond = conditioning(tiny_sd3)
    x = noise(tiny_sd3)
    with torch.no_grad():
        xs, logps, ts = flow_rollout(tiny_sd3, cond, uncond, x, STEPS, 5.0, 0.7, torch.Generator().manual_seed(1))
        want = flow_sample(tiny_sd3, cond, uncond, x, STEPS, 5.0, 0.7, generator=torch.Generator().manual_seed(1))
    assert xs.shape == (STEPS + 1, *x.shape) and logps.shape == (STEPS, len(x))
    torch.testing.assert_close(xs[-1], want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    v = velocity(tiny_sd3, 5.0)
    z = []
    with torch.no_grad():
        for j in range(STEPS):
            mean, std = flow_transition(tiny_sd3, v(xs[j], ts[j]), xs[j], ts[j], STEPS, 0.7)
            torch.testing.assert_close(step_logprob(xs[j + 1], mean, std), logps[j], rtol=1e-4, atol=1e-4)
            z.append((xs[j + 1] - mean) / std)
    z = torch.cat([t.flatten() for t in z])  # 4 steps x 2 x 16 x 8 x 8 = 8192 draws of N(0, 1)
    assert abs(z.mean()) < 4 / len(z) ** 0.5 and abs(z.std() - 1) < 0.05


def test_sde_gradients_match_plain_autograd(tiny_sd3):
    """Backprop through the stochastic chain (noise drawn once, reused in the recomputation) equals a plain loop of
    the formula's steps with the same noise."""
    params, x = lora(tiny_sd3), noise(tiny_sd3)
    got = ours(tiny_sd3, x, STEPS, 5.0, noise_level=0.7, generator=torch.Generator().manual_seed(2))
    v, g = velocity(tiny_sd3, 5.0), torch.Generator().manual_seed(2)
    tiny_sd3.scheduler.set_timesteps(STEPS)
    sigmas, want = tiny_sd3.scheduler.sigmas.tolist(), x
    for i, t in enumerate(tiny_sd3.scheduler.timesteps):
        mean, std = sde_step(want, v(want, t), sigmas[i], sigmas[i + 1], sigmas[1], 0.7)
        want = (mean + std * torch.randn(x.shape, generator=g)).float()
    assert_same_gradients(tiny_sd3, params, got, want)


def test_a_random_window_s_gradients_match_plain_autograd(tiny_sd3):
    """(lo, hi): K drawn once from the generator, then the last K steps with gradients (test_sd3 checks fixed K)."""
    params, x = lora(tiny_sd3), noise(tiny_sd3)
    k = backprop_window((1, 3), STEPS, torch.Generator().manual_seed(5))
    got = ours(tiny_sd3, x, STEPS, 5.0, backprop=(1, 3), generator=torch.Generator().manual_seed(5))
    assert_same_gradients(tiny_sd3, params, got, reference(tiny_sd3, x, STEPS, 5.0, k))


def test_a_kept_step_holds_what_step_activation_bytes_measures_on_a_flow_model(tiny_sd3):
    """--keep-activations auto on a flow model budgets with memory.step_activation_bytes: each kept step adds exactly
    that to what backward holds (4 steps, 0 and 2 kept)."""
    lora(tiny_sd3)
    cond, uncond = conditioning(tiny_sd3)
    x = noise(tiny_sd3)
    weights = [*tiny_sd3.unet.parameters(), *tiny_sd3.unet.buffers()]
    held = {keep: held_for_backward(lambda: flow_sample(tiny_sd3, cond, uncond, x, STEPS, 5.0, keep_activations=keep),
                                    weights) for keep in (0, 2)}
    per_step = step_activation_bytes(tiny_sd3, cond, uncond, x, STEPS, 5.0)
    assert per_step > 50 * x.numel() * x.element_size()  # the transformer's activations, not a latent
    assert held[2] - held[0] == pytest.approx(2 * per_step, rel=0.02)


@pytest.mark.parametrize("level", [0.6, (0.3, 0.9)])
def test_onestep_gradients_match_the_reference(tiny_sd3, level):
    """("onestep", F): the ODE's sample without gradients, re-noised with known noise to s = F, and one transformer
    call with gradients: x0 = x_s - s v."""
    params, x = lora(tiny_sd3), noise(tiny_sd3)
    got = ours(tiny_sd3, x, STEPS, 5.0, backprop=("onestep", level), generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    s = level if isinstance(level, float) else level[0] + (level[1] - level[0]) * float(torch.rand((), generator=g))
    with torch.no_grad():
        x0 = reference(tiny_sd3, x, STEPS, 5.0, k=STEPS)
    x_s = (1 - s) * x0 + s * torch.randn(x0.shape, generator=g)
    want = x_s - s * velocity(tiny_sd3, 5.0)(x_s, torch.tensor(1000 * s, dtype=torch.float32))
    assert_same_gradients(tiny_sd3, params, got, want)


def test_onestep_on_flux_is_one_guided_call():
    """FLUX: the same mode through the packed latents and the guidance embedding; its gradient reaches the LoRA."""
    sd = load_sd("tiny-flux")
    torch.manual_seed(0)
    params = inject_lora(sd.unet, rank=2)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)
    cond = encode_prompts(sd, PROMPTS)
    x = torch.randn(len(PROMPTS), 16, 8, 8, generator=torch.Generator().manual_seed(0))
    got = flow_sample(sd, cond, None, x, STEPS, 3.5, backprop=("onestep", 0.5),
                      generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x0 = flow_sample(sd, cond, None, x, STEPS, 3.5)
        x_s = 0.5 * x0 + 0.5 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
        want = x_s - 0.5 * flow_output(sd, x_s, torch.tensor(500.0), cond, 3.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    grads = torch.autograd.grad(got.square().mean(), params, allow_unused=True)
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > len(params) // 2


# -----------------------------------------------------------------------------
# the scripts on flow models: train.py, ddpo.py and sample.py end to end, resumed runs continue exactly


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def stopped_and_resumed(script, args, tmp_path, key):
    """The run to 3 steps, and the same run stopped after 2 and resumed to 3: the same numbers at every step."""
    run_here(script, *args, "--out", tmp_path / "whole", "--steps", 3)
    run_here(script, *args, "--out", tmp_path / "cut", "--steps", 2)
    resumed = run_here(script, "--resume", tmp_path / "cut", "--steps", 3)
    whole, cut = metrics(tmp_path / "whole"), metrics(tmp_path / "cut")
    assert [x["step"] for x in cut] == [1, 2, 3] and "resuming" in resumed.stdout
    for k in ("reward_mean", key):
        assert [x[k] for x in cut] == pytest.approx([x[k] for x in whole], rel=1e-5, abs=1e-7), k
    return whole, json.loads((tmp_path / "cut" / "config.json").read_text())


@pytest.mark.parametrize("model,backprop,guidance", [("tiny-sd3", "all", 7.0), ("tiny-flux", "onestep:0.3,0.9", 3.5)])
def test_train_py_on_a_flow_model_resumes_exactly(tmp_path, model, backprop, guidance):
    args = ["--model", model, "--reward", "compress", "--batch-size", 2, "--sample-steps", 3, "--eval-n", 2,
            "--eval-every", 0, "--save-every", 1, "--backprop", backprop]
    whole, cfg = stopped_and_resumed("train.py", args, tmp_path, "grad_norm")
    assert all(x["grad_norm"] > 0 for x in whole)  # the gradient reaches the transformer's LoRA
    assert cfg["guidance"] == guidance and cfg["sample_steps"] == 3  # the family's default guidance, recorded
    proc = run_here("sample.py", "--lora", tmp_path / "cut" / "lora.safetensors", "--n", 1, "--reward", "compress")
    assert "3 flow steps" in proc.stdout and (tmp_path / "cut" / "compare.png").is_file()


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_ddpo_py_on_a_flow_model_is_flow_grpo_and_resumes_exactly(tmp_path, model):
    """The SDE rollout at Flow-GRPO's noise level 0.7 (the default on a flow model), group advantages; the first inner
    epoch's ratio is 1 (one optimisation step per round: the recomputed log-probabilities are the rollout's)."""
    args = ["--model", model, "--reward", "jpeg", "--batch-size", 2, "--sample-steps", 3, "--eval-n", 2,
            "--samples-per-step", 4, "--grad-accum", 2, "--advantage", "group", "--group-size", 2, "--lr", 1e-2,
            "--clip-range", 1e-2, "--eval-every", 0, "--save-every", 1]
    whole, cfg = stopped_and_resumed("ddpo.py", args, tmp_path, "loss")
    assert cfg["eta"] == 0.7 and whole[0]["ratio_max_dev"][0] < 1e-5
    status, stderr = refused("ddpo.py", *args, "--eta", 0, "--out", tmp_path / "zero")
    assert status == 2 and "--eta must be > 0" in stderr


@pytest.mark.parametrize("backprop", ["all", ("drtune", 2), ("onestep", 0.5)])
def test_cfg_halves_in_turn_give_the_same_gradient(tiny_sd3, backprop):
    """cfg_in_turn on SD3 (sampler.halves_in_turn, as test_grad checks on DDIM): the same samples, the same gradients
    to rounding."""
    params, x = lora(tiny_sd3), noise(tiny_sd3)
    cond, uncond = conditioning(tiny_sd3)
    runs = [flow_sample(tiny_sd3, cond, uncond, x, STEPS, 5.0, 0.7, backprop, torch.Generator().manual_seed(2),
                        cfg_in_turn=in_turn) for in_turn in (False, True)]
    assert torch.equal(*runs)
    (a, b) = (torch.autograd.grad(latents.square().mean(), params) for latents in runs)
    for u, v in zip(b, a):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4 * v.abs().max().item())
