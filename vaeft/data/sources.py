"""Image sources cut into shards (units of resumable work), and reading their items.

The main process enumerates shards lazily and cheaply (names, sizes, table rows); a worker
turns one shard into ``Item`` s, each the raw bytes of one candidate or the reason it has none.
Nothing here decodes an image.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import math
import os
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from vaeft.config import SourceParams
from vaeft.data.embedded import IMAGE_SUFFIXES, embedded_image_files
from vaeft.errors import VaeftError
from vaeft.fetch import DownloadError, TooLargeError, fetch_bytes

LAION_COLUMNS = ("aesthetic", "pwatermark", "punsafe", "width", "height")
# Other spellings of the LAION columns in the wild (LAION-Aesthetics parquets), matched case-insensitively.
LAION_ALIASES = {"aesthetic_score": "aesthetic", "aesthetic": "aesthetic", "pwatermark": "pwatermark",
                 "punsafe": "punsafe", "width": "width", "height": "height"}
PATH_COLUMNS = ("url", "path", "file", "filepath")
TAR_SEP = "::"


class SourceError(VaeftError):
    pass


@dataclass(frozen=True)
class Shard:
    source: str
    kind: str
    index: int  # position within its source: merge order, hence which duplicate wins
    key: str  # digest of the shard's inputs: names its partial result in the work dir
    payload: Any  # picklable, kind-specific
    n_hint: int | None = None  # item count when known up front (progress bar)


@dataclass
class Item:
    location: str
    data: bytes | None = None
    reason: str = ""  # set when data is None
    detail: str = ""
    meta: dict[str, float] = field(default_factory=dict)
    caption: str | None = None  # a webdataset sample's .txt (or its img2dataset row's caption)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for it in items:
        chunk.append(it)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def safe_name(name: str) -> str:
    """A file name as valid UTF-8 text for reports and the manifest.

    Names that are not UTF-8 arrive from the OS (and tarfile) with surrogate escapes, which no
    UTF-8 writer accepts; their raw bytes are shown as ``\\xNN`` instead. Valid names pass unchanged.
    """
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# ------------------------------------------------------------------------------ enumeration


def _file_entries(files: list[tuple[str, Path]]) -> Iterator[tuple[str, str, int, int]]:
    for loc, p in files:
        try:
            st = p.stat()
            yield loc, str(p), st.st_size, st.st_mtime_ns
        except OSError:
            yield loc, str(p), -1, -1  # the worker reports it as unreadable


def _folder_files(source: SourceParams) -> list[tuple[str, Path]]:
    if source.kind == "embedded":
        return embedded_image_files()
    root = Path(source.path or "")
    if not root.is_dir():
        raise SourceError(f"data source {source.name!r}: folder {root} does not exist")
    # Symlinks that lead nowhere (dangling, looping) are listed too: reading them fails and the
    # report names them, instead of their silently vanishing from the run.
    found = sorted(p.relative_to(root) for p in root.rglob("*")
                   if (p.is_file() or (p.is_symlink() and not p.exists())) and p.suffix.lower() in IMAGE_SUFFIXES)
    return [(safe_name(str(Path(source.path or "") / rel)), root / rel) for rel in found]


def _tar_files(source: SourceParams) -> list[str]:
    given = source.path or ""
    if os.path.isdir(given):
        found = sorted(str(Path(given) / n) for n in os.listdir(given) if n.endswith(".tar"))
    else:
        found = sorted(glob.glob(given)) if glob.has_magic(given) else [given]
    missing = [f for f in found if not os.path.isfile(f)]
    if not found or missing:
        raise SourceError(f"data source {source.name!r}: no tar shards at {given}")
    return found


def _table_rows(source: SourceParams) -> Iterator[dict[str, Any]]:
    """Rows as dicts of the path/URL column (key ``target``) and the LAION columns present."""
    path = Path(source.path or "")
    if not path.is_file():
        raise SourceError(f"data source {source.name!r}: table {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        raw = json.loads(line)
                    except json.JSONDecodeError:
                        raw = {"__bad_line__": n}
                    yield _table_row(source, raw if isinstance(raw, dict) else {"__bad_line__": n})
        return
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        cols = [c for c in pf.schema_arrow.names if c in (*PATH_COLUMNS, *LAION_COLUMNS, source.column)]
        batches = pf.iter_batches(batch_size=4096, columns=cols)
    elif suffix in (".csv", ".tsv"):
        import pyarrow.csv as pacsv

        batches = pacsv.open_csv(path, parse_options=pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ","))
    else:
        raise SourceError(f"data source {source.name!r}: unknown table format {suffix!r} (parquet, csv, tsv, jsonl)")
    for batch in batches:
        for raw in batch.to_pylist():
            yield _table_row(source, raw)


def _table_row(source: SourceParams, raw: dict[str, Any]) -> dict[str, Any]:
    columns = [source.column] if source.column else list(PATH_COLUMNS)
    target = next((raw[c] for c in columns if raw.get(c) not in (None, "")), None)
    meta = {}
    for c in LAION_COLUMNS:
        v = raw.get(c)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            meta[c] = float(v)
    row = {"target": None if target is None else str(target), "meta": meta}
    if "__bad_line__" in raw:
        row["bad_line"] = raw["__bad_line__"]
    return row


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _s3_split(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    return bucket, prefix


def s3_client(endpoint_url: str | None) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint_url, config=Config(retries={"max_attempts": 3, "mode": "standard"}))


def iter_shards(source: SourceParams, shard_size: int) -> Iterator[Shard]:
    """Shards of one source in a stable order; nothing is read beyond names, sizes and rows."""
    kind = source.kind
    if kind in ("embedded", "folder"):
        entries = list(_file_entries(_folder_files(source)))
        for i, chunk in enumerate(_chunks(iter(entries), shard_size)):
            yield Shard(source.name, "files", i, _digest(["files", chunk]), chunk, len(chunk))
    elif kind == "tar":
        for i, tar in enumerate(_tar_files(source)):
            st = os.stat(tar)
            yield Shard(source.name, "tar", i, _digest(["tar", tar, st.st_size, st.st_mtime_ns]), tar)
    elif kind == "img2dataset":
        for i, tar in enumerate(_tar_files(source)):
            table = str(Path(tar).with_suffix(".parquet"))
            stamp = [(f, st.st_size, st.st_mtime_ns) for f in (tar, table) if (st := _stat(f)) is not None]
            payload = {"tar": tar, "parquet": table if len(stamp) == 2 else None}
            yield Shard(source.name, "img2dataset", i, _digest(["img2dataset", stamp]), payload)
    elif kind == "table":
        base = str(Path(source.path or "").parent)
        for i, chunk in enumerate(_chunks(_table_rows(source), shard_size)):
            payload = {"base": base, "rows": chunk}
            yield Shard(source.name, "table", i, _digest(["table", payload]), payload, len(chunk))
    elif kind == "s3":
        bucket, prefix = _s3_split(source.path or "")
        pages = s3_client(source.endpoint_url).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        objects = (
            (obj["Key"], obj.get("ETag", ""), obj.get("Size", -1))
            for page in pages
            for obj in page.get("Contents", [])
            if _is_image_name(obj["Key"])
        )
        for i, chunk in enumerate(_chunks(objects, shard_size)):
            payload = {"bucket": bucket, "endpoint_url": source.endpoint_url, "objects": chunk}
            yield Shard(source.name, "s3", i, _digest(["s3", payload]), payload, len(chunk))
    else:  # pragma: no cover - SourceParams validates kind
        raise SourceError(f"unknown source kind {kind!r}")


# ------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class ReadLimits:
    max_bytes: int
    fetch_timeout: float
    fetch_retries: int


def _too_large(location: str, size: int, limits: ReadLimits, meta: dict[str, float] | None = None) -> Item:
    return Item(location, reason="file_too_large", detail=f"{size} bytes > {limits.max_bytes}", meta=meta or {})


def _read_file(location: str, path: str, limits: ReadLimits, meta: dict[str, float] | None = None) -> Item:
    try:
        with open(path, "rb") as fh:
            data = fh.read(limits.max_bytes + 1)
    except OSError as exc:
        reason = "unreadable"
        if exc.errno == errno.ELOOP:
            reason = "symlink_loop"
        elif os.path.islink(path) and not os.path.exists(path):
            reason = "dangling_symlink"
        detail = f"{type(exc).__name__}: {exc.strerror or exc}"
        if reason != "unreadable":
            detail += f" (-> {safe_name(os.readlink(path))})"
        return Item(location, reason=reason, detail=detail, meta=meta or {})
    if len(data) > limits.max_bytes:
        return _too_large(location, len(data), limits, meta)
    return Item(location, data, meta=meta or {})


def fetch_url(url: str, limits: ReadLimits) -> tuple[bytes | None, str]:
    """(body, "") or (None, why), through the weight store's fetcher: retries timeouts, dropped
    connections and 5xx (resuming with Range), never 4xx; a short body is never accepted."""
    try:
        body, _sha = fetch_bytes(url, limits.max_bytes, retries=limits.fetch_retries, backoff=0.2,
                                 timeout=limits.fetch_timeout, user_agent="vaeft-curate/1")
    except TooLargeError:
        return None, f"more than {limits.max_bytes} bytes"
    except DownloadError as exc:
        return None, exc.why
    return body, ""


def _sidecar_meta(raw: bytes) -> dict[str, float]:
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return laion_meta(obj) if isinstance(obj, dict) else {}


def laion_meta(obj: dict[str, Any]) -> dict[str, float]:
    """The LAION filter columns of one sample's metadata (any known spelling), finite numbers only."""
    meta = {}
    for k, v in obj.items():
        c = LAION_ALIASES.get(str(k).lower())
        if c and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            meta.setdefault(c, float(v))
    return meta


