"""params.yaml validation: every mistake stops early with one line naming key and value."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from vaeft.config import Params, ParamsError, load_params, parse_params

from .conftest import REPO_ROOT


def _error(raw: dict) -> str:
    with pytest.raises(ParamsError) as exc:
        parse_params(raw, "params.yaml")
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_committed_params_and_recipes_validate():
    params = load_params(REPO_ROOT / "params.yaml")
    assert params.model.base is None  # the embedded default pretrains
    assert params.model.architecture.block_out_channels == [32, 32, 64, 64]
    recipes = sorted((REPO_ROOT / "vaeft" / "recipes").glob("*.yaml"))
    assert recipes, "recipe presets are missing"
    for recipe in recipes:
        load_params(recipe)


def test_defaults_fill_in_missing_sections():
    assert parse_params({}) == Params()


def test_typo_key_is_named_with_allowed_keys(tiny_raw):
    tiny_raw["train"]["ema"]["lrr"] = 0.1
    msg = _error(tiny_raw)
    assert msg.startswith("params.yaml: train.ema.lrr = 0.1: unknown key")
    assert "lr" in msg.split("allowed:")[1]


def test_wrong_type(tiny_raw):
    tiny_raw["train"]["mse"]["steps"] = "many"
    assert _error(tiny_raw).startswith("params.yaml: train.mse.steps = 'many':")


def test_negative_lr(tiny_raw):
    tiny_raw["train"]["ema"]["lr"] = -1e-4
    msg = _error(tiny_raw)
    assert "train.ema.lr = -0.0001" in msg and "greater than 0" in msg


def test_crop_larger_than_min_side(tiny_raw):
    tiny_raw["augment"]["crop_size"] = 128
    tiny_raw["data"]["min_side"] = 64
    assert _error(tiny_raw) == "params.yaml: augment.crop_size = 128: larger than data.min_side=64"


def test_crop_not_multiple_of_downsampling(tiny_raw):
    tiny_raw["augment"]["crop_size"] = 36
    assert "augment.crop_size = 36: not a multiple of the model's downsampling factor 8" in _error(tiny_raw)


def test_unknown_loss_name(tiny_raw):
    tiny_raw["train"]["ema"]["loss"] = {"l3": 1.0}
    msg = _error(tiny_raw)
    assert "train.ema.loss.l3 = 1.0: unknown key" in msg
    assert "l1, mse, oklab_l1, oklab_mse, lpips" in msg


def test_loss_needs_a_term(tiny_raw):
    tiny_raw["train"]["ema"]["loss"] = {"l1": 0.0}
    assert "at least one of l1, mse, oklab_l1, oklab_mse, lpips must be > 0" in _error(tiny_raw)


def test_finetune_must_be_decoder_only(tiny_raw):
    tiny_raw["train"]["ema"]["trainable"] = "all"
    assert "train.ema.trainable must be 'decoder'" in _error(tiny_raw)


def test_group_norm_must_divide_channels(tiny_raw):
    tiny_raw["model"]["architecture"]["norm_num_groups"] = 5
    assert "not divisible by norm_num_groups=5" in _error(tiny_raw)


def test_several_errors_are_all_reported_on_one_line(tiny_raw):
    tiny_raw["seed"] = -1
    tiny_raw["evaluate"]["batch_size"] = 0
    msg = _error(tiny_raw)
    assert "seed = -1" in msg and "evaluate.batch_size = 0" in msg and "(and 1 more:" in msg


def test_duplicate_yaml_key_is_refused(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("seed: 1\nseed: 2\n")
    with pytest.raises(ParamsError, match=r"duplicate key 'seed' at line 2"):
        load_params(p)


def test_invalid_yaml_and_missing_file(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("data: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(p)
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_cli_reports_one_line_and_exit_code_2(tmp_path, tiny_raw):
    tiny_raw["train"]["ema"]["lr"] = -1
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(tiny_raw))
    proc = subprocess.run(
        [sys.executable, "-m", "vaeft", "params", "check", "--params", str(p)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "train.ema.lr = -1" in lines[0]
