"""What every CLI module shares: the Typer app, option types and small argument helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vaeft.config import DEFAULT_PARAMS_FILE, Params, load_params
from vaeft.errors import VaeftError

__all__ = ["ChildExit", "DEFAULT_PARAMS_FILE", "ForceOpt", "ParamsOpt", "UsageError", "app", "load", "named_paths",
           "relaunch_if_asked", "require"]

app = typer.Typer(
    name="vaeft",
    help="Fine-tune Stable Diffusion kl-f8 VAE decoders: curate -> pretrain/import -> ft-EMA -> ft-MSE -> evaluate -> export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: rich markup would eat bracketed defaults ("[models/ft-PHASE]", "[both]")
    # and tag every flag "<bool>".
    rich_markup_mode=None,
)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file (YAML)")]
ForceOpt = Annotated[bool, typer.Option(
    "--force", help="replace an existing output that vaeft did not write (never one of the inputs)")]


class UsageError(VaeftError):
    """A user-fixable problem; printed as one line."""


def load(path: Path) -> Params:
    return load_params(path)


def named_paths(items: list[str], option: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"{option} expects NAME=PATH, got {item!r}")
        if name in out:
            raise UsageError(f"{option}: model name {name!r} given twice")
        out[name] = Path(path)
    return out


def require(path: Path, what: str) -> Path:
    if not path.exists():
        raise UsageError(f"{what} {path} does not exist")
    return path


def require_data(data: str) -> str | Path:
    """A curated dataset given as a directory, a URL (``s3://bucket/prefix``) or a pin file
    (``vaeft data pin``): its manifest must exist, and through a pin be the pinned one."""
    from vaeft.data.manifest import is_url, manifest_location
    from vaeft.data.pin import is_pin, load_pin, pinned_manifest_bytes

    if is_pin(data):
        try:
            pinned_manifest_bytes(load_pin(data))
        except (OSError, ImportError) as exc:
            raise UsageError(f"cannot reach the dataset pinned in {data}: {' '.join(str(exc).split())[:200]}") from None
        return Path(data)
    if not is_url(data):
        return require(Path(data), "data directory")
    import fsspec

    where = manifest_location(data)
    try:
        fs, path = fsspec.core.url_to_fs(where)
        found = fs.exists(path)
    except (OSError, ValueError, ImportError) as exc:
        raise UsageError(f"cannot reach the dataset {data}: {' '.join(str(exc).split())[:200]}") from None
    if not found:
        raise UsageError(f"no manifest at {where} (curate the dataset and upload it there first)")
    return data


# The arguments of the running command (set by ``vaeft.cli.main``).
invocation_argv: list[str] = []


class ChildExit(SystemExit):
    """The command's work ran in child processes; ``status`` is theirs (the worst rank's)."""

    def __init__(self, code: int, status: dict) -> None:
        super().__init__(code)
        self.status = status


def relaunch_if_asked() -> None:
    """Rerun this command under torchrun when the VAEFT_* launch variables ask for more processes.

    Called after the command validated its params and inputs, so a user error shows once, from
    this process, instead of once per rank.
    """
    from vaeft.train.launch import relaunch

    result = relaunch(invocation_argv)
    if result is not None:
        raise ChildExit(result.exit_code, result.status)
