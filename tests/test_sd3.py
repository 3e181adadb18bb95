"""SD3 (rectified flow) through the same files, on the offline miniature `tiny-sd3` (real classes: an MMDiT
SD3Transformer2DModel, two CLIPs with projection, a T5 encoder reading 16 tokens, SD3's VAE scaling and shift, a
FlowMatchEulerDiscreteScheduler with shift 3.0): the conditioning equals StableDiffusion3Pipeline.encode_prompt,
sampling and decoding equal the stock pipeline, and LoRA gradients through the checkpointed chain equal a plain
autograd Euler loop (backprop all, K, kept activations, DRTune, DRaFT-LV); a saved SD3 directory loads back as the
miniature. Not yet: train.py / ddpo.py / sample.py on SD3."""
import pytest
import torch

from conftest import held_for_backward
from flow import flow_sample
from lora import inject_lora, load_lora, lora_layers, save_lora
from model import decode, encode_prompts, free_text_encoders, latent_shape, load_sd, native_resolution
from rewards import compress
from sampler import ddim_sample, drtune_steps

PROMPTS = ["a cat", "a red dog on the grass"]
# SD3's attention, both streams: the image's q/k/v/out and the text's (the joint blocks' "add_" projections)
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


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


def noise(sd, seed=0):
    return torch.randn(len(PROMPTS), *latent_shape(sd, native_resolution(sd)),
                       generator=torch.Generator().manual_seed(seed))


def ours(sd, x, steps, guidance, **kw):
    return flow_sample(sd, encode_prompts(sd, PROMPTS), encode_prompts(sd, [""] * len(PROMPTS)), x, steps, guidance,
                       **kw)


def stock(sd, x, steps, guidance, output_type="latent"):
    return pipeline(sd)(PROMPTS, latents=x.clone(), num_inference_steps=steps, guidance_scale=guidance,
                        max_sequence_length=sd.max_sequence_length, output_type=output_type).images


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


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_matches_the_stock_sd3_pipeline(tiny_sd3, guidance):
    x = noise(tiny_sd3)
    with torch.no_grad():
        got = ours(tiny_sd3, x, 6, guidance)
    want = stock(tiny_sd3, x, 6, guidance)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    images = stock(tiny_sd3, x, 6, guidance, output_type="pt")  # SD3's VAE: latents / scale + shift
    with torch.no_grad():
        torch.testing.assert_close(decode(tiny_sd3, got), images, rtol=1e-4, atol=1e-4)


def velocity(sd, guidance, n=1):
    """The guided transformer on the pipeline's own conditioning (encode_prompt), the prompts repeated n times."""
    embeds, neg, pooled, neg_pooled = pipeline(sd).encode_prompt(
        PROMPTS, None, None, do_classifier_free_guidance=True, max_sequence_length=sd.max_sequence_length)
    context = torch.cat([neg.repeat(n, 1, 1), embeds.repeat(n, 1, 1)])
    pooled = torch.cat([neg_pooled.repeat(n, 1), pooled.repeat(n, 1)])

    def v(x, t):
        v_u, v_c = sd.unet(hidden_states=torch.cat([x, x]), timestep=t.expand(2 * len(x)),
                           encoder_hidden_states=context, pooled_projections=pooled).sample.chunk(2)
        return v_u + guidance * (v_c - v_u)
    return v


def reference(sd, x, steps, guidance, k=None, trained=None):
    """The textbook Euler loop on the pipeline's conditioning and the scheduler's sigmas: full graph, no checkpoint;
    x is detached before the last k steps; or DRTune: the transformer sees x detached at the `trained` steps, runs
    without grad at the others."""
    v = velocity(sd, guidance)
    sd.scheduler.set_timesteps(steps)
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
        x = x + (sd.scheduler.sigmas[i + 1] - sd.scheduler.sigmas[i]) * out
    return x


def lora(sd):
    torch.manual_seed(0)
    params = inject_lora(sd.unet, rank=2, targets=TARGETS)
    assert len(params) == 2 * (4 * 2 + 4 * 2 - 1)  # 2 blocks x 8 targets, less the last block's to_add_out
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
    dead = [n for n in lora_layers(sd.unet) for _ in (0, 1)]  # one name per tensor, down then up
    dead = [n for n, g in zip(dead, g_ours) if not g.abs().sum() > 0]
    # the last block's text stream is "context_pre_only": its queries' output is dropped, so add_q_proj there has no
    # gradient (its keys and values still feed the image stream); every other LoRA tensor has one
    assert dead == ["transformer_blocks.1.attn.add_q_proj"] * 2, dead
    a, b = torch.cat([g.flatten() for g in g_ours]), torch.cat([g.flatten() for g in g_ref])
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())  # to fp32 rounding of the whole


