"""Static checks that run with the suite: ruff, and the import-linter layer contracts.

Both tools come with the test extra; a missing tool is a failure here, not a skip, so CI can
never pass without running them. The contracts (pyproject.toml, [tool.importlinter]) give the
library one import direction: core <- config <- model/weights/augment <- data <- metrics <-
losses <- train <- stages <- cli, with flows/tasks on top and Prefect kept out of vaeft.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import REPO_ROOT


def _tool(name: str) -> str:
    exe = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert exe, f"{name} is not installed: it is part of the test extra (pip install -e '.[test]')"
    return exe


def test_ruff_is_clean():
    proc = subprocess.run([_tool("ruff"), "check", "--no-cache", "--output-format", "concise", "."],
                          cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_import_layers_hold():
    proc = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_layer_contract_catches_an_upward_import(tmp_path):
    """The contract is not vacuous: a training module importing evaluation (inside a function,
    where the old cycles hid) breaks it."""
    for rel in ("vaeft", "flows", "tasks"):
        shutil.copytree(REPO_ROOT / rel, tmp_path / rel, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    logs = tmp_path / "vaeft" / "train" / "logs.py"
    logs.write_text(logs.read_text() + "\n\ndef _upward():\n    from vaeft.evaluate import report\n\n    return report\n")
    proc = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(tmp_path)})
    assert proc.returncode != 0
    assert "vaeft.train is not allowed to import vaeft.evaluate" in proc.stdout
