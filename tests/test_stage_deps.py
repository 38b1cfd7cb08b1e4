"""dvc.yaml's deps follow what each stage's command imports, and curate's local sources."""

from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from PIL import Image

from vaeft.cli.deps import check_problems, missing_source_deps, stage_deps, write_stage_deps

from .conftest import REPO_ROOT, run_dvc
from .curate_corpus import photo


def _rel(obj) -> str:
    """The file that defines ``obj``, relative to the repo: found from the object, not a path."""
    return Path(inspect.getsourcefile(obj)).resolve().relative_to(REPO_ROOT).as_posix()


def test_dvc_yaml_deps_match_what_each_stage_imports():
    problems = check_problems(stage_deps(REPO_ROOT))
    assert problems == [], "dvc.yaml is out of date; run `vaeft stage deps --write`:\n" + "\n".join(problems)


def test_training_stages_depend_on_the_defaults_the_manifest_and_the_lpips_network():
    from vaeft.config import Params
    from vaeft.data.manifest import read_manifest
    from vaeft.losses.lpips import build_lpips  # the network lives with the eval metric, wherever that is

    deps = {s.stage: s for s in stage_deps(REPO_ROOT)}
    for stage in ("pretrain", "train-ema", "train-mse"):
        code = deps[stage].code
        assert {_rel(Params), _rel(read_manifest), _rel(build_lpips)} <= set(code), stage
        assert "vaeft/cli/stages.py" in code and "vaeft/__main__.py" in code
    # The other commands' bodies are not followed: curating imports no training code.
    from vaeft.train.engine import train_phase

    assert _rel(train_phase) not in deps["curate"].code
    assert _rel(train_phase) in deps["train-ema"].code


def _project_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "proj"
    shutil.copytree(REPO_ROOT / "vaeft", dst / "vaeft", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO_ROOT / "dvc.yaml", dst / "dvc.yaml")
    shutil.copy2(REPO_ROOT / "params.yaml", dst / "params.yaml")
    return dst


def test_a_new_import_inside_a_function_makes_the_check_red_and_write_fixes_it(tmp_path):
    from vaeft.data.curate import curate

    proj = _project_copy(tmp_path)
    lib = proj / _rel(curate)
    helper = lib.with_name("brand_new_helper.py")
    helper.write_text("VALUE = 1\n")
    lib.write_text(lib.read_text() + "\n\ndef _late():\n    from . import brand_new_helper\n    return brand_new_helper.VALUE\n")
    new = helper.relative_to(proj).as_posix()

    problems = check_problems(stage_deps(proj))
    assert problems == [f"stage 'curate': {new} is not a dep"]

    assert write_stage_deps(proj) == ["curate"]
    assert check_problems(stage_deps(proj)) == []
    text = (proj / "dvc.yaml").read_text()
    assert "# Optional per recipe" in text and "cmd: >-" in text  # comments and folded commands kept
    spec = yaml.safe_load(text)["stages"]
    assert new in spec["curate"]["deps"]
    assert spec["train-ema"]["deps"][:3] == ["data/curated", "data/crops", "models/base"]  # data deps kept


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", *args], cwd=repo, check=True,
                   capture_output=True)


def test_new_images_in_a_source_folder_and_edited_imports_rerun_curate(tmp_path):
    proj = tmp_path / "proj"
    shutil.copytree(REPO_ROOT / "vaeft", proj / "vaeft", ignore=shutil.ignore_patterns("__pycache__"))
    photos = proj / "photos"
    photos.mkdir()
    for i in range(4):
        Image.fromarray(photo(40 + i)).save(photos / f"p{i}.png")
    (proj / "params.yaml").write_text(yaml.safe_dump({"data": {
        "sources": [{"name": "mine", "kind": "folder", "path": "photos"}],
        "min_side": 64, "eval_fraction": 0.5, "workers": 1}}))
    (proj / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"curate": {
        "cmd": "python -m vaeft curate --params params.yaml --out data/curated",
        "params": ["data"], "outs": ["data/curated"]}}}))
    (proj / ".gitignore").write_text(".vaeft/\n__pycache__/\n")
    (proj / ".dvcignore").write_text(".vaeft/\n__pycache__/\n")
    _git(proj, "init", "-q")
    run_dvc(proj, "init", "-q")

    # Until the folder is a dep, DVC cannot see new images: both entry points say so in one line.
    assert missing_source_deps(proj) == [("curate", "photos")]
    from tasks.dvc_stage import dvc_env

    check = subprocess.run([sys.executable, "-m", "vaeft", "params", "check"], cwd=proj, env=dvc_env(),
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0
    assert "data source photos is not a dep of dvc.yaml stage 'curate'" in check.stderr
    assert "vaeft stage deps --write" in check.stderr

    write_stage_deps(proj)
    deps = yaml.safe_load((proj / "dvc.yaml").read_text())["stages"]["curate"]["deps"]
    assert deps[0] == "photos" and all(d.startswith("vaeft/") for d in deps[1:])
    assert missing_source_deps(proj) == []
    _git(proj, "add", "-A")
    _git(proj, "commit", "-q", "-m", "project")
    run_dvc(proj, "repro", "curate")
    assert "up to date" in run_dvc(proj, "status").lower()

    Image.fromarray(photo(50)).save(photos / "new.png")
    status = run_dvc(proj, "status", "--json")
    assert '"photos"' in status and "curate" in status, status
    run_dvc(proj, "repro", "curate")
    assert "up to date" in run_dvc(proj, "status").lower()

    # Editing a module the stage imports flags it too (the manifest writer, found from the code).
    from vaeft.data.manifest import write_manifest

    module = proj / Path(inspect.getsourcefile(write_manifest)).resolve().relative_to(REPO_ROOT)
    module.write_text(module.read_text() + "\n# edited\n")
    status = run_dvc(proj, "status", "--json")
    assert module.relative_to(proj).as_posix() in status and "curate" in status, status
