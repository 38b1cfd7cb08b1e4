"""Run one DVC stage as a Prefect task. DVC decides whether it needs to run (it is the one cache)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
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


# DVC ends every `dvc repro` with advice for someone at a shell (git add these files, turn on
# autostage, dvc push). The flow runs one repro per stage and does the pushing itself, so the same
# block would repeat seven times between the stages' own lines. Errors go to stderr, untouched.
_HINT_HEADS = ("To track the changes with git, run:", "To enable auto staging, run:")
_HINT_LINES = ("Use `dvc push` to send your updates to remote storage.",)


def without_dvc_hints(lines: Iterable[str]) -> Iterator[str]:
    """``lines`` (of DVC's stdout, newline kept) less DVC's git/autostage/push advice.

    A hint block is its heading, then blank and tab-indented command lines; the blank lines
    before a heading are dropped with it. Everything else passes as it comes (streamed)."""
    blanks: list[str] = []
    in_hint = False
    for line in lines:
        text = line.rstrip("\r\n")
        if not text.strip():
            blanks.append(line)
            continue
        if text in _HINT_HEADS:
            blanks, in_hint = [], True
            continue
        if in_hint and text.startswith("\t"):
            blanks = []
            continue
        if text in _HINT_LINES:
            blanks, in_hint = [], False
            continue
        in_hint = False
        yield from blanks
        blanks = []
        yield line
    if not in_hint:
        yield from blanks


def repro_quietly(repo: str | Path, stage: str, extra_env: dict[str, str] | None = None) -> int:
    """``dvc repro --single-item STAGE`` with its stdout passed through :func:`without_dvc_hints`;
    stderr (progress bars, errors) goes straight to the terminal. Returns DVC's exit code."""
    env = {**dvc_env(), **(extra_env or {}), "PYTHONUNBUFFERED": "1"}  # the stage's lines as they come
    with subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--single-item", stage], cwd=repo, env=env,
                          stdout=subprocess.PIPE, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in without_dvc_hints(proc.stdout):
            sys.stdout.write(line)
            sys.stdout.flush()
    return proc.returncode


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
        returncode = repro_quietly(repo, stage, {**(env or {}), STATUS_FILE_ENV: str(status_file)})
        ran = status_file.exists()  # our commands always write it; DVC skipped or restored the stage otherwise
        status = _status(status_file)
    if returncode != 0:
        msg = (f"stage {stage} failed (dvc repro exit code {returncode}, "
               f"stage exit {status.get('exit_code', 'unknown')}); see the output above")
        if status.get("kind") == "user":
            raise StageUserError(f"stage {stage}: {status['message']}" if status.get("message") else msg)
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
