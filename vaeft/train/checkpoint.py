"""Training state on disk: one folder per output, written atomically, verified on load, never
discarded without a word.

State lives outside the stage's DVC outputs (DVC deletes outputs before it re-runs a stage), in
``<state_root>/<phase>-<output name>-<hash of the output path>/``, so two runs writing different
outputs never share (or clear) each other's state; a lock beside it stops two runs writing the
same output.

Each checkpoint ``step-N.pt`` carries the run's *config*: the flattened params that change the
maths or the data order (plus digests of the init weights and data). Keys that do not
(:data:`COMPATIBLE_KEYS`: how long, how often to log or checkpoint, how many loader workers, how
the same maths is executed) are left out, so changing them resumes. Any other difference is
refused naming the keys; ``fresh`` moves the old state aside (it is never deleted). Beside every
checkpoint, ``step-N.pt.sha256`` holds its digest: a checkpoint whose bytes do not match (bit
flip, torn copy) or has no digest is set aside as
``*.damaged`` with a warning and the previous one is used; when none is valid the run refuses
rather than restart from step 0.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import torch

from vaeft import atomic
from vaeft.console import console
from vaeft.errors import VaeftError
from vaeft.hashing import file_sha256

_CKPT = re.compile(r"^step-(\d{9})\.pt$")
DIGEST_SUFFIX = ".sha256"
DAMAGED_SUFFIX = ".damaged"
FORMAT = 2

# Config keys that neither change the maths nor the order of the data: a run resumes across them.
# (`steps` included: batches are a pure function of the micro-batch index, not of the run length.)
COMPATIBLE_KEYS = frozenset({
    "train.steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.image_every", "train.image_count", "train.num_workers",
    # The same maths executed differently (rounding only).
    "train.compile", "train.channels_last", "train.gradient_checkpointing", "train.deterministic",
    "train.adam_impl",
    "augment.cache_images",
})


# Learning rates change the remaining updates but leave the saved state a valid start: lowering
# one is how a run continues after a divergence was rolled back. A resume takes the new value and
# says so; the optimizers' other state (moments, step counts) carries on.
ADJUSTABLE_KEYS = frozenset({"train.lr", "train.gan.lr"})


class StateError(VaeftError, RuntimeError):
    """The saved state cannot be resumed (incompatible, damaged, or in use)."""


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = list(value) if isinstance(value, tuple) else value


def run_config(**parts: Any) -> dict[str, Any]:
    """The flattened ``parts`` (JSON-able values) that a resumed run must match."""
    flat: dict[str, Any] = {}
    _flatten(json.loads(json.dumps(parts, default=str)), "", flat)
    return {k: v for k, v in sorted(flat.items()) if k not in COMPATIBLE_KEYS}


def fingerprint(config: dict[str, Any]) -> str:
    kept = {k: v for k, v in config.items() if k not in ADJUSTABLE_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


_MISSING = object()


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose values differ, as ``key: old -> new``."""
    def show(v: Any) -> str:
        s = "(absent)" if v is _MISSING else json.dumps(v, default=str)
        return s if len(s) <= 24 else s[:12] + "..."

    return [f"{k}: {show(saved.get(k, _MISSING))} -> {show(current.get(k, _MISSING))}"
            for k in sorted(set(saved) | set(current)) if saved.get(k, _MISSING) != current.get(k, _MISSING)]


def state_dir(state_root: str | Path, phase: str, out_dir: str | Path) -> Path:
    """The state folder of the run writing ``out_dir`` (readable name, unique per output path).

    An output inside the working directory is keyed by its relative path, so a rerun from
    another clone of the project (a fresh worker pod) finds the state its killed run left.
    """
    out = Path(out_dir).resolve()
    key = str(out)
    with contextlib.suppress(ValueError):
        key = out.relative_to(Path.cwd().resolve()).as_posix()
    name = re.sub(r"[^A-Za-z0-9._-]", "_", out.name) or "out"
    return Path(state_root) / f"{phase}-{name}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


class StateLock:
    """An exclusive, non-blocking ``flock`` on ``<state dir>.lock``, naming its holder.

    The kernel drops it when the holder dies (even by SIGKILL), so a stale lock never blocks.
    """

    def __init__(self, directory: Path, out_dir: str | Path) -> None:
        self.path = directory.with_name(directory.name + ".lock")
        self.out = Path(out_dir)
        self._fd: int | None = None

    def __enter__(self) -> StateLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, atomic.file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip()
            os.close(fd)
            with contextlib.suppress(ValueError, AttributeError):
                info = json.loads(holder)
                holder = f"pid {info['pid']} on {info['host']}"
            raise StateError(f"another run is writing {self.out} ({holder or 'holder unknown'}; "
                             f"lock {self.path}): wait for it to end") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "out": str(self.out)}).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing releases the flock
            self._fd = None


