"""Curation from tar shards, tables with URLs, S3 (moto), source mixing, resume and pHash."""

from __future__ import annotations

import http.server
import json
import tarfile
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import vaeft.data.curate as curate_mod
from vaeft.config import DataParams, SourceParams
from vaeft.data.curate import REPORT_FILE, curate
from vaeft.data.manifest import MANIFEST_FILE, read_manifest
from vaeft.data.phash import NearDuplicateIndex, hamming, phash

from .curate_corpus import add_bytes, add_symlink, photo, png_bytes


def _params(tmp_path, sources, **kw) -> DataParams:
    kw.setdefault("workers", 1)
    kw.setdefault("eval_fraction", 0.5)
    return DataParams(sources=sources, min_side=64, work_dir=str(tmp_path / "work"), **kw)


def _report(out):
    return json.loads((out / REPORT_FILE).read_text())


def _folder(path, seeds):
    path.mkdir(parents=True)
    for s in seeds:
        Image.fromarray(photo(s)).save(path / f"p{s}.png")
    return path


def test_phash_matches_copies_not_other_images():
    a = Image.fromarray(photo(1))
    copy = Image.fromarray(np.asarray(a.resize((150, 125), Image.LANCZOS)))
    assert hamming(phash(a), phash(copy)) <= 4
    others = [hamming(phash(a), phash(Image.fromarray(photo(s)))) for s in range(2, 30)]
    assert min(others) > 10
    idx = NearDuplicateIndex(4)
    idx.add(phash(a), "a")
    assert idx.find(phash(copy))[0] == "a" and idx.find(phash(Image.fromarray(photo(2)))) is None


