"""SD3 (rectified flow) through the same files, on the offline miniature `tiny-sd3` (real classes: an MMDiT
SD3Transformer2DModel, two CLIPs with projection, a T5 encoder reading 16 tokens, SD3's VAE scaling and shift, a
FlowMatchEulerDiscreteScheduler with shift 3.0): the conditioning equals StableDiffusion3Pipeline.encode_prompt.
Not yet: sampling, FLUX, and train.py / ddpo.py / sample.py on SD3."""
import pytest
import torch

from model import encode_prompts, latent_shape, load_sd, native_resolution

PROMPTS = ["a cat", "a red dog on the grass"]


@pytest.fixture
def tiny_sd3():
    return load_sd("tiny-sd3")


def pipeline(sd):
    """diffusers' own StableDiffusion3Pipeline over our components: the reference."""
    from diffusers import StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline(transformer=sd.unet, scheduler=sd.scheduler, vae=sd.vae,
                                    text_encoder=sd.text_encoder, tokenizer=sd.tokenizer,
                                    text_encoder_2=sd.text_encoder_2, tokenizer_2=sd.tokenizer_2,
                                    text_encoder_3=sd.text_encoder_3, tokenizer_3=sd.tokenizer_3)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_conditioning_is_the_pipelines(tiny_sd3):
    embeds, neg, pooled, neg_pooled = pipeline(tiny_sd3).encode_prompt(
        PROMPTS, None, None, do_classifier_free_guidance=True, max_sequence_length=tiny_sd3.max_sequence_length)
    assert embeds.shape == (2, 77 + 16, 96) and pooled.shape == (2, 16 + 24)
    with torch.no_grad():
        cond, uncond = encode_prompts(tiny_sd3, PROMPTS), encode_prompts(tiny_sd3, ["", ""])
    assert cond.shape == (2, 77 + 16 + 1, 96)
    torch.testing.assert_close(cond[:, :-1], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond[:, -1, :40], pooled, rtol=0, atol=0)  # the pooled row, zeros after
    torch.testing.assert_close(uncond[:, :-1], neg, rtol=0, atol=0)  # "" encoded, as the pipeline's negative
    torch.testing.assert_close(uncond[:, -1, :40], neg_pooled, rtol=0, atol=0)
    assert not cond[:, -1, 40:].any() and not cond[:, :77, 32 + 48:].any() and uncond.any()


def test_load_is_deterministic_and_leaves_the_callers_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = load_sd("tiny-sd3"), load_sd("tiny-sd3")
    assert torch.equal(torch.random.get_rng_state(), before)
    assert a.flow and not load_sd("tiny").flow
    for m, n in [(a.unet, b.unet), (a.vae, b.vae), (a.text_encoder, b.text_encoder),
                 (a.text_encoder_2, b.text_encoder_2), (a.text_encoder_3, b.text_encoder_3)]:
        assert all(torch.equal(p, q) for p, q in zip(m.state_dict().values(), n.state_dict().values()))
        assert not any(p.requires_grad for p in m.parameters()) and not m.training
    assert latent_shape(a, 64) == (16, 8, 8) and native_resolution(a) == 64
    assert a.vae.config.scaling_factor == 1.5305 and a.vae.config.shift_factor == 0.0609
    assert a.scheduler.config.shift == 3.0
