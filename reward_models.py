"""Learned rewards: image (and prompt) scorers from the Hugging Face hub, each a torch module that the gradient
passes through, and where their weights come from. rewards.py registers them under these names:

  aesthetic   the LAION aesthetic predictor v2 (github.com/christophschuhmann/improved-aesthetic-predictor), the reward
              of DDPO and AlignProp: an MLP on the L2-normalised CLIP ViT-L/14 image embedding, fitted to human ratings
              (SAC, LAION-Logos, AVA) on a 1-10 scale. Downloads openai/clip-vit-large-patch14 (1.7 GB) and the MLP
              sac+logos+ava1-l14-linearMSE.pth (3.7 MB; trl-lib/ddpo-aesthetic-predictor, file aesthetic-model.pth).
  hps         Human Preference Score v2.1 (Wu et al. 2023, arXiv:2306.09341): cosine of image and prompt under an
              OpenCLIP ViT-H/14 fine-tuned on 798k human choices between generated images, about 0.2-0.35. Downloads
              xswu/HPSv2, file HPS_v2.1_compressed.pt (~2 GB), whose OpenCLIP state dict is renamed into a transformers
              CLIPModel here (no open_clip at run time), and the tokenizer and image settings of
              laion/CLIP-ViT-H-14-laion2B-s32B-b79K (a few MB, not its weights).
  pickscore   PickScore v1 (Kirstain et al. 2023, arXiv:2305.01569): logit_scale * cosine (about 15-25) of image and
              prompt under a CLIP ViT-H/14 fine-tuned on Pick-a-Pic's human preferences. Downloads
              yuvalkirstain/PickScore_v1 (3.9 GB) and the laion tokenizer and image settings above.
  clip        cosine of image and prompt under CLIP ViT-L/14 (Radford et al. 2021, arXiv:2103.00020). Downloads
              openai/clip-vit-large-patch14 (1.7 GB; shared with aesthetic in a mix).
  count       minus |soft count - n| for prompts that ask for n objects ("three apples on a table", prompts/count.txt,
              see parse_count): the soft count of the open-vocabulary detector OWL-ViT (Minderer et al. 2022,
              arXiv:2205.06230) queried with "a photo of a <noun>". Downloads google/owlvit-base-patch32 (0.6 GB).

Every model is frozen, in eval mode and in the run's dtype; images reach it through a torch copy of its image
processor (Preprocess: resize, crop, normalise), so the gradient reaches the pixels. Weights are downloaded from the
hub on first use and cached there (~/.cache/huggingface). Without network, a reward missing from that cache raises
RewardLoadError with a one-line message, in seconds. To use a local copy instead (a file, or a directory from `hf
download REPO --local-dir DIR`), set the variable in SOURCES below: ALIGNPROP_AESTHETIC_WEIGHTS,
ALIGNPROP_HPS_WEIGHTS (also takes HPS_v2_compressed.pt, v2.0), ALIGNPROP_CLIP_L14, ALIGNPROP_CLIP_H14,
ALIGNPROP_PICKSCORE, ALIGNPROP_OWLVIT.
"""
import functools
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import hub_reachable


class RewardLoadError(Exception):
    """A reward's weights could not be had; str(e) is one line that says how to provide them."""


# -----------------------------------------------------------------------------
# image preprocessing, in torch

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's pixel statistics (Radford et al. 2021), which every
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)  # model here was trained with


@dataclass
class Preprocess:
    """A transformers CLIP/OWL-ViT image processor's steps in torch: bicubic antialiased resize (`size` an int: the
    shortest side, aspect kept; a pair: (height, width)), centre crop to `crop` (height, width) if set, normalise."""
    size: int | tuple
    crop: tuple | None = None
    mean: tuple = OPENAI_CLIP_MEAN
    std: tuple = OPENAI_CLIP_STD

    @classmethod
    def from_processor(cls, p):
        """The settings of a transformers image processor (dicts in transformers 4, SizeDicts in 5)."""
        get = lambda d, key: d.get(key) if isinstance(d, dict) else getattr(d, key, None)  # noqa: E731
        size = get(p.size, "shortest_edge") or (get(p.size, "height"), get(p.size, "width"))
        crop = (get(p.crop_size, "height"), get(p.crop_size, "width")) if p.do_center_crop else None
        return cls(size, crop, tuple(p.image_mean), tuple(p.image_std))

    def __call__(self, images):
        x = images.float()
        H, W = x.shape[-2:]
        if isinstance(self.size, int):  # the long side as transformers computes it: truncated
            long = int(self.size * max(H, W) / min(H, W))
            h, w = (self.size, long) if H <= W else (long, self.size)
        else:
            h, w = self.size
        # PIL resizes the width, then the height, and stores each pass in 8 bits, so the bicubic overshoot at a hard
        # edge is clipped before the second pass; clamping there too brings us from 0.12 to one 8-bit level of the
        # processor at such edges. torch's antialiased bicubic is PIL's filter (Keys, a = -0.5).
        for size in ((H, w), (h, w)):
            if size != tuple(x.shape[-2:]):
                x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        if self.crop:
            top, left = (h - self.crop[0]) // 2, (w - self.crop[1]) // 2  # rounded down, as transformers does
            x = x[..., top:top + self.crop[0], left:left + self.crop[1]]
        return (x - x.new_tensor(self.mean)[:, None, None]) / x.new_tensor(self.std)[:, None, None]


