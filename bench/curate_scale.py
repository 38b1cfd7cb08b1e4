"""Curation at scale: N small distinct synthetic JPEGs (64x64, in webdataset tars of --per-tar),
curated end to end by `vaeft.data.curate.curate` on each engine: the local process pool and a
Dask local cluster with the same number of worker processes. Prints images/s of each and a
digest of each manifest and report (they must be identical).

    PYTHONPATH=. python bench/curate_scale.py [--n 100000] [--workers 2] [--engines local,dask]

An engine may be listed more than once (local,dask,local,dask): each run starts from an empty
work directory, so alternating runs shows how much of a difference is the machine's load.

The end-to-end time includes listing, the per-image work (1/8-scale JPEG decode, sha256, pHash,
the original bytes committed to the work dir), the merge (de-duplication, mixing, split) and the
output (tar shards, manifest, report). Engine "local1" is the local engine in one process, for a
per-core baseline. Each row also gives the CPU seconds of the client process and of all worker
processes (their rusage, reaped when the pool or cluster closes), so a difference in wall time can
be told apart from a difference in work.

    --fixed-cost ROUNDS   what each engine costs before and after the work: pool or cluster up,
                          one trivial task through it, closed (alternating)
    --task-probe ROUNDS   one shard's CPU in a pool process vs in a Dask worker (alternating)
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import resource
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT  # noqa: F401 - puts this checkout first on sys.path
from PIL import Image

from vaeft.config import DataParams, SourceParams
from vaeft.console import console
from vaeft.data.curate import REPORT_FILE, curate
from vaeft.data.manifest import MANIFEST_FILE


def make_tars(root: Path, n: int, per_tar: int) -> float:
    """Deterministic distinct 64x64 JPEGs (upscaled 8x8 noise) in tars; returns the seconds taken."""
    t0 = time.perf_counter()
    root.mkdir(parents=True)
    for start in range(0, n, per_tar):
        with tarfile.open(root / f"{start // per_tar:05d}.tar", "w") as tf:
            for i in range(start, min(n, start + per_tar)):
                noise = np.random.default_rng(i).integers(0, 255, (8, 8, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(noise).resize((64, 64), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=90)
                info = tarfile.TarInfo(f"{i:09d}.jpg")
                info.size = buf.tell()
                buf.seek(0)
                tf.addfile(info, buf)
    return time.perf_counter() - t0


def timed_shard(shard, cfg) -> tuple[float, float, float]:
    """(wall, process CPU, this thread's CPU) seconds of one shard's work, measured where it runs."""
    from vaeft.data.curate import process_shard

    t, c, th = time.perf_counter(), time.process_time(), time.thread_time()
    process_shard(shard, cfg)
    return time.perf_counter() - t, time.process_time() - c, time.thread_time() - th


def task_probe(root: Path, rounds: int) -> None:
    """The same shards back to back in one spawned pool process and in one Dask worker process,
    alternating, so the machine's load moves under both alike."""
    import logging
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from distributed import Client, LocalCluster

    from vaeft.data.curate import WorkConfig
    from vaeft.data.images import ImageLimits
    from vaeft.data.sources import ReadLimits, iter_shards

    shards = list(iter_shards(SourceParams(name="s", kind="tar", path=str(root / "tars")), 256))

    def cfg(tag: str) -> WorkConfig:
        return WorkConfig(ImageLimits(64, 4.0, 89_478_485), ReadLimits(1 << 28, 10.0, 2), None, None, None,
                          str(root / f"probe-{tag}"))

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool, \
            LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                         silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        pool.submit(timed_shard, shards[0], cfg("warm-pool")).result()  # imports, first-call costs
        client.submit(timed_shard, shards[0], cfg("warm-dask"), pure=False).result()
        for i in range(rounds):
            shard = shards[1 + i % (len(shards) - 1)]
            p = pool.submit(timed_shard, shard, cfg(f"pool{i}")).result()
            d = client.submit(timed_shard, shard, cfg(f"dask{i}"), pure=False).result()
            print(f"shard {shard.index}: pool wall {p[0]:.2f} s cpu {p[1]:.2f} (task thread {p[2]:.2f})   "
                  f"dask wall {d[0]:.2f} s cpu {d[1]:.2f} (task thread {d[2]:.2f})", flush=True)


def _noop() -> None:
    return None


def fixed_cost(root: Path, workers: int, rounds: int) -> None:
    """Seconds from nothing to a first result and back to nothing, per engine: what a run pays
    whatever its size (the pool's processes start lazily, so its first task waits for them)."""
    from vaeft.data.cluster import open_pool

    for i in range(rounds):
        line = []
        for engine in ("local", "dask"):
            t0 = time.perf_counter()
            pool = open_pool(engine, None, workers, root / "probe")
            assert pool is not None
            t1 = time.perf_counter()
            pool.wait_first([pool.submit(_noop, key=f"noop-{i}")])
            t2 = time.perf_counter()
            pool.close(cancel=False)
            t3 = time.perf_counter()
            line.append(f"{engine} open {t1 - t0:4.2f} + first task {t2 - t1:4.2f} + close {t3 - t2:4.2f} "
                        f"= {t3 - t0:5.2f} s")
        print(f"round {i + 1}: " + "   ".join(line), flush=True)


def _cpu() -> tuple[float, float]:
    """CPU seconds (user + system) of this process and of its reaped descendants: the pool's
    processes, or a local cluster's nannies and their workers, all waited for once closed."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--per-tar", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--engines", default="local,dask")
    ap.add_argument("--tmp", help="scratch folder (default: a fresh one in the temp dir, removed)")
    ap.add_argument("--fixed-cost", type=int, default=0, metavar="ROUNDS",
                    help="instead: time pool/cluster start + one trivial task + close per engine, ROUNDS times")
    ap.add_argument("--task-probe", type=int, default=0, metavar="ROUNDS",
                    help="instead: time single shards in a pool process vs a Dask worker, ROUNDS times")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="curate-scale-", dir=args.tmp) as tmp:
        root = Path(tmp)
        gen = make_tars(root / "tars", args.n, args.per_tar)
        print(f"machine: {os.cpu_count()} cores, load avg (1/5/15 min) {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(f"{args.n} JPEGs 64x64 in {-(-args.n // args.per_tar)} tars, made in {gen:.1f} s")
        if args.fixed_cost:
            fixed_cost(root, args.workers, args.fixed_cost)
            return
        if args.task_probe:
            task_probe(root, args.task_probe)
            return
        rows = []
        for k, engine in enumerate(args.engines.split(",")):
            workers = 1 if engine == "local1" else args.workers
            params = DataParams(sources=[SourceParams(name="synthetic", kind="tar", path=str(root / "tars"))],
                                min_side=64, eval_fraction=0.05, workers=workers,
                                engine="dask" if engine == "dask" else "local", work_dir=str(root / f"work-{k}"))
            out = root / f"out-{k}"
            with console.capture():  # the progress bar and summary would swamp the table
                c0 = _cpu()
                t0 = time.perf_counter()
                res = curate(params, out)
                wall = time.perf_counter() - t0
                cpu_self, cpu_children = (b - a for a, b in zip(c0, _cpu(), strict=True))
            rows.append((engine, workers, wall, res, digest(out / MANIFEST_FILE), digest(out / REPORT_FILE)))
            shutil.rmtree(root / f"work-{k}")  # the next run's scratch space; outputs are hashed already
            print(f"{engine:6s} {workers} worker(s): {wall:7.1f} s  {args.n / wall:7.1f} images/s  "
                  f"({args.n / wall / workers:6.1f} per worker)  kept {res.n_train + res.n_eval}, "
                  f"duplicates {res.n_duplicates}; cpu {cpu_self + cpu_children:6.1f} s (client {cpu_self:5.1f}, "
                  f"workers {cpu_children:6.1f}); manifest {rows[-1][4]}  report {rows[-1][5]}", flush=True)
        same = len({(r[4], r[5]) for r in rows}) == 1
        print(f"manifests and reports identical across engines: {'yes' if same else 'NO'}")
        if len(rows) > 1:
            print("ratio (wall time) " + ", ".join(f"{r[0]}/{rows[0][0]} {r[2] / rows[0][2]:.2f}" for r in rows[1:]))


if __name__ == "__main__":
    main()
