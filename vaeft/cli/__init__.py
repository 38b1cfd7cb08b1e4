"""The ``vaeft`` command line. Each command validates params once, then calls one library stage.

Errors users can fix (bad params, missing inputs) end in one red line and exit code 2.
Commands live in one module per area; importing a module registers its commands on ``app``.
"""

from __future__ import annotations

import contextlib
import os
import sys

import click
import typer

from vaeft import atomic
from vaeft.cli import augment as _augment  # noqa: F401  (registers commands)
from vaeft.cli import common
from vaeft.cli import evaluate as _evaluate  # noqa: F401  (after stages: help order)
from vaeft.cli import model as _model  # noqa: F401
from vaeft.cli import params as _params  # noqa: F401
from vaeft.cli import pipeline as _pipeline  # noqa: F401
from vaeft.cli import reproduce as _reproduce  # noqa: F401
from vaeft.cli import stages as _stages  # noqa: F401
from vaeft.cli import weights as _weights  # noqa: F401
from vaeft.cli.common import app
from vaeft.errors import STATUS_FILE_ENV, USER_ERROR_EXIT, VaeftError

__all__ = ["STATUS_FILE_ENV", "USER_ERROR_EXIT", "app", "main"]




def _record_status(code: int, err: BaseException | None, detail: dict | None = None) -> None:
    """Leave the exit status where an orchestrator can read it.

    ``dvc repro`` reports any failing command as its own exit 1, so the status of our command is
    lost on the way; the retrain flow reads this file to tell user errors (exit 2, never retried)
    from infrastructure failures (retried). A torchrun worker started by a relaunching vaeft
    writes its own file instead, and the launcher folds them into this one
    (:mod:`vaeft.train.launch`); ``detail`` is that folded status.
    """
    from vaeft.train.launch import rank_status_file

    target = rank_status_file(os.environ) or os.environ.get(STATUS_FILE_ENV)
    if not target:
        return
    kind = "user" if code == USER_ERROR_EXIT else ("ok" if code == 0 else "failure")
    status = {"exit_code": code, "kind": kind, "error": type(err).__name__ if err else None}
    if kind == "user" and err is not None:
        status["message"] = str(err)  # the orchestrator's one line names the cause
    with contextlib.suppress(OSError):
        atomic.write_json(target, {**status, **(detail or {}), "exit_code": code, "kind": kind})


def main(argv: list[str] | None = None) -> None:
    try:
        _main(argv)
    except common.ChildExit as exc:
        _record_status(exc.code, None, exc.status)
        raise
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        _record_status(code, exc.__context__)
        raise
    except BaseException as err:
        _record_status(1, err)
        raise
    _record_status(0, None)


def _main(argv: list[str] | None) -> None:
    # Kept for commands that rerun themselves under torchrun with the same arguments.
    common.invocation_argv[:] = sys.argv[1:] if argv is None else argv
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

