"""Atomic writes: write to a temporary sibling, fsync, then rename over the target.

A reader (or a resumed run after SIGKILL) sees either the old file or the new one, never half.

Two promises on top of atomicity, because a rename can destroy what a user had:

* A folder is only replaced when it is missing, empty, or carries the marker (:data:`MARKER_FILE`)
  of the same kind of output; anything else needs ``force``. A file never replaces a folder, nor a
  folder a file. Stages call :func:`check_dir_target` / :func:`check_file_target` before their work
  so a refusal costs nothing; :func:`atomic_dir` checks again at the rename.
* What we write gets the permissions a plain ``open()``/``mkdir()`` would give under the umask:
  ``mkstemp``/``mkdtemp`` create owner-only entries, which would make a published release
  unreadable by whoever serves it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from vaeft.errors import VaeftError

MARKER_FILE = ".vaeft-output.json"

# Kind of output -> the command(s) that write it, for messages. Kinds, not commands, decide
# what may be replaced: a model folder from `vaeft train` may be rewritten by `vaeft convert`.
OUTPUT_KINDS = {
    "curated": "vaeft curate",
    "crops": "vaeft augment materialize",
    "model": "vaeft pretrain/train/convert",
    "eval-report": "vaeft evaluate",
    "export": "vaeft export",
    "release": "vaeft publish",
    "eval-set": "vaeft data prepare",
    "coco-val": "vaeft data coco-val",
}

# Folders written before markers existed are recognised by the stage their run_info.json names.
_LEGACY_STAGES = {
    "curated": {"curate"},
    "crops": {"augment"},
    "model": {"pretrain", "train-ema", "train-mse", "train-pretrain"},
    "eval-report": {"evaluate"},
    "export": {"export"},
}


class OutputRefusedError(VaeftError, FileExistsError):
    """Writing an output would destroy something vaeft did not write."""


# ------------------------------------------------------------------------------ umask

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows.

    ``os.umask`` can only be read by setting it, which is process-wide: another thread creating a
    file in between would get the temporary value. Linux publishes it in /proc (kernel >= 4.7).
    """
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    return 0o777 & ~current_umask()


def apply_umask_tree(root: str | Path) -> None:
    """Give ``root`` and everything under it the modes a fresh write would get (copies keep the source's)."""
    fmode, dmode = file_mode(), dir_mode()
    root = Path(root)
    os.chmod(root, dmode)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), dmode)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, fmode)


# ------------------------------------------------------------------------------ what may be replaced


def output_kind(folder: str | Path) -> str | None:
    """The kind of vaeft output ``folder`` holds, from its marker (or a pre-marker run_info.json)."""
    folder = Path(folder)
    with contextlib.suppress(OSError, ValueError, AttributeError):
        kind = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8")).get("kind")
        if isinstance(kind, str):
            return kind
    with contextlib.suppress(OSError, ValueError, AttributeError):
        stage = json.loads((folder / "run_info.json").read_text(encoding="utf-8")).get("stage")
        for kind, stages in _LEGACY_STAGES.items():
            if stage in stages:
                return kind
    return None


def _check_parent(target: Path) -> None:
    # mkdir(parents=True) would fail with a traceback, after the work, on a file in the way.
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputRefusedError(f"cannot write {target}: {parent} is a file, not a folder")
            return


def _overlaps(a: Path, b: Path, inside_ok: bool = False) -> bool:
    """Whether ``a`` is ``b`` or holds it (or, unless ``inside_ok``, lies inside it)."""
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or (not inside_ok and b in a.parents)


def check_dir_target(target: str | Path, kind: str | None, *, force: bool = False,
                     inputs: Iterable[str | Path] = (), inside_inputs_ok: bool = True) -> Path:
    """Raise :class:`OutputRefusedError` unless a folder output of ``kind`` may be written at ``target``.

    Allowed: a missing or empty folder, one marked as the same kind, or any folder with ``force``.
    Never allowed, even with ``force``: a file in the folder's place, or a target that is or holds
    one of ``inputs`` (replacing it would delete what the command reads); nor, unless
    ``inside_inputs_ok``, one inside an input (curation would read its own output as a source).
    """
    target = Path(target)
    for inp in inputs:
        if isinstance(inp, str) and "://" in inp:
            continue
        if _overlaps(target, Path(inp), inside_inputs_ok):
            what = "is or contains" if inside_inputs_ok else "is, contains or lies inside"
            raise OutputRefusedError(f"refusing to write {target}: it {what} the input {inp}")
    if target.exists() and not target.is_dir():
        raise OutputRefusedError(f"refusing to replace {target}: it is a file, and the output is a folder")
    _check_parent(target)
    if not target.exists() or force or not any(target.iterdir()):
        return target
    if kind is not None and output_kind(target) == kind:
        return target
    by = f"`{OUTPUT_KINDS.get(kind, 'vaeft')}`" if kind else "vaeft"
    raise OutputRefusedError(f"refusing to replace {target}: it was not written by {by} (pass --force to replace it)")


def check_file_target(target: str | Path, suffixes: Iterable[str] = (), *, force: bool = False,
                      inputs: Iterable[str | Path] = ()) -> Path:
    """Raise unless a file may be written at ``target``: never over a folder or an input; over an
    existing file only if its suffix is one of ``suffixes`` (the kind we write), or with ``force``."""
    target = Path(target)
    for inp in inputs:
        if _overlaps(target, Path(inp)):
            raise OutputRefusedError(f"refusing to write {target}: it is or lies inside the input {inp}")
    if target.is_dir():
        raise OutputRefusedError(f"refusing to replace {target}: it is a folder, and the output is a file")
    _check_parent(target)
    suffixes = tuple(s.lower() for s in suffixes)
    if target.exists() and suffixes and target.suffix.lower() not in suffixes and not force:
        raise OutputRefusedError(f"refusing to overwrite {target}: vaeft writes {'/'.join(suffixes)} here, "
                                 f"not {target.suffix or 'extension-less'} files (pass --force to replace it)")
    return target


# ------------------------------------------------------------------------------ writes


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it is renamed onto ``target``.

    A folder at ``target`` is refused (os.replace would fail on it anyway, after the work).
    """
    target = Path(target)
    if target.is_dir():
        raise OutputRefusedError(f"refusing to replace {target}: it is a folder, and the output is a file")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        # As open() would: an existing file keeps its mode, a new one gets the umask's.
        try:
            mode = target.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = file_mode()
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: str | Path, text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def write_json(target: str | Path, obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def marker_bytes(kind: str) -> bytes:
    # No timestamps or paths: DVC hashes output folders, and identical runs must give identical bytes.
    return (json.dumps({"kind": kind, "written_by": "vaeft"}, indent=2, sort_keys=True) + "\n").encode()


@contextlib.contextmanager
def atomic_dir(target: str | Path, kind: str | None = None, *, force: bool = False,
               inputs: Iterable[str | Path] = (), inside_inputs_ok: bool = True) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``target``.

    ``target`` must pass :func:`check_dir_target` (checked before the work and again at the
    rename). With a ``kind`` the new folder carries its marker, so the next run may replace it.
    """
    target = Path(target)
    inputs = list(inputs)
    check_dir_target(target, kind, force=force, inputs=inputs, inside_inputs_ok=inside_inputs_ok)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        if kind is not None:
            write_bytes(tmp / MARKER_FILE, marker_bytes(kind))
        os.chmod(tmp, dir_mode())
        check_dir_target(target, kind, force=force, inputs=inputs, inside_inputs_ok=inside_inputs_ok)
        if target.exists():
            # A fresh name for the old folder: a fixed one could be something of the user's.
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
