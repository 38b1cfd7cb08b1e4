"""``vaeft convert`` and ``vaeft check-fp16``: model files between layouts, and fp16 safety."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from vaeft.cli.common import ForceOpt, app, require

EmaOpt = Annotated[bool, typer.Option("--ema", help="take a full training checkpoint's EMA weights (model_ema.*)")]
GroupsOpt = Annotated[
    int | None, typer.Option("--norm-num-groups", help="GroupNorm groups of an LDM file (shapes cannot tell) [32]")
]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="diffusers config.json (or its folder) for an LDM file")
]


class Layout(str, Enum):
    diffusers = "diffusers"
    ldm = "ldm"


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="diffusers folder, or LDM/SD .ckpt/.safetensors file")],
    dst: Annotated[Path, typer.Argument(help="a folder (--to diffusers) or a .safetensors/.ckpt file (--to ldm)")],
    to: Annotated[Layout, typer.Option("--to", help="target layout")],
    ema: EmaOpt = False,
    norm_num_groups: GroupsOpt = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
) -> None:
    """Convert a VAE between the diffusers and LDM (CompVis) layouts; writes atomically."""
    from vaeft.model.convert import convert_model

    out = convert_model(require(src, "model"), dst, to.value, ema=ema, norm_num_groups=norm_num_groups, config=config,
                        force=force)
    typer.echo(str(out))


@app.command("check-fp16")
def check_fp16_cmd(
    model: Annotated[Path, typer.Argument(help="model to check (any format `vaeft convert` reads)")],
    batch_size: Annotated[int, typer.Option(help="latents per batch")] = 2,
    latent_size: Annotated[int, typer.Option(help="latent height/width (image side / 8)")] = 32,
    seed: Annotated[int, typer.Option(help="seed of the random latents")] = 0,
    norm_num_groups: GroupsOpt = None,
) -> None:
    """Decode latents in float16; print each block's largest activation; exit 1 if anything overflows."""
    from rich.table import Table

    from vaeft.console import console
    from vaeft.model.fp16 import check_fp16
    from vaeft.model.io import load_autoencoder

    vae = load_autoencoder(require(model, "model"), norm_num_groups=norm_num_groups)
    report = check_fp16(vae, batch_size=batch_size, latent_size=latent_size, seed=seed)
    table = Table(title=f"fp16 decode of {model} on {report.device}, latents {report.batch_shape}")
    for col, kw in (("block", {}), ("max |activation|", {"justify": "right"}),
                    ("headroom to 65504", {"justify": "right"}), ("status", {})):
        table.add_column(col, **kw)
    for b in report.blocks:
        status = "[red]OVERFLOW (inf/NaN)[/]" if b.nonfinite else "ok"
        table.add_row(b.name, f"{b.max_abs:.4g}", f"{b.headroom:.3g}x", status)
    console.print(table)
    if report.overflow:
        console.print(f"[red]fp16 overflow: first at {report.first_overflow}[/]")
        raise typer.Exit(1)
    console.print("[green]no fp16 overflow[/]")
