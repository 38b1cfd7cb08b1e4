"""S3 publishing against moto's real S3 HTTP server on 127.0.0.1 (no AWS, no mocks of our code)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from vaeft.export.release import write_sums
from vaeft.publish.local import PublishConflictError, release_version
from vaeft.publish.s3 import S3Target, make_client, publish_s3

MB = 1024 * 1024


def _target(endpoint: str, bucket: str) -> S3Target:
    # 5 MiB is S3's smallest multipart part: the 11 MiB file below goes up in 3 parts.
    t = S3Target(bucket=bucket, prefix="releases", endpoint_url=endpoint, region="us-east-1",
                 multipart_threshold=5 * MB, multipart_chunksize=5 * MB, max_attempts=10)
    make_client(t).create_bucket(Bucket=bucket)
    return t


@pytest.fixture
def export(tmp_path) -> Path:
    """An export-shaped tree (two models, one big file) with its SHA256SUMS."""
    root = tmp_path / "export"
    rng = __import__("random").Random(0)
    for model in ("ft-ema", "ft-mse"):
        (root / model / "diffusers").mkdir(parents=True)
        (root / model / "ldm").mkdir()
        (root / model / "diffusers" / "config.json").write_text(f'{{"model": "{model}"}}')
        (root / model / "ldm" / f"{model}.safetensors").write_bytes(rng.randbytes(1000))
        (root / model / "README.md").write_text(f"# {model}\n")
    (root / "ft-mse" / "diffusers" / "diffusion_pytorch_model.safetensors").write_bytes(rng.randbytes(11 * MB))
    write_sums(root)
    return root


def _objects(client, bucket: str) -> dict[str, dict]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            out[o["Key"]] = o
    return out


def _expected_keys(export: Path, receipts: bool = True) -> set[str]:
    v = release_version(export)
    keys = {f"releases/_release/{v}/SHA256SUMS"}
    for line in (export / "SHA256SUMS").read_text().splitlines():
        model, _, inner = line.split("  ", 1)[1].partition("/")
        keys |= {f"releases/{model}/{v}/{inner}", f"releases/{model}/{v}/SHA256SUMS"}
    if receipts:
        keys |= {f"releases/{m}/{v}/receipts/r1.json" for m in ("ft-ema", "ft-mse")}
        keys.add(f"releases/_release/{v}/receipts/r1.json")
    return keys


def test_publish_layout_multipart_and_idempotent(s3_endpoint, export):
    target = _target(s3_endpoint, "pub-idem")
    client = make_client(target)
    first = publish_s3(export, target, receipt=b'{"r": 1}\n', receipt_name="r1")
    objs = _objects(client, "pub-idem")
    assert set(objs) == _expected_keys(export)
    assert sorted(first.uploaded) == sorted(f"s3://pub-idem/{k}" for k in objs) and not first.skipped
    v = first.version
    big = f"releases/ft-mse/{v}/diffusers/diffusion_pytorch_model.safetensors"
    assert objs[big]["ETag"].strip('"').endswith("-3")  # three multipart parts
    head = client.head_object(Bucket="pub-idem", Key=big)
    body = client.get_object(Bucket="pub-idem", Key=big)["Body"].read()
    assert head["Metadata"]["sha256"] == hashlib.sha256(body).hexdigest()
    # Per-model SHA256SUMS are relative to the model prefix, so `sha256sum -c` works after a sync.
    sums = client.get_object(Bucket="pub-idem", Key=f"releases/ft-ema/{v}/SHA256SUMS")["Body"].read().decode()
    assert "  ldm/ft-ema.safetensors\n" in sums and "ft-mse" not in sums

    second = publish_s3(export, target, receipt=b'{"r": 1}\n', receipt_name="r1")
    assert second.uploaded == [] and sorted(second.skipped) == sorted(first.uploaded)
    assert {k: o["LastModified"] for k, o in _objects(client, "pub-idem").items()} == \
        {k: o["LastModified"] for k, o in objs.items()}


def test_publish_refuses_to_overwrite_a_different_object(s3_endpoint, export):
    target = _target(s3_endpoint, "pub-conflict")
    client = make_client(target)
    key = f"releases/ft-ema/{release_version(export)}/README.md"
    client.put_object(Bucket="pub-conflict", Key=key, Body=b"someone else's card")
    with pytest.raises(PublishConflictError, match="refusing to overwrite"):
        publish_s3(export, target)
    assert client.get_object(Bucket="pub-conflict", Key=key)["Body"].read() == b"someone else's card"


def test_publish_survives_a_flaky_endpoint_without_duplicates(s3_endpoint, export):
    """The endpoint drops replies and answers 503 for a while; botocore's retries finish the job.

    Dropped replies are sent for real first (the server applied the PUT, the client never heard),
    the hardest case for idempotency.
    """
    from botocore.awsrequest import AWSResponse
    from botocore.exceptions import ConnectionClosedError
    from botocore.httpsession import URLLib3Session

    target = _target(s3_endpoint, "pub-flaky")
    client = make_client(target)
    calls = {"n": 0, "dropped": 0, "503": 0}
    wire = URLLib3Session()

    class _Raw:
        def stream(self, **_):
            yield b"<Error><Code>ServiceUnavailable</Code><Message>slow down</Message></Error>"

    def flaky(request, **_):
        calls["n"] += 1
        if calls["n"] > 30:
            return None
        if calls["n"] % 3 == 0:
            wire.send(request)  # applied server-side, reply lost
            calls["dropped"] += 1
            raise ConnectionClosedError(endpoint_url=request.url)
        if calls["n"] % 3 == 1:
            calls["503"] += 1
            return AWSResponse(request.url, 503, {}, _Raw())
        return None

    client.meta.events.register("before-send.s3", flaky)
    res = publish_s3(export, target, receipt=b"{}\n", receipt_name="r1", client=client)
    assert calls["dropped"] >= 5 and calls["503"] >= 5
    objs = _objects(client, "pub-flaky")
    assert set(objs) == _expected_keys(export)
    assert len(res.objects) == len(objs)
    assert not client.list_multipart_uploads(Bucket="pub-flaky").get("Uploads")
    for key in objs:  # every object is whole and matches its recorded sha256
        body = client.get_object(Bucket="pub-flaky", Key=key)["Body"].read()
        assert client.head_object(Bucket="pub-flaky", Key=key)["Metadata"]["sha256"] == hashlib.sha256(body).hexdigest()


def test_metadata_that_claims_the_right_digest_is_not_trusted(s3_endpoint, export):
    target = _target(s3_endpoint, "pub-liar")
    client = make_client(target)
    key = f"releases/ft-ema/{release_version(export)}/README.md"
    right = hashlib.sha256((export / "ft-ema" / "README.md").read_bytes()).hexdigest()
    client.put_object(Bucket="pub-liar", Key=key, Body=b"# not the card\n", Metadata={"sha256": right})
    with pytest.raises(PublishConflictError, match="README.md"):
        publish_s3(export, target)
    assert client.get_object(Bucket="pub-liar", Key=key)["Body"].read() == b"# not the card\n"


def test_a_conflict_at_the_second_model_publishes_nothing(s3_endpoint, export):
    target = _target(s3_endpoint, "pub-half")
    client = make_client(target)
    v = release_version(export)
    key = f"releases/ft-mse/{v}/ldm/ft-mse.safetensors"
    client.put_object(Bucket="pub-half", Key=key, Body=b"other weights")
    with pytest.raises(PublishConflictError, match="nothing was uploaded"):
        publish_s3(export, target, receipt=b"{}\n", receipt_name="r1")
    assert set(_objects(client, "pub-half")) == {key}  # ft-ema, listed first, was not published either


def test_leftover_multipart_uploads_are_aborted_and_identical_objects_verified_by_content(s3_endpoint, export):
    target = _target(s3_endpoint, "pub-left")
    client = make_client(target)
    v = release_version(export)
    big = f"releases/ft-mse/{v}/diffusers/diffusion_pytorch_model.safetensors"
    up = client.create_multipart_upload(Bucket="pub-left", Key=big)  # a killed run's leftover
    client.upload_part(Bucket="pub-left", Key=big, UploadId=up["UploadId"], PartNumber=1, Body=b"x" * (5 * MB))
    first = publish_s3(export, target)
    assert not client.list_multipart_uploads(Bucket="pub-left").get("Uploads")
    small = f"releases/ft-ema/{v}/README.md"
    head = client.head_object(Bucket="pub-left", Key=small, ChecksumMode="ENABLED")
    assert head.get("ChecksumSHA256")  # the store checked and kept its own SHA-256
    second = publish_s3(export, target)
    assert second.uploaded == [] and sorted(second.skipped) == sorted(first.uploaded)


def test_store_failures_are_one_line_errors(s3_endpoint, export):
    from vaeft.errors import VaeftError

    target = S3Target(bucket="no-such-bucket", prefix="releases", endpoint_url=s3_endpoint, region="us-east-1",
                      max_attempts=1)
    with pytest.raises(VaeftError) as info:
        publish_s3(export, target)
    msg = str(info.value)
    assert "\n" not in msg and "NoSuchBucket" in msg and "s3://no-such-bucket/releases" in msg
