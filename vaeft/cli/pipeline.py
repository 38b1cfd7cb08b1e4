"""``vaeft stage list | exec``: the stages of ``dvc.yaml`` without DVC.

``exec`` is for the other nodes of a multi-node job: node 0 runs ``dvc repro`` (the retrain flow)
and records the outputs; every other node runs the same stage command so its torchrun joins the
rendezvous, with no DVC bookkeeping of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from vaeft.cli.common import ChildExit, UsageError, app

stage_app = typer.Typer(help="The dvc.yaml stages without DVC: list them, run one's command.", no_args_is_help=True)
app.add_typer(stage_app, name="stage")

RepoOpt = Annotated[Path, typer.Option("--repo", help="the repository root (holds dvc.yaml)")]


def read_stages(repo: Path) -> dict[str, dict[str, Any]]:
    path = repo / "dvc.yaml"
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError:
        raise UsageError(f"no dvc.yaml in {repo}") from None
    except yaml.YAMLError as err:
        raise UsageError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    stages = spec.get("stages") if isinstance(spec, dict) else None
    if not isinstance(stages, dict):
        raise UsageError(f"{path}: no stages")
    return stages


def stage_commands(repo: Path, stage: str) -> tuple[list[str], Path]:
    """The stage's command lines (in order) and the directory they run in."""
    stages = read_stages(repo)
    if stage not in stages:
        raise UsageError(f"unknown stage {stage!r} (stages: {', '.join(stages)})")
    spec = stages[stage] or {}
    if "foreach" in spec or "matrix" in spec:
        raise UsageError(f"stage {stage!r} is a foreach/matrix stage: run it with `dvc repro {stage}`")
    cmd = spec.get("cmd")
    cmds = [cmd] if isinstance(cmd, str) else cmd
    if not cmds or not all(isinstance(c, str) and c.strip() for c in cmds):
        raise UsageError(f"stage {stage!r}: cmd must be a command line or a list of them, got {cmd!r}")
    for c in cmds:
        if "${" in c:
            # DVC interpolates params into these; running the raw text would be wrong, not close.
            raise UsageError(f"stage {stage!r} uses ${{...}} templating: run it with `dvc repro {stage}`")
    return cmds, repo / spec.get("wdir", ".")


def _env() -> dict[str, str]:
    # What dvc_env() gives `dvc repro`: this interpreter's bin dir first, so `python -m vaeft`
    # in the stage command is this checkout's vaeft.
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


@stage_app.command("list")
def stage_list(repo: RepoOpt = Path(".")) -> None:
    """The stages of dvc.yaml, in file order (the retrain flow's order)."""
    for name in read_stages(repo):
        typer.echo(name)


@stage_app.command("exec")
def stage_exec(
    stage: Annotated[str, typer.Argument(help="stage name in dvc.yaml")],
    repo: RepoOpt = Path("."),
    data: Annotated[str | None, typer.Option(help="dataset URL (s3://bucket/prefix) replacing the command's --data")] = None,
) -> None:
    """Run one stage's command in the repo root with no DVC bookkeeping (multi-node followers)."""
    from vaeft.errors import STATUS_FILE_ENV
    from vaeft.train.launch import exit_status

    cmds, cwd = stage_commands(repo, stage)
    if data is not None:
        cmds = [_with_data(cmd, data, stage) for cmd in cmds]
    env = _env()
    for cmd in cmds:
        typer.secho(f"stage {stage}: {cmd}", err=True, dim=True)
        code = exit_status(subprocess.run(cmd, shell=True, cwd=cwd, env=env, check=False).returncode)
        if code:
            # The command's own vaeft wrote the status file (if asked); keep its detail.
            raise ChildExit(code, _read_status(env.get(STATUS_FILE_ENV)))


def _with_data(cmd: str, data: str, stage: str) -> str:
    import shlex

    words = shlex.split(cmd)
    if "--data" not in words[:-1]:
        raise UsageError(f"stage {stage}'s command has no --data to replace: {cmd}")
    words[words.index("--data") + 1] = data
    return shlex.join(words)


def _read_status(path: str | None) -> dict:
    import json

    if not path:
        return {}
    try:
        status = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


@stage_app.command("deps")
def stage_deps_cmd(
    repo: RepoOpt = Path("."),
    check: Annotated[bool, typer.Option("--check", help="exit 1 when dvc.yaml's deps differ from the derived ones")] = False,
    write: Annotated[bool, typer.Option("--write", help="rewrite the stages' deps in dvc.yaml")] = False,
) -> None:
    """Each stage's code deps (what its command imports) and local data sources, from the source.

    Without options: print them. Data deps that are not code (data/curated, models/base) are kept.
    """
    from vaeft.cli.deps import FIX_COMMAND, check_problems, stage_deps, write_stage_deps

    if check and write:
        raise UsageError("--check and --write exclude each other")
    if write:
        changed = write_stage_deps(repo)
        typer.echo(f"dvc.yaml: deps of {', '.join(changed)} rewritten" if changed else "dvc.yaml: deps up to date")
        return
    deps = stage_deps(repo)
    if check:
        problems = check_problems(deps)
        for line in problems:
            typer.echo(line)
        if problems:
            typer.secho(f"dvc.yaml deps are out of date; fix: {FIX_COMMAND}", fg="red", err=True)
            raise typer.Exit(1)
        typer.echo("dvc.yaml: deps up to date")
        return
    for s in deps:
        typer.echo(f"{s.stage}:")
        for dep in s.wanted:
            typer.echo(f"  - {dep}")
