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
`ddim_rollout` samples the same chain and keeps what policy-gradient RL needs (ddpo.py). The backprop modes are
written once, in `run_chain`, which runs a sampler's pieces (its model call, its update, its re-noising): ddim_sample's
here, and flow.py's `flow_sample`'s for rectified flow (SD3, FLUX: Euler steps on the transformer's velocity). This
file imports nothing of the project's: `sd` is what model.load_sd returns, or any object with its `unet`, `vae`,
`scheduler` (a DDIMScheduler) and `text_encoder_2` (None but for SDXL).

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
    with grad on and keeps each call's whole graph minus the tensors, which grows with the steps (the measurement is in
    docs/speed-and-memory.md), and is slower; its reentrant mode sends weight gradients around the outer graph, which
    breaks autograd.grad and DDP; and either adds a node per call, with an edge to every LoRA tensor."""

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
# the backprop modes, for every sampler


def parse_backprop(text, steps):
    """The command-line form, checked against the number of steps: "all", "K" -> K, "lo,hi" -> (lo, hi),
    "lv:N" -> ("lv", N), "drtune:N" -> ("drtune", N), "onestep:F" -> ("onestep", F), "onestep:lo,hi" -> ("onestep",
    (lo, hi)). Anything else raises ValueError with a message that says what was expected."""
    if text == "all":
        return "all"
    name, colon, value = text.rpartition(":")  # name "" for K and lo,hi
    numbers = value.split(",")
    try:
        if name in ("lv", "drtune") and len(numbers) == 1:
            backprop = (name, int(value))
        elif name == "onestep" and len(numbers) <= 2:
            levels = tuple(float(v) for v in numbers)
            backprop = ("onestep", levels[0] if len(levels) == 1 else levels)
        elif not colon and len(numbers) <= 2:
            ks = tuple(int(v) for v in numbers)
            backprop = ks[0] if len(ks) == 1 else ks
        else:
            raise ValueError
    except ValueError:
        forms = ("onestep:F or onestep:lo,hi (noise levels in (0, 1])" if name == "onestep" else
                 "all, K, lo,hi, lv:N, drtune:N or onestep:F")
        raise ValueError(f"{text!r}: expected {forms}") from None
    try:
        backprop_window(backprop, steps, check_only=True)
    except ValueError as e:  # the message as the user wrote the value
        raise ValueError(f"{text!r}: {str(e).removeprefix(f'{backprop!r}: ')}") from None
    return backprop


def is_mode(backprop, name):  # ("lv", N), ("drtune", N), ("onestep", F)
    return isinstance(backprop, (tuple, list)) and len(backprop) == 2 and backprop[0] == name


def backprop_window(backprop, steps, generator=None, check_only=False):
    """How many final steps of the chain get gradients: "all" -> steps, an int K -> K, (lo, hi) -> K ~ U{lo..hi}
    drawn once per call of the sampler, i.e. once per micro-batch (every trajectory in the batch shares K),
    ("lv", N) -> 0 (DRaFT-LV takes its gradient from N re-noised copies of the last step instead),
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
        raise ValueError(f"{backprop!r}: K must satisfy 1 <= K <= the number of sampling steps ({steps}), "
                         "and lo <= hi")
    lo, hi = window
    if lo == hi or check_only:
        return lo
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(lo, hi + 1, (1,), generator=generator, device=device))


def onestep_level(backprop, generator=None):
    """The noise level F in (0, 1] of the one-step mode ("onestep", F): F itself, or for ("onestep", (lo, hi))
    F ~ U(lo, hi) drawn once per call of the sampler, i.e. once per micro-batch (every trajectory in it shares F).
    A flow model re-noises to s = F, a DDIM model to the timestep t = round(F * (num_train_timesteps - 1)), F * 999
    for SD: the models' own clocks, both at F = 1 at (or next to) pure noise."""
    level = backprop[1]
    bounds = list(level) if isinstance(level, (tuple, list)) else [level, level]
    if not (len(bounds) == 2 and all(isinstance(b, (int, float)) for b in bounds) and 0 < bounds[0] <= bounds[1] <= 1):
        raise ValueError(f"{backprop!r}: the one-step noise level F needs 0 < F <= 1 (a range: 0 < lo <= hi <= 1)")
    lo, hi = bounds
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


def drtune_steps(n, steps, generator=None):
    """DRTune's trained steps: n evenly spaced indices into the chain (0 = the first, noisiest step), every
    steps // n-th from an offset in [0, steps // n) drawn once per call of the sampler, i.e. once per micro-batch (its
    trajectories share it), so that over many micro-batches every step, the earliest included, gets trained."""
    stride = steps // n
    device = generator.device if generator is not None else "cpu"
    offset = int(torch.randint(stride, (1,), generator=generator, device=device))
    return [offset + j * stride for j in range(n)]


