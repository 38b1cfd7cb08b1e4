"""Summaries of per-image metric values, and the JSON form they are written in."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


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
