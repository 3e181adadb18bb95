"""Real architectures with random weights, built offline for tools/bench.py: SD 1.x, SD 2.x and SDXL's UNets, VAE
and CLIP text encoders at full size; SD 3.5 Medium's and FLUX.1-dev's transformers and VAE, with one-layer text
encoders of the real widths (build_flow_arch says why). Speed and memory are the weights' shapes, not their values.

    sd = build_arch("sdxl", "cuda", torch.bfloat16)          # what model.load_sd returns, with random weights
    sd = build_arch("flux", "meta", torch.bfloat16)          # shapes only: for bench.py --estimate's fake tensors
"""
import contextlib
import copy

import torch

from model import load_sd

FLUX_BLOCKS = (19, 38)  # FLUX.1-dev's double-stream and single-stream transformer blocks
FLOW_ARCHS = ("sd35m", "sd35l", "flux")  # built with one-layer stand-ins of their text encoders
TEXT_DEPTH = {768: (12, 49408), 1280: (32, 49408), 4096: (24, 32128)}  # width -> (layers, vocabulary): CLIP ViT-L/14,
# OpenCLIP bigG/14, T5-XXL's encoder


@contextlib.contextmanager
def built_as(device, dtype):
    """New weights are made on `device` in `dtype`: FLUX's 12B built in fp32 on the CPU first would need 48 GB."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(default)


def build_arch(arch, build_device, dtype, flux_blocks=FLUX_BLOCKS):
    """SD 1.x / 2.x / XL networks at full size with random weights; tokenizers and scheduler from the tiny models (the
    real CLIP vocabulary cannot be built offline; token ids only index the embedding, so speed and memory are the
    same). sd35m, sd35l, flux: build_flow_arch. build_device "meta": shapes without memory, for an estimate's fake tensors;
    flux_blocks: FLUX's (double-stream, single-stream) block counts, fewer for a CPU."""
    if arch in FLOW_ARCHS:
        return build_flow_arch(arch, build_device, dtype, flux_blocks)
    from diffusers import DDIMScheduler
    sd = load_sd("tiny-xl" if arch == "sdxl" else "tiny")
    with torch.device(build_device):
        sd.unet, sd.vae, sd.text_encoder, sd.text_encoder_2 = build_unet_vae_text(arch)
    if arch == "sd21":  # v-prediction; its tables stay real, on the CPU: the sampler reads them as numbers
        sd.scheduler = DDIMScheduler.from_config(sd.scheduler.config, prediction_type="v_prediction")
    for m in (sd.unet, sd.vae, sd.text_encoder, sd.text_encoder_2):
        if m is not None:
            m.requires_grad_(False).eval().to(build_device, dtype)
    return sd


