"""What every stage writes next to its outputs: the resolved params and the code version."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from vaeft import __version__, atomic

RUN_INFO_FILE = "run_info.json"


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
    import torch

    return {
        "stage": stage,
        "vaeft_version": __version__,
        "git": git_commit(),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
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


def write_run_info(out_dir: str | Path, stage: str, params: dict[str, BaseModel] | None = None, **extra: Any) -> Path:
    """Write ``run_info.json`` into ``out_dir``.

    Kept out of the model bytes on purpose: timestamps here must not make two identical
    trainings produce different checkpoint files.
    """
    path = Path(out_dir) / RUN_INFO_FILE
    atomic.write_json(path, run_info(stage, params, **extra))
    return path
