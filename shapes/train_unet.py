"""Training the shapes model (models/shapes) from scratch, a Stable Diffusion in miniature, and then its counter.

    python -m shapes --train                             # the model in models/shapes (--out elsewhere), from scratch
    python -m shapes --train --counter-only              # only its counter, anew

Every phase checkpoints to out/.train, so an interrupted run picks up where it stopped; docs/shapes.md has what a run
takes and what the shipped model scores.

The model (`load_sd("shapes")`) is Stable Diffusion's classes in miniature (AutoencoderKL 64 px <-> 16x16x4,
CLIPTextModel over the grammar's tokens, UNet2DConditionModel, DDIMScheduler on SD's noise schedule), trained from
scratch on rendered images. Its counter (counter.py's ShapeCounter, the learned reward `shapes-count`) learns from
rendered images and from the model's own samples counted by describe(), as real reward models learn from people's
labels of generated images. train_flow.py trains the rectified-flow sibling on this file's VAE, pool of encoded
renders and optimisation loop.

References: DDPM, Ho et al. 2020 (arXiv:2006.11239); classifier-free guidance, Ho & Salimans 2022
(arXiv:2207.12598); latent diffusion, Rombach et al. 2022 (arXiv:2112.10752).
"""
import copy
import functools
import json
import math
import os
import random
import time

import torch

from shapes.counter import ShapeCounter
from shapes.evaluate import draw
from shapes.tokenizer import MAX_TOKENS, build_tokenizer
from shapes.world import (BACKGROUND, COLOURS, COUNT_WORDS, RESOLUTION, SHAPES, _layout, _mask, describe, sample_batch,
                          score, split_captions)

MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "shapes")
VAE_CONFIG = dict(  # three blocks: 64 px images <-> 16x16x4 latents (SD's VAE has four: 8x smaller latents)
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8,
    sample_size=RESOLUTION)
TEXT_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=MAX_TOKENS)
UNET_CONFIG = dict(  # cross-attention at 8x8 and 4x4, where a shape is a few cells and counting is a global question
    in_channels=4, out_channels=4, block_out_channels=(32, 64, 128), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16)
