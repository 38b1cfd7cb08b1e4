"""COCO 2017 val (5000 images), the eval set of the published tables; for networked machines.

The archive is verified before anything is extracted. The MD5 below is the one published for
``val2017.zip`` by several independent dataset loaders (it is not stated on cocodataset.org);
the size is 815,585,330 bytes ("778 MB"). No SHA-256 is pinned: none was found documented
by more than one source.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from vaeft import atomic
from vaeft.console import progress
from vaeft.errors import VaeftError
from vaeft.fetch import DownloadError as FetchError
from vaeft.fetch import fetch

COCO_VAL_URL = "http://images.cocodataset.org/zips/val2017.zip"
COCO_VAL_MD5 = "442b8da7639aecaf257c1dceb8ba8c80"
COCO_VAL_SIZE = 815_585_330
COCO_VAL_IMAGES = 5000
_CHUNK = 1 << 20
FETCH_RECORD = "fetched.json"


class DownloadError(VaeftError):
    pass


@dataclass(frozen=True)
class Downloaded:
    archive: Path
    images_dir: Path
    n_images: int
    md5: str
    sha256: str


def _digests(path: Path) -> tuple[str, str]:
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            md5.update(chunk)
            sha.update(chunk)
    return md5.hexdigest(), sha.hexdigest()


def _fetch(url: str, target: Path, timeout: float, size: int | None) -> str:
    """The weight store's fetcher (resumable, length-checked); returns the sha256 of what came."""
    with progress() as bar:
        task = bar.add_task("download", total=size, info=url.rsplit("/", 1)[-1])
        got = fetch(url, target, timeout=timeout, size=size,
                    progress=lambda done, total: bar.update(task, completed=done, total=total))
    return got.sha256


def _safe_extract(archive: Path, out_dir: Path) -> None:
    """Extract and verify: CRCs are checked as members are read, sizes on disk afterwards."""
    try:
        with zipfile.ZipFile(archive) as zf:
            root = out_dir.resolve()
            members = zf.infolist()
            for member in members:
                dest = (out_dir / member.filename).resolve()
                if root != dest and root not in dest.parents:
                    raise DownloadError(f"{archive}: member {member.filename!r} would extract outside {out_dir}")
            zf.extractall(out_dir)
            for member in members:
                dest = out_dir / member.filename
                if not member.is_dir() and (not dest.is_file() or dest.stat().st_size != member.file_size):
                    raise DownloadError(f"{archive}: {member.filename} did not extract whole")
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as err:
        raise DownloadError(f"{archive}: corrupt zip ({type(err).__name__}: {err})") from None


def download_coco_val(
    out_dir: str | Path,
    url: str = COCO_VAL_URL,
    md5: str | None = COCO_VAL_MD5,
    size: int | None = COCO_VAL_SIZE,
    expected_images: int | None = COCO_VAL_IMAGES,
    timeout: float = 60.0,
    *,
    force: bool = False,
) -> Downloaded:
    """Download ``val2017.zip`` into ``out_dir``, verify size and MD5, extract ``val2017/``.

    An archive already there that verifies is not downloaded again. A mismatch removes the
    download and extracts nothing.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise atomic.OutputRefusedError(f"refusing to download into {out_dir}: it is a file, not a folder")
    archive = out_dir / url.rsplit("/", 1)[-1]
    stem = archive.name.removesuffix(".zip")
    images_dir = out_dir / stem
    # Checked before the download (6.4 GB): an extraction replaces this folder.
    atomic.check_dir_target(images_dir, "coco-val", force=force)
    atomic.check_file_target(archive, (".zip",), force=force)
    out_dir.mkdir(parents=True, exist_ok=True)
    fetched = not archive.exists()
    if fetched:
        try:
            _fetch(url, archive, timeout, size)
        except FetchError as err:
            raise DownloadError(str(err)) from None
    actual_size = archive.stat().st_size
    got_md5, got_sha = _digests(archive)
    problems = []
    if size is not None and actual_size != size:
        problems.append(f"size {actual_size} != {size}")
    if md5 is not None and got_md5 != md5.lower():
        problems.append(f"md5 {got_md5} != {md5}")
    if problems:
        if not fetched:  # the user's file: say so, and leave it
            raise DownloadError(f"{archive}: checksum verification failed ({'; '.join(problems)}); "
                                "the file was already there and is left as it is (move it away to download)")
        archive.unlink()
        raise DownloadError(f"{url}: checksum verification failed ({'; '.join(problems)}); the file was removed")
    try:
        with atomic.atomic_dir(images_dir, "coco-val", force=force) as tmp:
            _safe_extract(archive, tmp)
            extracted = tmp / stem
            if not extracted.is_dir():
                raise DownloadError(f"{archive}: expected a top-level folder {stem}/ in the archive")
            for p in extracted.iterdir():
                os.replace(p, tmp / p.name)
            extracted.rmdir()
            n = sum(1 for p in tmp.iterdir() if p.suffix.lower() == ".jpg")
            if expected_images is not None and n != expected_images:
                raise DownloadError(f"{archive}: {n} JPEGs extracted, expected {expected_images}")
            # What was fetched, recorded beside what it unpacked to (written last: marks it whole).
            atomic.write_json(tmp / FETCH_RECORD, {"url": url, "bytes": actual_size, "md5": got_md5,
                                                   "sha256": got_sha})
    except DownloadError as err:
        if fetched:  # ours and unusable: gone, so the next run downloads it again
            archive.unlink(missing_ok=True)
        raise DownloadError(f"{err}{'; the download was removed' if fetched else ''}") from None
    return Downloaded(archive, images_dir, n, got_md5, got_sha)
