"""Publish an export to a local directory, content-addressed and idempotent.

The release version is derived from the export's ``SHA256SUMS``: publishing the same export
again does nothing; a different export never overwrites an existing version.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from vaeft import atomic
from vaeft.console import console
from vaeft.errors import VaeftError
from vaeft.export.release import SUMS_FILE, verify_sums


class PublishConflictError(VaeftError, RuntimeError):
    pass


@dataclass(frozen=True)
class PublishResult:
    version: str
    path: Path
    uploaded: bool


def release_version(export_dir: str | Path) -> str:
    sums = Path(export_dir) / SUMS_FILE
    if not sums.is_file():
        raise FileNotFoundError(f"{export_dir}: no {SUMS_FILE} (run the export stage first)")
    return hashlib.sha256(sums.read_bytes()).hexdigest()[:12]


def publish_local(export_dir: str | Path, target: str | Path) -> PublishResult:
    export_dir, target = Path(export_dir), Path(target)
    version = release_version(export_dir)
    dest = target / version
    if target.exists() and not target.is_dir():
        raise atomic.OutputRefusedError(f"refusing to publish to {target}: it is a file, not a folder")
    if dest.exists():
        sums = dest / SUMS_FILE
        if not sums.is_file() or sums.read_bytes() != (export_dir / SUMS_FILE).read_bytes():
            raise PublishConflictError(f"{dest} exists with different contents; refusing to overwrite")
        console.print(f"publish: {dest} already holds this release, nothing to do")
        return PublishResult(version, dest, uploaded=False)
    atomic.check_file_target(target / "LATEST")
    with atomic.atomic_dir(dest, "release", inputs=[export_dir], inside_inputs_ok=False) as tmp:
        shutil.copytree(export_dir, tmp, dirs_exist_ok=True)
        # copytree keeps the export's modes; the release gets what the publisher's umask says,
        # so the service that serves it can read it.
        atomic.apply_umask_tree(tmp)
        verify_sums(tmp)  # a bad copy never becomes a release
    atomic.write_text(target / "LATEST", version + "\n")
    console.print(f"publish: release {version} -> {dest}")
    return PublishResult(version, dest, uploaded=True)
