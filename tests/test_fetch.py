"""The one fetcher (weights, COCO, curation URLs) against a misbehaving HTTP server on 127.0.0.1,
and Hub models through huggingface_hub from a cache this test builds (offline)."""

from __future__ import annotations

import hashlib
import http.server
import io
import threading
import zipfile

import pytest
import yaml

from vaeft.fetch import DownloadError, TooLargeError, fetch, fetch_bytes
from vaeft.weights.verify import read_record

BODY = bytes(range(256)) * 1200  # 307,200 bytes


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


class Bad(http.server.BaseHTTPRequestHandler):
    """Each path misbehaves its own way; ``state`` counts requests per path."""

    files: dict[str, bytes] = {}
    state: dict[str, list[str | None]] = {}

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str], send: bytes | None = None) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body if send is None else send)
        self.wfile.flush()
        self.close_connection = True

    def do_GET(self):
        rng = self.headers.get("Range")
        seen = self.state.setdefault(self.path, [])
        seen.append(rng)
        name = self.path.strip("/").split("/")[0]
        body = self.files.get(self.path, BODY)
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        n = len(seen)
        if name == "short":  # always promises the whole file, always sends half
            self._send(200, body, {"Content-Length": str(len(body))}, send=body[: len(body) // 2])
        elif name == "short-once" and n == 1:
            self._send(200, body, {"Content-Length": str(len(body))}, send=body[:1000])
        elif name == "wrong-range" and rng:  # a 206 for a range we did not ask for
            self._send(206, body, {"Content-Range": f"bytes 0-{len(body) - 1}/{len(body)}",
                                   "Content-Length": str(len(body))})
        elif name == "ignores-range" and rng:  # a 200 with the whole file: must restart, not append
            self._send(200, body, {"Content-Length": str(len(body))})
        elif rng:
            self._send(206, body[start:], {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}",
                                           "Content-Length": str(len(body) - start)})
        elif name in ("wrong-range", "ignores-range") and n == 1:
            self._send(200, body, {"Content-Length": str(len(body))}, send=body[:5000])
        else:
            self._send(200, body, {"Content-Length": str(len(body))})


@pytest.fixture(scope="module")
def bad():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Bad)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _fresh():
    Bad.state.clear()
    Bad.files.clear()


def test_a_short_body_is_never_accepted(bad, tmp_path):
    with pytest.raises(DownloadError, match="closed after|attempts"):
        fetch(f"{bad}/short/f.bin", tmp_path / "f.bin", retries=2, backoff=0)
    assert not (tmp_path / "f.bin").exists()
    # Once short, then resumed with a Range request from where it stopped.
    got = fetch(f"{bad}/short-once/f.bin", tmp_path / "g.bin", backoff=0)
    assert (tmp_path / "g.bin").read_bytes() == BODY and got.sha256 == sha(BODY) and got.resumed
    assert Bad.state["/short-once/f.bin"] == [None, "bytes=1000-"]
    with pytest.raises(DownloadError, match="closed after|attempts"):
        fetch_bytes(f"{bad}/short/x.bin", 10**7, retries=1, backoff=0)


@pytest.mark.parametrize("how", ["wrong-range", "ignores-range"])
def test_a_resume_answered_with_other_bytes_restarts(bad, tmp_path, how):
    got = fetch(f"{bad}/{how}/f.bin", tmp_path / "f.bin", sha256=sha(BODY), backoff=0)
    assert (tmp_path / "f.bin").read_bytes() == BODY and got.bytes == len(BODY)
    assert Bad.state[f"/{how}/f.bin"][1] == "bytes=5000-"


def test_expected_size_and_memory_cap(bad, tmp_path):
    with pytest.raises(DownloadError, match="size 307200 bytes, expected 307201"):
        fetch(f"{bad}/ok/f.bin", tmp_path / "f.bin", size=len(BODY) + 1, backoff=0)
    assert not list(tmp_path.iterdir())
    with pytest.raises(TooLargeError):
        fetch_bytes(f"{bad}/ok/f.bin", 1000, backoff=0)
    body, digest = fetch_bytes(f"{bad}/ok/f.bin", len(BODY), backoff=0)
    assert body == BODY and digest == sha(BODY)


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for k, v in members.items():
            zf.writestr(k, v)
    return buf.getvalue()


def _corrupt(data: bytes) -> bytes:
    """A zip whose central directory is intact but whose first member's bytes are flipped (CRC fails)."""
    b = bytearray(data)
    b[60] ^= 0xFF
    return bytes(b)


@pytest.fixture
def store(tmp_path, monkeypatch, bad):
    good = _zip({"model.ckpt": BODY, "config.yaml": b"model: {}\n"})
    Bad.files["/z/kl.zip"] = _corrupt(good)
    reg = {"weights": {"klz": {"path": "klz/kl.zip", "url": f"{bad}/z/kl.zip", "sha256": None, "extract": True}}}
    (tmp_path / "registry.yaml").write_text(yaml.safe_dump(reg))
    monkeypatch.setenv("VAEFT_WEIGHTS_REGISTRY", str(tmp_path / "registry.yaml"))
    monkeypatch.setenv("VAEFT_WEIGHTS_DIR", str(tmp_path / "store"))
    return tmp_path / "store", good


