"""The code and source-data deps of each ``dvc.yaml`` stage, derived rather than hand-kept.

A stage's code deps are the project files its command can execute: starting from the module
``python -m PKG`` runs, every module imported (at module level or inside a function, and each
parent package's ``__init__``), transitively, with one exception: the bodies of the *other* CLI
commands, which this command never calls. That is the only thing taken from the live CLI: which
functions are commands, and which one the stage's argv selects. The rest is a static reading of
the source (``ast``), so moving a module around changes the result without anyone editing a
list. Files a module reads by its own sibling's name (``registry.yaml``) count as code too.

A stage that declares the ``data`` params reads ``data.sources``: each local source path (folder,
tar shard or glob, table) is a dep of it, so new images there make ``dvc repro`` run it again.
DVC's templating cannot express that: ``${...}`` in ``deps`` takes one value, and there is no way
to map a list of sources to their ``path`` fields (and skip the ones that have none).

Hand-kept deps (data folders, models) are left as they are; only entries under the package are
rewritten.
"""

from __future__ import annotations

import ast
import glob
import inspect
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from vaeft.errors import VaeftError

DVC_FILE = "dvc.yaml"
PARAMS_FILE = "params.yaml"
FIX_COMMAND = "vaeft stage deps --write"


class StageDepsError(VaeftError):
    pass


# ------------------------------------------------------------------------------ import graph


@dataclass(frozen=True)
class Entry:
    """What a stage runs: ``python -m <package>``, then one command function."""

    package: str
    command_module: str
    command_function: str


def _module_file(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_package(root: Path, module: str) -> bool:
    return (root.joinpath(*module.split(".")) / "__init__.py").is_file()


def _imports(tree: ast.Module, module: str, is_package: bool, skip: set[str]) -> Iterable[tuple[str, list[str]]]:
    """(module, imported names) of every import in ``tree``, outside the functions in ``skip``."""
    nodes: list[ast.AST] = [n for n in tree.body
                            if not (isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name in skip)]
    here = module if is_package else module.rpartition(".")[0]
    for top in nodes:
        for node in ast.walk(top):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield alias.name, []
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = here.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1])
                    name = f"{base}.{node.module}" if node.module else base
                else:
                    name = node.module or ""
                yield name, [a.name for a in node.names]


def _sibling_files(path: Path, tree: ast.Module) -> set[Path]:
    """Non-Python files next to ``path`` that its source names in a string literal."""
    names = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    return {p for p in path.parent.iterdir() if p.is_file() and p.suffix != ".py" and p.name in names}


def code_closure(root: str | Path, entry: Entry, commands: dict[str, set[str]]) -> list[str]:
    """Project files (posix, relative to ``root``) that running ``entry`` imports or reads.

    ``commands``: module -> names of the CLI command functions it defines; their bodies are
    skipped except ``entry``'s own.
    """
    root = Path(root)
    package = entry.package
    seen: set[str] = set()
    files: set[Path] = set()
    todo = [f"{package}.__main__" if _module_file(root, f"{package}.__main__") else package, entry.command_module]

    def add(module: str) -> None:
        parts = module.split(".")
        if parts[0] != package:
            return
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            name = ".".join(parts[:i])
            if name not in seen and _module_file(root, name) is not None:
                todo.append(name)

    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = _module_file(root, module)
        if path is None:
            continue
        add(module)
        files.add(path)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        files |= _sibling_files(path, tree)
        skip = set(commands.get(module, set()))
        if module == entry.command_module:
            skip.discard(entry.command_function)
        for name, members in _imports(tree, module, _is_package(root, module), skip):
            add(name)
            for member in members:  # `from pkg import mod` imports a module, not just a name
                if _module_file(root, f"{name}.{member}") is not None:
                    add(f"{name}.{member}")
    return sorted(p.relative_to(root).as_posix() for p in files)


# ------------------------------------------------------------------------------ the live CLI


