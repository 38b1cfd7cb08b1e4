"""Image-pair metrics on uint8 RGB images (HWC or NHWC).

PSNR follows the model cards: per image on [0, 1], then mean +- std over images. SSIM, LPIPS,
PSIM, rFID and colour live in their own modules
(:mod:`ssim`, :mod:`perceptual`, :mod:`fid`, :mod:`color`), combined by :mod:`suite`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def psnr(ref: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB for uint8 images; identical images give +inf."""
    if ref.shape != test.shape:
        raise ValueError(f"shape mismatch: {ref.shape} vs {test.shape}")
    if ref.ndim == 3:
        ref, test = ref[None], test[None]
    diff = ref.astype(np.float64) / 255.0 - test.astype(np.float64) / 255.0
    mse = np.mean(diff * diff, axis=tuple(range(1, diff.ndim)))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(1.0 / mse)


def mean_std(values: np.ndarray) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=0))


def json_float(x: float) -> float | str | None:
    """A float JSON can hold: NaN (undefined) -> null, +-inf (identical images' PSNR) -> "inf"."""
    x = float(x)
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return json_float(obj)
    return obj
