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