@pytest.mark.parametrize("backprop,k,keep", [("all", 4, 0), (2, 2, 0), ("all", 4, 2)])
def test_lora_gradients_match_plain_autograd(tiny_sd3, backprop, k, keep):
    params, x = lora(tiny_sd3), noise(tiny_sd3)
    got = ours(tiny_sd3, x, 4, 5.0, backprop=backprop, keep_activations=keep)
    assert_same_gradients(tiny_sd3, params, got, reference(tiny_sd3, x, 4, 5.0, k))


@pytest.mark.parametrize("keep", [0, 1])
def test_drtune_gradients_match_the_reference_loop(tiny_sd3, keep):
    params, x = lora(tiny_sd3), noise(tiny_sd3)
    got = ours(tiny_sd3, x, 4, 5.0, backprop=("drtune", 2), keep_activations=keep,
               generator=torch.Generator().manual_seed(3))
    trained = drtune_steps(2, 4, torch.Generator().manual_seed(3))  # the same offset, drawn first, as flow_sample does
    assert_same_gradients(tiny_sd3, params, got, reference(tiny_sd3, x, 4, 5.0, trained=trained))


def test_draft_lv_gradients_match_the_reference(tiny_sd3):
    """("lv", 3): the finished sample re-noised 3 times to the last step's s, the last step taken again with grad."""
    params, x = lora(tiny_sd3), noise(tiny_sd3)
    got = ours(tiny_sd3, x, 4, 5.0, backprop=("lv", 3), generator=torch.Generator().manual_seed(3))
    assert got.shape == (3 * len(PROMPTS), *x.shape[1:])
    with torch.no_grad():
        x0 = reference(tiny_sd3, x, 4, 5.0, k=4).repeat(3, 1, 1, 1)  # draw-major
    s = tiny_sd3.scheduler.sigmas[-2]
    x = (1 - s) * x0 + s * torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    want = x - s * velocity(tiny_sd3, 5.0, n=3)(x, tiny_sd3.scheduler.timesteps[-1])  # x0 = x_s - s v
    assert_same_gradients(tiny_sd3, params, got, want)


def test_each_sampler_refuses_the_other_family(tiny_sd3, tiny):
    x, cond = noise(tiny_sd3), encode_prompts(tiny_sd3, PROMPTS)
    with pytest.raises(ValueError, match="rectified-flow model's: sample it with flow_sample"):
        ddim_sample(tiny_sd3, cond, cond, x, steps=2)
    cond = encode_prompts(tiny, PROMPTS)
    with pytest.raises(ValueError, match="not a flow's: sample it with ddim_sample"):
        flow_sample(tiny, cond, cond, torch.zeros(2, 4, 8, 8), steps=2)


def test_memory_is_flat_in_the_number_of_steps(tiny_sd3):
    """What backward holds grows by one latent per step, as for SD 1.x: the transformer's activations are
    recomputed."""
    lora(tiny_sd3)
    x = noise(tiny_sd3)
    held = {steps: held_for_backward(lambda: ours(tiny_sd3, x, steps, 5.0)) for steps in (4, 16)}
    assert held[16] - held[4] <= 12 * x.numel() * x.element_size() * 1.05, held


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


def test_a_saved_sd3_directory_loads_as_the_miniature(tiny_sd3, tmp_path):
    """The stock pipeline's save_pretrained of the miniature, then load_sd of the directory: the same fields (T5 in
    text_encoder_3, its 16 tokens: the tokenizer's limit under the pipeline's default 256) and the same latents."""
    pipeline(tiny_sd3).save_pretrained(tmp_path)
    loaded = load_sd(str(tmp_path))
    assert loaded.flow and not loaded.flux and loaded.max_sequence_length == tiny_sd3.max_sequence_length == 16
    for field in ("unet", "scheduler", "text_encoder", "text_encoder_2", "text_encoder_3"):
        assert type(getattr(loaded, field)) is type(getattr(tiny_sd3, field)), field
    x = noise(tiny_sd3)
    with torch.no_grad():
        assert torch.equal(ours(loaded, x, 3, 5.0), ours(tiny_sd3, x, 3, 5.0))


def test_sampling_needs_no_text_encoder_once_the_prompts_are_encoded(tiny_sd3):
    """free_text_encoders drops CLIP-L, CLIP-G and T5 (their bytes returned); flow_sample and decode run the same."""
    x, cond, uncond = noise(tiny_sd3), encode_prompts(tiny_sd3, PROMPTS), encode_prompts(tiny_sd3, [""] * len(PROMPTS))
    with torch.no_grad():
        want = decode(tiny_sd3, flow_sample(tiny_sd3, cond, uncond, x, 3, 5.0))
    encoders = (tiny_sd3.text_encoder, tiny_sd3.text_encoder_2, tiny_sd3.text_encoder_3)
    size = sum(t.numel() * t.element_size() for e in encoders for t in [*e.parameters(), *e.buffers()])
    assert free_text_encoders(tiny_sd3) == size
    assert not any(isinstance(m, torch.nn.Module) for m in (tiny_sd3.text_encoder, tiny_sd3.text_encoder_2,
                                                            tiny_sd3.text_encoder_3))
    with torch.no_grad():
        assert torch.equal(decode(tiny_sd3, flow_sample(tiny_sd3, cond, uncond, x, 3, 5.0)), want)
    with pytest.raises(ValueError, match="^the text encoders were freed after the prompts were encoded"):
        encode_prompts(tiny_sd3, [""])


