"""Fetching weight files: resumable (HTTP Range), retried with backoff, sha256-verified.

A download goes to ``<file>.part`` and is renamed into place only after its digest matched, so
the store never holds a half or wrong file under its real name. A digest mismatch deletes the
download and fails loudly: retrying a corrupted mirror would only fetch the same bytes again.
"""

from __future__ import annotations

import http.client
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vaeft.errors import VaeftError
from vaeft.weights.verify import digest_matches, file_sha256

CHUNK = 1 << 20
USER_AGENT = "vaeft-weights/1"


class DownloadError(VaeftError):
    pass


class DigestMismatchError(DownloadError):
    pass


@dataclass(frozen=True)
class Fetched:
    path: Path
    sha256: str
    bytes: int
    attempts: int
    resumed: bool  # a later attempt continued a partial download


Progress = Callable[[int, int | None], None]  # (bytes so far, total or None)


def _attempt(url: str, part: Path, timeout: float, progress: Progress | None) -> bool:
    """One request; appends to ``part``. True when the body arrived complete."""
    have = part.stat().st_size if part.exists() else 0
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise DownloadError(f"{url}: only http(s) URLs are fetched")
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})  # noqa: S310 - scheme checked above
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - scheme checked above
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to send: the part is already whole
            return True
        raise
    with resp:
        if have and resp.status != 206:
            have = 0  # the server ignored Range: start over
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(part, "ab" if have else "wb") as fh:
            done = have
            while chunk := resp.read(CHUNK):
                fh.write(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
            fh.flush()
            os.fsync(fh.fileno())
    return total is None or done == total


def fetch(
    url: str,
    dest: str | Path,
    sha256: str | None = None,
    sha256_prefix: str | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
    progress: Progress | None = None,
) -> Fetched:
    """Download ``url`` to ``dest``; resume and retry on dropped connections; verify the pin."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    resumed = part.exists() and part.stat().st_size > 0
    last: Exception | None = None
    attempts = 0
    for attempts in range(1, retries + 2):
        try:
            if _attempt(url, part, timeout, progress):
                break
            last = DownloadError("connection closed before the whole file arrived")
        except urllib.error.HTTPError as err:
            if 400 <= err.code < 500 and err.code not in (408, 429):
                raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from err
            last = err
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError) as err:
            last = err
        if attempts <= retries:
            resumed = resumed or (part.exists() and part.stat().st_size > 0)
            time.sleep(backoff * 2 ** (attempts - 1))
    else:
        raise DownloadError(f"{url}: failed after {attempts} attempts ({last}); rerun to resume from {part}")
    digest = file_sha256(part)
    if not digest_matches(digest, sha256, sha256_prefix):
        part.unlink()
        want = sha256 or f"{sha256_prefix}... (prefix)"
        raise DigestMismatchError(
            f"{url}: sha256 mismatch: expected {want}, got {digest}; the download was deleted. "
            "The mirror or the pin is wrong: do not use this file."
        )
    os.replace(part, dest)
    return Fetched(dest, digest, dest.stat().st_size, attempts, resumed)
