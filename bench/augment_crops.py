"""Crops per second per core: vaeft's crop paths vs a naive one, side by side on the same images.

    python bench/augment_crops.py [--images 8] [--crops 200] [--crop-size 256]

Images: ~2 MP pictures made from the photos scikit-image ships (upscaled), twice: as JPEGs
(quality 92: what curation reads) and as PNGs (what curation writes and training reads).
Naive: full decode, Lanczos resize of the whole image to the drawn scale, then the crop.
Ours: a Lanczos resize of only the crop's region; from JPEGs also a draft (reduced DCT) decode
when the downscale allows it; from the pixel store (augment.pixel_store) a memory-mapped read of
the region, no decode. One process, one thread: numbers are per core. The pixel store is read
from the page cache (a store larger than RAM adds disk reads of the region only).
"""

from __future__ import annotations

import argparse
import io
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from vaeft.augment.crops import naive_crop, render, render_array, sample_rng, sample_spec
from vaeft.config import AugmentParams
from vaeft.data.loader import decode_rgb
from vaeft.metrics.psnr import psnr

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel")


def make_images(n: int, size: tuple[int, int]) -> list[Image.Image]:
    from skimage import data as skdata

    out = []
    for name in (PHOTOS * ((n + len(PHOTOS) - 1) // len(PHOTOS)))[:n]:
        arr = getattr(skdata, name)()
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        out.append(Image.fromarray(arr[..., :3]).resize(size, Image.LANCZOS))
    return out


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def timed(fn, items) -> tuple[float, list]:
    fn(*items[0])  # warm-up
    t0 = time.perf_counter()
    out = [fn(*it) for it in items]
    return len(items) / (time.perf_counter() - t0), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--crops", type=int, default=200)
    ap.add_argument("--crop-size", type=int, default=256)
    ap.add_argument("--size", type=int, nargs=2, default=(1728, 1152), metavar=("W", "H"), help="image size (1.99 MP)")
    ap.add_argument("--per-image", type=int, default=16, help="crops per decode for the materialize path")
    args = ap.parse_args()
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass

    images = make_images(args.images, tuple(args.size))
    jpegs = [encode(im, "JPEG") for im in images]
    pngs = [encode(im, "PNG") for im in images]
    # Multi-scale crops, no rotation/flip: every path then produces the same crop.
    params = AugmentParams(crop_size=args.crop_size, scale_mode="log_uniform", rot90=False, hflip=False)
    exact_params = params.model_copy(update={"jpeg_draft": False})
    specs = [(i % len(images), sample_spec(*args.size, params, sample_rng(0, 0, i))) for i in range(args.crops)]

    def naive(src, spec):
        with Image.open(io.BytesIO(src)) as img:
            return naive_crop(img, spec, params)

    def region(src, spec, p=exact_params):
        with Image.open(io.BytesIO(src)) as img:
            return render(img, spec, p)

    def fast(src, spec):
        return region(src, spec, params)

    def online(src, spec):  # what the training loader does without a pixel store
        return render_array(decode_rgb(io.BytesIO(src)), spec, params)

    def stored(path, spec):
        return render_array(np.load(path, mmap_mode="r"), spec, params)

    rate, outputs = {}, {}
    for name, fn, sources in (("naive jpeg", naive, jpegs), ("exact jpeg", region, jpegs), ("fast jpeg", fast, jpegs),
                              ("naive png", naive, pngs), ("online png", online, pngs)):
        rate[name], outputs[name] = timed(fn, [(sources[j], s) for j, s in specs])
    with tempfile.TemporaryDirectory(prefix="vaeft-bench-") as tmp:
        paths = []
        for j, im in enumerate(images):
            paths.append(Path(tmp) / f"{j}.npy")
            np.save(paths[-1], np.asarray(im))
        rate["pixel store"], outputs["pixel store"] = timed(stored, [(paths[j], s) for j, s in specs])
        gap_params = params.model_copy(update={"reducing_gap": 1.5})
        rate["pixel store gap"], outputs["pixel store gap"] = timed(
            lambda path, spec: render_array(np.load(path, mmap_mode="r"), spec, gap_params),
            [(paths[j], s) for j, s in specs])

    # The augment stage's materialize path: one decode, K crops rendered from it.
    k = max(1, args.per_image)
    per_image = [(pngs[j], [s for jj, s in specs if jj == j][:k]) for j in range(len(images))]
    t0 = time.perf_counter()
    n_mat = 0
    for src, image_specs in per_image:
        with Image.open(io.BytesIO(src)) as img:
            pixels = np.asarray(img.convert("RGB"))
        for spec in image_specs:
            render_array(pixels, spec, params)
            n_mat += 1
    rate["materialize png"] = n_mat / (time.perf_counter() - t0)

    drift = [psnr(a.transpose(1, 2, 0), b.transpose(1, 2, 0))[0]
             for a, b in zip(outputs["exact jpeg"], outputs["fast jpeg"], strict=True)]
    gap_psnr = min(psnr(a.transpose(1, 2, 0), b.transpose(1, 2, 0))[0]
                   for a, b in zip(outputs["pixel store"], outputs["pixel store gap"], strict=True))
    store_diff = max(int(np.abs(a.astype(np.int16) - b).max())
                     for a, b in zip(outputs["online png"], outputs["pixel store"], strict=True))
    drafted = sum(1 for _, s in specs if s.scale < 0.25)
    print(f"machine: {platform.machine()}, python {platform.python_version()}, 1 thread")
    print(f"{args.crops} crops of {args.crop_size}^2 from {args.images} images of {args.size[0]}x{args.size[1]}, log-uniform scales "
          f"({drafted} of them downscaled enough for a JPEG draft decode)")
    rows = (
        ("naive jpeg", "naive, JPEG (full decode, Lanczos resize of the whole image, crop)"),
        ("exact jpeg", "vaeft, JPEG, full decode + Lanczos resize of the crop region"),
        ("fast jpeg", "vaeft, JPEG, draft decode + region resize"),
        ("naive png", "naive, PNG (full decode, Lanczos resize of the whole image, crop)"),
        ("online png", "vaeft online loader, PNG (full decode + region resize)"),
        ("pixel store", "vaeft online loader, pixel store (memory-mapped region + resize)"),
        ("pixel store gap", "vaeft online loader, pixel store, augment.reducing_gap 1.5"),
        ("materialize png", f"vaeft augment stage, PNG (one decode, {k} crops per image)"),
    )
    for key, label in rows:
        print(f"{label:<72} {rate[key]:7.1f} crops/s per core")
    print(f"ratio JPEG fast / naive: {rate['fast jpeg'] / rate['naive jpeg']:.2f}x   "
          f"PNG online / naive: {rate['online png'] / rate['naive png']:.2f}x   "
          f"pixel store / naive PNG: {rate['pixel store'] / rate['naive png']:.2f}x   "
          f"pixel store / online PNG: {rate['pixel store'] / rate['online png']:.2f}x")
    print(f"JPEG fast vs exact: PSNR min {min(drift):.1f} dB over {len(drift)} crops (inf where identical); "
          f"pixel store vs online PNG: max abs difference {store_diff} (uint8); "
          f"reducing_gap 1.5 vs exact: PSNR min {gap_psnr:.1f} dB")


if __name__ == "__main__":
    main()
