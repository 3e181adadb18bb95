"""Loading a Stable Diffusion (1.x, 2.x, XL, 3 / 3.5), a FLUX.1 or an offline miniature, and what turns prompts into
the UNet's (or SD3's / FLUX's transformer's) conditioning and latents into images.

    sd = load_sd("tiny", "cpu", torch.float32)          # or "shapes", a hub id, or a local diffusers directory
    cond, uncond = encode_prompts(sd, ["a cat"]), encode_prompts(sd, [""])   # (B, L, D), as diffusers builds them
    free_text_encoders(sd)                               # then their memory is free (T5-XXL's the most)
    latents = torch.randn(1, *latent_shape(sd, 64))      # (B, 4, h, w): the sampler (sampler.py) starts here
    images = decode(sd, latents)                         # (B, 3, H, W) in [0, 1]; checkpointed under grad

`SD` holds the parts (UNet, VAE, text encoder(s), tokenizer(s), a DDIMScheduler), all frozen and in eval mode; for SD3
and FLUX (`sd.flow`) the denoiser in `sd.unet` is the transformer, the scheduler a FlowMatchEulerDiscreteScheduler.
`tiny`, `tiny-xl`, `tiny-sd3` and `tiny-flux` are built offline from the real diffusers / transformers classes with
random fixed-seed weights, so that everything runs, and is tested, without a download. `decode` runs the VAE through
sampler.checkpoint when gradients are on, so that its large activations are held one stage at a time.

References: latent diffusion, Rombach et al. 2022 (arXiv:2112.10752); SDXL, Podell et al. 2023 (arXiv:2307.01952);
SD3, Esser et al. 2024 (arXiv:2403.03206); FLUX.1, Black Forest Labs 2024.
"""
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
SHAPES_FLOW_DIR = SHAPES_DIR + "-flow"  # load_sd("shapes-flow"): its rectified-flow sibling (SD3's recipe)


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
    text_encoder_3: torch.nn.Module = None  # SD3 and FLUX: T5's encoder and tokenizer; `unet` then holds the
    tokenizer_3: object = None  # transformer (SD3: SD3Transformer2DModel, two CLIPTextModelWithProjection; FLUX:
    # FluxTransformer2DModel, one CLIPTextModel in text_encoder, no text_encoder_2)
    max_sequence_length: int = 256  # T5's token count, the pipeline's max_sequence_length (SD3's default 256)

    @property
    def flow(self):
        """A rectified-flow model (SD3: a FlowMatchEulerDiscreteScheduler; flow.flow_sample), not DDIM's family."""
        return type(self.scheduler).__name__.startswith("FlowMatch")

    @property
    def flux(self):
        """FLUX.1 (a FluxTransformer2DModel in `unet`): CLIP in text_encoder, T5 in text_encoder_3."""
        return type(self.unet).__name__ == "FluxTransformer2DModel"

    @property
    def text_encoders(self):
        """The text encoders this model has and still holds (free_text_encoders drops them)."""
        encoders = (self.text_encoder, self.text_encoder_2, self.text_encoder_3)
        return [m for m in encoders if isinstance(m, torch.nn.Module)]


