"""Seeded random square crops with flips.

Every random choice comes from a generator seeded by (run seed, epoch, sample index), so a
sample is the same crop on any machine, with any worker count, and after a resume.
"""

from __future__ import annotations

import numpy as np

from vaeft.config import AugmentParams


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


def random_crop(img: np.ndarray, params: AugmentParams, rng: np.random.Generator) -> np.ndarray:
    """HWC uint8 image -> CHW uint8 crop of ``params.crop_size`` (never padded)."""
    size = params.crop_size
    h, w = img.shape[:2]
    if h < size or w < size:
        raise ValueError(f"image {w}x{h} is smaller than the crop size {size}")
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    crop = img[top : top + size, left : left + size]
    if params.hflip and rng.random() < 0.5:
        crop = crop[:, ::-1]
    if params.vflip and rng.random() < 0.5:
        crop = crop[::-1, :]
    return np.ascontiguousarray(crop.transpose(2, 0, 1))
