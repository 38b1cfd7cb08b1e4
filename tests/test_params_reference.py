"""docs/params.md is the schema's own reference: in sync, and covering every key params accept."""

from __future__ import annotations

from typer.testing import CliRunner

from vaeft.cli import app
from vaeft.cli.reference import params_reference
from vaeft.config import Params, params_as_dict

from .conftest import REPO_ROOT

DOC = REPO_ROOT / "docs" / "params.md"


def _keys(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in tree.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= _keys(v, f"{prefix}{k}.")
    return out


def test_committed_reference_is_in_sync_with_the_schema():
    assert DOC.read_text() == params_reference(), "stale: run `vaeft params reference --out docs/params.md`"


def test_reference_lists_every_key_with_its_default():
    text = DOC.read_text()
    for key in _keys(params_as_dict(Params())):
        assert f"| `{key}` |" in text, key
    assert "| `data.eval_fraction` | float (gt 0.0, lt 1.0) | `0.25` |" in text
    assert '| `train.ema.precision` | "fp32" \\| "bf16" \\| "fp16" | `"fp32"` |' in text


def test_reference_command_prints_and_writes(tmp_path):
    runner = CliRunner()
    assert runner.invoke(app, ["params", "reference"]).output == params_reference()
    out = tmp_path / "params.md"
    assert runner.invoke(app, ["params", "reference", "--out", str(out)]).exit_code == 0
    assert out.read_text() == params_reference()
