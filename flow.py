"""The rectified-flow sampler you can backpropagate through (SD3 / SD3.5, FLUX.1): the Euler ODE of the transformer's
velocity, its SDE (Flow-GRPO's, for RL), the same checkpointing and backprop modes as sampler.py's DDIM.

    sd = load_sd("tiny-sd3")                             # model.py; or "tiny-flux", or an SD3 / FLUX hub id
    cond, uncond = encode_prompts(sd, ["a cat"]), encode_prompts(sd, [""])   # (B, L + 1, D): the pooled vector last
    latents = torch.randn(1, *latent_shape(sd, 64))      # (B, 16, h, w)
    images = decode(sd, flow_sample(sd, cond, uncond, latents, steps=20, guidance=7.0))   # grad on: checkpointed
    xs, logps, ts = flow_rollout(sd, cond, uncond, latents, 20, 7.0, noise_level=0.7)    # ddpo.py's rollout

What differs from DDIM is small and written out below: the state moves on a straight line between data and noise,
x_s = (1 - s) x0 + s eps, the transformer predicts the velocity v = eps - x0, and a step is x + (s' - s) v. Everything
that makes the chain trainable is sampler.py's and is used as is: `run_chain` runs flow_sample's pieces under the
backprop modes (all, K, lo,hi, DRaFT-LV, DRTune, one-step), with `checkpoint` around each transformer call.
`flow_sample`, `flow_rollout` and `flow_transition` take the arguments of ddim_sample, ddim_rollout and
ddim_transition, the SDE's noise level where DDIM has eta, so a script picks one family or the other in one line.

References: rectified flow, Liu et al. 2022 (arXiv:2209.03003); SD3, Esser et al. 2024 (arXiv:2403.03206); FLUX.1,
Black Forest Labs 2024; Flow-GRPO, Liu et al. 2025 (arXiv:2505.05470); Direct-Align / SRPO, Shen et al. 2025
(arXiv:2509.06942); DRaFT, Clark et al. 2023 (arXiv:2309.17400); DRTune, Wu et al. 2024 (arXiv:2405.00760).
"""
import torch

from sampler import guidance_context, halves_in_turn, noise_like, run_chain, step_logprob


def flow_sample(sd, cond, uncond, latents, steps=28, guidance=7.0, noise_level=0.0, backprop="all", generator=None,
                keep_activations=0, cfg_in_turn=False):
    """Run the rectified-flow sampler from noise `latents` (B, 16, h, w) with the conditioning `cond`, `uncond`
    (B, L + 1, D) from encode_prompts (the last row: the pooled CLIP vector). SD3's sampler, written out: under
    `torch.no_grad()` it matches diffusers' StableDiffusion3Pipeline (FlowMatchEulerDiscreteScheduler) to fp32
    precision. `sd.unet` is the transformer here. FLUX.1-dev (FluxPipeline, also matched): `uncond` is unused (None
    will do), `guidance` goes to the transformer's guidance embedding, and the latents are packed 2x2 for each call.

    Notation (rectified flow, Liu et al. 2022; SD3, Esser et al. 2024), s in [0, 1], s = 1 pure noise:
        x_s   = (1 - s) * x0 + s * eps                 the straight path from data x0 to noise eps
        v     = transformer(x_s, t = 1000 s, c)       the predicted velocity dx_s/ds = eps - x0
        x_s'  = x_s + (s' - s) * v                     one Euler step to the next (smaller) s'
        x0    = x_s - s * v                            the predicted clean latents (the last step, s' = 0, lands here)
    The s_i (steps + 1 of them, the last 0) are the model's scheduler's sigmas after set_timesteps(steps), so SD3's
    shift (s -> shift s / (1 + (shift - 1) s), 3.0) comes from its config; FLUX's are FluxPipeline's, shifted by the
    image's token count (flow_schedule). v is classifier-free guided, v_u + guidance * (v_c - v_u), both halves in one
    batched call (FLUX-dev: one call, guidance embedded). noise_level a > 0 takes the SDE's steps instead
    (flow_transition: the Euler step plus a drift correction and noise z from `generator`); a = 0 is the ODE above.

    backprop, keep_activations, cfg_in_turn: as ddim_sample's; sampler.run_chain (where no_grad, detach and
    checkpoint apply) runs the pieces defined here under them. In the flow's terms: ("lv", N) re-noises the finished
    sample on the path (the legend's first line, eps a known draw z) to the last step's s and takes that step again,
    N * B rows; ("onestep", F) re-noises it to s = F and returns x_s - s v (the last line); ("drtune", N) writes each
    step as x_s' = c_x x_s + c_v v(sg(x_s)) (+ noise), c_x = 1 on the ODE. FLUX has no CFG halves for cfg_in_turn.
    """
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    sched = flow_schedule(sd, steps, latents)  # sched.timesteps: t_i = 1000 s_i (steps,), fp32: what the model reads
    coefs = [_sde_coefficients(sched.sigmas, i, noise_level) for i in range(steps)]  # (c_x, c_v, std) per step
    trainable = [p for p in sd.unet.parameters() if p.requires_grad]  # LoRA: gradients flow here

    def transformer(x, t, context, in_turn=False):  # the guided velocity; in_turn: CFG's halves' backward one by one
        if in_turn and guidance > 1.0 and not _is_flux(sd) and torch.is_grad_enabled():
            return halves_in_turn(lambda x, context, g: flow_output(sd, x, t, context, g), x, context, guidance,
                                  trainable)
        return flow_output(sd, x, t, context, guidance)

    def update(x, v, i, z):  # step i, x_s -> x_s': linear in x and v, so the graph keeps no tensor; z: the SDE's noise
        c_x, c_v, std = coefs[i]
        return c_x * x + c_v * v + std * z if noise_level > 0 else x + c_v * v  # ODE: c_x = 1, c_v = s' - s

    def noised(x0, z, s=None):  # clean latents x0 re-noised with the noise z to level s (None: the last step's)
        s = float(sched.sigmas[-2]) if s is None else s
        return (1 - s) * x0 + s * z  # the path, the legend's first line

    def clean(x, s, context, in_turn=False):  # one call at level s, and its predicted x0 (the legend's last line)
        return x - s * transformer(x, torch.tensor(1000 * s, dtype=torch.float32), context, in_turn)  # t: fp32

    return run_chain(latents, flow_context(sd, cond, uncond, guidance), sched.timesteps, backprop, generator,
                     transformer, update, noised, clean, noise_level > 0, trainable, keep_activations, cfg_in_turn)


