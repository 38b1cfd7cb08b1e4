"""Publish an export to S3 (or any S3-compatible store) with boto3.

Layout — the export holds several models and users fetch one model at a time, so each model is
its own self-contained prefix::

    s3://BUCKET/PREFIX/<model>/<version>/diffusers/config.json
    s3://BUCKET/PREFIX/<model>/<version>/diffusers/diffusion_pytorch_model.safetensors
    s3://BUCKET/PREFIX/<model>/<version>/ldm/<model>.safetensors
    s3://BUCKET/PREFIX/<model>/<version>/README.md                model card
    s3://BUCKET/PREFIX/<model>/<version>/SHA256SUMS               this model's files, paths relative here
    s3://BUCKET/PREFIX/<model>/<version>/receipts/<id>.json       one per distinct publishing run
    s3://BUCKET/PREFIX/_release/<version>/SHA256SUMS              the export's own SHA256SUMS (all models)
    s3://BUCKET/PREFIX/_release/<version>/receipts/<id>.json

``<version>`` is the release version of :func:`vaeft.publish.local.release_version` (a hash of the
export's SHA256SUMS), so the same export always lands at the same keys.

Guarantees:

* Content, not claims, decides. Objects are uploaded with S3's own SHA-256 checksum
  (``ChecksumAlgorithm='SHA256'``, checked by the store on receipt) and read back and hashed after
  upload. An object already at a key counts as ours only when its *bytes* hash to the digest: its
  full-object ``ChecksumSHA256`` when the store kept one, else a re-hash of its body. The
  ``x-amz-meta-sha256`` metadata is written for people, never trusted.
* No half release. Every key of every model is checked before anything is uploaded; any conflict
  (a different object at one of the release's keys) fails the whole publish with nothing written,
  and names every conflicting key.
* Incomplete multipart uploads left at this release's keys by an earlier killed run are aborted
  first, and this run's own are aborted if it fails.
* Failures are one line (:class:`S3PublishError`, a :class:`VaeftError`), never a botocore
  traceback. Throttling, 5xx and connection errors are first retried with exponential backoff by
  botocore's ``standard`` retry mode.

Credentials come only from the standard AWS chain (environment, shared config/credentials files,
instance/container roles): nothing here accepts, logs or records them.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vaeft.console import console
from vaeft.errors import VaeftError
from vaeft.export.release import SUMS_FILE, verify_sums
from vaeft.hashing import file_sha256, stream_sha256
from vaeft.publish.local import PublishConflictError, release_version

SHA_META = "sha256"
RELEASE_DIR = "_release"
RECEIPTS_DIR = "receipts"
_CHUNK = 1 << 20


class S3PublishError(VaeftError, RuntimeError):
    """Publishing to S3 failed (the store refused, was unreachable, or lost bytes)."""


class PublishVerifyError(S3PublishError):
    """An object's bytes in the store do not hash to what was uploaded."""


@dataclass(frozen=True)
class S3Target:
    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None  # S3-compatible stores (MinIO, R2, moto); None: AWS
    region: str | None = None
    multipart_threshold: int = 64 * 1024 * 1024
    multipart_chunksize: int = 16 * 1024 * 1024
    max_attempts: int = 8  # botocore attempts per request, backoff between them

    def key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p.strip("/"))

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


@dataclass
class S3PublishResult:
    version: str
    uploaded: list[str] = field(default_factory=list)  # s3:// URIs written by this run
    skipped: list[str] = field(default_factory=list)  # already present with the same sha256
    models: dict[str, str] = field(default_factory=dict)  # model -> s3:// URI of its version prefix

    @property
    def objects(self) -> list[str]:
        return sorted(self.uploaded + self.skipped)


def make_client(target: S3Target) -> Any:
    """A client whose requests retry throttling, 5xx and connection errors with backoff."""
    import boto3
    from botocore.config import Config

    cfg = Config(retries={"max_attempts": target.max_attempts, "mode": "standard"},
                 connect_timeout=10, read_timeout=120)
    return boto3.session.Session().client("s3", endpoint_url=target.endpoint_url,
                                          region_name=target.region, config=cfg)


