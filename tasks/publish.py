"""Publishing as Prefect tasks (the work is in :mod:`vaeft.publish`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from vaeft.config import S3PublishParams
from vaeft.publish.local import PublishConflictError, PublishResult, publish_local
from vaeft.publish.s3 import S3PublishResult, S3Target, publish_s3


def s3_target(p: S3PublishParams) -> S3Target:
    return S3Target(bucket=p.bucket, prefix=p.prefix, endpoint_url=p.endpoint_url, region=p.region,
                    multipart_threshold=p.multipart_threshold_mb * 1024 * 1024)


def _not_a_conflict(task: Any, task_run: Any, state: Any) -> bool:
    # A conflict (different bytes at a published version) is a decision for a human, not a retry.
    try:
        state.result()
    except PublishConflictError:
        return False
    except Exception:  # noqa: BLE001
        return True
    return False


_RETRY = dict(retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=5),
              retry_jitter_factor=0.5, retry_condition_fn=_not_a_conflict, cache_policy=NO_CACHE)


@task(name="publish-local", **_RETRY)
def publish_release(export_dir: str, target: str) -> PublishResult:
    return publish_local(Path(export_dir), Path(target))


@task(name="publish-s3", **_RETRY)
def publish_release_s3(export_dir: str, target: S3PublishParams, receipt: bytes, receipt_name: str) -> S3PublishResult:
    return publish_s3(export_dir, s3_target(target), receipt=receipt, receipt_name=receipt_name)


@task(name="publish-hub", **_RETRY)
def publish_release_hub(export_dir: str, repo_prefix: str, private: bool) -> dict[str, str]:
    from vaeft.publish.hub import publish_hub

    return publish_hub(export_dir, repo_prefix, private)
