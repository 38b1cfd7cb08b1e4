"""Curation throughput per core on ~2 MP JPEGs, today's path and the previous one side by side.

    PYTHONPATH=. python bench/curate_throughput.py [--n 40] [--rounds 3]

Both paths take the file's bytes and do what ``process_item`` does per image, in one process:
sha256, validation, pHash and the bytes to store.

* previous: full decode + EXIF + ICC -> sRGB + RGB normalisation (``load_rgb``), pHash of the
  full pixels, and the deterministic PNG every image was re-encoded to (also timed without it,
  as the earlier version of this bench did);
* sharded: ``prepare_for_store``: a valid sRGB JPEG is validated by a 1/8-scale decode (every
  entropy-coded block is still read) and kept as it is; pHash of the reduced decode.

The rounds interleave the paths, so a busy machine slows them alike: read the ratio.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import time

import numpy as np
from PIL import Image

from vaeft.data.images import ImageLimits, load_rgb, prepare_for_store, save_png
from vaeft.data.phash import phash


def jpeg_2mp(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (108, 192, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((1920, 1080), Image.BICUBIC)  # ~2.07 MP, photo-like smoothness
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def previous(data: bytes, limits: ImageLimits, png: bool) -> None:
    hashlib.sha256(data).hexdigest()
    img = load_rgb(data, limits)
    phash(img)
    if png:
        save_png(img, io.BytesIO())
    img.close()


def sharded(data: bytes, limits: ImageLimits) -> None:
    hashlib.sha256(data).hexdigest()
    prep = prepare_for_store(data, limits)
    assert prep.data is None  # kept as it came
    phash(prep.image)
    prep.image.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    blobs = [jpeg_2mp(i) for i in range(args.n)]
    limits = ImageLimits(min_side=64, max_aspect=4.0, max_pixels=89_478_485)
    paths = {
        "previous: full decode + pHash + PNG re-encode": lambda d: previous(d, limits, True),
        "previous: full decode + pHash (no PNG write)": lambda d: previous(d, limits, False),
        "sharded: 1/8-scale validation + pHash, bytes kept": lambda d: sharded(d, limits),
    }
    cpu = dict.fromkeys(paths, 0.0)
    wall = dict.fromkeys(paths, 0.0)
    for _ in range(args.rounds):
        for name, fn in paths.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for data in blobs:
                fn(data)
            wall[name] += time.perf_counter() - t0
            cpu[name] += time.process_time() - c0
    n = args.n * args.rounds
    print(f"{args.n} JPEGs 1920x1080 ({np.mean([len(b) for b in blobs]) / 1e6:.2f} MB avg) x {args.rounds} rounds, "
          "one process")
    for name in paths:
        print(f"{name:<55} {n / wall[name]:7.1f} images/s per core (wall) {n / cpu[name]:7.1f} per CPU-second")
    base, new = list(paths)[1], list(paths)[2]
    print(f"ratio sharded / previous (no PNG write): {cpu[base] / cpu[new]:.2f}x   "
          f"sharded / previous with its PNG write: {cpu[list(paths)[0]] / cpu[new]:.2f}x (CPU time)")


if __name__ == "__main__":
    main()
