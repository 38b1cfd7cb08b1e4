"""The pipeline stages as commands; each validates params once and calls one library function."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from vaeft.cli.common import (
    DEFAULT_PARAMS_FILE,
    ForceOpt,
    ParamsOpt,
    app,
    load,
    named_paths,
    relaunch_if_asked,
    require,
    require_data,
)
from vaeft.config import Params

FreshOpt = Annotated[bool, typer.Option(
    "--fresh", help="move this output's saved training state aside (kept, renamed *.old-TIME) and start from step 0")]


@app.command()
def curate(
    params: ParamsOpt = DEFAULT_PARAMS_FILE,
    out: Annotated[Path, typer.Option("--out", "-o", help="curated data directory")] = Path("data/curated"),
    source: Annotated[
        list[str] | None,
        typer.Option("--source", "-s", help="image folder, .tar shard, img2dataset output folder, table (.parquet/.csv/.jsonl) or s3://bucket/prefix; "
                     "replaces the params' sources (repeatable, mixed 1:1)"),
    ] = None,
    force: ForceOpt = False,
    engine: Annotated[
        str | None,
        typer.Option("--engine", envvar="VAEFT_CURATE_ENGINE",
                     help="where work shards run: local (process pool) or dask; default: data.engine"),
    ] = None,
    dask_address: Annotated[
        str | None,
        typer.Option("--dask-address", envvar="VAEFT_DASK_ADDRESS",
                     help="Dask scheduler (tcp://HOST:8786); implies --engine dask; none: a local cluster"),
    ] = None,
) -> None:
    """Validate, normalise, de-duplicate, mix and split images into a curated store with a manifest.

    The engine and address only change where the work runs, never the output, so the retrain flow
    passes them through the environment rather than params.yaml (DVC keeps the stage up to date).
    """
    from vaeft.config import SourceParams
    from vaeft.data.curate import curate as run

    # Outside a vaeft checkout (no params.yaml) plain folders curate with the default thresholds.
    data = (load(params) if params.exists() or params != DEFAULT_PARAMS_FILE else Params()).data
    if source:
        sources = []
        for i, s in enumerate(source):
            kind = _source_kind(s)
            path = s if kind == "s3" else str(require(Path(s), "source"))
            sources.append(SourceParams(name=re.sub(r"[^A-Za-z0-9_.-]", "_", f"src{i}_{Path(s).stem or 'root'}"), kind=kind, path=path))
        data = data.model_copy(update={"sources": sources})
    else:
        _warn_unwatched_sources(params)
    if engine not in (None, "", "local", "dask"):
        raise typer.BadParameter(f"{engine!r}: expected local or dask", param_hint="--engine")
    if dask_address:
        data = data.model_copy(update={"engine": "dask", "dask_address": dask_address})
    elif engine:
        data = data.model_copy(update={"engine": engine, "dask_address": data.dask_address if engine == "dask" else None})
    run(data, out, force=force)


def _warn_unwatched_sources(params: Path) -> None:
    from vaeft.cli.deps import warn_missing_source_deps

    for line in warn_missing_source_deps(params):
        typer.secho(line, fg="yellow", err=True)


def _source_kind(given: str) -> str:
    if given.startswith("s3://"):
        return "s3"
    suffix = Path(given).suffix.lower()
    if suffix == ".tar":
        return "tar"
    # img2dataset's webdataset output: NNNNN.tar shards, each with its NNNNN.parquet beside it.
    if Path(given).is_dir() and any(t.with_suffix(".parquet").is_file() for t in Path(given).glob("*.tar")):
        return "img2dataset"
    return "table" if suffix in (".parquet", ".csv", ".tsv", ".jsonl", ".ndjson") else "folder"


@app.command()
def pretrain(
    params: ParamsOpt = DEFAULT_PARAMS_FILE,
    data: Annotated[str, typer.Option(help="curated data directory, its URL (s3://bucket/prefix; shards are "
                                             "fetched into $VAEFT_SHARD_CACHE) or a pin file (vaeft data pin)")] = "data/curated",
    out: Annotated[Path, typer.Option("--out", "-o", help="output diffusers folder")] = Path("models/base"),
    log: Annotated[Path | None, typer.Option(help="training log CSV (DVC plot); its loss curve is drawn beside it as .png")] = None,
    state_dir: Annotated[Path, typer.Option(help="resumable training state (outside DVC outputs)")] = Path(".vaeft/state"),
    crops: Annotated[Path | None, typer.Option(help="the augment stage's output (materialised crops or pixel store)")] = None,
    force: ForceOpt = False,
    fresh: FreshOpt = False,
) -> None:
    """The base model: import model.base if set, else pretrain the tiny autoencoder from scratch.

    Set VAEFT_NPROC_PER_NODE (and for several nodes VAEFT_NNODES, VAEFT_NODE_RANK,
    VAEFT_RDZV_ENDPOINT) to run under torchrun.
    """
    from vaeft.train.engine import check_outputs, prepare_base

    p = load(params)
    data = require_data(data)
    check_outputs(out, log, [data, p.model.base, crops], force)  # before any training, once
    if p.model.base is None:  # importing a base is one process's work
        relaunch_if_asked()
    prepare_base(p, data, out, log, state_dir, crops_dir=crops, force=force, fresh=fresh)


class FinetunePhase(str, Enum):
    ema = "ema"
    mse = "mse"
    fp16 = "fp16"


@app.command()
def train(
    phase: Annotated[FinetunePhase, typer.Argument(help="fine-tune phase (the base model: `vaeft pretrain`)")],
    init: Annotated[Path, typer.Option(help="model to start from (diffusers folder or LDM file)")],
    params: ParamsOpt = DEFAULT_PARAMS_FILE,
    data: Annotated[str, typer.Option(help="curated data directory, its URL (s3://bucket/prefix; shards are "
                                             "fetched into $VAEFT_SHARD_CACHE) or a pin file (vaeft data pin)")] = "data/curated",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output diffusers folder [models/ft-PHASE]")] = None,
    log: Annotated[Path | None, typer.Option(help="training log CSV (DVC plot); its loss curve is drawn beside it as .png")] = None,
    state_dir: Annotated[Path, typer.Option(help="resumable training state (outside DVC outputs)")] = Path(".vaeft/state"),
    crops: Annotated[Path | None, typer.Option(help="the augment stage's output (materialised crops or pixel store); online crops if empty")] = None,
    force: ForceOpt = False,
    fresh: FreshOpt = False,
) -> None:
    """Decoder-only fine-tune (encoder frozen), exporting EMA weights. Re-running resumes.

    fp16: make the decoder fp16-safe (exact rescaling, then a short fine-tune against the frozen
    original until every block's peak is below train.fp16.target); one process, no resume.

    Set VAEFT_NPROC_PER_NODE (and for several nodes VAEFT_NNODES, VAEFT_NODE_RANK,
    VAEFT_RDZV_ENDPOINT) to run under torchrun.
    """
    from vaeft.train.engine import check_outputs, train_phase

    phase = phase.value
    p = load(params)
    data = require_data(data)
    require(init, "init model")
    out = out or Path(f"models/ft-{phase}")
    check_outputs(out, log, [data, init, crops], force)  # before any training, once
    if phase == "fp16":
        from vaeft.train.fp16 import train_fp16

        train_fp16(p, data, out, init, log, crops_dir=crops, force=force)
        return
    relaunch_if_asked()
    train_phase(phase, p, data, out, init, log, state_dir, crops_dir=crops, force=force, fresh=fresh)


@app.command()
def evaluate(
    model: Annotated[list[str], typer.Option("--model", "-m", help="NAME=PATH of a model to evaluate (repeatable)")],
    params: ParamsOpt = DEFAULT_PARAMS_FILE,
    data: Annotated[str, typer.Option(help="curated data directory, its URL (s3://bucket/prefix) or a pin file "
                                             "(vaeft data pin); its eval split is used")] = "data/curated",
    metrics: Annotated[Path, typer.Option(help="metrics JSON (DVC metrics)")] = Path("metrics/eval.json"),
    report: Annotated[Path, typer.Option(help="report directory (table, per-image CSV, grid)")] = Path("reports/eval"),
    force: ForceOpt = False,
) -> None:
    """Reconstruct the eval set with each model; write metrics, a table and a comparison grid."""
    from vaeft.evaluate.report import evaluate_models
    from vaeft.provenance import recorded_steps

    models = {k: require(v, f"model {k!r}") for k, v in named_paths(model, "--model").items()}
    # The models' own run_info says how long they trained; params would only know our phase names.
    steps = {name: recorded_steps(path) for name, path in models.items()}
    evaluate_models(load(params).evaluate, require_data(data), models, metrics, report, steps,
                    force=force)


@app.command()
def export(
    model: Annotated[list[str], typer.Option("--model", "-m", help="NAME=PATH of a model to export (repeatable)")],
    params: ParamsOpt = DEFAULT_PARAMS_FILE,
    out: Annotated[Path, typer.Option("--out", "-o", help="export directory")] = Path("export"),
    eval_table: Annotated[Path | None, typer.Option(help="markdown eval table to put in the model cards")] = None,
    data: Annotated[Path | None, typer.Option(help="curated data the models were trained on (for the model cards)")] = None,
    force: ForceOpt = False,
) -> None:
    """Write each model as a diffusers folder with a model card, plus SHA256SUMS."""
    from vaeft.export.release import export_models

    models = {k: require(v, f"model {k!r}") for k, v in named_paths(model, "--model").items()}
    export_models(load(params).export, models, out, eval_table, data_dir=data and require(data, "--data folder"),
                  force=force)


@app.command()
def publish(
    export_dir: Annotated[Path, typer.Option("--export", help="export directory")] = Path("export"),
    to: Annotated[Path | None, typer.Option("--to", help="target directory [params publish.target]")] = None,
    params: ParamsOpt = DEFAULT_PARAMS_FILE,
) -> None:
    """Publish an export to a local directory (content-addressed, idempotent), with a receipt
    (commit, params, output digests, metrics, environment) in <target>/<version>/receipts/."""
    from vaeft.publish.local import publish_local, release_version
    from vaeft.publish.receipt import build_receipt, write_receipt

    target = to if to is not None else Path(load(params).publish.target)
    require(export_dir, "export directory")
    # The project is where the params file is: its git commit, dvc.lock and metrics go in the receipt.
    receipt = build_receipt(params.resolve().parent, export_dir,
                            {"local": str(target / release_version(export_dir))})
    result = publish_local(export_dir, target)
    typer.echo(f"{result.path} (receipt {write_receipt(receipt, result.path)})")
