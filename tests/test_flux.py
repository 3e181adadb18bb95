"""FLUX.1-dev (rectified flow, a guidance embedding instead of CFG) through the same files, on the offline miniature
`tiny-flux` (real classes: a FluxTransformer2DModel reading 2x2-packed latents, a CLIP (pooled output only), a T5
encoder reading 16 tokens, FLUX's VAE scaling and shift, a FlowMatchEulerDiscreteScheduler with dynamic shifting): the
conditioning equals FluxPipeline.encode_prompt, sampling and decoding equal the stock pipeline on the same noise, and
LoRA gradients through the checkpointed chain equal a plain autograd loop on packed latents (backprop all, K, kept
activations, DRTune, DRaFT-LV); a saved FLUX directory loads back as the miniature. Not yet: train.py / ddpo.py /
sample.py on FLUX."""
import numpy as np
import pytest
import torch

from conftest import held_for_backward
from flow import flow_sample
from lora import inject_lora, load_lora, lora_layers, save_lora
from model import decode, encode_prompts, latent_shape, load_sd, native_resolution
from rewards import compress
from sampler import drtune_steps

PROMPTS = ["a cat", "a red dog on the grass"]
# FLUX's attention: the double-stream blocks' image and text q/k/v/out, the single-stream blocks' q/k/v
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@pytest.fixture
def tiny_flux():
    return load_sd("tiny-flux")


def pipeline(sd):
    """diffusers' own FluxPipeline over our components: the reference (its text_encoder_2 is T5, our text_encoder_3)."""
    from diffusers import FluxPipeline
    pipe = FluxPipeline(transformer=sd.unet, scheduler=sd.scheduler, vae=sd.vae, text_encoder=sd.text_encoder,
                        tokenizer=sd.tokenizer, text_encoder_2=sd.text_encoder_3, tokenizer_2=sd.tokenizer_3)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pack(x):  # (B, 16, h, w) -> (B, h/2 * w/2, 64), FluxPipeline._pack_latents
    from diffusers import FluxPipeline
    return FluxPipeline._pack_latents(x, *x.shape)


def test_loads_fixed_and_leaves_the_rng_alone():
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    sd = load_sd("tiny-flux")
    assert torch.equal(torch.rand(3), want)  # the caller's RNG untouched
    assert sd.flux and sd.flow and not load_sd("tiny-sd3").flux
    assert latent_shape(sd, 64) == (16, 8, 8) and native_resolution(sd) == 64
    again = load_sd("tiny-flux")
    for a, b in zip(sd.unet.parameters(), again.unet.parameters()):
        assert torch.equal(a, b)  # fixed-seed weights
    assert not any(p.requires_grad for p in sd.unet.parameters())


def test_a_saved_flux_directory_loads_as_the_miniature(tiny_flux, tmp_path):
    """The stock pipeline's save_pretrained of the miniature, then load_sd of the directory: FluxPipeline's T5
    (text_encoder_2) in our text_encoder_3, its 16 tokens (the tokenizer's limit under FLUX-dev's default 512), no
    second CLIP, and the same latents."""
    pipeline(tiny_flux).save_pretrained(tmp_path)
    loaded = load_sd(str(tmp_path))
    assert loaded.flux and loaded.text_encoder_2 is None and loaded.max_sequence_length == 16
    for field in ("unet", "scheduler", "text_encoder", "text_encoder_3"):
        assert type(getattr(loaded, field)) is type(getattr(tiny_flux, field)), field
    x = noise(tiny_flux)
    with torch.no_grad():
        assert torch.equal(ours(loaded, x), ours(tiny_flux, x))


def test_conditioning_is_the_pipelines(tiny_flux):
    embeds, pooled, text_ids = pipeline(tiny_flux).encode_prompt(
        PROMPTS, None, max_sequence_length=tiny_flux.max_sequence_length)
    assert embeds.shape == (2, 16, 96) and pooled.shape == (2, 32) and text_ids.shape == (16, 3)
    with torch.no_grad():
        cond = encode_prompts(tiny_flux, PROMPTS)
    assert cond.shape == (2, 16 + 1, 96)
    torch.testing.assert_close(cond[:, :-1], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond[:, -1, :32], pooled, rtol=0, atol=0)  # the pooled row, zeros after
    assert not cond[:, -1, 32:].any()


