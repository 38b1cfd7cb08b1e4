"""Console output shared by every stage: stage banners and progress bars (rich)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# Off a terminal (DVC, CI, a log file) rich would wrap every line at 80 columns and cut banners,
# hiding output paths: lines are then written whole.
console = Console(stderr=True, highlight=False, soft_wrap=not sys.stderr.isatty())


def banner(stage: str, detail: str = "") -> None:
    title = f"[bold cyan]vaeft {stage}[/]" + (f" [dim]{detail}[/]" if detail else "")
    if console.is_terminal:
        console.rule(title)
    else:
        console.print(f"── {title} ──")


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
