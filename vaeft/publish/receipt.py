"""The receipt of a publishing run: what was built from what, and where it went.

A receipt has no timestamp on purpose: two runs that publish the same release from the same
commit and params produce the same bytes, so storing it again is a no-op (S3 idempotency) while a
run from another commit adds a second receipt instead of overwriting the first. When a run
happened is Prefect's (and the object store's) business.

What ``vaeft reproduce`` needs is here too (schema 2): where the commit can be fetched
(``git.remote_url``), the DVC remote the inputs came from, the release's evaluation metrics (to
compare a rebuild on other hardware), and the environment of the publishing process (to say
whether a rebuild ran on the same machine type). URLs are stored without their user-info part so
a token in a remote URL never lands in a receipt.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from vaeft import __version__, atomic
from vaeft.config import load_params, params_as_dict
from vaeft.export.release import SUMS_FILE
from vaeft.hashing import file_sha256
from vaeft.provenance import git_commit
from vaeft.publish.local import release_version

RECEIPT_SCHEMA = 2
METRICS_FILE = "metrics/eval.json"  # the evaluate stage's output, relative to the repo


def build_receipt(repo: str | Path, export_dir: str | Path, published: dict[str, Any],
                  dvc_remote: str | None = None) -> dict[str, Any]:
    """``published``: target name -> locations (paths/URIs). Never put credentials in it.
    ``dvc_remote``: the DVC remote the run pulled from / pushed to (default: the repo's default)."""
    repo, export_dir = Path(repo), Path(export_dir)
    lock = repo / "dvc.lock"
    outputs = {}
    for line in (export_dir / SUMS_FILE).read_text(encoding="utf-8").splitlines():
        digest, rel = line.split("  ", 1)
        outputs[rel] = digest
    metrics = repo / METRICS_FILE
    return {
        "schema": RECEIPT_SCHEMA,
        "release": release_version(export_dir),
        "git": {**git_commit(repo), "changed": git_changed_paths(repo), "remote_url": git_remote_url(repo)},
        "dvc_lock_sha256": file_sha256(lock) if lock.is_file() else None,
        "dvc_remote": dvc_remote_info(repo, dvc_remote),
        "params": params_as_dict(load_params(repo / "params.yaml")),
        "outputs_sha256": outputs,
        "sha256sums_sha256": file_sha256(export_dir / SUMS_FILE),
        "metrics": json.loads(metrics.read_text(encoding="utf-8")) if metrics.is_file() else None,
        "environment": build_environment(),
        "published": published,
    }


def strip_userinfo(url: str) -> str:
    """``https://user:token@host/x`` -> ``https://host/x``; scp-style ``git@host:x`` is kept (the
    user there names an account, not a secret)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, path = rest.partition("/")
    return f"{scheme}://{netloc.rpartition('@')[2]}{slash}{path}"


def git_remote_url(repo: str | Path) -> str | None:
    """The URL of ``origin`` (where a fresh machine clones the commit from), if the repo has one."""
    try:
        out = subprocess.run(["git", "remote", "get-url", "origin"], cwd=repo, capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return strip_userinfo(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else None


def git_changed_paths(repo: str | Path) -> list[str] | None:
    """Tracked files that differ from the commit (``dirty`` says only whether any do): a rebuild
    from the commit can tell the pipeline's own bookkeeping (dvc.lock) from changed inputs."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                             capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return sorted(line[3:].split(" -> ")[-1] for line in out.stdout.splitlines() if len(line) > 3)


def dvc_remote_info(repo: str | Path, name: str | None = None) -> dict[str, str | None] | None:
    """``{"name", "url"}`` of the named (or default) DVC remote from the repo's config files.

    Read as INI rather than through ``dvc config`` (a second's start-up per call here); the local
    config wins as it does for DVC. Secrets live in other keys of the section and are not read.
    """
    cfg = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        cfg.read([Path(repo) / ".dvc" / "config", Path(repo) / ".dvc" / "config.local"], encoding="utf-8")
    except configparser.Error:
        return None
    name = name or cfg.get("core", "remote", fallback=None)
    if not name:
        return None
    for section in (f"'remote \"{name}\"'", f'remote "{name}"'):
        if cfg.has_section(section):
            url = cfg.get(section, "url", fallback=None)
            return {"name": name, "url": strip_userinfo(url) if url else None}
    return {"name": name, "url": None}


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _stage_threads(this_process: int) -> int:
    """The thread count the stage processes (``python -m vaeft ...``, started with this environment)
    compute with: OMP_NUM_THREADS when set, as torch reads it at start-up; else this process's."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return this_process


def build_environment() -> dict[str, Any]:
    """What decides whether a rebuild can be bit-exact: the machine type, the thread count
    (CPU reductions are split per thread), the accelerator and the software versions."""
    import torch

    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": _stage_threads(torch.get_num_threads()),
        "cuda_device": cuda,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vaeft": __version__,
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