def test_tar_shards_stream_with_sidecars_and_refuse_unsafe_members(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "000.tar", "w") as tf:
        add_bytes(tf, "s/000.png", png_bytes(photo(1)))
        add_bytes(tf, "s/000.json", b'{"aesthetic": 6.0}')
        add_bytes(tf, "s/000.txt", b"a caption")
        add_bytes(tf, "s/001.png", png_bytes(photo(2)))
        add_bytes(tf, "s/001.json", b'{"pwatermark": 0.9}')
        add_bytes(tf, "../evil.png", png_bytes(photo(3)))
        add_bytes(tf, "/abs/evil.png", png_bytes(photo(4)))
        add_symlink(tf, "s/link.png", "/etc/passwd")
        add_bytes(tf, "s/002.png", b"garbage")
        add_bytes(tf, "s/003.jpg", png_bytes(photo(5)))  # wrong suffix, still an image
        for i in range(4, 8):
            add_bytes(tf, f"s/00{i}.png", png_bytes(photo(10 + i)))
    full = (shards / "000.tar").read_bytes()
    with tarfile.open(shards / "001.tar", "w") as tf:
        add_bytes(tf, "t/000.png", png_bytes(photo(6)))
        add_bytes(tf, "t/001.png", png_bytes(photo(7, (400, 400))))
    cut = (shards / "001.tar").read_bytes()
    second_data = 512 + -(-len(png_bytes(photo(6))) // 512) * 512 + 512
    (shards / "001.tar").write_bytes(cut[: second_data + 700])  # truncated inside member 2
    src = SourceParams(name="wds", kind="tar", path=str(shards))
    curate(_params(tmp_path, [src], max_pwatermark=0.5, eval_fraction=0.3), tmp_path / "out")
    rep = _report(tmp_path / "out")
    s0, s1 = str(shards / "000.tar"), str(shards / "001.tar")
    got = {r["location"]: r["reason"] for r in rep["rejected_files"]}
    assert got == {
        f"{s0}::s/001.png": "watermark",
        f"{s0}::../evil.png": "unsafe_tar_member",
        f"{s0}::/abs/evil.png": "unsafe_tar_member",
        f"{s0}::s/link.png": "unsafe_tar_member",
        f"{s0}::s/002.png": "not_an_image",
        s1: "corrupt_shard",
    }
    assert {r.location for r in read_manifest(tmp_path / "out")} == {
        f"{s0}::s/000.png", f"{s0}::s/003.jpg", f"{s1}::t/000.png", *(f"{s0}::s/00{i}.png" for i in range(4, 8))}
    assert len(full) > 0 and not (tmp_path / "evil.png").exists()  # nothing is ever extracted


class _Handler(http.server.SimpleHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):
        _Handler.hits.append(self.path)
        if self.path.startswith("/slow"):
            time.sleep(1.0)
        return super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    _folder(root, [21, 22, 23])
    handler = lambda *a, **kw: _Handler(*a, directory=str(root), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Handler.hits = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_table_source_fetches_urls_and_applies_laion_filters(tmp_path, http_root, fmt):
    _folder(tmp_path / "local", [24])
    rows = [
        {"url": f"{http_root}/p21.png", "aesthetic": 6.5, "punsafe": 0.01, "pwatermark": 0.1},
        {"url": f"{http_root}/p22.png", "aesthetic": 4.0, "punsafe": 0.01, "pwatermark": 0.1},  # ugly
        {"url": f"{http_root}/p23.png", "aesthetic": 6.0, "punsafe": 0.9, "pwatermark": 0.1},  # unsafe
        {"url": f"{http_root}/missing.png", "aesthetic": 6.0, "punsafe": 0.0, "pwatermark": 0.0},
        {"url": f"{http_root}/slow/p21.png", "aesthetic": 6.0, "punsafe": 0.0, "pwatermark": 0.0},
        {"url": "local/p24.png", "aesthetic": 7.0, "punsafe": 0.0, "pwatermark": 0.0},  # relative path
    ]
    table = tmp_path / f"meta.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), table)
    elif fmt == "csv":
        table.write_text("url,aesthetic,punsafe,pwatermark\n" + "".join(
            f"{r['url']},{r['aesthetic']},{r['punsafe']},{r['pwatermark']}\n" for r in rows))
    else:
        table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = SourceParams(name="laion", kind="table", path=str(table))
    curate(_params(tmp_path, [src], min_aesthetic=5.0, max_punsafe=0.5, max_pwatermark=0.5,
                   fetch_timeout=0.3, fetch_retries=1), tmp_path / "out")
    rep = _report(tmp_path / "out")
    got = {r["location"].replace(http_root, "H"): (r["reason"], r["detail"]) for r in rep["rejected_files"]}
    assert got == {
        "H/p22.png": ("low_aesthetic", "aesthetic 4 < 5"),
        "H/p23.png": ("unsafe", "punsafe 0.9 > 0.5"),
        "H/missing.png": ("fetch_failed", "HTTP 404"),
        "H/slow/p21.png": ("fetch_failed", "timeout after 0.3s (2 attempts)"),
    }
    assert sorted(r.location.replace(http_root, "H") for r in read_manifest(tmp_path / "out")) == ["H/p21.png", "local/p24.png"]
    assert "/p22.png" not in _Handler.hits and "/p23.png" not in _Handler.hits  # filtered before download
    assert _Handler.hits.count("/slow/p21.png") == 2 and _Handler.hits.count("/missing.png") == 1  # no retry on 404


def test_s3_prefix_on_moto(tmp_path, monkeypatch):
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="imgs")
        for s in (31, 32, 33):
            s3.put_object(Bucket="imgs", Key=f"set/a/p{s}.png", Body=png_bytes(photo(s)))
        s3.put_object(Bucket="imgs", Key="set/a/broken.png", Body=b"\x89PNG broken")
        s3.put_object(Bucket="imgs", Key="set/a/notes.txt", Body=b"ignored")
        s3.put_object(Bucket="imgs", Key="other/p34.png", Body=png_bytes(photo(34)))
        src = SourceParams(name="bucket", kind="s3", path="s3://imgs/set/", endpoint_url=endpoint)
        curate(_params(tmp_path, [src], shard_size=2), tmp_path / "out")
    finally:
        server.stop()
    rep = _report(tmp_path / "out")
    assert {r["location"]: r["reason"] for r in rep["rejected_files"]} == {"s3://imgs/set/a/broken.png": "not_an_image"}
    assert sorted(r.location for r in read_manifest(tmp_path / "out")) == [f"s3://imgs/set/a/p{s}.png" for s in (31, 32, 33)]


def test_sources_are_mixed_by_weight_and_near_duplicates_removed_across_sources(tmp_path):
    a = _folder(tmp_path / "a", range(100, 106))
    b = _folder(tmp_path / "b", range(200, 218))
    # a smaller re-encoded copy: the larger original is kept, whichever source lists it
    Image.fromarray(photo(100)).resize((80, 67), Image.LANCZOS).save(b / "copy_of_a100.jpg", quality=80)
    sources = [SourceParams(name="a", kind="folder", path=str(a)), SourceParams(name="b", kind="folder", path=str(b))]
    curate(_params(tmp_path, sources), tmp_path / "even")
    rep = _report(tmp_path / "even")
    assert [rep["per_source"][n]["kept"] for n in "ab"] == [6, 6] and rep["per_source"]["b"]["subsampled"] == 12
    assert [(d["location"], d["reason"], d["duplicate_of"]) for d in rep["duplicate_files"]] == [
        (str(b / "copy_of_a100.jpg"), "near_duplicate", str(a / "p100.png"))]
    weighted = [sources[0], sources[1].model_copy(update={"weight": 2.0})]
    curate(_params(tmp_path, weighted), tmp_path / "weighted")
    assert [_report(tmp_path / "weighted")["per_source"][n]["kept"] for n in "ab"] == [6, 12]
    curate(_params(tmp_path, sources, balance=False), tmp_path / "all")
    assert _report(tmp_path / "all")["kept"] == 24
    # subsampling keeps a fixed subset: the same picks every run
    again = curate(_params(tmp_path, sources), tmp_path / "even2")
    assert again.shards_reused == 2
    assert (tmp_path / "even" / MANIFEST_FILE).read_bytes() == (tmp_path / "even2" / MANIFEST_FILE).read_bytes()


def test_interrupted_run_resumes_without_redoing_finished_shards(tmp_path, monkeypatch):
    folder = _folder(tmp_path / "imgs", range(300, 310))
    src = [SourceParams(name="f", kind="folder", path=str(folder))]
    reference = tmp_path / "ref"
    curate(DataParams(sources=src, min_side=64, eval_fraction=0.5, shard_size=2, workers=2,
                      work_dir=str(tmp_path / "ref_work")), reference)

    real, calls = curate_mod.process_shard, []

    def dies_on_third(shard, cfg):
        calls.append(shard.index)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if the run were killed mid-way
        return real(shard, cfg)

    monkeypatch.setattr(curate_mod, "process_shard", dies_on_third)
    params = _params(tmp_path, src, shard_size=2)
    with pytest.raises(KeyboardInterrupt):
        curate(params, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(curate_mod, "process_shard", real)
    resumed = curate(params, tmp_path / "out")
    assert (resumed.shards_reused, resumed.shards_done) == (2, 3)
    assert (tmp_path / "out" / MANIFEST_FILE).read_bytes() == (reference / MANIFEST_FILE).read_bytes()