def _transfer_config(target: S3Target) -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=target.multipart_threshold,
                          multipart_chunksize=target.multipart_chunksize, max_concurrency=4)


def _remote_sha256(client: Any, bucket: str, key: str) -> str | None:
    """The sha256 of an existing object's bytes; None when there is no object.

    A single-part object's ``ChecksumSHA256`` is the store's own hash of the bytes; a multipart
    object, or one without a checksum, is read back and hashed.
    """
    from botocore.exceptions import ClientError

    try:
        head = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    checksum = head.get("ChecksumSHA256")
    # Only a single-part object's checksum is the hash of its bytes; a multipart one (ETag "…-N")
    # is a hash of part hashes, whatever ChecksumType a store reports.
    if checksum and "-" not in checksum and "-" not in head.get("ETag", "").strip('"'):
        return base64.b64decode(checksum).hex()
    return _download_sha256(client, bucket, key)


def _download_sha256(client: Any, bucket: str, key: str) -> str:
    return stream_sha256(client.get_object(Bucket=bucket, Key=key)["Body"], _CHUNK)


@dataclass(frozen=True)
class _Planned:
    key: str
    path: Path
    sha256: str


def _check(client: Any, target: S3Target, plan: list[_Planned]) -> list[_Planned]:
    """The planned objects still to upload; every conflict at once, before anything is written."""
    todo, conflicts = [], []
    for p in plan:
        existing = _remote_sha256(client, target.bucket, p.key)
        if existing is None:
            todo.append(p)
        elif existing != p.sha256:
            conflicts.append(f"{target.uri(p.key)} (has sha256 {existing[:12]}…, this release {p.sha256[:12]}…)")
    if conflicts:
        more = f" and {len(conflicts) - 3} more" if len(conflicts) > 3 else ""
        raise PublishConflictError(f"{len(conflicts)} key(s) of release hold other objects: {'; '.join(conflicts[:3])}"
                                   f"{more}; refusing to overwrite a published version, nothing was uploaded")
    return todo


def _abort_incomplete(client: Any, target: S3Target, keys: set[str], prefixes: list[str]) -> list[str]:
    """Abort the multipart uploads left open at this release's keys (by a killed or failed run)."""
    aborted = []
    for prefix in prefixes:
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=target.bucket, Prefix=prefix):
            for up in page.get("Uploads", []):
                if up["Key"] in keys:
                    client.abort_multipart_upload(Bucket=target.bucket, Key=up["Key"], UploadId=up["UploadId"])
                    aborted.append(target.uri(up["Key"]))
    return aborted


def put_file(client: Any, target: S3Target, path: Path, key: str, result: S3PublishResult,
             sha256: str | None = None) -> None:
    """Upload one file (the store checks its SHA-256 on receipt), then hash what it stored."""
    digest = sha256 or file_sha256(path)
    uri = target.uri(key)
    client.upload_file(str(path), target.bucket, key, Config=_transfer_config(target),
                       ExtraArgs={"Metadata": {SHA_META: digest}, "ChecksumAlgorithm": "SHA256"})
    # Read the bytes back: what was sent is not proof of what was kept.
    got = _download_sha256(client, target.bucket, key)
    if got != digest:
        raise PublishVerifyError(f"{uri}: stored bytes hash to {got[:12]}…, expected {digest[:12]}…")
    result.uploaded.append(uri)


def _sums(export_dir: Path) -> list[tuple[str, str]]:
    out = []
    for line in (export_dir / SUMS_FILE).read_text(encoding="utf-8").splitlines():
        digest, rel = line.split("  ", 1)
        out.append((digest, rel))
    return out


