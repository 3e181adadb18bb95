"""A DDIM sampler you can backpropagate through: gradient checkpointing, the backprop modes, and the RL rollout.

    sd = load_sd("tiny")                                 # model.py: the parts, and the conditioning and decoding
    cond, uncond = encode_prompts(sd, ["a cat"]), encode_prompts(sd, [""])
    latents = torch.randn(1, *latent_shape(sd, 64))      # (B, 4, h, w)
    images = decode(sd, ddim_sample(sd, cond, uncond, latents, steps=20, backprop=1))   # (B, 3, H, W) in [0, 1]
    (-images.mean()).backward()                          # reaches the UNet's trainable weights (e.g. LoRA)

With grad enabled, `ddim_sample` keeps only the latents between steps: the steps run through `checkpoint` (gradient
checkpointing, written out below), so each step's UNet activations are recomputed during backward and memory stays
flat in the number of steps. `backprop` truncates the chain: steps before the window run under `no_grad` and build
no graph. Under `torch.no_grad()` it is a plain DDIM sampler that matches diffusers' `DDIMScheduler` to fp32 precision.
`ddim_rollout` samples the same chain and keeps what policy-gradient RL needs (ddpo.py). This file imports nothing
of the project's: `sd` is what model.load_sd returns, or any object with its `unet`, `vae`, `scheduler` (a
DDIMScheduler) and `text_encoder_2` (None but for SDXL). `flow_sample` is the same for SD3's rectified flow: Euler steps
of the ODE on the transformer's velocity, the same checkpointing and backprop windows.

References: DDIM, Song et al. 2021 (arXiv:2010.02502), Eq. 12 and 16; classifier-free guidance, Ho & Salimans 2022;
v-prediction, Salimans & Ho 2022 (arXiv:2202.00512); AlignProp, Prabhudesai et al. 2023 (arXiv:2310.03739);
DRaFT-K and DRaFT-LV, Clark et al. 2023 (arXiv:2309.17400); DRTune, Wu et al. 2024 (arXiv:2405.00760); gradient
checkpointing, Chen et al. 2016 (arXiv:1604.06174); DDPO, Black et al. 2023 (arXiv:2305.13301); rectified flow, Liu
et al. 2022 (arXiv:2209.03003); SD3, Esser et al. 2024 (arXiv:2403.03206).
"""
import contextlib
import functools
import math

import torch


# -----------------------------------------------------------------------------
# gradient checkpointing


def checkpoint(fns, x, weights=()):
    """x -> fns[-1](... fns[1](fns[0](x))), keeping for backward only the input of each function, a tensor like x.

    Backward re-runs the functions with gradients one at a time, last first, so memory holds one function's
    activations at a time, plus one input per function: flat in the number of functions (DDIM steps). Gradients flow
    to x (if it requires grad) and to `weights`: pass the trainable parameters the functions use, since what a
    closure reads cannot be found automatically; nothing else they read gets a gradient. The functions must be
    deterministic (models in eval mode, any noise drawn beforehand), since they run twice."""
    return _Recompute.apply(fns, x, *weights)


def autocast_state():
    """[(device, enabled, dtype)] of autocast now, on the CPU and (where there is one) CUDA: what a recomputation in
    backward restores (autocast_as), so that it runs as the forward ran, also when backward is called inside or
    outside autocast."""
    return [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))
            for d in ("cpu", "cuda") if d == "cpu" or torch.cuda.is_available()]


@contextlib.contextmanager
def autocast_as(state):
    """Autocast on or off on each device as `state` (autocast_state()) records it."""
    with contextlib.ExitStack() as stack:
        for device_type, enabled, dtype in state:
            stack.enter_context(torch.autocast(device_type, dtype, enabled))
        yield