def _sde_coefficients(sigmas, i, a):
    """Step i of Flow-GRPO's SDE (Liu et al. 2025, Eq. 9 and its discretisation), s = sigmas[i] -> s' = sigmas[i + 1],
    ds = s' - s < 0, noise level a:
        std_s  = a * sqrt(s / (1 - s))                               (at s = 1, s_1 in the denominator, as Flow-GRPO)
        x_s'   = x_s + ds * (v + std_s^2 / (2 s) * (x_s + (1 - s) v)) + std_s * sqrt(-ds) * z,   z ~ N(0, I)
               = c_x * x_s + c_v * v + std * z
    Returns (c_x, c_v, std) as Python floats; a = 0 gives (1, ds, 0): the Euler ODE step, ds taken in fp32 from the
    scheduler's fp32 `sigmas` as its own step does, so that the ODE equals the pipeline's bit for bit."""
    ds = float(sigmas[i + 1] - sigmas[i])
    s, s_1 = float(sigmas[i]), float(sigmas[1])
    std_s = a * (s / (1 - (s_1 if s >= 1 else s))) ** 0.5
    return 1 + ds * std_s ** 2 / (2 * s), ds * (1 + std_s ** 2 * (1 - s) / (2 * s)), std_s * (-ds) ** 0.5


def flow_context(sd, cond, uncond, guidance):
    """What one transformer call sees: [uncond; cond] (2B, L + 1, D) with classifier-free guidance (SD3), cond alone
    without it, and always for FLUX (its guidance is an embedding, not a second batch half)."""
    if _is_flux(sd):
        return cond.to(sd.unet.dtype)
    return guidance_context(cond, uncond, guidance, sd.unet.dtype)


def flow_transition(sd, v, x, t, steps, noise_level):
    """The Gaussian of one step of the SDE, p(x_s' | x_s) = N(mean, std^2 I), from the velocity `v` at x_s, t = 1000 s
    one of the schedule's timesteps (the arguments of sampler.ddim_transition, noise_level for eta). Returns (mean
    (B, 16, h, w), std, a float); std is 0 at noise level 0, the ODE's deterministic step."""
    sched = flow_schedule(sd, steps, x)
    i = int((sched.timesteps - t.cpu().float()).abs().argmin())  # which step: t is the schedule's own timestep
    c_x, c_v, std = _sde_coefficients(sched.sigmas, i, noise_level)
    return c_x * x + c_v * v, std


@torch.no_grad()
def flow_rollout(sd, cond, uncond, latents, steps=28, guidance=7.0, noise_level=0.7, generator=None):
    """Sample like flow_sample with noise_level > 0 (the same noise from `generator`, the same images) and keep what
    policy-gradient RL needs (Flow-GRPO): every step's latents and the log-probability of each transition under the
    model that sampled it. Returns (xs (T + 1, B, 16, h, w): x_1 ... x_0, logps (T, B), timesteps (T,))."""
    if not noise_level > 0:
        raise ValueError("a rollout's log-probabilities need noise_level > 0 (0 is the deterministic ODE)")
    sched = flow_schedule(sd, steps, latents)
    context = flow_context(sd, cond, uncond, guidance)
    xs, logps, ts = [latents], [], sched.timesteps.clone()
    for i, t in enumerate(ts):  # the schedule is known here: step i's coefficients, as flow_transition finds them
        x = xs[-1]
        c_x, c_v, std = _sde_coefficients(sched.sigmas, i, noise_level)
        mean = c_x * x + c_v * flow_output(sd, x, t, context, guidance)
        xs.append(mean + std * noise_like(x, generator))
        logps.append(step_logprob(xs[-1], mean, std))
    return torch.stack(xs), torch.stack(logps), ts


