"""Pictures of reconstructions: the comparison grid that evaluation reports and training logs show.

Pure image code (numpy + PIL) so that training and evaluation share one drawing without
depending on each other.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def _detail_box(img: np.ndarray, crop: int) -> tuple[int, int]:
    """Top-left of the crop x crop window with the most detail (gradient energy) in ``img``."""
    g = img.astype(np.float32).mean(axis=2)
    energy = np.abs(np.diff(g, axis=0))[:, :-1] + np.abs(np.diff(g, axis=1))[:-1, :]
    ii = np.pad(energy, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    h, w = energy.shape
    if h < crop or w < crop:
        return 0, 0
    sums = ii[crop:, crop:] - ii[:-crop, crop:] - ii[crop:, :-crop] + ii[:-crop, :-crop]
    y, x = np.unravel_index(np.argmax(sums), sums.shape)
    return int(y), int(x)


def column_labels(models: list[str]) -> list[str]:
    """The grid's column titles: the pipeline's base model is named "original", so the input
    column is called "input" (and, should a model take that name too, "input image")."""
    return ["input image" if "input" in models else "input", *models]


def comparison_grid(originals: np.ndarray, recons: dict[str, np.ndarray], max_rows: int = 4,
                    zoom: int = 4) -> Image.Image:
    """Columns: the input image, then each model. Per image two rows: the full image, then a x``zoom``
    nearest-neighbour crop of its most detailed region (outlined on the original)."""
    n = min(max_rows, len(originals))
    size = originals.shape[1]
    crop = max(1, size // zoom)
    columns = list(zip(column_labels(list(recons)), [originals, *recons.values()]))
    label_h = 14
    grid = Image.new("RGB", (size * len(columns), label_h + 2 * size * n), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for c, (label, _) in enumerate(columns):
        draw.text((c * size + 2, 1), label, fill=(0, 0, 0))
    for r in range(n):
        y0, x0 = _detail_box(originals[r], crop)
        for c, (_, images) in enumerate(columns):
            top = label_h + 2 * r * size
            grid.paste(Image.fromarray(images[r]), (c * size, top))
            patch = Image.fromarray(images[r][y0 : y0 + crop, x0 : x0 + crop]).resize((size, size), Image.NEAREST)
            grid.paste(patch, (c * size, top + size))
        draw.rectangle((x0, label_h + 2 * r * size + y0, x0 + crop - 1, label_h + 2 * r * size + y0 + crop - 1),
                       outline=(255, 0, 0))
    return grid


_PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def _tick(v: float) -> str:
    return f"{v:.3g}"


def line_chart(x: list[float], series: dict[str, list[float]], title: str,
               size: tuple[int, int] = (640, 360)) -> Image.Image:
    """Curves of ``series`` over ``x`` on shared linear axes: the training curves as a PNG that
    opens anywhere (``dvc plots show`` renders through a CDN, which offline machines lack).
    Non-finite values are skipped. Deterministic bytes for the same input (DVC hashes it)."""
    w, h = size
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 64, 16, 26, 30
    x_end, y_end = w - right, h - bottom
    draw.text((left, 6), title, fill=(0, 0, 0))
    draw.rectangle((left, top, x_end, y_end), outline=(120, 120, 120))
    xs = np.asarray(x, dtype=np.float64)
    finite = [np.asarray(v, dtype=np.float64) for v in series.values()]
    values = np.concatenate([v[np.isfinite(v)] for v in finite]) if finite else np.zeros(0)
    if len(xs) == 0 or values.size == 0:
        draw.text((left + 12, (top + y_end) // 2), "no steps logged", fill=(90, 90, 90))
        return img
    x0, x1 = float(xs.min()), float(xs.max())
    x1 = x1 if x1 > x0 else x0 + 1.0
    y0, y1 = float(values.min()), float(values.max())
    pad = (y1 - y0) * 0.05 or max(abs(y0) * 0.1, 1e-3)
    y0, y1 = y0 - pad, y1 + pad

    def px(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * (x_end - left)

    def py(v: float) -> float:
        return y_end - (v - y0) / (y1 - y0) * (y_end - top)

    for i in range(5):  # horizontal grid with its values
        v = y0 + (y1 - y0) * i / 4
        draw.line((left + 1, py(v), x_end - 1, py(v)), fill=(225, 225, 225))
        draw.text((4, py(v) - 5), _tick(v), fill=(60, 60, 60))
    for v in (x0, (x0 + x1) / 2, x1):
        label = f"{v:.0f}"
        draw.text((min(px(v) - 3 * len(label), w - 6 * len(label) - 2), y_end + 6), label, fill=(60, 60, 60))
    draw.text(((left + x_end) // 2 - 12, h - 12), "step", fill=(60, 60, 60))
    for i, (name, ys) in enumerate(zip(series, finite)):
        color = _PALETTE[i % len(_PALETTE)]
        pts = [(px(a), py(b)) for a, b in zip(xs, ys) if np.isfinite(b)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        for a, b in pts[:1] if len(pts) == 1 else []:
            draw.ellipse((a - 2, b - 2, a + 2, b + 2), fill=color)
        draw.text((x_end - 8 - 6 * len(name), top + 4 + 12 * i), name, fill=color)
    return img