class _Recompute(torch.autograd.Function):
    """One autograd node for the whole sequence: forward runs under no_grad and builds no graph; the weights are
    inputs of the node, so their gradients flow through the one outer graph (correct with autograd.grad, gradient
    accumulation and DDP). Why not torch.utils.checkpoint around each call: its non-reentrant mode runs the forward
    with grad on and keeps each call's whole graph minus the tensors, measured at ~1.2 MB per tiny-UNet call (8x the
    model's weights over 40 steps), and is slower; its reentrant mode sends weight gradients around the outer graph,
    which breaks autograd.grad and DDP; and either adds a node per call, with an edge to every LoRA tensor."""

    @staticmethod
    def forward(ctx, fns, x, *weights):
        ctx.fns, ctx.weights = fns, weights
        ctx.autocast = autocast_state()
        inputs = []
        with torch.no_grad():
            for fn in fns:
                inputs.append(x)
                x = fn(x)
        ctx.save_for_backward(*inputs)
        return x

    @staticmethod
    def backward(ctx, grad):
        weights = [w for w, need in zip(ctx.weights, ctx.needs_input_grad[2:]) if need]
        total = [None] * len(weights)
        for fn, x in zip(reversed(ctx.fns), reversed(ctx.saved_tensors)):
            x = x.detach().requires_grad_()
            with torch.enable_grad(), autocast_as(ctx.autocast):  # as the forward ran, whatever backward's is
                out = fn(x)
            grad, *grads = torch.autograd.grad(out, [x, *weights], grad, allow_unused=True)
            for j, g in enumerate(grads):  # summed in place: no new buffers per step
                if g is not None:
                    total[j] = g if total[j] is None else total[j].add_(g)
        total = iter(total)
        return None, grad, *(next(total) if need else None for need in ctx.needs_input_grad[2:])


def halves_in_turn(call, x, context, guidance, weights=()):
    """call(x, context, guidance), a model's classifier-free guided output out_u + guidance * (out_c - out_u) from one
    batched call on context = [uncond; cond] (2B, L, D), whose backward takes the two halves one after the other.

    The output is linear in the halves, so its gradient is (1 - guidance) * grad through out_u plus guidance * grad
    through out_c: backward recomputes out_u = call(x, uncond, 1) with gradients, backpropagates it, frees it, then
    out_c. It holds one half's activations (a batch of B) at a time instead of both (2B): about half of one model
    call's, which is the peak of a checkpointed chain's backward. The cost: the batched call runs once more, without
    gradients (forward). Gradients flow to x and to `weights` (as checkpoint's)."""
    return _HalvesInTurn.apply(call, x, context, guidance, *weights)


class _HalvesInTurn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call, x, context, guidance, *weights):
        ctx.call, ctx.guidance, ctx.weights = call, guidance, weights
        ctx.autocast = autocast_state()
        ctx.save_for_backward(x, context)
        with torch.no_grad():
            return call(x, context, guidance)

    @staticmethod
    def backward(ctx, grad):
        x, context = ctx.saved_tensors
        x = x.detach().requires_grad_(ctx.needs_input_grad[1])
        weights = [w for w, need in zip(ctx.weights, ctx.needs_input_grad[4:]) if need]
        total, grad_x = [None] * len(weights), None
        half = len(context) // 2
        for part, scale in ((context[:half], 1 - ctx.guidance), (context[half:], ctx.guidance)):
            with torch.enable_grad(), autocast_as(ctx.autocast):  # as the forward ran
                out = ctx.call(x, part, 1.0)  # one half, unguided: (B, C, h, w)
            inputs = ([x] if x.requires_grad else []) + weights
            grads = torch.autograd.grad(out, inputs, grad * scale, allow_unused=True)
            if x.requires_grad:
                g, *grads = grads
                grad_x = g if grad_x is None else grad_x + g
            for j, g in enumerate(grads):
                if g is not None:
                    total[j] = g if total[j] is None else total[j].add_(g)
        total = iter(total)
        return None, grad_x, None, None, *(next(total) if need else None for need in ctx.needs_input_grad[4:])


# -----------------------------------------------------------------------------
# the DDIM sampler


def parse_backprop(text, steps):
    """The command-line form, checked against the number of steps: "all", "K" -> K, "lo,hi" -> (lo, hi),
    "lv:N" -> ("lv", N), "drtune:N" -> ("drtune", N), "onestep:F" -> ("onestep", F), "onestep:lo,hi" -> ("onestep",
    (lo, hi))."""
    if text == "all":
        return "all"
    try:
        if text.startswith(("lv:", "drtune:")):
            name, _, n = text.partition(":")
            backprop = (name, int(n))
        elif text.startswith("onestep:"):
            levels = [float(v) for v in text.partition(":")[2].split(",")]
            backprop = ("onestep", levels[0] if len(levels) == 1 else tuple(levels))
        else:
            parts = [int(v) for v in text.split(",")]
            backprop = parts[0] if len(parts) == 1 else tuple(parts)
    except ValueError:
        raise ValueError(f"{text!r}: expected all, K, lo,hi, lv:N, drtune:N or onestep:F") from None
    try:
        backprop_window(backprop, steps, check_only=True)
    except ValueError as e:  # the message as the user wrote the value
        raise ValueError(f"{text!r}: {str(e).split(': ', 1)[1]}") from None
    return backprop


