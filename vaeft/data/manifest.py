"""The curated manifest: one row per kept image, stored as parquet; also the shards' offset index.

Rows are sorted by (source, sha256) so that the same inputs always give the same bytes. Each
row says where the image's bytes are: ``member`` of tar ``shard`` (relative to the dataset
root), ``size`` bytes from byte ``offset``, so any image is read with one seek (data/shards.py).
"""

from __future__ import annotations

import hashlib

import io
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from vaeft import atomic
from vaeft.errors import VaeftError
from vaeft.hashing import file_sha256

MANIFEST_FILE = "manifest.parquet"
SPLITS = ("train", "eval")


class ManifestError(VaeftError, ValueError):
    pass


@dataclass(frozen=True)
class ManifestRow:
    location: str  # where the image came from, as given (path, URL or tar member)
    sha256: str  # of the original file's bytes (the key of its shard member)
    width: int
    height: int
    source: str
    split: str
    phash: str  # 64-bit DCT perceptual hash, hex
    shard: str  # tar file holding the image, relative to the dataset root
    member: str  # "<sha256>.jpg" (the original JPEG bytes) or "<sha256>.png" (normalised)
    offset: int  # of the member's data in the shard
    size: int
    format: str  # "jpeg" or "png"
    caption: str = ""
    meta: str = ""  # the source's metadata for the image (LAION scores ...), JSON; "" when none


_INT64 = {"offset", "size"}
_SCHEMA = pa.schema(
    [
        (f.name, pa.int64() if f.name in _INT64 else pa.int32() if f.type in ("int", int) else pa.string())
        for f in fields(ManifestRow)
    ]
)


def is_url(path: str | Path) -> bool:
    return "://" in str(path)


def manifest_sha256(root: str | Path, storage_options: dict | None = None) -> str:
    """Digest of a dataset's manifest bytes, the same for a local copy, its URL and its pin."""
    if is_url(manifest_location(root)):
        return hashlib.sha256(read_manifest_bytes(root, storage_options)).hexdigest()
    return file_sha256(manifest_location(root))


def write_manifest(path: str | Path, rows: list[ManifestRow]) -> None:
    rows = sorted(rows, key=lambda r: (r.source, r.sha256))
    table = pa.Table.from_pylist([asdict(r) for r in rows], schema=_SCHEMA)
    with atomic.atomic_path(path) as tmp:
        # No statistics/metadata that vary between runs: the file must be byte-identical.
        pq.write_table(table, tmp, compression="zstd", write_statistics=False)


def manifest_location(root: str | Path) -> str:
    """The manifest of a dataset root (a directory or URL), or ``root`` itself when it names the file."""
    from vaeft.data.pin import is_pin, load_pin

    if is_pin(root):
        return load_pin(root).manifest_url
    root = str(root)
    if root.endswith(".parquet"):
        return root
    return root.rstrip("/") + "/" + MANIFEST_FILE


def read_manifest_bytes(root: str | Path, storage_options: dict | None = None) -> bytes:
    """The manifest's bytes; through a pin file (``vaeft data pin``) only if they are the pinned ones."""
    from vaeft.data.pin import is_pin, load_pin, pinned_manifest_bytes

    if is_pin(root):
        return pinned_manifest_bytes(load_pin(root), storage_options)
    where = manifest_location(root)
    if is_url(where):
        import fsspec

        try:
            with fsspec.open(where, "rb", **(storage_options or {})) as fh:
                return fh.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"no manifest at {where} (run `vaeft curate` first)") from None
    if not Path(where).exists():
        raise FileNotFoundError(f"no manifest at {where} (run `vaeft curate` first)")
    return Path(where).read_bytes()


def parse_manifest(data: bytes, where: str = "manifest", split: str | None = None) -> list[ManifestRow]:
    table = pq.read_table(io.BytesIO(data))
    if "stored_path" in table.column_names:
        raise ManifestError(f"{where}: a file-per-image dataset from an older vaeft; run `vaeft curate` again "
                            "to write it as shards")
    names = {f.name for f in fields(ManifestRow)}
    rows = [ManifestRow(**{k: v for k, v in r.items() if k in names}) for r in table.to_pylist()]
    if split is not None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} (expected one of {SPLITS})")
        rows = [r for r in rows if r.split == split]
    return rows


def read_manifest(path: str | Path, split: str | None = None, storage_options: dict | None = None) -> list[ManifestRow]:
    """Rows of a dataset root (directory or URL such as ``s3://bucket/prefix``) or of its manifest file."""
    return parse_manifest(read_manifest_bytes(path, storage_options), manifest_location(path), split)
