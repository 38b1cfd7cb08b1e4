"""``vaeft params`` and ``vaeft recipe``: inspect params files and apply recipe presets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vaeft import atomic
from vaeft.cli.common import DEFAULT_PARAMS_FILE, ForceOpt, ParamsOpt, UsageError, app, load
from vaeft.config import params_as_dict

params_app = typer.Typer(help="Inspect and validate params files.", no_args_is_help=True)
recipe_app = typer.Typer(help="Recipe presets (real-run params files).", no_args_is_help=True)
app.add_typer(params_app, name="params")
app.add_typer(recipe_app, name="recipe")

# Package data (pyproject), so that `vaeft recipe list` works from a wheel install too.
RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"



@params_app.command("check")
def params_check(params: ParamsOpt = DEFAULT_PARAMS_FILE) -> None:
    """Validate a params file; prints 'ok' or the first problem (key and value)."""
    from vaeft.cli.deps import warn_missing_source_deps

    load(params)
    for line in warn_missing_source_deps(params):
        typer.secho(line, fg="yellow", err=True)
    typer.echo(f"{params}: ok")


@params_app.command("show")
def params_show(params: ParamsOpt = DEFAULT_PARAMS_FILE) -> None:
    """Print the resolved params (defaults filled in) as YAML."""
    import yaml

    typer.echo(yaml.safe_dump(params_as_dict(load(params)), sort_keys=False), nl=False)


def _recipe_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))} if RECIPES_DIR.is_dir() else {}


@recipe_app.command("list")
def recipe_list() -> None:
    """List the recipe presets."""
    for name, path in _recipe_files().items():
        first = next((ln.lstrip("# ").strip() for ln in path.read_text().splitlines() if ln.startswith("#")), "")
        typer.echo(f"{name:<16} {first}")


@recipe_app.command("apply")
def recipe_apply(
    name: Annotated[str, typer.Argument(help="recipe name (see `vaeft recipe list`)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="params file to write")] = DEFAULT_PARAMS_FILE,
    force: ForceOpt = False,
) -> None:
    """Validate a recipe preset and write it as the params file for a real run (replaces a YAML file there)."""
    recipes = _recipe_files()
    if name not in recipes:
        raise UsageError(f"unknown recipe {name!r} (available: {', '.join(recipes) or 'none'})")
    atomic.check_file_target(out, (".yaml", ".yml"), force=force)
    load(recipes[name])
    data = recipes[name].read_bytes()
    kept = ""
    if out.is_file() and out.read_bytes() != data:
        # A params file is often edited by hand: keep it, under a name no earlier backup has.
        backup = out.with_name(out.name + ".bak")
        n = 1
        while backup.exists():
            backup, n = out.with_name(f"{out.name}.bak.{n}"), n + 1
        atomic.write_bytes(backup, out.read_bytes())
        kept = f" (the previous one kept as {backup})"
    atomic.write_bytes(out, data)
    typer.echo(f"wrote {out} from recipe {name}{kept}; run `dvc repro` to train it")


@params_app.command("reference")
def params_reference_cmd(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="markdown file to write (default: print)")] = None,
) -> None:
    """The params reference (every key: type, default, meaning), generated from the typed schema."""
    from vaeft.cli.reference import params_reference

    text = params_reference()
    if out is None:
        typer.echo(text, nl=False)
        return
    atomic.check_file_target(out, (".md",))
    atomic.write_text(out, text)
    typer.echo(f"wrote {out}")
