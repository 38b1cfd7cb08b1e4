"""``vaeft metrics`` (folder vs folder) and ``vaeft data`` (eval sets: COCO val, prepare)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vaeft.cli.common import ForceOpt, UsageError, app, require

data_app = typer.Typer(help="Datasets: pin a remote curated dataset for DVC, point the stages at it; "
                       "evaluation sets (COCO 2017 val, a prepared 256x256 set).", no_args_is_help=True)
app.add_typer(data_app, name="data")


@app.command()
def metrics(
    ref: Annotated[Path, typer.Option("--ref", help="folder of reference (original) images")],
    test: Annotated[Path, typer.Option("--test", help="folder of same-named test (reconstructed) images")],
    out: Annotated[Path, typer.Option("--out", "-o", help="metrics JSON to write")],
    lpips: Annotated[list[str] | None, typer.Option("--lpips", help="LPIPS net: vgg, alex (repeatable) [both]")] = None,
    no_fid: Annotated[bool, typer.Option("--no-fid", help="skip rFID")] = False,
    no_psim: Annotated[bool, typer.Option("--no-psim", help="skip the PSIM candidate")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="images per batch")] = 8,
    require_weights: Annotated[bool, typer.Option(help="fail when a metric's weights are missing")] = False,
    force: ForceOpt = False,
) -> None:
    """All image-pair metrics between two folders of same-named images (no model needed)."""
    from vaeft.evaluate.pairs import run_folder_metrics
    from vaeft.evaluate.suite import MetricOptions
    from vaeft.metrics.perceptual import LPIPS_NETS

    nets = tuple(lpips) if lpips else tuple(LPIPS_NETS)
    bad = [n for n in nets if n not in LPIPS_NETS]
    if bad:
        raise UsageError(f"--lpips: unknown net {bad[0]!r} (expected one of {', '.join(LPIPS_NETS)})")
    options = MetricOptions(lpips_nets=nets, psim=not no_psim, fid=not no_fid, require_weights=require_weights)
    run_folder_metrics(require(ref, "--ref folder"), require(test, "--test folder"), out, options, batch_size,
                       force=force)
    typer.echo(str(out))


@data_app.command("coco-val")
def coco_val(
    out: Annotated[Path, typer.Option("--out", "-o", help="download directory")] = Path("data/coco"),
    url: Annotated[str, typer.Option(help="archive URL (a mirror); checksums still apply")] = "",
    md5: Annotated[str | None, typer.Option(help="expected MD5 [the published val2017.zip MD5]")] = None,
    force: ForceOpt = False,
) -> None:
    """Download COCO 2017 val (val2017.zip, 5000 images), verify its checksum, extract it."""
    from vaeft.evaluate.download import COCO_VAL_MD5, COCO_VAL_SIZE, COCO_VAL_URL, download_coco_val

    custom = bool(url) and url != COCO_VAL_URL
    result = download_coco_val(out, url or COCO_VAL_URL, md5 or COCO_VAL_MD5,
                               # A mirror may serve the same bytes; only the pinned MD5 decides.
                               size=None if custom else COCO_VAL_SIZE, force=force)
    typer.echo(f"{result.images_dir} ({result.n_images} images, md5 {result.md5}, sha256 {result.sha256})")


@data_app.command("prepare")
def prepare(
    src: Annotated[Path, typer.Argument(help="folder of source images")],
    out: Annotated[Path, typer.Argument(help="output folder (PNG + evalset.json)")],
    size: Annotated[int, typer.Option(min=8, help="output side length")] = 256,
    force: ForceOpt = False,
) -> None:
    """Shorter-side Lanczos resize + centre crop to SIZE x SIZE; protocol in evalset.json."""
    from vaeft.data.evalset import prepare_eval_set

    result = prepare_eval_set(require(src, "source folder"), out, size, force=force)
    typer.echo(f"{result.out_dir} ({result.n_images} images)")


@data_app.command("pin")
def pin(
    url: Annotated[str, typer.Argument(help="the curated dataset's URL (s3://bucket/prefix), uploaded whole")],
    out: Annotated[Path, typer.Option("--out", "-o", help="pin file to write (track it in git)")] = Path("data/remote.json"),
    local: Annotated[Path | None, typer.Option(help="the local copy that was uploaded: hash its shards instead of "
                                                     "downloading them")] = None,
    force: ForceOpt = False,
) -> None:
    """Record a remote dataset's identity (manifest and shard sha256) in a small file DVC can track."""
    from vaeft.data.pin import pin_dataset

    result = pin_dataset(url, out, local=local and require(local, "--local folder"), force=force)
    typer.echo(f"{out}: {result.url} (manifest sha256 {result.manifest_sha256[:12]}, {len(result.shards)} shards)")


@data_app.command("use")
def use(
    data: Annotated[str, typer.Argument(help="a pin file (vaeft data pin), or data/curated for the local dataset")],
    repo: Annotated[Path, typer.Option("--repo", help="the repository root (holds dvc.yaml)")] = Path("."),
) -> None:
    """Point dvc.yaml's training and evaluate stages at a pinned remote dataset, or back at data/curated."""
    from vaeft.cli.deps import use_data

    changed = use_data(repo, data)
    typer.echo(f"dvc.yaml: {', '.join(changed)} now read {data}" if changed else f"dvc.yaml: already reads {data}")
