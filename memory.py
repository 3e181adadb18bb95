"""Memory: what a training step uses at its peak, how many denoising steps may keep their activations (skip the
recomputation in backward) within a budget, the levers a step over it turns on (LEVERS, next_lever), and the frozen
base in 8-bit floats (base_to_fp8). train.py's --keep-activations auto, --memory-budget and --base-dtype.

    reset_peak_memory("cuda")                   # each step: the peak counted afresh
    ...                                         # one training step that recomputes every denoising step
    peak = peak_memory("cuda")                  # its peak: the least memory a step needs
    keep, per_step = activations_to_keep(sd, cond, uncond, noise, steps, guidance, eta, backprop, peak,
                                         memory_budget(gb, "cuda"))   # steps to keep, one step's activation bytes

A kept step costs one step's activations (step_activation_bytes: the bytes autograd saves for backward after one step
with gradients) for the whole backward; a recomputed one costs its recomputation. The last
steps are kept first (sampler.ddim_sample says why). Figures: docs/speed-and-memory.md.
"""
import os
import resource

import torch

from flow import flow_context, flow_output, flow_schedule, flow_transition
from model import largest_decode_tile
from sampler import ddim_schedule, ddim_transition, guidance_context, guided_output, steps_with_gradient

BUDGET_SHARE = {"cuda": 0.9, "cpu": 0.5}  # default budget: of what the GPU has free for us (the rest: CUDA's context
# and the allocator's fragmentation); of the RAM on a CPU
OVERHEAD = 1.15  # a kept step's cost in units of the activation bytes counted for it, measured on the tiny model
# (docs/speed-and-memory.md): the allocator's rounding and what it keeps; one more step is held in reserve


def parse_keep(text):
    """--keep-activations: "auto" -> None (chosen from the memory budget after the first step), "N" -> N >= 0."""
    if text == "auto":
        return None
    if not str(text).isdigit():
        raise ValueError(f"must be auto or an integer >= 0, got {text}")
    return int(text)


def is_out_of_memory(e):
    """The allocator's error: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def device_memory(device_type):
    """Bytes of memory on the device: the GPU's, or the machine's RAM."""
    if device_type == "cuda":
        return torch.cuda.mem_get_info()[1]
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def reset_peak_memory(device_type):
    """Start peak_memory's count afresh (each training step does): on CUDA the allocator's peak; on Linux, writing 5
    to /proc/self/clear_refs sets the process's peak resident set size (VmHWM, and ru_maxrss with it) to what it
    holds now. Where that file is missing or not writable, a CPU's peak counts from the process's start."""
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory(device_type):
    """The bytes --memory-budget counts: on CUDA the allocator's peak, on a CPU the process's peak resident set size
    (Linux reports ru_maxrss in KiB), each since reset_peak_memory."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_budget(gb, device_type):
    """--memory-budget in bytes; 0 = the default: on CUDA a share of what this process can hold (the device's free
    memory plus what its allocator has reserved already), on a CPU a share of the RAM."""
    if gb:
        return gb * 2**30
    if device_type == "cuda":
        return BUDGET_SHARE["cuda"] * (torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved())
    return BUDGET_SHARE["cpu"] * device_memory("cpu")


def check_fits(need, device_type):
    """A ValueError if `need` bytes (what a batch's tensors alone take: a lower bound) exceed the device's memory, so
    that a caller says so in one line before any work, rather than the allocator's error later."""
    have = device_memory(device_type)
    if need > have:
        raise ValueError(f"does not fit in memory: its latents and images alone take {need / 2**30:,.1f} GB, and this "
                         f"{'GPU' if device_type == 'cuda' else 'machine'} has {have / 2**30:,.1f} GB")


LEVERS = {"cfg_in_turn": "CFG's halves backpropagate in turn (--cfg-in-turn)",  # what a step over --memory-budget
          "checkpoint_blocks": "the model's blocks are checkpointed (--checkpoint-blocks)",  # turns on, the exact
          "base_dtype": "the frozen base is in 8-bit floats (--base-dtype fp8)",  # ones first, then the least
          "decode_tile": "the decoder runs in tiles (--decode-tile; not the exact decode)"}  # change to the numbers


