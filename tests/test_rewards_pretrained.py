"""The rewards built on pretrained models, offline: tiny random-weight models with the real architectures and key
names stand in for the downloads (the loaders take built models, so tests can pass tiny ones)."""
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import types

import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, OwlViTConfig, OwlViTForObjectDetection
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.owlvit.image_processing_pil_owlvit import OwlViTImageProcessorPil

import reward_models
import rewards
from reward_models import (OPENCLIP_VIT_H_14, SOURCES, Aesthetic, AestheticMLP, ClipScore, ObjectCount, Preprocess,
                           RewardLoadError, clip_config_from_openclip, load_aesthetic_mlp, openclip_to_transformers,
                           parse_count, soft_count)
from rewards import load_reward, parse_reward_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAINED = ("aesthetic", "hps", "pickscore", "clip", "count")

# -----------------------------------------------------------------------------
# tiny stand-ins


def char_tokenizer():
    """CLIP's tokenizer over single characters (CLIP's real vocabulary cannot be had offline); <|endoftext|> has the
    largest id, as in CLIP's vocabulary, and pads."""
    chars = "abcdefghijklmnopqrstuvwxyz0123456789!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
    symbols = list(chars) + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "vocab.json"), "w") as f:
            json.dump({s: i for i, s in enumerate(symbols)}, f)
        with open(os.path.join(d, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(d, model_max_length=77)


TOKENIZER = char_tokenizer()
VOCAB = len(TOKENIZER)
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=40, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)


def tiny_clip(projection_dim=16):
    torch.manual_seed(0)
    return CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=projection_dim)).eval()


def tiny_owlvit():
    torch.manual_seed(0)
    config = OwlViTConfig(text_config=TEXT, vision_config={**VISION, "image_size": 64, "patch_size": 16},
                          projection_dim=TEXT["hidden_size"])  # OWL-ViT's class head needs them equal (512 in B/32)
    return OwlViTForObjectDetection(config).eval()


def natural_image(h, w, seed=0):
    """uint8 (3, h, w): sky-like gradients, a few hard-edged discs, mild noise."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.linspace(0, 1, h)[:, None].expand(h, w), torch.linspace(0, 1, w)[None].expand(h, w)
    img = torch.stack([0.3 + 0.5 * y, 0.5 + 0.3 * x, 0.9 - 0.4 * y])
    for _ in range(6):
        colour, (cy, cx) = torch.rand(3, generator=g), torch.rand(2, generator=g)
        r = 0.05 + 0.2 * torch.rand(1, generator=g)
        img = torch.where((y - cy) ** 2 + ((x - cx) * w / h) ** 2 < r ** 2, colour[:, None, None], img)
    img = img + 0.03 * torch.randn(3, h, w, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def images_batch(n=3, h=40, w=48):
    return torch.stack([natural_image(h, w, seed) for seed in range(n)]).float().div(255).requires_grad_(True)


def assert_gradient_reaches_every_image(r, images):
    assert r.shape == (len(images),) and r.dtype == torch.float32 and torch.isfinite(r).all()
    (g,) = torch.autograd.grad(r.sum(), images)
    assert torch.isfinite(g).all() and (g.abs().sum((1, 2, 3)) > 0).all()


# -----------------------------------------------------------------------------
# preprocessing


def processor_error(processor, h, w):
    """|ours - transformers' processor| on a natural-ish h x w image given to both as 8-bit pixels."""
    image = natural_image(h, w)
    ref = processor(images=Image.fromarray(image.permute(1, 2, 0).numpy()), return_tensors="pt").pixel_values
    ours = Preprocess.from_processor(processor)(image[None].float() / 255)
    assert ours.shape == ref.shape
    return (ours - ref).abs()


# The processors resize with PIL, which resizes the width, then the height, storing each pass in 8 bits; that
# rounding, up to half a level per pass (0.5/255/std = 0.0075 after normalising), is the whole difference.
ONE_ROUNDING = 0.5 / 255 / min(reward_models.OPENAI_CLIP_STD) * 1.01


@pytest.mark.parametrize("h, w", [(200, 300), (300, 200), (100, 150), (512, 512)])
def test_preprocess_matches_the_clip_image_processor(h, w):
    processor = CLIPImageProcessorPil()  # the settings of openai/clip-vit-large-patch14 and laion's ViT-H/14
    assert Preprocess.from_processor(processor) == Preprocess(224, (224, 224))
    error = processor_error(processor, h, w)
    assert error.shape == (1, 3, 224, 224)
    assert error.max() < 2.2 * ONE_ROUNDING and error.mean() < 0.6 * ONE_ROUNDING  # both passes rounded


