"""The ``publish`` flow: publish the repo's exported, DVC-tracked release.

    python -m flows.publish                      # local target from params.yaml
    python -m flows.publish --s3-bucket B --s3-endpoint-url http://127.0.0.1:9000

Targets: the local directory (always), S3 (``publish.s3`` in params or flow parameter ``s3``),
the Hugging Face Hub (``publish.hub.enabled``). A receipt is written next to the local release
(``<target>/<version>/receipts/<id>.json``), uploaded beside every S3 prefix, and attached to the
run as an artifact, with links to what was published and ``dvc metrics diff`` against the
previous release.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

from flows.config import add_s3_arguments, flow_config, s3_from_args, user_errors_in_one_line
from tasks.dvc_stage import dvc, stage_is_stale
from tasks.publish import publish_release, publish_release_hub, publish_release_s3, s3_target
from vaeft import runtime_env
from vaeft.config import HubPublishParams, ParamsError, S3PublishParams, load_params
from vaeft.publish.local import release_version
from vaeft.publish.receipt import build_receipt, receipt_bytes, receipt_id, write_receipt
from vaeft.publish.s3 import planned_uris

runtime_env.configure()

EXPORT_STAGE = "export"


class PublishSummary(BaseModel):
    release: str
    local: str
    uploaded: bool  # anything new written anywhere
    s3: list[str] = []  # every object of the release on S3 (new or already there)
    hub: dict[str, str] = {}
    receipt: str
    receipt_json: dict


def previous_release_commit(target: Path) -> str | None:
    """The git commit of the release LATEST points to (from its receipt), if any."""
    latest = target / "LATEST"
    if not latest.is_file():
        return None
    for path in sorted((target / latest.read_text().strip() / "receipts").glob("*.json")):
        commit = json.loads(path.read_text()).get("git", {}).get("commit")
        if commit:
            return commit
    return None


def metrics_diff(repo: Path, rev: str | None) -> str:
    proc = dvc(repo, "metrics", "diff", rev or "HEAD", "--md", capture=True)
    if proc.returncode != 0:
        return f"`dvc metrics diff` failed: {(proc.stderr or proc.stdout).strip()[-500:]}"
    return proc.stdout.strip() or "No metric changes."


def _check_export(repo: Path) -> Path:
    export_dir = repo / EXPORT_STAGE
    lock = repo / "dvc.lock"
    if not lock.is_file() or f"\n  {EXPORT_STAGE}:" not in "\n" + lock.read_text(encoding="utf-8"):
        raise ParamsError(f"{repo}: the export stage has never run (no dvc.lock entry); run retrain first")
    if stage_is_stale(repo, EXPORT_STAGE):
        raise ParamsError(f"{export_dir}: out of date with dvc.lock (`dvc status export`); run retrain first")
    return export_dir


@flow(name="publish", log_prints=True)
def publish(repo: str | None = None, publish_to: str | None = None,
            s3: S3PublishParams | None = None, hub: HubPublishParams | None = None,
            dvc_remote: str | None = None) -> PublishSummary:
    """Publish ``repo``'s export (checked against dvc.lock) to every configured target.

    ``dvc_remote``: the DVC remote the run used, recorded in the receipt (default: the repo's default).
    """
    cfg = flow_config(repo=repo and Path(repo), publish_to=publish_to and Path(publish_to), s3=s3, hub=hub)
    params = load_params(cfg.repo / "params.yaml")
    export_dir = _check_export(cfg.repo)
    version = release_version(export_dir)
    local = cfg.local_target(params)
    s3p, hubp = cfg.s3_target(params), cfg.hub_target(params)
    diff_md = metrics_diff(cfg.repo, previous_release_commit(local))

    # Where things will be, known before uploading, so one receipt can travel with the release.
    published: dict[str, object] = {"local": str(local / version)}
    if s3p:
        published["s3"] = planned_uris(export_dir, s3_target(s3p))
    if hubp.enabled:
        models = sorted(p.name for p in export_dir.iterdir() if p.is_dir())
        published["hub"] = {m: f"https://huggingface.co/{hubp.repo_prefix}{m}/tree/{version}" for m in models}
    receipt = build_receipt(cfg.repo, export_dir, published, dvc_remote=dvc_remote)

    local_result = publish_release(str(export_dir), str(local))
    receipt_path = write_receipt(receipt, local_result.path)
    uploaded = local_result.uploaded
    s3_objects: list[str] = []
    if s3p:
        res = publish_release_s3(str(export_dir), s3p, receipt_bytes(receipt), receipt_id(receipt))
        s3_objects, uploaded = res.objects, uploaded or bool(res.uploaded)
    hub_urls = publish_release_hub(str(export_dir), hubp.repo_prefix, hubp.private) if hubp.enabled else {}

    links = [f"- local: `{local_result.path}`"]
    links += [f"- s3 `{m}`: `{uri}`" for m, uri in published.get("s3", {}).items()]  # type: ignore[union-attr]
    links += [f"- hub `{m}`: [{u}]({u})" for m, u in hub_urls.items()]
    create_markdown_artifact(key="published", markdown=f"# Release {version}\n\n" + "\n".join(links),
                             description="Where this release was published")
    create_markdown_artifact(key="metrics-diff", markdown=f"# dvc metrics diff vs previous release\n\n{diff_md}",
                             description="Eval metrics against the previous published release")
    create_markdown_artifact(key="receipt", markdown=f"```json\n{receipt_bytes(receipt).decode()}```",
                             description=f"Receipt (also at {receipt_path})")
    print(f"published release {version}: {local_result.path}; receipt {receipt_path}")
    return PublishSummary(release=version, local=str(local_result.path), uploaded=uploaded, s3=s3_objects,
                          hub=hub_urls, receipt=str(receipt_path), receipt_json=receipt)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m flows.publish", description=__doc__.split("\n")[0])
    ap.add_argument("--repo")
    ap.add_argument("--publish-to")
    add_s3_arguments(ap)
    args = ap.parse_args(argv)
    with user_errors_in_one_line():
        publish(repo=args.repo, publish_to=args.publish_to, s3=s3_from_args(args))


if __name__ == "__main__":
    main()