def _unsafe_member(name: str) -> bool:
    p = PurePosixPath(name.replace("\\", "/"))
    return p.is_absolute() or ".." in p.parts or (len(name) > 1 and name[1] == ":")


def _iter_tar(shard_path: str, limits: ReadLimits) -> Iterator[Item]:
    """WebDataset samples streamed in order: files sharing a key (name up to the first dot of
    the basename) are one sample; only the current sample's raw bytes are held."""
    pending: list[Item] = []
    pending_key: str | None = None
    sidecar: dict[str, float] = {}
    caption: str | None = None

    def flush() -> Iterator[Item]:
        for it in pending:
            it.meta = {**sidecar, **it.meta}
            if it.data is not None and caption is not None:
                it.caption = caption
            yield it

    try:
        with tarfile.open(shard_path, mode="r|*") as tf:
            for m in tf:
                if m.isdir():
                    continue
                loc = f"{shard_path}{TAR_SEP}{safe_name(m.name)}"
                base = PurePosixPath(m.name)
                key = str(base.parent / base.name.split(".", 1)[0])
                if key != pending_key:
                    yield from flush()
                    pending, pending_key, sidecar, caption = [], key, {}, None
                suffix = base.suffix.lower()
                if not (_is_image_name(m.name) or suffix in (".json", ".txt")):
                    continue  # other sidecars carry nothing curation uses
                if _unsafe_member(m.name):
                    pending.append(Item(loc, reason="unsafe_tar_member", detail="absolute or '..' path"))
                    continue
                if not m.isfile():
                    pending.append(Item(loc, reason="unsafe_tar_member", detail="link or special file"))
                    continue
                if m.size > limits.max_bytes:
                    if suffix not in (".json", ".txt"):
                        pending.append(_too_large(loc, m.size, limits))
                    continue
                fh = tf.extractfile(m)
                data = fh.read() if fh is not None else b""
                if suffix == ".json":
                    sidecar = _sidecar_meta(data)
                elif suffix == ".txt":
                    caption = data.decode("utf-8", "replace")
                else:
                    pending.append(Item(loc, data))
            yield from flush()
            bad_at = _unread_rest(tf)
            if bad_at is not None:
                yield Item(shard_path, reason="corrupt_shard",
                           detail=f"invalid tar header at byte {bad_at}; the rest of the shard was not read")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        yield from flush()
        yield Item(shard_path, reason="corrupt_shard", detail=f"{type(exc).__name__}: {exc}")