@pytest.mark.parametrize("steps, guidance, schnell", [(6, 3.5, False), (3, 1.0, False), (4, 0.0, True)])
def test_matches_the_stock_flux_pipeline(tiny_flux, steps, guidance, schnell):
    """FLUX.1-dev (guidance embedded, the resolution-dependent shift) and a FLUX.1-schnell-configured miniature (no
    guidance embedding, no dynamic shifting: the pipeline's evenly spaced sigmas as they are)."""
    if schnell:
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        tiny_flux.unet = FluxTransformer2DModel.from_config(tiny_flux.unet.config, guidance_embeds=False).eval()
        tiny_flux.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            tiny_flux.scheduler.config, use_dynamic_shifting=False, shift=1.0)
    x = torch.randn(2, *latent_shape(tiny_flux, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = encode_prompts(tiny_flux, PROMPTS)
        got = flow_sample(tiny_flux, cond, None, x, steps, guidance)
    kw = dict(latents=_pack(x.clone()), num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
              max_sequence_length=tiny_flux.max_sequence_length)
    want = pipeline(tiny_flux)(PROMPTS, output_type="latent", **kw).images  # packed (B, 16, 64)
    torch.testing.assert_close(_pack(got), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    images = pipeline(tiny_flux)(PROMPTS, output_type="pt", **kw).images  # FLUX's VAE: latents / scale + shift
    with torch.no_grad():
        torch.testing.assert_close(decode(tiny_flux, got), images, rtol=1e-4, atol=1e-4)


def velocity(sd, x, guidance, n=1):
    """FluxPipeline's transformer call on packed latents (B, 16, 64), its conditioning (the prompts repeated n times)
    and ids; sets the scheduler's sigmas as the pipeline does (np.linspace, calculate_shift's mu)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    pipe = pipeline(sd)
    embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS * n, None, max_sequence_length=sd.max_sequence_length)
    img_ids = pipe._prepare_latent_image_ids(len(x), 4, 4, x.device, x.dtype)
    c = sd.scheduler.config
    mu = calculate_shift(16, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    return lambda x, t: sd.unet(hidden_states=x, timestep=t.expand(len(x)) / 1000, guidance=torch.full((len(x),),
                                guidance), pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                                img_ids=img_ids).sample, mu


def reference(sd, x, steps, guidance, k=None, trained=None):
    """The textbook Euler loop as FluxPipeline runs it, on packed latents: full graph, no checkpoint; x detached
    before the last k steps; or DRTune: the transformer sees x detached at the `trained` steps, runs without grad at
    the others. Returns the latents unpacked (B, 16, 8, 8)."""
    from diffusers import FluxPipeline
    v, mu = velocity(sd, x, guidance)
    sd.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    x, sigmas = _pack(x), sd.scheduler.sigmas
    for i, t in enumerate(sd.scheduler.timesteps):
        if trained is None and i == steps - k:
            x = x.detach()
        if trained is None:
            out = v(x, t)
        elif i in trained:
            out = v(x.detach(), t)
        else:
            with torch.no_grad():
                out = v(x, t)
        x = x + (sigmas[i + 1] - sigmas[i]) * out
    return FluxPipeline._unpack_latents(x, 64, 64, 8)


def lora(sd):
    torch.manual_seed(0)
    params = inject_lora(sd.unet, rank=2, targets=TARGETS)
    assert len(params) == 2 * (8 + 3)  # one double-stream block x 8 targets, one single-stream x 3 (q, k, v)
    with torch.no_grad():
        for p in params:  # non-zero up matrices, so that every LoRA tensor gets a gradient
            p.normal_(0, 0.05)
    return params


def assert_same_gradients(sd, params, got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    g_ours = torch.autograd.grad(-compress(decode(sd, got)).mean(), params)
    vae = sd.vae
    images = (vae.decode(want / vae.config.scaling_factor + vae.config.shift_factor).sample / 2 + 0.5).clamp(0, 1)
    g_ref = torch.autograd.grad(-compress(images).mean(), params)
    names = [n for n in lora_layers(sd.unet) for _ in (0, 1)]  # one name per tensor, down then up
    assert [n for n, g in zip(names, g_ours) if not g.abs().sum() > 0] == []  # every LoRA tensor has a gradient
    a, b = torch.cat([g.flatten() for g in g_ours]), torch.cat([g.flatten() for g in g_ref])
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())  # to fp32 rounding of the whole


def noise(sd):
    return torch.randn(2, *latent_shape(sd, 64), generator=torch.Generator().manual_seed(0))


def ours(sd, x, **kw):
    return flow_sample(sd, encode_prompts(sd, PROMPTS), None, x, 4, 3.5, **kw)


@pytest.mark.parametrize("backprop, k, keep", [("all", 4, 0), (2, 2, 0), ("all", 4, 2)])
def test_lora_gradients_match_plain_autograd(tiny_flux, backprop, k, keep):
    params, x = lora(tiny_flux), noise(tiny_flux)
    got = ours(tiny_flux, x, backprop=backprop, keep_activations=keep)
    assert_same_gradients(tiny_flux, params, got, reference(tiny_flux, x, 4, 3.5, k))


def test_drtune_gradients_match_the_reference_loop(tiny_flux):
    params, x = lora(tiny_flux), noise(tiny_flux)
    got = ours(tiny_flux, x, backprop=("drtune", 2), generator=torch.Generator().manual_seed(3))
    trained = drtune_steps(2, 4, torch.Generator().manual_seed(3))  # the same offset, drawn first, as flow_sample does
    assert_same_gradients(tiny_flux, params, got, reference(tiny_flux, x, 4, 3.5, trained=trained))


def test_draft_lv_gradients_match_the_reference(tiny_flux):
    """("lv", 3): the finished sample re-noised 3 times to the last step's s, the last step taken again with grad."""
    from diffusers import FluxPipeline
    params, x = lora(tiny_flux), noise(tiny_flux)
    got = ours(tiny_flux, x, backprop=("lv", 3), generator=torch.Generator().manual_seed(3))
    assert got.shape == (3 * len(PROMPTS), *x.shape[1:])
    with torch.no_grad():
        x0 = reference(tiny_flux, x, 4, 3.5, k=4).repeat(3, 1, 1, 1)  # draw-major
    s = tiny_flux.scheduler.sigmas[-2]
    x = (1 - s) * x0 + s * torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    v = velocity(tiny_flux, x, 3.5, n=3)[0](_pack(x), tiny_flux.scheduler.timesteps[-1])
    assert_same_gradients(tiny_flux, params, got, x - s * FluxPipeline._unpack_latents(v, 64, 64, 8))  # x0 = x_s - s v


def test_memory_is_flat_in_the_number_of_steps(tiny_flux):
    """What backward holds grows by one latent per step, as for SD3: the transformer's activations (packing and
    rotary embeddings included) are recomputed."""
    lora(tiny_flux)
    x = noise(tiny_flux)
    cond = encode_prompts(tiny_flux, PROMPTS)
    held = {steps: held_for_backward(lambda: flow_sample(tiny_flux, cond, None, x, steps, 3.5)) for steps in (4, 16)}
    latent = x.numel() * x.element_size()  # (B, 16, h, w) in fp32
    assert held == {4: 4 * latent, 16: 16 * latent}, held  # exactly the latents entering each checkpointed step


def test_our_lora_file_loads_in_the_stock_flux_pipeline(tiny_flux, tmp_path):
    """LoRA with the default targets ("attn": both streams of the double-stream block, q/k/v of the single-stream
    one), saved with save_lora's default prefix "transformer.", the key FluxPipeline.load_lora_weights reads: the stock
    pipeline with the file gives our flow_sample's latents, and load_lora restores the same weights."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in inject_lora(tiny_flux.unet, rank=4, alpha=8):
            p.normal_(0, 0.05)
    paths = set(lora_layers(tiny_flux.unet))
    assert len(paths) == 8 + 3 and "transformer_blocks.0.attn.to_add_out" in paths
    x = noise(tiny_flux)
    with torch.no_grad():
        want = ours(tiny_flux, x)
    path = tmp_path / "lora.safetensors"
    save_lora(tiny_flux.unet, path)

    pipe = pipeline(load_sd("tiny-flux"))
    kw = dict(latents=_pack(x), num_inference_steps=4, guidance_scale=3.5, height=64, width=64,
              max_sequence_length=tiny_flux.max_sequence_length, output_type="latent")
    base = pipe(PROMPTS, **kw).images
    pipe.load_lora_weights(str(path))
    assert {n.removesuffix(".lora_A") for n, _ in pipe.transformer.named_modules()
            if n.endswith(".lora_A")} == paths  # PEFT put an adapter on every layer in the file, no more
    got = pipe(PROMPTS, **kw).images  # packed (B, 16, 64)
    assert (base - _pack(want)).abs().max() > 100 * 1e-5 * want.abs().max()  # the LoRA changes the latents
    torch.testing.assert_close(got, _pack(want), rtol=1e-5, atol=1e-5 * want.abs().max())

    fresh = load_sd("tiny-flux")
    load_lora(fresh.unet, path)  # injects with the file's rank, alpha and targets
    trained, restored = lora_layers(tiny_flux.unet), lora_layers(fresh.unet)
    assert restored.keys() == trained.keys()
    assert all(torch.equal(restored[n].down, m.down) and torch.equal(restored[n].up, m.up) for n, m in trained.items())
