"""``vaeft augment``: look at the training crops."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vaeft.cli.common import DEFAULT_PARAMS_FILE, ForceOpt, ParamsOpt, app, load, require

augment_app = typer.Typer(help="Training-crop augmentation tools.", no_args_is_help=True)
app.add_typer(augment_app, name="augment")


@augment_app.command("materialize")
def materialize(
    params: ParamsOpt = DEFAULT_PARAMS_FILE,
    data: Annotated[Path, typer.Option(help="curated data directory")] = Path("data/curated"),
    out: Annotated[Path, typer.Option("--out", "-o", help="crop store directory")] = Path("data/crops"),
    workers: Annotated[int, typer.Option(min=0, help="processes (0: one per core)")] = 0,
    force: ForceOpt = False,
) -> None:
    """Render augment.materialize crops per training image into shards (the `augment` stage)."""
    from vaeft.data.materialize import materialize_crops

    p = load(params)
    materialize_crops(require(data, "data directory"), p.augment, p.seed, out, workers=workers or None,
                      force=force)


@augment_app.command("preview")
def preview(
    params: ParamsOpt = DEFAULT_PARAMS_FILE,
    data: Annotated[Path, typer.Option(help="curated data directory")] = Path("data/curated"),
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write")] = Path("augment_preview.png"),
    n: Annotated[int, typer.Option("-n", min=1, max=1024, help="number of samples")] = 16,
    start: Annotated[int, typer.Option(min=0, help="first sample index of the run")] = 0,
    force: ForceOpt = False,
) -> None:
    """Write a PNG grid of N augmented training samples, exactly as training draws them."""
    from vaeft.data.preview import preview_grid

    p = load(params)
    result = preview_grid(require(data, "data directory"), p.augment, p.seed, out, n=n, start=start, force=force)
    typer.echo(f"wrote {result.path} ({result.n} samples of {p.augment.crop_size}x{p.augment.crop_size})")
