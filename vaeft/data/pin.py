"""A remote curated dataset pinned by a small tracked file, so DVC can record what a stage read.

DVC hashes files on disk; a dataset that training reads from ``s3://bucket/curated`` is not on
disk, so a stage depending on it would neither rerun when it changes nor say in ``dvc.lock``
which data a checkpoint saw. The pin is the dataset's identity as a file::

    {"kind": "vaeft-remote-dataset", "url": "s3://bucket/curated",
     "manifest": {"sha256": ..., "size": ...}, "images": {"train": N, "eval": M},
     "shards": {"shards/train-000000.tar": {"sha256": ..., "size": ...}, ...}}

A stage takes the pin as its ``--data`` and as a dep: re-pinning a changed dataset changes the
file, so ``dvc status`` flags the stage and ``dvc.lock`` records the new digest. Reading through
a pin checks the remote manifest's bytes against it before anything else (a dataset changed
behind the pin is refused in one line) and each whole shard fetched into the cache against its
pinned sha256. Keys are sorted and nothing else is written: the same dataset gives the same pin.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from vaeft import atomic
from vaeft.console import progress
from vaeft.data.manifest import MANIFEST_FILE, is_url, parse_manifest
from vaeft.errors import VaeftError

PIN_KIND = "vaeft-remote-dataset"


class PinError(VaeftError, ValueError):
    """A pin that cannot be used, or a remote dataset that no longer matches its pin."""


@dataclass(frozen=True)
class ShardPin:
    size: int
    sha256: str


@dataclass(frozen=True)
class Pin:
    path: Path
    url: str
    manifest_sha256: str
    manifest_size: int
    shards: dict[str, ShardPin]

    @property
    def manifest_url(self) -> str:
        return f"{self.url}/{MANIFEST_FILE}"


def is_pin(path: str | Path) -> bool:
    """Whether ``path`` names a pin file (a local ``.json``; a dataset root is a folder or a URL)."""
    return not is_url(path) and str(path).endswith(".json") and Path(path).is_file()


def load_pin(path: str | Path) -> Pin:
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PinError(f"{path}: not a readable dataset pin ({' '.join(str(err).split())[:120]})") from None
    if not isinstance(obj, dict) or obj.get("kind") != PIN_KIND:
        raise PinError(f"{path}: not a dataset pin (write one with `vaeft data pin URL --out {path}`)")
    try:
        return Pin(path, obj["url"], obj["manifest"]["sha256"], int(obj["manifest"]["size"]),
                   {k: ShardPin(int(v["size"]), v["sha256"]) for k, v in obj["shards"].items()})
    except (KeyError, TypeError, ValueError, AttributeError):
        raise PinError(f"{path}: a damaged dataset pin (re-pin with `vaeft data pin URL --out {path}`)") from None


def _fs(url: str, storage_options: dict | None):
    import fsspec

    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def _read_remote(url: str, storage_options: dict | None) -> bytes:
    fs, path = _fs(url, storage_options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise PinError(f"no manifest at {url} (upload the curated dataset there first)") from None


def pinned_manifest_bytes(pin: Pin, storage_options: dict | None = None) -> bytes:
    """The remote manifest's bytes, refused unless they are the pinned ones."""
    data = _read_remote(pin.manifest_url, storage_options)
    digest = hashlib.sha256(data).hexdigest()
    if digest != pin.manifest_sha256 or len(data) != pin.manifest_size:
        raise PinError(f"{pin.manifest_url} no longer matches the pin {pin.path} (sha256 {digest[:12]}, "
                       f"pinned {pin.manifest_sha256[:12]}): the remote dataset changed; pin it again "
                       f"(`vaeft data pin {pin.url} --out {pin.path}`) and rerun, or restore the pinned one")
    return data


def _local_shard(local: Path, name: str, remote_size: int) -> ShardPin:
    path = local / name
    if not path.is_file() or path.stat().st_size != remote_size:
        have = path.stat().st_size if path.is_file() else "missing"
        raise PinError(f"{path} ({have}) differs from the remote shard ({remote_size} bytes): "
                       "--local must be the copy that was uploaded")
    from vaeft.hashing import file_sha256

    return ShardPin(remote_size, file_sha256(path))


def _remote_shard(fs, path: str, size: int) -> ShardPin:
    from vaeft.hashing import stream_sha256

    with fs.open(path, "rb", block_size=8 << 20) as fh:
        return ShardPin(size, stream_sha256(fh, 8 << 20))


def pin_dataset(url: str, out: str | Path, *, local: str | Path | None = None,
                storage_options: dict | None = None, force: bool = False) -> Pin:
    """Write the pin of the curated dataset at ``url`` to ``out``.

    The shards' sha256 are hashed from ``local`` (the copy that was uploaded: its manifest must be
    byte-identical and each shard the remote's size) or else streamed once from the remote.
    """
    if not is_url(url):
        raise PinError(f"{url}: pin a dataset URL (s3://bucket/prefix); a local folder is a DVC output already")
    url = url.rstrip("/")
    out = Path(out)
    atomic.check_file_target(out, (".json",), force=force, inputs=[local] if local else [])
    if out.exists() and not force:
        try:
            load_pin(out)
        except PinError:
            raise atomic.OutputRefusedError(f"refusing to replace {out}: it is not a dataset pin "
                                            "(pass --force to replace it)") from None
    manifest = _read_remote(f"{url}/{MANIFEST_FILE}", storage_options)
    rows = parse_manifest(manifest, f"{url}/{MANIFEST_FILE}")
    if local is not None and (Path(local) / MANIFEST_FILE).read_bytes() != manifest:
        raise PinError(f"{local}/{MANIFEST_FILE} differs from {url}/{MANIFEST_FILE}: --local must be the uploaded copy")
    fs, root = _fs(url, storage_options)
    names = sorted({r.shard for r in rows})
    shards: dict[str, ShardPin] = {}
    with progress() as bar:
        task = bar.add_task("pin", total=len(names), info=url)
        for name in names:
            try:
                size = int(fs.info(f"{root}/{name}")["size"])
            except FileNotFoundError:
                raise PinError(f"{url}/{name}: missing (the manifest lists it); upload every shard first") from None
            shards[name] = (_local_shard(Path(local), name, size) if local is not None
                            else _remote_shard(fs, f"{root}/{name}", size))
            bar.update(task, advance=1)
    counts = {s: sum(r.split == s for r in rows) for s in ("train", "eval")}
    atomic.write_json(out, {
        "kind": PIN_KIND, "url": url, "images": counts,
        "manifest": {"sha256": hashlib.sha256(manifest).hexdigest(), "size": len(manifest)},
        "shards": {k: {"sha256": v.sha256, "size": v.size} for k, v in shards.items()},
    })
    return load_pin(out)
