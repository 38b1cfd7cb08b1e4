"""The receipt of a publishing run: what was built from what, and where it went.

A receipt has no timestamp on purpose: two runs that publish the same release from the same
commit and params produce the same bytes, so storing it again is a no-op (S3 idempotency) while a
run from another commit adds a second receipt instead of overwriting the first. When a run
happened is Prefect's (and the object store's) business.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from vaeft import atomic
from vaeft.config import load_params, params_as_dict
from vaeft.export.release import SUMS_FILE
from vaeft.hashing import file_sha256
from vaeft.provenance import git_commit
from vaeft.publish.local import release_version

RECEIPT_SCHEMA = 1


def build_receipt(repo: str | Path, export_dir: str | Path, published: dict[str, Any]) -> dict[str, Any]:
    """``published``: target name -> locations (paths/URIs). Never put credentials in it."""
    repo, export_dir = Path(repo), Path(export_dir)
    lock = repo / "dvc.lock"
    outputs = {}
    for line in (export_dir / SUMS_FILE).read_text(encoding="utf-8").splitlines():
        digest, rel = line.split("  ", 1)
        outputs[rel] = digest
    return {
        "schema": RECEIPT_SCHEMA,
        "release": release_version(export_dir),
        "git": git_commit(repo),
        "dvc_lock_sha256": file_sha256(lock) if lock.is_file() else None,
        "params": params_as_dict(load_params(repo / "params.yaml")),
        "outputs_sha256": outputs,
        "sha256sums_sha256": file_sha256(export_dir / SUMS_FILE),
        "published": published,
    }


def receipt_bytes(receipt: dict[str, Any]) -> bytes:
    return (json.dumps(receipt, indent=2, sort_keys=True) + "\n").encode("utf-8")


def receipt_id(receipt: dict[str, Any]) -> str:
    return hashlib.sha256(receipt_bytes(receipt)).hexdigest()[:16]


def write_receipt(receipt: dict[str, Any], directory: str | Path) -> Path:
    """Atomically write ``directory/receipts/<id>.json`` (a reader never sees half a receipt)."""
    path = Path(directory) / "receipts" / f"{receipt_id(receipt)}.json"
    atomic.write_bytes(path, receipt_bytes(receipt))
    return path