def publish_s3(export_dir: str | Path, target: S3Target, receipt: bytes | None = None,
               receipt_name: str | None = None, client: Any = None) -> S3PublishResult:
    """Upload ``export_dir`` to ``target`` in the layout above.

    ``receipt`` (JSON bytes) is stored under ``receipts/<receipt_name>.json`` of every prefix;
    give it content that is identical for identical runs (no timestamps) so re-runs stay no-ops.
    ``client`` lets callers bring their own boto3 client (tests, custom sessions).
    """
    import tempfile

    export_dir = Path(export_dir)
    verify_sums(export_dir)  # never publish bytes that differ from the export's own manifest
    version = release_version(export_dir)
    client = client or make_client(target)
    result = S3PublishResult(version)
    per_model: dict[str, list[tuple[str, str]]] = {}
    for digest, rel in _sums(export_dir):
        model, _, inner = rel.partition("/")
        if not inner:
            raise ValueError(f"{export_dir}/{rel}: files at the export root cannot be published per model")
        per_model.setdefault(model, []).append((digest, inner))

    from botocore.exceptions import BotoCoreError, ClientError

    with tempfile.TemporaryDirectory(prefix="vaeft-publish-") as tmp:
        tmp_dir = Path(tmp)

        def blob(data: bytes) -> tuple[Path, str]:
            digest = hashlib.sha256(data).hexdigest()
            path = tmp_dir / digest
            path.write_bytes(data)
            return path, digest

        plan: list[_Planned] = []
        prefixes = []
        for model, files in per_model.items():
            base = target.key(model, version)
            prefixes.append(base + "/")
            plan += [_Planned(f"{base}/{inner}", export_dir / model / inner, digest) for digest, inner in files]
            plan.append(_Planned(f"{base}/{SUMS_FILE}", *blob("".join(f"{d}  {rel}\n" for d, rel in files).encode())))
            if receipt is not None:
                plan.append(_Planned(f"{base}/{RECEIPTS_DIR}/{receipt_name}.json", *blob(receipt)))
            result.models[model] = target.uri(base + "/")
        rel_base = target.key(RELEASE_DIR, version)
        prefixes.append(rel_base + "/")
        plan.append(_Planned(f"{rel_base}/{SUMS_FILE}", export_dir / SUMS_FILE, file_sha256(export_dir / SUMS_FILE)))
        if receipt is not None:
            plan.append(_Planned(f"{rel_base}/{RECEIPTS_DIR}/{receipt_name}.json", *blob(receipt)))
        keys = {p.key for p in plan}
        try:
            aborted = _abort_incomplete(client, target, keys, prefixes)
            todo = _check(client, target, plan)
            pending = {p.key for p in todo}
            result.skipped += [target.uri(p.key) for p in plan if p.key not in pending]
            try:
                for p in todo:
                    put_file(client, target, p.path, p.key, result, p.sha256)
            except BaseException:
                try:
                    _abort_incomplete(client, target, keys, prefixes)
                except (BotoCoreError, ClientError):
                    pass  # the original error matters more; the next run aborts them
                raise
        except (BotoCoreError, ClientError) as err:
            raise S3PublishError(f"publish to s3://{target.bucket}/{target.prefix}: {_one_line(err)}") from None
    note = f", {len(aborted)} incomplete multipart upload(s) aborted" if aborted else ""
    console.print(f"publish s3: release {version}: {len(result.uploaded)} uploaded, "
                  f"{len(result.skipped)} already present{note}")
    return result


def _one_line(err: Exception) -> str:
    response = getattr(err, "response", None)
    if isinstance(response, dict) and response.get("Error"):
        e = response["Error"]
        return f"{type(err).__name__}: {e.get('Code', '?')} {e.get('Message', '')}".strip()
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def planned_uris(export_dir: str | Path, target: S3Target) -> dict[str, str]:
    """model -> s3:// prefix this export will be published to (for receipts written beforehand)."""
    export_dir = Path(export_dir)
    version = release_version(export_dir)
    models: Iterable[str] = sorted({rel.partition("/")[0] for _, rel in _sums(export_dir)})
    return {m: target.uri(target.key(m, version) + "/") for m in models}
