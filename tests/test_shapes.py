"""The shapes world: the grammar round-trips, rendering is deterministic, describe() reads every rendered image exactly
and nearly every blurred, noisy one, the prompt files split the captions, and the tokenizer keeps words whole."""
import itertools
import math
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPTokenizer

from shapes.tokenizer import MAX_TOKENS, build_tokenizer
from shapes.world import (BACKGROUND, BORDER, COLOURS, COUNT_WORDS, MIN_AREA, SHAPES, _components, all_captions,
                          caption, describe, parse_caption, render, sample_batch, score, split_captions, unknown_words)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS_PER_CAPTION = 64  # 48 captions x 64 seeds = 3072 images


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """describe() is a chain of many small tensor ops: spread over 2 threads on a machine whose other core is busy,
    each op waits for that core (measured: 4 ms per image on 2 threads against 0.3 on 1, with another job running;
    0.2 against 0.3 on an idle machine). One thread keeps this file at a few seconds either way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def truth(text):
    count, colour, shape = parse_caption(text)
    return dict(count=count, colour=colour, shape=shape)


@pytest.fixture(scope="module")
def rendered():
    captions = [c for c in all_captions() for _ in range(SEEDS_PER_CAPTION)]
    images = torch.stack([render(*parse_caption(c), seed) for seed, c in enumerate(captions)])
    return images, captions


def blur(images, sigma, noise, seed=0):
    """uint8 images -> float, Gaussian-blurred (separable, edges replicated) plus Gaussian noise, clamped to [0, 1]."""
    r = math.ceil(3 * sigma)
    k = torch.exp(-torch.arange(-r, r + 1.0) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).repeat(3, 1, 1, 1)  # (3, 1, 1, 2r + 1): one filter per channel
    x = images.float() / 255
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k, groups=3)
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.transpose(2, 3), groups=3)
    return (x + noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))).clamp(0, 1)


# -----------------------------------------------------------------------------
# the grammar


def test_captions():
    captions = all_captions()
    assert len(set(captions)) == len(captions) == 48
    assert caption(3, "red", "circle") == "three red circles" and caption(1, "blue", "square") == "a blue square"
    for n, c, s in itertools.product(COUNT_WORDS, COLOURS, SHAPES):
        assert parse_caption(caption(n, c, s)) == (n, c, s)


@pytest.mark.parametrize("text", ["", "a red circles", "two red circle", "five red circles", "one red circle",
                                  "three purple circles", "three red  circles", "Three red circles", "three red",
                                  "three red circles ", "red three circles", "three red hexagons", "a red circle s"])
def test_parse_caption_rejects(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_unknown_words_are_the_words_no_caption_uses():
    assert unknown_words(all_captions()) == []
    assert unknown_words(["a cat", "three red circles", "Two dogs on a red mat"]) == ["cat", "dogs", "on", "mat"]


def test_prompt_files_split_the_captions():
    def read(name):
        with open(os.path.join(ROOT, "prompts", name)) as f:
            return [line.strip() for line in f if line.strip()]
    train, held_out = read("shapes.txt"), read("shapes-eval.txt")
    assert (train, held_out) == split_captions()
    assert sorted(train + held_out) == sorted(all_captions()) and not set(train) & set(held_out)
    assert (len(train), len(held_out)) == (36, 12)
    for part in (train, held_out):
        words = {w for t in part for w in parse_caption(t)}
        assert words == set(COUNT_WORDS) | set(COLOURS) | set(SHAPES)
    for t in held_out:  # every two of an eval caption's words are seen together in training
        for i, j in itertools.combinations(range(3), 2):
            assert any(parse_caption(u)[i] == parse_caption(t)[i] and parse_caption(u)[j] == parse_caption(t)[j]
                       for u in train), (t, i, j)


# -----------------------------------------------------------------------------
# rendering


def test_render_is_deterministic_and_clean():
    a = render(4, "yellow", "triangle", seed=7)
    assert a.dtype == torch.uint8 and a.shape == (3, 64, 64)
    assert torch.equal(a, render(4, "yellow", "triangle", seed=7))
    assert not torch.equal(a, render(4, "yellow", "triangle", seed=8))
    colours = {tuple(p) for p in a.flatten(1).T.tolist()}
    assert colours == {BACKGROUND, COLOURS["yellow"]}  # hard edges: no blends
    on = (a != torch.tensor(BACKGROUND, dtype=torch.uint8)[:, None, None]).any(0)
    assert not on[:BORDER].any() and not on[-BORDER:].any() and not on[:, :BORDER].any() and not on[:, -BORDER:].any()
    with pytest.raises(ValueError):
        render(5, "red", "circle", seed=0)


def test_render_other_sizes():
    images = torch.stack([render(n, "blue", s, seed, size=128) for seed, (n, s) in
                          enumerate(itertools.product(COUNT_WORDS, SHAPES))])
    assert images.shape[-2:] == (128, 128)
    want = [dict(count=n, colour="blue", shape=s) for n, s in itertools.product(COUNT_WORDS, SHAPES)]
    assert describe(images) == want


def test_sample_batch():
    images, captions = sample_batch(64, 0)
    assert images.shape == (64, 3, 64, 64) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    again, same = sample_batch(64, torch.Generator().manual_seed(0))
    assert torch.equal(images, again) and captions == same
    assert len(set(captions)) > 20  # drawn from all 48, not a few
    assert score(describe(images), captions)["all"] == 1.0


# -----------------------------------------------------------------------------
# the evaluator


def test_describe_is_exact_on_rendered_images(rendered):
    images, captions = rendered
    got = describe(images)
    wrong = [(c, d) for c, d in zip(captions, got) if d != truth(c)]
    assert not wrong, f"{len(wrong)} of {len(captions)} wrong, e.g. {wrong[:3]}"
    assert describe(images[:50].float() / 255) == got[:50]  # float input in [0, 1] reads the same


@pytest.mark.parametrize("sigma,noise", [(0.7, 0.03), (1.0, 0.05)])
def test_describe_survives_blur_and_noise(rendered, sigma, noise):
    images, captions = rendered
    every = 3  # a third of the set keeps the test fast
    images, captions = images[::every], captions[::every]
    result = score(describe(blur(images, sigma, noise)), captions)
    assert result["all"] >= 0.98, result


def test_describe_special_cases():
    blank = render(1, "red", "circle", 0)
    blank[:] = torch.tensor(BACKGROUND, dtype=torch.uint8)[:, None, None]
    mixed = blank.clone()
    mixed[:, 5:15, 5:15] = torch.tensor(COLOURS["red"], dtype=torch.uint8)[:, None, None]
    mixed[:, 30:45, 30:45] = torch.tensor(COLOURS["blue"], dtype=torch.uint8)[:, None, None]
    specks = blank.clone()  # a few pixels of noise: below MIN_AREA, so not a shape
    specks[:, 10:13, 10:13] = torch.tensor(COLOURS["green"], dtype=torch.uint8)[:, None, None]
    corners = blank.clone()  # two squares meeting only at a corner: 4-connectivity keeps them two
    corners[:, 10:22, 10:22] = corners[:, 22:34, 22:34] = torch.tensor(COLOURS["red"], dtype=torch.uint8)[:, None, None]
    assert 9 < MIN_AREA
    assert describe(blank[None]) == [dict(count=0, colour=None, shape=None)]  # nothing to label at all
    assert describe(torch.stack([blank, mixed, specks, corners])) == [
        dict(count=0, colour=None, shape=None), dict(count=2, colour=None, shape="square"),
        dict(count=0, colour=None, shape=None), dict(count=2, colour="red", shape="square")]


def test_blends_with_the_background_stay_two_coloured():
    """A blurred edge mixes a colour with the background; the mix must never be nearer to a third colour."""
    palette = {"background": BACKGROUND, **COLOURS}
    for name, colour in COLOURS.items():
        for t in torch.linspace(0, 1, 201).tolist():
            mix = [t * c + (1 - t) * b for c, b in zip(colour, BACKGROUND)]
            nearest = min(palette, key=lambda k: math.dist(palette[k], mix))
            assert nearest in (name, "background"), (name, t, nearest)


def test_components():
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)  # a serpentine: one component 1000+ pixels long
    mask[0, ::2] = True
    mask[0, 1::4, -1] = mask[0, 3::4, 0] = True
    labels = _components(mask)
    assert labels[mask].unique().numel() == 1 and (labels[~mask] == 0).all()
    checker = (torch.arange(64)[:, None] + torch.arange(64)).remainder(2).bool()[None].repeat(2, 1, 1)
    assert _components(checker)[checker].unique().numel() == 2 * 64 * 64 // 2  # diagonal neighbours stay apart


def test_score():
    captions = ["three red circles", "a blue square", "two green triangles", "four yellow circles"]
    descriptions = [truth("three red circles"), dict(count=1, colour="blue", shape="circle"),
                    dict(count=3, colour="green", shape="triangle"), dict(count=0, colour=None, shape=None)]
    assert score(descriptions, captions) == dict(count=0.5, colour=0.75, shape=0.5, all=0.25)


# -----------------------------------------------------------------------------
# the tokenizer


def test_tokenizer(tmp_path):
    tok = build_tokenizer(tmp_path)
    words = {w for c in all_captions() for w in c.split()}
    assert len(words) == 4 + 4 + 2 * 3
    for w in words:
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    captions = all_captions()
    ids = tok(captions + [""], padding="max_length", max_length=MAX_TOKENS, truncation=True).input_ids
    assert all(len(i) == MAX_TOKENS for i in ids)
    for c, i in zip(captions, ids):
        assert i[:5] == [tok.bos_token_id, *tok(c, add_special_tokens=False).input_ids, tok.eos_token_id]
        assert tok.decode(i, skip_special_tokens=True) == c
    assert ids[-1] == [tok.bos_token_id] + [tok.eos_token_id] * (MAX_TOKENS - 1)  # "": start, end, then padding
    assert tok.pad_token_id == tok.eos_token_id
    assert tok.decode(tok("a purple cat").input_ids, skip_special_tokens=True).startswith("a p")  # letters fall back
    loaded = CLIPTokenizer.from_pretrained(tmp_path)  # the saved directory gives the same tokenizer back
    assert loaded.model_max_length == MAX_TOKENS and loaded(captions).input_ids == tok(captions).input_ids
