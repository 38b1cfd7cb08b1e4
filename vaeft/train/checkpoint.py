"""Training state on disk: written atomically every N steps, the last K kept, resumed by default.

State lives outside the stage's DVC outputs (DVC deletes outputs before it re-runs a stage), in
``<state_root>/<phase>/``. A fingerprint of everything that determines the run (params, init
weights, data manifest) guards against resuming a different run's state.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch

from vaeft import atomic

_CKPT = re.compile(r"^step-(\d{9})\.pt$")


def fingerprint(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class CheckpointStore:
    def __init__(self, directory: str | Path, fingerprint: str, keep: int) -> None:
        self.dir = Path(directory)
        self.fingerprint = fingerprint
        self.keep = keep

    def _checkpoints(self) -> list[tuple[int, Path]]:
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _CKPT.match(p.name))]
        return sorted(found)

    def latest(self) -> dict[str, Any] | None:
        """The newest readable checkpoint of this run, or None (stale runs' state is removed)."""
        for _step, path in reversed(self._checkpoints()):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001 - a torn or foreign file: try the previous one
                continue
            if state.get("fingerprint") != self.fingerprint:
                self.clear()
                return None
            return state
        return None

    def save(self, step: int, state: dict[str, Any]) -> Path:
        path = self.dir / f"step-{step:09d}.pt"
        with atomic.atomic_path(path) as tmp:
            torch.save({**state, "step": step, "fingerprint": self.fingerprint}, tmp)
        for _, old in self._checkpoints()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def clear(self) -> None:
        for _, p in self._checkpoints():
            p.unlink(missing_ok=True)

    def discard_from(self, step: int) -> tuple[int, Path] | None:
        """Delete the checkpoints of ``step`` and later; the newest one left (step, path), if any."""
        kept = []
        for n, p in self._checkpoints():
            if n >= step:
                p.unlink(missing_ok=True)
            else:
                kept.append((n, p))
        return kept[-1] if kept else None