SUPPORTED = {"StableDiffusionPipeline": "Stable Diffusion 1.x / 2.x", "StableDiffusionXLPipeline": "SDXL",
             "StableDiffusion3Pipeline": "SD3 / SD3.5", "FluxPipeline": "FLUX.1-dev / -schnell"}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what to do instead."""


# -----------------------------------------------------------------------------
# loading


def load_sd(model=DEFAULT_MODEL, device="cpu", dtype=torch.float32):
    """Load a model: a hub id or a local diffusers-format directory of one of SUPPORTED (the kind read from its
    model_index.json), "tiny" / "tiny-xl" (random weights, built offline), "shapes" (the coloured-shapes model
    trained by python -m shapes --train, in models/shapes) or "shapes-flow" (its SD3-style rectified-flow sibling);
    or "tiny-sd3" / "tiny-flux", offline SD3 / FLUX.1-dev miniatures.
    SD3 and FLUX are rectified-flow models (`sd.flow`): flow.flow_sample samples them.

    All weights are frozen (`requires_grad_(False)`) and in eval mode; the scheduler is a DDIMScheduler but for SD3's
    and FLUX's (FlowMatchEulerDiscreteScheduler). An SDXL
    VAE whose config says `force_upcast` stays in fp32 when the rest is fp16 (it overflows in fp16), and decode() runs
    it outside autocast."""
    if model in ("tiny", "tiny-xl"):
        sd = _build_tiny(xl=model == "tiny-xl")
    elif model == "tiny-sd3":
        sd = _build_tiny_sd3()
    elif model == "tiny-flux":
        sd = _build_tiny_flux()
    elif model in ("shapes", "shapes-flow"):
        folder, sub, how = ((SHAPES_DIR, "unet", "--train") if model == "shapes"
                            else (SHAPES_FLOW_DIR, "transformer", "--train --flow"))
        if not os.path.isfile(os.path.join(folder, sub, "config.json")):
            raise ModelLoadError(f"no {model} model in {folder}: train it with python -m shapes {how}")
        sd = _from_pretrained(folder, dtype)
    else:
        sd = _from_pretrained(model, dtype)
    upcast_vae = sd.text_encoder_2 is not None and sd.vae.config.get("force_upcast") and dtype == torch.float16
    for m in (sd.unet, sd.vae, *sd.text_encoders):
        m.requires_grad_(False).eval().to(device)
        want = torch.float32 if m is sd.vae and upcast_vae else dtype
        if next(m.parameters()).dtype != want:
            m.to(want)
    return sd


def _from_pretrained(model, dtype):
    from diffusers import (AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel,
                           SD3Transformer2DModel, UNet2DConditionModel)
    from diffusers.utils import is_accelerate_available
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

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
        sd3, flux = kind == "StableDiffusion3Pipeline", kind == "FluxPipeline"
        denoiser = SD3Transformer2DModel if sd3 else FluxTransformer2DModel if flux else UNet2DConditionModel
        folder = "transformer" if sd3 or flux else "unet"
        local = os.path.isdir(model)
        if local and not os.path.isfile(os.path.join(model, folder, "config.json")):
            what = f"a complete diffusers {SUPPORTED[kind]} directory" if index else "a diffusers model directory"
            raise ModelLoadError(f"{model} is not {what} (no {folder}/config.json); make one with "
                                 "pipe.save_pretrained(dir), or use --model tiny")
        if "controlnet" in index or (local and os.path.isdir(os.path.join(model, "controlnet"))):
            raise ModelLoadError(f"{model} has a ControlNet; supported are text-to-image models without one")
        config = denoiser.load_config(subfolder=folder, **kw)  # refused before any weight is read
        if config["in_channels"] != (config.get("out_channels") or config["in_channels"]):  # FLUX: null, the same
            raise ModelLoadError(f"{model}'s {folder} takes {config['in_channels']} input channels for "
                                 f"{config['out_channels']} output ones (an inpainting or image-conditioned model); "
                                 "supported are text-to-image models")
        if local:
            _check_weights(model, [folder, "vae", "text_encoder"] + ["text_encoder_2"] * (
                kind == "StableDiffusionXLPipeline" or sd3) + [f"text_encoder_{3 if sd3 else 2}"] * (sd3 or flux))

        def weights(cls, subfolder):  # a model in the run's dtype: torch_dtype= to diffusers, dtype= to transformers
            if cls.__module__.startswith("diffusers"):
                return cls.from_pretrained(subfolder=subfolder, torch_dtype=dtype, **kw, **lean)
            return cls.from_pretrained(subfolder=subfolder, dtype=dtype, **kw)

        with warnings.catch_warnings():  # diffusers passes an argument that newer huggingface_hub deprecates
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks")
            sd = SD(unet=weights(denoiser, folder), vae=weights(AutoencoderKL, "vae"),
                    text_encoder=weights(CLIPTextModelWithProjection if sd3 else CLIPTextModel, "text_encoder"),
                    tokenizer=CLIPTokenizer.from_pretrained(subfolder="tokenizer", **kw),
                    scheduler=(FlowMatchEulerDiscreteScheduler if sd3 or flux else DDIMScheduler).from_pretrained(
                        subfolder="scheduler", **kw))
            if kind == "StableDiffusionXLPipeline" or sd3:  # the second CLIP, with a projection (CLIP-G / bigG)
                sd.text_encoder_2 = weights(CLIPTextModelWithProjection, "text_encoder_2")
                sd.tokenizer_2 = CLIPTokenizer.from_pretrained(subfolder="tokenizer_2", **kw)
            if kind == "StableDiffusionXLPipeline":  # the pipeline's convention for the empty prompt
                sd.force_zeros_for_empty_prompt = index.get("force_zeros_for_empty_prompt", True)
            if sd3 or flux:  # T5: SD3's third text encoder, FLUX's second (it has one CLIP); ours is text_encoder_3
                n = 3 if sd3 else 2
                sd.text_encoder_3 = weights(T5EncoderModel, f"text_encoder_{n}")
                sd.tokenizer_3 = T5TokenizerFast.from_pretrained(subfolder=f"tokenizer_{n}", **kw)
                # the T5 tokens the pipelines read by default: SD3's 256, FLUX-dev's 512; FLUX-schnell (no guidance
                # embedding) 256, its max_length in Black Forest Labs' code; at most the tokenizer's (miniatures: 16)
                sd.max_sequence_length = min(512 if flux and config.get("guidance_embeds") else 256,
                                             sd.tokenizer_3.model_max_length)
        return sd

    if os.path.isdir(model):
        try:
            return load(local_only=True)
        except (OSError, ValueError) as e:  # a damaged file: diffusers' and transformers' errors, in a line
            raise ModelLoadError(f"cannot load {model}: {str(e).strip().splitlines()[0]}") from None
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelLoadError(f"no such model directory: {model} (a hub id looks like 'owner/name')")
    try:  # the Hugging Face cache first: no network needed for a model downloaded before
        return load(local_only=True)
    except OSError:
        pass
    if not hub_reachable():  # fail in seconds, not after a minute of retries and a long traceback
        raise ModelLoadError(f"cannot download {model}: the Hugging Face hub is unreachable and the model is not in "
                             "the local cache. Pass a local diffusers directory (--model path/to/dir) or --model tiny.")
    try:
        return load(local_only=False)
    except OSError as e:
        raise ModelLoadError(f"cannot load {model} from the hub: {str(e).splitlines()[0]}") from None


def _check_weights(model, folders):
    """ModelLoadError naming the first part of a local model that has no config or no weights, as an interrupted
    download or copy leaves it, before diffusers' long OSError."""
    for folder in folders:
        path = os.path.join(model, folder)
        names = os.listdir(path) if os.path.isdir(path) else []
        if "config.json" not in names:
            raise ModelLoadError(f"{model} is incomplete: no {folder}/config.json (an interrupted download or copy?)")
        if not any(n.endswith((".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")) for n in names):
            raise ModelLoadError(f"{model} is incomplete: {folder}/ has a config but no weights (*.safetensors or "
                                 "*.bin; an interrupted download or copy?)")


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


