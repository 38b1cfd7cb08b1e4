"""The one HTTP fetcher (weight store, COCO, curation URLs): resumable, retried, length- and digest-checked.

A download goes to ``<file>.part`` and is renamed into place only after its length and digest
matched, so nothing ever holds a half or wrong file under its real name. Every response is
checked against what it promises: a body shorter than its Content-Length is incomplete (resumed),
a 206 must carry ``Content-Range: bytes <what we have>-…``, and a 200 to a Range request means
the server ignored the range, so the part is started over rather than appended to. A digest
mismatch deletes the download and fails loudly: retrying a corrupted mirror would only fetch the
same bytes again. :func:`fetch_bytes` is the same machinery into memory, with a size cap.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from vaeft.errors import VaeftError
from vaeft.hashing import file_sha256

CHUNK = 1 << 20
USER_AGENT = "vaeft-fetch/1"
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


class DownloadError(VaeftError):
    def __init__(self, message: str, why: str = "") -> None:
        super().__init__(message)
        self.why = why or message  # the short cause, without the URL (curation reports it per row)


class DigestMismatchError(DownloadError):
    pass


class TooLargeError(DownloadError):
    pass


class _Incomplete(Exception):
    """This attempt ended early or was inconsistent; the next one resumes (or restarts)."""


@dataclass(frozen=True)
class Fetched:
    path: Path
    sha256: str
    bytes: int
    attempts: int
    resumed: bool  # a later attempt continued a partial download


Progress = Callable[[int, int | None], None]  # (bytes so far, total or None)


def _restart(fh: BinaryIO) -> None:
    fh.seek(0)
    fh.truncate()


def _attempt(url: str, fh: BinaryIO, timeout: float, progress: Progress | None, max_bytes: int | None,
             user_agent: str) -> None:
    """One request appending to ``fh`` (positioned at its end). Returns when the body is whole;
    raises :class:`_Incomplete` when it is not, having left ``fh`` holding only good bytes."""
    have = fh.seek(0, io.SEEK_END)
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise DownloadError(f"{url}: only http(s) URLs are fetched")
    req = urllib.request.Request(url, headers={"User-Agent": user_agent})  # noqa: S310 - scheme checked above
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - scheme checked above
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:
            # Nothing left to send only if what we have is the whole file; the total says so.
            m = re.fullmatch(r"bytes\s+\*/(\d+)", (err.headers or {}).get("Content-Range", "") or "")
            if m and int(m.group(1)) == have:
                return
            _restart(fh)
            raise _Incomplete(f"HTTP 416 for a resume at byte {have}") from None
        raise
    with resp:
        length = resp.headers.get("Content-Length")
        if have and resp.status == 206:
            m = _CONTENT_RANGE.fullmatch((resp.headers.get("Content-Range") or "").strip())
            if not m or int(m.group(1)) != have:
                # Bytes from elsewhere in the file: appending them would corrupt it silently.
                _restart(fh)
                raise _Incomplete(f"206 with Content-Range {resp.headers.get('Content-Range')!r} "
                                  f"for a resume at byte {have}")
            total = int(m.group(3)) if m.group(3) != "*" else int(m.group(2)) + 1
            if length is not None and int(length) != int(m.group(2)) - have + 1:
                _restart(fh)
                raise _Incomplete("206 whose Content-Length disagrees with its Content-Range")
        else:
            if have:
                _restart(fh)  # the server ignored Range (200): its body is the whole file
                have = 0
            total = int(length) if length is not None else None
        if max_bytes is not None and total is not None and total > max_bytes:
            raise TooLargeError(f"{url}: {total} bytes > {max_bytes}")
        done = have
        while True:
            try:
                chunk = resp.read(CHUNK)
            except http.client.IncompleteRead as err:
                fh.write(err.partial)
                raise _Incomplete(f"connection closed after {done + len(err.partial)} of {total} bytes") from None
            if not chunk:
                break
            fh.write(chunk)
            done += len(chunk)
            if max_bytes is not None and done > max_bytes:
                raise TooLargeError(f"{url}: more than {max_bytes} bytes")
            if progress:
                progress(done, total)
        if total is not None and done != total:
            raise _Incomplete(f"connection closed after {done} of {total} bytes")


def _transfer(url: str, fh: BinaryIO, *, retries: int, backoff: float, timeout: float,
              progress: Progress | None = None, max_bytes: int | None = None,
              user_agent: str = USER_AGENT, where: str = "") -> int:
    """Fill ``fh`` with the whole body of ``url``; returns the number of attempts."""
    last = ""
    for attempt in range(1, retries + 2):
        try:
            _attempt(url, fh, timeout, progress, max_bytes, user_agent)
            return attempt
        except _Incomplete as err:
            last = str(err)
        except urllib.error.HTTPError as err:
            if 400 <= err.code < 500 and err.code not in (408, 429):
                raise DownloadError(f"{url}: HTTP {err.code} {err.reason}", f"HTTP {err.code}") from None
            last = f"HTTP {err.code}"
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError) as err:
            reason = getattr(err, "reason", None) or err
            last = (f"timeout after {timeout:g}s" if isinstance(reason, TimeoutError)
                    else f"{type(reason).__name__}: {reason}")
        except ValueError as err:  # malformed URL: retrying cannot help
            raise DownloadError(f"{url}: {err}", f"ValueError: {err}") from None
        if attempt <= retries:
            time.sleep(min(backoff * 2 ** (attempt - 1), 30.0))
    why = f"{last} ({retries + 1} attempts)"
    raise DownloadError(f"{url}: failed after {retries + 1} attempts ({last}){where}", why)


def fetch(
    url: str,
    dest: str | Path,
    sha256: str | None = None,
    sha256_prefix: str | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
    progress: Progress | None = None,
    size: int | None = None,
) -> Fetched:
    """Download ``url`` to ``dest``; resume and retry on dropped connections; verify size and pin.

    The returned digest is of exactly the bytes that were fetched, pinned or not, for the caller
    to record.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    resumed = part.exists() and part.stat().st_size > 0
    with open(part, "r+b" if part.exists() else "w+b") as fh:
        attempts = _transfer(url, fh, retries=retries, backoff=backoff, timeout=timeout, progress=progress,
                             where=f"; rerun to resume from {part}")
        fh.flush()
        os.fsync(fh.fileno())
    got = part.stat().st_size
    if size is not None and got != size:
        part.unlink()
        raise DownloadError(f"{url}: size {got} bytes, expected {size}; the download was deleted")
    digest = file_sha256(part)
    if not (digest == sha256.lower() if sha256 else digest.startswith(sha256_prefix.lower()) if sha256_prefix else True):
        part.unlink()
        want = sha256 or f"{sha256_prefix}... (prefix)"
        raise DigestMismatchError(
            f"{url}: sha256 mismatch: expected {want}, got {digest}; the download was deleted. "
            "The mirror or the pin is wrong: do not use this file."
        )
    os.replace(part, dest)
    return Fetched(dest, digest, got, attempts, resumed or attempts > 1)


def fetch_bytes(url: str, max_bytes: int, retries: int = 3, backoff: float = 0.2, timeout: float = 30.0,
                user_agent: str = USER_AGENT) -> tuple[bytes, str]:
    """(body, its sha256) of a small download held in memory; :class:`TooLargeError` past ``max_bytes``."""
    buf = io.BytesIO()
    _transfer(url, buf, retries=retries, backoff=backoff, timeout=timeout, max_bytes=max_bytes,
              user_agent=user_agent)
    body = buf.getvalue()
    return body, hashlib.sha256(body).hexdigest()
