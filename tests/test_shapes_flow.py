"""The shipped rectified-flow shapes model (models/shapes-flow, `python -m shapes --train --flow`): an SD3 in miniature
that loads like any SD3, samples as diffusers' StableDiffusion3Pipeline does, draws the colour it is asked for and
trains with train.py; plus its training code end to end on a few steps, so that the recipe cannot rot."""
import os

import pytest
import torch

from conftest import run_here
from flow import flow_sample
from model import decode, encode_prompts, latent_shape, load_sd
from shapes.evaluate import evaluate
from shapes.tokenizer import MAX_TOKENS, build_t5_tokenizer
from shapes.train_flow import FLOW_DIR, FLOW_SHIFT, train_flow
from shapes.world import RESOLUTION, all_captions


@pytest.fixture(scope="module")
def sd():
    return load_sd("shapes-flow")


def test_shipped_flow_model_loads_as_sd3_and_draws_the_right_colour(sd):
    assert sd.flow and type(sd.unet).__name__ == "SD3Transformer2DModel"
    assert latent_shape(sd, RESOLUTION) == (4, 16, 16) and sd.max_sequence_length == MAX_TOKENS
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(FLOW_DIR) for f in fs
               if ".train" not in d)
    assert size < 10e6, size
    captions = ["a red circle", "two green squares", "three blue triangles", "four yellow circles"] * 2
    results, images = evaluate(sd, captions, n=len(captions), steps=10, batch=8)
    assert images.shape == (8, 3, 64, 64)
    assert results["colour"] >= 0.75, results


def test_flow_sample_is_the_stock_sd3_pipeline_on_the_shipped_model(sd):
    from diffusers import StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(FLOW_DIR, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, *latent_shape(sd, 64), generator=torch.Generator().manual_seed(0))
    prompts = ["three red circles", "a blue square"]
    want = pipe(prompts, latents=noise.clone(), num_inference_steps=6, guidance_scale=7.5, height=64, width=64,
                max_sequence_length=MAX_TOKENS, output_type="pt").images
    with torch.no_grad():
        got = decode(sd, flow_sample(sd, encode_prompts(sd, prompts), encode_prompts(sd, [""] * 2), noise, 6, 7.5))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_t5_tokenizer_reads_each_word_of_the_grammar_as_one_piece(tmp_path):
    from transformers import T5TokenizerFast
    build_t5_tokenizer(tmp_path)
    tokenizer = T5TokenizerFast.from_pretrained(tmp_path)
    for caption in all_captions():
        ids = tokenizer(caption).input_ids
        assert len(ids) == len(caption.split()) + 1 and ids[-1] == tokenizer.eos_token_id, caption
    assert tokenizer("", padding="max_length", max_length=MAX_TOKENS).input_ids == [1] + [0] * 7


def test_flow_training_code_end_to_end_on_a_few_steps(tmp_path):
    out = str(tmp_path / "flow")
    train_flow(out, steps=2, pool=64)
    sd = load_sd(out)
    assert sd.flow and sd.scheduler.config.shift == FLOW_SHIFT and sd.vae.config.shift_factor == 0.0
    latents = flow_sample(sd, encode_prompts(sd, ["a red circle"]), encode_prompts(sd, [""]),
                          torch.randn(1, *latent_shape(sd, 64)), steps=2)
    assert decode(sd, latents).shape == (1, 3, 64, 64)
    assert torch.load(os.path.join(out, ".train", "flow.pt"), weights_only=True)["step"] == 2
    train_flow(out, steps=3, pool=64)  # a stopped run continues from its checkpoint: one more step
    assert torch.load(os.path.join(out, ".train", "flow.pt"), weights_only=True)["step"] == 3


def test_train_py_on_the_flow_model_takes_the_shapes_prompts_and_saves_a_lora_sd3_loads(tmp_path):
    from diffusers import StableDiffusion3Pipeline
    run_here("train.py", "--model", "shapes-flow", "--reward", "compress", "--out", tmp_path / "run", "--steps", 2,
             "--batch-size", 2, "--ddim-steps", 4, "--eval-every", 0, "--eval-n", 2)
    config = (tmp_path / "run" / "config.json").read_text()
    assert "prompts/shapes.txt" in config and "prompts/shapes-eval.txt" in config
    pipe = StableDiffusion3Pipeline.from_pretrained(FLOW_DIR, torch_dtype=torch.float32)
    pipe.load_lora_weights(str(tmp_path / "run" / "lora.safetensors"))