# -----------------------------------------------------------------------------
# CLIP scores: clip, hps, pickscore, aesthetic


def _token_ids(tokenizer, texts, max_length, device):
    # padded to the model's full length, as OpenCLIP's tokenizer does; with CLIP's causal text encoder the padding
    # cannot change the pooled (end-of-text) token
    return tokenizer(list(texts), padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def image_embedding(clip, pixels):
    """L2-normalised projected image embedding of a transformers CLIPModel (through its towers: the return type of
    get_image_features changed in transformers 5)."""
    return F.normalize(clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output), dim=-1)


def text_embedding(clip, tokenizer, texts, device):
    ids = _token_ids(tokenizer, texts, clip.config.text_config.max_position_embeddings, device)
    return F.normalize(clip.text_projection(clip.text_model(input_ids=ids).pooler_output), dim=-1)


class ClipScore(nn.Module):
    """cos(image, prompt) under a transformers CLIPModel, times its logit_scale.exp() if use_logit_scale (PickScore's
    score is the logit it was trained on; HPSv2's and CLIP's are the plain cosine)."""

    def __init__(self, clip, tokenizer, preprocess, use_logit_scale=False):
        super().__init__()
        self.clip, self.tokenizer, self.preprocess, self.use_logit_scale = clip, tokenizer, preprocess, use_logit_scale

    def forward(self, images, prompts):
        image = image_embedding(self.clip, self.preprocess(images).to(self.clip.logit_scale.dtype))
        with torch.no_grad():  # the prompts are given: no graph through the text tower
            text = text_embedding(self.clip, self.tokenizer, prompts, images.device)
        scale = self.clip.logit_scale.exp() if self.use_logit_scale else 1
        return (scale * (image * text).sum(-1)).float()


class AestheticMLP(nn.Module):
    """The aesthetic predictor's head, layer for layer as published, so that its state dict loads as it is (keys
    layers.0, .2, .4, .6, .7). It has no activations (the "linear" in linearMSE: the original's ReLUs are commented
    out) and its Dropouts are identity in eval mode, so it is an affine map of the embedding."""

    def __init__(self, dim=768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, embedding):
        return self.layers(embedding).squeeze(-1)


class Aesthetic(nn.Module):
    """The predicted human aesthetic rating (1-10) of each image; the prompts are ignored."""

    def __init__(self, clip, mlp, preprocess):
        super().__init__()
        self.clip, self.mlp, self.preprocess = clip, mlp, preprocess

    def forward(self, images, prompts=None):
        embedding = image_embedding(self.clip, self.preprocess(images).to(self.clip.logit_scale.dtype))
        return self.mlp(embedding).float()


# -----------------------------------------------------------------------------
# OpenCLIP -> transformers, for HPSv2

# open_clip's model_configs/ViT-H-14.json: the architecture HPSv2 fine-tunes (from laion2B-s32B-b79K)
OPENCLIP_VIT_H_14 = dict(
    embed_dim=1024,
    vision_cfg=dict(image_size=224, layers=32, width=1280, head_width=80, patch_size=14),
    text_cfg=dict(context_length=77, vocab_size=49408, width=1024, heads=16, layers=24))