def build_unet_vae_text(arch):
    """build_arch's networks, on the default device: (UNet, VAE, text encoder, SDXL's second one or None)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    text_2 = None
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    if arch == "sdxl":  # SDXL base 1.0's configs: CLIP ViT-L/14 + OpenCLIP ViT-bigG/14 text, a 2.6B UNet, 1024 px
        vae.register_to_config(scaling_factor=0.13025)
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
        text = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, hidden_act="quick_gelu")
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            hidden_act="gelu", projection_dim=1280))
    elif arch == "sd15":  # UNet2DConditionModel's defaults are SD 1.x's UNet; text: CLIP ViT-L/14's
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        text = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, hidden_act="quick_gelu")
    else:  # SD 2.x: linear projections, per-block head dims, OpenCLIP ViT-H/14's text tower, v-prediction at 768 px
        unet = UNet2DConditionModel(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                                    use_linear_projection=True)
        text = CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                              num_attention_heads=16, hidden_act="gelu")
    return unet, vae, CLIPTextModel(text), text_2


def build_flow_arch(arch, build_device, dtype, flux_blocks=FLUX_BLOCKS):
    """SD 3.5 Medium's or Large's or FLUX.1-dev's transformer and VAE at full size with random weights, from their
    published configs (stabilityai/stable-diffusion-3.5-medium / -large, black-forest-labs/FLUX.1-dev: transformer/ and
    vae/config.json; the arguments are diffusers' SD3Transformer2DModel / FluxTransformer2DModel / AutoencoderKL
    ones). The tokenizers and the scheduler come from the miniatures tiny-sd3 / tiny-flux, whose schedulers are the
    real configs already (SD3: shift 3.0; FLUX: dynamic shifting, base 0.5 to max 1.15 over 256 to 4096 tokens).

    The text encoders are stand-ins: they run once per prompt, not in the sampling chain, so what matters for a step
    is the shape of what they hand the transformer, and that is real: T5-XXL's rows, 4096 wide (256 of them for SD3,
    StableDiffusion3Pipeline's max_sequence_length; 512 for FLUX, FluxPipeline's), CLIP-L's and OpenCLIP-G's hidden
    states (768 + 1280) and pooled projections (768 + 1280 = SD3's pooled 2048), CLIP-L's pooled 768 for FLUX. Each
    encoder is one layer of the real width; the real T5-XXL encoder (4.7B parameters, 24 layers) would not fit next to
    the transformer on a 24 GB machine."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    flux = arch == "flux"
    sd = load_sd("tiny-flux" if flux else "tiny-sd3")
    sd.max_sequence_length = 512 if flux else 256
    tiny_clip = sd.text_encoder.config.to_dict()  # the character vocabulary and its special tokens

    def clip(cls, hidden, heads, **projection):  # one layer of the real width (its MLP 4x, as CLIP's)
        return cls(CLIPTextConfig(**dict(tiny_clip, hidden_size=hidden, num_hidden_layers=1,
                                         intermediate_size=4 * hidden, num_attention_heads=heads, **projection)))
    with built_as(build_device, dtype):
        # one layer of T5 v1.1 XXL: d_model 4096, 64 heads of 64, a gated-GELU feed-forward of 10240
        sd.text_encoder_3 = T5EncoderModel(T5Config(
            vocab_size=sd.text_encoder_3.config.vocab_size, d_model=4096, d_kv=64, d_ff=10240, num_heads=64,
            num_layers=1, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
        vae = AutoencoderKL(  # SD3's and FLUX's VAE: SD's layout with 16 latent channels, no quant convs, 1024 px
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, sample_size=1024,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            use_quant_conv=False, use_post_quant_conv=False, scaling_factor=sd.vae.config.scaling_factor,
            shift_factor=sd.vae.config.shift_factor)  # each model's own (SD3 1.5305 / 0.0609, FLUX 0.3611 / 0.1159)
        if flux:  # 19 double-stream blocks (text and image apart), then 38 single-stream (one sequence): 11.9B
            double, single = flux_blocks
            unet = FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
            sd.text_encoder = clip(CLIPTextModel, 768, 12)  # CLIP ViT-L/14's text tower: its pooled 768
        elif arch == "sd35l":  # MMDiT, 8.1B: 38 joint blocks, 38 heads of 64 (2432 wide), QK norm
            unet = SD3Transformer2DModel(
                sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
                num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                pooled_projection_dim=2048, pos_embed_max_size=192, qk_norm="rms_norm")
        else:  # MMDiT-X, 2.24B: 24 joint blocks, 24 heads of 64 (1536 wide); blocks 0-12 add an image-only attention
            unet = SD3Transformer2DModel(
                sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                pooled_projection_dim=2048, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                qk_norm="rms_norm")
        if not flux:
            sd.text_encoder = clip(CLIPTextModelWithProjection, 768, 12, projection_dim=768)  # CLIP ViT-L/14
            sd.text_encoder_2 = clip(CLIPTextModelWithProjection, 1280, 20, projection_dim=1280)  # OpenCLIP bigG/14
    sd.unet, sd.vae = unet, vae
    for m in (sd.unet, sd.vae, sd.text_encoder, sd.text_encoder_2, sd.text_encoder_3):
        if m is not None:
            m.requires_grad_(False).eval().to(build_device, dtype)
    return sd


def full_depth_text_encoders(sd, dtype):
    """A flow arch's text encoders (build_flow_arch's one-layer stand-ins, on the tiny models' vocabularies) at their
    real depth and vocabulary, on the meta device: shapes without memory, for counting what encoding the prompts holds
    (T5-XXL's encoder: 4.76B parameters). T5's num_layers answers to num_hidden_layers too."""
    full = []
    for encoder in sd.text_encoders:
        config = copy.deepcopy(encoder.config)
        config.num_hidden_layers, config.vocab_size = TEXT_DEPTH[getattr(config, "d_model", None) or config.hidden_size]
        with built_as("meta", dtype):
            full.append(type(encoder)(config))
    return full
