"""The weight store against a real local HTTP server: verified pulls, corrupted files, dropped
connections resumed with Range requests, `list` and `add`. The registry is a test file named by
$VAEFT_WEIGHTS_REGISTRY; nothing of ours is mocked."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading

import pytest
import yaml
from typer.testing import CliRunner

from vaeft.cli import app
from vaeft.weights import MissingWeightsError, registry, require
from vaeft.weights.download import DigestMismatchError
from vaeft.weights.store import add, list_weights, pull

GOOD = os.urandom(300_000)
OTHER = os.urandom(50_000)


class Handler(http.server.BaseHTTPRequestHandler):
    files = {"/busy.bin": OTHER, "/good.bin": GOOD, "/corrupt.bin": GOOD, "/flaky.bin": GOOD, "/a/config.json": b'{"x": 1}',
             "/a/w.bin": OTHER}
    requests: list[tuple[str, str | None]] = []
    dropped: set[str] = set()

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        rng = self.headers.get("Range")
        self.requests.append((self.path, rng))
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        if self.path == "/busy.bin" and self.requests.count(("/busy.bin", None)) <= 2:
            self.send_error(503)  # transient: the client must back off and retry
            return
        if self.path == "/corrupt.bin":
            body = body[:-1] + bytes([body[-1] ^ 1])
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if self.path == "/flaky.bin" and self.path not in self.dropped:
            # First request: promise the whole file, send a third, hang up.
            self.dropped.add(self.path)
            self.wfile.write(body[start:start + len(body) // 3])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def store(tmp_path, server, monkeypatch):
    reg = {"weights": {
        "good": {"path": "g/good.bin", "url": f"{server}/good.bin", "sha256": sha(GOOD)},
        "corrupt": {"path": "c/corrupt.bin", "url": f"{server}/corrupt.bin", "sha256": sha(GOOD)},
        "flaky": {"path": "f/flaky.bin", "url": f"{server}/flaky.bin", "sha256_prefix": sha(GOOD)[:8]},
        "repo": {"path": "repo", "layout": "diffusers", "files": [
            {"name": "config.json", "url": f"{server}/a/config.json", "sha256": sha(b'{"x": 1}')},
            {"name": "w.bin", "url": f"{server}/a/w.bin", "sha256": sha(OTHER)}]},
        "busy": {"path": "b/busy.bin", "url": f"{server}/busy.bin", "sha256": sha(OTHER)},
        "gone": {"path": "x/gone.bin", "url": f"{server}/nope.bin", "sha256": None},
    }}
    (tmp_path / "registry.yaml").write_text(yaml.safe_dump(reg))
    monkeypatch.setenv("VAEFT_WEIGHTS_REGISTRY", str(tmp_path / "registry.yaml"))
    monkeypatch.setenv("VAEFT_WEIGHTS_DIR", str(tmp_path / "store"))
    Handler.requests.clear()
    Handler.dropped.clear()
    return tmp_path / "store"


def test_pull_verifies_and_lists(store):
    with pytest.raises(MissingWeightsError, match="vaeft weights pull good"):
        require("good")
    [res] = pull(["good"], backoff=0)
    assert res.downloaded == ["g/good.bin"] and (store / "g/good.bin").read_bytes() == GOOD
    assert require("good") == store / "g/good.bin"
    status = {e.name: e for e in list_weights()}
    assert status["good"].present and status["good"].verified
    assert not status["repo"].present
    pull(["repo"], backoff=0)
    assert require("repo") == store / "repo" and (store / "repo/w.bin").read_bytes() == OTHER
    # Pulling again downloads nothing: files are verified in place.
    n = len(Handler.requests)
    assert pull(["good", "repo"], backoff=0)[1].skipped == ["repo/config.json", "repo/w.bin"]
    assert len(Handler.requests) == n
    # A file changed behind the store's back is no longer "verified".
    (store / "g/good.bin").write_bytes(GOOD[:-1] + b"\0")
    assert not {e.name: e for e in list_weights(rehash=True)}["good"].verified


def test_corrupted_download_is_deleted_and_fails_loudly(store):
    with pytest.raises(DigestMismatchError, match="sha256 mismatch") as err:
        pull(["corrupt"], backoff=0)
    assert sha(GOOD) in str(err.value)
    assert not (store / "c").exists() or not any((store / "c").iterdir())


def test_dropped_connection_is_resumed_with_range(store):
    [res] = pull(["flaky"], backoff=0)
    assert (store / "f/flaky.bin").read_bytes() == GOOD and res.downloaded == ["f/flaky.bin"]
    flaky = [r for r in Handler.requests if r[0] == "/flaky.bin"]
    assert flaky[0] == ("/flaky.bin", None)
    assert flaky[1] == ("/flaky.bin", f"bytes={len(GOOD) // 3}-")  # resumed, not restarted
    assert {e.name: e for e in list_weights()}["flaky"].files[0].pinned == "sha256 prefix"


def test_transient_server_errors_are_retried(store):
    from vaeft.weights.download import DownloadError

    with pytest.raises(DownloadError, match="failed after 2 attempts"):
        pull(["busy"], retries=1, backoff=0)
    Handler.requests.clear()
    [res] = pull(["busy"], retries=3, backoff=0.01)
    assert res.downloaded == ["b/busy.bin"] and (store / "b/busy.bin").read_bytes() == OTHER
    assert [r[0] for r in Handler.requests] == ["/busy.bin"] * 3


def test_missing_file_on_server_fails_without_retrying(store):
    from vaeft.weights.download import DownloadError

    with pytest.raises(DownloadError, match="HTTP 404"):
        pull(["gone"], backoff=0)


def test_add_checks_pins_and_registers_new_files(store, tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(GOOD[::-1])
    with pytest.raises(DigestMismatchError, match="not added"):
        add("good", bad)
    assert not (store / "g/good.bin").exists()
    ok = tmp_path / "good.bin"
    ok.write_bytes(GOOD)
    add("good", ok)
    assert (store / "g/good.bin").read_bytes() == GOOD
    mine = tmp_path / "mine.safetensors"
    mine.write_bytes(OTHER)
    spec = add("my-vae", mine, "a VAE I trained")
    assert spec.files[0].sha256 == sha(OTHER)
    assert "my-vae" in registry() and require("my-vae").read_bytes() == OTHER


def test_weights_cli(store, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["weights", "pull", "good", "--backoff", "0"])
    assert r.exit_code == 0, r.output
    assert "good: 1 downloaded" in r.output
    listed = runner.invoke(app, ["weights", "list"])
    assert listed.exit_code == 0 and "missing" in listed.output and "yes" in listed.output
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    assert runner.invoke(app, ["weights", "add", "extra", str(f)]).exit_code == 0


def test_zipped_ldm_base_is_unpacked_and_loads(store, server, tmp_path):
    import io
    import zipfile

    import torch

    from vaeft.config import ArchitectureParams
    from vaeft.model.build import build_autoencoder
    from vaeft.model.io import load_autoencoder, save_ldm

    torch.manual_seed(0)
    vae = build_autoencoder(ArchitectureParams(block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8))
    save_ldm(vae, tmp_path / "model.ckpt")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.write(tmp_path / "model.ckpt", "model.ckpt")
        zf.writestr("config.yaml", "model: {}\n")
    Handler.files["/kl.zip"] = buf.getvalue()
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../escaped.txt", "x")
    Handler.files["/evil.zip"] = evil.getvalue()
    reg = yaml.safe_load(open(os.environ["VAEFT_WEIGHTS_REGISTRY"]))
    reg["weights"]["klz"] = {"path": "klz/kl.zip", "url": f"{server}/kl.zip", "sha256": sha(buf.getvalue()),
                             "extract": True}
    reg["weights"]["evil"] = {"path": "evil/evil.zip", "url": f"{server}/evil.zip", "sha256": None, "extract": True}
    open(os.environ["VAEFT_WEIGHTS_REGISTRY"], "w").write(yaml.safe_dump(reg))
    pull(["klz"], backoff=0)
    assert (store / "klz" / "config.yaml").is_file()
    loaded = load_autoencoder(store / "klz", norm_num_groups=8)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in vae.state_dict().items())
    with pytest.raises(Exception, match="outside"):
        pull(["evil"], backoff=0)
    assert not (store.parent / "escaped.txt").exists() and not (store / "escaped.txt").exists()


def test_shipped_registry_is_well_formed(monkeypatch):
    monkeypatch.delenv("VAEFT_WEIGHTS_REGISTRY", raising=False)
    specs = registry()
    for name in ("kl-f8", "sd-vae-ft-ema", "sd-vae-ft-mse", "sdxl-vae", "lpips-vgg"):
        assert name in specs
    for s in specs.values():
        for f in s.files:
            assert f.url and f.url.startswith("https://")
            assert f.sha256 is None or (len(f.sha256) == 64 and int(f.sha256, 16) >= 0)
            if f.sha256_prefix:
                assert f.sha256_prefix in f.path  # only prefixes that the file name itself carries
    assert len(specs["sd-vae-ft-mse"].files) == 2
    # Hub models come through huggingface_hub at the commit their URLs name.
    for name in ("sd-vae-ft-ema", "sd-vae-ft-mse", "vae-ft-mse-original"):
        hub = specs[name].hub
        assert hub is not None and all(f"/{hub.repo}/resolve/{hub.revision}/" in f.url for f in specs[name].files)
