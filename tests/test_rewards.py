"""The compress reward tracks the real JPEG codec (Pillow) and is differentiable."""
import io

import pytest
import torch
from PIL import Image

from rewards import REWARDS, jpeg_kilobytes, load_reward


def varied_images():
    """~90 images (3, H, W) in [0, 1] of many kinds and sizes: flat, gradients, stripes, checkerboards, noise at
    several amplitudes, smooth textures, shapes with hard edges, and photo-like scenes (sky, textured ground, objects)."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    sizes = [(32, 32), (64, 64), (96, 64), (128, 128), (120, 200), (256, 256)]
    yy = lambda h, w: torch.linspace(0, 1, h)[:, None].expand(h, w)  # noqa: E731
    xx = lambda h, w: torch.linspace(0, 1, w)[None, :].expand(h, w)  # noqa: E731

    def colourise(m, c0, c1):  # (H, W) in [0, 1] -> (3, H, W) between two colours
        return c0[:, None, None] * (1 - m) + c1[:, None, None] * m

    def smooth_noise(h, w, scale):  # value noise: random grid, bicubically upsampled
        n = rand(1, 1, max(2, h // scale), max(2, w // scale))
        return torch.nn.functional.interpolate(n, (h, w), mode="bicubic", align_corners=False)[0, 0].clamp(0, 1)

    def shapes(h, w, n):
        img = rand(3)[:, None, None].expand(3, h, w).clone()
        for _ in range(n):
            c, (cy, cx), r = rand(3), rand(2) * torch.tensor([h, w]), 4 + rand(1) * min(h, w) / 4
            if rand(1) < 0.5:
                m = ((yy(h, w) * h - cy) ** 2 + (xx(h, w) * w - cx) ** 2) < r ** 2
            else:
                m = ((yy(h, w) * h - cy).abs() < r) & ((xx(h, w) * w - cx).abs() < r * 1.5)
            img[:, m] = c[:, None]
        return img

    def scene(h, w):
        sky = colourise(yy(h, w), torch.tensor([0.3, 0.5, 0.9]), torch.tensor([0.8, 0.9, 1.0]))
        ground = colourise(smooth_noise(h, w, 4) * 0.6 + rand(h, w) * 0.2, rand(3) * 0.4, rand(3) * 0.5 + 0.3)
        horizon = (yy(h, w) > 0.4 + 0.1 * torch.sin(xx(h, w) * 6 + rand(1) * 6))
        img = torch.where(horizon, ground, sky)
        obj = shapes(h, w, 3)
        mask = (obj - obj[:, :1, :1]).abs().sum(0) > 1e-6
        return torch.where(mask, obj * (0.8 + 0.2 * smooth_noise(h, w, 2)), img)

    images = []
    for h, w in sizes:
        images.append(("flat", rand(3)[:, None, None].expand(3, h, w).clone()))
        images.append(("linear gradient", colourise(xx(h, w) * 0.7 + yy(h, w) * 0.3, rand(3), rand(3))))
        images.append(("radial gradient", colourise(((xx(h, w) - .5) ** 2 + (yy(h, w) - .5) ** 2).sqrt(), rand(3), rand(3))))
        f = 2 + int(rand(1) * 10)
        images.append(("stripes", colourise(0.5 + 0.5 * torch.sin(xx(h, w) * w / f), rand(3), rand(3))))
        cell = [1, 2, 4, 8, 16, 3][sizes.index((h, w))]
        checker = ((torch.arange(h)[:, None] // cell + torch.arange(w)[None] // cell) % 2).float()
        images.append(("checkerboard", colourise(checker, rand(3), rand(3))))
        for amp in (0.03, 0.15, 0.5, 1.0):
            images.append((f"noise {amp}", (0.5 + amp * (rand(3, h, w) - 0.5)).clamp(0, 1)))
        for scale in (2, 8, 32):
            images.append((f"texture {scale}", torch.stack([smooth_noise(h, w, scale) for _ in range(3)])))
        images.append(("shapes", shapes(h, w, 4)))
        images.append(("many shapes", shapes(h, w, 20)))
        images.append(("scene", scene(h, w)))
        images.append(("noisy scene", (scene(h, w) + 0.08 * torch.randn(3, h, w, generator=g)).clamp(0, 1)))
    return images


def pil_jpeg_bytes(image, quality=75):
    arr = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.tell()


def quantise(image):  # what Pillow sees: 8-bit pixels
    return (image * 255).round() / 255


def spearman(a, b):
    ra = torch.as_tensor(a, dtype=torch.float64).argsort().argsort().double()
    rb = torch.as_tensor(b, dtype=torch.float64).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def estimate_and_real(images, quality=75):
    est = [float(jpeg_kilobytes(quantise(img)[None], quality)) for _, img in images]
    real = [pil_jpeg_bytes(img, quality) / 1000 for _, img in images]
    return est, real


def test_compress_tracks_real_jpeg_size():
    est, real = estimate_and_real(varied_images())
    assert spearman(est, real) >= 0.9


def test_compress_tracks_real_jpeg_size_at_one_size():  # harder: no help from the image size
    images = [(n, img) for n, img in varied_images() if img.shape[1:] == (64, 64)]
    est, real = estimate_and_real(images)
    assert spearman(est, real) >= 0.9


def test_gradients_reach_the_pixels():
    images = torch.stack([img for _, img in varied_images() if img.shape[1:] == (64, 64)][:6]).requires_grad_(True)
    r = load_reward("compress")(images, ["a cat"] * 6)
    assert r.shape == (6,) and torch.isfinite(r).all()
    (g,) = torch.autograd.grad(r.sum(), images)
    assert torch.isfinite(g).all() and (g.abs().sum((1, 2, 3)) > 0).all()
    # a small step along the gradient raises the reward, i.e. the gradient points somewhere useful
    stepped = (images + 1e-3 * g / g.abs().max()).clamp(0, 1)
    new = load_reward("compress")(stepped, None)
    assert (new >= r - 1e-6).all() and new.sum() > r.sum() + 1e-3


def test_incompress_is_minus_compress():
    images = torch.rand(2, 3, 32, 48)
    torch.testing.assert_close(load_reward("incompress")(images, None), -load_reward("compress")(images, None))


def test_registry():
    assert {"compress", "incompress"} <= set(REWARDS)
    with pytest.raises(ValueError, match="valid: compress"):
        load_reward("nope")


def test_quant_tables_follow_libjpeg():
    from rewards import JPEG_LUMA_Q50, quant_table
    assert quant_table(JPEG_LUMA_Q50, 50).flatten().tolist() == JPEG_LUMA_Q50
    assert (quant_table(JPEG_LUMA_Q50, 100) == 1).all()
    assert quant_table(JPEG_LUMA_Q50, 75)[0, 0] == 8  # (16 * 50 + 50) // 100


def test_flat_images_compress_best():
    flat, noisy = torch.full((1, 3, 64, 64), 0.5), torch.rand(1, 3, 64, 64)
    assert load_reward("compress")(flat, None) > load_reward("compress")(noisy, None)


def test_jpeg_is_minus_pillows_real_size_and_has_no_gradient():
    from rewards import NO_GRADIENT, without_gradient
    images = [img for _, img in varied_images()][:8]
    images = torch.stack([quantise(img) for img in images if img.shape[1:] == images[0].shape[1:]])
    r = load_reward("jpeg")(images.requires_grad_(), None)
    assert r.tolist() == pytest.approx([-pil_jpeg_bytes(img) / 1000 for img in images.detach()], abs=1e-6)
    assert not r.requires_grad and set(NO_GRADIENT) == {"jpeg", "shapes-count-exact"}
    assert without_gradient("compress,jpeg:0.5") == ["jpeg"] and without_gradient("compress,jpeg:0") == []


def test_shapes_count_exact_reads_describe():
    from shapes.world import caption, render
    images = torch.stack([render(n, "red", "circle", seed=n) for n in (1, 2, 3)]).float() / 255  # uint8 -> [0, 1]
    prompts = [caption(1, "red", "circle"), caption(3, "red", "circle"), caption(1, "red", "circle")]
    assert load_reward("shapes-count-exact")(images, prompts).tolist() == [0.0, -1.0, -2.0]
    from rewards import check_prompts
    with pytest.raises(ValueError):  # a prompt without a count is refused before training, as for shapes-count
        check_prompts("shapes-count-exact", ["red circles"])
