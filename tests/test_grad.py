"""Gradients through the checkpointed, truncated loop equal those of a plain autograd loop built on diffusers'
DDIMScheduler.step, with no checkpointing."""
import pytest
import torch
from diffusers import DDIMScheduler

from lora import inject_lora
from model import decode, encode_prompts, latent_shape
from rewards import compress
from sampler import ddim_sample, drtune_steps

PROMPTS = ["a cat", "a dog"]
STEPS = 6


def setup(sd):
    torch.manual_seed(0)
    params = inject_lora(sd.unet, rank=2)
    with torch.no_grad():
        for p in params:  # non-zero up matrices, so every LoRA tensor gets a gradient
            p.normal_(0, 0.05)
    x = torch.randn(2, *latent_shape(sd, 64), generator=torch.Generator().manual_seed(1))
    return params, x, encode_prompts(sd, PROMPTS).detach(), encode_prompts(sd, [""] * 2).detach()


def reference_latents(sd, cond, uncond, x, guidance, eta, k, generator):
    """The textbook loop: full graph, no checkpoint; x is detached before the last k steps."""
    sched = DDIMScheduler.from_config(sd.scheduler.config)
    sched.set_timesteps(STEPS)
    for i, t in enumerate(sched.timesteps):
        if i == STEPS - k:
            x = x.detach()
        eps_u, eps_c = sd.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        x = sched.step(eps_u + guidance * (eps_c - eps_u), t, x, eta=eta, generator=generator).prev_sample
    return x


def grads(params, loss):
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("backprop,k", [("all", STEPS), (1, 1), (3, 3)])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_lora_gradients_match_plain_autograd(tiny, backprop, k, eta):
    params, x, cond, uncond = setup(tiny)
    ours = ddim_sample(tiny, cond, uncond, x, steps=STEPS, guidance=5.0, eta=eta, backprop=backprop,
                       generator=torch.Generator().manual_seed(2))
    ref = reference_latents(tiny, cond, uncond, x, 5.0, eta, k, torch.Generator().manual_seed(2))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    g_ours = grads(params, -compress(decode(tiny, ours)).mean())
    g_ref = grads(params, -compress(tiny.vae.decode(ref / tiny.vae.config.scaling_factor).sample.div(2).add(0.5)
                                    .clamp(0, 1)).mean())
    assert all(g.abs().sum() > 0 for g in g_ours)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_truncation_changes_the_gradient(tiny):  # guards against a window that silently does nothing
    params, x, cond, uncond = setup(tiny)
    g = [grads(params, ddim_sample(tiny, cond, uncond, x, steps=STEPS, backprop=b).square().mean()) for b in ("all", 1)]
    assert not torch.allclose(g[0][0], g[1][0])


