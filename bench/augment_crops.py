"""Crops per second per core: vaeft's crop path vs a naive one, side by side on the same images.

    python bench/augment_crops.py [--images 8] [--crops 200] [--crop-size 256]

Images: ~2 MP JPEGs generated from the photos scikit-image ships (upscaled, quality 92).
Ours: header-only size, a seeded crop spec, JPEG draft decode when the downscale allows it, and
a Lanczos resize of only the crop's region. Naive: full decode, Lanczos resize of the whole
image to the drawn scale, then the crop. One process, one thread: numbers are per core.
"""

from __future__ import annotations

import argparse
import io
import platform
import time

import numpy as np
from PIL import Image

from vaeft.augment.crops import naive_crop, render, sample_rng, sample_spec
from vaeft.config import AugmentParams
from vaeft.evaluate.metrics import psnr

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel")


def make_jpegs(n: int) -> list[bytes]:
    from skimage import data as skdata

    out = []
    for name in (PHOTOS * ((n + len(PHOTOS) - 1) // len(PHOTOS)))[:n]:
        arr = getattr(skdata, name)()
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        img = Image.fromarray(arr[..., :3]).resize((1728, 1152), Image.LANCZOS)  # 1.99 MP
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=92)
        out.append(buf.getvalue())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--crops", type=int, default=200)
    ap.add_argument("--crop-size", type=int, default=256)
    ap.add_argument("--per-image", type=int, default=16, help="crops per decode for the materialize path")
    args = ap.parse_args()
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass

    jpegs = make_jpegs(args.images)
    # Multi-scale crops, no rotation/flip: both paths then produce the same crop.
    params = AugmentParams(crop_size=args.crop_size, scale_mode="log_uniform", rot90=False, hflip=False)
    specs = []
    for i in range(args.crops):
        data = jpegs[i % len(jpegs)]
        with Image.open(io.BytesIO(data)) as img:
            specs.append((data, sample_spec(img.width, img.height, params, sample_rng(0, 0, i))))

    exact_params = params.model_copy(update={"jpeg_draft": False})

    def fast(data, spec):
        with Image.open(io.BytesIO(data)) as img:
            return render(img, spec, params)

    def exact(data, spec):
        with Image.open(io.BytesIO(data)) as img:
            return render(img, spec, exact_params)

    def naive(data, spec):
        with Image.open(io.BytesIO(data)) as img:
            return naive_crop(img, spec, params)

    rate, outputs = {}, {}
    for name, fn in (("naive", naive), ("exact", exact), ("fast", fast)):
        fn(*specs[0])  # warm-up
        t0 = time.perf_counter()
        outputs[name] = [fn(d, s) for d, s in specs]
        rate[name] = len(specs) / (time.perf_counter() - t0)
    # The augment stage's path: one decode per image, K crops rendered from it.
    k = max(1, args.per_image)
    per_image = [(jpegs[j % len(jpegs)], [s for _, s in specs[j::len(jpegs)][:k]]) for j in range(len(jpegs))]
    t0 = time.perf_counter()
    n_mat = 0
    for data, image_specs in per_image:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
            for spec in image_specs:
                render(img, spec, exact_params)
                n_mat += 1
    rate["materialize"] = n_mat / (time.perf_counter() - t0)
    drift = [psnr(a.transpose(1, 2, 0), b.transpose(1, 2, 0))[0] for a, b in zip(outputs["exact"], outputs["fast"])]
    drafted = sum(1 for d, s in specs if s.scale < 0.25)
    print(f"machine: {platform.machine()}, python {platform.python_version()}, 1 thread")
    print(f"{args.crops} crops of {args.crop_size}^2 from {args.images} JPEGs of 1728x1152 (~2 MP), log-uniform scales "
          f"({drafted} of them downscaled enough for a draft decode)")
    print(f"naive (full decode, Lanczos resize of the whole image, crop): {rate['naive']:7.1f} crops/s per core")
    print(f"vaeft exact (full decode, Lanczos resize of the crop region): {rate['exact']:7.1f} crops/s per core")
    print(f"vaeft fast  (JPEG draft decode + region resize, the default): {rate['fast']:7.1f} crops/s per core")
    print(f"vaeft materialize (one decode, {k} crops per image):        {rate['materialize']:7.1f} crops/s per core")
    print(f"ratio fast / naive: {rate['fast'] / rate['naive']:.2f}x   exact / naive: {rate['exact'] / rate['naive']:.2f}x   "
          f"materialize / naive: {rate['materialize'] / rate['naive']:.2f}x")
    print(f"fast vs exact path: PSNR min {min(drift):.1f} dB over {len(drift)} crops (inf where identical)")


if __name__ == "__main__":
    main()
