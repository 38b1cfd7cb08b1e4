"""Resampling and JPEG decoding libraries for the loader's crops, side by side (issue 16).

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/resamplers.py [--crops 60]

One 1728x1152 photo (JPEG quality 92), log-uniform 256^2 crop specs as the loader draws them.
Resize rows: CPU ms per crop from the decoded pixels, and PSNR (min / median) against Pillow's
exact Lanczos box resize of the full image (what ``resampler: pillow`` renders). Decode rows: ms
per image, full and DCT-scaled, and whether the pixels equal Pillow's. Optional libraries
(pyvips + pyvips-binary, opencv-python-headless, simplejpeg) are skipped when absent; none is a
dependency of vaeft. vips and OpenCV are run with their own sampling grids and edge rules (no
box origin), so their PSNR mixes filter and alignment: read their times.
"""

from __future__ import annotations

import argparse
import io
import math
import time

import numpy as np
from PIL import Image

from vaeft.augment.crops import CropSpec, render_array
from vaeft.config import AugmentParams
from vaeft.metrics.psnr import psnr


def optional(name: str):
    try:
        return __import__(name)
    except ImportError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--crops", type=int, default=60)
    ap.add_argument("--size", type=int, nargs=2, default=(1728, 1152))
    args = ap.parse_args()
    from skimage import data as skdata

    w, h = args.size
    img = Image.fromarray(skdata.astronaut()).resize((w, h), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    jpeg = buf.getvalue()
    full = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    rng = np.random.default_rng(0)
    specs = []
    for _ in range(args.crops):
        s = math.exp(rng.uniform(math.log(256 / min(w, h)), 0.0))
        side = 256 / s
        specs.append(CropSpec(s, int(rng.integers(0, int(w - side) + 1)), int(rng.integers(0, int(h - side) + 1)),
                              256, 0.0, 0, False, False))
    pimg = Image.fromarray(full)
    ref = [np.asarray(pimg.resize((256, 256), Image.LANCZOS, box=(sp.left, sp.top, sp.left + sp.source_side,
                                                                  sp.top + sp.source_side))) for sp in specs]
    hwc = lambda a: a.transpose(1, 2, 0)  # noqa: E731
    rows = {
        "Pillow Lanczos, region + margin (pillow)": lambda sp: hwc(render_array(full, sp, AugmentParams(crop_size=256))),
        "Pillow Lanczos, reducing_gap 1.5": lambda sp: hwc(render_array(full, sp, AugmentParams(crop_size=256,
                                                                                             reducing_gap=1.5))),
        "torch antialiased bicubic uint8 (torch)": lambda sp: hwc(render_array(full, sp, AugmentParams(
            crop_size=256, resampler="torch"))),
    }
    vips, cv2 = optional("pyvips"), optional("cv2")
    if vips is not None:
        vfull = vips.Image.new_from_memory(full.tobytes(), w, h, 3, "uchar")

        def vips_reduce(sp):
            n = math.ceil(sp.source_side)
            r = vfull.crop(sp.left, sp.top, min(n, w - sp.left), min(n, h - sp.top)).reduce(1 / sp.scale, 1 / sp.scale,
                                                                                           kernel="lanczos3")
            return np.ndarray(buffer=r.write_to_memory(), dtype=np.uint8, shape=[r.height, r.width, 3])[:256, :256]

        rows[f"libvips {vips.version(0)}.{vips.version(1)} reduce lanczos3"] = vips_reduce
    if cv2 is not None:
        cv2.setNumThreads(1)
        rows[f"OpenCV {cv2.__version__} INTER_AREA"] = lambda sp: cv2.resize(
            full[sp.top:sp.top + math.ceil(sp.source_side), sp.left:sp.left + math.ceil(sp.source_side)], (256, 256),
            interpolation=cv2.INTER_AREA)
    print(f"{args.crops} crops of 256^2 from {w}x{h}, log-uniform scales, one thread")
    for name, fn in rows.items():
        c0 = time.process_time()
        out = [fn(sp) for sp in specs]
        ms = (time.process_time() - c0) / len(specs) * 1e3
        dbs = [psnr(o.astype(np.uint8), r)[0] if o.shape == r.shape else float("nan") for o, r in zip(out, ref)]
        print(f"resize  {name:<44} {ms:6.2f} ms/crop   PSNR vs exact min {min(dbs):5.1f} median "
              f"{float(np.median(dbs)):5.1f} dB")

    def pil(size=None):
        with Image.open(io.BytesIO(jpeg)) as im:
            if size:
                im.draft("RGB", size)
            im.load()
            return im.copy()

    decoders = {"Pillow": lambda size: np.asarray(pil(size))}
    sj = optional("simplejpeg")
    if sj is not None:
        decoders[f"simplejpeg {sj.__version__}"] = lambda size: (
            sj.decode_jpeg(jpeg, min_width=size[0], min_height=size[1]) if size else sj.decode_jpeg(jpeg))
    for label, size in (("full", None), ("1/2 DCT", (w // 2, h // 2)), ("1/4 DCT", (w // 4, h // 4))):
        base = decoders["Pillow"](size)
        for name, fn in decoders.items():
            c0 = time.process_time()
            for _ in range(10):
                got = fn(size)
            ms = (time.process_time() - c0) / 10 * 1e3
            print(f"decode  {name + ' ' + label:<44} {ms:6.2f} ms/image  (to an array; same pixels as Pillow: "
                  f"{np.array_equal(got, base)})")
    c0 = time.process_time()
    for _ in range(10):
        pil()
    print(f"decode  {'Pillow full, no array (what the loader keeps)':<44} {(time.process_time() - c0) / 10 * 1e3:6.2f} "
          "ms/image")


if __name__ == "__main__":
    main()
