"""Curation throughput: validation (full decode + normalise) and hashing (sha256 + pHash) of
~2 MP JPEGs generated on the fly, in one process. Prints images/s per core.

    PYTHONPATH=. python bench/curate_throughput.py [--n 40]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import time

import numpy as np
from PIL import Image

from vaeft.data.images import ImageLimits, load_rgb
from vaeft.data.phash import phash


def jpeg_2mp(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (108, 192, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((1920, 1080), Image.BICUBIC)  # ~2.07 MP, photo-like smoothness
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40)
    args = ap.parse_args()
    blobs = [jpeg_2mp(i) for i in range(args.n)]
    limits = ImageLimits(min_side=64, max_aspect=4.0, max_pixels=89_478_485)
    t0, c0 = time.perf_counter(), time.process_time()
    for data in blobs:
        hashlib.sha256(data).hexdigest()
        img = load_rgb(data, limits)
        phash(img)
        img.close()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"{args.n} JPEGs 1920x1080 ({np.mean([len(b) for b in blobs]) / 1e6:.2f} MB avg): "
          f"{args.n / wall:.1f} images/s per core (wall), {args.n / cpu:.1f} images/s per CPU-second")


if __name__ == "__main__":
    main()
