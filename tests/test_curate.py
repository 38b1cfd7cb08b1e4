"""The curate stage on real package-shipped photos and on a folder of broken and odd files."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image, ImageFile

from vaeft.config import DataParams, SourceParams
from vaeft.data.curate import REPORT_FILE, CurationError, curate, split_of
from vaeft.data.images import ImageLimits, ImageRejected, load_rgb
from vaeft.data.manifest import MANIFEST_FILE, read_manifest


def test_embedded_source_is_curated_and_split(curated):
    rows = read_manifest(curated)
    report = json.loads((curated / REPORT_FILE).read_text())
    assert report["kept"] == len(rows) >= 20
    assert report["train"] > 0 and report["eval"] > 0
    assert all(r.location.startswith("embedded:") for r in rows)  # install-independent
    assert {r.split for r in rows} == {"train", "eval"}
    assert report["per_reason"].get("not_an_image", 0) >= 1  # skimage ships a tif Pillow cannot read
    for r in rows:
        img = Image.open(curated / r.stored_path)
        assert img.mode == "RGB" and img.size == (r.width, r.height)
        assert r.split == split_of(r.sha256, 0.25)


def test_curate_is_byte_identical_on_rerun(tmp_path, curated, tiny_params):
    curate(tiny_params.data, tmp_path / "again")
    assert (tmp_path / "again" / MANIFEST_FILE).read_bytes() == (curated / MANIFEST_FILE).read_bytes()


def test_split_is_stable_per_image():
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(2000)]
    splits = [split_of(h, 0.25) for h in hashes]
    assert 0.2 < splits.count("eval") / len(splits) < 0.3
    # Deciding per image means a bigger corpus never moves an existing image.
    assert [split_of(h, 0.25) for h in hashes[:500]] == splits[:500]


def _photo(seed: int, size=(96, 80)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(base).resize(size, Image.BICUBIC))


@pytest.fixture
def odd_folder(tmp_path):
    d = tmp_path / "odd"
    (d / "sub").mkdir(parents=True)
    Image.fromarray(_photo(1)).save(d / "good.png")
    Image.fromarray(_photo(1)).save(d / "sub" / "good_copy.png")  # exact duplicate bytes
    Image.fromarray(_photo(2)).save(d / "good.jpg", quality=90)
    (d / "empty.png").write_bytes(b"")
    (d / "text.jpg").write_text("this is not an image")
    buf = io.BytesIO()
    Image.fromarray(_photo(3, (200, 160))).save(buf, format="JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    Image.fromarray(_photo(4, (40, 40))).save(d / "tiny.png")
    Image.fromarray(_photo(5, (400, 70))).save(d / "panorama.png")
    rgba = np.dstack([_photo(6), np.zeros((80, 96), np.uint8)])  # fully transparent
    Image.fromarray(rgba, "RGBA").save(d / "transparent.png")
    Image.fromarray(_photo(7)).convert("P").save(d / "palette.gif")
    Image.fromarray(_photo(8)).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray((np.arange(96 * 80).reshape(80, 96) * 8).astype(np.uint16)).save(d / "gray16.png")
    Image.fromarray(_photo(9)).convert("L").save(d / "gray.png")
    return d


def test_odd_files_are_rejected_or_normalised(tmp_path, odd_folder):
    params = DataParams(sources=[SourceParams(name="odd", kind="folder", path=str(odd_folder))],
                        min_side=64, eval_fraction=0.5)
    result = curate(params, tmp_path / "out")
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    reasons = {r["location"].split("/")[-1]: r["reason"] for r in report["rejected_files"]}
    assert reasons == {
        "empty.png": "empty_file",
        "text.jpg": "not_an_image",
        "truncated.jpg": "truncated_or_corrupt",
        "tiny.png": "too_small",
        "panorama.png": "extreme_aspect",
    }
    dupes = report["duplicate_files"]
    assert len(dupes) == 1 and dupes[0]["reason"] == "exact_duplicate"
    rows = {r.location.split("/")[-1]: r for r in read_manifest(tmp_path / "out")}
    assert set(rows) == {"good.png", "good.jpg", "transparent.png", "palette.gif", "cmyk.jpg", "gray16.png", "gray.png"}
    assert result.n_rejected == 5 and result.n_duplicates == 1
    white = np.asarray(Image.open(tmp_path / "out" / rows["transparent.png"].stored_path))
    assert (white == 255).all()  # alpha composited on white
    g16 = np.asarray(Image.open(tmp_path / "out" / rows["gray16.png"].stored_path))
    assert g16.dtype == np.uint8 and g16.max() > 200  # 16-bit scaled, not clipped to black/white


def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (2000, 2000)).save(path)
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1))
    with pytest.raises(ImageRejected) as exc:
        load_rgb(path, ImageLimits(min_side=64, max_aspect=4.0, max_pixels=1_000_000))
    assert exc.value.reason == "too_many_pixels" and "2000x2000" in exc.value.detail
    assert decoded == []  # refused from the header alone


def test_missing_source_folder_is_a_clear_error(tmp_path):
    params = DataParams(sources=[SourceParams(name="x", kind="folder", path=str(tmp_path / "nope"))])
    with pytest.raises(CurationError, match="data source 'x': folder .* does not exist"):
        curate(params, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