def clip_config_from_openclip(cfg):
    """A transformers CLIPConfig for an OpenCLIP model config dict (open_clip's model_configs/*.json format; plain ViT
    towers, no layer scale, no custom text tower)."""
    from transformers import CLIPConfig
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"  # OpenAI's weights use QuickGELU, OpenCLIP's own nn.GELU
    vision = dict(hidden_size=v["width"], intermediate_size=int(v["width"] * v.get("mlp_ratio", 4.0)),
                  num_hidden_layers=v["layers"], num_attention_heads=v["width"] // v.get("head_width", 64),
                  image_size=v["image_size"], patch_size=v["patch_size"], hidden_act=act)
    text = dict(vocab_size=t["vocab_size"], hidden_size=t["width"],
                intermediate_size=int(t["width"] * t.get("mlp_ratio", 4.0)), num_hidden_layers=t["layers"],
                num_attention_heads=t["heads"], max_position_embeddings=t["context_length"],
                hidden_act=act, pad_token_id=0,  # OpenCLIP pads with 0
                # CLIP's vocabulary ends with <|startoftext|>, <|endoftext|>. OpenCLIP pools the text at the largest
                # token id, transformers at the first eos_token_id: both are the end-of-text token.
                bos_token_id=t["vocab_size"] - 2, eos_token_id=t["vocab_size"] - 1)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg["embed_dim"])


OPENCLIP_TO_TRANSFORMERS = [  # (OpenCLIP state-dict name, transformers CLIPModel name) regexes, applied in turn
    (r"^visual\.transformer\.resblocks\.", "vision_model.encoder.layers."),
    (r"^transformer\.resblocks\.", "text_model.encoder.layers."),
    (r"\.attn\.out_proj\.", ".self_attn.out_proj."),
    (r"\.ln_1\.", ".layer_norm1."),
    (r"\.ln_2\.", ".layer_norm2."),
    (r"\.mlp\.c_fc\.", ".mlp.fc1."),
    (r"\.mlp\.c_proj\.", ".mlp.fc2."),
    (r"^visual\.conv1\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual\.class_embedding$", "vision_model.embeddings.class_embedding"),
    (r"^visual\.positional_embedding$", "vision_model.embeddings.position_embedding.weight"),
    (r"^visual\.ln_pre\.", "vision_model.pre_layrnorm."),  # sic, transformers' spelling
    (r"^visual\.ln_post\.", "vision_model.post_layernorm."),
    (r"^visual\.proj$", "visual_projection.weight"),
    (r"^token_embedding\.", "text_model.embeddings.token_embedding."),
    (r"^positional_embedding$", "text_model.embeddings.position_embedding.weight"),
    (r"^ln_final\.", "text_model.final_layer_norm."),
    (r"^text_projection$", "text_projection.weight"),
]


def openclip_to_transformers(state):
    """An OpenCLIP CLIP state dict (ViT towers) in transformers' CLIPModel names. Beyond renaming: each attention's
    fused input projection in_proj_{weight,bias} (q, k, v stacked) splits into q_proj, k_proj, v_proj, and the two
    projection matrices, which OpenCLIP applies as x @ P, become nn.Linear weights P^T."""
    out = {}
    for name, value in state.items():
        name = name.removeprefix("module.")  # saved from DistributedDataParallel
        if name.endswith("attn_mask"):  # the causal mask, a constant that transformers builds itself
            continue
        if name in ("visual.proj", "text_projection"):
            value = value.t()
        for pattern, new in OPENCLIP_TO_TRANSFORMERS:
            name = re.sub(pattern, new, name)
        if ".attn.in_proj_" in name:
            kind = name.rsplit("_", 1)[1]  # weight or bias
            for proj, part in zip("qkv", value.chunk(3)):
                out[name.replace(f".attn.in_proj_{kind}", f".self_attn.{proj}_proj.{kind}")] = part
        else:
            out[name] = value
    return out


# -----------------------------------------------------------------------------
# count: how many objects an open-vocabulary detector finds, against the number in the prompt

