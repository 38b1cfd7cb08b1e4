"""Run one DVC stage as a Prefect task. DVC decides whether it needs to run (it is the one cache)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from vaeft.errors import STATUS_FILE_ENV


class StageFailed(RuntimeError):
    """A stage failed for a reason that may go away (retried)."""


class StageUserError(StageFailed):
    """The stage's command exited 2: bad params or inputs, the same on every try (not retried)."""


@dataclass(frozen=True)
class StageResult:
    stage: str
    ran: bool
    seconds: float


def pipeline_stages(repo: str | Path) -> list[str]:
    """Stage names in ``dvc.yaml`` order (written in dependency order)."""
    spec = yaml.safe_load((Path(repo) / "dvc.yaml").read_text(encoding="utf-8"))
    return list(spec["stages"])


def dvc_env() -> dict[str, str]:
    """The environment for DVC and the stage commands it runs: this interpreter's bin dir first."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def dvc(repo: str | Path, *args: str, capture: bool = False,
        extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=repo,
        env={**dvc_env(), **(extra_env or {})},
        text=True,
        capture_output=capture,
        check=False,
    )


def stage_is_stale(repo: str | Path, stage: str) -> bool:
    out = dvc(repo, "status", "--json", stage, capture=True)
    if out.returncode != 0:
        raise StageFailed(f"dvc status {stage} failed: {out.stderr.strip() or out.stdout.strip()}")
    return bool(json.loads(out.stdout or "{}"))


def is_infrastructure_failure(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry anything except a user error (bad params, missing input).

    A user error fails the same way every time; retrying it only delays the red line.
    """
    try:
        state.result()
    except StageUserError:
        return False
    except Exception:  # noqa: BLE001 - everything else may be transient (OOM kill, disk, network)
        return True
    return False


def _status(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # the stage died before writing it (killed, crashed interpreter): infrastructure


@task(
    name="dvc-stage",
    task_run_name="{stage}",
    # Infrastructure failures (a killed worker, a full disk freed later, a flaky remote) get more
    # tries with growing pauses; user errors are classified by the stage's own exit status below
    # and never retried.
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=10),
    retry_jitter_factor=0.5,
    retry_condition_fn=is_infrastructure_failure,
    # DVC is the cache: Prefect must not short-cut a stage on its own.
    cache_policy=NO_CACHE,
)
def run_stage(stage: str, repo: str, env: dict[str, str] | None = None) -> StageResult:
    """``env``: extra environment for the stage command, e.g. ``VAEFT_NPROC_PER_NODE`` (it is
    recorded as a task parameter: never pass secrets here)."""
    t0 = time.perf_counter()
    lock_before = _lock_entry(repo, stage)
    with tempfile.TemporaryDirectory(prefix="vaeft-stage-") as tmp:
        status_file = Path(tmp) / "status.json"
        # `dvc repro` alone decides (no `dvc status` first: one DVC start-up per stage, not two).
        # Output goes straight to the terminal so progress bars stay live; the stage's exit status
        # travels through the status file instead (dvc repro flattens it to 1).
        proc = dvc(repo, "repro", "--single-item", stage, extra_env={**(env or {}), STATUS_FILE_ENV: str(status_file)})
        ran = status_file.exists()  # our commands always write it; DVC skipped or restored the stage otherwise
        status = _status(status_file)
    if proc.returncode != 0:
        msg = (f"stage {stage} failed (dvc repro exit code {proc.returncode}, "
               f"stage exit {status.get('exit_code', 'unknown')}); see the output above")
        if status.get("kind") == "user":
            raise StageUserError(msg)
        raise StageFailed(msg)
    # A stage command that is not vaeft's writes no status file: its lock entry tells instead.
    ran = ran or _lock_entry(repo, stage) != lock_before
    if not ran:
        print(f"stage {stage}: unchanged, skipped")
    return StageResult(stage, ran=ran, seconds=time.perf_counter() - t0)


def _lock_entry(repo: str | Path, stage: str) -> Any:
    try:
        lock = yaml.safe_load((Path(repo) / "dvc.lock").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    return (lock.get("stages") or {}).get(stage)


class RemoteError(RuntimeError):
    pass


def _dvc_checked(repo: str, *args: str) -> str:
    proc = dvc(repo, *args, capture=True)
    if proc.returncode != 0:
        raise RemoteError(f"dvc {' '.join(args)} failed: {(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc.stdout


@task(name="dvc-pull", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=5),
      retry_jitter_factor=0.5, cache_policy=NO_CACHE)
def pull_inputs(repo: str, remote: str) -> None:
    """Fetch what the remote already has (outputs and run-cache) so unchanged stages are restored
    instead of recomputed; a first run against an empty remote finds nothing, which is fine."""
    _dvc_checked(repo, "pull", "-r", remote, "--run-cache", "--allow-missing")


@task(name="dvc-push", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=5),
      retry_jitter_factor=0.5, cache_policy=NO_CACHE)
def push_outputs(repo: str, remote: str) -> None:
    # --run-cache: another machine with the same deps/params restores stages instead of training.
    _dvc_checked(repo, "push", "-r", remote, "--run-cache")
