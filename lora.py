"""LoRA, written out: low-rank adapters injected into the nn.Linear (and nn.Conv2d) layers of any module (here, SD's
UNet).

    params = inject_lora(unet, rank=4)          # a list of trainable nn.Parameters; the unet's outputs are unchanged
    inject_lora(unet, 4, targets=parse_targets("attn+conv"))   # also the ResNet blocks' convolutions
    torch.optim.AdamW(params, lr=1e-3)          # ...train...
    save_lora(unet, "lora.safetensors")         # only the LoRA tensors, in the format diffusers' load_lora_weights reads
    load_lora(unet2, "lora.safetensors")        # injects (if needed) and restores them, checking rank/targets/shapes
    merge_lora(unet)                            # W <- W + scale * up @ down; plain nn.Linear / nn.Conv2d again

A wrapped layer computes  y = W x + b + scale * up(down(x)),  with down (rank x in) random, up (out x rank) zero at
injection, and scale = alpha / rank (Hu et al. 2021, arXiv:2106.09685, Eq. 3 and Sec. 4.1). A wrapped convolution
is the same in convolutions: down is the layer's own kernel, stride and padding into `rank` channels, up a 1x1
convolution back to the layer's output channels (as PEFT and diffusers store it), so scale * up @ down is a kernel of
the layer's shape and merges into it.

File format: safetensors keyed by module path, "unet.<path>.lora_A.weight" (down) and "unet.<path>.lora_B.weight"
(up * scale), which a stock diffusers pipeline loads with `pipe.load_lora_weights(path)`; for a transformer denoiser
(SD3's SD3Transformer2DModel, FLUX's FluxTransformer2DModel) the prefix is "transformer.", the key
StableDiffusion3Pipeline and FluxPipeline read. The scale is folded into lora_B so the file means the same thing to any
reader; rank, alpha and targets are in the metadata.
"""
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

# the attention projections: SD's transformer blocks' (in SD3 and FLUX, those of the image stream), then those of the
# text stream in SD3's and FLUX's joint attention, which a UNet does not have (inject_lora lets them match nothing)
TEXT_STREAM = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0") + TEXT_STREAM
TARGET_SETS = {  # the names --lora-targets takes (joined with "+"), besides module names themselves
    "attn": DEFAULT_TARGETS,
    "conv": ("conv1", "conv2"),  # the two 3x3 convolutions of every ResNet block: the layers at every resolution
}


def init_down(down):
    """The down matrix's random init, nn.Linear's / nn.Conv2d's own (uniform, std 1 / sqrt(3 fan_in)), as
    microsoft/LoRA; the up matrix starts at zero, so the wrapped layer starts as the base layer."""
    return nn.init.kaiming_uniform_(down, a=math.sqrt(5))


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dtype=None):
        super().__init__()
        self.base = base.requires_grad_(False)  # the original layer, its Parameters untouched
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        kw = dict(device=base.weight.device, dtype=dtype or base.weight.dtype)
        self.down = nn.Parameter(torch.empty(rank, base.in_features, **kw))
        self.up = nn.Parameter(torch.zeros(base.out_features, rank, **kw))  # zero: injection changes nothing
        init_down(self.down)

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.down), self.up) * self.scale

    def delta(self):  # what merging adds to the base weight: scale * up @ down, (out, in)
        return (self.up.float() @ self.down.float()) * self.scale


