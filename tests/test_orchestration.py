"""Orchestration with real components: Prefect's test server, real DVC, moto's S3 on 127.0.0.1.

One pipeline run serves several promises (training is the expensive part): the retrain flow pulls
from / pushes to an S3 DVC remote and publishes to S3 with a receipt; a fresh clone gets the
models back with `dvc pull`; a fresh clone running `dvc repro` from nothing rebuilds byte-identical
exported weights; publishing again uploads nothing.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import FAKE_SECRET
from .test_pipeline import _git, repo_copy  # noqa: F401  (fixture)


def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    from tasks.dvc_stage import dvc_env

    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=dvc_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)}: {proc.stderr}"
    return proc


def _safetensors_sha(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.safetensors"))}


@pytest.mark.slow
def test_retrain_s3_remote_publish_pull_and_repro(prefect_harness, s3_endpoint, repo_copy, tmp_path):  # noqa: F811
    import boto3

    from flows.publish import publish
    from flows.retrain import retrain
    from vaeft.config import S3PublishParams

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for bucket in ("dvc-remote", "releases"):
        s3.create_bucket(Bucket=bucket)
    repo = repo_copy
    _dvc(repo, "remote", "add", "-d", "storage", "s3://dvc-remote/cache")
    _dvc(repo, "remote", "modify", "storage", "endpointurl", s3_endpoint)
    _git(repo, "add", ".dvc/config")
    _git(repo, "commit", "-q", "-m", "remote")

    target = S3PublishParams(bucket="releases", prefix="vaeft", endpoint_url=s3_endpoint)
    pub_dir = tmp_path / "pub"
    run = retrain(repo=str(repo), publish_to=str(pub_dir), dvc_remote="storage", s3=target)
    assert all(run.stages.values()) and run.uploaded
    built = _safetensors_sha(repo / "export")
    assert len(built) == 4  # 2 models x (diffusers, ldm)

    # Receipt: next to the local release, beside every S3 prefix; no credentials anywhere in it.
    receipt_path = Path(run.publish.receipt)
    assert receipt_path.parent.parent == pub_dir / run.release
    receipt = json.loads(receipt_path.read_text())
    assert receipt["git"]["commit"] and receipt["dvc_lock_sha256"] and receipt["params"]["seed"] == 0
    assert set(receipt["published"]["s3"]) == {"ft-ema", "ft-mse"}
    assert FAKE_SECRET not in receipt_path.read_text() and "test-key-id" not in receipt_path.read_text()
    key = f"vaeft/ft-mse/{run.release}/receipts/{receipt_path.name}"
    assert s3.get_object(Bucket="releases", Key=key)["Body"].read() == receipt_path.read_bytes()
    remote_model = s3.get_object(Bucket="releases",
                                 Key=f"vaeft/ft-mse/{run.release}/ldm/ft-mse.safetensors")["Body"].read()
    assert hashlib.sha256(remote_model).hexdigest() == built["ft-mse/ldm/ft-mse.safetensors"]
    # Outputs and the run-cache reached the DVC remote.
    remote_keys = [o["Key"] for p in s3.get_paginator("list_objects_v2").paginate(Bucket="dvc-remote")
                   for o in p.get("Contents", [])]
    assert any("/runs/" in k for k in remote_keys), "run-cache not pushed"

    # Publishing the same release again writes nothing new, anywhere.
    again = publish(repo=str(repo), publish_to=str(pub_dir), s3=target)
    assert not again.uploaded and again.release == run.release and again.s3 == run.publish.s3

    _git(repo, "add", "dvc.lock")
    _git(repo, "commit", "-q", "-m", "trained")

    # A fresh clone gets the models from the remote.
    pulled = tmp_path / "pulled"
    subprocess.run(["git", "clone", "-q", str(repo), str(pulled)], check=True)
    _dvc(pulled, "pull")
    assert _safetensors_sha(pulled / "export") == built
    assert (pulled / "models" / "ft-mse").is_dir()

    # A fresh clone with no cache and no remote rebuilds the same bytes from scratch.
    rebuilt = tmp_path / "rebuilt"
    subprocess.run(["git", "clone", "-q", str(repo), str(rebuilt)], check=True)
    _dvc(rebuilt, "remote", "remove", "storage")
    _dvc(rebuilt, "repro")
    assert _safetensors_sha(rebuilt / "export") == built


def _stage_repo(tmp_path: Path, cmd: str) -> Path:
    repo = tmp_path / "stage-repo"
    repo.mkdir()
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"s": {"cmd": cmd, "outs": ["out"]}}}))
    (repo / "params.yaml").write_text("seed: 0\n")
    _dvc(repo, "init", "--no-scm", "-q")
    return repo


@pytest.mark.parametrize(("cmd", "error", "attempts"), [
    # exit 2 from our CLI = user error: the same on every try, never retried
    ("python -m vaeft curate --params missing.yaml --out out", "StageUserError", 1),
    # anything else may be transient: retried
    ("python -c \"import sys; sys.exit(1)\"", "StageFailed", 3),
])
def test_stage_failures_are_classified_for_retries(prefect_harness, tmp_path, cmd, error, attempts):
    from prefect import flow

    from tasks.dvc_stage import StageFailed, run_stage

    repo = _stage_repo(tmp_path, f"echo x >> attempts.txt && {cmd}")

    @flow
    def one_stage() -> None:
        run_stage.with_options(retry_delay_seconds=0, retry_jitter_factor=None)("s", str(repo))

    with pytest.raises(StageFailed) as info:
        one_stage()
    assert type(info.value).__name__ == error
    assert (repo / "attempts.txt").read_text().count("x") == attempts


def test_evaluate_flow_has_a_cron_deployment():
    from flows.evaluate import deployment

    dep = deployment("0 3 * * *", {"m": "/models/m"}, {"eval": "/data/curated"}, "/out")
    assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * *"]
    assert dep.parameters["eval_sets"] == {"eval": "/data/curated"}


def test_flow_parameters_are_validated(tmp_path):
    from flows.config import flow_config
    from vaeft.config import ParamsError

    with pytest.raises(ParamsError, match="dvc_remote"):
        flow_config(dvc_remote="bad name; rm -rf /")
    with pytest.raises(ParamsError, match="no dvc.yaml"):
        flow_config(repo=tmp_path)
