"""De-duplication at scale: N synthetic curation records through the in-memory path and the
on-disk (SQLite) path of vaeft.data.dedup.Deduplicator. Prints time, records/s and peak RSS
growth of each (each side in its own forked child), the bytes per record, and whether both
reached the same verdicts (a digest of every verdict, in merge order).

    PYTHONPATH=. python bench/dedup_scale.py [--n 1000000] [--sides memory,disk]

Records are made on the fly, never held by the bench: ~5% exact copies (same sha256) and ~5%
near copies (the pHash of an earlier record with 1-4 bits flipped), locations of ~40 characters.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import tempfile
import time
from collections.abc import Iterator

from common import forked_peak_rss_mib

from vaeft.data.dedup import MEMORY_PER_RECORD, Deduplicator


def records(n: int, seed: int = 0) -> Iterator[dict]:
    rng = random.Random(seed)
    recent: list[tuple[str, int]] = []  # a window of earlier records to copy from
    for i in range(n):
        roll = rng.random()
        if recent and roll < 0.05:
            sha, ph = rng.choice(recent)
        elif recent and roll < 0.10:
            sha, ph = hashlib.sha256(b"near%d" % i).hexdigest(), rng.choice(recent)[1]
            for _ in range(rng.randrange(1, 5)):
                ph ^= 1 << rng.randrange(64)
        else:
            sha, ph = hashlib.sha256(b"%d" % i).hexdigest(), rng.getrandbits(64)
        if len(recent) < 4096:
            recent.append((sha, ph))
        else:
            recent[rng.randrange(4096)] = (sha, ph)
        side = rng.choice((512, 768, 1024))
        yield {"location": f"/data/laion/{i // 10000:05d}.tar::{i:09d}.jpg", "reason": "", "sha256": sha,
               "width": side, "height": 512, "phash": f"{ph:016x}", "source": "laion"}


def run(n: int, budget: int, out: dict) -> None:
    digest = hashlib.sha256()
    kept = 0
    with tempfile.TemporaryDirectory(prefix="dedup-bench-") as tmp, Deduplicator(4, budget, tmp) as dd:
        t0 = time.perf_counter()
        for rec in records(n):
            dd.add(rec)
        t1 = time.perf_counter()
        for rec, verdict in dd.results():
            kept += verdict is None
            digest.update(repr((rec["location"], verdict)).encode())
        t2 = time.perf_counter()
        disk = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
    out.update(add=t1 - t0, verdicts=t2 - t1, kept=kept, digest=digest.hexdigest()[:16], on_disk=dd.on_disk,
               disk=disk)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--sides", default="memory,disk")
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} cores, load avg (1/5/15 min) {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{args.n} records, phash_distance 4; in-memory estimate MEMORY_PER_RECORD = {MEMORY_PER_RECORD} B")
    for side in args.sides.split(","):
        budget = 1 << 62 if side == "memory" else 64 << 20
        r, w = os.pipe()

        def work(_: object, budget: int = budget, w: int = w) -> None:
            res: dict = {}
            run(args.n, budget, res)
            os.write(w, json.dumps(res).encode())

        peak = forked_peak_rss_mib(lambda: None, work)
        os.close(w)
        res = json.loads(os.read(r, 65536).decode())
        os.close(r)
        total = res["add"] + res["verdicts"]
        print(f"{side:6s} (budget {'none' if side == 'memory' else '64 MiB'}): add {res['add']:.1f} s + verdicts "
              f"{res['verdicts']:.1f} s = {total:.1f} s ({args.n / total:,.0f} records/s); peak RSS growth "
              f"{peak:.0f} MiB = {peak * 2**20 / args.n:.0f} B/record; disk {res['disk'] / 2**20:.0f} MiB = "
              f"{res['disk'] / args.n:.0f} B/record; kept {res['kept']}; verdicts digest {res['digest']}")


if __name__ == "__main__":
    main()
