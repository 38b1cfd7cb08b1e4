"""Decode, validate and normalise one image to 8-bit RGB."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from vaeft.errors import VaeftError


class ImageRejected(VaeftError):
    """An input image that curation refuses; ``reason`` is a stable code for reports."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ImageLimits:
    min_side: int
    max_aspect: float
    max_pixels: int


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 0
        scale = 255.0 / (65535.0 if hi > 255 else 255.0)
        img = Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "PA", "La"):
        img = img.convert("RGBA")
    if img.mode == "RGBA" or img.mode == "RGBa":
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: str | Path, limits: ImageLimits) -> Image.Image:
    """Open, check and fully decode ``path``; raise :class:`ImageRejected` with a reason code."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageRejected("unreadable", str(exc)) from None
    if size == 0:
        raise ImageRejected("empty_file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageRejected("too_many_pixels", str(exc)) from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageRejected("not_an_image", str(exc)) from None
    with img:
        w, h = img.size
        if w * h > limits.max_pixels:  # checked from the header, before decoding
            raise ImageRejected("too_many_pixels", f"{w}x{h} > {limits.max_pixels} pixels")
        try:
            img.load()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ImageRejected("truncated_or_corrupt", str(exc)) from None
        img = ImageOps.exif_transpose(img)
        rgb = to_rgb(img)
    w, h = rgb.size
    if min(w, h) < limits.min_side:
        raise ImageRejected("too_small", f"{w}x{h}, min side {limits.min_side}")
    aspect = max(w, h) / min(w, h)
    if aspect > limits.max_aspect:
        raise ImageRejected("extreme_aspect", f"{w}x{h}, aspect {aspect:.2f} > {limits.max_aspect}")
    return rgb
