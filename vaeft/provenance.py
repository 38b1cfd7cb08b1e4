"""What every stage records about a run, in two parts.

``run_info.json`` goes inside the stage's output and holds only what the output is a function
of: the stage, the resolved params, the versions of vaeft, Python and torch, and stage facts
(steps, seed, ...). DVC hashes it with the output, and ``dvc.lock``'s hashes are the released
checkpoints' identity, so anything that differs between two identical runs (time, host, git
commit) would make a fresh clone's ``dvc repro`` disagree with the committed lock.

The run record holds that volatile part: when, on which host, from which commit (and whether the
checkout was dirty). It goes to ``.vaeft/runs/<output path>.json`` under the project root (the
nearest folder above the output holding ``.dvc`` or ``.git``; the folder holding the output
outside a project): git-ignored and in ``.dvcignore``, so neither git nor DVC hashes it, one file per
output, found by the output's path. It names the ``run_info.json`` it belongs to by sha256, so a
record left by another run (after a ``dvc checkout`` of an older output) is recognisable. What
was released from which commit is the publish receipt's job (``vaeft.publish.receipt``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from vaeft import __version__, atomic

RUN_INFO_FILE = "run_info.json"
RUNS_DIR = Path(".vaeft") / "runs"


def git_commit(cwd: str | Path | None = None) -> dict[str, Any]:
    """The checkout's commit and whether it had uncommitted changes (None outside git)."""
    def _git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status)}


def run_info(stage: str, params: dict[str, BaseModel] | None = None, **extra: Any) -> dict[str, Any]:
    # The installed distribution's version is torch.__version__ (local tag included), read
    # without importing torch: stages that never touch a tensor (curate) skip ~2 CPU-s of imports.
    return {
        "stage": stage,
        "vaeft_version": __version__,
        "python": platform.python_version(),
        "torch": importlib.metadata.version("torch"),
        "params": {k: v.model_dump(mode="json") for k, v in (params or {}).items()},
        **extra,
    }


def recorded_steps(model_dir: str | Path) -> int | None:
    """Training steps a model folder's ``run_info.json`` records (None: imported or foreign model)."""
    path = Path(model_dir) / RUN_INFO_FILE
    if not path.is_file():
        return None
    try:
        steps = json.loads(path.read_text(encoding="utf-8")).get("steps")
    except (OSError, ValueError):
        return None
    return steps if isinstance(steps, int) and steps > 0 else None


def stage_record(model_dir: str | Path, stage: str, key: str) -> dict[str, Any] | None:
    """``run_info.json``'s ``key`` entry when the folder is an output of ``stage`` (else None)."""
    try:
        info = json.loads((Path(model_dir) / RUN_INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    entry = info.get(key) if isinstance(info, dict) and info.get("stage") == stage else None
    return entry if isinstance(entry, dict) else None


def write_run_info(out_dir: str | Path, stage: str, params: dict[str, BaseModel] | None = None, **extra: Any) -> Path:
    """Write ``run_info.json`` into ``out_dir`` (a pure function of the arguments).

    Stages that build the output in a temporary folder call :func:`record_run` with the final
    path once it is in place.
    """
    path = Path(out_dir) / RUN_INFO_FILE
    atomic.write_json(path, run_info(stage, params, **extra))
    return path


def _project_root(path: Path) -> Path | None:
    for folder in (path, *path.parents):
        if (folder / ".dvc").is_dir() or (folder / ".git").exists():
            return folder
    return None


def run_record_path(out_dir: str | Path) -> Path:
    """Where the volatile provenance of the output ``out_dir`` is kept (see the module docstring)."""
    out = Path(os.path.abspath(out_dir))
    root = _project_root(out.parent)
    if root is None:
        return out.parent / RUNS_DIR / f"{out.name}.json"
    return root / RUNS_DIR / f"{out.relative_to(root).as_posix()}.json"


def record_run(out_dir: str | Path, stage: str) -> Path:
    """Record when, where and from which commit ``stage`` built ``out_dir`` (outside its bytes)."""
    out = Path(out_dir)
    info = out / RUN_INFO_FILE
    record = {
        "stage": stage,
        "output": str(out),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "git": git_commit(),
        "cwd": os.getcwd(),
        "run_info_sha256": hashlib.sha256(info.read_bytes()).hexdigest() if info.is_file() else None,
    }
    path = run_record_path(out)
    atomic.write_json(path, record)
    return path


def read_run_record(out_dir: str | Path) -> dict[str, Any] | None:
    """The record of the run that built ``out_dir``; None when there is none or it is another run's."""
    path = run_record_path(out_dir)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    info = Path(out_dir) / RUN_INFO_FILE
    if info.is_file() and record.get("run_info_sha256") != hashlib.sha256(info.read_bytes()).hexdigest():
        return None
    return record