@pytest.mark.parametrize("h, w", [(768, 500), (768, 1000), (500, 768), (1000, 768), (200, 300)])
def test_preprocess_matches_the_owlvit_image_processor(h, w):
    processor = OwlViTImageProcessorPil()  # google/owlvit-base-patch32's: squeezed to 768 x 768, no crop
    error = processor_error(processor, h, w)
    assert error.shape == (1, 3, 768, 768)
    if 768 in (h, w):  # up or down in one direction only: PIL rounds once
        assert error.max() < min(ONE_ROUNDING, 1e-2)
    else:
        assert error.max() < 2.2 * ONE_ROUNDING and error.mean() < 0.6 * ONE_ROUNDING


def test_preprocess_is_differentiable():
    images = images_batch(2, 50, 70)
    out = Preprocess(32, (32, 32))(images)
    assert out.shape == (2, 3, 32, 32)
    (g,) = torch.autograd.grad(out.square().sum(), images)
    assert torch.isfinite(g).all() and (g.abs().sum((1, 2, 3)) > 0).all()


# -----------------------------------------------------------------------------
# clip, pickscore, hps, aesthetic


@pytest.mark.parametrize("use_logit_scale", [False, True])  # clip and hps; pickscore
def test_clip_score_is_transformers_own_image_text_logit(use_logit_scale):
    clip, images, prompts = tiny_clip(), images_batch(), ["a cat", "two dogs on a sofa", "a red apple"]
    r = ClipScore(clip, TOKENIZER, Preprocess(32, (32, 32)), use_logit_scale)(images, prompts)
    assert_gradient_reaches_every_image(r, images)
    ids = TOKENIZER(prompts, padding=True, return_tensors="pt").input_ids
    logits = clip(input_ids=ids, pixel_values=Preprocess(32, (32, 32))(images)).logits_per_image.diagonal()
    torch.testing.assert_close(r, logits if use_logit_scale else logits / clip.logit_scale.exp())


def test_aesthetic_mlp_loads_the_published_state_dict(tmp_path, monkeypatch):
    # the key names and shapes of sac+logos+ava1-l14-linearMSE.pth (= trl-lib/ddpo-aesthetic-predictor's file)
    shapes = {"layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024),
              "layers.2.bias": (128,), "layers.4.weight": (64, 128), "layers.4.bias": (64,),
              "layers.6.weight": (16, 64), "layers.6.bias": (16,), "layers.7.weight": (1, 16), "layers.7.bias": (1,)}
    torch.manual_seed(0)
    state = {k: torch.randn(s) * 0.05 for k, s in shapes.items()}
    torch.save(state, tmp_path / "aesthetic-model.pth")
    monkeypatch.setenv("ALIGNPROP_AESTHETIC_WEIGHTS", str(tmp_path / "aesthetic-model.pth"))
    mlp = load_aesthetic_mlp().eval()  # load_state_dict is strict: same keys, same shapes
    x = torch.randn(5, 768)
    expected = x
    for i in (0, 2, 4, 6, 7):  # no activations: a chain of affine maps
        expected = expected @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    torch.testing.assert_close(mlp(x), expected[:, 0])


def test_aesthetic_reward():
    torch.manual_seed(0)
    reward = Aesthetic(tiny_clip(projection_dim=768), AestheticMLP().eval(), Preprocess(32, (32, 32)))
    images = images_batch()
    assert_gradient_reaches_every_image(reward(images, None), images)


def import_open_clip():
    """open_clip (installed without its dependencies: requirements-dev.txt), or skip. It imports torchvision for
    image transforms and a batch-norm class that these tests do not use; PyPI's torchvision, a CUDA build for one torch
    release, cannot load next to a CPU-only torch, so where it is absent a placeholder stands in during the import."""
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip is not installed: pip install --no-deps open_clip_torch==3.3.0 (requirements-dev.txt)")
    if importlib.util.find_spec("torchvision") is not None:
        import open_clip
        return open_clip

    def attribute(name):  # any attribute of a placeholder is another placeholder class
        if name.startswith("__"):
            raise AttributeError(name)
        return Placeholder(name, (), {})

    class Placeholder(type):
        __getattr__ = staticmethod(lambda name: attribute(name))

    names = ["torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.ops",
             "torchvision.ops.misc"]
    saved = {name: sys.modules.get(name) for name in names + ["timm"]}
    for name in names:
        sys.modules[name] = types.ModuleType(name)
        sys.modules[name].__getattr__ = attribute
    sys.modules.setdefault("timm", None)  # optional in open_clip; a None entry makes `import timm` fail cleanly
    try:
        import open_clip
        return open_clip
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


