"""FLUX.1-dev (rectified flow, a guidance embedding instead of CFG) through the same files, on the offline miniature
`tiny-flux` (real classes: a FluxTransformer2DModel reading 2x2-packed latents, a CLIP (pooled output only), a T5
encoder reading 16 tokens, FLUX's VAE scaling and shift, a FlowMatchEulerDiscreteScheduler with dynamic shifting): the
conditioning equals FluxPipeline.encode_prompt, and sampling and decoding equal the stock pipeline on the same noise.
Not yet: gradients vs a plain autograd loop, train.py / ddpo.py / sample.py on FLUX, real FLUX checkpoints."""
import pytest
import torch

from model import decode, encode_prompts, latent_shape, load_sd
from sampler import flow_sample

PROMPTS = ["a cat", "a red dog on the grass"]


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
