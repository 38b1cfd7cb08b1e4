"""The ``curate`` stage: sources -> validated, normalised, de-duplicated, mixed, split image store.

Output directory layout::

    OUT/manifest.parquet          one row per kept image, and where its bytes are (data/manifest.py)
    OUT/shards/<split>-NNNNNN.tar the images (data/shards.py): valid sRGB JPEGs as they came, the
                                  rest normalised to 8-bit sRGB PNG; WebDataset-compatible
    OUT/curation_report.json      counts per source and reason, every rejected/dropped file
    OUT/run_info.json             resolved params and versions (when/where/commit: provenance.record_run)

Work happens in two phases. Shards (a tar file, or a chunk of files / table rows / S3 keys)
are processed in a process pool or as Dask tasks (data/cluster.py); each writes its per-item
results and the bytes to store (the original JPEG, or a normalised PNG) into a work directory
outside OUT, committed atomically, so an interrupted run resumes where it stopped, on either
engine. The merge then reads those small records in a fixed order (source, shard, item) and
de-duplicates (data/dedup.py: in memory up to data.dedup_memory_mb, then on disk), mixes and
splits; nothing decoded is held, so memory grows only with the records, never with pixels. Last,
the kept images are streamed from the work directory into OUT's tar shards, split by split, in
manifest order.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vaeft import atomic, provenance
from vaeft.config import DataParams, SourceParams
from vaeft.console import banner, console, progress
from vaeft.data.cluster import ClusterError, open_pool
from vaeft.data.dedup import Deduplicator
from vaeft.data.images import ImageLimits, ImageRejected, prepare_for_store
from vaeft.data.manifest import MANIFEST_FILE, ManifestRow, write_manifest
from vaeft.data.phash import phash
from vaeft.data.shards import Member, ShardWriter, sidecar_json
from vaeft.data.sources import Item, ReadLimits, Shard, SourceError, iter_items, iter_shards
from vaeft.errors import VaeftError

REPORT_FILE = "curation_report.json"
# Bump when per-item processing changes, so stale partial results are not reused.
_WORK_VERSION = 5  # 2: PNGs no longer embed an ICC profile; 3: safe names, symlink and tar-header reports;
# 4: valid JPEGs kept as they are (pHash from a 1/8-scale decode), records carry ext/meta/caption;
# 5: webdataset and img2dataset captions in the records


class CurationError(VaeftError):
    pass


@dataclass(frozen=True)
class CurateResult:
    out_dir: Path
    n_train: int
    n_eval: int
    n_rejected: int
    n_duplicates: int
    n_subsampled: int = 0
    shards_done: int = 0  # processed by this run
    shards_reused: int = 0  # finished by an earlier (interrupted) run

    @property
    def manifest(self) -> Path:
        return self.out_dir / MANIFEST_FILE


def _split_key(sha256: str) -> tuple[int, str]:
    return int(sha256[:16], 16), sha256


def assign_splits(sha256s: list[str], eval_fraction: float) -> list[str]:
    """Per image, "eval" or "train": the round(fraction x n) images with the smallest content-hash
    keys are held out (at least one of each split once there are two images).

    Exact in count, and nearly as stable as a per-image threshold: adding m images to a corpus
    moves at most m of its images across the split (those pushed past the boundary), never
    reshuffles it, and the same images always give the same split, in any order.
    """
    n = len(sha256s)
    k = int(eval_fraction * n + 0.5)
    if n >= 2:
        k = min(max(k, 1), n - 1)
    held_out = set(sorted(sha256s, key=_split_key)[:k])
    return ["eval" if sha in held_out else "train" for sha in sha256s]


def _mix_key(sha256: str) -> str:
    # Independent of the split's key: subsampling by the sha itself would skew the split.
    return hashlib.sha256(f"mix:{sha256}".encode()).hexdigest()


def source_files(source: SourceParams) -> list[tuple[str, Path]]:
    """(location as given, path) of every candidate file of a folder or embedded source."""
    from vaeft.data.sources import _folder_files

    try:
        return _folder_files(source)
    except SourceError as exc:
        raise CurationError(str(exc)) from None


# ------------------------------------------------------------------------------ per shard


@dataclass(frozen=True)
class WorkConfig:
    image: ImageLimits
    read: ReadLimits
    min_aesthetic: float | None
    max_pwatermark: float | None
    max_punsafe: float | None
    work: str

    def meta_rejection(self, meta: dict[str, float]) -> tuple[str, str] | None:
        """LAION metadata filters, checked before anything is downloaded or decoded."""
        a, w, u = meta.get("aesthetic"), meta.get("pwatermark"), meta.get("punsafe")
        if self.min_aesthetic is not None and a is not None and a < self.min_aesthetic:
            return "low_aesthetic", f"aesthetic {a:g} < {self.min_aesthetic:g}"
        if self.max_pwatermark is not None and w is not None and w > self.max_pwatermark:
            return "watermark", f"pwatermark {w:g} > {self.max_pwatermark:g}"
        if self.max_punsafe is not None and u is not None and u > self.max_punsafe:
            return "unsafe", f"punsafe {u:g} > {self.max_punsafe:g}"
        width, height = meta.get("width"), meta.get("height")
        if width and height and width > 0 and height > 0:
            if min(width, height) < self.image.min_side:
                return "too_small", f"{width:g}x{height:g} in metadata, min side {self.image.min_side}"
            if max(width, height) / min(width, height) > self.image.max_aspect:
                return "extreme_aspect", f"{width:g}x{height:g} in metadata"
        return None


def _result_path(work: str | Path, shard: Shard) -> Path:
    return Path(work) / "shards" / shard.source / f"{shard.key}.jsonl"


def _stored_file(work: str | Path, sha: str, ext: str) -> Path:
    return Path(work) / "images" / sha[:2] / f"{sha}.{ext}"


def _rejected(item: Item, reason: str, detail: str) -> dict[str, Any]:
    return {"location": item.location, "reason": reason, "detail": detail}


def process_item(item: Item, cfg: WorkConfig) -> dict[str, Any]:
    """One candidate -> a small record: kept (sha256, size, phash) or rejected (reason)."""
    if item.data is None:
        return _rejected(item, item.reason, item.detail)
    why = cfg.meta_rejection(item.meta)  # tar sidecars: known only once the sample is read
    if why:
        return _rejected(item, *why)
    sha = hashlib.sha256(item.data).hexdigest()
    try:
        prep = prepare_for_store(item.data, cfg.image)
    except ImageRejected as exc:
        return _rejected(item, exc.reason, exc.detail)
    try:
        ph = phash(prep.image)
        target = _stored_file(cfg.work, sha, prep.ext)
        if not target.exists():
            atomic.write_bytes(target, item.data if prep.data is None else prep.data)
        return {"location": item.location, "reason": "", "sha256": sha, "width": prep.width,
                "height": prep.height, "phash": ph, "ext": prep.ext, "meta": item.meta,
                "caption": item.caption or ""}
    finally:
        prep.image.close()


def process_shard(shard: Shard, cfg: WorkConfig) -> tuple[str, int]:
    """Process every item of ``shard`` and commit its records atomically; returns (key, n)."""
    records = []
    for item in iter_items(shard, cfg.read, cfg.meta_rejection):
        try:
            records.append(process_item(item, cfg))
        except Exception as exc:  # noqa: BLE001 - a decoder bug on one file must not lose the whole run
            records.append(_rejected(item, "internal_error", f"{type(exc).__name__}: {exc}"))
        item.data = None  # drop the raw bytes before the next item is read
    atomic.write_text(_result_path(cfg.work, shard), "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    return shard.key, len(records)


# ------------------------------------------------------------------------------ scheduling


def _work_dir(params: DataParams) -> Path:
    """Partial results are only reusable under the same per-item rules: key the folder by them."""
    rules = params.model_dump(include={"min_side", "max_aspect", "max_pixels", "max_bytes", "min_aesthetic",
                                       "max_pwatermark", "max_punsafe"})
    key = hashlib.sha256(json.dumps([_WORK_VERSION, rules], sort_keys=True).encode()).hexdigest()[:16]
    return Path(params.work_dir) / key


def _all_shards(params: DataParams) -> Iterator[tuple[int, Shard]]:
    for i, source in enumerate(params.sources):
        try:
            for shard in iter_shards(source, params.shard_size):
                yield i, shard
        except SourceError as exc:
            raise CurationError(str(exc)) from None


def _run_shards(params: DataParams, cfg: WorkConfig) -> tuple[list[tuple[int, Shard]], int, int]:
    """Process every shard not already done; returns (all shards in order, done, reused)."""
    n_workers = params.workers or os.cpu_count() or 1
    order: list[tuple[int, Shard]] = []
    done = reused = 0
    with progress() as bar:
        task = bar.add_task("curate", total=None, info="starting Dask" if params.engine == "dask" else "listing sources")
        try:
            pool = open_pool(params.engine, params.dask_address, n_workers, Path(cfg.work))
        except ClusterError as exc:
            raise CurationError(str(exc)) from None
        in_flight: dict[Any, Shard] = {}

        def collect() -> None:
            nonlocal done
            for fut in pool.wait_first(in_flight):
                shard = in_flight.pop(fut)
                _, n = fut.result()
                done += 1
                bar.update(task, advance=1, info=f"{shard.source} #{shard.index}: {n} files")

        finished = False
        try:
            for src_idx, shard in _all_shards(params):
                order.append((src_idx, shard))
                bar.update(task, total=len(order))
                if _result_path(cfg.work, shard).exists():
                    reused += 1
                    bar.update(task, advance=1, info=f"{shard.source} #{shard.index}: done earlier")
                    continue
                if pool is None:
                    _, n = process_shard(shard, cfg)
                    done += 1
                    bar.update(task, advance=1, info=f"{shard.source} #{shard.index}: {n} files")
                    continue
                while len(in_flight) >= pool.slots:
                    collect()
                key = f"curate-{shard.source}-{shard.index}-{shard.key}"
                in_flight[pool.submit(process_shard, shard, cfg, key=key)] = shard
            while in_flight:
                collect()
            finished = True
        finally:
            if pool is not None:
                pool.close(cancel=not finished)
    return order, done, reused


# ------------------------------------------------------------------------------ merge


def _read_records(work: Path, shard: Shard) -> list[dict[str, Any]]:
    with open(_result_path(work, shard), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def _mix_targets(available: dict[str, int], weights: dict[str, float]) -> dict[str, int]:
    """Largest per-source counts in the ratio of the weights that every source can supply.

    Sources that kept nothing are left out rather than forcing every other source to zero.
    """
    live = {s: n for s, n in available.items() if n > 0}
    if len(live) < 2:
        return dict(available)
    scale = min(n / weights[s] for s, n in live.items())
    return {s: (min(n, int(scale * weights[s] + 1e-9)) if s in live else 0) for s, n in available.items()}


def local_inputs(params: DataParams) -> list[str]:
    """The sources that live on this machine's disk (an output must stay clear of them)."""
    return [s.path for s in params.sources if s.path and s.kind != "s3"]


