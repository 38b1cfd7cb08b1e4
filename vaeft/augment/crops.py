"""Seeded multi-scale Lanczos crops with rotations and flips (Furception's augmentation).

A crop is described by a :class:`CropSpec` drawn from a generator seeded by (run seed, epoch,
sample index), so a sample is the same crop on any machine, with any worker count, and after a
resume. Rendering only resamples the region the crop needs (Pillow's ``resize(box=...)``),
which equals resizing the whole image and then cropping, at a fraction of the cost; JPEGs are
also decoded at a reduced DCT scale (draft mode) when the crop is a strong downscale.
``augment.resampler: torch`` swaps the Lanczos filter for torch's antialiased uint8 bicubic.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from vaeft.config import AugmentParams


class ImageTooSmall(ValueError):
    pass


@dataclass(frozen=True)
class CropSpec:
    scale: float  # downscale factor of the source image (1.0: native pixels)
    left: int  # region origin, in source pixels
    top: int
    region: int  # side of the rendered region in output pixels (>= crop size when rotated)
    angle: float  # arbitrary rotation, degrees (0 unless max_angle > 0)
    rot90: int  # quarter turns counter-clockwise
    hflip: bool
    vflip: bool

    @property
    def source_side(self) -> float:
        return self.region / self.scale

    def as_dict(self) -> dict:
        return asdict(self)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


def region_side(crop: int, angle: float) -> int:
    """Side of the square that still holds a crop x crop square after rotating by ``angle``."""
    if angle == 0.0:
        return crop
    a = math.radians(angle)
    # +2: room for the bicubic kernel so no border pixel is interpolated from outside.
    return math.ceil(crop * (abs(math.cos(a)) + abs(math.sin(a)))) + 2


def _draw_scale(params: AugmentParams, s_min: float, rng: np.random.Generator) -> float:
    if params.scale_mode == "none" or s_min >= 1.0:
        return 1.0
    if params.scale_mode == "uniform":
        return float(rng.uniform(s_min, 1.0))
    if params.scale_mode == "log_uniform":
        return float(math.exp(rng.uniform(math.log(s_min), 0.0)))
    feasible = [lv for lv in params.scale_levels if lv >= s_min]
    return float(rng.choice(feasible)) if feasible else s_min


def sample_spec(width: int, height: int, params: AugmentParams, rng: np.random.Generator) -> CropSpec:
    """Draw every random choice of one crop of a ``width`` x ``height`` image."""
    angle = float(rng.uniform(-params.max_angle, params.max_angle)) if params.max_angle > 0 else 0.0
    region = region_side(params.crop_size, angle)
    s_min = region / min(width, height)
    if s_min > 1.0:
        raise ImageTooSmall(
            f"image {width}x{height} cannot hold a {params.crop_size} crop"
            + (f" rotated by {angle:.1f} degrees" if angle else "")
        )
    scale = _draw_scale(params, s_min, rng)
    side = region / scale
    # Integer origins: at scale 1 the crop is then an exact copy of source pixels.
    left = int(rng.integers(0, int(math.floor(width - side)) + 1))
    top = int(rng.integers(0, int(math.floor(height - side)) + 1))
    rot90 = int(rng.integers(0, 4)) if params.rot90 else 0
    hflip = bool(params.hflip and rng.random() < 0.5)
    vflip = bool(params.vflip and rng.random() < 0.5)
    return CropSpec(scale, left, top, region, angle, rot90, hflip, vflip)


def _draft(img: Image.Image, scale: float, oversample: float) -> float:
    """Decode a JPEG at the smallest DCT scale still >= ``oversample`` x the size ``scale`` needs;
    returns the factor (1, 1/2, 1/4 or 1/8)."""
    if img.format != "JPEG" or scale >= 1.0 / oversample:
        return 1.0
    w, h = img.size
    img.draft("RGB", (math.ceil(w * scale * oversample), math.ceil(h * scale * oversample)))
    return img.size[0] / w


def _rows_needed(spec: CropSpec, factor: float) -> int:
    """Rows of a (draft-)decoded image, from the top, that rendering ``spec`` reads."""
    bottom = (spec.top + spec.source_side) * factor
    if spec.scale == 1.0 and factor == 1.0:
        return math.ceil(bottom)
    return math.ceil(bottom) + lanczos_margin(spec.scale / factor)


def _decode_top(img: Image.Image, rows: int) -> Image.Image:
    """The top ``rows`` rows of a baseline JPEG, stopping the decoder there.

    libjpeg emits scanlines top to bottom and never revisits one, so they equal the full decode's
    (``tests/test_augment.py``); the entropy decode and IDCT of the rows below are skipped.
    Ending early makes libjpeg's finish step report too few scanlines read: that status is the
    expected one here, while a stream that runs out before ``rows`` is an error as in a full load.
    """
    w, h = img.size
    if rows >= h or len(img.tile) != 1 or img.tile[0][0] != "jpeg":
        img.load()
        return img
    name, _, offset, args = img.tile[0][:4]
    decoder = Image._getdecoder(img.mode, name, args, img.decoderconfig)
    core = Image.core.new(img.mode, (w, rows))
    decoder.setimage(core, (0, 0, w, rows))
    fp = img.fp
    fp.seek(offset)
    try:
        consumed, err = decoder.decode(fp.read())
    finally:
        decoder.cleanup()
    if consumed >= 0:  # the decoder asked for more bytes than the file has
        raise OSError("image file is truncated")
    if err not in (-1, -2):
        raise OSError(f"decoder error {err} when reading image file")
    return Image.Image()._new(core)


def decode_jpeg(img: Image.Image, specs: list[CropSpec], params: AugmentParams) -> tuple[Image.Image, float]:
    """Decode a JPEG once for every crop in ``specs``: the coarsest DCT scale all of them allow
    (``augment.jpeg_draft``), and only down to the lowest row any of them reads. Returns the RGB
    image and its factor; which image a crop is rendered from depends on ``specs`` only."""
    # torch's kernel places output pixels at (i + 0.5) / scale from an integer origin: a crop's
    # origin in a DCT-scaled image is fractional, so the torch resampler reads full resolution.
    draft = params.jpeg_draft and params.resampler == "pillow"
    factor = _draft(img, max(s.scale for s in specs), params.jpeg_draft_oversample) if draft else 1.0
    if params.jpeg_draft and img.format == "JPEG":
        img = _decode_top(img, max(_rows_needed(s, factor) for s in specs))
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img, factor


def render(img: Image.Image, spec: CropSpec, params: AugmentParams) -> np.ndarray:
    """The crop of ``img`` described by ``spec``, as CHW uint8 of exactly crop_size x crop_size."""
    decoded, factor = decode_jpeg(img, [spec], params)
    return render_decoded(decoded, factor, spec, params)


def render_decoded(img: Image.Image, factor: float, spec: CropSpec, params: AugmentParams) -> np.ndarray:
    """:func:`render` from an image :func:`decode_jpeg` returned (at DCT scale ``factor``)."""
    side = spec.source_side
    box = (spec.left * factor, spec.top * factor, (spec.left + side) * factor, (spec.top + side) * factor)
    if spec.scale == 1.0 and factor == 1.0:
        region = img.crop(tuple(int(v) for v in box))  # exact source pixels, no resampling
    elif params.resampler == "torch":  # factor is 1 (decode_jpeg): integer origin
        x1, y1 = _far_corner(spec, img.width, img.height)
        whole = _rgbx_view(img)
        sub = np.asarray(img.crop((spec.left, spec.top, x1, y1))) if whole is None else whole[spec.top:y1, spec.left:x1]
        return _finish(_resize_torch(sub, spec.scale, spec.region), spec, params)
    else:
        region = img.resize((spec.region, spec.region), Image.LANCZOS, box=box, reducing_gap=params.reducing_gap)
    return _finish(region, spec, params)


def lanczos_margin(scale: float) -> int:
    """Source pixels Pillow's Lanczos kernel reaches beyond a box when downscaling by ``scale``.

    The kernel's support (3 output pixels) widens by 1 / scale in the source.
    """
    return math.ceil(3.0 / min(scale, 1.0)) + 1


def _far_corner(spec: CropSpec, w: int, h: int) -> tuple[int, int]:
    """The (x, y) end, exclusive, of the source pixels a crop's downscale reads (its kernel's reach)."""
    m = lanczos_margin(spec.scale)
    return min(w, math.ceil(spec.left + spec.source_side) + m), min(h, math.ceil(spec.top + spec.source_side) + m)


def render_array(pixels: np.ndarray, spec: CropSpec, params: AugmentParams) -> np.ndarray:
    """:func:`render` from decoded HWC uint8 pixels (e.g. a memory map), touching only the region.

    The slice keeps the Lanczos kernel's whole reach around the box, so the result equals
    rendering from the full image (``tests/test_pixel_store.py`` checks it); only the slice is
    paged in from disk.
    """
    h, w = pixels.shape[:2]
    side = spec.source_side
    if spec.scale == 1.0:
        s = int(side)
        region = Image.fromarray(np.ascontiguousarray(pixels[spec.top:spec.top + s, spec.left:spec.left + s]))
        return _finish(region, spec, params)
    x1, y1 = _far_corner(spec, w, h)
    if params.resampler == "torch":  # the kernel reads nothing above or left of the origin
        return _finish(_resize_torch(pixels[spec.top:y1, spec.left:x1], spec.scale, spec.region), spec, params)
    m = lanczos_margin(spec.scale)
    x0, y0 = max(0, spec.left - m), max(0, spec.top - m)
    sub = Image.fromarray(np.ascontiguousarray(pixels[y0:y1, x0:x1]))
    box = (spec.left - x0, spec.top - y0, spec.left - x0 + side, spec.top - y0 + side)
    region = sub.resize((spec.region, spec.region), Image.LANCZOS, box=box, reducing_gap=params.reducing_gap)
    return _finish(region, spec, params)


def _rgbx_view(img: Image.Image) -> np.ndarray | None:
    """An RGB image's pixel memory as H x W x 4 uint8 (RGB + padding), without a copy, or None.

    Pillow's own array conversion packs every row into a new buffer (~5 ns a pixel: more than
    torch's resize of a region); its Arrow export (Pillow >= 11.2) shares the memory when the
    image is one block (up to ~16 MB by default, e.g. 2 MP), else None: the caller copies.
    """
    if img.mode != "RGB" or not hasattr(img, "__arrow_c_array__"):
        return None
    import pyarrow as pa

    try:
        arr = pa.array(img)
    except ValueError:  # rows in several blocks
        return None
    w, h = img.size
    return np.frombuffer(arr.buffers()[-1], dtype=np.uint8, count=w * h * 4).reshape(h, w, 4)


def _resize_torch(sub: np.ndarray, scale: float, side: int) -> np.ndarray:
    """Antialiased bicubic downscale by ``scale`` of HWC uint8 ``sub`` (3 or 4 channels, the 4th
    dropped) to ``side`` x ``side``. ``sub`` starts at the crop's corner; its rows and columns
    past the crop only feed the kernel.

    The explicit scale, not the size ratio, sets the sampling grid, so output pixel i is centred
    at (i + 0.5) / scale as in Pillow's box resize; the kernel has no context above or left of the
    origin (it renormalises there), which is where it differs most from the Lanczos path.
    """
    import torch

    # A copy: the source is read-only (memory map, Pillow buffer), which torch warns about.
    t = torch.from_numpy(np.array(sub)).permute(2, 0, 1).unsqueeze(0)  # channels-last: the SIMD path
    out = torch.ops.aten._upsample_bicubic2d_aa(t, [side, side], False, scale, scale)
    return out[0, :3].permute(1, 2, 0).numpy()


def _finish(region: Image.Image | np.ndarray, spec: CropSpec, params: AugmentParams) -> np.ndarray:
    """Rotation, quarter turns and flips of a rendered region (image or HWC uint8); CHW uint8."""
    if spec.angle:
        if isinstance(region, np.ndarray):
            region = Image.fromarray(region)
        crop = params.crop_size
        region = region.rotate(spec.angle, resample=Image.BICUBIC)
        off = (spec.region - crop) // 2
        region = region.crop((off, off, off + crop, off + crop))
    arr = np.asarray(region)
    if spec.rot90:
        arr = np.rot90(arr, spec.rot90)
    if spec.hflip:
        arr = arr[:, ::-1]
    if spec.vflip:
        arr = arr[::-1, :]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def random_crop(img: Image.Image, params: AugmentParams, rng: np.random.Generator) -> tuple[np.ndarray, CropSpec]:
    """Draw a spec for ``img`` and render it."""
    spec = sample_spec(img.width, img.height, params, rng)
    return render(img, spec, params), spec


def naive_crop(img: Image.Image, spec: CropSpec, params: AugmentParams) -> np.ndarray:
    """Reference path: full decode, Lanczos resize of the whole image, then crop (no rotation).

    The baseline of ``bench/augment_crops.py`` and the oracle of the fast path's tests.
    """
    img = img.convert("RGB")
    w, h = img.size
    if spec.scale != 1.0:
        img = img.resize((round(w * spec.scale), round(h * spec.scale)), Image.LANCZOS)
    x, y = round(spec.left * spec.scale), round(spec.top * spec.scale)
    arr = np.asarray(img.crop((x, y, x + params.crop_size, y + params.crop_size)))
    return np.ascontiguousarray(arr.transpose(2, 0, 1))
