"""The ``curate`` stage: sources -> validated, normalised, de-duplicated, split image store.

Output directory layout::

    OUT/manifest.parquet          one row per kept image (see data/manifest.py)
    OUT/images/<sha256>.png       normalised 8-bit RGB copies
    OUT/curation_report.json      counts per source and reason, every rejected file
    OUT/run_info.json             resolved params + git commit
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from vaeft import atomic, provenance
from vaeft.config import DataParams, SourceParams
from vaeft.console import banner, console, progress
from vaeft.data.embedded import IMAGE_SUFFIXES, embedded_image_files
from vaeft.data.images import ImageLimits, ImageRejected, load_rgb
from vaeft.data.manifest import MANIFEST_FILE, ManifestRow, write_manifest
from vaeft.errors import VaeftError
from vaeft.hashing import file_sha256

REPORT_FILE = "curation_report.json"


class CurationError(VaeftError):
    pass


@dataclass(frozen=True)
class CurateResult:
    out_dir: Path
    n_train: int
    n_eval: int
    n_rejected: int
    n_duplicates: int

    @property
    def manifest(self) -> Path:
        return self.out_dir / MANIFEST_FILE


def split_of(sha256: str, eval_fraction: float) -> str:
    """Deterministic per-image split: adding images never moves an existing one."""
    return "eval" if int(sha256[:16], 16) / 16**16 < eval_fraction else "train"


def source_files(source: SourceParams) -> list[tuple[str, Path]]:
    """(location as given, path) of every candidate image of a source, in a stable order."""
    if source.kind == "embedded":
        return embedded_image_files()
    root = Path(source.path or "")
    if not root.is_dir():
        raise CurationError(f"data source {source.name!r}: folder {root} does not exist")
    found = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return [(str(Path(source.path or "") / rel), root / rel) for rel in found]


def curate(params: DataParams, out_dir: str | Path) -> CurateResult:
    """Validate and normalise every image of every source, then write manifest and report."""
    out_dir = Path(out_dir)
    banner("curate", f"-> {out_dir}")
    limits = ImageLimits(params.min_side, params.max_aspect, params.max_pixels)
    files = [(s, loc, f) for s in params.sources for loc, f in source_files(s)]

    rows: list[ManifestRow] = []
    rejected: list[dict[str, str]] = []
    duplicates: list[dict[str, str]] = []
    seen: dict[str, str] = {}
    with atomic.atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        with progress() as bar:
            task = bar.add_task("curate", total=len(files), info="")
            for source, location, path in files:
                bar.update(task, advance=1, info=path.name)
                try:
                    sha = file_sha256(path)
                except OSError as exc:
                    rejected.append({"location": location, "source": source.name, "reason": "unreadable", "detail": str(exc)})
                    continue
                if sha in seen:
                    duplicates.append({"location": location, "source": source.name, "reason": "exact_duplicate", "duplicate_of": seen[sha]})
                    continue
                try:
                    img = load_rgb(path, limits)
                except ImageRejected as exc:
                    rejected.append({"location": location, "source": source.name, "reason": exc.reason, "detail": exc.detail})
                    continue
                seen[sha] = location
                stored = f"images/{sha}.png"
                with atomic.atomic_path(tmp / stored) as t:
                    img.save(t, format="PNG")
                rows.append(
                    ManifestRow(location, stored, sha, img.width, img.height, source.name, split_of(sha, params.eval_fraction))
                )
        n_eval = sum(r.split == "eval" for r in rows)
        n_train = len(rows) - n_eval
        if n_train == 0 or n_eval == 0:
            raise CurationError(
                f"curation kept {n_train} train and {n_eval} eval images; need at least one of each "
                "(add images or change data.eval_fraction)"
            )
        write_manifest(tmp / MANIFEST_FILE, rows)
        reasons = Counter(r["reason"] for r in rejected + duplicates)
        per_source = {
            s.name: {
                "seen": sum(1 for src, _, _ in files if src.name == s.name),
                "kept": sum(r.source == s.name for r in rows),
                "rejected": sum(r["source"] == s.name for r in rejected),
                "duplicates": sum(r["source"] == s.name for r in duplicates),
            }
            for s in params.sources
        }
        atomic.write_json(
            tmp / REPORT_FILE,
            {
                "kept": len(rows),
                "train": n_train,
                "eval": n_eval,
                "rejected": len(rejected),
                "duplicates": len(duplicates),
                "per_source": per_source,
                "per_reason": dict(sorted(reasons.items())),
                "rejected_files": sorted(rejected, key=lambda r: r["location"]),
                "duplicate_files": sorted(duplicates, key=lambda r: r["location"]),
            },
        )
        provenance.write_run_info(tmp, "curate", {"data": params})
    console.print(
        f"curate: kept {len(rows)} ({n_train} train / {n_eval} eval), "
        f"rejected {len(rejected)} {dict(sorted(Counter(r['reason'] for r in rejected).items()))}, "
        f"duplicates {len(duplicates)}"
    )
    return CurateResult(out_dir, n_train, n_eval, len(rejected), len(duplicates))
