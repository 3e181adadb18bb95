"""SDXL through the same files as SD 1.x, on the offline miniature `tiny-xl` (real classes: two text encoders, a
"text_time" UNet): sampling equals diffusers' StableDiffusionXLPipeline, LoRA gradients equal a plain autograd loop
built on the pipeline's own conditioning, memory stays flat in the steps, our LoRA file loads in the stock pipeline,
the sampler needs no text encoder once the prompts are encoded, and train.py trains, resumes and refuses the models
it does not support in one line."""
import json

import pytest
import torch
from diffusers import DDIMScheduler

from conftest import held_for_backward, pipeline, refused, run_here
from lora import inject_lora, save_lora
from model import decode, encode_prompts, latent_shape, native_resolution
from rewards import compress
from sampler import ddim_sample
from test_train import FAST, metrics

PROMPTS = ["a cat", "a red dog on the grass"]


def noise(sd, seed=0):
    return torch.randn(len(PROMPTS), *latent_shape(sd, native_resolution(sd)),
                       generator=torch.Generator().manual_seed(seed))


def ours(sd, x, steps, guidance, eta=0.0, seed=0, **kw):
    return ddim_sample(sd, encode_prompts(sd, PROMPTS), encode_prompts(sd, [""] * len(PROMPTS)), x, steps, guidance,
                       eta, generator=torch.Generator().manual_seed(seed), **kw)


def stock(sd, x, steps, guidance, eta=0.0, seed=0, pipe=None):
    return (pipe or pipeline(sd))(PROMPTS, latents=x.clone(), num_inference_steps=steps, guidance_scale=guidance,
                                  eta=eta, output_type="latent", generator=torch.Generator().manual_seed(seed)).images


