"""Loading a Stable Diffusion (1.x, 2.x, XL, or an offline miniature), and what turns prompts into the UNet's
conditioning and latents into images.

    sd = load_sd("tiny", "cpu", torch.float32)          # or "shapes", a hub id, or a local diffusers directory
    cond, uncond = encode_prompts(sd, ["a cat"]), encode_prompts(sd, [""])   # (B, L, D), as diffusers builds them
    latents = torch.randn(1, *latent_shape(sd, 64))      # (B, 4, h, w): the sampler (sampler.py) starts here
    images = decode(sd, latents)                         # (B, 3, H, W) in [0, 1]; checkpointed under grad

`SD` holds the parts (UNet, VAE, text encoder(s), tokenizer(s), a DDIMScheduler), all frozen and in eval mode.
`tiny` and `tiny-xl` are built offline from the real diffusers / transformers classes with random fixed-seed weights,
so that everything runs, and is tested, without a download. `decode` runs the VAE through sampler.checkpoint when
gradients are on, so that its large activations are held one stage at a time.

References: latent diffusion, Rombach et al. 2022 (arXiv:2112.10752); SDXL, Podell et al. 2023 (arXiv:2307.01952).
"""
import contextlib
import copy
import functools
import json
import os
import socket
import tempfile
import urllib.parse
import warnings
from dataclasses import dataclass

import torch

from sampler import checkpoint

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

