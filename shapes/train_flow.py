"""Training the rectified-flow sibling (models/shapes-flow) from scratch: an SD3 in miniature, in the same world.

    python -m shapes --train --flow                      # into models/shapes-flow (--out elsewhere; --unet-steps)
    python -m shapes --eval --model shapes-flow          # describe()'s verdict on it

The model (`load_sd("shapes-flow")`) is SD3's classes in miniature on the UNet model's VAE (frozen: the same latents)
and renders: SD3Transformer2DModel (an MMDiT), two CLIPTextModelWithProjection and a T5EncoderModel over the grammar's
words, trained by rectified flow, sampled by flow.py (or diffusers' StableDiffusion3Pipeline). It resumes from
out/.train as the UNet model does (train_unet.py, whose pool of encoded renders and optimisation loop it reuses);
docs/shapes.md has what a run takes and what the shipped model scores.

References: rectified flow, Liu et al. 2022 (arXiv:2209.03003); SD3, Esser et al. 2024 (arXiv:2403.03206).
"""
import copy
import functools
import json
import os
import time

import torch

from shapes.tokenizer import MAX_TOKENS, build_t5_tokenizer, build_tokenizer
from shapes.train_unet import CAPTION_DROPOUT, MODEL_DIR, _optimise, _update_ema, encode_pool

FLOW_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "shapes-flow")
FLOW_TEXT_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=MAX_TOKENS, projection_dim=32)  # CLIP-L's and CLIP-G's stand-ins
T5_CONFIG = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=8)
FLOW_CONFIG = dict(  # an MMDiT: 16x16x4 latents in 2x2 patches (64 image tokens) beside 8 CLIP + 8 T5 text tokens
    patch_size=2, in_channels=4, out_channels=4, num_layers=6, attention_head_dim=16, num_attention_heads=6,
    joint_attention_dim=T5_CONFIG["d_model"], caption_projection_dim=96, qk_norm="rms_norm",  # SD3.5's QK norm
    pooled_projection_dim=2 * FLOW_TEXT_CONFIG["projection_dim"], pos_embed_max_size=16)
FLOW_SHIFT = 1.0  # SD3's timestep shift (3.0 at 1024 px) grows with the latent's size; 16x16x4 latents need none


