"""The CLI: help for every command, stages runnable outside the pipeline, recipes, and the install."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vaeft.cli import app
from vaeft.compat.torchvision_cpu import ensure_torchvision
from vaeft.data.manifest import read_manifest

runner = CliRunner()

COMMANDS = [[], ["curate"], ["pretrain"], ["train"], ["evaluate"], ["export"], ["publish"], ["augment"], ["augment", "preview"], ["augment", "materialize"],
            ["params"], ["params", "check"], ["params", "show"], ["recipe"], ["recipe", "list"], ["recipe", "apply"],
            ["convert"], ["check-fp16"], ["weights"], ["weights", "pull"], ["weights", "list"], ["weights", "add"],
            ["metrics"], ["data"], ["data", "coco-val"], ["data", "prepare"], ["data", "pin"], ["data", "use"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "vaeft")
def test_every_command_has_help(cmd):
    result = runner.invoke(app, [*cmd, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_curate_plain_folders_outside_the_pipeline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: default thresholds
    photos = tmp_path / "photos"  # beside the output: an output inside its source is refused
    photos.mkdir()
    for i in range(12):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(photos / f"img{i}.png")
    result = runner.invoke(app, ["curate", "--source", str(photos), "--out", str(tmp_path / "cur")])
    assert result.exit_code == 0, result.output
    assert len(read_manifest(tmp_path / "cur")) == 12


def test_recipes_list_and_apply(tmp_path):
    listed = runner.invoke(app, ["recipe", "list"])
    assert listed.exit_code == 0 and "sd-vae-ft" in listed.output
    out = tmp_path / "params.yaml"
    applied = runner.invoke(app, ["recipe", "apply", "sd-vae-ft", "--out", str(out)])
    assert applied.exit_code == 0 and out.exists()
    shown = runner.invoke(app, ["params", "show", "--params", str(out)])
    assert "batch_size: 12" in shown.output and "steps: 313198" in shown.output  # 12 per GPU x 16 = 192


def test_every_data_file_of_the_package_ships_in_the_wheel():
    """Recipes and the weight registry are package data: `vaeft recipe list` works after a wheel
    install. (Checked on pyproject's patterns, not by building a wheel: that takes seconds.)"""
    import ast
    import fnmatch
    import importlib.resources
    import re

    from .conftest import REPO_ROOT

    # tomllib is 3.11+ and the package supports 3.10: the one line, read as a Python list.
    section = (REPO_ROOT / "pyproject.toml").read_text().split("[tool.setuptools.package-data]", 1)[1]
    patterns = ast.literal_eval(re.search(r"^vaeft = (\[.*\])$", section, re.M).group(1))
    tracked = subprocess.run(["git", "ls-files", "vaeft"], cwd=REPO_ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    data = [p.removeprefix("vaeft/") for p in tracked if not p.endswith(".py")]
    assert "recipes/sd-vae-ft.yaml" in data
    assert [p for p in data if not any(fnmatch.fnmatch(p, pat) for pat in patterns)] == []
    recipes = importlib.resources.files("vaeft") / "recipes"
    assert {r.name for r in recipes.iterdir()} >= {"sd-vae-ft.yaml", "furception.yaml", "sdxl.yaml"}


def test_user_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vaeft", "recipe", "apply", "nope", "--out", str(tmp_path / "p.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown recipe 'nope' (available: furception, sd-vae-ft, sdxl-fp16, sdxl)"
    proc = subprocess.run([sys.executable, "-m", "vaeft", "evaluate", "-m", "bad"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "expects NAME=PATH" in proc.stderr


def test_torchvision_work_around_makes_the_stack_importable():
    first = ensure_torchvision()
    assert ensure_torchvision() == first  # idempotent
    if torch.version.cuda is None:
        assert first is True  # the CPU torch needs the work-around (REFERENCE §6)
    import lpips  # noqa: F401
    import torch_fidelity  # noqa: F401
    import torchvision

    assert torchvision.models.vgg16 is not None


def test_cpu_install_has_no_cuda_packages():
    if torch.cuda.is_available():
        pytest.skip("GPU machine: CUDA packages are expected")
    names = {d.metadata["Name"].lower() for d in md.distributions()}
    assert not [n for n in names if n.startswith("nvidia-")]
    assert torch.__version__.endswith("+cpu")


def test_help_keeps_bracketed_defaults_lists_choices_and_no_bool_metavar():
    train = runner.invoke(app, ["train", "--help"], terminal_width=200).output
    assert "[models/ft-PHASE]" in train and "<ema|mse|fp16>" in train
    assert "--to <diffusers|ldm>" in runner.invoke(app, ["convert", "--help"], terminal_width=200).output
    assert "[both]" in runner.invoke(app, ["metrics", "--help"], terminal_width=200).output
    for cmd in (["train"], ["publish"], ["evaluate"]):
        assert "<bool>" not in runner.invoke(app, [*cmd, "--help"]).output, cmd
    bad = runner.invoke(app, ["train", "pretrain", "--init", "x"])
    assert bad.exit_code == 2 and "'pretrain' is not one of 'ema', 'mse'" in bad.output
