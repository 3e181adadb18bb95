"""Stable Diffusion loading and a DDIM sampler you can backpropagate through.

    sd = load_sd("tiny", "cpu", torch.float32)          # or "shapes", a hub id, or a local diffusers directory
    cond, uncond = encode_prompts(sd, ["a cat"]), encode_prompts(sd, [""])
    latents = torch.randn(1, *latent_shape(sd, 64))      # (B, 4, h, w)
    images = decode(sd, ddim_sample(sd, cond, uncond, latents, steps=20, backprop=1))   # (B, 3, H, W) in [0, 1]
    (-images.mean()).backward()                          # reaches the UNet's trainable weights (e.g. LoRA)

With grad enabled, `ddim_sample` keeps only the latents between steps: the steps run through `checkpoint` (gradient
checkpointing, written out below), so each step's UNet activations are recomputed during backward and memory stays
flat in the number of steps. `backprop` truncates the chain: steps before the window run under `no_grad` and build
no graph. Under `torch.no_grad()` it is a plain DDIM sampler that matches diffusers' `DDIMScheduler` to fp32 precision.

References: DDIM, Song et al. 2021 (arXiv:2010.02502), Eq. 12 and 16; classifier-free guidance, Ho & Salimans 2022;
v-prediction, Salimans & Ho 2022 (arXiv:2202.00512); AlignProp, Prabhudesai et al. 2023 (arXiv:2310.03739);
DRaFT-K and DRaFT-LV, Clark et al. 2023 (arXiv:2309.17400); DRTune, Wu et al. 2024 (arXiv:2405.00760); gradient
checkpointing, Chen et al. 2016 (arXiv:1604.06174).
"""
import contextlib
import copy
import functools
import json
import math
import os
import socket
import tempfile
import urllib.parse
import warnings
from dataclasses import dataclass

import torch

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SHAPES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "shapes")  # load_sd("shapes")


@dataclass
class SD:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    text_encoder_2: torch.nn.Module = None  # SDXL only: the second text encoder (with projection) and its tokenizer
    tokenizer_2: object = None
    force_zeros_for_empty_prompt: bool = False  # SDXL: the empty prompt's conditioning is zeros, as its pipeline does


