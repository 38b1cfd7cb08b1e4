"""Eval images: shorter-side Lanczos resize to the eval size, then a centre crop.

The published tables used COCO 2017 val at 256x256 without stating the resize/crop protocol;
this one is written into every evaluation's metadata.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vaeft.data.manifest import ManifestRow, read_manifest

PROTOCOL = "shorter-side resize (Lanczos, antialiased) to {size}, centre crop {size}x{size}, uint8 RGB"


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    scale = size / min(w, h)
    if scale != 1.0:
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.LANCZOS)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def eval_images(data_dir: str | Path, size: int) -> tuple[list[ManifestRow], np.ndarray]:
    """The eval split as (rows, uint8 array N x size x size x 3)."""
    data_dir = Path(data_dir)
    rows = read_manifest(data_dir, split="eval")
    if not rows:
        raise ValueError(f"{data_dir}: the manifest has no eval images")
    arrays = [np.asarray(resize_center_crop(Image.open(data_dir / r.stored_path).convert("RGB"), size)) for r in rows]
    return rows, np.stack(arrays)
