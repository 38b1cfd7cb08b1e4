"""Global de-duplication of curation records: exact copies (sha256) and near copies (pHash).

The best copy of each image wins: the most pixels first (a thumbnail never wins over its
original), then the first in merge order (sources as listed, then shards and items in order),
which depends on the inputs only, never on which worker made a record. A copy of an image that
was itself dropped as a near copy gets the same verdict. ``duplicate_of`` names the closest kept
image; among equally close ones, the one :class:`~vaeft.data.phash.NearDuplicateIndex` finds
first (lowest matching band, then earliest kept).

Two stores give the same verdicts. While the records fit ``memory_budget`` they are held in
memory (about :data:`MEMORY_PER_RECORD` bytes each, measured by bench/dedup_scale.py); past it
they go to an SQLite file beside the work directory, whose page cache is the only memory that
grows (bounded by the same budget): the priority order comes from an index (SQLite sorts
externally, in runs on disk), exact copies from a sha256 table, near copies from a band index
on disk. That index splits the 64 bits into ``d + 2`` blocks and keys one table on every pair of
them: two hashes at most ``d`` bits apart differ in at most ``d`` blocks, so they agree on at
least one pair, and a pair key (~21 bits at d = 4) leaves few candidates to compare even among
1e8 hashes, where the in-memory single-band buckets (~13 bits) would hold ~12k each.
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vaeft.data.phash import NearDuplicateIndex, bit_blocks

# Bytes of memory per record held in memory (a parsed JSON record of ~60-character locations
# plus its place in the priority list and index), measured by bench/dedup_scale.py.
MEMORY_PER_RECORD = 1400
_OFFSET = 1 << 63  # pHashes are unsigned 64-bit; SQLite integers are signed
_EXACT, _NEAR = 1, 2
_BATCH = 4096  # records per SQLite insert while spilling


def _verdict(kind: int, of: str, dist: int | None) -> dict[str, Any]:
    if kind == _EXACT:
        return {"reason": "exact_duplicate", "duplicate_of": of}
    return {"reason": "near_duplicate", "duplicate_of": of, "distance": dist}


class Deduplicator:
    """Feed records in merge order with :meth:`add`, then read (record, verdict or None if
    kept) back in the same order from :meth:`results`. Records need ``sha256``, ``phash``,
    ``width``, ``height`` and ``location``; everything else is carried through."""

    def __init__(self, max_distance: int, memory_budget: int, spill_dir: str | Path) -> None:
        self.max_distance = max_distance
        self.memory_budget = memory_budget
        self.spill_dir = Path(spill_dir)
        self._mem: list[dict[str, Any]] | None = []
        self._db: sqlite3.Connection | None = None
        self._path: Path | None = None
        self._n = 0
        self._pending: list[dict[str, Any]] = []

    @property
    def on_disk(self) -> bool:
        return self._db is not None

    def add(self, rec: dict[str, Any]) -> None:
        if self._mem is not None:
            self._mem.append(rec)
            if len(self._mem) * MEMORY_PER_RECORD > self.memory_budget:
                self._spill()
        else:
            self._pending.append(rec)
            if len(self._pending) >= _BATCH:
                self._flush()
        self._n += 1

    # -------------------------------------------------------------------------- in memory

    def _memory_results(self, records: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any] | None]]:
        by_sha: dict[str, str] = {}
        dropped_sha: dict[str, dict[str, Any]] = {}
        near = NearDuplicateIndex(self.max_distance)
        verdicts: list[dict[str, Any] | None] = [None] * len(records)
        for pos in sorted(range(len(records)), key=lambda i: (-records[i]["width"] * records[i]["height"], i)):
            rec = records[pos]
            if rec["sha256"] in by_sha:
                verdicts[pos] = {"reason": "exact_duplicate", "duplicate_of": by_sha[rec["sha256"]]}
            elif rec["sha256"] in dropped_sha:
                verdicts[pos] = dropped_sha[rec["sha256"]]
            elif (hit := near.find(rec["phash"])) is not None:
                verdicts[pos] = dropped_sha[rec["sha256"]] = _verdict(_NEAR, hit[0], hit[1])
            else:
                by_sha[rec["sha256"]] = rec["location"]
                near.add(rec["phash"], rec["location"])
        return zip(records, verdicts)

    # -------------------------------------------------------------------------- on disk

    def _spill(self) -> None:
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        # A fresh name per run: two runs may share a work directory.
        fd, name = tempfile.mkstemp(prefix="dedup-", suffix=".sqlite", dir=self.spill_dir)
        os.close(fd)
        self._path = Path(name)
        db = sqlite3.connect(self._path, isolation_level=None)
        db.execute("PRAGMA journal_mode=OFF")  # a scratch file: a crash rebuilds it
        db.execute("PRAGMA synchronous=OFF")
        db.execute(f"PRAGMA cache_size=-{max(self.memory_budget // 1024, 2048)}")  # KiB
        db.execute("BEGIN")
        db.execute("CREATE TABLE rec(pos INTEGER PRIMARY KEY, pix INTEGER, sha BLOB, ph INTEGER, loc TEXT, body TEXT)")
        self._db = db
        self._pending, self._mem = self._mem or [], None
        self._flush(first_pos=0)

    def _flush(self, first_pos: int | None = None) -> None:
        assert self._db is not None
        recs, self._pending = self._pending, []
        start = self._n + 1 - len(recs) if first_pos is None else first_pos
        self._db.executemany(
            "INSERT INTO rec VALUES (?, ?, ?, ?, ?, ?)",
            ((start + i, r["width"] * r["height"], bytes.fromhex(r["sha256"]), int(r["phash"], 16) - _OFFSET,
              r["location"], json.dumps(r, sort_keys=True)) for i, r in enumerate(recs)),
        )

    def _disk_verdicts(self) -> None:
        db = self._db
        assert db is not None
        if self._pending:
            self._flush(first_pos=self._n - len(self._pending))
        # Exact copies first, in one statement: each sha256's best copy (most pixels, then merge
        # order) represents it; only representatives go through the near-copy search.
        db.execute("CREATE TABLE grp AS SELECT pos, pix, ph, "
                   "FIRST_VALUE(pos) OVER (PARTITION BY sha ORDER BY pix DESC, pos) AS rep FROM rec")
        db.execute("CREATE TABLE reps AS SELECT pos, ph FROM grp WHERE pos = rep ORDER BY pix DESC, pos")
        db.execute("CREATE TABLE near(tbl INTEGER, key INTEGER, rank INTEGER, ph INTEGER, pos INTEGER, "
                   "PRIMARY KEY (tbl, key, rank)) WITHOUT ROWID")
        db.execute("CREATE TABLE verdict(pos INTEGER PRIMARY KEY, kind INTEGER, of INTEGER, dist INTEGER)")
        db.execute("CREATE TEMP TABLE probe(i INTEGER, tbl INTEGER, key INTEGER)")
        d = self.max_distance
        blocks = bit_blocks(d + 2)
        pairs = list(itertools.combinations(range(len(blocks)), 2)) if d >= 0 else []
        bands = bit_blocks(d + 1)  # NearDuplicateIndex's bands: its tie-break among equally close copies

        def block(v: int, b: tuple[int, int]) -> int:
            return (v >> b[0]) & ((1 << (b[1] - b[0])) - 1)

        def keys(v: int) -> list[tuple[int, int]]:
            vals = [block(v, b) for b in blocks]
            return [(t, ((vals[i] << 32) | vals[j]) - _OFFSET) for t, (i, j) in enumerate(pairs)]

        rank = 0
        scan = db.execute("SELECT pos, ph FROM reps ORDER BY rowid")  # rowid order: priority order
        while batch := scan.fetchmany(_BATCH):
            # A record's verdict depends on every record kept before it: those of earlier batches
            # come from the on-disk index in one join, this batch's from a small dict.
            values = [ph + _OFFSET for _, ph in batch]
            all_keys = [keys(v) for v in values] if pairs else [[] for _ in values]
            found: dict[int, list[tuple[int, int, int]]] = {}
            if pairs:
                db.execute("DELETE FROM probe")
                db.executemany("INSERT INTO probe VALUES (?, ?, ?)",
                               ((i, t, key) for i, ks in enumerate(all_keys) for t, key in ks))
                for i, other_rank, other_ph, other_pos in db.execute(
                        "SELECT p.i, n.rank, n.ph, n.pos FROM probe p JOIN near n ON n.tbl = p.tbl AND n.key = p.key"):
                    found.setdefault(i, []).append((other_rank, other_ph + _OFFSET, other_pos))
            local: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
            near_rows, verdict_rows = [], []
            for i, ((pos, ph), value, ks) in enumerate(zip(batch, values, all_keys)):
                cands = found.get(i, []) + [c for k in ks for c in local.get(k, ())]
                best = None
                for other_rank, other, other_pos in cands:
                    dist = (value ^ other).bit_count()
                    if dist <= d:
                        band = next(j for j, b in enumerate(bands) if block(value, b) == block(other, b))
                        cand = (dist, band, other_rank, other_pos)
                        if best is None or cand < best:
                            best = cand
                if best is not None:
                    verdict_rows.append((pos, _NEAR, best[3], best[0]))
                    continue
                for k in ks:
                    local.setdefault(k, []).append((rank, value, pos))
                    near_rows.append((k[0], k[1], rank, ph, pos))
                rank += 1
            db.executemany("INSERT INTO near VALUES (?, ?, ?, ?, ?)", near_rows)
            db.executemany("INSERT INTO verdict VALUES (?, ?, ?, ?)", verdict_rows)
        # Every other copy of a sha256: an exact duplicate of its representative when that was
        # kept, else the representative's own near-duplicate verdict.
        db.execute(f"INSERT INTO verdict SELECT g.pos, COALESCE(v.kind, {_EXACT}), COALESCE(v.of, g.rep), v.dist "
                   "FROM grp g LEFT JOIN verdict v ON v.pos = g.rep WHERE g.pos != g.rep")

    def results(self) -> Iterator[tuple[dict[str, Any], dict[str, Any] | None]]:
        """(record, verdict) in merge order; verdict None: kept, else reason, duplicate_of (and distance)."""
        if self._mem is not None:
            yield from self._memory_results(self._mem)
            return
        self._disk_verdicts()
        assert self._db is not None
        rows = self._db.execute(
            "SELECT r.body, v.kind, k.loc, v.dist FROM rec r LEFT JOIN verdict v ON v.pos = r.pos "
            "LEFT JOIN rec k ON k.pos = v.of ORDER BY r.pos"
        )
        for body, kind, of, dist in rows:
            yield json.loads(body), (None if kind is None else _verdict(kind, of, dist))

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._path is not None:
            self._path.unlink(missing_ok=True)

    def __enter__(self) -> Deduplicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