def cli_commands() -> tuple[Any, dict[str, set[str]]]:
    """The click command tree of ``vaeft`` and, per module, its command functions' names."""
    import typer.main

    from vaeft.cli import app

    top = typer.main.get_command(app)
    commands: dict[str, set[str]] = {}

    def walk(cmd: Any) -> None:
        fn = inspect.unwrap(cmd.callback) if cmd.callback is not None else None
        sub = getattr(cmd, "commands", None)
        if fn is not None and not sub:
            commands.setdefault(fn.__module__, set()).add(fn.__name__)
        for child in (sub or {}).values():
            walk(child)

    walk(top)
    return top, commands


def stage_argv(cmd: str | list[str]) -> tuple[str, list[str]] | None:
    """(package, argv) of a ``python -m PKG ...`` or ``PKG ...`` stage command; None otherwise."""
    if isinstance(cmd, list):
        if len(cmd) != 1:
            return None
        cmd = cmd[0]
    try:
        words = shlex.split(cmd)
    except ValueError:
        return None
    if len(words) >= 3 and PurePosixPath(words[0]).name.startswith("python") and words[1] == "-m":
        return words[2], words[3:]
    if words and PurePosixPath(words[0]).name == "vaeft":
        return "vaeft", words[1:]
    return None


def resolve_entry(top: Any, package: str, argv: list[str]) -> Entry:
    cmd = top
    for word in argv:
        sub = getattr(cmd, "commands", None)
        if not sub or word not in sub:
            break
        cmd = sub[word]
    if getattr(cmd, "commands", None) or cmd.callback is None:
        raise StageDepsError(f"`{package} {' '.join(argv)}` names no command")
    fn = inspect.unwrap(cmd.callback)
    return Entry(package, fn.__module__, fn.__name__)


# ------------------------------------------------------------------------------ sources


def local_source_paths(params_file: str | Path) -> list[str]:
    """Paths of ``data.sources`` that are local (folders, tar shards or their glob's folder, tables)."""
    import yaml

    try:
        raw = yaml.safe_load(Path(params_file).read_text(encoding="utf-8")) or {}
    except OSError:
        return []
    sources = ((raw.get("data") or {}).get("sources") or []) if isinstance(raw, dict) else []
    out: list[str] = []
    for src in sources:
        if not isinstance(src, dict) or src.get("kind", "folder") in ("embedded", "s3"):
            continue
        path = str(src.get("path") or "")
        if not path or "://" in path:
            continue
        if glob.has_magic(path):  # DVC takes no globs: the folder the glob searches instead
            parts = PurePosixPath(path).parts
            path = str(PurePosixPath(*parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))]) or ".")
        path = PurePosixPath(path).as_posix().rstrip("/") or "."
        if path not in out:
            out.append(path)
    return out


def _covers(dep: str, path: str) -> bool:
    dep = dep.rstrip("/")
    return path == dep or path.startswith(dep + "/")


def _reads_sources(spec: dict[str, Any]) -> bool:
    for p in spec.get("params") or []:
        keys = p.values() if isinstance(p, dict) else [[p]]
        for group in keys:
            for key in group or []:
                if isinstance(key, str) and (key == "data" or key.startswith("data.sources")):
                    return True
    return False


# ------------------------------------------------------------------------------ dvc.yaml


@dataclass
class StageDeps:
    stage: str
    current: list[str]
    code: list[str]
    sources: list[str] = field(default_factory=list)
    package: str = "vaeft"

    def is_code(self, dep: str) -> bool:
        return _covers(self.package, dep)

    @property
    def missing(self) -> list[str]:
        listed = [d for d in self.current if isinstance(d, str)]
        return [p for p in [*self.code, *self.sources] if not any(_covers(d, p) for d in listed)]

    @property
    def stale(self) -> list[str]:
        """Listed code deps that the stage does not run (or directories instead of files)."""
        return [d for d in self.current if isinstance(d, str) and self.is_code(d) and d not in self.code]

    @property
    def wanted(self) -> list[str]:
        kept = [d for d in self.current if not (isinstance(d, str) and self.is_code(d))]
        return kept + [s for s in self.sources if s not in kept] + self.code