SUPPORTED = {"StableDiffusionPipeline": "Stable Diffusion 1.x / 2.x", "StableDiffusionXLPipeline": "SDXL"}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what to do instead."""


# -----------------------------------------------------------------------------
# loading


def load_sd(model=DEFAULT_MODEL, device="cpu", dtype=torch.float32):
    """Load a Stable Diffusion (1.x, 2.x or XL): a hub id, a local diffusers-format directory, "tiny" / "tiny-xl"
    (random weights, built offline) or "shapes" (the coloured-shapes model trained by shapes.py, in models/shapes).

    All weights are frozen (`requires_grad_(False)`) and in eval mode; the scheduler is always a DDIMScheduler. An SDXL
    VAE whose config says `force_upcast` stays in fp32 when the rest is fp16 (it overflows in fp16), and decode() runs
    it outside autocast."""
    if model in ("tiny", "tiny-xl"):
        sd = _build_tiny(xl=model == "tiny-xl")
    elif model == "shapes":
        if not os.path.isfile(os.path.join(SHAPES_DIR, "unet", "config.json")):
            raise ModelLoadError(f"no shapes model in {SHAPES_DIR}: train it with python shapes.py --train")
        sd = _from_pretrained(SHAPES_DIR, dtype)
    else:
        sd = _from_pretrained(model, dtype)
    upcast_vae = sd.text_encoder_2 is not None and sd.vae.config.get("force_upcast") and dtype == torch.float16
    for m in (sd.unet, sd.vae, sd.text_encoder, sd.text_encoder_2):
        if m is None:
            continue
        m.requires_grad_(False).eval().to(device)
        want = torch.float32 if m is sd.vae and upcast_vae else dtype
        if next(m.parameters()).dtype != want:
            m.to(want)
    return sd


def _from_pretrained(model, dtype):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.utils import is_accelerate_available
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    def load(local_only):  # weights come in the run's dtype: no full-precision copy on the way
        kw = dict(pretrained_model_name_or_path=model, local_files_only=local_only)
        # diffusers' low-memory load needs accelerate, which this project does not require: without it diffusers
        # falls back to the plain load, warning on every model (UNet, VAE) that accelerate is missing. Ask for the
        # plain load then, the same load without the warning; with accelerate, diffusers' default.
        lean = dict(low_cpu_mem_usage=is_accelerate_available())
        index = _model_index(model, local_only)
        kind = index.get("_class_name", "StableDiffusionPipeline")  # a bare directory of SD 1.x parts has no index
        if kind not in SUPPORTED:
            raise ModelLoadError(f"{model} is a {kind}, which this project does not support; supported: "
                                 + ", ".join(f"{v} ({k})" for k, v in SUPPORTED.items()))
        xl = kind == "StableDiffusionXLPipeline"
        with warnings.catch_warnings():  # diffusers passes an argument that newer huggingface_hub deprecates
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks")
            sd = SD(unet=UNet2DConditionModel.from_pretrained(subfolder="unet", torch_dtype=dtype, **kw, **lean),
                    vae=AutoencoderKL.from_pretrained(subfolder="vae", torch_dtype=dtype, **kw, **lean),
                    text_encoder=CLIPTextModel.from_pretrained(subfolder="text_encoder", dtype=dtype, **kw),
                    tokenizer=CLIPTokenizer.from_pretrained(subfolder="tokenizer", **kw),
                    scheduler=DDIMScheduler.from_pretrained(subfolder="scheduler", **kw))
            if xl:  # the second text encoder, and the pipeline's convention for the empty prompt
                sd.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(subfolder="text_encoder_2",
                                                                                dtype=dtype, **kw)
                sd.tokenizer_2 = CLIPTokenizer.from_pretrained(subfolder="tokenizer_2", **kw)
                sd.force_zeros_for_empty_prompt = index.get("force_zeros_for_empty_prompt", True)
        if sd.unet.config.in_channels != sd.unet.config.out_channels:
            raise ModelLoadError(f"{model}'s UNet takes {sd.unet.config.in_channels} input channels for "
                                 f"{sd.unet.config.out_channels} output ones (an inpainting or image-conditioned "
                                 "model); supported are text-to-image models")
        return sd

    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "unet", "config.json")):
            raise ModelLoadError(f"{model} is not a diffusers Stable Diffusion directory (no unet/config.json); "
                                 "make one with pipe.save_pretrained(dir), or use --model tiny")
        return load(local_only=True)
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelLoadError(f"no such model directory: {model} (a hub id looks like 'owner/name')")
    try:  # the Hugging Face cache first: no network needed for a model downloaded before
        return load(local_only=True)
    except OSError:
        pass
    if not _hub_reachable():  # fail in seconds, not after a minute of retries and a long traceback
        raise ModelLoadError(f"cannot download {model}: the Hugging Face hub is unreachable and the model is not in "
                             "the local cache. Pass a local diffusers directory (--model path/to/dir) or --model tiny.")
    try:
        return load(local_only=False)
    except OSError as e:
        raise ModelLoadError(f"cannot load {model} from the hub: {str(e).splitlines()[0]}") from None


def _model_index(model, local_only):
    """The pipeline's model_index.json ({} for a directory without one): what kind of model this is."""
    if os.path.isdir(model):
        path = os.path.join(model, "model_index.json")
        if not os.path.isfile(path):
            return {}
    else:
        from huggingface_hub import hf_hub_download
        path = hf_hub_download(model, "model_index.json", local_files_only=local_only)
    with open(path) as f:
        return json.load(f)


