"""The pictures a run writes: labelled image grids (a batch of images in one PNG, each image under its prompt and the
grid under a title) and the reward plot.

    image_grid(images, nrow=4, labels=prompts, title="step 50").save("grid.png")   # images (B, 3, H, W) in [0, 1]
    reward_plot(metrics, "train.py --reward compress", eval_before).savefig("reward.png")   # metrics.jsonl's lines

train.py, ddpo.py and sample.py write their before/after pictures with it, the shapes package its examples.
"""
import torch


def image_grid(images, nrow, pad=2, labels=None, title=None):
    """Images (B, 3, H, W) in [0, 1] -> one PIL image, `nrow` images per row, on a white background. `labels` (one
    string per image, e.g. its prompt) are written above each image and `title` above the grid, wrapped to fit, so
    that a picture read alone says what it shows."""
    from PIL import Image, ImageDraw, ImageFont
    B, C, H, W = images.shape
    rows = -(-B // nrow)
    width = nrow * (W + pad) + pad
    font = ImageFont.load_default(size=max(10, W // 24))  # Pillow's own font: legible on 64 px and on 512 px images
    line = font.size + 2
    lines = [_wrap(text, font, W) for text in labels] if labels else [[]] * B
    strip = line * max(len(t) for t in lines)  # the label band above each row of images
    heading = _wrap(title, font, width - 2 * pad) if title else []
    top = line * len(heading) + (pad if heading else 0)
    grid = Image.new("RGB", (width, top + rows * (strip + H + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for k, text in enumerate(heading):
        draw.text((pad, pad + k * line), text, fill="black", font=font)
    pixels = (images.detach().float().cpu().permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    for i in range(B):
        x, y = pad + (i % nrow) * (W + pad), top + pad + (i // nrow) * (strip + H + pad)
        for k, text in enumerate(lines[i]):
            draw.text((x, y + k * line), text, fill="black", font=font)
        grid.paste(Image.fromarray(pixels[i]), (x, y + strip))
    return grid


def _wrap(text, font, width):
    """Greedy word wrap of `text` to lines at most `width` pixels wide in `font` (a longer word keeps its own line)."""
    lines = []
    for word in text.split():
        if lines and font.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines



def reward_plot(metrics, title, eval_before=None):
    """A matplotlib figure: the training reward of every step and the held-out (eval) reward, from eval_before (at
    step 0) on, against steps; `metrics` are metrics.jsonl's lines (dicts with step, reward_mean, eval_reward)."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([x["step"] for x in metrics], [x["reward_mean"] for x in metrics], lw=1, alpha=0.6, label="training batch")
    evals = [(0, eval_before)] * (eval_before is not None)
    evals += [(x["step"], x["eval_reward"]) for x in metrics if x.get("eval_reward") is not None]
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out prompts, fixed seeds")
    ax.set(xlabel="step", ylabel="reward", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