def _load_dvc_yaml(repo: Path) -> tuple[Any, Any]:
    from ruamel.yaml import YAML

    yml = YAML()  # round trip: comments and folded commands survive a rewrite
    yml.indent(mapping=2, sequence=4, offset=2)
    yml.width = 4096
    path = repo / DVC_FILE
    try:
        doc = yml.load(path.read_text(encoding="utf-8"))
    except OSError:
        raise StageDepsError(f"no {DVC_FILE} in {repo}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("stages"), dict):
        raise StageDepsError(f"{path}: no stages")
    return yml, doc


def stage_deps(repo: str | Path = ".", params_file: str | Path | None = None) -> list[StageDeps]:
    """What each command stage of ``repo/dvc.yaml`` should depend on, next to what it lists."""
    repo = Path(repo)
    _, doc = _load_dvc_yaml(repo)
    top, commands = cli_commands()
    sources = local_source_paths(params_file or repo / PARAMS_FILE)
    out = []
    for name, spec in doc["stages"].items():
        parsed = stage_argv(spec.get("cmd", "")) if isinstance(spec, dict) else None
        if parsed is None:
            continue
        package, argv = parsed
        if _module_file(repo, package) is None:
            raise StageDepsError(f"stage {name!r} runs package {package!r}, which is not in {repo}")
        entry = resolve_entry(top, package, argv)
        out.append(StageDeps(name, list(spec.get("deps") or []), code_closure(repo, entry, commands),
                             sources if _reads_sources(spec) else [], package))
    return out


def check_problems(deps: list[StageDeps]) -> list[str]:
    lines = []
    for s in deps:
        lines += [f"stage {s.stage!r}: {p} is not a dep" for p in s.missing]
        lines += [f"stage {s.stage!r}: {p} is a code dep that the stage does not import (derived: files)" for p in s.stale]
    return lines


def write_stage_deps(repo: str | Path = ".", params_file: str | Path | None = None) -> list[str]:
    """Rewrite the stages' ``deps`` in ``repo/dvc.yaml``; returns the names of the stages changed."""
    from ruamel.yaml.comments import CommentedSeq

    from vaeft import atomic

    repo = Path(repo)
    yml, doc = _load_dvc_yaml(repo)
    changed = []
    for s in stage_deps(repo, params_file):
        if s.wanted == s.current:
            continue
        spec = doc["stages"][s.stage]
        seq = spec.get("deps")
        if not isinstance(seq, CommentedSeq):
            seq = CommentedSeq()
            spec["deps"] = seq
        seq[:] = s.wanted
        changed.append(s.stage)
    if changed:
        import io

        buf = io.StringIO()
        yml.dump(doc, buf)
        atomic.write_text(repo / DVC_FILE, buf.getvalue())
    return changed


def missing_source_deps(repo: str | Path = ".", params_file: str | Path | None = None) -> list[tuple[str, str]]:
    """(stage, path) for every local data source a stage reading ``data`` does not list.

    Cheap (no import graph): for the one-line warning of ``vaeft curate`` and ``params check``.
    """
    import yaml

    repo = Path(repo)
    try:
        doc = yaml.safe_load((repo / DVC_FILE).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return []
    stages = doc.get("stages") if isinstance(doc, dict) else None
    if not isinstance(stages, dict):
        return []
    sources = local_source_paths(params_file or repo / PARAMS_FILE)
    out = []
    for name, spec in stages.items():
        if isinstance(spec, dict) and _reads_sources(spec):
            listed = [d for d in spec.get("deps") or [] if isinstance(d, str)]
            out += [(name, p) for p in sources if not any(_covers(d, p) for d in listed)]
    return out


def warn_missing_source_deps(params_file: str | Path) -> list[str]:
    """One line per local source that ``dvc repro`` would not watch (when ``params_file`` is dvc.yaml's)."""
    params_file = Path(params_file)
    repo = params_file.parent
    if params_file.name != PARAMS_FILE or not (repo / DVC_FILE).is_file():
        return []
    return [f"warning: data source {path} is not a dep of dvc.yaml stage {stage!r}, so new files there will "
            f"not re-run it; fix: {FIX_COMMAND}" for stage, path in missing_source_deps(repo, params_file)]


# ------------------------------------------------------------------------------ remote data

LOCAL_DATA = "data/curated"
# The commands that read a dataset root, a URL or a pin alike (`augment` and `export` stay local:
# the pixel store is built where the data was curated, and the model card reads its report).
_REMOTE_READERS = ("pretrain", "train", "evaluate")


def _reads_data(cmd: str) -> bool:
    words = shlex.split(cmd)
    if "vaeft" not in words or "--data" not in words[:-1]:
        return False
    return words[words.index("vaeft") + 1] in _REMOTE_READERS


def use_data(repo: str | Path, data: str) -> list[str]:
    """Point the stages that read a dataset at ``data``: ``data/curated`` (the default) or a pin
    file (``vaeft data pin``). Each such stage's ``--data``, its data dep and, for a pin, a
    params dep on the pin's ``url`` and ``manifest`` (so ``dvc.lock`` states which dataset the
    stage read). Returns the stages changed; the rest of ``dvc.yaml`` is kept as written."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq
    from ruamel.yaml.scalarstring import FoldedScalarString

    from vaeft import atomic
    from vaeft.data.pin import is_pin

    repo = Path(repo)
    data = PurePosixPath(data).as_posix()
    if PurePosixPath(data).is_absolute() or ".." in PurePosixPath(data).parts:
        raise StageDepsError(f"{data}: name the pin relative to the repository root (dvc.yaml's paths are)")
    if data != LOCAL_DATA and not is_pin(repo / data):
        raise StageDepsError(f"{data}: expected {LOCAL_DATA} or a pin file in {repo} (`vaeft data pin URL --out FILE`)")
    yml, doc = _load_dvc_yaml(repo)
    changed = []
    for name, spec in doc["stages"].items():
        cmd = spec.get("cmd")
        if not isinstance(cmd, str) or not _reads_data(cmd):
            continue
        words = shlex.split(cmd)
        old = words[words.index("--data") + 1]
        pinned_before = old != LOCAL_DATA
        if old == data:
            continue
        at, delta = cmd.index(f"--data {old}"), len(data) - len(old)
        new_cmd = cmd.replace(f"--data {old}", f"--data {data}", 1)
        if isinstance(cmd, FoldedScalarString):
            # Keep the command's line breaks where they were (a round trip back is byte-identical).
            folded = FoldedScalarString(new_cmd)
            folded.fold_pos = [p if p < at else p + delta for p in getattr(cmd, "fold_pos", [])]
            new_cmd = folded
        spec["cmd"] = new_cmd
        deps = spec.get("deps")
        if isinstance(deps, CommentedSeq) and old in deps:
            deps[deps.index(old)] = data
        params = spec.get("params")
        if params is None:
            params = spec["params"] = CommentedSeq()
        if pinned_before:
            params[:] = [p for p in params if not (isinstance(p, dict) and old in p)]
        if data != LOCAL_DATA:
            entry = CommentedMap()
            entry[data] = CommentedSeq(["url", "manifest"])
            params.append(entry)
        if not params:
            del spec["params"]
        changed.append(name)
    if changed:
        import io

        buf = io.StringIO()
        yml.dump(doc, buf)
        atomic.write_text(repo / DVC_FILE, buf.getvalue())
    return changed