class LoRAConv2d(nn.Module):
    """y = conv(x) + scale * up(down(x)): down (rank, in, kh, kw) with the layer's stride, padding and dilation, up
    (out, rank, 1, 1) zero at injection."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, dtype=None):
        super().__init__()
        if base.groups != 1 or base.padding_mode != "zeros":
            raise ValueError("LoRA on convolutions needs groups=1 and zero padding (as in every SD UNet convolution)")
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        kw = dict(device=base.weight.device, dtype=dtype or base.weight.dtype)
        self.down = nn.Parameter(torch.empty(rank, base.in_channels, *base.kernel_size, **kw))
        self.up = nn.Parameter(torch.zeros(base.out_channels, rank, 1, 1, **kw))  # zero: injection changes nothing
        init_down(self.down)

    def forward(self, x):
        b = self.base
        return b(x) + F.conv2d(F.conv2d(x, self.down, None, b.stride, b.padding, b.dilation), self.up) * self.scale

    def delta(self):  # (out, rank) @ (rank, in * kh * kw), back to the kernel's shape (out, in, kh, kw)
        return (self.up.float().flatten(1) @ self.down.float().flatten(1)).view(self.base.weight.shape) * self.scale


LORA_TYPES = {nn.Linear: LoRALinear, nn.Conv2d: LoRAConv2d}  # which layers can be wrapped, and how


def parse_targets(text):
    """The command-line form of `targets`: names from TARGET_SETS and/or module names joined with "+" (e.g. "attn",
    "attn+conv", "attn+proj_out") -> a tuple of module-name suffixes."""
    names = text.split("+")
    if not all(names):
        raise ValueError(f"{text!r}: expected names joined with '+', e.g. attn or attn+conv")
    return tuple(dict.fromkeys(t for n in names for t in TARGET_SETS.get(n, (n,))))


def lora_layers(module):
    """{module path: LoRALinear or LoRAConv2d} for every injected layer, in module order."""
    return {name: m for name, m in module.named_modules() if isinstance(m, (LoRALinear, LoRAConv2d))}


def inject_lora(module, rank=4, alpha=None, targets=DEFAULT_TARGETS, dtype=None):
    """Wrap every nn.Linear / nn.Conv2d whose path ends with one of `targets` (a name or a dotted path suffix) in a
    LoRALinear / LoRAConv2d; freeze everything else. A target that matches no such layer is an error, but for those of
    the text stream (TEXT_STREAM: a UNet has none) when another target matched.

    alpha defaults to rank (scale 1). dtype is the LoRA weights' dtype (default: the base weight's); keep them in fp32
    when the frozen model is bf16/fp16 and training runs under autocast.
    Returns the trainable parameters as a list."""
    if lora_layers(module):
        raise ValueError("this module already has LoRA layers; inject once (or merge_lora first)")
    alpha = float(rank if alpha is None else alpha)
    module.requires_grad_(False)
    def matches(name, t):
        return name == t or name.endswith("." + t)

    layers = {name: m for name, m in module.named_modules() if isinstance(m, tuple(LORA_TYPES))}
    unmatched = [t for t in targets if not any(matches(name, t) for name in layers)]
    if len(unmatched) < len(targets):  # some target matched: the text stream's may not (a UNet has no text stream)
        unmatched = [t for t in unmatched if t not in TEXT_STREAM]
    if unmatched:
        raise ValueError(f"no nn.Linear or nn.Conv2d in this module is named {', '.join(map(repr, unmatched))} "
                         f"(targets {tuple(targets)})")
    for name, m in layers.items():
        if any(matches(name, t) for t in targets):
            parent_name, _, child = name.rpartition(".")
            wrap = next(cls for kind, cls in LORA_TYPES.items() if isinstance(m, kind))
            setattr(module.get_submodule(parent_name), child, wrap(m, rank, alpha, dtype))
    module._lora_config = dict(rank=rank, alpha=alpha, targets=list(targets))  # read by save_lora / load_lora
    return [p for m in lora_layers(module).values() for p in (m.down, m.up)]


def merge_lora(module):
    """Fold each adapter into its base weight (W += scale * up @ down, computed in fp32) and unwrap the layer, leaving
    a plain module that `save_pretrained` and any other code can use. Returns the module."""
    for name, m in lora_layers(module).items():
        with torch.no_grad():
            m.base.weight += m.delta().to(m.base.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name), child, m.base)
    module.__dict__.pop("_lora_config", None)
    return module


def default_prefix(module):
    """The key prefix diffusers' load_lora_weights reads for this denoiser: "transformer." for a transformer model
    (class name containing "Transformer", e.g. SD3Transformer2DModel), else "unet." (UNets, and any other module)."""
    return "transformer." if "Transformer" in type(module).__name__ else "unet."


def lora_state_dict(module, prefix=None):
    """The LoRA tensors under diffusers/PEFT key names, with the scale folded into lora_B. prefix: default_prefix."""
    prefix = default_prefix(module) if prefix is None else prefix
    sd = {}
    for name, m in lora_layers(module).items():
        sd[f"{prefix}{name}.lora_A.weight"] = m.down.detach().float().contiguous()
        sd[f"{prefix}{name}.lora_B.weight"] = (m.up.detach().float() * m.scale).contiguous()
    return sd


def save_lora(module, path, prefix=None):
    """Write only the LoRA tensors to a safetensors file, with rank, alpha and targets in its metadata."""
    if not lora_layers(module):
        raise ValueError("this module has no LoRA layers to save; call inject_lora first")
    cfg = module._lora_config
    meta = dict(format="pt", rank=str(cfg["rank"]), alpha=str(cfg["alpha"]), targets=json.dumps(cfg["targets"]),
                lora_B="includes scale alpha/rank")
    save_file(lora_state_dict(module, prefix), path, metadata=meta)
    umask = os.umask(0)  # read it (the only way), then put it back
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # safetensors writes 0600; the mode a plain open() gives, as every other output


def read_lora_config(path):
    """{rank, alpha, targets} from a file written by save_lora."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if not {"rank", "alpha", "targets"} <= meta.keys():
        raise ValueError(f"{path} has no LoRA metadata (rank/alpha/targets); was it written by save_lora?")
    return dict(rank=int(meta["rank"]), alpha=float(meta["alpha"]), targets=json.loads(meta["targets"]))


def load_lora(module, path, prefix=None):
    """Restore a file written by save_lora. Injects LoRA layers first if the module has none; otherwise checks that
    rank, alpha and targets match the injected ones. Any missing, extra or mis-shaped tensor is a clear ValueError."""
    prefix = default_prefix(module) if prefix is None else prefix
    cfg = read_lora_config(path)
    if not lora_layers(module):
        inject_lora(module, cfg["rank"], cfg["alpha"], cfg["targets"])
    have = module._lora_config
    for key in ("rank", "alpha", "targets"):
        if have[key] != cfg[key]:
            raise ValueError(f"{path}: LoRA {key} mismatch: the file has {cfg[key]}, the module was injected with "
                             f"{have[key]}")
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    expected = lora_state_dict(module, prefix)
    missing, extra = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or extra:
        raise ValueError(f"{path} does not fit this module: {len(missing)} LoRA tensors missing (e.g. {missing[:2]}),"
                         f" {len(extra)} unexpected (e.g. {extra[:2]}); was it trained on another model?")
    for k, v in expected.items():
        if tensors[k].shape != v.shape:
            raise ValueError(f"{path}: {k} has shape {tuple(tensors[k].shape)}, the module needs {tuple(v.shape)}")
    with torch.no_grad():
        for name, m in lora_layers(module).items():
            m.down.copy_(tensors[f"{prefix}{name}.lora_A.weight"])
            m.up.copy_(tensors[f"{prefix}{name}.lora_B.weight"] / m.scale)
    return module
