"""``vaeft convert`` and ``vaeft check-fp16``: model files between layouts, and fp16 safety."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from vaeft.cli.common import ForceOpt, UsageError, app, require

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
    data: Annotated[Path | None, typer.Option(
        help="curated data directory (or image folder): decode the latents of its eval images instead of random ones")] = None,
    size: Annotated[int, typer.Option(min=8, max=1024, help="image side in pixels (latents are size / 8)")] = 256,
    images: Annotated[int, typer.Option("--images", "--batch-size", min=1, help="how many latents (eval images or random)")] = 2,
    seed: Annotated[int, typer.Option(help="seed of the random latents")] = 0,
    min_headroom: Annotated[float, typer.Option(
        min=1.0, help="also fail when a block keeps less than this factor to fp16's max (1: only overflow fails)")] = 1.0,
    emulate: Annotated[bool | None, typer.Option(
        "--emulate/--native", help="fp16 rounding on fp32 kernels, or real fp16 kernels [emulate on CPU, native on GPU; "
        "torch's CPU fp16 convolutions are 42-114x slower]")] = None,
    norm_num_groups: GroupsOpt = None,
) -> None:
    """Decode latents in float16; print each block's largest activation and its share of fp16's max
    (65504); exit 1 if anything overflows (or keeps less than --min-headroom)."""
    from rich.table import Table

    from vaeft.console import console
    from vaeft.model.fp16 import FP16_MAX, check_fp16, random_latents
    from vaeft.model.io import load_autoencoder

    vae = load_autoencoder(require(model, "model"), norm_num_groups=norm_num_groups)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if size % factor:
        raise UsageError(f"--size {size} is not a multiple of the model's downsampling factor {factor}")
    if data is not None:
        from vaeft.device import pick_device
        from vaeft.train.fp16 import eval_latents

        latents = eval_latents(vae, require(data, "data directory"), size, images, pick_device())
        what = f"eval images of {data}"
    else:
        latents, what = random_latents(vae, images, size // factor, seed), "random latents"
    report = check_fp16(vae, latents=latents, emulate=emulate)
    mode = "fp16 emulated on fp32 kernels" if report.emulated else "fp16"
    table = Table(title=f"{mode} decode of {model} on {report.device}: {what}, latents {report.batch_shape} "
                        f"({size}x{size} images)")
    for col, kw in (("block", {}), ("max |activation|", {"justify": "right"}),
                    (f"peak / {FP16_MAX:.0f}", {"justify": "right"}),
                    ("headroom", {"justify": "right"}), ("status", {})):
        table.add_column(col, **kw)
    for b in report.blocks:
        if b.nonfinite:
            status = "[red]OVERFLOW (inf/NaN)[/]"
        elif b.headroom < min_headroom:
            status = f"[yellow]headroom < {min_headroom:g}x[/]"
        else:
            status = "ok"
        fill = "inf" if b.nonfinite else f"{b.fill:.2%}"
        table.add_row(b.name, f"{b.max_abs:.4g}", fill, f"{b.headroom:.3g}x", status)
    console.print(table)
    if report.overflow:
        console.print(f"[red]fp16 overflow: first at {report.first_overflow}[/]")
        raise typer.Exit(1)
    if unsafe := report.unsafe(min_headroom):
        console.print(f"[red]less than {min_headroom:g}x headroom to fp16's max in {', '.join(unsafe)}[/]")
        raise typer.Exit(1)
    console.print("[green]no fp16 overflow[/]")
