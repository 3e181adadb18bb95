"""FLUX.1-dev (rectified flow, a guidance embedding instead of CFG) through the same files, on the offline miniature
`tiny-flux` (real classes: a FluxTransformer2DModel reading 2x2-packed latents, a CLIP (pooled output only), a T5
encoder reading 16 tokens, FLUX's VAE scaling and shift, a FlowMatchEulerDiscreteScheduler with dynamic shifting): the
conditioning equals FluxPipeline.encode_prompt, sampling and decoding equal the stock pipeline on the same noise, and
LoRA gradients through the checkpointed chain equal a plain autograd loop on packed latents (backprop all and K).
Not yet: DRTune, DRaFT-LV and kept activations on FLUX; train.py / ddpo.py / sample.py on FLUX; real checkpoints."""
import numpy as np
import pytest
import torch

from lora import inject_lora, lora_layers
from model import decode, encode_prompts, latent_shape, load_sd
from rewards import compress
from sampler import flow_sample

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
    assert latent_shape(sd, 64) == (16, 8, 8)
    again = load_sd("tiny-flux")
    for a, b in zip(sd.unet.parameters(), again.unet.parameters()):
        assert torch.equal(a, b)  # fixed-seed weights
    assert not any(p.requires_grad for p in sd.unet.parameters())


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


@pytest.mark.parametrize("steps, guidance", [(6, 3.5), (3, 1.0)])
def test_matches_the_stock_flux_pipeline(tiny_flux, steps, guidance):
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


def reference(sd, x, steps, guidance, k):
    """The textbook Euler loop as FluxPipeline runs it, on packed latents (B, 16, 64), the pipeline's conditioning,
    ids and sigmas (np.linspace, calculate_shift's mu): full graph, no checkpoint; x detached before the last k steps.
    Returns the latents unpacked (B, 16, 8, 8)."""
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    pipe = pipeline(sd)
    embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, None, max_sequence_length=sd.max_sequence_length)
    img_ids = pipe._prepare_latent_image_ids(len(x), 4, 4, x.device, x.dtype)
    c = sd.scheduler.config
    mu = calculate_shift(16, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    sd.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    x, g, sigmas = _pack(x), torch.full((len(x),), guidance), sd.scheduler.sigmas
    for i, t in enumerate(sd.scheduler.timesteps):
        if i == steps - k:
            x = x.detach()
        v = sd.unet(hidden_states=x, timestep=t.expand(len(x)) / 1000, guidance=g, pooled_projections=pooled,
                    encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=img_ids).sample
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return FluxPipeline._unpack_latents(x, 64, 64, 8)


@pytest.mark.parametrize("backprop, k", [("all", 4), (2, 2)])
def test_lora_gradients_match_plain_autograd(tiny_flux, backprop, k):
    torch.manual_seed(0)
    params = inject_lora(tiny_flux.unet, rank=2, targets=TARGETS)
    assert len(params) == 2 * (8 + 3)  # one double-stream block x 8 targets, one single-stream x 3 (q, k, v)
    with torch.no_grad():
        for p in params:  # non-zero up matrices, so that every LoRA tensor gets a gradient
            p.normal_(0, 0.05)
    x = torch.randn(2, *latent_shape(tiny_flux, 64), generator=torch.Generator().manual_seed(0))
    got = flow_sample(tiny_flux, encode_prompts(tiny_flux, PROMPTS), None, x, 4, 3.5, backprop=backprop)
    want = reference(tiny_flux, x, 4, 3.5, k)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    g_ours = torch.autograd.grad(-compress(decode(tiny_flux, got)).mean(), params)
    vae = tiny_flux.vae
    images = (vae.decode(want / vae.config.scaling_factor + vae.config.shift_factor).sample / 2 + 0.5).clamp(0, 1)
    g_ref = torch.autograd.grad(-compress(images).mean(), params)
    names = [n for n in lora_layers(tiny_flux.unet) for _ in (0, 1)]  # one name per tensor, down then up
    assert [n for n, g in zip(names, g_ours) if not g.abs().sum() > 0] == []  # every LoRA tensor has a gradient
    a, b = torch.cat([g.flatten() for g in g_ours]), torch.cat([g.flatten() for g in g_ref])
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())  # to fp32 rounding of the whole
