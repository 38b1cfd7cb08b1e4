"""Training crops per core from a sharded dataset vs from the pixel store, side by side.

    PYTHONPATH=. python bench/loader_shards.py [--images 16] [--crops 200] [--crop-size 256]

The dataset: ~2 MP JPEGs (quality 92) made from scikit-image's photos, written as tar shards +
manifest exactly as curation writes them. Each row is ``CropStream.sample`` (what a loader
worker runs per sample: read the member by offset, decode, render the seeded crop), one process,
one thread, so the numbers are per core:

* shards, JPEG, previous: the member's bytes, draft (reduced DCT) decode to >= 2x the size the
  crop needs, the whole image decoded, Lanczos resize of the crop's region (issue 16 part A);
* shards, JPEG, top rows: the same, but the decoder stops at the lowest row the crop reads
  (identical pixels; the default now);
* + ``jpeg_draft_oversample: 1``: the largest power-of-two DCT reduction the downscale allows,
  the exact Lanczos remainder (changes pixels: PSNR column);
* + ``reducing_gap: 1.5`` (cheaper resampling) and ``crops_per_image`` k (k crops per decode);
* ``resampler: torch``: torch's antialiased uint8 bicubic instead of Pillow's Lanczos (a
  different filter: PSNR column), JPEGs decoded at full resolution, top rows only;
* pixel store: today's fast path: the augment stage decoded every image once into per-shard
  ``.npy``; the crop reads its region from a memory map (``jpeg_draft: false`` so that JPEGs
  are in the store too).

The PSNR column compares each row's crops with the same crop specs rendered exactly from the
full-resolution decode (min / median over the crops). Rounds interleave the paths; read the ratios.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from vaeft.augment.crops import CropSpec, _draft, render_array, render_decoded
from vaeft.config import AugmentParams
from vaeft.data.loader import CropStream, decode_rgb
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


class PreviousStream(CropStream):
    """Issue 16 part A's JPEG path: draft decode to >= 2x, then the whole image decoded."""

    def _crop(self, idx, key, j):
        with Image.open(io.BytesIO(self._bytes(idx))) as img:
            spec = self._specs(img.width, img.height, key)[j]
            factor = _draft(img, spec.scale, 2.0)
            return render_decoded(img.convert("RGB"), factor, spec, self.augment), spec


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
        a = {**base, "jpeg_draft_oversample": 1.0}
        streams = {
            "shards, JPEG, previous (draft >= 2x, whole decode)": PreviousStream(root, AugmentParams(**base), 0, args.crops),
            "shards, JPEG, top rows only (default)": CropStream(root, AugmentParams(**base), 0, args.crops),
            "  + oversample 1": CropStream(root, AugmentParams(**a), 0, args.crops),
            "  + oversample 1, reducing_gap 1.5": CropStream(root, AugmentParams(**a, reducing_gap=1.5), 0, args.crops),
            "  crops_per_image 2": CropStream(root, AugmentParams(**base, crops_per_image=2), 0, args.crops),
            "  crops_per_image 4": CropStream(root, AugmentParams(**base, crops_per_image=4), 0, args.crops),
            "  + oversample 1, crops_per_image 2": CropStream(root, AugmentParams(**a, crops_per_image=2), 0, args.crops),
            "  + oversample 1, crops_per_image 4": CropStream(root, AugmentParams(**a, crops_per_image=4), 0, args.crops),
            "  crops_per_image 4, reducing_gap 2.0": CropStream(
                root, AugmentParams(**base, crops_per_image=4, reducing_gap=2.0), 0, args.crops),
            "  + oversample 1, crops_per_image 4, reducing_gap 1.5": CropStream(
                root, AugmentParams(**a, crops_per_image=4, reducing_gap=1.5), 0, args.crops),
            "shards, JPEG, resampler torch (full-res top rows)": CropStream(
                root, AugmentParams(**base, resampler="torch"), 0, args.crops),
            "  + resampler torch, crops_per_image 2": CropStream(
                root, AugmentParams(**base, resampler="torch", crops_per_image=2), 0, args.crops),
            "  + resampler torch, crops_per_image 4": CropStream(
                root, AugmentParams(**base, resampler="torch", crops_per_image=4), 0, args.crops),
            "pixel store (memory-mapped region + resize)": CropStream(
                root, AugmentParams(**base, jpeg_draft=False), 0, args.crops, pixel_dir=store),
            "pixel store, reducing_gap 1.5": CropStream(
                root, AugmentParams(**base, jpeg_draft=False, reducing_gap=1.5), 0, args.crops, pixel_dir=store),
            "pixel store, resampler torch": CropStream(
                root, AugmentParams(**base, jpeg_draft=False, resampler="torch"), 0, args.crops, pixel_dir=store),
        }
        cpu = dict.fromkeys(streams, 0.0)
        wall = dict.fromkeys(streams, 0.0)
        out: dict[str, list[tuple[np.ndarray, dict]]] = {}
        for _ in range(args.rounds):
            for name, stream in streams.items():
                stream.sample(args.crops)  # warm-up: page cache, open shard (not one of the timed groups)
                t0, c0 = time.perf_counter(), time.process_time()
                out[name] = [stream.sample(i) for i in range(args.crops)]
                wall[name] += time.perf_counter() - t0
                cpu[name] += time.process_time() - c0
        n = args.crops * args.rounds
        first = streams[next(iter(streams))]
        print(f"{args.crops} crops of {args.crop_size}^2 x {args.rounds} rounds from {args.images} JPEGs of "
              f"{args.size[0]}x{args.size[1]} in {len({r.shard for r in first.rows})} shards, "
              "log-uniform scales, one process")
        full = {i: decode_rgb(io.BytesIO(first.data.read(r))) for i, r in enumerate(first.rows)}
        exact = AugmentParams(**base, jpeg_draft=False)
        names = list(streams)
        for name in names:
            dbs = []
            for crop, meta in out[name]:
                spec = CropSpec(**{f: meta[f] for f in CropSpec.__dataclass_fields__})
                ref = render_array(full[meta["image"]], spec, exact)
                dbs.append(psnr(crop.transpose(1, 2, 0), ref.transpose(1, 2, 0))[0])
            print(f"{name:<54} {n / cpu[name]:7.1f} crops/s per CPU-second {n / wall[name]:7.1f} per core (wall)   "
                  f"PSNR vs exact min {min(dbs):5.1f} median {float(np.median(dbs)):5.1f} dB")
        print("ratios per CPU-second, vs previous: " + "  ".join(
            f"{name.strip()}: {cpu[names[0]] / cpu[name]:.2f}x" for name in names[1:]))


if __name__ == "__main__":
    main()