def run_chain(x, context, times, backprop, generator, model, update, noised, clean, noisy, trainable,
              keep_activations=0, cfg_in_turn=False):
    """A sampler's chain from the noise x, step i being x <- update(x, model(x, times[i], context), i, z_i), run as
    `backprop` says: the backprop modes, written once for ddim_sample and flow.flow_sample, which pass their pieces:
        model(x, t, context, in_turn=False)  the guided model output at time t; in_turn: CFG's halves_in_turn
        update(x, out, i, z)                 step i's update, linear in x and out; z: its noise, None unless `noisy`
        noised(x0, z, F=None)                a clean sample re-noised with noise z to level F (None: the last step's)
        clean(x, F, context, in_turn=False)  one model call at level F, and its prediction of the clean sample
    context: [uncond; cond] (2B rows) with CFG's halves, else B rows. Under torch.no_grad() this is the plain chain.
    With grad enabled, gradients reach `trainable` (e.g. the LoRA weights). "all", K or (lo, hi) (backprop_window): the
    steps before the last K run under no_grad and build no graph, the last K through `checkpoint`, which keeps only the
    latents entering each step and recomputes one step's activations at a time in backward: memory flat in the steps.
    ("lv", N), DRaFT-LV (Clark et al. 2023): the finished sample, repeated N times (N * B rows, draw-major), re-noised
    to the last step's level, and that step taken again with gradients; score all rows and average: the gradient is
    the mean over the N draws. ("onestep", F), Direct-Align / SRPO (Shen et al. 2025, arXiv:2509.06942; ReFL, Xu et
    al. 2023, arXiv:2304.05977): the finished sample re-noised with known noise to level F (onestep_level), and one
    model call with gradients, whose clean prediction is the result (what gets decoded and scored): one backward per
    sample, and it reaches the early, noisy times where the layout is decided. ("drtune", N), DRTune (Wu et al. 2024):
    every step's model sees its input detached (sg, "stop-gradient"), so the reward's gradient reaches every step, the
    earliest included, through the update's linear term in x alone, never through the model's Jacobian (which is what
    explodes over a long chain); only the N steps of drtune_steps run the model with gradients (checkpointed), the
    others under no_grad: N model backwards per sample whatever the chain's length.
    keep_activations: the last n steps with gradients keep their activations instead of checkpointing (no
    recomputation in backward; memory grows by memory.step_activation_bytes per step); 0 = flat memory. Why the last ones:
    every truncation window (random K, DRaFT-K) ends with them, so each kept step saves its recomputation in every
    trajectory; and backward reaches them first, so their memory is freed first. cfg_in_turn: a recomputed step's
    backward takes CFG's two halves one after the other (halves_in_turn): about half the peak of the chain's backward,
    for one more batched model call without gradients per step. What is random (K, DRTune's offset, F, the noise)
    comes from `generator`, drawn once per call: every trajectory of the micro-batch shares K, the offset and F."""
    steps, grad = len(times), torch.is_grad_enabled()
    k = backprop_window(backprop, steps, generator) if grad else 0

    def step(x, i, z, context, in_turn=False):  # one denoising step: the model, then the update
        return update(x, model(x, times[i], context, in_turn), i, z)

    def noise(like):  # drawn in step order, once: a recomputed step reuses its own
        return noise_like(like, generator) if noisy else None

    if grad and is_mode(backprop, "drtune"):
        trained = drtune_steps(backprop[1], steps, generator)
        kept = trained[len(trained) - min(keep_activations, len(trained)):]  # not checkpointed: activations kept
        for i, t in enumerate(times):
            z = noise(x)
            if i in kept:
                out = model(x.detach(), t, context)
            elif i in trained:  # sg(x): gradient to the LoRA weights only
                out = checkpoint([functools.partial(model, t=t, context=context, in_turn=cfg_in_turn)], x.detach(),
                                 trainable)
            else:
                with torch.no_grad():
                    out = model(x, t, context)  # a constant: the chain's gradient passes this step by its x term alone
            x = update(x, out, i, z)  # x itself, not detached: the gradient's path to the earlier steps
        return x
    with torch.no_grad():  # the steps before the truncation window build no graph at all
        for i in range(steps - k):
            x = step(x, i, noise(x), context)
    window = [functools.partial(step, i=i, z=noise(x), context=context) for i in range(steps - k, steps)]
    if grad and is_mode(backprop, "lv"):  # DRaFT-LV: re-noise the sample N times to the last step's level, and take
        n, halves = backprop[1], context.chunk(len(context) // len(x))  # that step again: [uncond; cond] or cond
        x0 = x.repeat(n, 1, 1, 1)  # (N * B, C, h, w), draw-major
        x = noised(x0, noise_like(x0, generator))
        context = torch.cat([half.repeat(n, 1, 1) for half in halves])  # each half's rows N times, draw-major
        window = [functools.partial(step, i=steps - 1, z=noise(x), context=context)]
    if grad and is_mode(backprop, "onestep"):  # re-noise the finished sample to level F, then one call's clean sample
        level = onestep_level(backprop, generator)
        x = noised(x, noise_like(x, generator), level)  # the noise z known (drawn here)
        window = [lambda x, in_turn=False: clean(x, level, context, in_turn)]
    recompute = len(window) - min(keep_activations, len(window))
    if recompute:  # checkpointed: only the latents entering each step are kept for backward
        x = checkpoint([functools.partial(fn, in_turn=cfg_in_turn) for fn in window[:recompute]], x, trainable)
    for fn in window[recompute:]:  # plain autograd: activations kept, no recomputation
        x = fn(x)
    return x


# -----------------------------------------------------------------------------
# the DDIM sampler


def ddim_sample(sd, cond, uncond, latents, steps=50, guidance=7.5, eta=0.0, backprop="all", generator=None,
                keep_activations=0, cfg_in_turn=False):
    """Run the DDIM chain from noise `latents` (B, 4, h, w) with the conditioning `cond`, `uncond` (B, L, D) from
    encode_prompts (SDXL's carries its pooled projection as one more row: the same calls serve every model).

    Notation (Song et al. 2021, Eq. 12), with a_t = alphas_cumprod[t] (the paper's alpha_t):
        x0    = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)                      predicted clean latents
        sigma = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)   Eq. 16; eta=0 is DDIM, 1 is DDPM-like
        x_prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev - sigma^2) * eps + sigma * z,   z ~ N(0, I) from `generator`
        x_t   = sqrt(a_t) * x0 + sqrt(1 - a_t) * z                            clean latents noised to timestep t
    eps is classifier-free guided: eps_u + guidance * (eps_c - eps_u), both halves in one batched UNet call.

    backprop, keep_activations, cfg_in_turn: how the chain is trained; run_chain (above: where no_grad, detach and
    checkpoint apply) runs the pieces defined here under them. In DDIM's terms: ("lv", N) re-noises the finished sample
    to the last timestep (the legend's last line) and takes the last step again, N * B rows; ("onestep", F) re-noises
    it to t = F * 999 (onestep_level) and returns the UNet's x0 there (the first line); ("drtune", N) writes each step
    as x_prev = c_x * x_t + c_eps * eps(sg(x_t)) + sigma * z (the update rearranged), so the gradient passes each step
    through c_x = sqrt(a_prev / a_t) alone.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    sched = ddim_schedule(sd, steps)
    ts = sched.timesteps
    trainable = [p for p in sd.unet.parameters() if p.requires_grad]  # LoRA: gradients flow here

    def unet(x, t, context, in_turn=False):  # the guided UNet output; in_turn: CFG's halves' backward one by one
        if in_turn and guidance > 1.0 and torch.is_grad_enabled():
            return halves_in_turn(lambda x, context, g: guided_output(sd, x, t, context, g), x, context, guidance,
                                  trainable)
        return guided_output(sd, x, t, context, guidance)

    def update(x, out, i, z):  # step i, x_t -> x_prev, from the UNet's output at x_t; z: the step's noise
        mean, sigma = ddim_transition(sd, out, x, ts[i], steps, eta)  # linear in x and out: the graph keeps no tensor
        return mean + sigma * z if eta > 0 else mean

    def timestep(F):  # noise level F in (0, 1] -> t = round(F * 999) (onestep_level); None: the last step's t
        return ts[-1] if F is None else torch.tensor(round(F * (sched.config.num_train_timesteps - 1)))

    def noised(x0, z, F=None):  # clean latents x0 re-noised with the noise z to level F: x_t (the legend's last line)
        a_t = float(sched.alphas_cumprod[timestep(F)])
        return a_t ** 0.5 * x0 + (1 - a_t) ** 0.5 * z

    def clean(x, F, context, in_turn=False):  # one UNet call at level F, and its predicted x0 (the legend's first line)
        t = timestep(F)
        return _eps_and_x0(sched.config.prediction_type, unet(x, t, context, in_turn), x,
                           float(sched.alphas_cumprod[t]))[1]

    context = guidance_context(cond, uncond, guidance, sd.unet.dtype)  # (2B, L, D): [uncond; cond]
    return run_chain(latents, context, ts, backprop, generator, unet, update, noised, clean, eta > 0, trainable,
                     keep_activations, cfg_in_turn)


def ddim_schedule(sd, steps):
    """The model's DDIMScheduler set to `steps` (its timesteps: sched.timesteps); a config this sampler does not
    follow is a ValueError."""
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
    sched = ddim_schedule(sd, steps)
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
