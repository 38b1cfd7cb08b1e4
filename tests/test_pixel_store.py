"""The augment stage's pixel store: crops read from memory-mapped pixels equal crops from the stored PNGs."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from vaeft.augment.crops import render, render_array, sample_rng, sample_spec
from vaeft.config import AugmentParams
from vaeft.data.loader import CropStream, decode_rgb, train_batches
from vaeft.data.manifest import read_manifest
from vaeft.data.materialize import PIXEL_DIR, PIXEL_INDEX, PixelStore, materialize_crops, pixel_rows, pixel_store_dir
from vaeft.data.shards import ShardStore


def _params(**kw) -> AugmentParams:
    return AugmentParams(**{"crop_size": 32, **kw})


@pytest.mark.parametrize(("mode", "angle", "gap"), [("none", 0.0, None), ("log_uniform", 0.0, None),
                                                    ("levels", 20.0, None), ("log_uniform", 20.0, 1.5)])
def test_region_render_matches_whole_image_render(mode, angle, gap):
    # A PNG (no JPEG draft): render() resamples from the whole decoded image, render_array() from
    # a slice that keeps the kernel's reach. Float rounding of the shifted box may flip a value by
    # one step on a handful of pixels, never more.
    img = Image.fromarray(skdata.astronaut()).resize((401, 293), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    pixels = np.asarray(img)
    p = _params(crop_size=48, scale_mode=mode, max_angle=angle, vflip=True, reducing_gap=gap)
    differing = total = 0
    for i in range(60):
        spec = sample_spec(401, 293, p, sample_rng(5, 0, i))
        with Image.open(io.BytesIO(buf.getvalue())) as src:
            ref = render(src, spec, p)
        got = render_array(pixels, spec, p)
        assert got.shape == ref.shape == (3, 48, 48)
        diff = np.abs(ref.astype(np.int16) - got)
        assert diff.max() <= 1, spec
        differing += int((diff > 0).sum())
        total += diff.size
    assert differing / total < 1e-3


def test_stage_writes_a_deterministic_store_and_loader_crops_are_identical(tmp_path, curated):
    p = _params(pixel_store=True, max_angle=10.0)
    one = materialize_crops(curated, p, seed=3, out_dir=tmp_path / "w1", workers=1)
    materialize_crops(curated, p, seed=3, out_dir=tmp_path / "w2", workers=2)
    assert one.n_crops == 0
    rows = read_manifest(curated, split="train")
    store = pixel_store_dir(tmp_path / "w1")
    assert store == tmp_path / "w1" / PIXEL_DIR
    # One file per curated shard, holding only the images training reads as pixels (not the JPEGs).
    stored_rows = pixel_rows(rows, p)
    assert 0 < len(stored_rows) < len(rows) and all(r.format == "png" for r in stored_rows)
    shards = {r.shard.rsplit("/", 1)[1].replace(".tar", ".npy") for r in stored_rows}
    assert sorted(f.name for f in store.iterdir()) == sorted(shards | {PIXEL_INDEX})
    for name in shards | {PIXEL_INDEX}:
        assert (store / name).read_bytes() == (tmp_path / "w2" / PIXEL_DIR / name).read_bytes()
    pixels, data = PixelStore(store), ShardStore(curated)
    for r in stored_rows:
        arr = pixels.array(r.sha256)
        assert arr.shape == (r.height, r.width, 3) and np.array_equal(arr, decode_rgb(data.open_row(r)))

    from_png = CropStream(curated, p, seed=3, length=64)
    from_store = CropStream(curated, p, seed=3, length=64, pixel_dir=store)
    for i in range(0, 64, 3):
        a, spec_a = from_png.sample(i)
        b, spec_b = from_store.sample(i)
        assert spec_a == spec_b and a.tobytes() == b.tobytes()

    loader = train_batches(curated, p, seed=3, batch_size=4, start_step=0, total_steps=2, crops_dir=tmp_path / "w1")
    assert loader.dataset.pixels is not None
    assert len(list(loader)) == 2


def test_store_without_the_training_images_is_refused(tmp_path, curated):
    (tmp_path / "pixels").mkdir()
    with pytest.raises(ValueError, match=r"pixel store .* lacks \d+ of \d+ training images"):
        CropStream(curated, _params(), seed=0, length=8, pixel_dir=tmp_path / "pixels")


def test_no_store_without_the_option(tmp_path, curated):
    materialize_crops(curated, _params(), seed=0, out_dir=tmp_path / "none")
    assert pixel_store_dir(tmp_path / "none") is None and pixel_store_dir(None) is None


def test_crop_bench_runs_and_the_store_matches_the_loader():
    import re
    import subprocess
    import sys

    from .conftest import REPO_ROOT

    proc = subprocess.run([sys.executable, "bench/augment_crops.py", "--images", "1", "--crops", "4", "--crop-size", "64", "--size", "480", "320"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rates = [float(v) for v in re.findall(r"([\d.]+) crops/s per core", proc.stdout)]
    assert len(rates) == 8 and all(r > 0 for r in rates), proc.stdout
    assert "pixel store vs online PNG: max abs difference 0 (uint8)" in proc.stdout
    assert re.search(r"pixel store / online PNG: [\d.]+x", proc.stdout)


def test_reducing_gap_stays_close_to_exact_lanczos():
    from vaeft.metrics.psnr import psnr

    pixels = np.asarray(Image.fromarray(skdata.astronaut()).resize((900, 700), Image.LANCZOS))
    # Small crops of a small image are the hard case (1.5 gives ~41 dB here, ~49.5 dB at 256 from 2 MP).
    exact, fast = _params(crop_size=64), _params(crop_size=64, reducing_gap=2.0)
    worst = min(
        psnr(render_array(pixels, spec, exact).transpose(1, 2, 0), render_array(pixels, spec, fast).transpose(1, 2, 0))[0]
        for spec in (sample_spec(900, 700, exact, sample_rng(2, 0, i)) for i in range(40))
    )
    assert 45.0 <= worst  # inf when every crop was too mild a downscale to reduce
