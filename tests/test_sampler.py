"""The DDIM sampler agrees with diffusers; truncation, loading and decoding behave as documented."""
import math

import pytest
import torch
from diffusers import DDIMScheduler

from conftest import held_for_backward, pipeline
from grid import image_grid
from model import ModelLoadError, decode, encode_prompts, latent_shape, load_sd, native_resolution
from sampler import (backprop_window, step_logprob, ddim_rollout, ddim_sample, ddim_transition, drtune_steps,
                     guidance_context, guided_output, parse_backprop, steps_with_gradient)

PROMPTS = ["a cat", "a red dog on the grass"]


def noise(sd, n=2, seed=0):
    return torch.randn(n, *latent_shape(sd, native_resolution(sd)), generator=torch.Generator().manual_seed(seed))


def ours(sd, x, **kw):
    with torch.no_grad():
        return ddim_sample(sd, encode_prompts(sd, PROMPTS), encode_prompts(sd, [""] * len(PROMPTS)), x, **kw)


def reference(sd, x, steps, guidance, eta, seed):
    return pipeline(sd)(PROMPTS, latents=x.clone(), num_inference_steps=steps, guidance_scale=guidance, eta=eta,
                        output_type="latent", generator=torch.Generator().manual_seed(seed)).images


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_matches_diffusers_pipeline(tiny, eta, guidance):
    x = noise(tiny)
    got = ours(tiny, x, steps=12, guidance=guidance, eta=eta, generator=torch.Generator().manual_seed(1))
    want = reference(tiny, x, 12, guidance, eta, seed=1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("config", [dict(prediction_type="v_prediction"),  # SD 2.x
                                    dict(prediction_type="v_prediction", timestep_spacing="trailing",
                                         set_alpha_to_one=True),
                                    dict(prediction_type="sample")])
def test_matches_diffusers_other_configs(tiny, config):
    tiny.scheduler = DDIMScheduler.from_config(tiny.scheduler.config, **config)
    x = noise(tiny)
    got = ours(tiny, x, steps=10, guidance=5.0, eta=0.5, generator=torch.Generator().manual_seed(3))
    want = reference(tiny, x, 10, 5.0, 0.5, seed=3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_eta_noise_comes_from_the_generator(tiny):
    x = noise(tiny)
    a, b, c = (ours(tiny, x, steps=5, eta=1.0, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("config", [{}, dict(prediction_type="v_prediction", set_alpha_to_one=True)])
def test_transition_is_diffusers_step_mean_and_variance(tiny, config):
    """mean = DDIMScheduler.step with zero noise, sigma = eta * sqrt(its variance), at every step including the last
    (where a_prev is the final alpha), so that mean + sigma * z is its step with variance_noise z."""
    sched = DDIMScheduler.from_config(tiny.scheduler.config, **config)
    tiny.scheduler = DDIMScheduler.from_config(sched.config)
    steps, eta = 8, 0.8
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(0)
    for t in sched.timesteps:
        x, out, z = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
        mean, sigma = ddim_transition(tiny, out, x, t, steps, eta)
        want_mean = sched.step(out, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
        prev_t = t - sched.config.num_train_timesteps // steps
        torch.testing.assert_close(mean, want_mean, rtol=1e-5, atol=1e-6)
        assert sigma == pytest.approx(eta * sched._get_variance(t, prev_t).item() ** 0.5, rel=1e-5)
        torch.testing.assert_close(mean + sigma * z, sched.step(out, t, x, eta=eta, variance_noise=z).prev_sample,
                                   rtol=1e-5, atol=1e-6)


def test_logprob_by_hand():
    """The Gaussian log-density per dimension, averaged over (C, h, w); the gradient reaches the mean only."""
    gen = torch.Generator().manual_seed(0)
    x, mean = torch.randn(3, 4, 2, 2, generator=gen), torch.randn(3, 4, 2, 2, generator=gen).requires_grad_()
    sigma = 0.3
    got = step_logprob(x, mean, sigma)
    by_hand = [sum(-0.5 * ((a - m) / sigma) ** 2 - torch.log(torch.tensor(sigma)).item() - 0.5 * math.log(2 * math.pi)
                   for a, m in zip(x[i].flatten().tolist(), mean[i].flatten().tolist())) / 16 for i in range(3)]
    assert got.tolist() == pytest.approx(by_hand, rel=1e-6)
    torch.testing.assert_close(got, torch.distributions.Normal(mean, sigma).log_prob(x).flatten(1).mean(1))
    got.sum().backward()
    torch.testing.assert_close(mean.grad, (x - mean.detach()) / sigma ** 2 / 16)
    with pytest.raises(ValueError, match="eta > 0"):
        step_logprob(x, mean, 0.0)


def test_rollout_samples_what_ddim_sample_samples(tiny):
    """Same noise, same images; each stored log-probability is the transition's density of the next stored latent."""
    x = noise(tiny)
    cond, uncond = encode_prompts(tiny, PROMPTS).detach(), encode_prompts(tiny, [""] * 2).detach()
    xs, logps, ts = ddim_rollout(tiny, cond, uncond, x, steps=6, guidance=5.0, eta=1.0,
                                 generator=torch.Generator().manual_seed(4))
    assert xs.shape == (7, *x.shape) and logps.shape == (6, 2) and len(ts) == 6 and torch.equal(xs[0], x)
    want = ours(tiny, x, steps=6, guidance=5.0, eta=1.0, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(xs[-1], want, rtol=1e-6, atol=1e-6)
    context = guidance_context(cond, uncond, 5.0, torch.float32)
    for i, t in enumerate(ts):
        with torch.no_grad():
            mean, sigma = ddim_transition(tiny, guided_output(tiny, xs[i], t, context, 5.0), xs[i], t, 6, 1.0)
        torch.testing.assert_close(step_logprob(xs[i + 1], mean, sigma), logps[i])
        # x_prev - mean = sigma z with z ~ N(0, I) over 256 dimensions: log-density ~ -1/2 - log(sigma sqrt(2 pi))
        assert logps[i].tolist() == pytest.approx([-0.5 - math.log(sigma * (2 * math.pi) ** 0.5)] * 2, abs=0.3)


def graph_stats(sd, x, steps, backprop, generator=None):
    """(UNet calls in forward, UNet calls in backward (recomputation), tensors saved for backward)."""
    calls, saved = [], []
    hook = sd.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    cond, uncond = encode_prompts(sd, PROMPTS), encode_prompts(sd, [""] * 2)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = ddim_sample(sd, cond, uncond, x, steps=steps, backprop=backprop, generator=generator)
    forward = len(calls)
    out.square().mean().backward()
    hook.remove()
    return forward, len(calls) - forward, len(saved)


def test_truncation_builds_no_graph_before_the_window(tiny):
    x = noise(tiny)
    tiny.unet.conv_out.weight.requires_grad_(True)  # something trainable, so that a graph is built
    assert graph_stats(tiny, x, 6, "all")[:2] == (6, 6)  # every step recomputed once in backward
    fwd, bwd, saved = graph_stats(tiny, x, 6, 2)
    assert (fwd, bwd) == (6, 2)
    assert graph_stats(tiny, x, 12, 2)[2] == saved  # the steps before the window leave nothing for backward
    assert graph_stats(tiny, x, 6, "all")[2] > saved
    for seed in range(5):
        assert 2 <= graph_stats(tiny, x, 6, (2, 4), torch.Generator().manual_seed(seed))[1] <= 4
    with torch.no_grad():
        assert not ddim_sample(tiny, encode_prompts(tiny, PROMPTS), encode_prompts(tiny, [""] * 2), x, 4).requires_grad


def test_checkpointing_keeps_one_latent_per_step(tiny):
    """What backward holds grows by about one latent (B, 4, h, w) per step: nothing of the UNet's activations."""
    x = noise(tiny)
    tiny.unet.conv_out.weight.requires_grad_(True)
    cond, uncond = encode_prompts(tiny, PROMPTS), encode_prompts(tiny, [""] * 2)
    held = {steps: held_for_backward(lambda: ddim_sample(tiny, cond, uncond, x, steps=steps)) for steps in (5, 25)}
    assert held[25] - held[5] <= 20 * x.numel() * x.element_size() * 1.05


def test_a_kept_step_holds_what_step_activation_bytes_measures(tiny):
    from memory import step_activation_bytes
    """What --keep-activations auto budgets with: each kept step adds to what backward holds exactly the activation
    bytes measured for one step (the saved storages of a 6-step chain with 0, 2 and 6 steps kept), with LoRA in every
    attention layer, so that backward needs activations throughout the UNet."""
    from lora import inject_lora
    x = noise(tiny)
    inject_lora(tiny.unet, rank=2)
    cond, uncond = encode_prompts(tiny, PROMPTS), encode_prompts(tiny, [""] * 2)
    weights = [*tiny.unet.parameters(), *tiny.unet.buffers()]
    held = {keep: held_for_backward(lambda: ddim_sample(tiny, cond, uncond, x, steps=6, keep_activations=keep), weights)
            for keep in (0, 2, 6)}
    per_step = step_activation_bytes(tiny, cond, uncond, x, 6)
    assert per_step > 100 * x.numel() * x.element_size()  # the UNet's activations, not a latent
    assert held[2] - held[0] == pytest.approx(2 * per_step, rel=0.02)
    assert held[6] - held[0] == pytest.approx(6 * per_step, rel=0.02)


def test_steps_with_gradient_bound_what_can_be_kept():
    assert [steps_with_gradient(b, 20) for b in ("all", 3, (2, 7), ("lv", 4), ("drtune", 5))] == [20, 3, 7, 1, 5]


def test_random_window_covers_its_range():
    g = torch.Generator().manual_seed(0)
    ks = {backprop_window((2, 5), 10, g) for _ in range(200)}
    assert ks == {2, 3, 4, 5}


def test_drtune_trains_n_evenly_spaced_steps_with_a_random_offset(tiny):
    g = torch.Generator().manual_seed(0)
    draws = [drtune_steps(3, 10, g) for _ in range(100)]
    assert {tuple(d) for d in draws} == {(0, 3, 6), (1, 4, 7), (2, 5, 8)}  # the earliest step trained in a third
    assert drtune_steps(10, 10, g) == list(range(10))
    x = noise(tiny)
    tiny.unet.conv_out.weight.requires_grad_(True)
    fwd, bwd, saved = graph_stats(tiny, x, 6, ("drtune", 2), torch.Generator().manual_seed(0))
    assert (fwd, bwd) == (6, 2)  # the untrained steps' UNet calls are not recomputed: they built no graph
    assert graph_stats(tiny, x, 24, ("drtune", 2), torch.Generator().manual_seed(0))[2] == saved  # flat in steps


@pytest.mark.parametrize("text,steps,want", [("all", 5, "all"), ("3", 5, 3), ("2,5", 5, (2, 5)), ("lv:4", 5, ("lv", 4)),
                                             ("drtune:2", 5, ("drtune", 2)), ("drtune:5", 5, ("drtune", 5)),
                                             ("onestep:0.6", 5, ("onestep", 0.6)), ("onestep:1", 5, ("onestep", 1.0)),
                                             ("onestep:0.3,0.9", 5, ("onestep", (0.3, 0.9)))])
def test_parse_backprop(text, steps, want):
    assert parse_backprop(text, steps) == want


FORMS, ONESTEP = "expected all, K, lo,hi, lv:N, drtune:N or onestep:F", "expected onestep:F or onestep:lo,hi"
LEVEL = "the one-step noise level F needs 0 < F <= 1 (a range: 0 < lo <= hi <= 1)"


@pytest.mark.parametrize("text,says", [
    ("6", "1 <= K <= the number of sampling steps (5)"), ("0", "1 <= K"), ("3,2", "1 <= K"), ("1,9", "1 <= K"),
    ("x", FORMS), ("1,2,3", FORMS), ("", FORMS), ("2.5", FORMS), ("lv:0", "N >= 1"), ("lv:", FORMS), ("lv:a", FORMS),
    ("lv:2:3", FORMS), ("drtune:0", "1 <= N <= the number of sampling steps (5)"), ("drtune:6", "1 <= N"),
    ("drtune:", FORMS), ("drtune:x", FORMS), ("drtune", FORMS), ("onestep:", ONESTEP), ("onestep:a", ONESTEP),
    ("onestep:0.3,0.6,0.9", ONESTEP), ("onestep:0.3,", ONESTEP), ("onestep:nan", LEVEL), ("onestep:1.5", LEVEL),
    ("onestep:0", LEVEL), ("onestep:0.9,0.3", LEVEL), ("onestep:inf", LEVEL)])
def test_parse_backprop_rejects_with_a_readable_message(text, says):
    """Every malformed form is a ValueError (never an IndexError from parsing: "onestep:0.3,0.6,0.9" was one) whose
    message starts with the text as written and says what was expected."""
    with pytest.raises(ValueError) as e:
        parse_backprop(text, 5)
    assert str(e.value).startswith(f"{text!r}: ") and says in str(e.value), str(e.value)


def test_decode_range_and_scaling_factor(tiny):
    x = noise(tiny)
    with torch.no_grad():
        images = decode(tiny, x)
        manual = tiny.vae.decode(x / tiny.vae.config.scaling_factor).sample / 2 + 0.5
    assert images.shape == (2, 3, native_resolution(tiny), native_resolution(tiny))
    assert images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images, manual.clamp(0, 1))


def test_tiny_is_identical_on_every_call():
    a, b = load_sd("tiny"), load_sd("tiny")
    for (n, p), q in zip(a.unet.state_dict().items(), b.unet.state_dict().values()):
        assert torch.equal(p, q), n
    assert a.tokenizer("a cat").input_ids == b.tokenizer("a cat").input_ids


def test_load_sd_from_saved_directory(tiny, tmp_path):
    pipeline(tiny).save_pretrained(tmp_path)
    loaded = load_sd(str(tmp_path))
    x = noise(tiny)
    torch.testing.assert_close(ours(loaded, x, steps=4), ours(tiny, x, steps=4))


def test_load_sd_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="not a diffusers"):
        load_sd(str(tmp_path))
    with pytest.raises(ModelLoadError, match="no such model directory"):
        load_sd(str(tmp_path / "missing" / "dir"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError, match="--model tiny"):
        load_sd("nobody/no-such-model")


def test_image_grid_places_the_images_and_writes_labels_above_them():
    import numpy as np
    images = torch.rand(5, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    plain = np.asarray(image_grid(images, nrow=3, pad=2))
    assert plain.shape == (2 * 18 + 2, 3 * 26 + 2, 3)
    tile = (images[4].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    assert (plain[20:36, 28:52] == tile).all() and (plain[:2] == 255).all()  # 5th image: row 2, column 2
    labelled = np.asarray(image_grid(images, nrow=3, pad=2, labels=["a", "b", "c", "d", "a much longer label"],
                                     title="the title"))
    assert labelled.shape[0] > plain.shape[0] and labelled.shape[1] == plain.shape[1]
    h = labelled.shape[0]
    assert (labelled[h - 18:h - 2, 28:52] == tile).all()  # the images keep their place at the bottom of their band
    assert (labelled[h - 30:h - 18, 28:52] < 128).any()  # the 5th label's last line, right above its image
    assert (labelled[2:12] < 128).any()  # the title
