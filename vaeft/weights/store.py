"""Store operations behind `vaeft weights pull | list | add`."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from vaeft import atomic
from vaeft.errors import VaeftError
from vaeft.weights import LOCAL_REGISTRY, WeightFile, WeightSpec, registry, spec, weights_dir
from vaeft.weights.download import DigestMismatchError, DownloadError, Progress, fetch
from vaeft.weights.verify import digest_matches, file_sha256, record, recorded_digest


@dataclass(frozen=True)
class FileStatus:
    path: str
    present: bool
    verified: bool | None  # None: present but no pin to verify against (or not present)
    pinned: str  # "sha256", "sha256 prefix" or "none"


@dataclass(frozen=True)
class EntryStatus:
    name: str
    description: str
    files: list[FileStatus]

    @property
    def present(self) -> bool:
        return all(f.present for f in self.files)

    @property
    def verified(self) -> bool:
        return all(f.verified for f in self.files)


def _pin_kind(f: WeightFile) -> str:
    return "sha256" if f.sha256 else "sha256 prefix" if f.sha256_prefix else "none"


def file_status(f: WeightFile, rehash: bool = False) -> FileStatus:
    store = weights_dir()
    path = store / f.path
    if not path.is_file():
        return FileStatus(f.path, False, None, _pin_kind(f))
    digest = None if rehash else recorded_digest(store, f.path)
    if digest is None and rehash:
        digest = file_sha256(path)
        if digest_matches(digest, f.sha256, f.sha256_prefix):
            record(store, f.path, digest)
    if not f.pinned:
        return FileStatus(f.path, True, None, "none")
    return FileStatus(f.path, True, digest is not None and digest_matches(digest, f.sha256, f.sha256_prefix), _pin_kind(f))


def list_weights(rehash: bool = False) -> list[EntryStatus]:
    return [EntryStatus(s.name, s.description, [file_status(f, rehash) for f in s.files]) for s in registry().values()]


@dataclass(frozen=True)
class PullResult:
    name: str
    downloaded: list[str]
    skipped: list[str]  # already present and verified


def pull(
    names: list[str] | None = None,
    progress_factory=None,
    retries: int = 5,
    backoff: float = 1.0,
) -> list[PullResult]:
    """Download the named entries (default: all) into the store; files already verified are kept."""
    specs = registry()
    chosen = [spec(n) for n in names] if names else list(specs.values())
    store = weights_dir()
    results = []
    for s in chosen:
        done, skipped = [], []
        for f in s.files:
            dest = store / f.path
            if dest.is_file():
                st = file_status(f, rehash=recorded_digest(store, f.path) is None)
                if (st.verified or (st.verified is None and st.pinned == "none")) and \
                        (not s.extract or recorded_digest(store, f.path) is not None):
                    skipped.append(f.path)
                    continue
                dest.unlink()  # present but wrong: fetch again
            if not f.url and s.hub is None:
                raise VaeftError(f"weights {s.name!r}: {f.path} has no URL; bring it with `vaeft weights add`")
            progress: Progress | None = progress_factory(f"{s.name}: {Path(f.path).name}") if progress_factory else None
            if s.hub is not None:
                got_digest = _pull_hub(s, f, dest)
            else:
                got_digest = fetch(f.url, dest, f.sha256, f.sha256_prefix, retries=retries, backoff=backoff,
                                   progress=progress, size=f.size).sha256
            if s.extract:
                _extract_or_discard(dest)
            # Only now: a zip that does not unpack is never marked verified, so the next pull retries it.
            record(store, f.path, got_digest)
            done.append(f.path)
        results.append(PullResult(s.name, done, skipped))
    return results


def add(name: str, source: str | Path, description: str = "") -> WeightSpec:
    """Copy weights a user brought into the store.

    A registered name must match its pins (mismatch: :class:`DigestMismatchError`, nothing copied).
    A new name is registered in the store's own ``registry.local.yaml`` with the file's digest, so
    the store (DVC-tracked) carries its registration along.
    """
    source = Path(source)
    if not source.exists():
        raise VaeftError(f"{source}: no such file or folder")
    store = weights_dir()
    known = registry()
    if name in known:
        s = known[name]
        if len(s.files) == 1:
            pairs = [(s.files[0], source if source.is_file() else source / Path(s.files[0].path).name)]
        else:
            if not source.is_dir():
                raise VaeftError(f"weights {name!r} are a set of files: give the folder that holds them")
            pairs = [(f, source / Path(f.path).relative_to(s.path)) for f in s.files]
        digests = {}
        for f, src in pairs:
            if not src.is_file():
                raise VaeftError(f"weights {name!r}: {src} is missing")
            digest = file_sha256(src)
            if not digest_matches(digest, f.sha256, f.sha256_prefix):
                raise DigestMismatchError(
                    f"{src}: sha256 {digest} does not match the pinned {f.sha256 or f.sha256_prefix + '... (prefix)'} "
                    f"of {name!r}; not added"
                )
            digests[f.path] = digest
        for f, src in pairs:
            _copy(src, store / f.path)
            if s.extract:
                _extract_or_discard(store / f.path)
            record(store, f.path, digests[f.path])
        return s
    if not source.is_file():
        raise VaeftError(f"{source}: a new weights entry must be one file")
    rel = f"local/{name}/{source.name}"
    digest = file_sha256(source)
    _copy(source, store / rel)
    record(store, rel, digest)
    local = store / LOCAL_REGISTRY
    raw = (yaml.safe_load(local.read_text(encoding="utf-8")) if local.is_file() else None) or {}
    raw.setdefault("weights", {})[name] = {
        "path": rel, "url": None, "sha256": digest, "description": description or f"added from {source.name}",
    }
    atomic.write_text(local, yaml.safe_dump(raw, sort_keys=False))
    return spec(name)


def extract_zip(archive: Path) -> list[Path]:
    """Unpack a zip beside itself and verify what was unpacked.

    Members that would land outside that folder are refused. Each member is checked as it is
    written (zipfile raises on a CRC mismatch at its end) and again on disk afterwards (size), so
    a truncated or corrupt archive is an error, never a silently short file.
    """
    import zipfile
    import zlib

    root = archive.parent.resolve()
    out = []
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for member in members:
                target = (root / member.filename).resolve()
                if root not in target.parents:
                    raise VaeftError(f"{archive}: member {member.filename!r} would extract outside {root}")
            for member in members:
                if member.is_dir():
                    continue
                target = (root / member.filename).resolve()
                with zf.open(member) as src, atomic.atomic_path(target) as tmp, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                out.append(target)
            for member, target in zip([m for m in members if not m.is_dir()], out, strict=True):
                if target.stat().st_size != member.file_size:
                    raise ZipVerifyError(f"{archive}: {member.filename} unpacked to {target.stat().st_size} bytes, "
                                         f"expected {member.file_size}")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, ValueError) as err:
        raise ZipVerifyError(f"{archive}: not a valid zip ({type(err).__name__}: {err})") from None
    return out


class ZipVerifyError(VaeftError):
    pass


def _extract_or_discard(archive: Path) -> None:
    """Extract; on failure remove the archive, so a corrupt download is fetched again next time."""
    try:
        extract_zip(archive)
    except ZipVerifyError as err:
        archive.unlink(missing_ok=True)
        raise ZipVerifyError(f"{err}; the archive was deleted: pull again") from None


def _pull_hub(s: WeightSpec, f: WeightFile, dest: Path) -> str:
    """One file of a Hugging Face Hub repo at its pinned revision, through ``huggingface_hub``.

    Its cache (``$HF_HOME``) and resumable downloads do the fetching, and ``HF_HUB_OFFLINE=1``
    serves a populated cache without the network; the store gets a verified copy.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    assert s.hub is not None
    filename = str(Path(f.path).relative_to(s.path)) if len(s.files) > 1 else Path(f.path).name
    # Read at call time (huggingface_hub reads its environment once, at import).
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    cache = os.environ.get("HF_HUB_CACHE") or (os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None)
    try:
        cached = Path(hf_hub_download(s.hub.repo, filename, revision=s.hub.revision, cache_dir=cache,
                                      local_files_only=offline))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise DownloadError(f"weights {s.name!r}: {s.hub.repo}@{s.hub.revision}/{filename}: "
                            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    digest = file_sha256(cached)
    if not digest_matches(digest, f.sha256, f.sha256_prefix):
        raise DigestMismatchError(f"{s.hub.repo}@{s.hub.revision}/{filename}: sha256 {digest} does not match "
                                  f"the pinned {f.sha256 or f.sha256_prefix}; the store was not changed")
    if f.size is not None and cached.stat().st_size != f.size:
        raise DownloadError(f"{s.hub.repo}@{s.hub.revision}/{filename}: {cached.stat().st_size} bytes, "
                            f"expected {f.size}")
    _copy(cached, dest)
    return digest


def _copy(src: Path, dest: Path) -> None:
    with atomic.atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