def flow_schedule(sd, steps, latents):
    """The model's flow scheduler set to `steps` for latents like these (FLUX's shift depends on the image's size):
    sched.sigmas (steps + 1, the last 0) and sched.timesteps = 1000 sigma."""
    sched = sd.scheduler
    if hasattr(sched, "alphas_cumprod"):  # a DDIMScheduler: SD 1.x, 2.x, XL
        raise ValueError(f"a {type(sched).__name__} is a diffusion model's, not a flow's: sample it with ddim_sample")
    if sched.config.get("stochastic_sampling"):
        raise ValueError("flow schedulers with stochastic sampling are not supported yet (SD3 and FLUX do not use it)")
    if not _is_flux(sd):
        sched.set_timesteps(steps)  # sigmas shifted by the model's config (SD3: shift 3.0), and a final 0 appended
        return sched
    # FLUX-dev: the shift grows with the image's token count n = h/2 * w/2, linear in n (FluxPipeline's calculate_shift):
    #   mu = n m + b,  m = (max_shift - base_shift) / (max_len - base_len),  b = base_shift - m base_len
    #   s -> e^mu / (e^mu + 1 / s - 1)  (the scheduler's time_shift) on the pipeline's evenly spaced s = 1 ... 1/steps
    c = sched.config
    m = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
    mu = latents.shape[-2] * latents.shape[-1] // 4 * m + (c["base_shift"] - m * c["base_image_seq_len"])
    d = (1 / steps - 1) / max(steps - 1, 1)  # np.linspace(1, 1 / steps, steps), written out as numpy computes it
    sched.set_timesteps(sigmas=[i * d + 1 for i in range(steps - 1)] + [1 / steps], mu=mu)  # FLUX-schnell (no
    return sched  # dynamic shifting in its config): the same evenly spaced s, mu unused, its static shift 1.0 kept


def flow_output(sd, x, t, context, guidance):
    """The transformer's velocity at x_s (B, 16, h, w) and t = 1000 s, classifier-free guided when guidance > 1:
    v_u + guidance * (v_c - v_u), both halves in one batched call on `context` (guidance_context), whose last row is
    the pooled vector (its first pooled_projection_dim entries: SD3's CLIP-L and CLIP-G projections side by side).
    FLUX: _flux_output, no CFG batch."""
    if _is_flux(sd):
        return _flux_output(sd, x, t, context, guidance)
    cfg = guidance > 1.0
    context, pooled = context[:, :-1], context[:, -1, :sd.unet.config.pooled_projection_dim]
    x_in = (torch.cat([x, x]) if cfg else x).to(sd.unet.dtype)
    v = sd.unet(hidden_states=x_in, timestep=t.to(x.device).expand(len(x_in)), encoder_hidden_states=context,
                pooled_projections=pooled).sample
    if cfg:
        v_u, v_c = v.chunk(2)
        v = v_u + guidance * (v_c - v_u)
    return v.to(x.dtype)


def _is_flux(sd):
    return type(sd.unet).__name__ == "FluxTransformer2DModel"


def _flux_output(sd, x, t, context, guidance):
    """FLUX's velocity at x_s (B, 16, h, w), as FluxPipeline calls its transformer: the latents packed 2x2 into tokens
    (B, h/2 * w/2, 64) and unpacked after (_pack_latents / _unpack_latents), each token's position (0, row, col) in
    img_ids and every text row's (0, 0, 0) in txt_ids (the rotary embedding's); the time as s = t / 1000; FLUX-dev's
    guidance as an embedding the transformer reads, one call on `context` = cond (B, T + 1, D), no CFG batch."""
    b, c, h, w = x.shape
    tokens = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(x.device, sd.unet.dtype)
    txt_ids = torch.zeros(context.shape[1] - 1, 3, device=x.device, dtype=sd.unet.dtype)
    g = torch.full((b,), guidance, device=x.device, dtype=torch.float32) if sd.unet.config.guidance_embeds else None
    v = sd.unet(hidden_states=tokens.to(sd.unet.dtype), timestep=t.to(x.device).expand(b).to(x.dtype) / 1000,
                guidance=g, encoder_hidden_states=context[:, :-1], txt_ids=txt_ids, img_ids=img_ids,
                pooled_projections=context[:, -1, :sd.unet.config.pooled_projection_dim]).sample
    return v.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w).to(x.dtype)