NUMBER_WORDS = {w: n for n, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve".split())}
# words that end the noun phrase after the count: "three red apples | on a table" (and verbs: "two dogs | playing")
PHRASE_END = set("a an the on in at of with and or but next near by under over above below behind beside between among "
                 "inside outside into onto around along across through against from to for is are that which who "
                 "sit sits".split())
FRAMING = re.compile(r"^(?:an?|the)\s+(?:photo|picture|image|painting|drawing|illustration|rendering)\s+of\b\s*")
IRREGULAR_PLURALS = dict(
    mice="mouse", geese="goose", people="person", children="child", men="man", women="woman", teeth="tooth",
    feet="foot", knives="knife", leaves="leaf", wolves="wolf", loaves="loaf", shelves="shelf", cookies="cookie",
    tomatoes="tomato", potatoes="potato", buses="bus", sheep="sheep", fish="fish", deer="deer")


def singular(noun):
    """English plural -> singular for the nouns of counting prompts (irregulars listed, else the suffix rules)."""
    if noun in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[noun]
    if noun.endswith("ies") and len(noun) > 4:  # cherries, puppies (but pies, ties)
        return noun[:-3] + "y"
    if noun.endswith(("ches", "shes", "sses", "xes")):  # peaches, dishes, glasses, boxes
        return noun[:-2]
    if noun.endswith("s") and not noun.endswith(("ss", "us", "is")):  # apples (but glass, cactus, iris)
        return noun[:-1]
    return noun


def parse_count(prompt):
    """The number of objects a prompt asks for, and their noun: "three red apples on a table" -> (3, "apple").

    The count is the first number (digits, or a word from zero to twelve), else a leading "a"/"an" (1), once a leading
    "a photo of" or the like is dropped. The noun is the last word of the phrase after the count, which ends at a
    preposition, article, conjunction, "is"/"are", punctuation or a participle (-ing, -ed); plurals become singular.
    ValueError if there is no count."""
    words = re.findall(r"\d+|[a-z]+(?:-[a-z]+)*|[^\sa-z\d]", FRAMING.sub("", prompt.lower().strip()))
    numbers = [i for i, w in enumerate(words) if w.isdigit() or w in NUMBER_WORDS]
    articles = [0] if words[:1] in (["a"], ["an"]) else []  # "a cat on a sofa"; but "cats on a sofa" has no count
    if not numbers and not articles:
        raise ValueError(f"no object count in the prompt {prompt!r}: write a number (3 or three) or a/an before the "
                         "object, as in 'three apples on a table'")
    i = (numbers or articles)[0]
    n = int(words[i]) if words[i].isdigit() else NUMBER_WORDS.get(words[i], 1)
    phrase = []
    for w in words[i + 1:]:
        if w in PHRASE_END or not w[0].isalpha() or (phrase and len(w) > 4 and w.endswith(("ing", "ed"))):
            break
        phrase.append(w)
    if not phrase:
        raise ValueError(f"no object after the count in the prompt {prompt!r}")
    return n, phrase[-1] if n == 1 else singular(phrase[-1])


COUNT_QUERY = "a photo of a {}"  # CLIP's prompt template, which OWL-ViT's text queries use (Minderer et al. 2022)
COUNT_THRESHOLD = 0.1  # box score at which a detection counts: the threshold of transformers' OWL-ViT examples
COUNT_TEMPERATURE = 0.25  # in logits; see soft_count


def soft_count(logits, threshold=COUNT_THRESHOLD, temperature=COUNT_TEMPERATURE):
    """Differentiable number of detections from box logits (..., boxes): sum of sigmoid((logit - logit(threshold)) /
    temperature). A box at the threshold counts 1/2, one logit above 0.98, one logit below 0.02; OWL-ViT B/32's 576
    background boxes (score ~1e-3, 4.7 logits below) add < 1e-5 in all."""
    return torch.sigmoid((logits - math.log(threshold / (1 - threshold))) / temperature).sum(-1)


class ObjectCount(nn.Module):
    """-|soft count - n| for prompts that ask for n objects: the error in objects, 0 when right. The absolute (not
    squared) error keeps a gradient of constant size, which neither fades near the target nor explodes far from it.
    Duplicate boxes on one object count twice: transformers' OWL-ViT has no NMS, and a hard one has no gradient."""

    def __init__(self, detector, tokenizer, preprocess):
        super().__init__()
        self.detector, self.tokenizer, self.preprocess = detector, tokenizer, preprocess

    def counts(self, images, nouns):
        """Soft count (B,) of nouns[i] in images[i]: one text query per image."""
        pixels = self.preprocess(images).to(self.detector.dtype)
        ids = _token_ids(self.tokenizer, [COUNT_QUERY.format(n) for n in nouns],
                         self.detector.config.text_config.max_position_embeddings, images.device)
        logits = self.detector(input_ids=ids, pixel_values=pixels).logits  # (B, boxes, queries = 1)
        return soft_count(logits[..., 0].float())

    def forward(self, images, prompts):
        targets, nouns = zip(*map(parse_count, prompts))
        return -(self.counts(images, nouns) - torch.tensor(targets, dtype=torch.float32, device=images.device)).abs()


# -----------------------------------------------------------------------------
# weights: from an environment variable's path, the Hugging Face cache, or the hub

SOURCES = {  # name -> (environment variable naming a local copy, hub repo, file in it; None: a transformers directory)
    "aesthetic-mlp": ("ALIGNPROP_AESTHETIC_WEIGHTS", "trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth"),
    "hps": ("ALIGNPROP_HPS_WEIGHTS", "xswu/HPSv2", "HPS_v2.1_compressed.pt"),
    "clip-l14": ("ALIGNPROP_CLIP_L14", "openai/clip-vit-large-patch14", None),
    "clip-h14": ("ALIGNPROP_CLIP_H14", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", None),  # tokenizer, image settings
    "pickscore": ("ALIGNPROP_PICKSCORE", "yuvalkirstain/PickScore_v1", None),
    "owlvit": ("ALIGNPROP_OWLVIT", "google/owlvit-base-patch32", None),
}


def fetch(source, load):
    """load(path_or_repo, local_files_only) for SOURCES[source]: the path in its environment variable if set, else
    the Hugging Face cache, else the hub. Offline, RewardLoadError in seconds instead of minutes of retries."""
    env, repo, filename = SOURCES[source]
    if os.environ.get(env):
        path = os.path.expanduser(os.environ[env])
        if not os.path.exists(path):
            raise RewardLoadError(f"{env}={path}: no such file or directory")
        try:
            return load(path, True)
        except Exception as e:  # whatever the loader raises for a wrong file: say which variable points to it
            raise RewardLoadError(f"{env}={path}: cannot load it: {type(e).__name__}: "
                                  f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e

    def get(local_only):
        if filename is None:
            return load(repo, local_only)
        from huggingface_hub import hf_hub_download
        return load(hf_hub_download(repo, filename, local_files_only=local_only), True)

    try:
        return get(local_only=True)
    except OSError:  # not in the cache
        pass
    what = f"{filename} from hub repo {repo}" if filename else f"hub repo {repo}"
    if not hub_reachable():
        from huggingface_hub import constants
        local = f"{env}=/path/to/{filename}" if filename else f"{env} to a copy (hf download {repo} --local-dir DIR)"
        raise RewardLoadError(
            f"{what} is not in the Hugging Face cache and the hub is unreachable: run `hf download {repo}"
            f"{' ' + filename if filename else ''}` where there is internet and copy it into {constants.HF_HUB_CACHE}, "
            f"or set {local}")
    try:
        return get(local_only=False)
    except (OSError, ValueError) as e:
        raise RewardLoadError(f"cannot download {what}: {str(e).strip().splitlines()[0]}") from None


@functools.lru_cache(maxsize=None)  # once per process (so in a mix clip and aesthetic share CLIP ViT-L/14)
def from_hub(source, cls_name, device="cpu", dtype=torch.float32):
    """transformers.<cls_name>.from_pretrained on SOURCES[source]; models frozen, in eval mode, on device in dtype."""
    import transformers
    cls = getattr(transformers, cls_name)
    obj = fetch(source, lambda path, local: cls.from_pretrained(path, local_files_only=local))
    return frozen(obj, device, dtype) if isinstance(obj, nn.Module) else obj


def frozen(module, device, dtype):
    return module.requires_grad_(False).eval().to(device, dtype)


def load_aesthetic_mlp():
    mlp = AestheticMLP()
    mlp.load_state_dict(fetch("aesthetic-mlp", lambda path, _: torch.load(path, map_location="cpu", weights_only=True)))
    return mlp


def load_hps_clip(device="cpu", dtype=torch.float32):
    """HPSv2's OpenCLIP ViT-H/14 checkpoint as a transformers CLIPModel."""
    state = fetch("hps", lambda path, _: torch.load(path, map_location="cpu", weights_only=True))
    from transformers import CLIPModel
    with torch.device(device):  # initialised where it will run: quick on a GPU
        clip = CLIPModel(clip_config_from_openclip(OPENCLIP_VIT_H_14))
    clip.load_state_dict(openclip_to_transformers(state.get("state_dict", state)))
    return frozen(clip, device, dtype)


def image_preprocess(source):
    return Preprocess.from_processor(from_hub(source, "AutoImageProcessor"))


def load_aesthetic(device, dtype):
    mlp = load_aesthetic_mlp()
    clip = from_hub("clip-l14", "CLIPModel", device, dtype)
    return frozen(Aesthetic(clip, mlp, image_preprocess("clip-l14")), device, dtype)


def load_clip_score(source, clip, device, dtype, use_logit_scale=False):
    """A ClipScore of `clip` with the tokenizer and image settings of SOURCES[source]."""
    score = ClipScore(clip, from_hub(source, "AutoTokenizer"), image_preprocess(source), use_logit_scale)
    return frozen(score, device, dtype)


def load_count(device, dtype):
    detector = from_hub("owlvit", "OwlViTForObjectDetection", device, dtype)
    return frozen(ObjectCount(detector, from_hub("owlvit", "AutoTokenizer"), image_preprocess("owlvit")), device, dtype)