def next_lever(args, sd, resolution):
    """(flag, value) of the first of LEVERS still off in `args` that applies to this model, or None: --cfg-in-turn
    where CFG has halves (FLUX's guidance is an embedding), --decode-tile a tile of half the image where one fits."""
    values = {"cfg_in_turn": args.guidance > 1 and not sd.flux, "checkpoint_blocks": True, "base_dtype": "fp8",
              "decode_tile": largest_decode_tile(sd, resolution // 2)}
    return next(((k, values[k]) for k in LEVERS if not getattr(args, k) and values[k]), None)


def over_budget(module, gb):
    """Whether a module's weights alone take more than `gb` GB (0: no budget): a denoiser so large in --dtype could
    not even be loaded within --memory-budget, so train.py quantizes it (--base-dtype fp8) before it goes to the
    device."""
    weights = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    return bool(gb) and weights > gb * 2**30


def steps_that_fit(budget, peak, per_step, most):
    """How many steps may keep their activations: (budget - peak) / (OVERHEAD * per_step) - 1, in 0..most. `peak`: a
    step's peak with every step recomputed (flat memory, the least a step needs); `per_step`: one step's activations.
    A kept step's activations live from its forward to its backward, so at any moment K kept steps add at most K
    steps' activations to what the recomputing step holds: its peak plus K * per_step bounds the new peak."""
    return max(0, min(most, int((budget - peak) // (OVERHEAD * per_step)) - 1))


def activations_to_keep(sd, cond, uncond, noise, steps, guidance, eta, backprop, peak, budget):
    """--keep-activations auto, after a step that recomputed every step and peaked at `peak` bytes: (steps to keep,
    one step's activation bytes), the latter measured on this batch (cond, uncond (B, L, D), noise (B, C, h, w)) in
    the caller's autocast dtype. eta: DDIM's, or a flow model's SDE noise level."""
    n = backprop[1] if isinstance(backprop, tuple) and backprop[0] == "lv" else 1  # lv:N trains N * B rows
    per_step = step_activation_bytes(sd, cond.repeat(n, 1, 1), uncond.repeat(n, 1, 1), noise.repeat(n, 1, 1, 1), steps,
                                     guidance, eta)
    return steps_that_fit(budget, peak, per_step, steps_with_gradient(backprop, steps)), per_step


def step_activation_bytes(sd, cond, uncond, latents, steps, guidance=7.5, eta=0.0):
    """What keep_activations costs per kept step, measured rather than assumed: the bytes autograd holds for backward
    after one step with gradients (the model, then the update: DDIM's, or the flow's Euler / SDE step, eta its noise
    level) from `latents` (B, C, h, w), in the caller's autocast dtype. Linear in the batch; CFG's halves included."""
    if sd.flow:
        t = flow_schedule(sd, steps, latents).timesteps[0]
        context = flow_context(sd, cond, uncond, guidance)
        return saved_bytes(lambda x: flow_transition(sd, flow_output(sd, x, t, context, guidance), x, t, steps, eta),
                           latents, sd.unet)
    t = ddim_schedule(sd, steps).timesteps[0]
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


# -----------------------------------------------------------------------------
# the frozen base in 8-bit floats (--base-dtype fp8): QLoRA's idea, written out on float8_e4m3fn

FP8_MAX = 448.0  # the largest float8_e4m3fn value
LATENT_CHANNELS = 16  # the most a latent has (SD 1.5's and SDXL's 4, SD3's and FLUX's 16)


def to_fp8(w):
    """A weight in float8_e4m3fn and its scale per output row (dim 0: a Linear's row, a convolution's output channel):
        scale = max |W_i...| / 448,   W8 = round_to_fp8(W / scale),   W ~ W8 * scale
    scale in fp32, shaped to broadcast against the weight: (out, 1) for a Linear, (out, 1, 1, 1) for a Conv2d."""
    w = w.detach().float()
    scale = (w.abs().amax(tuple(range(1, w.dim())), keepdim=True) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (w / scale).to(torch.float8_e4m3fn), scale


def compute_dtype(x):
    """The dtype a layer computes x in: autocast's where it is on, else x's own."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


class Float8Linear(torch.nn.Linear):
    """A frozen nn.Linear whose weight is stored as float8_e4m3fn, one byte a weight, with a scale per output row
    (to_fp8):  y = x @ (W8 * scale)^T + b,
    dequantized to the input's dtype in forward (a transient copy, one layer at a time). Still an nn.Linear, so
    lora.inject_lora wraps it as it wraps any (LoRA and everything trained stay in full precision), and the LoRA file,
    keyed by module path, loads on the unquantized model."""

    def __init__(self, linear):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w8, scale = to_fp8(linear.weight)  # scale (out, 1)
        # buffers, not parameters: frozen, and diffusers' model.dtype (its first floating parameter's) stays the
        self.register_buffer("weight", w8)  # compute dtype the pipelines cast to
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = linear.bias

    def forward(self, x):  # in autocast's dtype where it is on, as nn.Linear would run
        return _Float8Matmul.apply(x.to(compute_dtype(x)), self.weight, self.scale, self.bias)


class _Float8Matmul(torch.autograd.Function):
    """y = x (W8 * scale)^T + b, the weight dequantized in forward and again in backward (grad_x = grad_y W), so that
    autograd keeps the one-byte weight for backward, not a dequantized copy; nothing frozen gets a gradient."""

    @staticmethod
    def forward(ctx, x, w8, scale, bias):
        ctx.save_for_backward(w8, scale)
        return torch.nn.functional.linear(x, w8.to(x.dtype) * scale.to(x.dtype), None if bias is None else
                                          bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        w8, scale = ctx.saved_tensors
        return grad @ (w8.to(grad.dtype) * scale.to(grad.dtype)), None, None, None


class Float8Conv2d(torch.nn.Conv2d):
    """A frozen nn.Conv2d stored as Float8Linear stores its weight: float8_e4m3fn with a scale per output channel
    (to_fp8, over the channel's in x kh x kw kernel),  y = conv2d(x, W8 * scale) + b,  with the layer's stride,
    padding, dilation and groups. Still an nn.Conv2d, so lora.inject_lora wraps it (lora.LoRAConv2d)."""

    @staticmethod
    def takes(conv):  # zeros padding by a number of pixels, as every SD denoiser convolution ("same": none)
        return conv.padding_mode == "zeros" and not isinstance(conv.padding, str)

    def __init__(self, conv):
        if not Float8Conv2d.takes(conv):
            raise ValueError("Float8Conv2d pads with zeros by a number of pixels (as every SD denoiser convolution)")
        torch.nn.Module.__init__(self)
        for k in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
                  "output_padding", "groups", "padding_mode"):
            setattr(self, k, getattr(conv, k))
        w8, scale = to_fp8(conv.weight)  # scale (out, 1, 1, 1)
        self.register_buffer("weight", w8)  # buffers, as Float8Linear's
        self.register_buffer("scale", scale.to(conv.weight.dtype))
        self.bias = conv.bias

    def forward(self, x):  # in autocast's dtype where it is on, as nn.Conv2d would run
        return _Float8Conv.apply(x.to(compute_dtype(x)), self.weight, self.scale, self.bias,
                                 (self.stride, self.padding, self.dilation, self.groups))


class _Float8Conv(torch.autograd.Function):
    """y = conv2d(x, W8 * scale) + b, as _Float8Matmul: the weight dequantized in forward and again in backward, for
    the input's gradient alone (the transposed convolution of grad_y); autograd keeps the one-byte weight."""

    @staticmethod
    def forward(ctx, x, w8, scale, bias, geometry):  # geometry: (stride, padding, dilation, groups)
        ctx.save_for_backward(w8, scale)
        ctx.x_shape, ctx.geometry = x.shape, geometry
        return torch.nn.functional.conv2d(x, w8.to(x.dtype) * scale.to(x.dtype), None if bias is None else
                                          bias.to(x.dtype), *geometry)

    @staticmethod
    def backward(ctx, grad):
        w8, scale = ctx.saved_tensors
        grad_x = torch.nn.grad.conv2d_input(ctx.x_shape, w8.to(grad.dtype) * scale.to(grad.dtype), grad, *ctx.geometry)
        return grad_x, None, None, None, None


def base_to_fp8(module):
    """Every nn.Linear and nn.Conv2d of a frozen `module` (a UNet or transformer before LoRA is injected, or a text
    encoder) becomes a Float8Linear / Float8Conv2d: its weights take half the memory of bf16. Returns the bytes saved.
    What stays as it is: the layers the model itself keeps in full precision (transformers' _keep_in_fp32_modules:
    T5's `wo`, whose dtype T5 casts its input to); convolutions into and out of the latent, LATENT_CHANNELS or fewer
    channels on a side (a UNet's conv_in and conv_out, SD3's patch embedding), whose few KB are not worth their share
    of the rounding error (docs/speed-and-memory.md); any that pads with other than zeros or by a string ("same")."""
    saved, keep = 0, set(getattr(module, "_keep_in_fp32_modules", None) or ())
    for name, child in list(module.named_modules()):
        parent, _, leaf = name.rpartition(".")
        if leaf in keep:
            continue
        if type(child) is torch.nn.Linear:
            fp8 = Float8Linear(child)
        elif (type(child) is torch.nn.Conv2d and min(child.in_channels, child.out_channels) > LATENT_CHANNELS
              and Float8Conv2d.takes(child)):
            fp8 = Float8Conv2d(child)
        else:
            continue
        setattr(module.get_submodule(parent) if parent else module, leaf, fp8)
        saved += child.weight.numel() * (child.weight.element_size() - 1)
    return saved
