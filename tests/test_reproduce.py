"""`vaeft reproduce` on a two-second pipeline (real git, real DVC, real CLI), its comparison on
folders, the receipt fields it needs, and the deterministic-kernels switch of the engine.

The full pipeline's rebuild ("identical" for every model) is in test_pipeline.py, on the release
its one training run publishes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from vaeft.export.release import SUMS_FILE, write_sums
from vaeft.hashing import file_sha256
from vaeft.publish.local import publish_local
from vaeft.publish.receipt import build_receipt, dvc_remote_info, receipt_bytes, strip_userinfo, write_receipt
from vaeft.reproduce import (
    DEFAULT_TOLERANCES,
    EXIT_DIFFERS,
    EXIT_IDENTICAL,
    compare_metrics,
    compare_outputs,
    load_receipt,
    verdict,
)

from .conftest import REPO_ROOT

WEIGHTS = "diffusers/diffusion_pytorch_model.safetensors"

# A stand-in for the export stage: two "models" whose bytes are a pure function of the seed.
MAKE_EXPORT = '''
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

torch.manual_seed(0)
out = Path("export")
for name in ("m1", "m2"):
    path = out / name / "diffusers" / "diffusion_pytorch_model.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"decoder.conv_out.weight": torch.randn(3, 4, 3, 3), "decoder.conv_out.bias": torch.randn(3)}, str(path))
    (out / name / "README.md").write_text(f"# {name}\\n")
Path("metrics").mkdir(exist_ok=True)
Path("metrics/eval.json").write_text(json.dumps({m: {"psnr": 30.0, "ssim": 0.9} for m in ("m1", "m2")}))
'''

DVC_YAML = {"stages": {"export": {"cmd": "python make_export.py", "deps": ["make_export.py"],
                                  "outs": ["export"], "metrics": [{"metrics/eval.json": {"cache": False}}]}}}


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=vaeft-test", "-c", "user.email=test@localhost", *args],
                   cwd=repo, check=True, capture_output=True)


@pytest.fixture(scope="module")
def mini_release(tmp_path_factory) -> dict:
    """A git+DVC repo whose pipeline is one quick stage, built once and published with a receipt."""
    root = tmp_path_factory.mktemp("mini")
    repo = root / "src"
    repo.mkdir()
    (repo / "make_export.py").write_text(MAKE_EXPORT)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    (repo / "params.yaml").write_text("seed: 0\n")
    (repo / ".gitignore").write_text("/export\n/metrics\n")
    _git(repo, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], cwd=repo, check=True)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "mini pipeline")
    # The release as the retrain flow makes it: the stage's outputs, SHA256SUMS, publish, receipt.
    subprocess.run([sys.executable, "make_export.py"], cwd=repo, check=True)
    write_sums(repo / "export")  # the export stage's own writer
    pub = publish_local(repo / "export", root / "published")
    receipt = build_receipt(repo, repo / "export", {"local": str(pub.path)})
    return {"repo": repo, "release": pub.path, "receipt": write_receipt(receipt, pub.path), "root": root}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "vaeft", "reproduce", *args], cwd=cwd, env=env,
                          capture_output=True, text=True)


def test_reproduce_cli_identical_then_a_release_that_differs(mini_release, tmp_path):
    repo, work = mini_release["repo"], tmp_path / "work"
    proc = _cli(str(mini_release["receipt"]), "--workdir", str(work), cwd=repo)
    assert proc.returncode == EXIT_IDENTICAL, proc.stderr[-3000:]
    report = json.loads((work / "reproduce_report.json").read_text())
    assert report["status"] == "identical"
    assert {m: v["status"] for m, v in report["models"].items()} == {"m1": "identical", "m2": "identical"}
    assert "m1: identical (sha256 " in proc.stderr
    assert report["environment"]["same_machine_type"] is True
    assert (work / "reproduce_report.md").read_text().startswith(f"# Reproducing release {report['release']}")
    # Never the user's checkout: the rebuild happened in the work dir's own clone.
    assert (work / "repo" / "dvc.lock").is_file() and not (repo / "dvc.lock").exists()

    # A release whose m1 weights are off by 0.5 in one element (as if built elsewhere), with its
    # receipt saying so, and an eval 1 dB better than the rebuild can reach: "differs", exit 4.
    altered = mini_release["root"] / "altered"
    shutil.copytree(mini_release["release"], altered, ignore=shutil.ignore_patterns("receipts"))
    tensors = load_file(altered / "m1" / WEIGHTS)
    tensors["decoder.conv_out.weight"][0, 0, 0, 0] += 0.5
    save_file(tensors, str(altered / "m1" / WEIGHTS))
    write_sums(altered)
    fake = json.loads(mini_release["receipt"].read_text())
    fake["outputs_sha256"]["m1/" + WEIGHTS] = file_sha256(altered / "m1" / WEIGHTS)
    fake["sha256sums_sha256"] = file_sha256(altered / SUMS_FILE)
    fake["metrics"]["m1"]["psnr"] = 31.0
    fake_path = write_receipt(fake, altered)
    proc = _cli(str(fake_path), "--workdir", str(work), "--report", str(tmp_path / "r" / "altered.json"), cwd=repo)
    assert proc.returncode == EXIT_DIFFERS, proc.stderr[-3000:]
    report = json.loads((tmp_path / "r" / "altered.json").read_text())
    assert report["status"] == "differs" and report["release_dir"] == str(altered)
    m1 = report["models"]["m1"]
    assert m1["status"] == "differs" and report["models"]["m2"]["status"] == "identical"
    (bad,) = [f for f in m1["files"] if not f["identical"]]
    assert bad["path"] == "m1/" + WEIGHTS
    assert bad["tensors"]["differing"] == 1 and bad["tensors"]["tensors"] == 2
    assert bad["tensors"]["largest"][0]["tensor"] == "decoder.conv_out.weight"
    assert bad["tensors"]["max_abs_diff"] == pytest.approx(0.5, abs=1e-6)
    row = next(r for r in report["metrics"] if r["model"] == "m1" and r["metric"] == "psnr")
    assert row["delta"] == pytest.approx(-1.0) and row["within"] is False
    md = (tmp_path / "r" / "altered.md").read_text()
    assert "**differs**" in md and "decoder.conv_out.weight" in md and "| m1 | psnr | 31.0000 | 30.0000 |" in md
    assert "m1: differs (m1/diffusers/diffusion_pytorch_model.safetensors; max |Δ| over tensors 0.5)" in proc.stderr


def _main(capsys, *args: str) -> tuple[int, str]:
    """The CLI in this process (the user errors below fail before any subprocess)."""
    from vaeft.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["reproduce", *args])
    return exc.value.code, capsys.readouterr().err


def test_reproduce_refuses_a_user_directory(mini_release, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(mini_release["repo"])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, err = _main(capsys, str(mini_release["receipt"]), "--workdir", str(mine))
    assert code == 2 and "not empty and was not made by `vaeft reproduce`" in err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"


def test_reproduce_needs_a_repo_that_has_the_commit(mini_release, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not a git checkout
    fake = json.loads(mini_release["receipt"].read_text())
    fake["git"]["commit"] = "0" * 40
    path = tmp_path / "r.json"
    path.write_bytes(receipt_bytes(fake))
    code, err = _main(capsys, str(path), "--workdir", str(tmp_path / "w"))
    assert code == 2 and "records no git remote; pass --repo" in err
    code, err = _main(capsys, str(path), "--workdir", str(tmp_path / "w"), "--repo", str(mini_release["repo"]))
    assert code == 2 and "is not in" in err
    code, err = _main(capsys, str(tmp_path / "none.json"))
    assert code == 2 and "does not exist" in err


def _export(root: Path, value: float) -> Path:
    for name in ("a", "b"):
        (root / name / "diffusers").mkdir(parents=True)
        save_file({"w": torch.full((2, 2), value if name == "a" else 1.0)}, str(root / name / WEIGHTS))
        (root / name / "README.md").write_text(name)
    write_sums(root)
    return root


def test_comparison_of_folders_and_the_verdict(tmp_path):
    release = _export(tmp_path / "release", 1.0)
    expected = {rel: d for d, _, rel in (ln.partition("  ") for ln in (release / SUMS_FILE).read_text().splitlines())}
    same = compare_outputs(expected, _export(tmp_path / "same", 1.0), release)
    assert {m: v["status"] for m, v in same.items()} == {"a": "identical", "b": "identical"}
    assert verdict(same, []) == "identical"

    other = compare_outputs(expected, _export(tmp_path / "other", 1.0 + 2**-20), release)
    assert other["a"]["status"] == "differs" and other["b"]["status"] == "identical"
    assert other["a"]["max_abs_diff"] == pytest.approx(2**-20)
    # A receipt from before the headline split (long form) against a rebuild's headline numbers.
    release_m = {"a": {"psnr_mean": 30.0, "psnr_std": 2.0, "ssim_mean": 0.9, "n_images": 8,
                       "unavailable": {"rfid": {"reason": "no weights"}}}}
    close = compare_metrics(release_m, {"a": {"psnr": 30.04, "ssim": 0.901, "color_shift": 1.5}}, DEFAULT_TOLERANCES)
    assert {r["metric"]: r["within"] for r in close} == {"psnr": True, "ssim": True, "color_shift": None}
    assert verdict(other, close) == "within_tolerance"
    assert verdict(other, compare_metrics(release_m, {"a": {"psnr": 30.04, "ssim": 0.901}},
                                          {"psnr_mean": 0.01})) == "differs"  # tolerances by their old names
    far = compare_metrics(release_m, {"a": {"psnr": 29.9, "ssim": 0.9}}, DEFAULT_TOLERANCES)
    assert verdict(other, far) == "differs"
    assert verdict(other, []) == "differs"  # bytes differ and nothing says the model is still the same

    shutil.rmtree(tmp_path / "same" / "b")
    gone = compare_outputs(expected, tmp_path / "same", release)
    assert gone["b"]["status"] == "missing" and verdict(gone, close) == "differs"


def test_receipt_records_what_reproduce_needs(mini_release, tmp_path):
    assert strip_userinfo("https://user:tok3n@git.example.com/org/vaeft.git") == "https://git.example.com/org/vaeft.git"
    assert strip_userinfo("git@github.com:org/vaeft.git") == "git@github.com:org/vaeft.git"
    repo = tmp_path / "repo"
    shutil.copytree(mini_release["repo"], repo, ignore=shutil.ignore_patterns("export", "metrics"))
    _git(repo, "remote", "add", "origin", "https://user:tok3n@git.example.com/org/vaeft.git")
    subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "-d", "storage", "s3://bucket/cache"],
                   cwd=repo, check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "dvc", "remote", "modify", "--local", "storage", "url",
                    "https://k:s3cret@store.example.com/cache"], cwd=repo, check=True, capture_output=True)
    assert dvc_remote_info(repo) == {"name": "storage", "url": "https://store.example.com/cache"}
    assert dvc_remote_info(repo, "nope") == {"name": "nope", "url": None}
    receipt = build_receipt(repo, mini_release["repo"] / "export", {"local": "x"})
    raw = receipt_bytes(receipt).decode()
    assert "tok3n" not in raw and "s3cret" not in raw
    assert receipt["schema"] == 2 and receipt["git"]["remote_url"] == "https://git.example.com/org/vaeft.git"
    assert receipt["git"]["changed"] == [".dvc/config"] and receipt["git"]["dirty"]  # the remote added above
    assert receipt["dvc_remote"]["name"] == "storage"
    assert receipt["metrics"] is None  # this copy has no metrics/eval.json
    assert json.loads(mini_release["receipt"].read_text())["metrics"]["m1"]["psnr"] == 30.0
    env = receipt["environment"]
    # The stages' thread count (they start with this environment), not the publishing process's.
    assert env["torch"] == torch.__version__ and env["torch_threads"] == int(os.environ["OMP_NUM_THREADS"])


def test_receipt_from_s3(s3_endpoint, mini_release):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="rel")
    s3.put_object(Bucket="rel", Key="vaeft/_release/v/receipts/r.json", Body=mini_release["receipt"].read_bytes())
    receipt, path = load_receipt("s3://rel/vaeft/_release/v/receipts/r.json", s3_endpoint)
    assert path is None and receipt == json.loads(mini_release["receipt"].read_text())


def test_deterministic_mode_sets_and_restores(monkeypatch):
    from vaeft.train.determinism import CUBLAS_WORKSPACE_ENV, deterministic_mode, requested

    monkeypatch.delenv(CUBLAS_WORKSPACE_ENV, raising=False)
    monkeypatch.delenv("VAEFT_DETERMINISTIC", raising=False)
    assert not requested(False) and requested(True)
    monkeypatch.setenv("VAEFT_DETERMINISTIC", "1")
    assert requested(False)
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    with deterministic_mode(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert os.environ[CUBLAS_WORKSPACE_ENV] == ":4096:8"
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before
    assert CUBLAS_WORKSPACE_ENV not in os.environ


def test_deterministic_phase_trains_the_same_bits_on_cpu(tmp_path, curated, base_model):
    """The switch is for GPUs; on CPU every op the engine uses has a deterministic kernel (none
    raises under torch's check) and the result is the same bytes as without it."""
    from vaeft.config import parse_params
    from vaeft.train.engine import train_phase

    from .conftest import tiny_params_dict

    out = {}
    for det in (False, True):
        raw = tiny_params_dict()
        raw["train"]["ema"].update(steps=2, deterministic=det)
        train_phase("ema", parse_params(raw), curated, tmp_path / f"out{det}", init=base_model,
                    state_root=tmp_path / f"s{det}")
        out[det] = file_sha256(tmp_path / f"out{det}" / "diffusion_pytorch_model.safetensors")
    assert out[True] == out[False]
    assert not torch.are_deterministic_algorithms_enabled()


def test_rebuild_uses_the_receipts_params_and_names_machine_differences(tmp_path):
    from vaeft.config import load_params, params_as_dict
    from vaeft.reproduce import _align_params, environment_diff

    (tmp_path / "params.yaml").write_text("seed: 0\n")
    notes: list[str] = []
    _align_params(tmp_path, {"params": {"seed": 0}}, notes)  # the same params, however spelled
    assert notes == [] and (tmp_path / "params.yaml").read_text() == "seed: 0\n"
    _align_params(tmp_path, {"params": {"seed": 7}}, notes)
    assert load_params(tmp_path / "params.yaml").seed == 7 and "rebuilt with the receipt's params" in notes[0]
    assert params_as_dict(load_params(tmp_path / "params.yaml"))["seed"] == 7

    env = {"machine": "x86_64", "cpu": "A", "cpu_count": 2, "torch_threads": 2, "cuda_device": None, "torch": "2.13.0"}
    assert environment_diff(env, dict(env)) == {"known": True, "same_machine_type": True, "differs": {}}
    newer = environment_diff(env, {**env, "torch": "2.14.0"})
    assert newer["same_machine_type"] is True and set(newer["differs"]) == {"torch"}
    gpu = environment_diff(env, {**env, "cuda_device": "NVIDIA H100"})
    assert gpu["same_machine_type"] is False and gpu["differs"]["cuda_device"]["rebuild"] == "NVIDIA H100"
    assert environment_diff(None, env)["known"] is False

    from vaeft.reproduce import uncommitted_inputs

    assert uncommitted_inputs({"dirty": True, "changed": ["dvc.lock", "data/.gitignore"]}) == []
    assert uncommitted_inputs({"dirty": True, "changed": ["dvc.lock", "params.yaml"]}) == ["params.yaml"]
    assert uncommitted_inputs({"dirty": True}) == ["(unknown files)"] and uncommitted_inputs({"dirty": False}) == []