def _hub_reachable(timeout=3.0):
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    from huggingface_hub import constants
    url = urllib.parse.urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _build_tiny(xl=False):
    """A miniature Stable Diffusion from the real diffusers/transformers classes, with small configs and fixed-seed
    weights (identical on every call). 64 px images, 8x8x4 latents; a few ms per UNet call on a CPU. The tokenizer is
    CLIP's BPE over single characters (no merges), since CLIP's real vocabulary cannot be built offline.
    xl: a miniature SDXL instead (two text encoders, the second with a projection; a "text_time" UNet)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
    symbols = list(chars) + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as d:  # the portable way to build a CLIPTokenizer: from vocab/merges files
        with open(os.path.join(d, "vocab.json"), "w") as f:
            json.dump({s: i for i, s in enumerate(symbols)}, f)
        with open(os.path.join(d, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")
        tokenizer = CLIPTokenizer.from_pretrained(d, model_max_length=77)

    rng_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # fixed-seed weights, without disturbing the caller's RNG stream
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(symbols), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=len(symbols) - 2, eos_token_id=len(symbols) - 1,
        pad_token_id=len(symbols) - 1))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16)
    vae = AutoencoderKL(  # four blocks, so the VAE downsamples by 8 like SD's
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=16, sample_size=64)
    scheduler = DDIMScheduler(  # SD 1.x's schedule and conventions (SDXL's are the same)
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    sd = SD(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
    if xl:  # SDXL's layout in miniature: cross-attention on both encoders' states side by side (32 + 32), and the
        torch.manual_seed(1)  # pooled projection (32) + 6 size/crop numbers (8 dims each) added to the time embedding
        sd.text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**dict(text_encoder.config.to_dict(),
                                                                              projection_dim=32)))
        sd.tokenizer_2 = copy.deepcopy(tokenizer)
        sd.force_zeros_for_empty_prompt = True
        sd.unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
            attention_head_dim=8, norm_num_groups=16, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
    torch.random.set_rng_state(rng_state)
    return sd


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
        ctx.autocast = [(d, torch.get_autocast_dtype(d)) for d in ("cuda", "cpu") if torch.is_autocast_enabled(d)]
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
            with torch.enable_grad(), contextlib.ExitStack() as stack:
                for device_type, dtype in ctx.autocast:  # recompute under the forward's autocast, as it ran then
                    stack.enter_context(torch.autocast(device_type, dtype=dtype))
                out = fn(x)
            grad, *grads = torch.autograd.grad(out, [x, *weights], grad, allow_unused=True)
            for j, g in enumerate(grads):  # summed in place: no new buffers per step
                if g is not None:
                    total[j] = g if total[j] is None else total[j].add_(g)
        total = iter(total)
        return None, grad, *(next(total) if need else None for need in ctx.needs_input_grad[2:])


# -----------------------------------------------------------------------------
# prompts, shapes, decoding


def encode_prompts(sd, prompts):
    """Prompts -> the conditioning the UNet reads, as diffusers' pipelines build it (token ids padded to the
    tokenizer's max length). SD 1.x / 2.x: the text encoder's last hidden states (B, L, D).
    SDXL: both encoders' penultimate hidden states side by side (B, L, D1 + D2), then one more row holding the second
    encoder's pooled projection (its first P entries, zeros after): (B, L + 1, D1 + D2). Packed so, the conditioning
    indexes, expands and concatenates as SD 1.x's does; guided_output takes the row off again. An empty prompt's
    conditioning is all zeros where the model says force_zeros_for_empty_prompt (SDXL's unconditional convention)."""
    def ids(tokenizer, device):
        return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(device)
    if sd.text_encoder_2 is None:
        return sd.text_encoder(ids(sd.tokenizer, sd.text_encoder.device))[0]
    hidden = []
    for tokenizer, encoder in ((sd.tokenizer, sd.text_encoder), (sd.tokenizer_2, sd.text_encoder_2)):
        out = encoder(ids(tokenizer, encoder.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    hidden = torch.cat(hidden, -1)  # (B, L, D1 + D2)
    pooled = torch.nn.functional.pad(out.text_embeds, (0, hidden.shape[-1] - out.text_embeds.shape[-1]))  # (B, D)
    cond = torch.cat([hidden, pooled[:, None].to(hidden.dtype)], 1)  # (B, L + 1, D1 + D2)
    if sd.force_zeros_for_empty_prompt:
        cond = cond * torch.tensor([p != "" for p in prompts], dtype=cond.dtype, device=cond.device)[:, None, None]
    return cond


def vae_scale_factor(sd):
    return 2 ** (len(sd.vae.config.block_out_channels) - 1)  # 8 for SD: one 2x downsample between blocks


def latent_shape(sd, resolution):
    """(C, h, w) of the latents for square images of `resolution` pixels."""
    f = vae_scale_factor(sd)
    assert resolution % f == 0, f"resolution {resolution} is not divisible by the VAE's factor {f}"
    return (sd.unet.config.in_channels, resolution // f, resolution // f)


def native_resolution(sd):
    return sd.unet.config.sample_size * vae_scale_factor(sd)


def decode(sd, latents):
    """Latents (B, 4, h, w) -> images (B, 3, H, W) in [0, 1]. With grad enabled the VAE decoder is checkpointed stage
    by stage (its mid block, each ResNet block and upsampler of its up blocks, the output head), so backward holds one
    stage's activations at a time: at full resolution the decoder's are the largest in the whole model (SD 1.5's
    architecture, 256 px: a step's peak 1914 MB with whole up blocks as stages, 1735 MB with their ResNet blocks)."""
    z = latents / sd.vae.config.scaling_factor
    if getattr(sd.vae.config, "shift_factor", None):
        z = z + sd.vae.config.shift_factor
    z = z.to(sd.vae.dtype)
    # an fp32 VAE in a half-precision run is an SDXL VAE kept in fp32 (load_sd): autocast would halve it again
    fp32 = torch.autocast(z.device.type, enabled=False) if sd.vae.dtype == torch.float32 else contextlib.nullcontext()
    if not torch.is_grad_enabled():
        with fp32:
            return (sd.vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1)  # the VAE works in [-1, 1]
    vae, dec = sd.vae, sd.vae.decoder  # diffusers' AutoencoderKL.decode, written out as a sequence of stages
    stages = [lambda z: dec.mid_block(dec.conv_in(vae.post_quant_conv(z) if vae.post_quant_conv is not None else z)),
              *(stage for block in dec.up_blocks for stage in _up_block_stages(block)),
              lambda x: dec.conv_out(dec.conv_act(dec.conv_norm_out(x))).float()]
    with fp32:
        x = checkpoint(stages, z, [p for p in vae.parameters() if p.requires_grad])
    return (x / 2 + 0.5).clamp(0, 1)


def _up_block_stages(block):
    """A VAE decoder's up block as the steps its forward runs: each ResNet block (no time embedding in a VAE), then
    the upsampler (diffusers' UpDecoderBlock2D.forward); another kind of block stays one stage."""
    from diffusers.models.unets.unet_2d_blocks import UpDecoderBlock2D
    if type(block) is not UpDecoderBlock2D:
        return [block]
    return [functools.partial(resnet, temb=None) for resnet in block.resnets] + list(block.upsamplers or [])


def image_grid(images, nrow, pad=2, labels=None, title=None):
    """Images (B, 3, H, W) in [0, 1] -> one PIL image, `nrow` images per row, on a white background. `labels` (one
    string per image, e.g. its prompt) are written above each image and `title` above the grid, wrapped to fit, so
    that a picture read alone says what it shows."""
    from PIL import Image, ImageDraw, ImageFont
    B, C, H, W = images.shape
    rows = -(-B // nrow)
    width = nrow * (W + pad) + pad
    font = ImageFont.load_default(size=max(10, W // 24))  # Pillow's own font: legible on 64 px and on 512 px images
    line = font.size + 2
    lines = [_wrap(text, font, W) for text in labels] if labels else [[]] * B
    strip = line * max(len(t) for t in lines)  # the label band above each row of images
    heading = _wrap(title, font, width - 2 * pad) if title else []
    top = line * len(heading) + (pad if heading else 0)
    grid = Image.new("RGB", (width, top + rows * (strip + H + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for k, text in enumerate(heading):
        draw.text((pad, pad + k * line), text, fill="black", font=font)
    pixels = (images.detach().float().cpu().permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    for i in range(B):
        x, y = pad + (i % nrow) * (W + pad), top + pad + (i // nrow) * (strip + H + pad)
        for k, text in enumerate(lines[i]):
            draw.text((x, y + k * line), text, fill="black", font=font)
        grid.paste(Image.fromarray(pixels[i]), (x, y + strip))
    return grid


def _wrap(text, font, width):
    """Greedy word wrap of `text` to lines at most `width` pixels wide in `font` (a longer word keeps its own line)."""
    lines = []
    for word in text.split():
        if lines and font.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


# -----------------------------------------------------------------------------
# the DDIM sampler


def parse_backprop(text, steps):
    """The command-line form, checked against the number of steps: "all", "K" -> K, "lo,hi" -> (lo, hi),
    "lv:N" -> ("lv", N), "drtune:N" -> ("drtune", N)."""
    if text == "all":
        return "all"
    try:
        if text.startswith(("lv:", "drtune:")):
            name, _, n = text.partition(":")
            backprop = (name, int(n))
        else:
            parts = [int(v) for v in text.split(",")]
            backprop = parts[0] if len(parts) == 1 else tuple(parts)
    except ValueError:
        raise ValueError(f"{text!r}: expected all, K, lo,hi, lv:N or drtune:N") from None
    try:
        backprop_window(backprop, steps, check_only=True)
    except ValueError as e:  # the message as the user wrote the value
        raise ValueError(f"{text!r}: {str(e).split(': ', 1)[1]}") from None
    return backprop


def backprop_window(backprop, steps, generator=None, check_only=False):
    """How many final steps of the chain get gradients: "all" -> steps, an int K -> K, (lo, hi) -> K ~ U{lo..hi}
    drawn once, ("lv", N) -> 0 (DRaFT-LV takes its gradient from N re-noised copies of the last step instead),
    ("drtune", N) -> steps (every step passes the gradient on; drtune_steps says which N train the UNet)."""
    if backprop == "all":
        return steps
    if isinstance(backprop, (tuple, list)) and len(backprop) == 2 and backprop[0] == "lv":
        if not (isinstance(backprop[1], int) and backprop[1] >= 1):
            raise ValueError(f"{backprop!r}: DRaFT-LV needs N >= 1 noise draws")
        return 0
    if isinstance(backprop, (tuple, list)) and len(backprop) == 2 and backprop[0] == "drtune":
        if not (isinstance(backprop[1], int) and 1 <= backprop[1] <= steps):
            raise ValueError(f"{backprop!r}: DRTune trains N steps, 1 <= N <= the number of DDIM steps ({steps})")
        return steps
    window = (backprop, backprop) if isinstance(backprop, int) else backprop
    if not (isinstance(window, (tuple, list)) and len(window) == 2 and 1 <= window[0] <= window[1] <= steps):
        raise ValueError(f"{backprop!r}: K must satisfy 1 <= K <= the number of DDIM steps ({steps})")
    lo, hi = window
    if lo == hi or check_only:
        return lo
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(lo, hi + 1, (1,), generator=generator, device=device))


def steps_with_gradient(backprop, steps):
    """The most steps of one trajectory that run the UNet with gradients: what keep_activations can keep at most."""
    if backprop == "all":
        return steps
    if isinstance(backprop, (tuple, list)) and backprop[0] in ("lv", "drtune"):
        return 1 if backprop[0] == "lv" else backprop[1]
    return backprop if isinstance(backprop, int) else backprop[1]


def step_activation_bytes(sd, cond, uncond, latents, steps, guidance=7.5, eta=0.0):
    """What keep_activations costs per kept step, measured rather than assumed: the bytes autograd holds for backward
    after one DDIM step with gradients (the UNet, then the update) from `latents` (B, 4, h, w), in the caller's
    autocast dtype. Counted with saved_tensors_hooks as the distinct storages the step's graph saves, the model's
    weights excluded (they are in memory anyway). Linear in the batch; CFG's two halves are included."""
    weights = {t.untyped_storage().data_ptr() for t in [*sd.unet.parameters(), *sd.unet.buffers()]}
    held = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            held[storage.data_ptr()] = storage.nbytes()
        return t
    t = _ddim_schedule(sd, steps).timesteps[0]
    context = guidance_context(cond, uncond, guidance, sd.unet.dtype)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x = latents.detach().requires_grad_()  # as in the chain, where x_t carries the gradient of the steps before
        ddim_transition(sd, guided_output(sd, x, t, context, guidance), x, t, steps, eta)
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
                keep_activations=0):
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
    With ("drtune", N) (DRTune, Wu et al. 2024) every step is x_prev = c_x * x_t + c_eps * eps(sg(x_t)) + sigma * z
    (the update above, rearranged): the UNet sees its input detached (sg, "stop-gradient"), so the reward's gradient
    reaches every step, the earliest included, through the linear term c_x = sqrt(a_prev / a_t) alone, never through
    the UNet's Jacobian (which is what explodes over a long chain); and only the N steps of drtune_steps run the UNet
    with gradients (checkpointed), the others under no_grad: N UNet backwards per sample whatever the chain's length.
    keep_activations: the last n steps with gradients keep their UNet activations instead of checkpointing
    (no recomputation in backward, but memory grows by one step's activations, step_activation_bytes, per step); 0 =
    flat memory. Why the last ones: every truncation window (random K, DRaFT-K) ends with them, so each kept step
    saves its recomputation in every trajectory; and backward reaches them first, so their memory is freed first.
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

    def step(x, t, z, context):  # one denoising step: the UNet, then the update
        return update(x, guided_output(sd, x, t, context, guidance), t, z)

    def noise(like):  # drawn in step order, once: a recomputed step reuses its own
        return _randn(like, generator) if eta > 0 else None

    context = guidance_context(cond, uncond, guidance, sd.unet.dtype)  # (2B, L, D): [uncond; cond]
    ts = sched.timesteps
    x = latents
    if grad and isinstance(backprop, (tuple, list)) and backprop[0] == "drtune":
        trained = drtune_steps(backprop[1], steps, generator)
        kept = trained[len(trained) - min(keep_activations, len(trained)):]  # not checkpointed: activations kept
        for i, t in enumerate(ts):
            z = noise(x)
            unet = functools.partial(guided_output, sd, t=t, context=context, guidance=guidance)
            if i in kept:
                out = unet(x.detach())
            elif i in trained:
                out = checkpoint([unet], x.detach(), trainable)  # sg(x_t): gradient to the LoRA weights only
            else:
                with torch.no_grad():
                    out = unet(x)  # a constant: the chain's gradient passes this step by c_x alone
            x = update(x, out, t, z)  # x itself, not detached: the gradient's path to the earlier steps
        return x
    with torch.no_grad():  # the steps before the truncation window build no graph at all
        for t in ts[:steps - k]:
            x = step(x, t, noise(x), context)
    window = [functools.partial(step, t=t, z=noise(x), context=context) for t in ts[steps - k:]]
    if k == 0 and grad:  # DRaFT-LV: re-noise the sample N times to the last timestep, x_t = sqrt(a_t) x_0 +
        n, t = backprop[1], ts[-1]  # sqrt(1 - a_t) z, and take the last step again, with gradients
        x0 = x.repeat(n, 1, 1, 1)  # (N * B, 4, h, w), draw-major
        a_t = float(sched.alphas_cumprod[t])
        x = a_t ** 0.5 * x0 + (1 - a_t) ** 0.5 * _randn(x0, generator)
        context = guidance_context(cond.repeat(n, 1, 1), uncond.repeat(n, 1, 1), guidance, sd.unet.dtype)
        window = [functools.partial(step, t=t, z=noise(x), context=context)]
    recompute = len(window) - min(keep_activations, len(window))
    if recompute:  # checkpointed: only the latents entering each step are kept for backward
        x = checkpoint(window[:recompute], x, trainable)
    for fn in window[recompute:]:  # plain autograd: activations kept, no recomputation
        x = fn(x)
    return x


def _ddim_schedule(sd, steps):
    sched = sd.scheduler
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
        h, w = (n * vae_scale_factor(sd) for n in x.shape[-2:])  # original size = target size, crop at (0, 0)
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


def ddim_logprob(x_prev, mean, sigma):
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
        xs.append(mean + sigma * _randn(x, generator))
        logps.append(ddim_logprob(xs[-1], mean, sigma))
    return torch.stack(xs), torch.stack(logps), sched.timesteps.clone()


def _randn(like, generator):  # N(0, I) noise like `like`, drawn on the generator's device: reproducible anywhere
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
