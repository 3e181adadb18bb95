"""The DDIM sampler agrees with diffusers; truncation, loading and decoding behave as documented."""
import pytest
import torch
from diffusers import DDIMScheduler

from conftest import pipeline
from sampler import (ModelLoadError, backprop_window, ddim_sample, decode, encode_prompts, latent_shape, load_sd,
                     native_resolution, parse_backprop)

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


def grad_flags(sd, x, steps, backprop, generator=None):
    """Which UNet calls ran with grad enabled, in order."""
    flags = []
    hook = sd.unet.register_forward_pre_hook(lambda *_: flags.append(torch.is_grad_enabled()))
    cond, uncond = encode_prompts(sd, PROMPTS), encode_prompts(sd, [""] * 2)
    ddim_sample(sd, cond, uncond, x, steps=steps, backprop=backprop, generator=generator)
    hook.remove()
    return flags


def test_truncation_builds_no_graph_before_the_window(tiny):
    x = noise(tiny)
    tiny.unet.conv_out.weight.requires_grad_(True)  # something trainable, so a graph could be built
    flags = grad_flags(tiny, x, 6, 2)
    # checkpoint reruns a step's UNet call in backward, not in forward: 6 calls, the last 2 with grad
    assert flags == [False] * 4 + [True] * 2
    assert grad_flags(tiny, x, 6, "all") == [True] * 6
    for seed in range(5):
        f = grad_flags(tiny, x, 6, (2, 4), torch.Generator().manual_seed(seed))
        k = sum(f)
        assert 2 <= k <= 4 and f == [False] * (6 - k) + [True] * k
    with torch.no_grad():
        assert grad_flags(tiny, x, 6, "all") == [False] * 6


def test_random_window_covers_its_range():
    g = torch.Generator().manual_seed(0)
    ks = {backprop_window((2, 5), 10, g) for _ in range(200)}
    assert ks == {2, 3, 4, 5}


@pytest.mark.parametrize("text,steps,want", [("all", 5, "all"), ("3", 5, 3), ("2,5", 5, (2, 5)), ("lv:4", 5, ("lv", 4))])
def test_parse_backprop(text, steps, want):
    assert parse_backprop(text, steps) == want


@pytest.mark.parametrize("text", ["6", "0", "3,2", "1,9", "x", "1,2,3", "", "lv:0", "lv:", "lv:a"])
def test_parse_backprop_rejects(text):
    with pytest.raises(ValueError):
        parse_backprop(text, 5)


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
