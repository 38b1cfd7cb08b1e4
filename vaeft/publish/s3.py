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

Guarantees: every object carries its sha256 in metadata (``x-amz-meta-sha256``) and is read back
and hashed after upload; an object already present with the same sha256 is skipped (re-runs upload
nothing); an object present with a different sha256 raises :class:`PublishConflictError` and is
never overwritten. Throttling, 5xx and connection errors are retried with exponential backoff by
botocore's ``standard`` retry mode. Credentials come only from the standard AWS chain
(environment, shared config/credentials files, instance/container roles): nothing here accepts,
logs or records them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vaeft.console import console
from vaeft.export.release import SUMS_FILE, verify_sums
from vaeft.hashing import file_sha256
from vaeft.publish.local import PublishConflictError, release_version

SHA_META = "sha256"
RELEASE_DIR = "_release"
RECEIPTS_DIR = "receipts"
_CHUNK = 1 << 20


class PublishVerifyError(RuntimeError):
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
    """The sha256 recorded on an existing object; None when absent. Objects we did not write
    (no metadata) get hashed from their bytes, so a foreign object still counts as a conflict."""
    from botocore.exceptions import ClientError

    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    meta = head.get("Metadata", {}).get(SHA_META)
    return meta or _download_sha256(client, bucket, key)


def _download_sha256(client: Any, bucket: str, key: str) -> str:
    h = hashlib.sha256()
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    for chunk in iter(lambda: body.read(_CHUNK), b""):
        h.update(chunk)
    return h.hexdigest()


def put_file(client: Any, target: S3Target, path: Path, key: str, result: S3PublishResult,
             sha256: str | None = None) -> None:
    """Upload one file idempotently: skip an identical object, refuse a different one, verify."""
    digest = sha256 or file_sha256(path)
    uri = target.uri(key)
    existing = _remote_sha256(client, target.bucket, key)
    if existing == digest:
        result.skipped.append(uri)
        return
    if existing is not None:
        raise PublishConflictError(f"{uri} exists with sha256 {existing[:12]}…, this release has "
                                   f"{digest[:12]}…; refusing to overwrite a published version")
    client.upload_file(str(path), target.bucket, key, Config=_transfer_config(target),
                       ExtraArgs={"Metadata": {SHA_META: digest}})
    # Read the bytes back: metadata alone only says what we meant to store.
    got = _download_sha256(client, target.bucket, key)
    if got != digest:
        raise PublishVerifyError(f"{uri}: stored bytes hash to {got[:12]}…, expected {digest[:12]}…")
    result.uploaded.append(uri)


def put_bytes(client: Any, target: S3Target, data: bytes, key: str, result: S3PublishResult,
              tmp_dir: Path) -> None:
    path = tmp_dir / hashlib.sha256(key.encode()).hexdigest()
    path.write_bytes(data)
    put_file(client, target, path, key, result)


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

    with tempfile.TemporaryDirectory(prefix="vaeft-publish-") as tmp:
        tmp_dir = Path(tmp)
        for model, files in per_model.items():
            base = target.key(model, version)
            for digest, inner in files:
                put_file(client, target, export_dir / model / inner, f"{base}/{inner}", result, digest)
            sums = "".join(f"{d}  {rel}\n" for d, rel in files).encode()
            put_bytes(client, target, sums, f"{base}/{SUMS_FILE}", result, tmp_dir)
            if receipt is not None:
                put_bytes(client, target, receipt, f"{base}/{RECEIPTS_DIR}/{receipt_name}.json", result, tmp_dir)
            result.models[model] = target.uri(base + "/")
        rel_base = target.key(RELEASE_DIR, version)
        put_file(client, target, export_dir / SUMS_FILE, f"{rel_base}/{SUMS_FILE}", result)
        if receipt is not None:
            put_bytes(client, target, receipt, f"{rel_base}/{RECEIPTS_DIR}/{receipt_name}.json", result, tmp_dir)
    console.print(f"publish s3: release {version}: {len(result.uploaded)} uploaded, "
                  f"{len(result.skipped)} already present")
    return result


def planned_uris(export_dir: str | Path, target: S3Target) -> dict[str, str]:
    """model -> s3:// prefix this export will be published to (for receipts written beforehand)."""
    export_dir = Path(export_dir)
    version = release_version(export_dir)
    models: Iterable[str] = sorted({rel.partition("/")[0] for _, rel in _sums(export_dir)})
    return {m: target.uri(target.key(m, version) + "/") for m in models}
