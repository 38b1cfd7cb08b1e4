"""The ``vaeft`` command line. Each command validates params once, then calls one library stage.

Errors users can fix (bad params, missing inputs) end in one red line and exit code 2.
Commands live in one module per area; importing a module registers its commands on ``app``.
"""

from __future__ import annotations

import sys

import click
import typer

from vaeft.cli import augment as _augment  # noqa: F401  (registers commands)
from vaeft.cli import model as _model  # noqa: F401
from vaeft.cli import params as _params  # noqa: F401
from vaeft.cli import stages as _stages  # noqa: F401
from vaeft.cli import evaluate as _evaluate  # noqa: F401, I001  (after stages: help order)
from vaeft.cli import weights as _weights  # noqa: F401
from vaeft.cli.common import app
from vaeft.errors import VaeftError

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> None:
    try:
        # With standalone_mode=False click returns typer.Exit's code instead of raising it.
        rc = app(args=argv, standalone_mode=False)
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except (VaeftError, FileNotFoundError) as err:
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