TINY_OPENCLIP_VISION = {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8}


def test_openclip_state_dict_maps_onto_transformers_clip():
    open_clip = import_open_clip()
    cfg = {"embed_dim": 16, "vision_cfg": TINY_OPENCLIP_VISION,
           "text_cfg": {"context_length": 12, "vocab_size": 50, "width": 24, "heads": 4, "layers": 2}}
    torch.manual_seed(0)
    reference = open_clip.model.CLIP(**cfg).eval()
    with torch.no_grad():  # away from the init (LayerNorms at 1 and 0, ...), so every tensor's place matters
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = CLIPModel(clip_config_from_openclip(cfg)).eval()
    ours.load_state_dict(openclip_to_transformers(reference.state_dict()))  # strict: every key, every shape

    images = torch.randn(3, 3, 32, 32)
    # OpenCLIP's tokens: start-of-text (vocab - 2), words, end-of-text (vocab - 1, the largest id), zeros. OpenCLIP
    # pools at the largest id, transformers at the first end-of-text id: the same position.
    g = torch.Generator().manual_seed(1)
    tokens = torch.zeros(3, 12, dtype=torch.long)
    for i, n in enumerate((3, 7, 10)):
        tokens[i, 0], tokens[i, n + 1] = 48, 49
        tokens[i, 1:n + 1] = torch.randint(1, 48, (n,), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(reward_models.image_embedding(ours, images),
                                   reference.encode_image(images, normalize=True), atol=1e-5, rtol=1e-4)
        text = torch.nn.functional.normalize(ours.text_projection(ours.text_model(input_ids=tokens).pooler_output))
        torch.testing.assert_close(text, reference.encode_text(tokens, normalize=True), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours.logit_scale, reference.logit_scale)


def test_openclip_vit_h_14_maps_onto_transformers_clip_at_full_size():
    open_clip = import_open_clip()
    with torch.device("meta"):  # shapes only: no memory, no time
        reference = open_clip.model.CLIP(**OPENCLIP_VIT_H_14)
        ours = CLIPModel(clip_config_from_openclip(OPENCLIP_VIT_H_14))
    converted = {k: v.shape for k, v in openclip_to_transformers(reference.state_dict()).items()}
    assert converted == {k: v.shape for k, v in ours.state_dict().items()}
    assert sum(v.numel() for v in ours.state_dict().values()) > 980e6  # ViT-H/14 + its text tower: ~986M


# -----------------------------------------------------------------------------
# count


@pytest.mark.parametrize("prompt, expected", [
    ("three apples on a table", (3, "apple")),
    ("3 apples on a table", (3, "apple")),
    ("one apple", (1, "apple")),
    ("a cat sitting on a sofa", (1, "cat")),
    ("an owl on a branch", (1, "owl")),
    ("A photo of an owl.", (1, "owl")),
    ("a photo of four red balloons", (4, "balloon")),
    ("two dogs playing in a park", (2, "dog")),
    ("three sleeping cats", (3, "cat")),
    ("three cars parked on a street", (3, "car")),
    ("a dog and two cats", (2, "cat")),
    ("six cherries in a bowl", (6, "cherry")),
    ("five glasses of water", (5, "glass")),
    ("four boxes", (4, "box")),
    ("two peaches", (2, "peach")),
    ("two mice eating cheese", (2, "mouse")),
    ("three people on a bench", (3, "person")),
    ("six sheep in a field", (6, "sheep")),
    ("4 cookies on a plate", (4, "cookie")),
    ("12 eggs", (12, "egg")),
    ("Two Hot-Air Balloons, over a city", (2, "balloon")),
    ("a blue square", (1, "square")),  # the shapes world's captions
    ("four yellow triangles", (4, "triangle")),
])
def test_parse_count(prompt, expected):
    assert parse_count(prompt) == expected


@pytest.mark.parametrize("prompt", ["cats on a sofa", "the sky at night", "", "two", "a photo of"])
def test_parse_count_rejects_prompts_without_a_count(prompt):
    with pytest.raises(ValueError, match="no object"):
        parse_count(prompt)


def test_count_prompts():
    with open(os.path.join(ROOT, "prompts", "count.txt")) as f:
        prompts = [line.strip() for line in f if line.strip()]
    assert 40 <= len(prompts) <= 60 and len(set(prompts)) == len(prompts)
    parsed = [parse_count(p) for p in prompts]
    assert {n for n, _ in parsed} == {1, 2, 3, 4, 5, 6}
    assert any(p.split()[0].isdigit() for p in prompts) and any(p.split()[0] in ("a", "an") for p in prompts)
    assert len({noun for _, noun in parsed}) >= 30
    for p, (n, noun) in zip(prompts, parsed):
        words = p.split()  # the noun is a word of the prompt, or its singular: the detector's query
        assert noun.isalpha() and noun in words + [reward_models.singular(w) for w in words], p


def test_soft_count_counts_confident_boxes():
    background = math.log(1e-3 / (1 - 1e-3))  # OWL-ViT's typical score for an empty box
    for k in range(5):
        logits = torch.full((576,), background)
        logits[:k] = math.log(0.1 / 0.9) + 1.5  # 1.5 logits above the threshold
        assert abs(soft_count(logits).item() - k) < 0.02 * (k + 1)
    at_threshold = torch.full((1,), math.log(0.1 / 0.9))
    assert soft_count(at_threshold).item() == pytest.approx(0.5)


def test_count_reward():
    reward = ObjectCount(tiny_owlvit(), TOKENIZER, Preprocess((64, 64)))
    images, prompts = images_batch(), ["three apples on a table", "a cat", "2 dogs"]
    r = reward(images, prompts)
    assert_gradient_reaches_every_image(r, images)
    counts = reward.counts(images, ["apple", "cat", "dog"])
    torch.testing.assert_close(r, -(counts - torch.tensor([3.0, 1.0, 2.0])).abs())
    with pytest.raises(ValueError, match="no object count"):
        reward(images[:1], ["cats on a sofa"])


# -----------------------------------------------------------------------------
# specs and mixes


def test_parse_reward_spec():
    assert parse_reward_spec("aesthetic") == [("aesthetic", 1.0)]
    assert parse_reward_spec("aesthetic,compress:0.5") == [("aesthetic", 1.0), ("compress", 0.5)]
    assert parse_reward_spec(" hps : 2 , count:-1e-1 ") == [("hps", 2.0), ("count", -0.1)]
    assert parse_reward_spec("compress,clip:0") == [("compress", 1.0), ("clip", 0.0)]
    for spec, message in [("nope", "unknown reward 'nope'; valid: compress"), ("aesthetic,", "unknown reward ''"),
                          ("compress:x", "bad weight 'x'"), ("compress:nan", "bad weight"), ("compress:", "bad weight"),
                          ("compress,compress:2", "twice"), ("compress:0", "nothing to train")]:
        with pytest.raises(ValueError, match=message):
            parse_reward_spec(spec)


def test_a_mix_is_the_weighted_sum_and_logs_each_reward(monkeypatch):
    clip = tiny_clip()
    monkeypatch.setitem(rewards.REWARDS, "tinyclip",
                        lambda device, dtype: ClipScore(clip, TOKENIZER, Preprocess(32, (32, 32))))
    fn = load_reward("tinyclip,compress:0.5,incompress:0")
    images, prompts = images_batch(), ["a cat", "a dog", "an owl"]
    r = fn(images, prompts)
    assert set(fn.components) == {"tinyclip", "compress", "incompress"}
    assert fn.weights == {"tinyclip": 1.0, "compress": 0.5, "incompress": 0.0}
    assert all(c.shape == (3,) and not c.requires_grad for c in fn.components.values())
    torch.testing.assert_close(r, fn.components["tinyclip"] + 0.5 * fn.components["compress"])
    torch.testing.assert_close(fn.components["incompress"], -fn.components["compress"])  # computed, weight 0
    assert_gradient_reaches_every_image(r, images)


def test_a_single_reward_has_its_component():
    fn, images = load_reward("compress"), torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(fn(images, None), -rewards.jpeg_kilobytes(images))
    assert list(fn.components) == ["compress"]


# -----------------------------------------------------------------------------
# loading without the weights


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """An empty Hugging Face cache and a hub that refuses connections (port 9, discard): hermetic, even online."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    for env, _, _ in SOURCES.values():
        monkeypatch.delenv(env, raising=False)


@pytest.mark.parametrize("name", PRETRAINED)
def test_missing_weights_fail_fast_with_a_one_line_message(name, no_weights):
    t0 = time.time()
    with pytest.raises(RewardLoadError) as e:
        load_reward(name)
    message = str(e.value)
    assert time.time() - t0 < 10
    assert "\n" not in message and message.startswith(f"reward {name!r}: ")
    assert any(repo in message and env in message for env, repo, _ in SOURCES.values())
    assert "hub is unreachable" in message


@pytest.fixture
def local_weights(tmp_path, monkeypatch, no_weights):
    """Tiny models saved where the environment variables point: the loaders run end to end, offline."""
    def save(env, *objects):
        path = tmp_path / env
        for obj in objects:
            obj.save_pretrained(path)
        monkeypatch.setenv(env, str(path))

    clip_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    save("ALIGNPROP_CLIP_L14", tiny_clip(projection_dim=768), TOKENIZER, clip_processor)
    save("ALIGNPROP_CLIP_H14", TOKENIZER, clip_processor)  # laion's ViT-H/14: tokenizer and image settings only
    save("ALIGNPROP_PICKSCORE", tiny_clip())
    save("ALIGNPROP_OWLVIT", tiny_owlvit(), TOKENIZER,
         OwlViTImageProcessorPil(size={"height": 64, "width": 64}, crop_size={"height": 64, "width": 64}))
    torch.save(AestheticMLP().state_dict(), tmp_path / "aesthetic-model.pth")
    monkeypatch.setenv("ALIGNPROP_AESTHETIC_WEIGHTS", str(tmp_path / "aesthetic-model.pth"))
    reward_models.from_hub.cache_clear()  # it keeps models per process, keyed by source: not by where they came from
    yield tmp_path
    reward_models.from_hub.cache_clear()


@pytest.mark.parametrize("name", ["aesthetic", "pickscore", "clip", "count"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loaders_end_to_end(name, dtype, local_weights):
    fn = load_reward(name, "cpu", dtype)
    (_, _, reward), = fn.terms
    assert all(not p.requires_grad for p in reward.parameters()) and not any(m.training for m in reward.modules())
    assert {p.dtype for p in reward.parameters()} == {dtype}
    images, prompts = images_batch(), ["three apples on a table", "a cat", "2 dogs"]
    assert_gradient_reaches_every_image(fn(images, prompts), images)


def test_hps_loads_an_openclip_checkpoint(local_weights, monkeypatch):
    """The HPSv2 loader end to end, on a tiny OpenCLIP checkpoint saved as HPSv2's are ({"state_dict": ...}): its
    reward is OpenCLIP's own cosine of image and prompt."""
    open_clip = import_open_clip()
    cfg = {"embed_dim": 16, "vision_cfg": TINY_OPENCLIP_VISION,
           "text_cfg": {"context_length": 40, "vocab_size": VOCAB, "width": 32, "heads": 4, "layers": 2}}
    torch.manual_seed(0)
    reference = open_clip.model.CLIP(**cfg).eval()
    torch.save({"state_dict": reference.state_dict()}, local_weights / "HPS_v2.1_compressed.pt")
    monkeypatch.setenv("ALIGNPROP_HPS_WEIGHTS", str(local_weights / "HPS_v2.1_compressed.pt"))
    monkeypatch.setattr(reward_models, "OPENCLIP_VIT_H_14", cfg)  # the tiny architecture in place of ViT-H/14
    images, prompts = images_batch(), ["a cat", "two dogs on a sofa", "a red apple"]
    r = load_reward("hps")(images, prompts)
    assert_gradient_reaches_every_image(r, images)
    with torch.no_grad():
        tokens = TOKENIZER(prompts, padding="max_length", max_length=40, return_tensors="pt").input_ids
        image = reference.encode_image(Preprocess(32, (32, 32))(images), normalize=True)
        torch.testing.assert_close(r, (image * reference.encode_text(tokens, normalize=True)).sum(-1))


def test_a_bad_local_path_is_named(no_weights, monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGNPROP_HPS_WEIGHTS", "/nonexistent/HPS_v2.1_compressed.pt")
    with pytest.raises(RewardLoadError, match="ALIGNPROP_HPS_WEIGHTS=/nonexistent/HPS_v2.1_compressed.pt: no such"):
        load_reward("hps")
    (tmp_path / "model.pth").write_text("not a checkpoint")
    monkeypatch.setenv("ALIGNPROP_AESTHETIC_WEIGHTS", str(tmp_path / "model.pth"))
    with pytest.raises(RewardLoadError, match="^reward 'aesthetic': ALIGNPROP_AESTHETIC_WEIGHTS=.*: cannot load it: "):
        load_reward("aesthetic")


def test_sample_py_reports_reward_errors_in_one_line(tmp_path):
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"")  # never read: the reward is checked first
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_ENDPOINT="http://127.0.0.1:9")
    env = {k: v for k, v in env.items() if not k.startswith("ALIGNPROP_")}
    for spec, expected in [("compress,nope", "error: unknown reward 'nope'"),
                           ("compress,aesthetic:0.1", "error: reward 'aesthetic': aesthetic-model.pth from hub")]:
        p = subprocess.run([sys.executable, "sample.py", "--lora", str(lora), "--reward", spec], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and p.stderr.startswith(expected) and "Traceback" not in p.stderr, p.stderr
