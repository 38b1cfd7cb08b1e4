"""``vaeft weights pull | list | add``: the offline-first weight store (see ``vaeft.weights``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vaeft.cli.common import app

weights_app = typer.Typer(help="The weight store: fetch, list and add pretrained weights.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")


@weights_app.command("pull")
def weights_pull(
    names: Annotated[list[str] | None, typer.Argument(help="entries to fetch [all]")] = None,
    retries: Annotated[int, typer.Option(help="retries per file (resuming where it stopped)")] = 5,
    backoff: Annotated[float, typer.Option(help="first retry delay in seconds (doubles each time)")] = 1.0,
) -> None:
    """Download weights into the store (resumable, retried, sha256-verified)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from vaeft.console import console
    from vaeft.weights import weights_dir
    from vaeft.weights.store import pull

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=console) as bar:
        def factory(label: str):
            task = bar.add_task(label, total=None)
            return lambda done, total: bar.update(task, completed=done, total=total)

        results = pull(names or None, progress_factory=factory, retries=retries, backoff=backoff)
    for r in results:
        typer.echo(f"{r.name}: {len(r.downloaded)} downloaded, {len(r.skipped)} already verified")
    typer.echo(f"store: {weights_dir()}")


@weights_app.command("list")
def weights_list(
    check: Annotated[bool, typer.Option("--check", help="re-hash present files instead of trusting the record")] = False,
) -> None:
    """Show each entry: present or missing, and verified against its pinned sha256 or not."""
    from rich.table import Table

    from vaeft.console import console
    from vaeft.weights import weights_dir
    from vaeft.weights.store import list_weights

    table = Table(title=f"weight store {weights_dir()}")
    for col in ("name", "file", "present", "verified", "pin"):
        table.add_column(col)
    for entry in list_weights(rehash=check):
        for f in entry.files:
            verified = {True: "[green]yes[/]", False: "[red]NO[/]", None: "-"}[f.verified]
            present = "[green]yes[/]" if f.present else "[yellow]missing[/]"
            table.add_row(entry.name, f.path, present, verified if f.present else "-", f.pinned)
    console.print(table)


@weights_app.command("add")
def weights_add(
    name: Annotated[str, typer.Argument(help="registry name, or a new name to register")],
    path: Annotated[Path, typer.Argument(help="the file (or, for a set of files, the folder) you brought")],
    description: Annotated[str, typer.Option(help="description of a newly registered entry")] = "",
) -> None:
    """Copy weights you brought into the store (pinned hashes are checked)."""
    from vaeft.weights import weight_path
    from vaeft.weights.store import add

    spec = add(name, path, description)
    typer.echo(f"{spec.name}: {weight_path(spec.name)}")
