"""Decode, validate and normalise one image to 8-bit sRGB."""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps

from vaeft.errors import VaeftError


class ImageRejected(VaeftError):
    """An input image that curation refuses; ``reason`` is a stable code for reports."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


# Decoding a file takes its pixels at the file's own depth plus the 8-bit RGB result (Pillow
# keeps RGB as 4 bytes per pixel): refused up front when that exceeds the budget.
DECODE_BUDGET = 2 << 30
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I": 4, "F": 4, "LA": 4, "PA": 4,
                    "RGB": 4, "RGBA": 4, "RGBa": 4, "CMYK": 4, "YCbCr": 4, "LAB": 4, "HSV": 4}
_ROWS = 256  # rows converted at a time from 16/32-bit gray: bounds the temporaries


@dataclass(frozen=True)
class ImageLimits:
    min_side: int
    max_aspect: float
    max_pixels: int
    max_decode_bytes: int = DECODE_BUDGET


def decode_bytes(mode: str, width: int, height: int) -> int:
    """Peak bytes to decode an image of this header and turn it into 8-bit RGB."""
    src = _BYTES_PER_PIXEL.get(mode, 8)
    gray_step = 1 if mode in ("I;16", "I;16B", "I;16L", "I", "F") else 0  # the 8-bit gray in between
    return width * height * (src + gray_step + 4)


def _deep_gray_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit gray -> 8-bit, a block of rows at a time, in integers.

    Values scale by 255/65535 (or pass through when none exceeds 255), rounded half up: the same
    numbers as float maths, without float64 copies of the whole image (27 bytes per pixel).
    """
    w, h = img.size
    hi = img.getextrema()[1] if w and h else 0
    out = np.empty((h, w), np.uint8)
    for top in range(0, h, _ROWS):
        block = np.asarray(img.crop((0, top, w, min(h, top + _ROWS))), dtype=np.int64)
        if hi > 255:
            block = (np.clip(block, 0, 65535) * 510 + 65535) // 131070
        out[top:top + block.shape[0]] = np.clip(block, 0, 255)
    return Image.fromarray(out, mode="L")


_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = _deep_gray_to_l(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "PA", "La"):
        img = img.convert("RGBA")
    if img.mode == "RGBA" or img.mode == "RGBa":
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def to_srgb(img: Image.Image) -> Image.Image:
    """Apply an embedded ICC profile (RGB, CMYK or gray) so pixels are sRGB.

    A broken or mismatched profile is ignored rather than rejecting the image: scraped files
    carry plenty of junk profiles and their pixels are usually fine as they are.
    """
    icc = img.info.get("icc_profile")
    if not icc or img.mode not in ("RGB", "RGBA", "CMYK", "L"):
        return img
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        out_mode = "RGBA" if img.mode == "RGBA" else "RGB"
        converted = ImageCms.profileToProfile(img, src, _SRGB, outputMode=out_mode)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return img
    return converted if converted is not None else img


def _open(data: bytes | Path) -> Image.Image:
    return Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)


def _checked_open(src: str | Path | bytes, limits: ImageLimits) -> Image.Image:
    """Open ``src`` and check what its header says, before anything is decoded."""
    if isinstance(src, bytes):
        size = len(src)
    else:
        src = Path(src)
        try:
            size = src.stat().st_size
        except OSError as exc:
            raise ImageRejected("unreadable", str(exc)) from None
    if size == 0:
        raise ImageRejected("empty_file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = _open(src)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageRejected("too_many_pixels", str(exc)) from None
        except (OSError, ValueError, SyntaxError) as exc:
            # Pillow names the BytesIO object (a memory address): keep reports reproducible.
            raise ImageRejected("not_an_image", re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))) from None
    w, h = img.size
    if w * h > limits.max_pixels:  # checked from the header, before decoding
        img.close()
        raise ImageRejected("too_many_pixels", f"{w}x{h} > {limits.max_pixels} pixels")
    need = decode_bytes(img.mode, w, h)
    if need > limits.max_decode_bytes:
        img.close()
        raise ImageRejected("too_large_to_decode", f"{w}x{h} {img.mode} needs ~{need >> 20} MiB to decode, "
                            f"budget {limits.max_decode_bytes >> 20} MiB")
    return img


def _check_shape(w: int, h: int, limits: ImageLimits) -> None:
    if min(w, h) < limits.min_side:
        raise ImageRejected("too_small", f"{w}x{h}, min side {limits.min_side}")
    aspect = max(w, h) / min(w, h)
    if aspect > limits.max_aspect:
        raise ImageRejected("extreme_aspect", f"{w}x{h}, aspect {aspect:.2f} > {limits.max_aspect}")


