"""LoRA injection is a no-op, merges exactly, round-trips through safetensors, and loads in stock diffusers."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import pipeline
from lora import (DEFAULT_TARGETS, LoRAConv2d, LoRALinear, inject_lora, load_lora, lora_layers, merge_lora,
                  parse_targets, read_lora_config, save_lora)
from model import load_sd


def unet_out(sd, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, sd.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return sd.unet(x, 500, encoder_hidden_states=ctx).sample


def randomise(params, std=0.05):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.normal_(0, std)


def test_injection_is_a_noop_and_only_lora_trains(tiny):
    before = unet_out(tiny)
    n_linear = sum(isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v")
                   for name, m in tiny.unet.named_modules())
    params = inject_lora(tiny.unet, rank=4)
    assert type(params) is list and all(isinstance(p, torch.nn.Parameter) for p in params)
    assert torch.equal(unet_out(tiny), before)
    layers = lora_layers(tiny.unet)
    assert len(layers) == n_linear // 3 * 4  # to_q, to_k, to_v and to_out.0 of every attention
    assert all(name.endswith(("to_q", "to_k", "to_v", "to_out.0")) for name in layers)
    trainable = {id(p) for p in tiny.unet.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in params} and len(params) == 2 * len(layers)
    m = next(iter(layers.values()))
    assert m.down.shape == (4, m.base.in_features) and m.up.shape == (m.base.out_features, 4)
    assert not m.up.any() and m.scale == 1.0


def test_convolutions_too(tiny):
    before = unet_out(tiny)
    convs = [name for name, m in tiny.unet.named_modules()
             if isinstance(m, torch.nn.Conv2d) and name.endswith((".conv1", ".conv2"))]
    params = inject_lora(tiny.unet, rank=3, targets=parse_targets("attn+conv"))
    assert torch.equal(unet_out(tiny), before)
    layers = lora_layers(tiny.unet)
    assert [n for n, m in layers.items() if isinstance(m, LoRAConv2d)] == convs and len(convs) >= 8
    assert len(params) == 2 * len(layers)
    m = layers[convs[0]]
    assert m.down.shape == (3, m.base.in_channels, 3, 3) and m.up.shape == (m.base.out_channels, 3, 1, 1)
    x = torch.randn(1, m.base.in_channels, 8, 8)
    randomise([m.up])
    with torch.no_grad():  # the adapter is the convolution with the merged kernel scale * up @ down
        torch.testing.assert_close(m(x) - m.base(x), torch.nn.functional.conv2d(x, m.delta(), None, 1, 1),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_attn_adapts_both_streams_of_a_joint_attention(model):
    """SD3's and FLUX's attention projects the image and the text stream: "attn" (the default) adapts every linear
    layer of every attention, both streams' q/k/v/out (FLUX's single-stream blocks: q/k/v, their output is proj_out);
    on a UNet, which has no text stream, the same names adapt the image's only (test_injection_is_a_noop...)."""
    unet = load_sd(model).unet
    attention = {name for name, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and ".attn." in name}
    inject_lora(unet, rank=2, targets=parse_targets("attn"))
    assert set(lora_layers(unet)) == attention and any(name.endswith(".add_q_proj") for name in attention)
    with pytest.raises(ValueError, match="is named 'add_q_proj'"):  # a text-stream target alone must match
        inject_lora(load_sd("tiny").unet, targets=("add_q_proj",))


@pytest.mark.parametrize("text,want", [("attn", DEFAULT_TARGETS), ("attn+conv", (*DEFAULT_TARGETS, "conv1", "conv2")),
                                       ("conv+to_q+conv1", ("conv1", "conv2", "to_q")), ("proj_in", ("proj_in",))])
def test_parse_targets(text, want):
    assert parse_targets(text) == want


TARGETS = [DEFAULT_TARGETS, parse_targets("attn+conv")]


def test_alpha_sets_the_scale(tiny):
    inject_lora(tiny.unet, rank=4, alpha=8)
    assert all(m.scale == 2.0 for m in lora_layers(tiny.unet).values())


@pytest.mark.parametrize("targets", TARGETS)
def test_merge_gives_the_same_outputs_and_a_plain_module(tiny, targets):
    keys = set(tiny.unet.state_dict())
    randomise(inject_lora(tiny.unet, rank=4, alpha=2, targets=targets))
    unmerged = unet_out(tiny)
    merge_lora(tiny.unet)
    torch.testing.assert_close(unet_out(tiny), unmerged, rtol=1e-5, atol=1e-5)
    assert not lora_layers(tiny.unet) and set(tiny.unet.state_dict()) == keys


