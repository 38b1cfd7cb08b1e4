"""Publishing as a Prefect task (the work is :func:`vaeft.publish.local.publish_local`)."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from vaeft.publish.local import PublishResult, publish_local


@task(name="publish", retries=2, retry_delay_seconds=[5, 30], cache_policy=NO_CACHE)
def publish_release(export_dir: str, target: str) -> PublishResult:
    return publish_local(Path(export_dir), Path(target))
