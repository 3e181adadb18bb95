"""Shared fixtures: the tiny offline Stable Diffusion, and a stock diffusers pipeline around the same weights."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sampler import load_sd  # noqa: E402


@pytest.fixture
def tiny():
    return load_sd("tiny")  # a fresh copy per test (30 ms): tests inject LoRA into it


def pipeline(sd):
    """diffusers' own StableDiffusionPipeline over our components: the reference implementation."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
                                   scheduler=sd.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
