"""A curated dataset's bytes: WebDataset-compatible tar shards, read by offset.

Layout under the dataset root (a directory, or a URL such as ``s3://bucket/prefix``)::

    shards/train-000000.tar   members <sha256>.jpg | <sha256>.png (+ <sha256>.json: caption, metadata)
    shards/eval-000000.tar
    manifest.parquet          one row per image: shard, member, offset, size, and what curation knows

The tars are plain USTAR with fixed headers (mtime 0, uid/gid 0, mode 0644, no owner names) and
members in manifest order, so the same images always give the same bytes (DVC hashes them).
``webdataset``/``wids`` and ``tar`` read them as they are; vaeft reads one image with one seek
and one read of ``size`` bytes at ``offset`` (the manifest is the offset index), so training
never scans a shard. A remote root is read through a local cache of whole shards, fetched on
first use (a process downloads only the shards holding the samples it draws), or with
``cache=False`` member by member with ranged reads (one GET of ``size`` bytes per image, nothing
staged: what a randomly shuffled run over a large remote dataset wants, see README "Data at scale").
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from vaeft import atomic
from vaeft.data.manifest import ManifestRow, is_url, manifest_location, parse_manifest, read_manifest_bytes
from vaeft.errors import VaeftError

SHARD_DIR = "shards"
_BLOCK = 512
_OPEN_FILES = 16  # per process: enough for the shards a worker interleaves, far below fd limits
CACHE_ENV = "VAEFT_SHARD_CACHE"


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    info.type = tarfile.REGTYPE
    buf = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
    if len(buf) != _BLOCK:  # a long name would add extension headers and shift the offsets
        raise ValueError(f"tar member name too long for one header: {name!r}")
    return buf


@dataclass(frozen=True)
class Member:
    key: str  # WebDataset sample key: no dots
    ext: str  # "jpg" or "png"
    source: Path  # the file holding the bytes
    sidecar: bytes = b""  # a <key>.json member after the image when not empty


@dataclass(frozen=True)
class Placed:
    shard: str  # relative to the dataset root
    member: str
    offset: int
    size: int


class ShardWriter:
    """Appends members to ``root/shards/<prefix>-NNNNNN.tar``, starting a new shard at either limit."""

    def __init__(self, root: str | Path, prefix: str, max_bytes: int, max_images: int) -> None:
        self.root, self.prefix, self.max_bytes, self.max_images = Path(root), prefix, max_bytes, max_images
        (self.root / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        self.shards: list[str] = []
        self._fh: BinaryIO | None = None
        self._n = self._bytes = 0

    def _write(self, name: str, fh_src: BinaryIO | bytes, size: int) -> int:
        assert self._fh is not None
        self._fh.write(_header(name, size))
        offset = self._fh.tell()
        if isinstance(fh_src, bytes):
            self._fh.write(fh_src)
        else:
            shutil.copyfileobj(fh_src, self._fh)
        if self._fh.tell() - offset != size:
            raise OSError(f"{name}: {self._fh.tell() - offset} bytes written, expected {size}")
        self._fh.write(b"\0" * (-size % _BLOCK))
        return offset

    def add(self, m: Member) -> Placed:
        size = m.source.stat().st_size
        need = 2 * _BLOCK + size + len(m.sidecar)
        if self._fh is not None and (self._n >= self.max_images or self._bytes + need > self.max_bytes):
            self._close_shard()
        if self._fh is None:
            self.shards.append(f"{SHARD_DIR}/{self.prefix}-{len(self.shards):06d}.tar")
            self._fh = open(self.root / self.shards[-1], "wb")  # noqa: SIM115 - closed by _close_shard
            self._n = self._bytes = 0
        start = self._fh.tell()
        with open(m.source, "rb") as src:
            offset = self._write(f"{m.key}.{m.ext}", src, size)
        if m.sidecar:
            self._write(f"{m.key}.json", m.sidecar, len(m.sidecar))
        self._n += 1
        self._bytes += self._fh.tell() - start
        return Placed(self.shards[-1], f"{m.key}.{m.ext}", offset, size)

    def _close_shard(self) -> None:
        if self._fh is not None:
            self._fh.write(b"\0" * (2 * _BLOCK))  # end-of-archive marker
            self._fh.close()
            self._fh = None

    def close(self) -> list[str]:
        self._close_shard()
        return self.shards


def sidecar_json(caption: str, meta: dict[str, Any]) -> bytes:
    """The optional ``<key>.json`` member (sorted keys: deterministic bytes)."""
    obj = {**({"caption": caption} if caption else {}), **meta}
    return json.dumps(obj, sort_keys=True).encode() if obj else b""


# ------------------------------------------------------------------------------ reading


class ShardIntegrityError(VaeftError, OSError):
    """Remote bytes that are not the ones the manifest (or the dataset's pin) describes."""


@dataclass(frozen=True)
class Expected:
    """What a shard's bytes must be: its pinned size and sha256 when pinned, and the sha256 of the
    members kept as their original JPEG bytes (the manifest's key is their digest)."""

    size: int | None = None
    sha256: str | None = None
    members: tuple[tuple[int, int, str], ...] = ()  # (offset, size, sha256)


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vaeft" / "shards")


class ShardStore:
    """Random access to members of the shards under ``root``.

    Local shards are read in place. Remote ones (any fsspec URL) are downloaded whole to
    ``cache_dir/<dataset key>/`` the first time a member is read (atomically, so concurrent
    loader workers never see half a shard) and read from there; ``version`` (the manifest's
    digest) keys the cache, so a re-curated dataset at the same URL never reads stale shards.
    ``touched`` lists the shards this process has read from. Picklable (loader workers).

    ``expected`` (shard -> :class:`Expected`): a fetched shard is checked before it enters the
    cache (one pass over bytes just downloaded); a shard that does not match is refused and
    never cached. Ranged reads check each kept JPEG against its manifest sha256.
    """

    def __init__(self, root: str | Path, *, version: str = "", cache_dir: str | Path | None = None,
                 storage_options: dict | None = None, cache: bool = True,
                 expected: dict[str, Expected] | None = None) -> None:
        self.expected = expected or {}
        self.remote = is_url(root)
        self.ranged = self.remote and not cache
        self._fs: Any = None
        self.root = str(root).rstrip("/") if self.remote else str(Path(root))
        self.storage_options = storage_options or {}
        key = hashlib.sha256(f"{self.root}\n{version}".encode()).hexdigest()[:20]
        self.cache = Path(cache_dir or default_cache_dir()) / key if self.remote else None
        self.touched: set[str] = set()
        self._files: OrderedDict[str, BinaryIO] = OrderedDict()
        self._lock = threading.Lock()  # evaluation reads from a thread pool

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": OrderedDict(), "touched": set(), "_lock": None, "_fs": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def local_path(self, shard: str) -> Path:
        if not self.remote:
            return Path(self.root) / shard
        assert self.cache is not None
        path = self.cache / shard
        if not path.is_file():
            import fsspec

            fs, remote = fsspec.core.url_to_fs(f"{self.root}/{shard}", **self.storage_options)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic.atomic_path(path) as tmp:
                fs.get_file(remote, str(tmp))
                self._verify_fill(shard, tmp)
        return path

    def _verify_fill(self, shard: str, tmp: Path) -> None:
        want = self.expected.get(shard)
        if want is None:
            return
        where = f"{self.root}/{shard}"
        size = tmp.stat().st_size
        if want.size is not None and size != want.size:
            raise ShardIntegrityError(f"{where}: {size} bytes, the dataset's pin says {want.size} (changed or "
                                      "truncated upload; not cached)")
        if want.sha256 is not None:
            from vaeft.hashing import file_sha256

            if (got := file_sha256(tmp)) != want.sha256:
                raise ShardIntegrityError(f"{where}: sha256 {got[:12]}, the dataset's pin says {want.sha256[:12]} "
                                          "(the shard changed behind its manifest; not cached)")
            return  # the whole file is the pinned one: its members are too
        with open(tmp, "rb", buffering=0) as fh:
            for offset, n, digest in want.members:
                if hashlib.sha256(os.pread(fh.fileno(), n, offset)).hexdigest() != digest:
                    raise ShardIntegrityError(f"{where}: the member at offset {offset} is not the image the "
                                              f"manifest lists ({digest[:12]}); not cached")

    def _file(self, shard: str) -> BinaryIO:
        fh = self._files.get(shard)
        if fh is None:
            fh = open(self.local_path(shard), "rb", buffering=0)  # noqa: SIM115 - kept open, closed on eviction
            self._files[shard] = fh
            self.touched.add(shard)
            if len(self._files) > _OPEN_FILES:
                self._files.popitem(last=False)[1].close()
        else:
            self._files.move_to_end(shard)
        return fh

    def read(self, shard: str, offset: int, size: int) -> bytes:
        if self.ranged:
            data = self._ranged(shard, offset, size)
        else:
            with self._lock:
                data = os.pread(self._file(shard).fileno(), size, offset)
        if len(data) != size:
            raise OSError(f"{shard}: {len(data)} of {size} bytes at offset {offset} (shard truncated?)")
        return data

    def _ranged(self, shard: str, offset: int, size: int) -> bytes:
        if self._fs is None:
            import fsspec

            self._fs = fsspec.core.url_to_fs(self.root, **self.storage_options)[0]
        self.touched.add(shard)
        return self._fs.cat_file(f"{self.root}/{shard}", start=offset, end=offset + size)

    def read_row(self, row: ManifestRow) -> bytes:
        data = self.read(row.shard, row.offset, row.size)
        # A ranged read never passes a whole-shard check; a kept JPEG's key is its own digest.
        if self.ranged and row.format == "jpeg" and hashlib.sha256(data).hexdigest() != row.sha256:
            raise ShardIntegrityError(f"{self.root}/{row.shard}: the member at offset {row.offset} is not the "
                                      f"image the manifest lists ({row.sha256[:12]})")
        return data

    def open_row(self, row: ManifestRow) -> io.BytesIO:
        return io.BytesIO(self.read_row(row))

    def close(self) -> None:
        with self._lock:
            while self._files:
                self._files.popitem()[1].close()


class CuratedSet:
    """A curated dataset root (directory or URL, or a pin file naming a URL): its manifest rows
    and a :class:`ShardStore`. Through a pin the manifest must be the pinned one and each shard
    fetched must have its pinned sha256; from a bare URL the kept JPEGs of each fetched shard
    are checked against the manifest."""

    def __init__(self, root: str | Path, *, cache_dir: str | Path | None = None,
                 storage_options: dict | None = None, cache: bool = True) -> None:
        from vaeft.data.pin import is_pin, load_pin, pinned_manifest_bytes

        pin = load_pin(root) if is_pin(root) else None  # read once: the manifest and shards follow it
        if pin is not None:
            data, location = pinned_manifest_bytes(pin, storage_options), pin.manifest_url
        else:
            data, location = read_manifest_bytes(root, storage_options), manifest_location(root)
        self.root = root
        self.rows = parse_manifest(data, location)
        self.version = hashlib.sha256(data).hexdigest()
        store_root = pin.url if pin is not None else root
        expected: dict[str, Expected] = {}
        if pin is not None:
            expected = {k: Expected(v.size, v.sha256) for k, v in pin.shards.items()}
        elif is_url(root):
            members: dict[str, list[tuple[int, int, str]]] = {}
            for r in self.rows:
                members.setdefault(r.shard, [])
                if r.format == "jpeg":
                    members[r.shard].append((r.offset, r.size, r.sha256))
            expected = {k: Expected(members=tuple(v)) for k, v in members.items()}
        self.store = ShardStore(store_root, version=self.version, cache_dir=cache_dir,
                                storage_options=storage_options, cache=cache, expected=expected)

    def split(self, split: str) -> list[ManifestRow]:
        return [r for r in self.rows if r.split == split]

    def read(self, row: ManifestRow) -> bytes:
        return self.store.read_row(row)

    def open(self, row: ManifestRow) -> io.BytesIO:
        return io.BytesIO(self.read(row))