def hub_reachable(timeout=3.0):
    """Whether the Hugging Face hub answers within `timeout` seconds (False in offline mode): a model or reward that is
    not in the local cache fails in seconds, not after a minute of retries."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false"):
        return False
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
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, symbols = _char_clip_tokenizer()

    rng_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # fixed-seed weights, without disturbing the caller's RNG stream
    text_encoder = CLIPTextModel(_tiny_clip_config(symbols, hidden_size=32))
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


_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


def _char_clip_tokenizer():
    """CLIP's BPE over single characters (no merges), and its symbols: CLIP's real vocabulary cannot be built
    offline."""
    from transformers import CLIPTokenizer
    symbols = list(_CHARS) + [c + "</w>" for c in _CHARS] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as d:  # the portable way to build a CLIPTokenizer: from vocab/merges files
        with open(os.path.join(d, "vocab.json"), "w") as f:
            json.dump({s: i for i, s in enumerate(symbols)}, f)
        with open(os.path.join(d, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(d, model_max_length=77), symbols


def _char_t5_tokenizer(max_length):
    """A T5-style tokenizer without sentencepiece: a Unigram model over single characters, T5's ids for <pad> 0,
    </s> 1, <unk> 2, its Metaspace pre-tokenizer (a space becomes "▁"), and </s> appended to every sequence."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [(c, -1.0) for c in _CHARS]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)


