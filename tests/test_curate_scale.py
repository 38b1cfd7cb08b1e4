"""Curation at scale: the Dask engine, img2dataset sources, de-duplication past the memory budget."""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vaeft.config import DataParams, SourceParams
from vaeft.data.curate import REPORT_FILE, _read_records, _work_dir, curate
from vaeft.data.dedup import Deduplicator
from vaeft.data.manifest import MANIFEST_FILE, read_manifest
from vaeft.data.sources import iter_shards

from .curate_corpus import add_bytes, photo, png_bytes


def _jpeg(arr, quality=90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _img2dataset(root, samples, failed=()):
    """An img2dataset output folder of one shard: (key, jpeg, caption, extra columns) samples,
    plus rows whose download failed (in the parquet only, as img2dataset writes them)."""
    root.mkdir(parents=True)
    rows = []
    with tarfile.open(root / "00000.tar", "w") as tf:
        for key, data, caption, extra in samples:
            w, h = Image.open(io.BytesIO(data)).size
            row = {"key": key, "url": f"https://example.com/{key}.jpg", "caption": caption, "status": "success",
                   "error_message": None, "width": w, "height": h, "original_width": w, "original_height": h,
                   "exif": "{}", "sha256": hashlib.sha256(data).hexdigest(), **extra}
            add_bytes(tf, f"{key}.jpg", data)
            add_bytes(tf, f"{key}.txt", caption.encode())
            add_bytes(tf, f"{key}.json", json.dumps(row).encode())
            rows.append(row)
    for key, why in failed:
        rows.append({"key": key, "url": f"https://example.com/{key}.jpg", "caption": "lost", "status": "failed_to_download",
                     "error_message": why, "width": None, "height": None, "original_width": None,
                     "original_height": None, "exif": None, "sha256": None, "AESTHETIC_SCORE": 6.0,
                     "pwatermark": 0.1, "punsafe": 0.0})
    pq.write_table(pa.Table.from_pylist(rows), root / "00000.parquet")
    return root


def _half(arr):
    return np.asarray(Image.fromarray(arr).resize((arr.shape[1] // 2, arr.shape[0] // 2), Image.Resampling.LANCZOS))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two sources with exact and near copies of each other's images, and LAION-filtered rows."""
    root = tmp_path_factory.mktemp("scale")
    folder = root / "folder"
    folder.mkdir()
    for s in range(8):
        Image.fromarray(photo(100 + s)).save(folder / f"f{s}.png")
    big = photo(200, size=(300, 240))
    Image.fromarray(big).save(folder / "big.png")
    laion = {"AESTHETIC_SCORE": 6.5, "pwatermark": 0.1, "punsafe": 0.01}
    samples = [(f"0000000{i:02d}", _jpeg(photo(300 + i)), f"caption {i}", laion) for i in range(6)]
    samples += [
        ("000000090", png_bytes(photo(103)), "an exact copy of f3", laion),  # PNG bytes under .jpg, as found in the wild
        ("000000091", _jpeg(photo(200, size=(300, 240))), "a re-encoded copy of big.png", laion),
        ("000000092", _jpeg(_half(photo(201, size=(300, 240)))), "a smaller copy, near", laion),
        ("000000093", _jpeg(photo(302)), "ugly", {**laion, "AESTHETIC_SCORE": 3.0}),
        ("000000094", _jpeg(photo(303)), "watermarked", {**laion, "pwatermark": 0.9}),
    ]
    Image.fromarray(photo(201, size=(300, 240))).save(folder / "big2.png")  # wins over the 150x120 copy
    i2d = _img2dataset(root / "i2d", samples, failed=[("000000095", "HTTP 404")])
    sources = [SourceParams(name="folder", kind="folder", path=str(folder)),
               SourceParams(name="laion", kind="img2dataset", path=str(i2d))]
    return root, sources


def _params(root, sources, name, **kw):
    return DataParams(sources=sources, min_side=64, eval_fraction=0.4, shard_size=3, min_aesthetic=5.0,
                      max_pwatermark=0.5, work_dir=str(root / f"work-{name}"), **kw)


def _outputs(out):
    return (out / MANIFEST_FILE).read_bytes(), (out / REPORT_FILE).read_bytes()


def test_img2dataset_source_filters_on_laion_columns_and_carries_captions(tmp_path, corpus):
    root, sources = corpus
    params = _params(tmp_path, sources, "i2d", workers=1)
    curate(params, tmp_path / "out")
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    i2d = sources[1].path
    reasons = {r["location"]: r["reason"] for r in report["rejected_files"] if r["source"] == "laion"}
    assert reasons == {f"{i2d}/00000.tar::000000093.jpg": "low_aesthetic",
                       f"{i2d}/00000.tar::000000094.jpg": "watermark",
                       "https://example.com/000000095.jpg": "fetch_failed"}
    dups = {d["location"]: d for d in report["duplicate_files"]}
    assert dups[f"{i2d}/00000.tar::000000090.jpg"] == {
        "location": f"{i2d}/00000.tar::000000090.jpg", "source": "laion", "reason": "exact_duplicate",
        "duplicate_of": f"{sources[0].path}/f3.png"}
    assert dups[f"{i2d}/00000.tar::000000091.jpg"]["reason"] == "near_duplicate"  # the PNG came first in merge order
    assert dups[f"{i2d}/00000.tar::000000092.jpg"]["duplicate_of"] == f"{sources[0].path}/big2.png"
    kept = {r.location for r in read_manifest(tmp_path / "out")}
    assert f"{i2d}/00000.tar::000000000.jpg" in kept and report["per_source"]["laion"]["seen"] == 12
    shard = next(iter_shards(sources[1], 256))
    captions = {r["location"].rpartition("::")[2]: r.get("caption") for r in _read_records(_work_dir(params), shard)}
    assert captions["000000004.jpg"] == "caption 4" and captions["000000093.jpg"] is None  # rejected: no record kept
    # `vaeft curate --source DIR` recognises the layout.
    from vaeft.cli.stages import _source_kind

    assert _source_kind(i2d) == "img2dataset" and _source_kind(sources[0].path) == "folder"


def test_dask_cluster_and_disk_dedup_give_the_same_bytes_as_local_and_resume_each_other(tmp_path, corpus):
    root, sources = corpus
    # Reference: local engine, in-process, de-duplication in memory.
    curate(_params(tmp_path, sources, "local", workers=1), tmp_path / "local")
    # Two worker processes on a Dask local cluster, de-duplication forced onto disk.
    dask_params = _params(tmp_path, sources, "dask", workers=2, engine="dask", dedup_memory_mb=0)
    res = curate(dask_params, tmp_path / "dask")
    assert res.shards_done == 5 and res.n_duplicates == 3
    assert _outputs(tmp_path / "dask") == _outputs(tmp_path / "local")
    # The Dask run's work directory resumes on the local engine: nothing is processed again.
    again = curate(_params(tmp_path, sources, "dask", workers=1), tmp_path / "again")
    assert (again.shards_done, again.shards_reused) == (0, 5)
    assert _outputs(tmp_path / "again") == _outputs(tmp_path / "local")


def _synthetic(n: int, seed: int) -> list[dict]:
    """Records crowded into few pHash neighbourhoods and shas, with ties on pixels and distance."""
    rng = random.Random(seed)
    centres = [rng.getrandbits(64) for _ in range(n // 10)]
    recs = []
    for i in range(n):
        h = rng.choice(centres)
        for _ in range(rng.randrange(7)):
            h ^= 1 << rng.randrange(64)
        recs.append({"sha256": hashlib.sha256(str(rng.randrange(n * 4 // 5)).encode()).hexdigest(),
                     "phash": f"{h:016x}", "width": rng.choice((64, 96)), "height": 64, "location": f"r{i}"})
    return recs


@pytest.mark.parametrize("distance", [4, 0])
def test_on_disk_dedup_reaches_the_in_memory_verdicts(tmp_path, distance):
    recs = _synthetic(1500, distance)
    results = []
    for budget in (1 << 30, 0):
        with Deduplicator(distance, budget, tmp_path) as dd:
            for r in recs:
                dd.add(r)
            assert dd.on_disk == (budget == 0)
            results.append(list(dd.results()))
    assert results[0] == results[1]
    verdicts = [v for _, v in results[0]]
    assert sum(v is None for v in verdicts) < len(recs) * 0.9
    assert {v["reason"] for v in verdicts if v} == {"exact_duplicate", "near_duplicate"}
    assert not list(tmp_path.glob("*.sqlite"))  # the spill file goes with the run


def test_curate_reads_its_engine_from_the_environment(tmp_path):
    from typer.testing import CliRunner

    from vaeft.cli import app

    result = CliRunner().invoke(app, ["curate", "--out", str(tmp_path / "o")], env={"VAEFT_CURATE_ENGINE": "spark"})
    assert result.exit_code == 2 and "'spark': expected local or dask" in result.output
