"""sha256 of files and folders, streamed in 1 MiB chunks (weights are GBs)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20


def stream_sha256(fh: BinaryIO, chunk: int = CHUNK) -> str:
    """sha256 of what ``fh`` yields until EOF (a file, a remote object's body), chunk by chunk."""
    h = hashlib.sha256()
    for block in iter(lambda: fh.read(chunk), b""):
        h.update(block)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return stream_sha256(fh)


def tree_sha256(root: str | Path) -> str:
    """Digest of every file under ``root`` (relative names and bytes), or of a single file."""
    root = Path(root)
    if root.is_file():
        return file_sha256(root)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode() + b"\0" + file_sha256(p).encode())
    return h.hexdigest()