def is_mode(backprop, name):  # ("lv", N), ("drtune", N), ("onestep", F)
    return isinstance(backprop, (tuple, list)) and len(backprop) == 2 and backprop[0] == name


def backprop_window(backprop, steps, generator=None, check_only=False):
    """How many final steps of the chain get gradients: "all" -> steps, an int K -> K, (lo, hi) -> K ~ U{lo..hi}
    drawn once, ("lv", N) -> 0 (DRaFT-LV takes its gradient from N re-noised copies of the last step instead),
    ("drtune", N) -> steps (every step passes the gradient on; drtune_steps says which N train the UNet),
    ("onestep", F) -> 0 (the gradient comes from one model call on the re-noised sample: onestep_level)."""
    if backprop == "all":
        return steps
    if is_mode(backprop, "lv"):
        if not (isinstance(backprop[1], int) and backprop[1] >= 1):
            raise ValueError(f"{backprop!r}: DRaFT-LV needs N >= 1 noise draws")
        return 0
    if is_mode(backprop, "drtune"):
        if not (isinstance(backprop[1], int) and 1 <= backprop[1] <= steps):
            raise ValueError(f"{backprop!r}: DRTune trains N steps, 1 <= N <= the number of sampling steps ({steps})")
        return steps
    if is_mode(backprop, "onestep"):
        onestep_level(backprop)  # checks the level(s)
        return 0
    window = (backprop, backprop) if isinstance(backprop, int) else backprop
    if not (isinstance(window, (tuple, list)) and len(window) == 2 and 1 <= window[0] <= window[1] <= steps):
        raise ValueError(f"{backprop!r}: K must satisfy 1 <= K <= the number of sampling steps ({steps})")
    lo, hi = window
    if lo == hi or check_only:
        return lo
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(lo, hi + 1, (1,), generator=generator, device=device))


def onestep_level(backprop, generator=None):
    """The noise level F in (0, 1] of the one-step mode ("onestep", F): F itself, or F ~ U(lo, hi) drawn once per
    call for ("onestep", (lo, hi)). A flow model re-noises to s = F, a DDIM model to the timestep t = F * 1000
    (the models' own clocks: both 1 at pure noise)."""
    level = backprop[1]
    lo, hi = level if isinstance(level, (tuple, list)) else (level, level)
    if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and 0 < lo <= hi <= 1):
        raise ValueError(f"{backprop!r}: the one-step noise level F needs 0 < F <= 1 (lo <= hi)")
    if lo == hi:
        return float(lo)
    device = generator.device if generator is not None else "cpu"
    return lo + (hi - lo) * float(torch.rand((), generator=generator, device=device))


def steps_with_gradient(backprop, steps):
    """The most steps of one trajectory that run the UNet with gradients: what keep_activations can keep at most."""
    if backprop == "all":
        return steps
    if is_mode(backprop, "lv") or is_mode(backprop, "onestep"):
        return 1
    if is_mode(backprop, "drtune"):
        return backprop[1]
    return backprop if isinstance(backprop, int) else backprop[1]


def step_activation_bytes(sd, cond, uncond, latents, steps, guidance=7.5, eta=0.0):
    """What keep_activations costs per kept step, measured rather than assumed: the bytes autograd holds for backward
    after one DDIM step with gradients (the UNet, then the update) from `latents` (B, 4, h, w), in the caller's
    autocast dtype (saved_bytes). Linear in the batch; CFG's two halves are included."""
    t = _ddim_schedule(sd, steps).timesteps[0]
    context = guidance_context(cond, uncond, guidance, sd.unet.dtype)
    return saved_bytes(lambda x: ddim_transition(sd, guided_output(sd, x, t, context, guidance), x, t, steps, eta),
                       latents, sd.unet)


