"""Training crops per core from a sharded dataset vs from the pixel store, side by side.

    PYTHONPATH=. python bench/loader_shards.py [--images 16] [--crops 200] [--crop-size 256]

The dataset: ~2 MP JPEGs (quality 92) made from scikit-image's photos, written as tar shards +
manifest exactly as curation writes them. Each row is ``CropStream.sample`` (what a loader
worker runs per sample: read the member by offset, decode, render the seeded crop), one process,
one thread, so the numbers are per core:

* shards, JPEG: the member's bytes, draft (reduced DCT) decode when the crop is a strong
  downscale, Lanczos resize of the crop's region (``augment.jpeg_draft``, the default);
* pixel store: today's fast path: the augment stage decoded every image once into per-shard
  ``.npy``; the crop reads its region from a memory map (``jpeg_draft: false`` so that JPEGs
  are in the store too).

Both also with ``augment.reducing_gap: 1.5``. Rounds interleave the paths; read the ratios.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from vaeft.config import AugmentParams
from vaeft.data.loader import CropStream
from vaeft.data.manifest import ManifestRow, write_manifest
from vaeft.data.shards import Member, ShardWriter
from vaeft.metrics.psnr import psnr

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel")


def make_dataset(root: Path, n: int, size: tuple[int, int]) -> None:
    import hashlib

    from skimage import data as skdata

    (root / "src").mkdir(parents=True)
    writer = ShardWriter(root, "train", 1 << 30, 8)
    rows = []
    for i in range(n):
        arr = getattr(skdata, PHOTOS[i % len(PHOTOS)])()
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        img = Image.fromarray(arr[..., :3]).resize(size, Image.LANCZOS)
        if i >= len(PHOTOS):  # distinct images
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=92)
        sha = hashlib.sha256(buf.getvalue() + bytes([i])).hexdigest()
        f = root / "src" / f"{sha}.jpg"
        f.write_bytes(buf.getvalue())
        p = writer.add(Member(sha, "jpg", f))
        rows.append(ManifestRow(f"bench:{i}", sha, size[0], size[1], "bench", "train", "0" * 16, p.shard, p.member,
                                p.offset, p.size, "jpeg"))
    writer.close()
    write_manifest(root / "manifest.parquet", rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--crops", type=int, default=200)
    ap.add_argument("--crop-size", type=int, default=256)
    ap.add_argument("--size", type=int, nargs=2, default=(1728, 1152))
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    from vaeft.data.materialize import materialize_crops

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        make_dataset(root, args.images, tuple(args.size))
        base = {"crop_size": args.crop_size, "cache_images": False}
        materialize_crops(root, AugmentParams(**base, jpeg_draft=False, pixel_store=True), 0, Path(tmp) / "crops",
                          workers=1)
        store = Path(tmp) / "crops" / "pixels"
        streams = {
            "shards, JPEG (draft decode + region resize)": CropStream(root, AugmentParams(**base), 0, args.crops),
            "shards, JPEG, reducing_gap 1.5": CropStream(root, AugmentParams(**base, reducing_gap=1.5), 0, args.crops),
            "pixel store (memory-mapped region + resize)": CropStream(
                root, AugmentParams(**base, jpeg_draft=False), 0, args.crops, pixel_dir=store),
            "pixel store, reducing_gap 1.5": CropStream(
                root, AugmentParams(**base, jpeg_draft=False, reducing_gap=1.5), 0, args.crops, pixel_dir=store),
        }
        cpu = dict.fromkeys(streams, 0.0)
        wall = dict.fromkeys(streams, 0.0)
        out: dict[str, list[np.ndarray]] = {}
        for _ in range(args.rounds):
            for name, stream in streams.items():
                stream.sample(0)  # warm-up: page cache, open shard
                t0, c0 = time.perf_counter(), time.process_time()
                out[name] = [stream.sample(i)[0] for i in range(args.crops)]
                wall[name] += time.perf_counter() - t0
                cpu[name] += time.process_time() - c0
        n = args.crops * args.rounds
        print(f"{args.crops} crops of {args.crop_size}^2 x {args.rounds} rounds from {args.images} JPEGs of "
              f"{args.size[0]}x{args.size[1]} in {len({r.shard for r in streams[next(iter(streams))].rows})} shards, "
              "log-uniform scales, one process")
        for name in streams:
            print(f"{name:<48} {n / cpu[name]:7.1f} crops/s per CPU-second {n / wall[name]:7.1f} per core (wall)")
        names = list(streams)
        print(f"ratio shards JPEG / pixel store: {cpu[names[2]] / cpu[names[0]]:.2f}x   "
              f"with reducing_gap 1.5: {cpu[names[3]] / cpu[names[1]]:.2f}x (CPU time)")
        worst = min(psnr(a.transpose(1, 2, 0), b.transpose(1, 2, 0))[0]
                    for a, b in zip(out[names[0]], out[names[2]], strict=True))
        print(f"shards JPEG vs pixel store (same specs): PSNR min {worst:.1f} dB over {args.crops} crops")


if __name__ == "__main__":
    main()