def _tiny_clip_config(symbols, **sizes):
    """A small CLIP text encoder's config over the character vocabulary of _char_clip_tokenizer; `sizes`:
    hidden_size, and projection_dim for a CLIPTextModelWithProjection."""
    from transformers import CLIPTextConfig
    return CLIPTextConfig(vocab_size=len(symbols), intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=77, bos_token_id=len(symbols) - 2, eos_token_id=len(symbols) - 1,
                          pad_token_id=len(symbols) - 1, **sizes)


def _tiny_t5(tokenizer):
    """A T5 encoder of width 96 over _char_t5_tokenizer's vocabulary (SD3's and FLUX's third text encoder)."""
    from transformers import T5Config, T5EncoderModel
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=96, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))

def _build_tiny_sd3():
    """A miniature SD3 (Esser et al. 2024, arXiv:2403.03206) from the real classes, fixed-seed weights: an MMDiT
    (SD3Transformer2DModel, 2 joint blocks, patch 2) on 16-channel latents, 64 px images (8x8x16 latents); SD3's VAE
    scaling and shift; CLIP-L and CLIP-G stand-ins of different widths (hidden 32 and 48, projections 16 and 24: the
    pooled vector is 40 wide); a T5 encoder of width 96 reading 16 tokens (the real one: 4096 wide, 256 tokens);
    FlowMatchEulerDiscreteScheduler with SD3's shift 3.0. The sequence the transformer reads is 77 CLIP rows (64
    features, zero-padded to 96) then 16 T5 rows: (B, 93, 96), as StableDiffusion3Pipeline.encode_prompt builds it."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    tokenizer, symbols = _char_clip_tokenizer()
    tokenizer_3 = _char_t5_tokenizer(16)
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # fixed-seed weights, without disturbing the caller's RNG stream
    text_encoder = CLIPTextModelWithProjection(_tiny_clip_config(symbols, hidden_size=32, projection_dim=16))
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_config(symbols, hidden_size=48, projection_dim=24))
    text_encoder_3 = _tiny_t5(tokenizer_3)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=96, caption_projection_dim=32, pooled_projection_dim=16 + 24,
        pos_embed_max_size=8)
    vae = AutoencoderKL(  # SD3's VAE: 16 latent channels, no quant convs, a shift as well as a scale
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=16,
        sample_size=64, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    torch.random.set_rng_state(rng_state)
    return SD(unet=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
              scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
              text_encoder_2=text_encoder_2, tokenizer_2=copy.deepcopy(tokenizer), text_encoder_3=text_encoder_3,
              tokenizer_3=tokenizer_3, max_sequence_length=16)


def _build_tiny_flux():
    """A miniature FLUX.1-dev from the real classes, fixed-seed weights: a FluxTransformer2DModel (1 double-stream and
    1 single-stream block, 4 heads of 8, rotary axes 2 + 2 + 4 = 8, a guidance embedding as FLUX-dev has) reading
    16-channel latents packed 2x2 into 64-wide tokens, 64 px images (8x8x16 latents, 16 tokens); FLUX's VAE scaling
    0.3611 and shift 0.1159; a CLIP-L stand-in (hidden 32: its pooled output is the pooled vector, no projection) and
    a T5 encoder of width 96 reading 16 tokens (the real ones: 768, and 4096 wide reading 512);
    FlowMatchEulerDiscreteScheduler with FLUX's dynamic shifting (mu from the image's token count)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tokenizer, symbols = _char_clip_tokenizer()
    tokenizer_3 = _char_t5_tokenizer(16)
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # fixed-seed weights, without disturbing the caller's RNG stream
    text_encoder = CLIPTextModel(_tiny_clip_config(symbols, hidden_size=32))
    text_encoder_3 = _tiny_t5(tokenizer_3)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=96, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    vae = AutoencoderKL(  # FLUX's VAE: 16 latent channels, no quant convs, its own scale and shift
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=16,
        sample_size=64, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    torch.random.set_rng_state(rng_state)
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler config
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    return SD(unet=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
              text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3, max_sequence_length=16)


# -----------------------------------------------------------------------------
# prompts, shapes, decoding


def encode_prompts(sd, prompts):
    """Prompts -> the conditioning the UNet reads, as diffusers' pipelines build it (token ids padded to the
    tokenizer's max length). SD 1.x / 2.x: the text encoder's last hidden states (B, L, D).
    SDXL: both encoders' penultimate hidden states side by side (B, L, D1 + D2), then one more row holding the second
    encoder's pooled projection (its first P entries, zeros after): (B, L + 1, D1 + D2). Packed so, the conditioning
    indexes, expands and concatenates as SD 1.x's does; guided_output takes the row off again. An empty prompt's
    conditioning is all zeros where the model says force_zeros_for_empty_prompt (SDXL's unconditional convention).
    SD3: CLIP-L's and CLIP-G's rows then T5's, and the pooled row: (B, 77 + T + 1, D_t5) (_encode_sd3).
    FLUX: T5's last hidden states (B, T, D_t5), then CLIP's pooled output (B, D_clip) zero-padded to D_t5 as one more
    row: (B, T + 1, D_t5), as FluxPipeline.encode_prompt builds them."""
    if isinstance(sd.text_encoder, FreedTextEncoder):
        raise ValueError("the text encoders were freed after the prompts were encoded (free_text_encoders): encode "
                         "every prompt before freeing them")
    def ids(tokenizer, device, length=None):
        return tokenizer(list(prompts), padding="max_length", max_length=length or tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(device)
    if sd.flux:  # T5 reads the prompt for the sequence, CLIP only for its pooled output (its EOS token's state)
        t5 = sd.text_encoder_3(ids(sd.tokenizer_3, sd.text_encoder_3.device, sd.max_sequence_length))[0]  # (B, T, D)
        pooled = sd.text_encoder(ids(sd.tokenizer, sd.text_encoder.device)).pooler_output.to(t5.dtype)  # (B, D_clip)
        return torch.cat([t5, torch.nn.functional.pad(pooled, (0, t5.shape[-1] - pooled.shape[-1]))[:, None]], 1)
    if sd.text_encoder_3 is not None:
        return _encode_sd3(sd, ids)
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


def _encode_sd3(sd, ids):
    """SD3's conditioning, as StableDiffusion3Pipeline.encode_prompt builds it: both CLIPs' penultimate hidden states
    side by side (B, 77, D_l + D_g), zero-padded to T5's width D, then T5's last hidden states (B, T, D) after them on
    the sequence; plus the pooled row: both CLIPs' projections (B, P_l + P_g), zero-padded to D.
    Returns (B, 77 + T + 1, D). The empty prompt is encoded like any other (SD3 has no zeros convention)."""
    hidden, pooled = [], []
    for tokenizer, encoder in ((sd.tokenizer, sd.text_encoder), (sd.tokenizer_2, sd.text_encoder_2)):
        out = encoder(ids(tokenizer, encoder.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out.text_embeds)
    t5 = sd.text_encoder_3(ids(sd.tokenizer_3, sd.text_encoder_3.device, sd.max_sequence_length))[0]  # (B, T, D)
    clip = torch.cat(hidden, -1).to(t5.dtype)  # (B, 77, D_l + D_g)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # (B, 77, D)
    pooled = torch.cat(pooled, -1).to(t5.dtype)  # (B, P_l + P_g)
    pooled = torch.nn.functional.pad(pooled, (0, t5.shape[-1] - pooled.shape[-1]))  # (B, D)
    return torch.cat([clip, t5, pooled[:, None]], 1)


class FreedTextEncoder:
    """What free_text_encoders leaves of a text encoder: its config, no weights (sampler.guided_output reads SDXL's
    pooled width from it, text_encoder_2.config.projection_dim)."""

    def __init__(self, config):
        self.config = config


def free_text_encoders(sd):
    """Drop the text encoders once every prompt is encoded: nothing after encode_prompts needs them, and they are large
    (SD3's and FLUX's T5-XXL encoder: 4.76 B parameters). Each becomes a FreedTextEncoder, so that its
    memory is returned (on a GPU to the driver, for the training's activations and its peak-memory budget);
    encode_prompts then is a ValueError. Returns the bytes of parameters and buffers freed."""
    freed = 0
    for field in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        encoder = getattr(sd, field)
        if isinstance(encoder, torch.nn.Module):
            freed += sum(t.numel() * t.element_size() for t in [*encoder.parameters(), *encoder.buffers()])
            setattr(sd, field, FreedTextEncoder(encoder.config))
    torch.cuda.empty_cache()  # nothing to do without CUDA
    return freed


def vae_scale_factor(sd):
    return 2 ** (len(sd.vae.config.block_out_channels) - 1)  # 8 for SD: one 2x downsample between blocks


def pixel_multiple(sd):
    """What an image side must be a multiple of: the VAE's factor, times 2 for FLUX (it packs 2x2 latents into a
    token) and SD3's patch size (its transformer reads patch_size x patch_size latents as a token)."""
    patch = 2 if sd.flux else sd.unet.config.patch_size if sd.flow else 1
    return vae_scale_factor(sd) * patch


def latent_shape(sd, resolution):
    """(C, h, w) of the latents for square images of `resolution` pixels (FLUX: unpacked, C = in_channels / 4)."""
    if resolution % pixel_multiple(sd):
        why = ", times FLUX's 2x2 packing" if sd.flux else ", times SD3's 2x2 patches" if sd.flow else ""
        raise ValueError(f"resolution {resolution} is not divisible by {pixel_multiple(sd)} (the VAE's downsampling "
                         f"factor{why})")
    c = sd.unet.config.in_channels // (4 if sd.flux else 1)
    return (c, resolution // vae_scale_factor(sd), resolution // vae_scale_factor(sd))


def native_resolution(sd):
    if sd.flux:  # FluxTransformer2DModel has no sample_size; FLUX's VAE config holds the image size (1024)
        return sd.vae.config.sample_size
    return sd.unet.config.sample_size * vae_scale_factor(sd)


def decode(sd, latents, tile=0):
    """Latents (B, 4, h, w) (SD3: (B, 16, h, w), scaled and shifted back) -> images (B, 3, H, W) in [0, 1]. With grad
    enabled the VAE decoder is checkpointed stage by stage (its mid block, each ResNet block and upsampler of its up
    blocks, the output head), so backward holds one stage's activations at a time: at full resolution the decoder's are
    the largest in the whole model. Each stage is an autograd node of its own, so its saved input is freed as soon as
    its backward is done (docs/speed-and-memory.md measures both choices).

    tile > 0 (pixels; with grad, and an image larger than a tile): the latents are decoded in overlapping tiles, as
    diffusers' AutoencoderKL.tiled_decode does (a quarter of a tile overlaps its neighbour, blended linearly), each
    tile recomputed on its own in backward, so that the decoder's backward holds one tile's activations. Not the
    untiled decode: each tile's GroupNorms see only the tile (docs/speed-and-memory.md measures how far it is)."""
    z = latents / sd.vae.config.scaling_factor
    if getattr(sd.vae.config, "shift_factor", None):
        z = z + sd.vae.config.shift_factor
    z = z.to(sd.vae.dtype)
    # the VAE runs in its own dtype with autocast off, as diffusers' pipelines run it: under autocast a bf16 VAE would
    # run its GroupNorms in fp32 (CUDA's policy) and hold fp32 copies of full-resolution activations, and an fp32 VAE
    # in a half-precision run (an SDXL VAE that load_sd keeps in fp32) would be halved again
    with torch.autocast(z.device.type, enabled=False):
        if not torch.is_grad_enabled():
            x = sd.vae.decode(z).sample
        elif tile and max(z.shape[-2:]) * vae_scale_factor(sd) > tile:
            x = _tiled_decode(sd.vae, z, tile, tile // vae_scale_factor(sd))
        else:
            x = _staged_decode(sd.vae, z)
    return (x.float() / 2 + 0.5).clamp(0, 1)  # the VAE works in [-1, 1]


def largest_decode_tile(sd, most):
    """The largest tile check_decode_tile allows of at most `most` pixels, 0 if none is."""
    unit = 4 * vae_scale_factor(sd)
    tile = most // unit * unit
    return tile if tile >= 2 * unit else 0


def check_decode_tile(sd, tile, resolution):
    """decode(tile=...)'s tile, in pixels: 0 (off) or a multiple of 4 latent pixels (so that a quarter overlap and
    the tile's stride are whole latent pixels), at least 8 of them, smaller than the image (else it would decode
    whole). Raises ValueError saying what would be."""
    unit = 4 * vae_scale_factor(sd)
    if tile and (tile < 2 * unit or tile % unit):
        raise ValueError(f"must be 0 (off) or a multiple of {unit} pixels, at least {2 * unit} (a latent pixel is "
                         f"{vae_scale_factor(sd)} here, and a tile overlaps its neighbours by a quarter), got {tile}")
    if tile >= resolution:
        raise ValueError(f"{tile}: a tile of the whole {resolution}-px image or more decodes it whole; give a smaller "
                         "one, or 0")


def _staged_decode(vae, z):
    """diffusers' AutoencoderKL.decode, written out as a sequence of stages, each a checkpointed node."""
    dec = vae.decoder
    stages = [lambda z: dec.mid_block(dec.conv_in(vae.post_quant_conv(z) if vae.post_quant_conv is not None else z)),
              *(stage for block in dec.up_blocks for stage in _up_block_stages(block)),
              lambda x: dec.conv_out(dec.conv_act(dec.conv_norm_out(x)))]
    x, weights = z, _trainable(vae)
    for stage in stages:  # a node per stage: each input, at full resolution, is freed once its backward is done
        x = checkpoint([stage], x, weights)
    return x


def _trainable(module):  # what sampler.checkpoint must pass gradients to (none in a frozen VAE)
    return [p for p in module.parameters() if p.requires_grad]


TILE_OVERLAP = 0.25  # of a tile, shared with each neighbour: diffusers' AutoencoderKL.tile_overlap_factor


def _tiled_decode(vae, z, tile, t):
    """diffusers' AutoencoderKL.tiled_decode, each tile a node of its own: decode(tile=...). Tiles of `tile` image
    pixels, `t` latent pixels, one starting every `stride` latent pixels."""
    stride, blend = int(t * (1 - TILE_OVERLAP)), int(tile * TILE_OVERLAP)  # blend: the image pixels shared
    decode_tile, weights = functools.partial(_staged_decode, vae), _trainable(vae)
    rows = [[checkpoint([decode_tile], z[:, :, i:i + t, j:j + t], weights) for j in range(0, z.shape[3], stride)]
            for i in range(0, z.shape[2], stride)]
    for i, row in enumerate(rows):  # each tile blended into the one above and the one left (both blended already)
        for j in range(len(row)):
            if i > 0:
                row[j] = _blend(rows[i - 1][j], row[j], blend, dim=2)
            if j > 0:
                row[j] = _blend(row[j - 1], row[j], blend, dim=3)
    keep = tile - blend  # each tile's own part: the next tile's overlap is blended into the next tile
    return torch.cat([torch.cat([x[:, :, :keep, :keep] for x in row], dim=3) for row in rows], dim=2)


def _blend(a, b, n, dim):
    """b with its first n rows (dim=2) or columns (dim=3) faded in from a's last n: a (1 - r) + b r, r = 0, 1/n, ..."""
    n = min(a.shape[dim], b.shape[dim], n)
    r = (torch.arange(n, device=b.device) / n).view(-1, *[1] * (b.dim() - dim - 1)).to(b.dtype)
    head = a.narrow(dim, a.shape[dim] - n, n) * (1 - r) + b.narrow(dim, 0, n) * r
    return torch.cat([head, b.narrow(dim, n, b.shape[dim] - n)], dim=dim)


def _up_block_stages(block):
    """A VAE decoder's up block as the steps its forward runs: each ResNet block (no time embedding in a VAE), then
    the upsampler (diffusers' UpDecoderBlock2D.forward); another kind of block stays one stage."""
    from diffusers.models.unets.unet_2d_blocks import UpDecoderBlock2D
    if type(block) is not UpDecoderBlock2D:
        return [block]
    return [functools.partial(resnet, temb=None) for resnet in block.resnets] + list(block.upsamplers or [])