def _unread_rest(tf: tarfile.TarFile) -> int | None:
    """Where a tar stream stopped early, or None when it ended properly.

    tarfile ends its iteration at an invalid header past the first one exactly as at the real
    end, so a corrupt header mid-shard would silently drop every sample after it. A real end is
    followed by zero blocks only; anything else after the stopping point is data never read.
    """
    stopped = tf.offset
    while block := tf.fileobj.read(1 << 16):
        if block.count(0) != len(block):
            return stopped
    return None


def _img2dataset_rows(table: str) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(table)
    wanted = {"key", "url", "caption", "status", "error_message"}
    cols = [c for c in pf.schema_arrow.names if c in wanted or c.lower() in LAION_ALIASES]
    return pf.read(columns=cols).to_pylist()


def _iter_img2dataset(tar: str, table: str | None, limits: ReadLimits) -> Iterator[Item]:
    """One img2dataset shard: the samples of its tar (their metadata and caption from the
    shard's parquet, else from each sample's .json/.txt), then the rows whose download failed,
    which have no sample in the tar, as fetch_failed."""
    rows = _img2dataset_rows(table) if table else []
    by_key = {str(r["key"]): r for r in rows if r.get("key") is not None}
    for item in _iter_tar(tar, limits):
        prefix = f"{tar}{TAR_SEP}"
        member = item.location[len(prefix):] if item.location.startswith(prefix) else ""
        row = by_key.get(PurePosixPath(member).name.split(".", 1)[0]) if member else None
        if row is not None:
            item.meta = {**item.meta, **laion_meta(row)}
            if item.data is not None and row.get("caption") is not None:
                item.caption = str(row["caption"])
        yield item
    for r in rows:
        if r.get("status") not in (None, "success"):
            where = str(r.get("url") or f"{tar}{TAR_SEP}{r.get('key')}")
            yield Item(where, reason="fetch_failed", detail=f"img2dataset: {r.get('error_message') or r['status']}",
                       meta=laion_meta(r))


