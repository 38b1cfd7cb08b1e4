"""Run one DVC stage as a Prefect task. DVC decides whether it needs to run (it is the one cache)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE


class StageFailed(RuntimeError):
    pass


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


def dvc(repo: str | Path, *args: str, capture: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=repo,
        env=dvc_env(),
        text=True,
        capture_output=capture,
        check=False,
    )


def stage_is_stale(repo: str | Path, stage: str) -> bool:
    out = dvc(repo, "status", "--json", stage, capture=True)
    if out.returncode != 0:
        raise StageFailed(f"dvc status {stage} failed: {out.stderr.strip() or out.stdout.strip()}")
    return bool(json.loads(out.stdout or "{}"))


@task(
    name="dvc-stage",
    task_run_name="{stage}",
    # Infrastructure hiccups (a killed worker, a full disk freed later) deserve one more try;
    # params errors never reach here, the flow validates them before any stage runs.
    retries=1,
    retry_delay_seconds=10,
    # DVC is the cache: Prefect must not short-cut a stage on its own.
    cache_policy=NO_CACHE,
)
def run_stage(stage: str, repo: str) -> StageResult:
    t0 = time.perf_counter()
    if not stage_is_stale(repo, stage):
        print(f"stage {stage}: unchanged, skipped")
        return StageResult(stage, ran=False, seconds=time.perf_counter() - t0)
    # Output goes straight to the terminal so progress bars stay live.
    proc = dvc(repo, "repro", "--single-item", stage)
    if proc.returncode != 0:
        raise StageFailed(f"stage {stage} failed (dvc repro exit code {proc.returncode}); see the output above")
    return StageResult(stage, ran=True, seconds=time.perf_counter() - t0)
