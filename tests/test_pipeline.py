"""End to end: the Prefect `retrain` flow over real DVC in a temporary copy of the repo.

Checks the three promises of the pipeline: it builds loadable diffusers models from nothing,
a second run with nothing changed skips every stage, and a changed train param re-runs only the
stages downstream of it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from .conftest import REPO_ROOT, tiny_params_dict

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


def test_retrain_flow_end_to_end(prefect_harness, repo_copy):
    from flows.retrain import retrain

    stages = ["curate", "augment", "pretrain", "train-ema", "train-mse", "evaluate", "export"]
    first = retrain(repo=str(repo_copy), publish_to=str(repo_copy / "pub"))
    assert first.stages == {s: True for s in stages}
    assert first.uploaded

    # The exported models load with diffusers and reconstruct an image.
    from vaeft.model.build import autoencoder_class

    for name in ("ft-ema", "ft-mse"):
        vae = autoencoder_class().from_pretrained(repo_copy / "export" / name / "diffusers")
        x = torch.rand(1, 3, 32, 32) * 2 - 1
        with torch.no_grad():
            y = vae.decode(vae.encode(x).latent_dist.mode()).sample
        assert y.shape == x.shape and torch.isfinite(y).all()
    metrics = json.loads((repo_copy / "metrics" / "eval.json").read_text())
    assert set(metrics) == {"original", "ft-ema", "ft-mse"}
    for stage_dir in ("data/curated", "models/base", "models/ft-ema", "models/ft-mse", "reports/eval", "export"):
        info = json.loads((repo_copy / stage_dir / "run_info.json").read_text())
        assert info["git"]["commit"] and info["params"], stage_dir  # resolved params + commit recorded
    assert (Path(first.published) / "SHA256SUMS").is_file()

    # Nothing changed: DVC skips every stage and publishing uploads nothing.
    second = retrain(repo=str(repo_copy), publish_to=str(repo_copy / "pub"))
    assert second.stages == {s: False for s in stages}
    assert not second.uploaded and second.release == first.release

    # A train.mse param changed: only train-mse and what depends on it re-run.
    raw = yaml.safe_load((repo_copy / "params.yaml").read_text())
    raw["train"]["mse"]["lr"] = 5e-5
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    third = retrain(repo=str(repo_copy), publish_to=str(repo_copy / "pub"))
    assert [s for s, ran in third.stages.items() if ran] == ["train-mse", "evaluate", "export"]
    assert third.release != first.release and third.uploaded


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
