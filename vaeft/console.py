"""Console output shared by every stage: stage banners and progress bars (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# soft_wrap: a message is never cut into lines at the console width (80 columns off a terminal),
# so paths and one-line errors stay whole in logs and in what tests read.
console = Console(stderr=True, highlight=False, soft_wrap=True)


def banner(stage: str, detail: str = "") -> None:
    console.rule(f"[bold cyan]vaeft {stage}[/]" + (f" [dim]{detail}[/]" if detail else ""))


def progress() -> Progress:
    """A progress bar that also renders sensibly when stderr is not a terminal (CI, DVC logs)."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
