"""A new user's path: the README's "Your own images" section against reality, and the messages on the way."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from vaeft.cli import app
from vaeft.config import parse_params
from vaeft.errors import VaeftError
from vaeft.runtime_env import PROJECT_ROOT
from vaeft.weights import weights_dir

from .conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()
SECTION = README.split("## Your own images", 1)[1].split("\n## ", 1)[0]


def _blocks(lang: str) -> list[str]:
    return [re.sub(r"^ {3}", "", b, flags=re.M) for b in re.findall(rf"```{lang}\n(.*?)```", SECTION, re.S)]


def test_own_images_params_snippet_is_valid_params(tmp_path):
    snippet = yaml.safe_load(_blocks("yaml")[0])
    src = tmp_path / "photos"
    src.mkdir()
    snippet["data"]["sources"][0]["path"] = str(src)
    params = parse_params(snippet)
    assert params.data.sources[0].kind == "folder" and params.data.min_side == 256


def test_loading_the_export_in_python_as_the_readme_says(base_model):
    code = _blocks("python")[0].replace("export/ft-mse/diffusers", str(base_model))
    code += "\nassert type(vae).__name__ == 'AutoencoderKL'\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_readme_statements_hold(monkeypatch, tmp_path):
    # The stages run `python -m vaeft` (hence: venv active) and log where the section says.
    dvc = (REPO_ROOT / "dvc.yaml").read_text()
    assert "cmd: python -m vaeft train ema" in dvc and "--log logs/train-ema.csv" in dvc
    # The weight store is the checkout's, not the working folder's.
    monkeypatch.delenv("VAEFT_WEIGHTS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert weights_dir().resolve() == (PROJECT_ROOT / "weights").resolve()
    # Every recipe and weight the section names exists.
    for name in re.findall(r"vaeft recipe apply (\S+)", SECTION):
        assert (REPO_ROOT / "vaeft" / "recipes" / f"{name}.yaml").is_file(), name
    registry = yaml.safe_load((REPO_ROOT / "vaeft" / "weights" / "registry.yaml").read_text())
    entries = registry["weights"]
    for name in re.search(r"vaeft weights pull ([\w -]+)", SECTION).group(1).split():
        assert name in entries, name
    # The keys it calls the ones that matter are real keys.
    reference = (REPO_ROOT / "docs" / "params.md").read_text()
    for key in ("augment.crop_size", "train.ema.steps", "evaluate.image_size", "publish.target"):
        assert f"`{key}`" in reference, key
    assert "stage is a no-op" not in README  # it writes a pixel store on the embedded default
    # The curves' PNG is a DVC output of every training stage, beside the CSV the section names.
    for stage_log in ("pretrain", "train-ema", "train-mse"):
        assert f"logs/{stage_log}.csv:" in dvc and f"- logs/{stage_log}.png" in dvc
    assert "`logs/train-ema.png`" in SECTION and "`dvc metrics show`" in SECTION
    # The metrics file's keys, as the Evaluation section lists them.
    from vaeft.metrics.summary import HEADLINE_KEYS

    evaluation = README.split("## Evaluation", 1)[1].split("\n## ", 1)[0]
    assert all(f"`{k}`" in evaluation for k in HEADLINE_KEYS)


def test_recipe_apply_keeps_an_edited_params_file(tmp_path):
    out = tmp_path / "params.yaml"
    out.write_text("# my edits\nseed: 3\n")
    runner = CliRunner()
    first = runner.invoke(app, ["recipe", "apply", "sd-vae-ft", "--out", str(out)])
    assert first.exit_code == 0 and "kept as" in first.output, first.output
    assert (tmp_path / "params.yaml.bak").read_text() == "# my edits\nseed: 3\n"
    out.write_text("seed: 4\n")
    runner.invoke(app, ["recipe", "apply", "sd-vae-ft", "--out", str(out)])
    assert (tmp_path / "params.yaml.bak").read_text() == "# my edits\nseed: 3\n"  # never overwritten
    assert (tmp_path / "params.yaml.bak.1").read_text() == "seed: 4\n"
    again = runner.invoke(app, ["recipe", "apply", "sd-vae-ft", "--out", str(out)])
    assert "kept as" not in again.output and not (tmp_path / "params.yaml.bak.2").exists()  # same bytes: nothing to keep


def test_comparison_grid_tells_the_input_from_the_base_model():
    from vaeft.figures import column_labels

    labels = column_labels(["original", "ft-ema", "ft-mse"])
    assert labels[0] == "input" and len(set(labels)) == len(labels)
    assert len(set(column_labels(["input", "original"]))) == 3


def test_missing_base_names_the_pull_command(tmp_path, monkeypatch, tiny_raw, curated):
    tiny_raw["model"]["base"] = "weights/kl-f8"  # as the sd-vae-ft recipe has it
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_raw))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["pretrain", "--params", str(params), "--data", str(curated),
                                      "--out", str(tmp_path / "base")])
    assert isinstance(result.exception, VaeftError)  # one line, exit 2, through vaeft.cli.main
    assert "model.base weights/kl-f8 does not exist" in str(result.exception)
    assert "`vaeft weights pull kl-f8`" in str(result.exception)
    assert not (tmp_path / "base").exists()


def test_flow_refuses_bad_invocations_in_one_line_before_prefect_starts(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: 0\ntrian: {}\n")  # a typo'd key
    env = {**__import__("os").environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    for args, expected in ((["--recipe", "nope"], "error: recipe 'nope': no vaeft/recipes/nope.yaml"),
                           (["--params-file", str(bad)], "trian")):
        proc = subprocess.run([sys.executable, "-m", "flows.retrain", *args], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr[-2000:]
        assert "Value error" not in lines[0] and "flow parameter flow" not in lines[0]
    # A folder source that is not there fails in the same place (flows.retrain.main), the same way.
    from flows.config import flow_config
    from vaeft.config import ParamsError, load_params

    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump({"data": {"sources": [{"name": "mine", "kind": "folder", "path": "/no/photos"}]}}))
    cfg = flow_config(params_file=missing)
    with pytest.raises(ParamsError, match="^data source 'mine': folder /no/photos does not exist$"):
        cfg.check_sources(load_params(cfg.source_params()))
    # Refused before the flow ran: no Prefect server was started, no params were copied.
    home = tmp_path / "prefect-home"
    assert not home.exists() or not any(home.iterdir())  # Prefect makes its home on import, nothing more
    assert "trian" not in (REPO_ROOT / "params.yaml").read_text()


def test_data_prepare_names_the_inner_folder_and_warns_on_upscaling(tmp_path, capsys):
    from PIL import Image

    from vaeft.data.evalset import EvalSetError, prepare_eval_set

    coco = tmp_path / "coco"
    (coco / "val2017").mkdir(parents=True)
    Image.new("RGB", (80, 60), (9, 9, 9)).save(coco / "val2017" / "a.png")
    Image.new("RGB", (300, 200), (9, 9, 9)).save(coco / "val2017" / "b.png")
    with __import__("pytest").raises(EvalSetError, match=r"no images .*; they are in .*val2017"):
        prepare_eval_set(coco, tmp_path / "out", 128)
    result = prepare_eval_set(coco / "val2017", tmp_path / "out", 128)
    assert result.n_images == 2 and result.n_upscaled == 1
    assert "1 image(s) smaller than 128 were upscaled" in capsys.readouterr().err.replace("\n", " ")


def test_cli_publish_writes_a_receipt(tmp_path, base_model, monkeypatch):
    import json

    from vaeft.config import ExportParams
    from vaeft.export.release import export_models

    export_models(ExportParams(), {"ft": base_model}, tmp_path / "export")
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["publish", "--export", "export", "--to", "pub"])
    assert result.exit_code == 0, result.output
    receipts = list((tmp_path / "pub").glob("*/receipts/*.json"))
    assert len(receipts) == 1 and f"(receipt {receipts[0].relative_to(tmp_path)})" in result.output
    receipt = json.loads(receipts[0].read_text())
    assert set(receipt["outputs_sha256"]) and receipt["params"]["seed"] == 0
