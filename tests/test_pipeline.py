"""End to end: the Prefect `retrain` flow over real DVC in a temporary copy of the repo.

With a real DVC remote and publishing target on moto's S3 server (127.0.0.1).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from .conftest import FAKE_SECRET, REPO_ROOT, run_dvc, tiny_params_dict

pytestmark = pytest.mark.slow


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=vaeft-test", "-c", "user.email=test@localhost", *args],
                   cwd=repo, check=True, capture_output=True)


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory) -> Path:
    """The project's tracked (and untracked, not ignored) files in a fresh git repo."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\n")
    dst = tmp_path_factory.mktemp("repo") / "vaeft"
    for rel in filter(None, files):
        src = REPO_ROOT / rel
        if src.is_file() and not rel.startswith("tests/"):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    (dst / "dvc.lock").unlink(missing_ok=True)
    (dst / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(), sort_keys=False))
    _git(dst, "init", "-q")
    _git(dst, "add", "-A")
    _git(dst, "commit", "-q", "-m", "test copy")
    return dst


def _safetensors_sha(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.safetensors"))}


# Two pipeline builds (a flow run and reproduce's rebuild) and a no-op flow run: ~2.5 min on a
# quiet 2-core machine, ~9 min under heavy load, too close to the suite's 600 s default.
@pytest.mark.timeout(1200)
def test_retrain_flow_end_to_end(prefect_harness, s3_endpoint, repo_copy, tmp_path):
    """One training run (the expensive part) serves every promise of the pipeline:

    it builds loadable models from nothing, pushes outputs and the run-cache to an S3 DVC remote
    and publishes to S3 with a receipt; a second run skips every stage and uploads nothing; a
    fresh clone gets the models back with `dvc pull`; `vaeft reproduce` on the published receipt
    rebuilds every stage from nothing in its own clone and reports every model identical, with the
    same dvc.lock; a changed train param flags only its own stage.
    """
    import boto3

    from flows.publish import publish
    from flows.retrain import retrain
    from vaeft.config import S3PublishParams
    from vaeft.metrics.summary import HEADLINE_KEYS
    from vaeft.model.build import autoencoder_class
    from vaeft.provenance import read_run_record

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for bucket in ("dvc-remote", "releases"):
        s3.create_bucket(Bucket=bucket)
    repo = repo_copy
    run_dvc(repo, "remote", "add", "-d", "storage", "s3://dvc-remote/cache")
    run_dvc(repo, "remote", "modify", "storage", "endpointurl", s3_endpoint)
    _git(repo, "add", ".dvc/config")
    _git(repo, "commit", "-q", "-m", "remote")
    target = S3PublishParams(bucket="releases", prefix="vaeft", endpoint_url=s3_endpoint)
    pub_dir = tmp_path / "pub"

    stages = ["curate", "augment", "pretrain", "train-ema", "train-mse", "evaluate", "export"]
    first = retrain(repo=str(repo), publish_to=str(pub_dir), dvc_remote="storage", s3=target)
    assert first.stages == {s: True for s in stages}
    assert first.uploaded
    built = _safetensors_sha(repo / "export")
    assert len(built) == 4  # 2 models x (diffusers, ldm)

    # The exported models load with diffusers and reconstruct an image.
    for name in ("ft-ema", "ft-mse"):
        vae = autoencoder_class().from_pretrained(repo / "export" / name / "diffusers")
        x = torch.rand(1, 3, 32, 32) * 2 - 1
        with torch.no_grad():
            y = vae.decode(vae.encode(x).latent_dist.mode()).sample
        assert y.shape == x.shape and torch.isfinite(y).all()
    metrics = json.loads((repo / "metrics" / "eval.json").read_text())
    assert set(metrics) == {"original", "ft-ema", "ft-mse"}
    assert all(set(m) <= set(HEADLINE_KEYS) and all(type(v) is float for v in m.values()) for m in metrics.values())
    for stage_dir in ("data/curated", "models/base", "models/ft-ema", "models/ft-mse", "reports/eval", "export"):
        info = json.loads((repo / stage_dir / "run_info.json").read_text())
        assert info["params"] and "git" not in info and "created_utc" not in info, stage_dir
        record = read_run_record(repo / stage_dir)  # the volatile part, outside DVC's hashes
        assert record["git"]["commit"] and record["created_utc"] and record["stage"], stage_dir
        assert record == json.loads((repo / ".vaeft" / "runs" / f"{stage_dir}.json").read_text())
    assert (Path(first.published) / "SHA256SUMS").is_file()

    # Receipt: next to the local release, beside every S3 prefix; no credentials anywhere in it.
    receipt_path = Path(first.publish.receipt)
    assert receipt_path.parent.parent == pub_dir / first.release
    receipt = json.loads(receipt_path.read_text())
    assert receipt["git"]["commit"] and receipt["dvc_lock_sha256"] and receipt["params"]["seed"] == 0
    assert set(receipt["published"]["s3"]) == {"ft-ema", "ft-mse"}
    assert FAKE_SECRET not in receipt_path.read_text() and "test-key-id" not in receipt_path.read_text()
    key = f"vaeft/ft-mse/{first.release}/receipts/{receipt_path.name}"
    assert s3.get_object(Bucket="releases", Key=key)["Body"].read() == receipt_path.read_bytes()
    remote_model = s3.get_object(Bucket="releases",
                                 Key=f"vaeft/ft-mse/{first.release}/ldm/ft-mse.safetensors")["Body"].read()
    assert hashlib.sha256(remote_model).hexdigest() == built["ft-mse/ldm/ft-mse.safetensors"]
    remote_keys = [o["Key"] for p in s3.get_paginator("list_objects_v2").paginate(Bucket="dvc-remote")
                   for o in p.get("Contents", [])]
    assert any("/runs/" in k for k in remote_keys), "run-cache not pushed"

    # `vaeft reproduce` on the release's receipt: its own clone at the receipt's commit (from this
    # checkout, the cwd), every stage run again (`dvc repro --force`: no cache, no remote), and
    # every published model identical. It only reads this checkout, so it runs while the checks
    # below use it (half of this test's time on an otherwise idle core).
    assert receipt["metrics"] == metrics and receipt["dvc_remote"]["name"] == "storage"
    work = tmp_path / "reproduce"
    rebuild_log = tmp_path / "reproduce.log"  # a file, not a pipe nobody reads while the checks run
    with open(rebuild_log, "wb") as log:
        rebuild = subprocess.Popen(
            [sys.executable, "-m", "vaeft", "reproduce", str(receipt_path), "--workdir", str(work)],
            cwd=repo, stdout=subprocess.DEVNULL, stderr=log)
    try:
        # Nothing changed: DVC skips every stage and publishing uploads nothing, locally or to S3.
        second = retrain(repo=str(repo), publish_to=str(pub_dir), dvc_remote="storage", s3=target)
        assert second.stages == {s: False for s in stages}
        assert not second.uploaded and second.release == first.release
        again = publish(repo=str(repo), publish_to=str(pub_dir), s3=target)
        assert not again.uploaded and again.release == first.release and again.s3 == first.publish.s3

        _git(repo, "add", "dvc.lock")
        _git(repo, "commit", "-q", "-m", "trained")
        # A fresh clone gets the models from the remote.
        pulled = tmp_path / "pulled"
        subprocess.run(["git", "clone", "-q", str(repo), str(pulled)], check=True)
        run_dvc(pulled, "pull")
        assert _safetensors_sha(pulled / "export") == built
        rebuild.wait(timeout=900)
    finally:
        rebuild.kill()
        rebuild.wait()
    err = rebuild_log.read_text()
    assert rebuild.returncode == 0, err[-5000:]
    report = json.loads((work / "reproduce_report.json").read_text())
    assert report["status"] == "identical" and report["commit"] == receipt["git"]["commit"]
    assert {m: v["status"] for m, v in report["models"].items()} == {"ft-ema": "identical", "ft-mse": "identical"}
    for name in ("ft-ema", "ft-mse"):
        weights = built[f"{name}/diffusers/diffusion_pytorch_model.safetensors"]
        assert f"{name}: identical (sha256 {weights[:12]}" in err, err[-3000:]
    assert _safetensors_sha(work / "repo" / "export") == built
    assert report["environment"]["same_machine_type"] is True
    assert not any("params.yaml" in n for n in report["notes"])  # the commit's params were the release's
    # ... and the same dvc.lock: every output's hash (the checkpoints' identity) comes out the same,
    # though this run was at another time, in another folder (no time or commit in the outputs).
    assert (work / "repo" / "dvc.lock").read_text() == (repo / "dvc.lock").read_text()

    # A train.mse param changed: DVC flags train-mse alone (each stage declares only its own params
    # section); evaluate and export follow through their deps on models/ft-mse once it is rebuilt.
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["train"]["mse"]["lr"] = 5e-5
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    status = json.loads(run_dvc(repo, "status", "--json"))
    assert set(status) == {"train-mse"}, status
    assert status["train-mse"] == [{"changed deps": {"params.yaml": {"train.mse": "modified"}}}]


def test_bad_params_fail_before_any_stage(prefect_harness, repo_copy, tmp_path):
    from flows.retrain import retrain
    from vaeft.config import ParamsError

    bad = tmp_path / "repo"
    shutil.copytree(repo_copy, bad, ignore=shutil.ignore_patterns("data", "models", "export", "pub"))
    raw = yaml.safe_load((bad / "params.yaml").read_text())
    raw["train"]["ema"]["lr"] = -1
    (bad / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match="train.ema.lr = -1"):
        retrain(repo=str(bad))
    assert not (bad / "data" / "curated").exists()
