"""The frozen base in 8-bit floats (memory.Float8Linear and Float8Conv2d, train.py --base-dtype fp8): the same layer to
fp8's rounding, one byte a weight, LoRA on top trained in full precision and saved under the same names, gradients
close to the full-precision base's."""
import math

import pytest
import torch

from flow import flow_sample
from lora import inject_lora, lora_layers
from memory import Float8Conv2d, Float8Linear, base_to_fp8
from model import decode, encode_prompts, latent_shape, load_sd
from sampler import ddim_sample


def test_a_float8_linear_is_the_layer_with_its_weight_rounded_to_fp8():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32)
    fp8 = Float8Linear(layer)
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight.element_size() == 1 and not fp8.weight.requires_grad
    dequantized = fp8.weight.float() * fp8.scale  # (32, 64): per output row, the largest |w| maps to 448
    assert torch.allclose(dequantized.abs().amax(1), layer.weight.abs().amax(1), rtol=1e-6)
    assert ((dequantized - layer.weight).abs() <= layer.weight.abs() / 16 + 1e-6).all()  # 3 mantissa bits
    x = torch.randn(5, 64, requires_grad=True)
    y = fp8(x)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, dequantized, layer.bias))
    y.square().sum().backward()  # the input's gradient through the dequantized weight; nothing frozen gets one
    torch.testing.assert_close(x.grad, 2 * y.detach() @ dequantized)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fp8(x).dtype == torch.bfloat16  # as nn.Linear under autocast


def test_a_float8_conv_is_the_convolution_with_its_weight_rounded_to_fp8():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 24, 3, stride=2, padding=1)
    fp8 = Float8Conv2d(conv)
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.scale.shape == (24, 1, 1, 1) and not fp8.weight.requires_grad
    dequantized = fp8.weight.float() * fp8.scale  # per output channel, the largest |w| of its kernel maps to 448
    assert torch.allclose(dequantized.abs().amax((1, 2, 3)), conv.weight.abs().amax((1, 2, 3)), rtol=1e-6)
    assert ((dequantized - conv.weight).abs() <= conv.weight.abs() / 16 + 1e-6).all()  # 3 mantissa bits
    x = torch.randn(2, 32, 9, 11, requires_grad=True)
    plain = x.detach().requires_grad_()  # plain autograd through the dequantized weight: the same output and grad_x
    y, y_plain = fp8(x), torch.nn.functional.conv2d(plain, dequantized, conv.bias, stride=2, padding=1)
    torch.testing.assert_close(y, y_plain, rtol=1e-6, atol=1e-6)
    grad_y = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, grad_y)[0], torch.autograd.grad(y_plain, plain, grad_y)[0],
                               rtol=1e-6, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fp8(x).dtype == torch.bfloat16  # as nn.Conv2d under autocast


def test_lora_wraps_the_fp8_layers_and_trains_through_them():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 32, 3, padding=1), torch.nn.Conv2d(32, 32, 3, padding=1),
                                torch.nn.Flatten(), torch.nn.Linear(32 * 8 * 8, 16))
    assert base_to_fp8(model) == (32 * 32 * 9 + 2048 * 16) * 3  # fp32 -> one byte; the latent's conv (4 in) stays
    assert [type(m) for m in model] == [torch.nn.Conv2d, Float8Conv2d, torch.nn.Flatten, Float8Linear]
    params = inject_lora(model, 2, targets=("1", "3"), dtype=torch.float32)
    assert {name: type(m.base) for name, m in lora_layers(model).items()} == {"1": Float8Conv2d, "3": Float8Linear}
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.02)
    model(torch.randn(2, 4, 8, 8)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == {"1.down", "1.up", "3.down", "3.up"}


@pytest.mark.parametrize("name, min_psnr, min_cosine", [("shapes", 40, 0.99), ("tiny-flux", 40, 0.99),
                                                         ("tiny-sd3", 38, 0.975)])
def test_an_fp8_base_draws_and_trains_as_the_full_precision_one(name, min_psnr, min_cosine):
    """Images against the fp32 base (PSNR, 10 steps) and the LoRA gradient's cosine to the fp32 base's (4 steps,
    full backprop), the same LoRA init; the LoRA file's names are the same, so it loads on the unquantized model."""
    images, grads, names = [], [], []
    for fp8 in (False, True):
        sd = load_sd(name)
        if fp8:
            assert base_to_fp8(sd.unet) > 0
        torch.manual_seed(0)
        params = inject_lora(sd.unet, 4, dtype=torch.float32)
        with torch.no_grad():
            for p in params:
                p.normal_(0, 0.02)
        names.append(sorted(lora_layers(sd.unet)))
        cond, uncond = encode_prompts(sd, ["three red circles", "a blue square"]), encode_prompts(sd, [""] * 2)
        noise = torch.randn(2, *latent_shape(sd, 64), generator=torch.Generator().manual_seed(1))
        sample = flow_sample if sd.flow else ddim_sample
        with torch.no_grad():
            images.append(decode(sd, sample(sd, cond, uncond, noise, 10, 5.0)))
        loss = decode(sd, sample(sd, cond, uncond, noise, 4, 5.0, 0.0, "all")).square().mean()
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    psnr = 10 * math.log10(1 / (images[0] - images[1]).square().mean().item())
    cosine = torch.nn.functional.cosine_similarity(grads[0], grads[1], 0).item()
    assert names[0] == names[1] and psnr >= min_psnr and cosine >= min_cosine, (psnr, cosine)


@pytest.mark.parametrize("name", ["shapes", "tiny-xl", "tiny-sd3", "tiny-flux"])
def test_fp8_text_encoders_give_the_conditioning_to_rounding(name):
    """--base-dtype fp8 quantizes the text encoders too (before they go to the device: T5-XXL is SD3's and FLUX's
    largest part while the prompts are encoded); T5's `wo`, which transformers keeps in fp32 and whose dtype T5 casts
    its input to, stays as it is. The conditioning stays within fp8's rounding of the full-precision one."""
    sd = load_sd(name)
    prompts = ["two red circles", "a cat on a mat"]
    with torch.no_grad():
        full = encode_prompts(sd, prompts)
        assert sum(base_to_fp8(m) for m in sd.text_encoders) > 0
        fp8 = encode_prompts(sd, prompts)
    assert torch.nn.functional.cosine_similarity(full.flatten(), fp8.flatten(), 0) > 0.998
    for encoder in sd.text_encoders:
        kept = [n for n, m in encoder.named_modules() if n.rpartition(".")[2] == "wo"]
        assert all(type(encoder.get_submodule(n)) is torch.nn.Linear for n in kept)
        assert bool(kept) == (type(encoder).__name__ == "T5EncoderModel")