@pytest.mark.parametrize("targets", TARGETS)
def test_save_load_round_trip(tiny, tmp_path, targets):
    randomise(inject_lora(tiny.unet, rank=4, alpha=4, targets=targets))
    want = unet_out(tiny)
    save_lora(tiny.unet, tmp_path / "lora.safetensors")
    assert read_lora_config(tmp_path / "lora.safetensors") == dict(rank=4, alpha=4.0, targets=list(targets))
    tensors = load_file(tmp_path / "lora.safetensors")
    assert len(tensors) == 2 * len(lora_layers(tiny.unet))
    assert all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)

    fresh = load_sd("tiny")
    load_lora(fresh.unet, tmp_path / "lora.safetensors")  # injects with the file's rank/alpha/targets
    torch.testing.assert_close(unet_out(fresh), want)
    again = load_sd("tiny")
    inject_lora(again.unet, rank=4, targets=targets)
    load_lora(again.unet, tmp_path / "lora.safetensors")  # into an already-injected module
    torch.testing.assert_close(unet_out(again), want)


def test_load_fails_clearly_on_mismatch(tiny, tmp_path):
    path = tmp_path / "lora.safetensors"
    inject_lora(tiny.unet, rank=4)
    save_lora(tiny.unet, path)

    other = load_sd("tiny")
    inject_lora(other.unet, rank=2)
    with pytest.raises(ValueError, match="rank mismatch"):
        load_lora(other.unet, path)
    other = load_sd("tiny")
    inject_lora(other.unet, rank=4, targets=("to_q", "to_v"))
    with pytest.raises(ValueError, match="targets mismatch"):
        load_lora(other.unet, path)

    with safe_open(path, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = sorted(tensors)[0]
    bad = dict(tensors, **{key: torch.zeros(4, 3)})
    save_file(bad, tmp_path / "bad_shape.safetensors", metadata=meta)
    with pytest.raises(ValueError, match="has shape"):
        load_lora(load_sd("tiny").unet, tmp_path / "bad_shape.safetensors")
    missing = {k: v for k, v in tensors.items() if k != key}
    save_file(missing, tmp_path / "missing.safetensors", metadata=meta)
    with pytest.raises(ValueError, match="1 LoRA tensors missing"):
        load_lora(load_sd("tiny").unet, tmp_path / "missing.safetensors")
    save_file(tensors, tmp_path / "no_meta.safetensors")
    with pytest.raises(ValueError, match="no LoRA metadata"):
        load_lora(load_sd("tiny").unet, tmp_path / "no_meta.safetensors")


def test_inject_errors(tiny):
    with pytest.raises(ValueError, match="named 'no_such_layer'"):
        inject_lora(tiny.unet, targets=("no_such_layer",))
    with pytest.raises(ValueError, match="named 'conv3'"):  # one target that matches nothing is enough
        inject_lora(tiny.unet, targets=("to_q", "conv3"))
    with pytest.raises(ValueError, match="joined with"):
        parse_targets("attn+")
    inject_lora(tiny.unet)
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(tiny.unet)


@pytest.mark.parametrize("targets", TARGETS)
def test_stock_diffusers_loads_our_file(tiny, tmp_path, targets):
    # diffusers' load_lora_weights runs on PEFT (requirements-dev.txt)
    randomise(inject_lora(tiny.unet, rank=4, alpha=16, targets=targets))  # scale 4, folded into lora_B in the file
    want = unet_out(tiny)
    save_lora(tiny.unet, tmp_path / "lora.safetensors")
    pipe = pipeline(load_sd("tiny"))
    pipe.load_lora_weights(str(tmp_path / "lora.safetensors"))
    assert not any(isinstance(m, (LoRALinear, LoRAConv2d)) for m in pipe.unet.modules())
    torch.testing.assert_close(unet_out(pipe), want, rtol=1e-5, atol=1e-6)


def test_the_file_gets_the_mode_a_plain_open_gives(tiny, tmp_path):
    """safetensors writes its files 0600; lora.safetensors is shared like every other output of a run."""
    import os
    import stat
    inject_lora(tiny.unet, rank=2)
    for umask, mode in ((0o022, 0o644), (0o027, 0o640)):
        old = os.umask(umask)
        try:
            save_lora(tiny.unet, tmp_path / f"{umask:o}.safetensors")
        finally:
            os.umask(old)
        assert stat.S_IMODE(os.stat(tmp_path / f"{umask:o}.safetensors").st_mode) == mode


def test_init_is_nn_linear_s_and_peft_s_default():
    """The down matrix starts as nn.Linear's weights do (uniform, bound 1 / sqrt(fan_in)), as microsoft/LoRA and PEFT's
    default init_lora_weights=True; up starts at zero, so the wrapped layer starts as the base layer."""
    from peft import LoraConfig, get_peft_model
    layer = torch.nn.Linear(256, 256)
    torch.manual_seed(0)
    ours = LoRALinear(layer, rank=4, alpha=4)
    assert not ours.up.any() and torch.equal(ours(torch.ones(2, 256)), layer(torch.ones(2, 256)))
    assert abs(ours.down.std().item() - 1 / (3 * 256) ** 0.5) < 0.005 and ours.down.abs().max() <= 1 / 256 ** 0.5
    reference = get_peft_model(torch.nn.Sequential(torch.nn.Linear(256, 256)), LoraConfig(r=4, target_modules=["0"]))
    down = next(p for name, p in reference.named_parameters() if "lora_A" in name)  # (4, 256)
    assert abs(down.std().item() - ours.down.std().item()) < 0.005