def _resolve_target(target: str, base: str) -> tuple[str, str]:
    """('url'|'path', where to read) for a table cell."""
    if "://" in target:
        return ("url" if target.split("://", 1)[0].lower() in ("http", "https") else "other"), target
    return "path", target if os.path.isabs(target) else os.path.join(base, target)


def iter_items(shard: Shard, limits: ReadLimits, meta_check: Any = None) -> Iterator[Item]:
    """The items of one shard in a stable order. ``meta_check(meta) -> (reason, detail) | None``
    runs before any download, so filtered rows cost nothing."""
    if shard.kind == "files":
        for loc, path, _size, _mtime in shard.payload:
            yield _read_file(loc, path, limits)
    elif shard.kind == "tar":
        yield from _iter_tar(shard.payload, limits)
    elif shard.kind == "img2dataset":
        yield from _iter_img2dataset(shard.payload["tar"], shard.payload["parquet"], limits)
    elif shard.kind == "table":
        base = shard.payload["base"]
        for row in shard.payload["rows"]:
            target, meta = row["target"], row["meta"]
            if "bad_line" in row:
                yield Item(f"{shard.source}:line {row['bad_line']}", reason="bad_table_row", detail="not a JSON object")
                continue
            if target is None:
                yield Item(f"{shard.source}:row", reason="bad_table_row", detail="no path or URL", meta=meta)
                continue
            why = meta_check(meta) if meta_check else None
            if why:
                yield Item(target, reason=why[0], detail=why[1], meta=meta)
                continue
            how, where = _resolve_target(target, base)
            if how == "path":
                yield _read_file(target, where, limits, meta)
            elif how == "url":
                body, err = fetch_url(where, limits)
                yield Item(target, body, meta=meta) if body is not None else Item(target, reason="fetch_failed", detail=err, meta=meta)
            else:
                yield Item(target, reason="bad_table_row", detail="unsupported URL scheme", meta=meta)
    elif shard.kind == "s3":
        p = shard.payload
        client = s3_client(p["endpoint_url"])
        for key, _etag, size in p["objects"]:
            loc = f"s3://{p['bucket']}/{key}"
            if size > limits.max_bytes:
                yield _too_large(loc, size, limits)
                continue
            try:
                body = client.get_object(Bucket=p["bucket"], Key=key)["Body"].read(limits.max_bytes + 1)
            except Exception as exc:  # botocore raises many unrelated types; any is a failed fetch
                yield Item(loc, reason="fetch_failed", detail=f"{type(exc).__name__}: {exc}")
                continue
            yield Item(loc, body)
    else:  # pragma: no cover
        raise SourceError(f"unknown shard kind {shard.kind!r}")