def test_the_real_text_encoders_sizes():
    """What free_text_encoders returns on the real models, from their public configs, built on the meta device (no
    memory): CLIP ViT-L/14's text tower (SD 1.x, SDXL, SD3, FLUX), OpenCLIP ViT-bigG/14's with its projection (SDXL,
    SD3) and T5-XXL's encoder (SD3, FLUX): 9.5 GB in bf16, more than SD3.5 medium's transformer (2.47 B parameters)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    clip = dict(vocab_size=49408, max_position_embeddings=77)
    with torch.device("meta"):
        encoders = {
            "CLIP-L": CLIPTextModelWithProjection(CLIPTextConfig(**clip, hidden_size=768, intermediate_size=3072,
                                                                 num_hidden_layers=12, num_attention_heads=12,
                                                                 hidden_act="quick_gelu", projection_dim=768)),
            "bigG": CLIPTextModelWithProjection(CLIPTextConfig(**clip, hidden_size=1280, intermediate_size=5120,
                                                               num_hidden_layers=32, num_attention_heads=20,
                                                               hidden_act="gelu", projection_dim=1280)),
            "T5-XXL": T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                              num_heads=64, feed_forward_proj="gated-gelu"))}
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in encoders.items()}
    # CLIP-L: 123.06 M without its projection (SD 1.x, SDXL and FLUX use CLIPTextModel), 768 x 768 more with it (SD3)
    assert params == {"CLIP-L": 123_060_480 + 768 * 768, "bigG": 694_659_840, "T5-XXL": 4_762_310_656}
    assert 2 * params["T5-XXL"] / 1e9 == pytest.approx(9.52, abs=0.01)  # GB in bf16


def test_our_lora_file_loads_in_the_stock_sd3_pipeline(tiny_sd3, tmp_path):
    """LoRA on both streams of the MMDiT, saved with save_lora's default prefix for a transformer ("transformer.",
    what StableDiffusion3Pipeline.load_lora_weights reads): the stock pipeline with the file gives our flow_sample's
    latents with CFG, and load_lora restores the same weights into a fresh model."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in inject_lora(tiny_sd3.unet, rank=4, alpha=8, targets=TARGETS):
            p.normal_(0, 0.05)
    x = noise(tiny_sd3)
    with torch.no_grad():
        want = ours(tiny_sd3, x, 4, 5.0)
    path = tmp_path / "lora.safetensors"
    save_lora(tiny_sd3.unet, path)
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
    paths = set(lora_layers(tiny_sd3.unet))
    assert len(paths) == 15 and {p.rsplit(".", 1)[-1] for p in paths} >= {"add_q_proj", "to_add_out", "to_q", "0"}
    assert keys == {f"transformer.{p}.lora_{ab}.weight" for p in paths for ab in "AB"}

    pipe = pipeline(load_sd("tiny-sd3"))
    base = pipe(PROMPTS, latents=x.clone(), num_inference_steps=4, guidance_scale=5.0,
                max_sequence_length=tiny_sd3.max_sequence_length, output_type="latent").images
    pipe.load_lora_weights(str(path))
    assert {n.removesuffix(".lora_A") for n, _ in pipe.transformer.named_modules()
            if n.endswith(".lora_A")} == paths  # PEFT put an adapter on every layer in the file, no more
    got = pipe(PROMPTS, latents=x.clone(), num_inference_steps=4, guidance_scale=5.0,
               max_sequence_length=tiny_sd3.max_sequence_length, output_type="latent").images
    assert (base - want).abs().max() > 100 * 1e-5 * want.abs().max()  # the LoRA changes the latents
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max())

    fresh = load_sd("tiny-sd3")
    load_lora(fresh.unet, path)  # injects with the file's rank, alpha and targets
    ours_now, theirs = lora_layers(tiny_sd3.unet), lora_layers(fresh.unet)
    assert theirs.keys() == ours_now.keys()
    for name, m in ours_now.items():  # scale 2: folding it into lora_B and back is exact
        assert torch.equal(theirs[name].down, m.down) and torch.equal(theirs[name].up, m.up)
        assert theirs[name].scale == m.scale == 2.0