SCHEDULER_CONFIG = dict(  # SD 1.x's noise schedule and DDIM conventions, so the model samples like SD
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
    set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
CAPTION_DROPOUT = 0.1  # captions replaced by "" in training: the unconditional model classifier-free guidance needs
EMA_DECAY = 0.999  # the shipped UNet and text encoder are exponential moving averages of the trained weights


SAVE_EVERY = 250  # optimisation steps between training checkpoints: a stopped --train resumes from the last one


def _optimise(name, modules, steps, lr, loss_fn, generator, state_dir, after_step=None):
    """AdamW on the parameters of `modules` (a ModuleList) for `steps` steps of loss_fn(step), with a linear warm-up
    and a cosine decay, a progress bar, and a checkpoint in state_dir/name.pt every SAVE_EVERY steps (the modules,
    optimiser, data generator and step), from which a new call continues."""
    from tqdm import tqdm
    params = [p for p in modules.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = min(200, steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    path, start = os.path.join(state_dir, f"{name}.pt"), 0
    if os.path.isfile(path):
        state = torch.load(path, weights_only=True)
        modules.load_state_dict(state["modules"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        generator.set_state(state["generator"])
        start = state["step"]
    for step in tqdm(range(start, steps), initial=start, total=steps, desc=name, dynamic_ncols=True):
        loss_fn(step).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if after_step:
            after_step(step)
        if (step + 1) % SAVE_EVERY == 0 or step + 1 == steps:
            state = dict(modules=modules.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(),
                         generator=generator.get_state(), step=step + 1)
            torch.save(state, path + ".tmp")
            os.replace(path + ".tmp", path)


def _update_ema(ema, live, step):
    """ema's parameters move towards live's after optimisation step `step`; the decay warms up to EMA_DECAY, so that
    the random initial weights fade fast."""
    decay = min(EMA_DECAY, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), live.parameters()):
            e.lerp_(p, 1 - decay)


def train_vae(steps, batch, generator, state_dir, n_scale=512):
    """An AutoencoderKL for rendered images: L1 + MSE reconstruction and a small KL term (as SD's, which keeps the
    latents near N(0, I) in scale but lets them carry detail). Returns it with scaling_factor set to 1 / the std of
    its latents (over `n_scale` renders), the role of SD's 0.18215."""
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(**VAE_CONFIG)

    def loss(step):
        x = sample_batch(batch, generator)[0] * 2 - 1  # (B, 3, 64, 64): the VAE works in [-1, 1], as SD's
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        return (recon - x).abs().mean() + (recon - x).square().mean() + 1e-6 * posterior.kl().mean()

    _optimise("vae", torch.nn.ModuleList([vae]), steps, 1e-3, loss, generator, state_dir)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = vae.encode(sample_batch(n_scale, torch.Generator().manual_seed(0))[0] * 2 - 1).latent_dist.mode()
    vae.register_to_config(scaling_factor=1 / z.std().item())
    return vae


@torch.no_grad()
def encode_pool(vae, n, generator, chunk=256):
    """n rendered training images as scaled latents (n, 4, 16, 16) and their captions: rendering and encoding once
    is cheaper than doing it for every UNet step."""
    latents, captions = [], []
    for i in range(0, n, chunk):
        images, caps = sample_batch(min(chunk, n - i), generator)
        latents.append(vae.encode(images * 2 - 1).latent_dist.mode() * vae.config.scaling_factor)
        captions += caps
    return torch.cat(latents), captions


def train_text_to_image(latents, captions, tokenizer, steps, batch, generator, state_dir):
    """The UNet and the text encoder, from scratch and together: the epsilon objective of DDPM (Ho et al. 2020,
    Eq. 14) on SD's schedule, with captions dropped to "" at random so one model is both conditional and
    unconditional (classifier-free guidance, Ho & Salimans 2022). Returns EMA copies of both."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **TEXT_CONFIG))
    unet = UNet2DConditionModel(sample_size=latents.shape[-1], **UNET_CONFIG)
    models = torch.nn.ModuleList([unet, text_encoder, copy.deepcopy(unet), copy.deepcopy(text_encoder)])
    ema = models[2:].requires_grad_(False)  # checkpointed with the rest: a resumed run keeps its average
    alphas = DDIMScheduler(**SCHEDULER_CONFIG).alphas_cumprod  # (1000,): a_t, the fraction of signal variance at t
    ids = tokenizer(captions + [""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
    ids, empty = ids[:-1], ids[-1]  # (N, MAX_TOKENS): every caption tokenised once

    def loss(step):
        i = torch.randint(len(latents), (batch,), generator=generator)
        x0, tokens = latents[i], ids[i].clone()  # (B, 4, 16, 16), (B, MAX_TOKENS)
        tokens[torch.rand(batch, generator=generator) < CAPTION_DROPOUT] = empty
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(len(alphas), (batch,), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise  # DDPM Eq. 4: the forward process in one jump
        eps = unet(x_t, t, text_encoder(tokens)[0]).sample
        return (eps - noise).square().mean()

    _optimise("unet", models, steps, 1e-3, loss, generator, state_dir,
              after_step=functools.partial(_update_ema, ema, models[:2]))
    return ema[0], ema[1]


def train_counter(steps, batch, generator, state_dir, samples):
    """ShapeCounter, supervised half on rendered images with 0 to MAX_COUNT + 1 shapes of any colours and kinds,
    blurred and noised a little, and half on `samples` = (images uint8 (N, 3, H, W), counts (N,)): the model's own
    samples counted by describe(), flipped left-right at random. A reward model trained only on clean renders reads a
    diffusion model's blobs badly (merged shapes, smears), and fine-tuning climbs exactly those errors; learned
    rewards for real models are trained on the generator's outputs labelled by people (ImageReward, PickScore), and
    describe() plays the people here."""
    counter = ShapeCounter()
    images, counts = samples
    half = batch // 2

    def loss(step):
        rendered, rendered_counts = counting_batch(batch - half, generator)
        i = torch.randint(len(images), (half,), generator=generator)
        flip = torch.rand(half, 1, 1, 1, generator=generator) < 0.5
        drawn = images[i].float() / 255
        drawn = torch.where(flip, drawn.flip(3), drawn)
        return (counter(torch.cat([rendered, drawn])) - torch.cat([rendered_counts, counts[i].float()])).square().mean()

    _optimise("counter", torch.nn.ModuleList([counter]), steps, 2e-3, loss, generator, state_dir)
    return counter.eval().requires_grad_(False)


@torch.no_grad()
def model_samples(sd, captions, n, generator, steps=20, batch=64):
    """n samples of `sd` for captions drawn from `captions`, each batch at a guidance scale drawn from 2 to 10 (a
    range of sharpness and of errors), read by describe(): (images uint8 (n, 3, H, W), counts (n,))."""
    from model import latent_shape
    picks = [captions[i] for i in torch.randint(len(captions), (n,), generator=generator).tolist()]
    noise = torch.randn(n, *latent_shape(sd, RESOLUTION), generator=generator)
    images = torch.cat([draw(sd, picks[i:i + batch], noise[i:i + batch], steps,
                             2 + 8 * torch.rand(1, generator=generator).item(), batch) for i in range(0, n, batch)])
    images = (images * 255).round().to(torch.uint8)
    return images, torch.tensor([d["count"] for d in describe(images)])


def counting_batch(n, generator, size=RESOLUTION):
    """(images (n, 3, size, size) in [0, 1], counts (n,)): shapes of mixed colours and kinds, 0 to 5 of them."""
    counts = torch.randint(len(COUNT_WORDS) + 2, (n,), generator=generator)
    images = []
    for c in counts.tolist():
        seed = int(torch.randint(2 ** 62, (1,), generator=generator))
        rng = random.Random(seed)
        image = torch.tensor(BACKGROUND, dtype=torch.uint8)[:, None, None].repeat(1, size, size)
        for x, y, s in (_layout(c, size, rng) if c else []):
            image[:, y:y + s, x:x + s][:, _mask(rng.choice(SHAPES), s)] = torch.tensor(
                COLOURS[rng.choice(list(COLOURS))], dtype=torch.uint8)[:, None]
        images.append(image)
    images = torch.stack(images).float() / 255
    sigma = 0.3 + 0.7 * torch.rand(n, 1, 1, 1, generator=generator)  # blur of 0.3 to 1 px, as generated images have
    images = _blur(images, sigma) + 0.03 * torch.randn(images.shape, generator=generator)
    return images.clamp(0, 1), counts.float()


def _blur(images, sigma):  # Gaussian blur, one sigma (n, 1, 1, 1) per image, 5x5 taps
    x = torch.arange(-2, 3, dtype=images.dtype)
    k = torch.exp(-x.square() / (2 * sigma.view(-1, 1).square()))
    k = k / k.sum(1, keepdim=True)  # (n, 5)
    n, c, h, w = images.shape
    flat = torch.nn.functional.pad(images, (2, 2, 2, 2), mode="replicate").reshape(1, n * c, h + 4, w + 4)
    kh = k.repeat_interleave(c, 0)[:, None, None, :]  # (n * c, 1, 1, 5)
    flat = torch.nn.functional.conv2d(flat, kh, groups=n * c)
    flat = torch.nn.functional.conv2d(flat, kh.transpose(2, 3), groups=n * c)
    return flat.reshape(n, c, h, w)


def save_model(out, vae, unet, text_encoder, tokenizer):
    """A diffusers-format directory that model.load_sd (and StableDiffusionPipeline.from_pretrained) reads, weights
    in fp16 safetensors (half the size; load_sd casts them to the run's dtype)."""
    from diffusers import DDIMScheduler
    for name, module in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder)):
        module.to(torch.float16).save_pretrained(os.path.join(out, name))
        module.to(torch.float32)
    tokenizer.save_pretrained(os.path.join(out, "tokenizer"))
    DDIMScheduler(**SCHEDULER_CONFIG).save_pretrained(os.path.join(out, "scheduler"))
    index = dict(_class_name="StableDiffusionPipeline", vae=["diffusers", "AutoencoderKL"],
                 unet=["diffusers", "UNet2DConditionModel"], text_encoder=["transformers", "CLIPTextModel"],
                 tokenizer=["transformers", "CLIPTokenizer"], scheduler=["diffusers", "DDIMScheduler"],
                 safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)


def train(out=MODEL_DIR, vae_steps=1500, unet_steps=8000, counter_steps=1500, pool=40000, counter_samples=1536,
          seed=0, counter_only=False, checks=512):
    """The whole model, from nothing: VAE, then UNet + text encoder on a pool of encoded images, saved to `out`; then
    the counter, on renders and on `counter_samples` of the saved model's own images for the training captions.
    Every phase checkpoints to out/.train, so an interrupted run picks up where it stopped. counter_only: keep the
    model in `out` and train its counter afresh. checks: renders for the VAE's latent scale and the counter's check
    (half as many for the VAE's round trip and the counter's check on samples); a smoke run passes fewer."""
    state_dir = os.path.join(out, ".train")
    os.makedirs(state_dir, exist_ok=True)
    t0 = time.time()
    if not counter_only:
        vae = train_vae(vae_steps, 32, torch.Generator().manual_seed(seed), state_dir, checks)
        check = sample_batch(checks // 2, torch.Generator().manual_seed(seed + 1))
        with torch.no_grad():  # the VAE's round trip must keep what describe() reads, or no diffusion model can
            recon = (vae.decode(vae.encode(check[0] * 2 - 1).latent_dist.mode()).sample / 2 + 0.5).clamp(0, 1)
        print(f"vae: {time.time() - t0:.0f} s, describe() on its reconstructions: {score(describe(recon), check[1])}")
        latents, captions = encode_pool(vae, pool, torch.Generator().manual_seed(seed + 2))
        tokenizer = build_tokenizer(os.path.join(state_dir, "tokenizer"))
        unet, text_encoder = train_text_to_image(latents, captions, tokenizer, unet_steps, 64,
                                                 torch.Generator().manual_seed(seed + 3), state_dir)
        save_model(out, vae, unet, text_encoder, tokenizer)
        print(f"unet + text encoder: {time.time() - t0:.0f} s")
    train_and_save_counter(out, counter_steps, counter_samples, seed, state_dir, fresh=counter_only, checks=checks)
    print(f"saved to {out} after {(time.time() - t0) / 60:.1f} minutes")


def train_and_save_counter(out, steps, n_samples, seed, state_dir, fresh, checks=512):
    """The counter phase of train(): samples of the model in `out` (cached in state_dir, redrawn when the UNet
    checkpoint is newer, or when `fresh`), train_counter, its agreement with describe(), out/counter.safetensors."""
    from safetensors.torch import save_file
    from model import load_sd
    samples_path, counter_state, unet_state = (os.path.join(state_dir, name)
                                               for name in ("counter_samples.pt", "counter.pt", "unet.pt"))
    stale = (os.path.isfile(samples_path) and os.path.isfile(unet_state)
             and os.path.getmtime(samples_path) < os.path.getmtime(unet_state))
    if fresh or stale:  # samples of an older UNet, and the counter trained on them, are thrown away
        for path in (samples_path, counter_state):
            if os.path.isfile(path):
                os.remove(path)
    sd = load_sd(out)
    if os.path.isfile(samples_path):
        samples = torch.load(samples_path, weights_only=True)
    else:
        samples = model_samples(sd, split_captions()[0], n_samples, torch.Generator().manual_seed(seed + 6))
        torch.save(samples, samples_path)
    counter = train_counter(steps, 64, torch.Generator().manual_seed(seed + 4), state_dir, samples)
    rendered, rendered_counts = counting_batch(checks, torch.Generator().manual_seed(seed + 5))
    drawn, drawn_counts = model_samples(sd, split_captions()[1], min(checks // 2, n_samples),
                                        torch.Generator().manual_seed(seed + 7))
    with torch.no_grad():
        right = [(counter(x).round() == c).float().mean().item()
                 for x, c in ((rendered, rendered_counts), (drawn.float() / 255, drawn_counts))]
    print(f"counter: rounded count = the true one on {right[0]:.3f} of blurred, noised renders and "
          f"{right[1]:.3f} of the model's samples for the held-out captions (by describe())")
    save_file(counter.state_dict(), os.path.join(out, "counter.safetensors"))