def test_keeping_activations_gives_the_same_gradient(tiny):
    params, x, cond, uncond = setup(tiny)
    g = [grads(params, -compress(decode(tiny, ddim_sample(tiny, cond, uncond, x, steps=STEPS, keep_activations=n)))
               .mean()) for n in (0, 2, STEPS)]
    for a, b, c in zip(*g):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_draft_lv_gradient_is_the_mean_of_single_draw_gradients(tiny, eta):
    n = 3
    params, x, cond, uncond = setup(tiny)
    lv = ddim_sample(tiny, cond, uncond, x, steps=STEPS, guidance=5.0, eta=eta, backprop=("lv", n),
                     generator=torch.Generator().manual_seed(4))
    assert lv.shape == (n * 2, *x.shape[1:])
    g_lv = grads(params, -compress(decode(tiny, lv)).mean())

    # by hand: the finished sample without gradient, then n independent re-noise + last-step denoises (diffusers' step)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        x0 = reference_latents(tiny, cond, uncond, x, 5.0, eta, 0, generator)
    sched = DDIMScheduler.from_config(tiny.scheduler.config)
    sched.set_timesteps(STEPS)
    t = sched.timesteps[-1]
    a = sched.alphas_cumprod[t]
    z = torch.randn((n * 2, *x.shape[1:]), generator=generator).chunk(n)
    singles = []
    for i in range(n):
        xt = a.sqrt() * x0 + (1 - a).sqrt() * z[i]
        eps_u, eps_c = tiny.unet(torch.cat([xt, xt]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        x_prev = sched.step(eps_u + 5.0 * (eps_c - eps_u), t, xt, eta=eta, generator=generator).prev_sample
        singles.append(grads(params, -compress(decode(tiny, x_prev)).mean()))
    s0, s1 = singles[0][0], singles[1][0]
    assert (s0 - s1).abs().max() > 1e-2 * s0.abs().max()  # the draws differ
    for j, g in enumerate(g_lv):
        want = torch.stack([s[j] for s in singles]).mean(0)
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def drtune_reference(sd, cond, uncond, x, guidance, eta, trained, generator):
    """DRTune by hand on diffusers' DDIMScheduler.step, plain autograd: the UNet's input detached at every step, its
    call with gradients on the `trained` steps only and under no_grad on the others."""
    sched = DDIMScheduler.from_config(sd.scheduler.config)
    sched.set_timesteps(STEPS)
    for i, t in enumerate(sched.timesteps):
        with torch.set_grad_enabled(i in trained):
            x_in = x.detach()  # sg(x_t)
            eps_u, eps_c = sd.unet(torch.cat([x_in, x_in]), t, encoder_hidden_states=torch.cat([uncond, cond])
                                   ).sample.chunk(2)
        x = sched.step(eps_u + guidance * (eps_c - eps_u), t, x, eta=eta, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("n,eta", [(1, 1.0), (2, 0.0), (STEPS, 1.0)])
def test_drtune_gradients_match_the_reference_loop(tiny, n, eta):
    params, x, cond, uncond = setup(tiny)
    x = x.requires_grad_()  # DRTune's chain reaches the initial noise too: through the linear terms alone
    ours = ddim_sample(tiny, cond, uncond, x, steps=STEPS, guidance=5.0, eta=eta, backprop=("drtune", n),
                       generator=torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(2)
    trained = drtune_steps(n, STEPS, generator)  # the same offset, drawn first, as ddim_sample draws it
    ref = drtune_reference(tiny, cond, uncond, x, 5.0, eta, trained, generator)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    g_ours = grads([*params, x], -compress(decode(tiny, ours)).mean())
    g_ref = grads([*params, x], -compress(tiny.vae.decode(ref / tiny.vae.config.scaling_factor).sample.div(2).add(0.5)
                                          .clamp(0, 1)).mean())
    assert all(g.abs().sum() > 0 for g in g_ours)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
    # the stop-gradient is real: the noise's gradient is the product of the linear terms c_x = sqrt(a_prev / a_t)
    # over the steps (d x_0 / d x_T = sqrt(a_final / a_T)) times the gradient at the end, not full backprop's
    sched = tiny.scheduler
    final = float(sched.alphas_cumprod[0])  # set_alpha_to_one=False: a_prev after the last step
    end = ours.detach().requires_grad_()
    g_end = torch.autograd.grad(-compress(decode(tiny, end)).mean(), end)[0]
    torch.testing.assert_close(g_ours[-1], g_end * (final / float(sched.alphas_cumprod[sched.timesteps[0]])) ** 0.5,
                               rtol=1e-4, atol=1e-4 * g_end.abs().max().item())


def test_drtune_with_kept_activations_gives_the_same_gradient(tiny):
    params, x, cond, uncond = setup(tiny)
    g = [grads(params, -compress(decode(tiny, ddim_sample(tiny, cond, uncond, x, steps=STEPS, backprop=("drtune", 3),
                                                          generator=torch.Generator().manual_seed(5),
                                                          keep_activations=k))).mean()) for k in (0, 2)]
    for a, b in zip(*g):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("level,keep", [(0.6, 0), ((0.2, 0.9), 1)])
def test_onestep_gradient_is_one_unet_call_on_the_renoised_sample(tiny, level, keep):
    """("onestep", F), Direct-Align / ReFL: the chain without gradients, its sample re-noised with known noise to
    t = F * 999, the UNet's clean prediction x0 from there with gradients (diffusers' step reports it as
    pred_original_sample); by hand on diffusers' DDIMScheduler."""
    params, x, cond, uncond = setup(tiny)
    ours = ddim_sample(tiny, cond, uncond, x, steps=STEPS, guidance=5.0, eta=1.0, backprop=("onestep", level),
                       generator=torch.Generator().manual_seed(4), keep_activations=keep)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        x0 = reference_latents(tiny, cond, uncond, x, 5.0, 1.0, 0, generator)  # the eta noise drawn first, in order
    f = level if isinstance(level, float) else level[0] + (level[1] - level[0]) * float(torch.rand((), generator=generator))
    sched = DDIMScheduler.from_config(tiny.scheduler.config)
    sched.set_timesteps(STEPS)
    t = torch.tensor(round(f * 999))
    a = sched.alphas_cumprod[t]
    xt = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=generator)
    eps_u, eps_c = tiny.unet(torch.cat([xt, xt]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
    want = sched.step(eps_u + 5.0 * (eps_c - eps_u), t, xt).pred_original_sample
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    g_ours = grads(params, -compress(decode(tiny, ours)).mean())
    g_ref = grads(params, -compress(decode(tiny, want)).mean())
    assert all(g.abs().sum() > 0 for g in g_ours)
    a, b = torch.cat([g.flatten() for g in g_ours]), torch.cat([g.flatten() for g in g_ref])
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())  # to fp32 rounding of the whole


@pytest.mark.parametrize("backprop", ["all", 3, ("drtune", 2), ("lv", 2), ("onestep", 0.5)])
def test_cfg_halves_in_turn_give_the_same_gradient_with_less_memory(tiny, backprop):
    """cfg_in_turn: a recomputed step's backward runs CFG's two halves one after the other (sampler.halves_in_turn).
    The same samples (the forward is unchanged), the same gradients to rounding (the halves run as two calls of B
    instead of one of 2B), and less memory in the chain's backward: measured on the tiny model at 64 px, peak
    tensor bytes of the backward from the latents alone (no decoder, whose backward is larger here)."""
    from tools.step_memory import TensorMemory
    params, x, cond, uncond = setup(tiny)
    runs = {}
    for in_turn in (False, True):
        latents = ddim_sample(tiny, cond, uncond, x, steps=STEPS, guidance=5.0, eta=1.0, backprop=backprop,
                              generator=torch.Generator().manual_seed(2), cfg_in_turn=in_turn)
        with TensorMemory() as mem:
            g = grads(params, latents.square().mean())
        runs[in_turn] = latents, g, mem.peak
    (a, g_a, peak_a), (b, g_b, peak_b) = runs[False], runs[True]
    assert torch.equal(a, b)
    assert all(g.abs().sum() > 0 for g in g_b)
    for u, v in zip(g_b, g_a):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4 * v.abs().max().item())
    assert peak_b < 0.75 * peak_a, (peak_b, peak_a)


@pytest.mark.parametrize("name", ["tiny", "tiny-sd3", "tiny-flux"])
def test_checkpointed_blocks_give_the_same_gradient_with_less_memory(name):
    """--checkpoint-blocks: diffusers' per-block checkpointing, nested in the chain's per-step checkpoint, acts in a
    step's recomputation in backward. The gradients equal those without (fp32: the same ops in the same order), and
    the backward from the latents holds less: a block's activations at a time, not a whole model call's."""
    from flow import flow_sample
    from model import load_sd
    from tools.step_memory import TensorMemory
    runs = {}
    for blocks in (False, True):
        sd = load_sd(name)
        params, x, cond, uncond = setup(sd)
        if blocks:
            sd.unet.enable_gradient_checkpointing()
        sample = flow_sample if sd.flow else ddim_sample
        latents = sample(sd, cond, uncond, x, 4, 5.0, 0.0, "all")
        with TensorMemory() as mem:
            g = grads(params, latents.square().mean())
        runs[blocks] = latents, torch.cat([v.flatten() for v in g]), mem.peak
    (a, g_a, peak_a), (b, g_b, peak_b) = runs[False], runs[True]
    assert torch.equal(a, b) and g_a.abs().sum() > 0
    assert ((g_b - g_a).norm() / g_a.norm()).item() <= 1e-6
    assert peak_b < peak_a, (peak_b, peak_a)


def test_tiled_decode_is_diffusers_tiled_decode_with_its_gradient(tiny):
    """decode(tile=...) (each tile a checkpointed node) gives diffusers' own tiled decode (AutoencoderKL.enable_tiling,
    its tile sizes set) and the same gradient as plain autograd through it; it is not the untiled decode."""
    vae = tiny.vae
    z = torch.randn(2, *latent_shape(tiny, 128), generator=torch.Generator().manual_seed(3)) * vae.config.scaling_factor
    z_ours, z_ref = z.clone().requires_grad_(), z.clone().requires_grad_()
    ours = decode(tiny, z_ours, tile=64)  # 128 px in 3 x 3 tiles of 64 px (8 latent pixels, one every 6)
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = 64, 8
    ref = (vae.decode(z_ref / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    vae.disable_tiling()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    g_ours, g_ref = (grads([x], -compress(images).mean())[0] for x, images in ((z_ours, ours), (z_ref, ref)))
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-8)
    with torch.no_grad():
        assert (decode(tiny, z) - ours).abs().max() > 1e-3  # the tiles' GroupNorms see only the tile
