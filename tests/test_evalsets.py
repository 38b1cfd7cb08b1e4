"""Eval sets (COCO download against a local HTTP server, 256x256 preparation) and `vaeft metrics`."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import threading
import zipfile

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vaeft.cli import app
from vaeft.data.evalset import PREPARED_META, eval_items
from vaeft.evaluate.download import DownloadError, download_coco_val

runner = CliRunner()


def _photo(seed: int, w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.ones((h, 1, 3), np.float32)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))


@pytest.fixture
def served(tmp_path):
    """A small val2017.zip served over HTTP on 127.0.0.1 (any free port)."""
    root = tmp_path / "www"
    (root / "zips").mkdir(parents=True)
    archive = root / "zips" / "val2017.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(3):
            buf = tmp_path / f"{i:012d}.jpg"
            _photo(i, 80, 60).save(buf, quality=90)
            zf.write(buf, f"val2017/{i:012d}.jpg")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        data = archive.read_bytes()
        yield f"http://127.0.0.1:{server.server_address[1]}/zips/val2017.zip", hashlib.md5(data).hexdigest(), len(data)
    finally:
        server.shutdown()
        server.server_close()


def test_download_verifies_then_extracts(served, tmp_path):
    url, md5, size = served
    got = download_coco_val(tmp_path / "coco", url=url, md5=md5, size=size, expected_images=3)
    assert got.n_images == 3 and got.md5 == md5 and len(got.sha256) == 64
    assert sorted(p.name for p in got.images_dir.glob("*.jpg"))[0] == "000000000000.jpg"
    # Already there and verified: no second download needed (server not consulted for bytes).
    again = download_coco_val(tmp_path / "coco", url=url, md5=md5, size=size, expected_images=3)
    assert again.archive == got.archive


def test_download_with_wrong_checksum_extracts_nothing(served, tmp_path):
    url, md5, size = served
    with pytest.raises(DownloadError, match="checksum verification failed.*md5"):
        download_coco_val(tmp_path / "coco", url=url, md5="0" * 32, size=size, expected_images=3)
    assert not (tmp_path / "coco" / "val2017").exists() and not (tmp_path / "coco" / "val2017.zip").exists()
    with pytest.raises(DownloadError, match="size"):
        download_coco_val(tmp_path / "coco", url=url, md5=md5, size=size + 1, expected_images=3)


def test_cli_coco_val_against_local_server(served, tmp_path):
    url, md5, _ = served
    # Checksum passes (the served file's MD5), then the image count is checked: 3 != 5000.
    res = runner.invoke(app, ["data", "coco-val", "--out", str(tmp_path / "c"), "--url", url, "--md5", md5])
    assert res.exit_code != 0 and isinstance(res.exception, DownloadError)
    assert "3 JPEGs extracted, expected 5000" in str(res.exception)


def test_prepare_resizes_shorter_side_and_centre_crops(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _photo(0, 400, 300).save(src / "wide.png")
    _photo(1, 300, 500).save(src / "tall.jpg")
    result = runner.invoke(app, ["data", "prepare", str(src), str(tmp_path / "out"), "--size", "64"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.png")) == ["tall.png", "wide.png"]
    assert all(Image.open(p).size == (64, 64) for p in out.glob("*.png"))
    meta = json.loads((out / PREPARED_META).read_text())
    assert meta["size"] == 64 and "centre crop 64x64" in meta["protocol"] and meta["n_images"] == 2
    assert {e["source_size"][0] for e in meta["images"]} == {400, 300}
    # The centre crop of a horizontal ramp keeps the middle of the ramp.
    wide = np.asarray(Image.open(out / "wide.png")).astype(float).mean(axis=(0, 2))
    assert 80 < wide.mean() < 175
    assert [it.location for it in eval_items(out)] == ["tall.png", "wide.png"]


def test_metrics_cli_on_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("VAEFT_WEIGHTS_DIR", str(tmp_path / "empty-store"))
    ref, test = tmp_path / "ref", tmp_path / "test"
    ref.mkdir()
    test.mkdir()
    for i in range(3):
        img = _photo(i, 48, 40)
        img.save(ref / f"{i}.png")
        img.convert("L").convert("RGB").save(test / f"{i}.png")  # fully desaturated copy
    out = tmp_path / "m.json"
    result = runner.invoke(app, ["metrics", "--ref", str(ref), "--test", str(test), "--out", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    m = doc["metrics"]
    assert m["n_images"] == 3 and 0 < m["ssim_mean"] < 1 and m["psnr_mean"] > 10
    assert m["saturation_ratio_mean"] == pytest.approx(0.0, abs=1e-6)  # greyscale test images
    assert m["unavailable"]["rfid"]["fetch"] == "vaeft weights pull fid-inception"
    assert "PSIM candidate" in doc["notes"]["psim_candidate"] and len(doc["per_image"]) == 3

    (test / "2.png").rename(test / "x.png")
    bad = runner.invoke(app, ["metrics", "--ref", str(ref), "--test", str(test), "--out", str(out)])
    assert bad.exit_code != 0 and "only in --ref: 2.png" in str(bad.exception) and "only in --test: x.png" in str(bad.exception)
    (test / "x.png").rename(test / "2.png")
    _photo(2, 40, 40).save(test / "2.png")
    bad = runner.invoke(app, ["metrics", "--ref", str(ref), "--test", str(test), "--out", str(out)])
    assert bad.exit_code != 0 and "2.png: size differs" in str(bad.exception)