def train_flow_text_to_image(latents, captions, tokenizer, t5_tokenizer, steps, batch, generator, state_dir):
    """SD3's parts from scratch and together: the MMDiT, two CLIP text encoders with projections and a T5 encoder,
    trained by rectified flow (SD3, Esser et al. 2024, Eq. 1-3): x_s = (1 - s) x0 + s eps, the transformer regresses
    the velocity eps - x0 at timestep 1000 s, s drawn logit-normal (their best, rf/lognorm(0, 1): sigmoid of a standard
    normal, most draws mid-path where the velocity is hardest to tell). The conditioning is model.encode_prompts' for
    SD3, so what is trained reads prompts as StableDiffusion3Pipeline feeds them; captions drop to "" as for the UNet.
    Returns EMA copies (transformer, text_encoder, text_encoder_2, text_encoder_3)."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    from model import SD, encode_prompts
    torch.manual_seed(0)
    clip = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **FLOW_TEXT_CONFIG)
    transformer = SD3Transformer2DModel(sample_size=latents.shape[-1], **FLOW_CONFIG)
    encoders = [CLIPTextModelWithProjection(clip), CLIPTextModelWithProjection(clip),
                T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), pad_token_id=0, eos_token_id=1,
                                        decoder_start_token_id=0, **T5_CONFIG))]
    models = torch.nn.ModuleList([transformer, *encoders])
    models.extend(copy.deepcopy(m) for m in list(models))
    ema = models[4:].requires_grad_(False)
    sd = SD(unet=transformer, vae=None, text_encoder=encoders[0], tokenizer=tokenizer, scheduler=None,
            text_encoder_2=encoders[1], tokenizer_2=tokenizer, text_encoder_3=encoders[2], tokenizer_3=t5_tokenizer,
            max_sequence_length=MAX_TOKENS)

    def loss(step):
        i = torch.randint(len(latents), (batch,), generator=generator)
        drop = (torch.rand(batch, generator=generator) < CAPTION_DROPOUT).tolist()
        x0 = latents[i]  # (B, 4, 16, 16)
        context = encode_prompts(sd, ["" if d else captions[j] for j, d in zip(i.tolist(), drop)])  # (B, 17, 64)
        noise = torch.randn(x0.shape, generator=generator)
        s = torch.sigmoid(torch.randn(batch, generator=generator)).view(-1, 1, 1, 1)  # logit-normal (0, 1)
        x_s = (1 - s) * x0 + s * noise  # the straight path from data to noise
        v = transformer(x_s, context[:, :-1], context[:, -1, :FLOW_CONFIG["pooled_projection_dim"]],
                        s.flatten() * 1000).sample
        return (v - (noise - x0)).square().mean()

    _optimise("flow", models, steps, 1e-3, loss, generator, state_dir,
              after_step=functools.partial(_update_ema, ema, models[:4]))
    return list(ema)


def save_flow_model(out, vae, transformer, encoders, tokenizer, t5_tokenizer):
    """A diffusers StableDiffusion3Pipeline directory (model.load_sd reads it; so does the stock pipeline, given
    max_sequence_length=8), fp16 safetensors. The VAE is the UNet model's with SD3's shift (0: its latents are scaled
    only)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    vae = copy.deepcopy(vae)
    vae.register_to_config(shift_factor=0.0)
    for name, module in (("vae", vae), ("transformer", transformer), ("text_encoder", encoders[0]),
                         ("text_encoder_2", encoders[1]), ("text_encoder_3", encoders[2])):
        module.to(torch.float16).save_pretrained(os.path.join(out, name))
        module.to(torch.float32)
    for name, tok in (("tokenizer", tokenizer), ("tokenizer_2", tokenizer), ("tokenizer_3", t5_tokenizer)):
        tok.save_pretrained(os.path.join(out, name))
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT).save_pretrained(
        os.path.join(out, "scheduler"))
    index = dict(_class_name="StableDiffusion3Pipeline", vae=["diffusers", "AutoencoderKL"],
                 transformer=["diffusers", "SD3Transformer2DModel"],
                 text_encoder=["transformers", "CLIPTextModelWithProjection"],
                 tokenizer=["transformers", "CLIPTokenizer"],
                 text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                 tokenizer_2=["transformers", "CLIPTokenizer"], text_encoder_3=["transformers", "T5EncoderModel"],
                 tokenizer_3=["transformers", "T5TokenizerFast"],
                 scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"], image_encoder=[None, None],
                 feature_extractor=[None, None])
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)


def train_flow(out=FLOW_DIR, steps=8000, pool=40000, seed=0, vae_from=MODEL_DIR):
    """The flow model: the shapes model's VAE (models/shapes, frozen: the same latents, so the two models differ in
    the denoiser and its objective only), the same pool of encoded renders (the same seed), then the transformer and
    text encoders; checkpoints in out/.train, so an interrupted run picks up where it stopped."""
    from diffusers import AutoencoderKL
    state_dir = os.path.join(out, ".train")
    os.makedirs(state_dir, exist_ok=True)
    t0 = time.time()
    vae = AutoencoderKL.from_pretrained(os.path.join(vae_from, "vae"), torch_dtype=torch.float32).eval()
    latents, captions = encode_pool(vae, pool, torch.Generator().manual_seed(seed + 2))
    print(f"pool of {pool} encoded renders: {time.time() - t0:.0f} s")
    tokenizer = build_tokenizer(os.path.join(state_dir, "tokenizer"))
    t5_tokenizer = build_t5_tokenizer(os.path.join(state_dir, "tokenizer_3"))
    transformer, *encoders = train_flow_text_to_image(latents, captions, tokenizer, t5_tokenizer, steps, 64,
                                                      torch.Generator().manual_seed(seed + 3), state_dir)
    save_flow_model(out, vae, transformer, encoders, tokenizer, t5_tokenizer)
    print(f"saved to {out} after {(time.time() - t0) / 60:.1f} minutes")
