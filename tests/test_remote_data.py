"""Remote datasets as stage inputs: pins (`vaeft data pin`/`use`), shard checks, evaluation from S3."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from vaeft.data.manifest import read_manifest

from .conftest import REPO_ROOT, run_dvc


def _upload(s3, root: Path, bucket: str, prefix: str) -> str:
    s3.create_bucket(Bucket=bucket)
    for f in sorted(root.rglob("*")):
        if f.is_file():
            s3.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(root).as_posix()}")
    return f"s3://{bucket}/{prefix}"


def test_fetched_shards_are_checked_against_the_pin_and_the_manifest(tmp_path, curated, s3_endpoint):
    """A shard replaced behind an unchanged manifest never enters the cache: through the pin any
    changed byte is caught; from the bare URL (or with ranged reads) a changed kept JPEG is."""
    import boto3

    from vaeft.data.pin import pin_dataset
    from vaeft.data.shards import CuratedSet, ShardIntegrityError

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    url = _upload(s3, curated, "checked", "curated")
    opts = {"endpoint_url": s3_endpoint}
    pin = pin_dataset(url, tmp_path / "pin.json", local=curated, storage_options=opts)
    jpeg = next(r for r in read_manifest(curated) if r.format == "jpeg")  # sklearn's china/flower photos
    bad = bytearray((curated / jpeg.shard).read_bytes())
    bad[jpeg.offset + jpeg.size // 2] ^= 0xFF  # same size: only a digest can tell
    s3.put_object(Bucket="checked", Key=f"curated/{jpeg.shard}", Body=bytes(bad))

    pinned = CuratedSet(pin.path, cache_dir=tmp_path / "c1", storage_options=opts)
    assert pinned.store.root == url
    with pytest.raises(ShardIntegrityError, match="the dataset's pin says"):
        pinned.read(jpeg)
    bare = CuratedSet(url, cache_dir=tmp_path / "c2", storage_options=opts)
    with pytest.raises(ShardIntegrityError, match="not the image the manifest lists"):
        bare.read(jpeg)
    ranged = CuratedSet(url, cache_dir=tmp_path / "c3", storage_options=opts, cache=False)
    with pytest.raises(ShardIntegrityError, match="not the image the manifest lists"):
        ranged.read(jpeg)
    assert not list((tmp_path / "c1").rglob("*.tar")) and not list((tmp_path / "c2").rglob("*.tar"))
    # The other shards still read, and are cached once checked.
    other = next(r for r in pinned.rows if r.shard != jpeg.shard)
    assert pinned.read(other) == (curated / other.shard).read_bytes()[other.offset:other.offset + other.size]
    assert [p.name for p in (tmp_path / "c1").rglob("*.tar")] == [Path(other.shard).name]


def test_evaluate_from_the_pinned_remote_equals_evaluate_from_the_local_copy(tmp_path, curated, base_model,
                                                                            s3_endpoint, monkeypatch):
    import boto3
    from typer.testing import CliRunner

    from vaeft.cli import app
    from vaeft.config import parse_params
    from vaeft.evaluate.report import DETAIL_FILE, PER_IMAGE_FILE, evaluate_models

    from .conftest import tiny_params_dict

    monkeypatch.setenv("VAEFT_WEIGHTS_DIR", str(tmp_path / "no-weights"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("VAEFT_SHARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    url = _upload(boto3.client("s3", endpoint_url=s3_endpoint), curated, "evalset", "curated")
    raw = tiny_params_dict()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    evaluate_models(parse_params(raw).evaluate, curated, {"m": base_model}, tmp_path / "local.json",
                    tmp_path / "local")
    runner = CliRunner()
    done = runner.invoke(app, ["data", "pin", url, "--out", "local.json"])  # the metrics file: not a pin
    assert "refusing to replace local.json: it is not a dataset pin" in str(done.exception)
    done = runner.invoke(app, ["data", "pin", url, "--out", "remote.json"])
    assert done.exit_code == 0, done.output
    done = runner.invoke(app, ["evaluate", "-m", f"m={base_model}", "--data", "remote.json",
                               "--metrics", "remote-metrics.json", "--report", "remote"])
    assert done.exit_code == 0, done.output
    detail = {k: json.loads((tmp_path / k / DETAIL_FILE).read_text())["models"] for k in ("local", "remote")}
    assert detail["remote"] == detail["local"] and detail["local"]["m"]["n_images"] >= 2
    assert (tmp_path / "remote" / PER_IMAGE_FILE).read_text() == (tmp_path / "local" / PER_IMAGE_FILE).read_text()
    assert (tmp_path / "remote-metrics.json").read_text() == (tmp_path / "local.json").read_text()
    assert {p.name for p in (tmp_path / "cache").rglob("*.tar")} == {
        Path(r.shard).name for r in read_manifest(curated, split="eval")}  # the eval split's shards only
    # A damaged pin: a user error (one line, exit 2 from `vaeft`), before any model is loaded.
    from vaeft.data.pin import PinError

    (tmp_path / "bad.json").write_text('{"kind": "vaeft-remote-dataset", "url": "s3://evalset/curated"}')
    done = runner.invoke(app, ["evaluate", "-m", f"m={base_model}", "--data", "bad.json"])
    assert isinstance(done.exception, PinError) and "bad.json: a damaged dataset pin" in str(done.exception)


def _pin(path: Path, manifest_sha256: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"kind": "vaeft-remote-dataset", "url": "s3://bucket/curated", "images": {},
                                "manifest": {"sha256": manifest_sha256, "size": 10}, "shards": {}}))


def test_data_use_points_the_stages_at_a_pin_that_dvc_records(tmp_path):
    from vaeft.cli.deps import use_data

    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copy(REPO_ROOT / "dvc.yaml", proj / "dvc.yaml")
    original = (proj / "dvc.yaml").read_text()
    before = yaml.safe_load(original)["stages"]
    _pin(proj / "data" / "remote.json", "a" * 64)

    assert use_data(proj, "data/remote.json") == ["pretrain", "train-ema", "train-mse", "evaluate"]
    stages = yaml.safe_load((proj / "dvc.yaml").read_text())["stages"]
    for name in ("pretrain", "train-ema", "train-mse", "evaluate"):
        assert "--data data/remote.json" in stages[name]["cmd"] and "data/curated" not in stages[name]["cmd"]
        # Only the data dep is swapped: the code deps `vaeft stage deps --check` derives stay as written.
        assert stages[name]["deps"] == ["data/remote.json" if d == "data/curated" else d for d in before[name]["deps"]]
        assert stages[name]["params"] == [*before[name]["params"], {"data/remote.json": ["url", "manifest"]}]
    assert {k: stages[k] for k in ("curate", "augment", "export")} == {k: before[k] for k in ("curate", "augment", "export")}
    assert use_data(proj, "data/remote.json") == []
    assert use_data(proj, "data/curated") == ["pretrain", "train-ema", "train-mse", "evaluate"]
    assert (proj / "dvc.yaml").read_text() == original  # back to the embedded default, byte for byte

    # What DVC makes of such a stage: the lock names the dataset; a new pin flags the stage.
    repo = tmp_path / "dvcrepo"
    _pin(repo / "data" / "remote.json", "a" * 64)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": {
        "cmd": "echo trained", "deps": ["data/remote.json"],
        "params": [{"data/remote.json": ["url", "manifest"]}]}}}))
    (repo / ".dvc").mkdir()
    (repo / ".dvc" / "config").write_text("[core]\n    no_scm = True\n")  # what `dvc init --no-scm` needs, ~2 s less
    run_dvc(repo, "repro")
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["train"]
    assert lock["params"]["data/remote.json"] == {"url": "s3://bucket/curated",
                                                  "manifest": {"sha256": "a" * 64, "size": 10}}
    _pin(repo / "data" / "remote.json", "b" * 64)  # the dataset changed and was pinned again
    status = json.loads(run_dvc(repo, "status", "--json"))
    assert status == {"train": [{"changed deps": {"data/remote.json": {"manifest": "modified"}}}]}