def curate(params: DataParams, out_dir: str | Path, *, force: bool = False) -> CurateResult:
    """Validate and normalise every image of every source, then write manifest and report.

    ``out_dir`` is checked first (:func:`vaeft.atomic.check_dir_target`): curation can take hours.
    """
    out_dir = Path(out_dir)
    atomic.check_dir_target(out_dir, "curated", force=force, inputs=local_inputs(params),
                            inside_inputs_ok=False)
    banner("curate", f"-> {out_dir}")
    work = _work_dir(params)
    cfg = WorkConfig(
        ImageLimits(params.min_side, params.max_aspect, params.max_pixels),
        ReadLimits(params.max_bytes, params.fetch_timeout, params.fetch_retries),
        params.min_aesthetic, params.max_pwatermark, params.max_punsafe, str(work),
    )
    order, n_done, n_reused = _run_shards(params, cfg)

    names = [s.name for s in params.sources]
    rejected: list[dict[str, str]] = []
    duplicates: list[dict[str, Any]] = []
    candidates: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    seen = Counter[str]()
    with Deduplicator(params.phash_distance, params.dedup_memory_mb * 2**20, work / "dedup") as dedup:
        for src_idx, shard in sorted(order, key=lambda t: (t[0], t[1].index)):
            name = names[src_idx]
            for rec in _read_records(work, shard):
                seen[name] += 1
                if rec["reason"]:
                    rejected.append({"location": rec["location"], "source": name, "reason": rec["reason"],
                                     "detail": rec["detail"]})
                else:
                    dedup.add({**rec, "source": name})
        for rec, verdict in dedup.results():  # merge order: the manifest keeps the sources' order
            if verdict is None:
                candidates[rec["source"]].append(rec)
            else:
                duplicates.append({"location": rec["location"], "source": rec["source"], **verdict})

    subsampled: list[dict[str, str]] = []
    if params.balance:
        targets = _mix_targets({n: len(c) for n, c in candidates.items()}, {s.name: s.weight for s in params.sources})
        for name, recs in candidates.items():
            ranked = sorted(recs, key=lambda r: _mix_key(r["sha256"]))
            candidates[name] = ranked[: targets[name]]
            subsampled += [{"location": r["location"], "source": name, "reason": "mix_subsampled"}
                           for r in ranked[targets[name]:]]

    final = [r for recs in candidates.values() for r in recs]
    for r, split in zip(final, assign_splits([r["sha256"] for r in final], params.eval_fraction), strict=True):
        r["split"] = split
    n_eval = sum(r["split"] == "eval" for r in final)
    n_train = len(final) - n_eval
    if not final:
        where = ", ".join(s.path or s.name for s in params.sources)
        if not rejected and not duplicates:
            raise CurationError(f"no images found in {where}")
        reasons = Counter(r["reason"] for r in rejected + duplicates)
        raise CurationError(f"no usable images in {where}: all {sum(reasons.values())} rejected ("
                            + ", ".join(f"{k} {v}" for k, v in reasons.most_common()) + ")")
    if n_train == 0 or n_eval == 0:
        raise CurationError(
            f"curation kept {n_train} train and {n_eval} eval images; need at least one of each "
            "(add images or change data.eval_fraction)"
        )
    with atomic.atomic_dir(out_dir, "curated", force=force, inputs=local_inputs(params),
                           inside_inputs_ok=False) as tmp:
        rows = _write_shards(tmp, work, final, params)
        write_manifest(tmp / MANIFEST_FILE, rows)
        reasons = Counter(r["reason"] for r in rejected + duplicates + subsampled)
        per_source = {
            n: {
                "weight": params.sources[i].weight,
                "seen": seen[n],
                "kept": sum(r.source == n for r in rows),
                "rejected": sum(r["source"] == n for r in rejected),
                "duplicates": sum(r["source"] == n for r in duplicates),
                "subsampled": sum(r["source"] == n for r in subsampled),
            }
            for i, n in enumerate(names)
        }
        atomic.write_json(
            tmp / REPORT_FILE,
            {
                "kept": len(rows),
                "train": n_train,
                "eval": n_eval,
                "rejected": len(rejected),
                "duplicates": len(duplicates),
                "subsampled": len(subsampled),
                "per_source": per_source,
                "per_reason": dict(sorted(reasons.items())),
                "rejected_files": sorted(rejected, key=lambda r: (r["location"], r["source"])),
                "duplicate_files": sorted(duplicates, key=lambda r: (r["location"], r["source"])),
                "subsampled_files": sorted(subsampled, key=lambda r: (r["location"], r["source"])),
            },
        )
        provenance.write_run_info(tmp, "curate", {"data": params})
    provenance.record_run(out_dir, "curate")
    console.print(
        f"curate: kept {len(rows)} ({n_train} train / {n_eval} eval), "
        f"rejected {len(rejected)} {dict(sorted(Counter(r['reason'] for r in rejected).items()))}, "
        f"duplicates {len(duplicates)}, subsampled {len(subsampled)}; "
        f"shards {n_done} processed, {n_reused} reused from {work}"
    )
    return CurateResult(out_dir, n_train, n_eval, len(rejected), len(duplicates), len(subsampled), n_done, n_reused)


def _write_shards(root: Path, work: Path, records: list[dict[str, Any]], params: DataParams) -> list[ManifestRow]:
    """Each split's images into its tar shards, in manifest order: the bytes depend on the kept set only."""
    rows: list[ManifestRow] = []
    with progress() as bar:
        task = bar.add_task("shards", total=len(records), info="")
        for split in ("train", "eval"):
            writer = ShardWriter(root, split, params.shard_max_bytes, params.shard_max_images)
            for r in sorted((r for r in records if r["split"] == split), key=lambda r: (r["source"], r["sha256"])):
                meta = {k: r["meta"][k] for k in sorted(r.get("meta") or {})}
                caption = r.get("caption", "")
                placed = writer.add(Member(r["sha256"], r["ext"], _stored_file(work, r["sha256"], r["ext"]),
                                           sidecar_json(caption, meta)))
                rows.append(ManifestRow(
                    r["location"], r["sha256"], r["width"], r["height"], r["source"], split, r["phash"],
                    placed.shard, placed.member, placed.offset, placed.size, "jpeg" if r["ext"] == "jpg" else "png",
                    caption, json.dumps(meta, sort_keys=True) if meta else "",
                ))
                bar.update(task, advance=1, info=placed.shard)
            writer.close()
    return rows
