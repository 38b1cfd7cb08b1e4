"""Digests of store files, and a record of which files were verified (so `list` need not re-hash GBs)."""

from __future__ import annotations

import json
from pathlib import Path

from vaeft import atomic
from vaeft.hashing import file_sha256

__all__ = ["digest_matches", "file_sha256", "record", "recorded_digest"]

VERIFIED_FILE = ".verified.json"


def digest_matches(digest: str, sha256: str | None, sha256_prefix: str | None) -> bool:
    """True when ``digest`` satisfies the pin; an unpinned file matches anything."""
    if sha256:
        return digest == sha256.lower()
    if sha256_prefix:
        return digest.startswith(sha256_prefix.lower())
    return True


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_record(store: Path) -> dict:
    f = store / VERIFIED_FILE
    try:
        return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def record(store: Path, rel: str, digest: str) -> None:
    data = read_record(store)
    data[rel] = {"sha256": digest, **_stamp(store / rel)}
    atomic.write_json(store / VERIFIED_FILE, data)


def recorded_digest(store: Path, rel: str) -> str | None:
    """The digest recorded at verification, if the file has not changed (size, mtime) since."""
    entry = read_record(store).get(rel)
    path = store / rel
    if not entry or not path.is_file() or {k: entry.get(k) for k in ("size", "mtime_ns")} != _stamp(path):
        return None
    return entry.get("sha256")
