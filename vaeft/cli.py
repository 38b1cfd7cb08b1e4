"""The ``vaeft`` command line. Each command validates params once, then calls one library stage.

Errors users can fix (bad params, missing inputs) end in one red line and exit code 2.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Annotated, Optional

import click
import typer

from vaeft.config import DEFAULT_PARAMS_FILE, Params, ParamsError, load_params, params_as_dict

app = typer.Typer(
    name="vaeft",
    help="Fine-tune Stable Diffusion kl-f8 VAE decoders: curate -> pretrain/import -> ft-EMA -> ft-MSE -> evaluate -> export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
params_app = typer.Typer(help="Inspect and validate params files.", no_args_is_help=True)
recipe_app = typer.Typer(help="Recipe presets (real-run params files).", no_args_is_help=True)
app.add_typer(params_app, name="params")
app.add_typer(recipe_app, name="recipe")

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file (YAML)")]
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class UsageError(Exception):
    """A user-fixable problem; printed as one line."""


def _load(path: Path) -> Params:
    return load_params(path)


def _named_paths(items: list[str], option: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"{option} expects NAME=PATH, got {item!r}")
        if name in out:
            raise UsageError(f"{option}: model name {name!r} given twice")
        out[name] = Path(path)
    return out


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise UsageError(f"{what} {path} does not exist")
    return path


# --------------------------------------------------------------------------- params / recipes


@params_app.command("check")
def params_check(params: ParamsOpt = DEFAULT_PARAMS_FILE) -> None:
    """Validate a params file; prints 'ok' or the first problem (key and value)."""
    _load(params)
    typer.echo(f"{params}: ok")


@params_app.command("show")
def params_show(params: ParamsOpt = DEFAULT_PARAMS_FILE) -> None:
    """Print the resolved params (defaults filled in) as YAML."""
    import yaml

    typer.echo(yaml.safe_dump(params_as_dict(_load(params)), sort_keys=False), nl=False)


def _recipe_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))} if RECIPES_DIR.is_dir() else {}


@recipe_app.command("list")
def recipe_list() -> None:
    """List the recipe presets."""
    for name, path in _recipe_files().items():
        first = next((ln.lstrip("# ").strip() for ln in path.read_text().splitlines() if ln.startswith("#")), "")
        typer.echo(f"{name:<16} {first}")


@recipe_app.command("apply")
def recipe_apply(
    name: Annotated[str, typer.Argument(help="recipe name (see `vaeft recipe list`)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="params file to write")] = DEFAULT_PARAMS_FILE,
) -> None:
    """Validate a recipe preset and write it as the params file for a real run."""
    recipes = _recipe_files()
    if name not in recipes:
        raise UsageError(f"unknown recipe {name!r} (available: {', '.join(recipes) or 'none'})")
    _load(recipes[name])
    shutil.copyfile(recipes[name], out)
    typer.echo(f"wrote {out} from recipe {name}; run `dvc repro` to train it")


# --------------------------------------------------------------------------- stages


@app.command()
def curate(
    params: ParamsOpt = DEFAULT_PARAMS_FILE,
    out: Annotated[Path, typer.Option("--out", "-o", help="curated data directory")] = Path("data/curated"),
    source: Annotated[
        Optional[list[Path]], typer.Option("--source", "-s", help="image folder; replaces the params' sources (repeatable)")
    ] = None,
) -> None:
    """Validate, normalise and split images into a curated store with a manifest."""
    from vaeft.config import SourceParams
    from vaeft.data.curate import curate as run

    # Outside a vaeft checkout (no params.yaml) plain folders curate with the default thresholds.
    data = (_load(params) if params.exists() or params != DEFAULT_PARAMS_FILE else Params()).data
    if source:
        sources = [SourceParams(name=f"src{i}_{s.name or 'root'}", kind="folder", path=str(_require(s, "source")))
                   for i, s in enumerate(source)]
        data = data.model_copy(update={"sources": sources})
    run(data, out)


@app.command()
def pretrain(
    params: ParamsOpt = DEFAULT_PARAMS_FILE,
    data: Annotated[Path, typer.Option(help="curated data directory")] = Path("data/curated"),
    out: Annotated[Path, typer.Option("--out", "-o", help="output diffusers folder")] = Path("models/base"),
    log: Annotated[Optional[Path], typer.Option(help="training log CSV (DVC plot)")] = None,
    state_dir: Annotated[Path, typer.Option(help="resumable training state (outside DVC outputs)")] = Path(".vaeft/state"),
) -> None:
    """The base model: import model.base if set, else pretrain the tiny autoencoder from scratch."""
    from vaeft.train.engine import prepare_base

    p = _load(params)
    prepare_base(p, _require(data, "data directory"), out, log, state_dir)


@app.command()
def train(
    phase: Annotated[str, typer.Argument(help="training phase: ema or mse (pretrain: see `vaeft pretrain`)")],
    init: Annotated[Path, typer.Option(help="model to start from (diffusers folder)")],
    params: ParamsOpt = DEFAULT_PARAMS_FILE,
    data: Annotated[Path, typer.Option(help="curated data directory")] = Path("data/curated"),
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="output diffusers folder [models/ft-PHASE]")] = None,
    log: Annotated[Optional[Path], typer.Option(help="training log CSV (DVC plot)")] = None,
    state_dir: Annotated[Path, typer.Option(help="resumable training state (outside DVC outputs)")] = Path(".vaeft/state"),
) -> None:
    """Decoder-only fine-tune (encoder frozen), exporting EMA weights. Re-running resumes."""
    from vaeft.train.engine import train_phase

    if phase not in ("ema", "mse"):
        raise UsageError(f"unknown phase {phase!r}: expected 'ema' or 'mse'")
    p = _load(params)
    train_phase(phase, p, _require(data, "data directory"), out or Path(f"models/ft-{phase}"),
                _require(init, "init model"), log, state_dir)


@app.command()
def evaluate(
    model: Annotated[list[str], typer.Option("--model", "-m", help="NAME=PATH of a model to evaluate (repeatable)")],
    params: ParamsOpt = DEFAULT_PARAMS_FILE,
    data: Annotated[Path, typer.Option(help="curated data directory (its eval split is used)")] = Path("data/curated"),
    metrics: Annotated[Path, typer.Option(help="metrics JSON (DVC metrics)")] = Path("metrics/eval.json"),
    report: Annotated[Path, typer.Option(help="report directory (table, per-image CSV, grid)")] = Path("reports/eval"),
) -> None:
    """Reconstruct the eval set with each model; write metrics, a table and a comparison grid."""
    from vaeft.evaluate.report import evaluate_models

    models = {k: _require(v, f"model {k!r}") for k, v in _named_paths(model, "--model").items()}
    steps = {}
    p = _load(params)
    for name in models:
        phase = {"ft-ema": "ema", "ft-mse": "mse"}.get(name)
        steps[name] = getattr(p.train, phase).steps if phase else None
    evaluate_models(p.evaluate, _require(data, "data directory"), models, metrics, report, steps)


@app.command()
def export(
    model: Annotated[list[str], typer.Option("--model", "-m", help="NAME=PATH of a model to export (repeatable)")],
    params: ParamsOpt = DEFAULT_PARAMS_FILE,
    out: Annotated[Path, typer.Option("--out", "-o", help="export directory")] = Path("export"),
    eval_table: Annotated[Optional[Path], typer.Option(help="markdown eval table to put in the model cards")] = None,
) -> None:
    """Write each model as a diffusers folder with a model card, plus SHA256SUMS."""
    from vaeft.export.release import export_models

    models = {k: _require(v, f"model {k!r}") for k, v in _named_paths(model, "--model").items()}
    export_models(_load(params).export, models, out, eval_table)


@app.command()
def publish(
    export_dir: Annotated[Path, typer.Option("--export", help="export directory")] = Path("export"),
    to: Annotated[Optional[Path], typer.Option("--to", help="target directory [params publish.target]")] = None,
    params: ParamsOpt = DEFAULT_PARAMS_FILE,
) -> None:
    """Publish an export to a local directory (content-addressed, idempotent)."""
    from vaeft.publish.local import publish_local

    target = to if to is not None else Path(_load(params).publish.target)
    result = publish_local(_require(export_dir, "export directory"), target)
    typer.echo(str(result.path))


def main(argv: list[str] | None = None) -> None:
    from vaeft.data.images import ImageRejected
    from vaeft.model.io import ModelLoadError

    try:
        app(args=argv, standalone_mode=False)
    except (ParamsError, UsageError, ModelLoadError, FileNotFoundError, ImageRejected) as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.secho("aborted", fg="red", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
