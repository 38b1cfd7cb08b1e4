"""Curation edge cases built on disk: non-UTF-8 names, dangling and looping symlinks, a corrupt tar
header mid-shard, a deep 16-bit PNG decoded in bounded memory, de-duplication keeping the best copy."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from vaeft.config import DataParams, SourceParams
from vaeft.data.curate import REPORT_FILE, curate
from vaeft.data.images import ImageLimits, ImageRejected, load_rgb
from vaeft.data.manifest import MANIFEST_FILE, read_manifest

from .curate_corpus import add_bytes, photo, png_bytes


def _params(tmp_path, sources, **kw) -> DataParams:
    kw.setdefault("workers", 1)
    kw.setdefault("eval_fraction", 0.5)
    kw.setdefault("work_dir", str(tmp_path / "work"))
    return DataParams(sources=sources, min_side=64, **kw)


def _report(out):
    return json.loads((out / REPORT_FILE).read_text(encoding="utf-8"))


def _folder(path, seeds):
    path.mkdir(parents=True)
    for s in seeds:
        Image.fromarray(photo(s)).save(path / f"p{s}.png")
    return path


def test_non_utf8_names_and_broken_symlinks_are_reported_not_fatal(tmp_path):
    src = _folder(tmp_path / "src", [1, 2, 3, 4])
    raw = os.fsencode(src) + b"/caf\xe9.png"  # Latin-1 name: not UTF-8
    with open(raw, "wb") as fh:
        fh.write(png_bytes(photo(5)))
    os.symlink(src / "gone.png", src / "dangling.png")
    os.symlink(src / "loop-b.png", src / "loop-a.png")
    os.symlink(src / "loop-a.png", src / "loop-b.png")
    out = tmp_path / "out"
    curate(_params(tmp_path, [SourceParams(name="s", kind="folder", path=str(src))]), out)
    locations = {r.location for r in read_manifest(out)}
    assert f"{src}/caf\\xe9.png" in locations  # kept, named by a safe repr of its bytes
    rejected = {r["location"]: r for r in _report(out)["rejected_files"]}
    assert rejected[f"{src}/dangling.png"]["reason"] == "dangling_symlink"
    assert "gone.png" in rejected[f"{src}/dangling.png"]["detail"]
    assert rejected[f"{src}/loop-a.png"]["reason"] == rejected[f"{src}/loop-b.png"]["reason"] == "symlink_loop"
    assert (out / MANIFEST_FILE).is_file()


def test_a_corrupt_tar_header_mid_shard_is_reported(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(8):
            add_bytes(tf, f"s/{i:03d}.png", png_bytes(photo(20 + i)))
    data = bytearray(buf.getvalue())
    # The sixth member's header: its checksum no longer matches.
    offsets = [m.offset for m in tarfile.open(fileobj=io.BytesIO(bytes(data))).getmembers()]
    data[offsets[5] + 148: offsets[5] + 156] = b"0000000\0"
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "000.tar").write_bytes(bytes(data))
    out = tmp_path / "out"
    curate(_params(tmp_path, [SourceParams(name="t", kind="tar", path=str(tmp_path / "shards"))]), out)
    rep = _report(out)
    bad = [r for r in rep["rejected_files"] if r["reason"] == "corrupt_shard"]
    assert len(bad) == 1 and f"invalid tar header at byte {offsets[5]}" in bad[0]["detail"]
    assert rep["kept"] == 5  # the members before it; the three after it are named as not read
    # A whole shard ends cleanly: no report.
    (tmp_path / "shards" / "000.tar").write_bytes(buf.getvalue())
    curate(_params(tmp_path, [SourceParams(name="t", kind="tar", path=str(tmp_path / "shards"))]),
           tmp_path / "out2")
    assert not [r for r in _report(tmp_path / "out2")["rejected_files"] if r["reason"] == "corrupt_shard"]


_PEAK = """
import resource, sys
from vaeft.data.images import ImageLimits, load_rgb
data = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
img = load_rgb(data, ImageLimits(64, 10.0, 10**9))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(img.size[0], img.size[1], (after - before) * 1024)
"""


def test_a_deep_16bit_png_decodes_in_bounded_memory(tmp_path):
    """9400² would take minutes to write here; 2400² (5.8 Mpx) is measured instead and held to a
    per-pixel bound: the old float64 path peaked at ~27 bytes per pixel (2.45 GB at 9400²)."""
    side = 2400
    ramp = (np.arange(side * side, dtype=np.uint32) * 7919 % 65536).astype(np.uint16).reshape(side, side)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path, compress_level=1)  # I;16
    res = subprocess.run([sys.executable, "-c", _PEAK, str(path)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    w, h, peak = map(int, res.stdout.split())
    assert (w, h) == (side, side)
    per_pixel = peak / (side * side)
    assert per_pixel < 12, f"{per_pixel:.1f} bytes per pixel"
    # The 8-bit values are the float maths' exactly (scaled by 255/65535, rounded half up).
    small = Image.fromarray(ramp[:64, :640])
    got = np.asarray(load_rgb(png_bytes_16(small), ImageLimits(16, 20.0, 10**9)))[..., 0]
    want = np.clip(ramp[:64, :640].astype(np.float64) * (255 / 65535) + 0.5, 0, 255).astype(np.uint8)
    assert np.array_equal(got, want)


def png_bytes_16(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_decode_budget_is_checked_from_the_header(tmp_path):
    data = png_bytes_16(Image.fromarray(np.zeros((300, 400), np.uint16)))
    with pytest.raises(ImageRejected) as info:
        load_rgb(data, ImageLimits(64, 10.0, 10**9, max_decode_bytes=400 * 300 * 6))
    assert info.value.reason == "too_large_to_decode" and "400x300 I;16" in info.value.detail
    assert load_rgb(data, ImageLimits(64, 10.0, 10**9, max_decode_bytes=400 * 300 * 7)).size == (400, 300)


def test_deduplication_keeps_the_largest_copy_at_any_worker_count(tmp_path):
    src = _folder(tmp_path / "src", [31, 32, 33, 34])
    original = Image.fromarray(photo(40, size=(451, 300)))
    original.save(src / "z_original.png")
    original.resize((219, 145), Image.Resampling.LANCZOS).save(src / "a_thumb.png")  # seen first
    manifests = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        curate(_params(tmp_path, [SourceParams(name="s", kind="folder", path=str(src))], workers=workers,
                       shard_size=2, work_dir=str(tmp_path / f"work{workers}")), out)
        rows = {r.location: r for r in read_manifest(out)}
        assert (rows[f"{src}/z_original.png"].width, rows[f"{src}/z_original.png"].height) == (451, 300)
        assert f"{src}/a_thumb.png" not in rows
        dup = {d["location"]: d for d in _report(out)["duplicate_files"]}[f"{src}/a_thumb.png"]
        assert dup["duplicate_of"] == f"{src}/z_original.png" and dup["reason"] == "near_duplicate"
        manifests.append((out / MANIFEST_FILE).read_bytes())
    assert manifests[0] == manifests[1]
