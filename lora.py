"""LoRA, written out: low-rank adapters injected into the nn.Linear layers of any module (here, SD's UNet).

    params = inject_lora(unet, rank=4)          # a list of trainable nn.Parameters; the unet's outputs are unchanged
    torch.optim.AdamW(params, lr=1e-3)          # ...train...
    save_lora(unet, "lora.safetensors")         # only the LoRA tensors, in the format diffusers' load_lora_weights reads
    load_lora(unet2, "lora.safetensors")        # injects (if needed) and restores them, checking rank/targets/shapes
    merge_lora(unet)                            # W <- W + scale * up @ down; plain nn.Linear layers again

A wrapped layer computes  y = W x + b + scale * up(down(x)),  with down (rank x in) random, up (out x rank) zero at
injection, and scale = alpha / rank (Hu et al. 2021, arXiv:2106.09685, Eq. 3 and Sec. 4.1).

File format: safetensors keyed by module path, "unet.<path>.lora_A.weight" (down) and "unet.<path>.lora_B.weight"
(up * scale), which a stock diffusers pipeline loads with `pipe.load_lora_weights(path)`. The scale is folded into
lora_B so the file means the same thing to any reader; rank, alpha and targets are in the metadata.
"""
import json
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections of SD's transformer blocks


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dtype=None):
        super().__init__()
        self.base = base.requires_grad_(False)  # the original layer, its Parameters untouched
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        kw = dict(device=base.weight.device, dtype=dtype or base.weight.dtype)
        self.down = nn.Parameter(torch.empty(rank, base.in_features, **kw))
        self.up = nn.Parameter(torch.zeros(base.out_features, rank, **kw))  # zero: injection changes nothing
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # nn.Linear's own init, as in microsoft/LoRA

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.down), self.up) * self.scale


def lora_layers(module):
    """{module path: LoRALinear} for every injected layer, in module order."""
    return {name: m for name, m in module.named_modules() if isinstance(m, LoRALinear)}


def inject_lora(module, rank=4, alpha=None, targets=DEFAULT_TARGETS, dtype=None):
    """Wrap every nn.Linear whose path ends with one of `targets` in a LoRALinear; freeze everything else.

    alpha defaults to rank (scale 1). dtype is the LoRA weights' dtype (default: the base weight's); keep them in fp32
    when the frozen model is bf16/fp16 and training runs under autocast. Returns the trainable parameters as a list."""
    if lora_layers(module):
        raise ValueError("this module already has LoRA layers; inject once (or merge_lora first)")
    alpha = float(rank if alpha is None else alpha)
    module.requires_grad_(False)
    matches = [name for name, m in module.named_modules()
               if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)]
    if not matches:
        raise ValueError(f"no nn.Linear in this module matches the targets {tuple(targets)}")
    for name in matches:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dtype))
    module._lora_config = dict(rank=rank, alpha=alpha, targets=list(targets))  # read by save_lora / load_lora
    return [p for m in lora_layers(module).values() for p in (m.down, m.up)]


def merge_lora(module):
    """Fold each adapter into its base weight (W += scale * up @ down, computed in fp32) and unwrap the layer, leaving
    a plain module that `save_pretrained` and any other code can use. Returns the module."""
    for name, m in lora_layers(module).items():
        delta = (m.up.float() @ m.down.float()) * m.scale
        with torch.no_grad():
            m.base.weight += delta.to(m.base.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name), child, m.base)
    module.__dict__.pop("_lora_config", None)
    return module


def lora_state_dict(module, prefix="unet."):
    """The LoRA tensors under diffusers/PEFT key names, with the scale folded into lora_B."""
    sd = {}
    for name, m in lora_layers(module).items():
        sd[f"{prefix}{name}.lora_A.weight"] = m.down.detach().float().contiguous()
        sd[f"{prefix}{name}.lora_B.weight"] = (m.up.detach().float() * m.scale).contiguous()
    return sd


def save_lora(module, path, prefix="unet."):
    """Write only the LoRA tensors to a safetensors file, with rank, alpha and targets in its metadata."""
    if not lora_layers(module):
        raise ValueError("this module has no LoRA layers to save; call inject_lora first")
    cfg = module._lora_config
    meta = dict(format="pt", rank=str(cfg["rank"]), alpha=str(cfg["alpha"]), targets=json.dumps(cfg["targets"]),
                lora_B="includes scale alpha/rank")
    save_file(lora_state_dict(module, prefix), path, metadata=meta)


def read_lora_config(path):
    """{rank, alpha, targets} from a file written by save_lora."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if not {"rank", "alpha", "targets"} <= meta.keys():
        raise ValueError(f"{path} has no LoRA metadata (rank/alpha/targets); was it written by save_lora?")
    return dict(rank=int(meta["rank"]), alpha=float(meta["alpha"]), targets=json.loads(meta["targets"]))


def load_lora(module, path, prefix="unet."):
    """Restore a file written by save_lora. Injects LoRA layers first if the module has none; otherwise checks that
    rank, alpha and targets match the injected ones. Any missing, extra or mis-shaped tensor is a clear ValueError."""
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