def load_rgb(src: str | Path | bytes, limits: ImageLimits) -> Image.Image:
    """Open, check and fully decode ``src`` (a path or the file's bytes).

    Returns 8-bit sRGB without metadata (an untagged image is sRGB by convention); raises :class:`ImageRejected` with a reason code.
    """
    img = _checked_open(src, limits)
    with img:
        try:
            # Animated files: the first frame is the image; later frames are not decoded.
            img.load()
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
            raise ImageRejected("truncated_or_corrupt", str(exc)) from None
        try:
            img = ImageOps.exif_transpose(img)
        except (OSError, ValueError, SyntaxError, KeyError, TypeError):
            pass  # unparsable EXIF: keep the stored orientation
        rgb = to_rgb(to_srgb(img))
    # The pixels are sRGB now; metadata that rode along (the source's or LittleCMS's own sRGB
    # profile, which embeds its creation time) would only make the stored bytes vary per run.
    rgb.info.clear()
    try:
        _check_shape(*rgb.size, limits)
    except ImageRejected:
        rgb.close()
        raise
    return rgb


def _is_srgb(icc: bytes) -> bool:
    """True for an sRGB profile, and for one LittleCMS cannot parse (:func:`to_srgb` ignores those too)."""
    try:
        desc = ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc)))
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return True
    return desc.strip().lower().startswith("srgb")


def keeps_original(img: Image.Image) -> bool:
    """Whether an opened (not yet decoded) file is stored as it is: a JPEG that any reader decodes
    to the pixels normalisation would give.

    That is 8-bit RGB or gray (CMYK/YCCK need conversion; JPEG has no alpha), no EXIF rotation
    (the stored width/height are the upright ones) and no ICC profile other than sRGB (readers do
    no colour management). Baseline and progressive alike; MPO (camera multi-picture) is not
    plain JPEG and is re-encoded.
    """
    if img.format != "JPEG" or img.mode not in ("RGB", "L"):
        return False
    try:
        if img.getexif().get(0x0112, 1) in range(2, 9):  # exif_transpose would turn it
            return False
    except (OSError, ValueError, SyntaxError, KeyError, TypeError):
        pass  # unparsable EXIF: load_rgb keeps the stored orientation too
    icc = img.info.get("icc_profile")
    return not icc or _is_srgb(icc)


@dataclass
class Prepared:
    """What curation stores for one image: the original bytes (``data`` None) or normalised PNG bytes."""

    data: bytes | None
    ext: str  # "jpg" | "png"
    width: int
    height: int
    image: Image.Image  # for the pHash: a 1/8-scale draft decode on the JPEG path, else the pixels


def prepare_for_store(data: bytes, limits: ImageLimits) -> Prepared:
    """Validate ``data`` and decide what curation stores; raises :class:`ImageRejected`.

    The JPEG path decodes at 1/8 scale (libjpeg's DCT scaling): every entropy-coded block is
    still read, so truncation and corruption are caught, at a fraction of a full decode's cost.
    Everything else is fully decoded and normalised (:func:`load_rgb`) into deterministic PNG.
    """
    if not data:
        raise ImageRejected("empty_file")
    img = _checked_open(data, limits)
    if not keeps_original(img):
        img.close()
        rgb = load_rgb(data, limits)
        buf = io.BytesIO()
        save_png(rgb, buf)
        return Prepared(buf.getvalue(), "png", rgb.width, rgb.height, rgb)
    w, h = img.size
    # >= 64 px a side so the pHash's 32x32 box filter still only shrinks.
    img.draft("RGB", (max(64, w // 8), max(64, h // 8)))
    try:
        img.load()
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        img.close()
        raise ImageRejected("truncated_or_corrupt", str(exc)) from None
    try:
        _check_shape(w, h, limits)
    except ImageRejected:
        img.close()
        raise
    return Prepared(None, "jpg", w, h, img)


def save_png(img: Image.Image, path: str | Path | io.BytesIO) -> None:
    """PNG bytes that depend on the pixels only: no ICC profile, EXIF, text or dpi chunks.

    Pillow takes ``icc_profile`` from ``img.info`` unless told otherwise; the curated store's
    bytes are what DVC hashes, so nothing run-dependent may reach them.
    """
    img.save(path, format="PNG", icc_profile=None, pnginfo=None)