def test_a_corrupt_zip_is_not_marked_verified_and_is_fetched_again(store):
    from vaeft.weights.store import ZipVerifyError, pull

    root, good = store
    with pytest.raises(ZipVerifyError, match="not a valid zip.*deleted"):
        pull(["klz"], backoff=0)
    assert not (root / "klz" / "kl.zip").exists() and "klz/kl.zip" not in read_record(root)
    Bad.files["/z/kl.zip"] = good  # the mirror is fixed: the next pull fetches and unpacks it
    res = pull(["klz"], backoff=0)
    assert res[0].downloaded == ["klz/kl.zip"]
    assert (root / "klz" / "model.ckpt").read_bytes() == BODY
    assert read_record(root)["klz/kl.zip"]["sha256"] == sha(good)  # the digest of what was fetched
    assert pull(["klz"], backoff=0)[0].skipped == ["klz/kl.zip"]


def test_a_truncated_coco_zip_is_removed_and_nothing_extracted(bad, tmp_path):
    from vaeft.evaluate.download import DownloadError as CocoError
    from vaeft.evaluate.download import download_coco_val

    good = _zip({f"val2017/{i:012d}.jpg": bytes([i]) * 100 for i in range(2)})
    Bad.files["/c/val2017.zip"] = good[: len(good) - 30]
    with pytest.raises(CocoError, match="corrupt zip|did not extract.*removed"):
        download_coco_val(tmp_path / "coco", url=f"{bad}/c/val2017.zip", md5=None, size=None, expected_images=2)
    assert not (tmp_path / "coco" / "val2017.zip").exists() and not (tmp_path / "coco" / "val2017").exists()
    Bad.files["/c/val2017.zip"] = good
    got = download_coco_val(tmp_path / "coco", url=f"{bad}/c/val2017.zip", md5=None, size=len(good), expected_images=2)
    assert got.n_images == 2 and got.sha256 == sha(good)
    assert yaml.safe_load((got.images_dir / "fetched.json").read_text())["sha256"] == sha(good)


def test_curation_url_fetch_goes_through_the_same_checks(bad):
    from vaeft.data.sources import ReadLimits, fetch_url

    body, why = fetch_url(f"{bad}/short/p.png", ReadLimits(10**7, 5.0, 1))
    assert body is None and "closed after" in why
    body, why = fetch_url(f"{bad}/short-once/p.png", ReadLimits(10**7, 5.0, 1))
    assert body == BODY and why == ""
    assert fetch_url(f"{bad}/ok/p.png", ReadLimits(1000, 5.0, 1)) == (None, "more than 1000 bytes")


def _hub_cache(home, repo: str, revision: str, files: dict[str, bytes]) -> None:
    """huggingface_hub's cache layout: blobs by digest, a snapshot per commit linking to them."""
    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    for name, data in files.items():
        blob = root / "blobs" / sha(data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / revision / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(revision)


def test_hub_models_come_through_huggingface_hub_at_a_pinned_revision(tmp_path, monkeypatch):
    from vaeft.weights import RegistryError, registry
    from vaeft.weights.store import pull

    rev = "a" * 40
    cfg, weights = b'{"_class_name": "AutoencoderKL"}', BODY
    _hub_cache(tmp_path / "hf", "org/vae", rev, {"config.json": cfg, "diffusion_pytorch_model.safetensors": weights})
    reg = {"weights": {"vae": {"path": "hub/vae", "layout": "diffusers", "hub": {"repo": "org/vae", "revision": rev},
                               "files": [{"name": "config.json", "sha256": sha(cfg)},
                                         {"name": "diffusion_pytorch_model.safetensors", "sha256": sha(weights)}]},
                       "other": {"path": "hub/other.bin", "hub": {"repo": "org/vae", "revision": "b" * 40},
                                 "sha256": None}}}
    (tmp_path / "registry.yaml").write_text(yaml.safe_dump(reg))
    monkeypatch.setenv("VAEFT_WEIGHTS_REGISTRY", str(tmp_path / "registry.yaml"))
    monkeypatch.setenv("VAEFT_WEIGHTS_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = pull(["vae"])
    assert sorted(res[0].downloaded) == ["hub/vae/config.json", "hub/vae/diffusion_pytorch_model.safetensors"]
    assert (tmp_path / "store" / "hub/vae/diffusion_pytorch_model.safetensors").read_bytes() == weights
    assert read_record(tmp_path / "store")["hub/vae/config.json"]["sha256"] == sha(cfg)
    # A revision not in the cache: a one-line error naming repo and revision, not a traceback.
    with pytest.raises(DownloadError, match="org/vae@b{40}/other.bin"):
        pull(["other"])
    reg["weights"]["other"]["hub"]["revision"] = "main"  # a branch can move: refused
    (tmp_path / "registry.yaml").write_text(yaml.safe_dump(reg))
    with pytest.raises(RegistryError, match="40-hex commit"):
        registry()