@pytest.mark.parametrize("eta,guidance", [(0.0, 5.0), (0.7, 5.0), (0.7, 1.0)])
def test_matches_the_stock_sdxl_pipeline(tiny_xl, eta, guidance):
    x = noise(tiny_xl)
    with torch.no_grad():
        got = ours(tiny_xl, x, 6, guidance, eta, seed=1)
    want = stock(tiny_xl, x, 6, guidance, eta, seed=1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    if eta == 0.0:  # and the decoded images: the pipeline's VAE decode (SDXL's scaling factor) is ours
        images = pipeline(tiny_xl)(PROMPTS, latents=x.clone(), num_inference_steps=6, guidance_scale=guidance,
                                   output_type="pt").images
        with torch.no_grad():
            torch.testing.assert_close(decode(tiny_xl, got), images, rtol=1e-4, atol=1e-4)


def test_empty_prompt_is_zeros_as_the_pipeline_makes_it(tiny_xl):
    cond = encode_prompts(tiny_xl, ["a cat", ""])
    assert cond.shape == (2, tiny_xl.tokenizer.model_max_length + 1, 64) and not cond[1].any() and cond[0].any()
    embeds, _, pooled, _ = pipeline(tiny_xl).encode_prompt(["a cat"], do_classifier_free_guidance=False)
    torch.testing.assert_close(cond[:1, :-1], embeds)
    torch.testing.assert_close(cond[:1, -1, :32], pooled)  # the pooled row: projection_dim 32, zeros after
    assert not cond[:, -1, 32:].any()


def test_sampling_needs_no_text_encoder_once_the_prompts_are_encoded(tiny_xl):
    """free_text_encoders drops both encoders (nothing else holds them: their memory is returned) and returns their
    bytes; the SDXL sampler still reads the pooled width from the second one's config, and samples the same."""
    import gc
    import weakref
    from model import free_text_encoders
    x = noise(tiny_xl)
    cond, uncond = encode_prompts(tiny_xl, PROMPTS), encode_prompts(tiny_xl, [""] * len(PROMPTS))
    with torch.no_grad():
        want = ddim_sample(tiny_xl, cond, uncond, x, 3, 5.0)
    encoders = [weakref.ref(tiny_xl.text_encoder), weakref.ref(tiny_xl.text_encoder_2)]
    size = sum(t.numel() * t.element_size() for e in encoders for t in [*e().parameters(), *e().buffers()])
    assert free_text_encoders(tiny_xl) == size > 0 and free_text_encoders(tiny_xl) == 0  # freed once
    gc.collect()
    assert [e() for e in encoders] == [None, None]
    with torch.no_grad():
        assert torch.equal(ddim_sample(tiny_xl, cond, uncond, x, 3, 5.0), want)
    with pytest.raises(ValueError, match="^the text encoders were freed after the prompts were encoded"):
        encode_prompts(tiny_xl, PROMPTS)


def reference(sd, x, steps, guidance, eta, k, generator):
    """The textbook loop on the pipeline's own conditioning (encode_prompt, _get_add_time_ids): full graph, no
    checkpoint; x is detached before the last k steps."""
    pipe = pipeline(sd)
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True)
    size = tuple(native_resolution(sd) for _ in range(2))
    time_ids = pipe._get_add_time_ids(size, (0, 0), size, embeds.dtype, pooled.shape[-1]).repeat(len(PROMPTS), 1)
    added = dict(text_embeds=torch.cat([neg_pooled, pooled]), time_ids=torch.cat([time_ids, time_ids]))
    sched = DDIMScheduler.from_config(sd.scheduler.config)
    sched.set_timesteps(steps)
    for i, t in enumerate(sched.timesteps):
        if i == steps - k:
            x = x.detach()
        eps_u, eps_c = sd.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([neg, embeds]),
                               added_cond_kwargs=added).sample.chunk(2)
        x = sched.step(eps_u + guidance * (eps_c - eps_u), t, x, eta=eta, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("backprop,k,eta", [("all", 5, 0.0), (2, 2, 1.0)])
def test_lora_gradients_match_plain_autograd(tiny_xl, backprop, k, eta):
    torch.manual_seed(0)
    params = inject_lora(tiny_xl.unet, rank=2)
    with torch.no_grad():
        for p in params:  # non-zero up matrices, so that every LoRA tensor gets a gradient
            p.normal_(0, 0.05)
    x = noise(tiny_xl)
    got = ours(tiny_xl, x, 5, 5.0, eta, seed=2, backprop=backprop)
    want = reference(tiny_xl, x, 5, 5.0, eta, k, torch.Generator().manual_seed(2))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    g_ours = torch.autograd.grad(-compress(decode(tiny_xl, got)).mean(), params)
    images = (tiny_xl.vae.decode(want / tiny_xl.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    g_ref = torch.autograd.grad(-compress(images).mean(), params)
    assert all(g.abs().sum() > 0 for g in g_ours)
    a, b = torch.cat([g.flatten() for g in g_ours]), torch.cat([g.flatten() for g in g_ref])
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())  # to fp32 rounding of the whole


def test_memory_is_flat_in_the_number_of_steps(tiny_xl):
    """What backward holds grows by one latent per step, as for SD 1.x: the UNet's activations are recomputed."""
    inject_lora(tiny_xl.unet, rank=2)
    x = noise(tiny_xl)
    held = {steps: held_for_backward(lambda: ours(tiny_xl, x, steps, 5.0)) for steps in (4, 16)}
    assert held[16] - held[4] <= 12 * x.numel() * x.element_size() * 1.05


def test_our_lora_file_loads_in_the_stock_sdxl_pipeline(tiny_xl, tmp_path):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in inject_lora(tiny_xl.unet, rank=4, alpha=8):
            p.normal_(0, 0.05)
    x = noise(tiny_xl)
    with torch.no_grad():
        want = ours(tiny_xl, x, 4, 5.0)
    save_lora(tiny_xl.unet, tmp_path / "lora.safetensors")
    from model import load_sd
    pipe = pipeline(load_sd("tiny-xl"))
    pipe.load_lora_weights(str(tmp_path / "lora.safetensors"))
    torch.testing.assert_close(stock(None, x, 4, 5.0, pipe=pipe), want, rtol=1e-5, atol=1e-5 * want.abs().max())


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory):
    from model import load_sd
    path = tmp_path_factory.mktemp("tiny-xl")
    pipeline(load_sd("tiny-xl")).save_pretrained(path)
    return path


def test_train_py_trains_and_resumes_an_sdxl_directory(xl_dir, tmp_path):
    """Two steps, stopped, resumed to four: the held-out reward (same prompts and noise) rises over the whole. That a
    resumed run continues exactly as an uninterrupted one is model-independent and tested on SD 1.x (test_train)."""
    out = tmp_path / "run"
    first = run_here("train.py", "--model", xl_dir, *FAST[2:], "--eval-every", 0, "--lr", 3e-2, "--out", out,
                     "--steps", 2)
    before = float(first.stdout.strip().splitlines()[-1].split(":")[1].split("->")[0])
    resumed = run_here("train.py", "--resume", out, "--steps", 4)
    after = float(resumed.stdout.strip().splitlines()[-1].split("->")[1].split("after")[0])
    assert "at step 2" in resumed.stdout and [x["step"] for x in metrics(out)] == [1, 2, 3, 4]
    assert after > before
    assert json.loads((out / "config.json").read_text())["model"] == str(xl_dir)


@pytest.mark.parametrize("kind", ["StableDiffusionXLImg2ImgPipeline", "FluxFillPipeline", "FluxKontextPipeline",
                                  "FluxControlPipeline", "StableDiffusion3ControlNetPipeline",
                                  "StableDiffusion3InpaintPipeline"])
def test_unsupported_kinds_are_one_line(tmp_path, kind):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": kind}))
    status, stderr = refused("train.py", "--model", tmp_path, "--out", tmp_path / "out")
    assert status == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert f"is a {kind}, which this project does not support; supported: Stable Diffusion 1.x" in stderr
    assert "SDXL (StableDiffusionXLPipeline)" in stderr and "SD3 / SD3.5 (StableDiffusion3Pipeline)" in stderr


@pytest.mark.parametrize("kind, config, folder, says", [
    ("StableDiffusion3Pipeline", None, None, "not a complete diffusers SD3 / SD3.5 directory (no transformer/config.json)"),
    ("FluxPipeline", dict(in_channels=384, out_channels=64), None, "takes 384 input channels for 64 output ones"),
    ("StableDiffusion3Pipeline", dict(in_channels=16, out_channels=16), "controlnet", "has a ControlNet")])
def test_supported_kinds_that_are_not_text_to_image_are_one_line(tmp_path, kind, config, folder, says):
    """A model_index that names a supported kind is not enough: the denoiser's config (read before any weight: FLUX
    Fill's transformer takes 384 channels, 64 of them the latents) and a controlnet folder are checked too."""
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": kind}))
    if config:
        (tmp_path / "transformer").mkdir()
        (tmp_path / "transformer" / "config.json").write_text(json.dumps(config))
    if folder:
        (tmp_path / folder).mkdir()
    status, stderr = refused("train.py", "--model", tmp_path, "--out", tmp_path / "out")
    assert status == 2 and len(stderr.strip().splitlines()) == 1 and says in stderr, stderr


def test_sd2_v_prediction_at_768_runs_end_to_end(tmp_path):
    """SD 2.x: a v-prediction model whose native size is 768 px (the tiny nets with SD 2's scheduler config and
    sample size). The sampler's v-prediction parity is in test_sampler; here train.py runs it end to end, at 128 px
    for the suite's time (one step at its native 768 px takes ~1 minute on 2 cores)."""
    from diffusers import UNet2DConditionModel
    from model import load_sd
    sd = load_sd("tiny")
    sd.scheduler = DDIMScheduler.from_config(sd.scheduler.config, prediction_type="v_prediction")
    sd.unet = UNet2DConditionModel.from_config(sd.unet.config, sample_size=96)  # SD 2's 96x96 latents
    pipeline(sd).save_pretrained(tmp_path / "sd2")
    assert native_resolution(load_sd(str(tmp_path / "sd2"))) == 768
    run_here("train.py", "--model", tmp_path / "sd2", "--out", tmp_path / "out", "--steps", 1, "--resolution", 128,
             "--ddim-steps", 2, "--batch-size", 1, "--eval-n", 1)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["resolution"] == 128
    assert metrics(tmp_path / "out")[0]["reward_mean"] == metrics(tmp_path / "out")[0]["reward_mean"]  # not NaN
