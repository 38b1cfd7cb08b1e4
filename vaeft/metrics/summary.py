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


# The headline numbers per model, in the order `dvc metrics show` prints them. Means only: the
# spread, the unavailable metrics' reasons and the notes are the report's (reports/eval/).
# The saturation ratio (the "washed-out" check) stays in the report's tables with the spread.
HEADLINE_KEYS = ("rfid", "psnr", "ssim", "lpips_vgg", "lpips_alex", "psim_candidate", "color_shift")
COLOR_SHIFT_NOTE = "mean over R, G, B of |mean shift| reconstruction - original, 0-255 units"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def headline(detail: dict[str, Any]) -> dict[str, float]:
    """The short, all-numeric form of one model's summary (``{metric}_mean`` ... ``unavailable``):
    only the metrics that were computed, each as one number. A summary already in this form is
    returned as it is (receipts written before the split hold the long form)."""
    if not any(k.endswith("_mean") for k in detail):
        return {k: detail[k] for k in HEADLINE_KEYS if _finite(detail.get(k))}
    out: dict[str, float] = {}
    for key in HEADLINE_KEYS:
        value = detail.get(key if key == "rfid" else f"{key}_mean")
        if key == "color_shift":
            shifts = [detail.get(f"shift_{c}_mean") for c in "rgb"]
            value = sum(abs(s) for s in shifts) / 3 if all(_finite(s) for s in shifts) else None
        if _finite(value):
            out[key] = float(value)
    return out
