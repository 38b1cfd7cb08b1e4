"""``vaeft reproduce RECEIPT``: rebuild a published release and report whether it is identical."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vaeft.cli.common import app


@app.command()
def reproduce(
    receipt: Annotated[str, typer.Argument(help="the release's receipt: <target>/<version>/receipts/<id>.json or s3://BUCKET/KEY")],
    workdir: Annotated[Path | None, typer.Option(help="new or empty directory for the clone and the rebuild "
                                                    "(default: a new vaeft-reproduce-* in the temp dir, kept)")] = None,
    repo: Annotated[str | None, typer.Option(help="git repository (path or URL) holding the receipt's commit "
                                                "(default: this checkout if it has the commit, else the receipt's origin)")] = None,
    remote: Annotated[str | None, typer.Option(help="DVC remote to pull the *.dvc-tracked inputs from "
                                                  "(default: the receipt's, else the repo's default)")] = None,
    report: Annotated[Path | None, typer.Option(help="JSON report path, markdown beside it as .md "
                                                   "(default: WORKDIR/reproduce_report.json)")] = None,
    deterministic: Annotated[bool, typer.Option("--deterministic", help="deterministic GPU kernels in every training "
                                                "phase (torch deterministic algorithms, cuBLAS workspace, no cuDNN autotuning)")] = False,
    psnr_tol: Annotated[float | None, typer.Option(help="|Δ mean PSNR| in dB that passes when bytes differ (default 0.05)")] = None,
    ssim_tol: Annotated[float | None, typer.Option(help="|Δ mean SSIM| that passes when bytes differ (default 0.002)")] = None,
    s3_endpoint_url: Annotated[str | None, typer.Option(help="endpoint of an S3-compatible store for an s3:// receipt")] = None,
) -> None:
    """Clone the receipt's commit into a fresh work dir, pull inputs, `dvc repro --force`, and compare
    every published file with the receipt's sha256 (tensors and eval metrics where they differ).

    Exit 0: identical; 3: bytes differ but the eval metrics are within tolerance; 4: differs;
    2: bad receipt, work dir or repository; 1: the rebuild itself failed.
    """
    from vaeft.reproduce import DEFAULT_TOLERANCES, RebuildFailed, ReproduceParams
    from vaeft.reproduce import reproduce as run

    tolerances = dict(DEFAULT_TOLERANCES)
    if psnr_tol is not None:
        tolerances["psnr"] = psnr_tol
    if ssim_tol is not None:
        tolerances["ssim"] = ssim_tol
    params = ReproduceParams(repo=repo, remote=remote, deterministic=deterministic, tolerances=tolerances,
                             s3_endpoint_url=s3_endpoint_url)
    try:
        result = run(receipt, workdir, params, report)
    except RebuildFailed as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(1) from None
    typer.echo(str(result.report_md))
    if result.exit_code:
        raise typer.Exit(result.exit_code)