def saved_bytes(fn, x, model):
    """The bytes autograd holds for backward after fn(x) with gradients from x (as in the chain, where x carries the
    gradient of the steps before), counted with saved_tensors_hooks as the distinct storages the graph saves, the
    model's weights excluded (they are in memory anyway)."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    held = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            held[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x.detach().requires_grad_())
    return sum(held.values())


def drtune_steps(n, steps, generator=None):
    """DRTune's trained steps: n evenly spaced indices into the chain (0 = the first, noisiest step), every
    steps // n-th from an offset drawn once per call in [0, steps // n), so that over many trajectories every step,
    the earliest included, gets trained."""
    stride = steps // n
    device = generator.device if generator is not None else "cpu"
    offset = int(torch.randint(stride, (1,), generator=generator, device=device))
    return [offset + j * stride for j in range(n)]


def ddim_sample(sd, cond, uncond, latents, steps=50, guidance=7.5, eta=0.0, backprop="all", generator=None,
                keep_activations=0, cfg_in_turn=False):
    """Run the DDIM chain from noise `latents` (B, 4, h, w) with the conditioning `cond`, `uncond` (B, L, D) from
    encode_prompts (SDXL's carries its pooled projection as one more row: the same calls serve every model).

    Notation (Song et al. 2021, Eq. 12), with a_t = alphas_cumprod[t] (the paper's alpha_t):
        x0    = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)                      predicted clean latents
        sigma = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)   Eq. 16; eta=0 is DDIM, 1 is DDPM-like
        x_prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev - sigma^2) * eps + sigma * z,   z ~ N(0, I) from `generator`
    eps is classifier-free guided: eps_u + guidance * (eps_c - eps_u), both halves in one batched UNet call.

    backprop: see backprop_window. With ("lv", N) the result has N * B rows (draw-major): the finished sample,
    re-noised N times to the last timestep and denoised once more with gradients (DRaFT-LV, Clark et al. 2023);
    score all of them and average, and the gradient is the mean over the N draws.
    With ("onestep", F) (Direct-Align / SRPO, Shen et al. 2025, arXiv:2509.06942; ReFL, Xu et al. 2023,
    arXiv:2304.05977): the whole chain runs under no_grad, the finished sample x_0 is re-noised with known noise z to
    the timestep t = F * 999 (onestep_level), x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) z, and one UNet call with gradients
    predicts x0 from x_t (the legend's first line): the result is that prediction, which is what gets decoded and
    scored. One UNet backward per sample, and it reaches the early, noisy timesteps where the layout is decided.
    With ("drtune", N) (DRTune, Wu et al. 2024) every step is x_prev = c_x * x_t + c_eps * eps(sg(x_t)) + sigma * z
    (the update above, rearranged): the UNet sees its input detached (sg, "stop-gradient"), so the reward's gradient
    reaches every step, the earliest included, through the linear term c_x = sqrt(a_prev / a_t) alone, never through
    the UNet's Jacobian (which is what explodes over a long chain); and only the N steps of drtune_steps run the UNet
    with gradients (checkpointed), the others under no_grad: N UNet backwards per sample whatever the chain's length.
    keep_activations: the last n steps with gradients keep their UNet activations instead of checkpointing
    (no recomputation in backward, but memory grows by one step's activations, step_activation_bytes, per step); 0 =
    flat memory. Why the last ones: every truncation window (random K, DRaFT-K) ends with them, so each kept step
    saves its recomputation in every trajectory; and backward reaches them first, so their memory is freed first.
    cfg_in_turn: a recomputed step's backward takes CFG's two halves one after the other (halves_in_turn): about
    half the peak of the chain's backward, for one more batched UNet call without gradients per step.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    grad = torch.is_grad_enabled()
    k = backprop_window(backprop, steps, generator) if grad else 0
    sched = _ddim_schedule(sd, steps)
    trainable = [p for p in sd.unet.parameters() if p.requires_grad]  # LoRA: gradients flow here

    def update(x, out, t, z):  # DDIM's update x_t -> x_prev from the UNet's output at x_t; z: the step's noise
        mean, sigma = ddim_transition(sd, out, x, t, steps, eta)  # linear in x and out: the graph keeps no tensor
        return mean + sigma * z if eta > 0 else mean

    def unet(x, t, context, in_turn=False):  # the guided UNet output; in_turn: CFG's halves' backward one by one
        if in_turn and guidance > 1.0 and torch.is_grad_enabled():
            return halves_in_turn(lambda x, context, g: guided_output(sd, x, t, context, g), x, context, guidance,
                                  trainable)
        return guided_output(sd, x, t, context, guidance)

    def step(x, t, z, context, in_turn=False):  # one denoising step: the UNet, then the update
        return update(x, unet(x, t, context, in_turn), t, z)

    def noise(like):  # drawn in step order, once: a recomputed step reuses its own
        return noise_like(like, generator) if eta > 0 else None

    context = guidance_context(cond, uncond, guidance, sd.unet.dtype)  # (2B, L, D): [uncond; cond]
    ts = sched.timesteps
    x = latents
    if grad and is_mode(backprop, "drtune"):
        trained = drtune_steps(backprop[1], steps, generator)
        kept = trained[len(trained) - min(keep_activations, len(trained)):]  # not checkpointed: activations kept
        for i, t in enumerate(ts):
            z = noise(x)
            if i in kept:
                out = unet(x.detach(), t, context)
            elif i in trained:  # sg(x_t): gradient to the LoRA weights only
                out = checkpoint([functools.partial(unet, t=t, context=context, in_turn=cfg_in_turn)], x.detach(),
                                 trainable)
            else:
                with torch.no_grad():
                    out = unet(x, t, context)  # a constant: the chain's gradient passes this step by c_x alone
            x = update(x, out, t, z)  # x itself, not detached: the gradient's path to the earlier steps
        return x
    with torch.no_grad():  # the steps before the truncation window build no graph at all
        for t in ts[:steps - k]:
            x = step(x, t, noise(x), context)
    window = [functools.partial(step, t=t, z=noise(x), context=context) for t in ts[steps - k:]]
    if grad and is_mode(backprop, "lv"):  # DRaFT-LV: re-noise the sample N times to the last timestep, x_t =
        n, t = backprop[1], ts[-1]  # sqrt(a_t) x_0 + sqrt(1 - a_t) z, and take the last step again, with gradients
        x0 = x.repeat(n, 1, 1, 1)  # (N * B, 4, h, w), draw-major
        a_t = float(sched.alphas_cumprod[t])
        x = a_t ** 0.5 * x0 + (1 - a_t) ** 0.5 * noise_like(x0, generator)
        context = guidance_context(cond.repeat(n, 1, 1), uncond.repeat(n, 1, 1), guidance, sd.unet.dtype)
        window = [functools.partial(step, t=t, z=noise(x), context=context)]
    if grad and is_mode(backprop, "onestep"):  # re-noise the finished sample x_0 to t, then one UNet call's x0
        t = torch.tensor(round(onestep_level(backprop, generator) * (sched.config.num_train_timesteps - 1)))
        a_t = float(sched.alphas_cumprod[t])
        x = a_t ** 0.5 * x + (1 - a_t) ** 0.5 * noise_like(x, generator)  # x_t, the noise z known (drawn here)
        window = [lambda x, in_turn=False: _eps_and_x0(sched.config.prediction_type, unet(x, t, context, in_turn), x,
                                                       a_t)[1]]
    recompute = len(window) - min(keep_activations, len(window))
    if recompute:  # checkpointed: only the latents entering each step are kept for backward
        x = checkpoint([functools.partial(fn, in_turn=cfg_in_turn) for fn in window[:recompute]], x, trainable)
    for fn in window[recompute:]:  # plain autograd: activations kept, no recomputation
        x = fn(x)
    return x


def _ddim_schedule(sd, steps):
    sched = sd.scheduler
    if not hasattr(sched, "alphas_cumprod"):  # e.g. SD3's FlowMatchEulerDiscreteScheduler
        raise ValueError(f"a {type(sched).__name__} is a rectified-flow model's: sample it with flow_sample")
    if sched.config.get("thresholding") or sched.config.get("clip_sample"):
        raise ValueError("scheduler configs with thresholding or clip_sample are not supported (SD uses neither)")
    sched.set_timesteps(steps)  # diffusers' timestep spacing ("leading", "trailing", ...) from the model's config
    return sched


def guidance_context(cond, uncond, guidance, dtype):
    """The text embeddings one UNet call sees: [uncond; cond] (2B, L, D) with classifier-free guidance, else cond."""
    return (torch.cat([uncond, cond]) if guidance > 1.0 else cond).to(dtype)


def guided_output(sd, x, t, context, guidance):
    """The UNet's output at x_t (B, 4, h, w), classifier-free guided when guidance > 1: out_u + guidance * (out_c -
    out_u), both halves in one batched call on `context` from guidance_context."""
    cfg = guidance > 1.0
    extra = {}
    if sd.text_encoder_2 is not None:  # SDXL: the pooled row (encode_prompts), and the size/crop "time ids"
        context, pooled = context[:, :-1], context[:, -1, :sd.text_encoder_2.config.projection_dim]
        f = 2 ** (len(sd.vae.config.block_out_channels) - 1)  # the VAE's downsampling factor: 8 for SDXL
        h, w = (n * f for n in x.shape[-2:])  # original size = target size, crop at (0, 0)
        time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=context.dtype, device=context.device)
        extra = dict(added_cond_kwargs=dict(text_embeds=pooled, time_ids=time_ids.expand(len(context), 6)))
    out = sd.unet((torch.cat([x, x]) if cfg else x).to(sd.unet.dtype), t, encoder_hidden_states=context,
                  **extra).sample
    if cfg:
        out_u, out_c = out.chunk(2)
        out = out_u + guidance * (out_c - out_u)
    return out.to(x.dtype)


def ddim_transition(sd, out, x, t, steps, eta):
    """The Gaussian of one DDIM step, p(x_prev | x_t) = N(mean, sigma^2 I), from the model output `out` at x_t
    (Song et al. 2021, Eq. 12 and 16; the legend is in ddim_sample). Returns (mean (B, 4, h, w), sigma, a float);
    sigma is 0 at eta 0, where the step is deterministic. `steps` sets the stride to the previous timestep."""
    sched = sd.scheduler
    stride = sched.config.num_train_timesteps // steps
    a_t = float(sched.alphas_cumprod[t])
    final_alpha = 1.0 if sched.config.set_alpha_to_one else float(sched.alphas_cumprod[0])  # a_prev after the last
    a_prev = float(sched.alphas_cumprod[t - stride]) if t >= stride else final_alpha
    eps, x0 = _eps_and_x0(sched.config.prediction_type, out, x, a_t)
    sigma = eta * ((1 - a_prev) / (1 - a_t)) ** 0.5 * (1 - a_t / a_prev) ** 0.5
    return a_prev ** 0.5 * x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps, sigma


def step_logprob(x_prev, mean, sigma):
    """log N(x_prev; mean, sigma^2 I) per sample (B,), averaged (not summed) over the latent's dimensions, as DDPO
    does (Black et al. 2023): a per-dimension log-density, so that exp(difference) - the PPO ratio - stays near 1
    whatever the latent size. Needs sigma > 0 (eta > 0). The gradient flows through `mean` (the policy)."""
    if not sigma > 0:
        raise ValueError("the log-probability of a DDIM step needs eta > 0 (sigma = 0 is a deterministic step)")
    logp = -(x_prev.detach().float() - mean.float()) ** 2 / (2 * sigma ** 2) - math.log(sigma * (2 * math.pi) ** 0.5)
    return logp.flatten(1).mean(1)


@torch.no_grad()
def ddim_rollout(sd, cond, uncond, latents, steps=50, guidance=7.5, eta=1.0, generator=None):
    """Sample like ddim_sample (same noise from `generator`, same images) and keep what policy-gradient RL needs
    (DDPO, Black et al. 2023): every step's latents and the log-probability of each transition under the model that
    sampled it. Returns (xs (T + 1, B, 4, h, w): x_T ... x_0, logps (T, B), timesteps (T,))."""
    sched = _ddim_schedule(sd, steps)
    context = guidance_context(cond, uncond, guidance, sd.unet.dtype)
    xs, logps = [latents], []
    for t in sched.timesteps:
        x = xs[-1]
        mean, sigma = ddim_transition(sd, guided_output(sd, x, t, context, guidance), x, t, steps, eta)
        xs.append(mean + sigma * noise_like(x, generator))
        logps.append(step_logprob(xs[-1], mean, sigma))
    return torch.stack(xs), torch.stack(logps), sched.timesteps.clone()


def noise_like(like, generator):
    """N(0, I) noise shaped like `like`, drawn on the generator's device (reproducible on any device), then moved."""
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _eps_and_x0(prediction_type, out, x, a_t):
    """The UNet predicts eps (SD 1.x), v = sqrt(a_t) eps - sqrt(1 - a_t) x0 (SD 2.x), or x0 itself."""
    if prediction_type == "epsilon":
        return out, (x - (1 - a_t) ** 0.5 * out) / a_t ** 0.5
    if prediction_type == "v_prediction":
        return a_t ** 0.5 * out + (1 - a_t) ** 0.5 * x, a_t ** 0.5 * x - (1 - a_t) ** 0.5 * out
    if prediction_type == "sample":
        return (x - a_t ** 0.5 * out) / (1 - a_t) ** 0.5, out
    raise ValueError(f"unknown prediction_type {prediction_type!r}")