class CheckpointStore:
    def __init__(self, directory: str | Path, config: dict[str, Any], keep: int) -> None:
        self.dir = Path(directory)
        self.config = config
        self.fingerprint = fingerprint(config)
        self.keep = keep

    def _checkpoints(self) -> list[tuple[int, Path]]:
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _CKPT.match(p.name))]
        return sorted(found)

    @staticmethod
    def _digest_path(path: Path) -> Path:
        return path.with_name(path.name + DIGEST_SUFFIX)

    def clean_temp(self) -> list[Path]:
        """Remove what a killed write left: temporary files, digests of checkpoints never renamed
        into place (only call while holding the lock)."""
        if not self.dir.is_dir():
            return []
        left = [p for p in self.dir.iterdir() if p.is_file() and (
            (p.name.startswith(".") and p.name.endswith(".tmp"))
            or (p.name.endswith(".pt" + DIGEST_SUFFIX) and not p.with_name(p.name[: -len(DIGEST_SUFFIX)]).exists()))]
        for p in left:
            p.unlink(missing_ok=True)
        return left

    def _verify(self, path: Path) -> tuple[dict[str, Any] | None, str]:
        """(state, "") for a checkpoint whose bytes match its recorded digest, else (None, why)."""
        try:
            recorded = self._digest_path(path).read_text(encoding="ascii").split()[0]
        except (OSError, UnicodeDecodeError, IndexError):
            return None, "no recorded digest"
        if file_sha256(path) != recorded:
            return None, "digest mismatch"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a digest-valid file torch cannot read: report why
            return None, f"unreadable ({type(exc).__name__})"
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            return None, "written by another vaeft version"
        return state, ""

    def load(self, *, readonly: bool = False) -> dict[str, Any] | None:
        """The newest valid checkpoint, or None when there is none at all.

        Damaged ones newer than it are reported and (unless ``readonly``) renamed ``*.damaged`` so
        that later saves and pruning never mistake them for the newest. Raises :class:`StateError`
        when checkpoints exist but none is valid, or when the valid one is of an incompatible run.
        """
        damaged: list[str] = []
        for step, path in reversed(self._checkpoints()):
            state, why = self._verify(path)
            if state is None:
                damaged.append(f"{path.name} ({why})")
                if not readonly:
                    os.replace(path, path.with_name(path.name + DAMAGED_SUFFIX))
                    self._digest_path(path).unlink(missing_ok=True)
                continue
            if damaged and not readonly:
                console.print(f"[yellow]warning: {self.dir}: damaged checkpoint(s) {', '.join(damaged)} set aside "
                              f"as *{DAMAGED_SUFFIX}; falling back to step {step}[/]")
            if state["fingerprint"] != self.fingerprint:
                changed = config_diff(state["config"], self.config)
                raise StateError(
                    f"the training state in {self.dir} (step {step}) is of a run with other settings "
                    f"({'; '.join(changed) or 'unknown difference'}): run with the old values to resume, "
                    f"or pass --fresh to move it aside and start from step 0")
            adjusted = [d for d in config_diff(state["config"], self.config) if d.split(":")[0] in ADJUSTABLE_KEYS]
            if adjusted and not readonly:
                console.print(f"resuming step {step} with changed {'; '.join(adjusted)}")
            return state
        if damaged:
            raise StateError(f"no valid checkpoint left in {self.dir} ({', '.join(damaged)}): refusing to restart "
                             f"from step 0 silently; pass --fresh to move the state aside and start over")
        return None

    def save(self, step: int, parts: dict[str, Any]) -> Path:
        path = self.dir / f"step-{step:09d}.pt"
        with atomic.atomic_path(path) as tmp:
            torch.save({"format": FORMAT, "step": step, "fingerprint": self.fingerprint, "config": self.config,
                        "parts": parts}, tmp)
            # The digest lands before the checkpoint's rename: a kill in between leaves an orphan
            # digest (removed later), never a checkpoint that cannot be verified.
            atomic.write_text(self._digest_path(path), f"{file_sha256(tmp)}  {path.name}\n")
        for _, old in self._checkpoints()[: -self.keep]:
            self._digest_path(old).unlink(missing_ok=True)
            old.unlink(missing_ok=True)
        return path

    def clear(self) -> None:
        """After a finished run: drop its checkpoints and the folder (kept if anything else is in it)."""
        for _, p in self._checkpoints():
            self._digest_path(p).unlink(missing_ok=True)
            p.unlink(missing_ok=True)
        self.clean_temp()
        with contextlib.suppress(OSError):
            self.dir.rmdir()

    def move_aside(self) -> Path | None:
        """Rename the state folder to ``<name>.old-<UTC time>`` (never deleted); None if there is none."""
        if not self.dir.exists():
            return None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.dir.with_name(f"{self.dir.name}.old-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.dir.with_name(f"{self.dir.name}.old-{stamp}-{n}")
        os.replace(self.dir, target)
        return target

    def discard_from(self, step: int) -> tuple[int, Path] | None:
        """Delete the checkpoints of ``step`` and later; the newest one left (step, path), if any."""
        kept = []
        for n, p in self._checkpoints():
            if n >= step:
                self._digest_path(p).unlink(missing_ok=True)
                p.unlink(missing_ok=True)
            else:
                kept.append((n, p))
        return kept[-1] if kept else None
