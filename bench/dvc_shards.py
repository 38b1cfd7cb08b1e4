"""DVC push + pull of the same images as tar shards vs one file per image, to S3 on loopback.

    PYTHONPATH=. python bench/dvc_shards.py [--images 3000] [--per-shard 1000]

An S3 endpoint (moto's server on 127.0.0.1) and a scratch git + DVC repo with two tracked
folders holding the same small JPEGs: ``files/`` one file per image (the old curated layout) and
``sharded/`` tar shards + manifest (curation's layout now). Times ``dvc push`` and, after
emptying the DVC cache and deleting the folder, ``dvc pull``. Loopback hides network latency,
which is what per-file requests cost most against real S3: read the ratio as a lower bound.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from vaeft.data.manifest import ManifestRow, write_manifest
from vaeft.data.shards import Member, ShardWriter


def dvc(repo: Path, *args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, check=True, capture_output=True, text=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--per-shard", type=int, default=1000)
    args = ap.parse_args()
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            repo = Path(tmp) / "repo"
            (repo / "files").mkdir(parents=True)
            subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
            dvc(repo, "init", "-q")
            dvc(repo, "remote", "add", "-d", "s3", "s3://bench/cache")
            dvc(repo, "remote", "modify", "s3", "endpointurl", endpoint)
            rng = np.random.default_rng(0)
            writer = ShardWriter(repo / "sharded", "train", 1 << 30, args.per_shard)
            rows, total = [], 0
            for i in range(args.images):
                arr = np.asarray(Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).resize((96, 80)))
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="JPEG", quality=90)
                key = f"{i:064x}"
                f = repo / "files" / f"{key}.jpg"
                f.write_bytes(buf.getvalue())
                total += len(buf.getvalue())
                p = writer.add(Member(key, "jpg", f))
                rows.append(ManifestRow(f"bench:{i}", key, 96, 80, "bench", "train", "0" * 16, p.shard, p.member,
                                        p.offset, p.size, "jpeg"))
            shards = writer.close()
            write_manifest(repo / "sharded" / "manifest.parquet", rows)
            print(f"{args.images} JPEGs of 96x80 ({total / args.images / 1e3:.1f} KB avg, {total / 1e6:.1f} MB): "
                  f"files/ = {args.images} files, sharded/ = {len(shards)} shards + manifest")
            times = {}
            for name in ("files", "sharded"):
                t_add = dvc(repo, "add", name)
                t_push = dvc(repo, "push", f"{name}.dvc")
                shutil.rmtree(repo / ".dvc" / "cache")
                shutil.rmtree(repo / name)
                t_pull = dvc(repo, "pull", f"{name}.dvc")
                times[name] = (t_add, t_push, t_pull)
                print(f"{name:<8} dvc add {t_add:7.1f} s   push {t_push:7.1f} s   pull {t_pull:7.1f} s")
            f, s = times["files"], times["sharded"]
            print(f"ratio file-per-image / sharded: push {f[1] / s[1]:.1f}x   pull {f[2] / s[2]:.1f}x   "
                  f"push+pull {(f[1] + f[2]) / (s[1] + s[2]):.1f}x")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
