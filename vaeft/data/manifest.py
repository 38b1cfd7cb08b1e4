"""The curated manifest: one row per kept image, stored as parquet.

Rows are sorted by (source, sha256) so that the same inputs always give the same bytes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from vaeft import atomic

MANIFEST_FILE = "manifest.parquet"
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class ManifestRow:
    location: str  # where the image came from, as given (path, URL or tar member)
    stored_path: str  # normalised PNG, relative to the curated directory
    sha256: str  # of the original file's bytes
    width: int
    height: int
    source: str
    split: str
    phash: str = ""  # 64-bit DCT perceptual hash, hex (empty in manifests from before it existed)


_SCHEMA = pa.schema(
    [
        (f.name, pa.int32() if f.type in ("int", int) else pa.string())
        for f in fields(ManifestRow)
    ]
)


def write_manifest(path: str | Path, rows: list[ManifestRow]) -> None:
    rows = sorted(rows, key=lambda r: (r.source, r.sha256))
    table = pa.Table.from_pylist([asdict(r) for r in rows], schema=_SCHEMA)
    with atomic.atomic_path(path) as tmp:
        # No statistics/metadata that vary between runs: the file must be byte-identical.
        pq.write_table(table, tmp, compression="zstd", write_statistics=False)


def read_manifest(path: str | Path, split: str | None = None) -> list[ManifestRow]:
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_FILE
    if not path.exists():
        raise FileNotFoundError(f"no manifest at {path} (run `vaeft curate` first)")
    names = {f.name for f in fields(ManifestRow)}
    rows = [ManifestRow(**{k: v for k, v in r.items() if k in names}) for r in pq.read_table(path).to_pylist()]
    if split is not None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} (expected one of {SPLITS})")
        rows = [r for r in rows if r.split == split]
    return rows
