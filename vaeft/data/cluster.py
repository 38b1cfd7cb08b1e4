"""Where curation's work shards run: a local process pool, or a dask.distributed cluster.

Both run :func:`vaeft.data.curate.process_shard`, which commits its records (and normalised
images) into the work directory itself; the client only learns that a shard is done. So a
killed run resumes on either engine, a worker that dies mid-shard leaves nothing half-written
(dask reschedules its task), and no records travel through the scheduler. The price: every
worker must see the work directory and the local sources at the same paths as the client
(shared storage such as NFS or a ReadWriteMany volume; S3 and URL sources need nothing shared).
:class:`DaskPool` checks that before the first task, instead of failing shard by shard.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Protocol

from vaeft.errors import VaeftError


class ClusterError(VaeftError):
    pass


class ShardPool(Protocol):
    slots: int  # most tasks in flight at once: shards are never queued without limit

    def submit(self, fn: Callable[..., Any], *args: Any, key: str) -> Any: ...

    def wait_first(self, futures: Iterable[Any]) -> set[Any]: ...

    def close(self, cancel: bool) -> None: ...


class ProcessPool:
    def __init__(self, n_workers: int) -> None:
        # spawn: the parent may hold threads (progress bar, S3/HTTP clients); fork would copy their locks.
        self._ex = ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context("spawn"))
        self.slots = 2 * n_workers

    def submit(self, fn: Callable[..., Any], *args: Any, key: str) -> Any:
        return self._ex.submit(fn, *args)

    def wait_first(self, futures: Iterable[Any]) -> set[Any]:
        done, _ = wait(list(futures), return_when=FIRST_COMPLETED)
        return set(done)

    def close(self, cancel: bool) -> None:
        self._ex.shutdown(wait=True, cancel_futures=cancel)


def _probe(marker: str) -> bool:
    # Runs on every worker; importing it there also proves the worker has vaeft installed.
    return os.path.exists(marker)


class DaskPool:
    """Tasks on a dask.distributed cluster: ``address`` of a running scheduler, or None for a
    local cluster of ``n_workers`` processes with one thread each (decoding and pHash hold the
    GIL for much of their time, so threads in one process would mostly wait for each other)."""

    def __init__(self, address: str | None, n_workers: int, work_dir: Path) -> None:
        import dask
        from distributed import Client, LocalCluster

        self._cluster = None
        self._scratch: str | None = None
        try:
            if address:
                self._client = Client(address, timeout="30s")
            else:
                # Workers' spill space, gone with the cluster (dask's default is a shared folder in /tmp).
                self._scratch = tempfile.mkdtemp(prefix="vaeft-dask-")
                # temporary-directory too: the nannies' lock files otherwise land in the temp dir.
                # ":0": its HTTP endpoint on a free port, quietly (8787 may belong to another cluster).
                with dask.config.set({"temporary-directory": self._scratch}):
                    self._cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                                 dashboard_address=":0", silence_logs=logging.ERROR,
                                                 local_directory=self._scratch)
                self._client = Client(self._cluster)
        except (OSError, TimeoutError) as exc:
            raise ClusterError(f"cannot reach the Dask scheduler at {address}: {exc}") from None
        try:
            threads = sum(self._client.nthreads().values())
            if threads == 0:
                self._client.wait_for_workers(1, timeout=60)
                threads = sum(self._client.nthreads().values())
            self.slots = 2 * max(threads, 1)
            self._check_workers(work_dir, address)
        except BaseException:
            self.close(cancel=True)
            raise

    def _check_workers(self, work_dir: Path, address: str | None) -> None:
        marker = work_dir / f".probe-{uuid.uuid4().hex}"
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        try:
            seen = self._client.run(_probe, str(marker.resolve()))
        except (ImportError, TimeoutError, OSError) as exc:
            raise ClusterError(f"Dask workers at {address} cannot run vaeft ({type(exc).__name__}: {exc}); "
                               "install this vaeft version in the workers' image") from None
        finally:
            marker.unlink(missing_ok=True)
        blind = sorted(w for w, ok in seen.items() if not ok)
        if blind:
            raise ClusterError(
                f"Dask workers {', '.join(blind)} do not see the work directory {work_dir.resolve()}: "
                "put data.work_dir (and local sources) on storage shared with the workers, at the same path"
            )

    def submit(self, fn: Callable[..., Any], *args: Any, key: str) -> Any:
        return self._client.submit(fn, *args, key=key, pure=False)

    def wait_first(self, futures: Iterable[Any]) -> set[Any]:
        from distributed import wait as dask_wait

        return set(dask_wait(list(futures), return_when="FIRST_COMPLETED").done)

    def close(self, cancel: bool) -> None:
        try:
            if hasattr(self, "_client"):
                self._client.close()
        finally:
            if self._cluster is not None:
                self._cluster.close()
            if self._scratch is not None:
                shutil.rmtree(self._scratch, ignore_errors=True)


def open_pool(engine: str, address: str | None, n_workers: int, work_dir: Path) -> ShardPool | None:
    """The pool for ``engine``; None means run in this process (local engine, one worker)."""
    if engine == "dask":
        return DaskPool(address, n_workers, work_dir)
    return ProcessPool(n_workers) if n_workers > 1 else None
