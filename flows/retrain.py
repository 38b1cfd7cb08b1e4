"""The ``retrain`` flow: every DVC stage in order (one task each), then the ``publish`` flow.

    python -m flows.retrain                          # what `make demo` runs (no remote, local publish)
    python -m flows.retrain --dvc-remote storage --s3-bucket B --s3-endpoint-url URL
    python -m flows.retrain --gpus 8                 # train with torchrun, 8 processes (one per GPU)
    python -m flows.retrain --dask-address tcp://dask-scheduler:8786   # curate on a Dask cluster

Flow parameters are validated (:class:`flows.config.FlowConfig`) and params are validated before
anything runs, so a bad invocation fails in a second, not after training. Each stage is skipped
when DVC finds it up to date. With ``dvc_remote`` (a remote the user configured with
``dvc remote add``; credentials from the AWS chain), inputs and the run-cache are pulled first
and outputs plus the run-cache are pushed after the last stage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from pydantic import BaseModel

from flows.config import add_s3_arguments, flow_config, s3_from_args, user_errors_in_one_line
from flows.publish import PublishSummary, publish
from tasks.dvc_stage import (
    StageFailed,
    StageResult,
    StageUserError,
    pipeline_stages,
    pull_inputs,
    push_outputs,
    run_stage,
)
from vaeft import runtime_env
from vaeft.config import HubPublishParams, S3PublishParams, load_params

runtime_env.configure()


class RetrainSummary(BaseModel):
    repo: str
    stages: dict[str, bool]  # stage -> ran (False: DVC found it unchanged)
    export_dir: str
    published: str
    release: str
    uploaded: bool
    publish: PublishSummary


@flow(name="retrain", log_prints=True)
def retrain(repo: str | None = None, publish_to: str | None = None, params_file: str | None = None,
            recipe: str | None = None, dvc_remote: str | None = None,
            s3: S3PublishParams | None = None, hub: HubPublishParams | None = None,
            gpus: int | None = None, curate_engine: str | None = None,
            dask_address: str | None = None) -> RetrainSummary:
    """Run the DVC pipeline of ``repo`` (default: this checkout) and publish its export.

    ``gpus``: training processes on this machine (torchrun, one per GPU). ``curate_engine`` /
    ``dask_address``: run curation's work shards on Dask (a local cluster, or the scheduler at
    the address); the curated data is byte-identical to the local engine's.
    """
    cfg = flow_config(repo=repo and Path(repo), publish_to=publish_to and Path(publish_to),
                      params_file=params_file and Path(params_file), recipe=recipe,
                      dvc_remote=dvc_remote, s3=s3, hub=hub, gpus=gpus, curate_engine=curate_engine,
                      dask_address=dask_address)
    cfg.check_sources(cfg.apply_params())
    root = cfg.repo

    if cfg.dvc_remote:
        pull_inputs(str(root), cfg.dvc_remote)
    results: list[StageResult] = []
    for stage in pipeline_stages(root):
        results.append(run_stage(stage, str(root), cfg.stage_env() or None))
    if cfg.dvc_remote:
        push_outputs(str(root), cfg.dvc_remote)

    report = root / "reports" / "eval"
    table = report / "eval_table.md"
    if table.is_file():
        create_markdown_artifact(key="eval-table", markdown=table.read_text(encoding="utf-8"),
                                 description="Reconstruction metrics on the eval split")
    grid = report / "comparison_grid.png"
    if grid.is_file():
        create_link_artifact(key="comparison-grid", link=grid.resolve().as_uri(),
                             description="Originals vs reconstructions (DVC out reports/eval)")

    pub = publish(repo=str(root), publish_to=str(cfg.publish_to) if cfg.publish_to else None,
                  s3=cfg.s3, hub=cfg.hub, dvc_remote=cfg.dvc_remote)
    summary = RetrainSummary(
        repo=str(root),
        stages={r.stage: r.ran for r in results},
        export_dir=str(root / "export"),
        published=pub.local,
        release=pub.release,
        uploaded=pub.uploaded,
        publish=pub,
    )
    ran = [s for s, r in summary.stages.items() if r]
    print(f"stages run: {', '.join(ran) or 'none (all up to date)'}")
    print(f"models (diffusers): {root / 'export'}/<model>/diffusers")
    print(f"eval report: {report}  metrics: {root / 'metrics' / 'eval.json'}")
    print(f"published release {pub.release}: {pub.local}")
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m flows.retrain", description=__doc__.split("\n")[0])
    ap.add_argument("--repo")
    ap.add_argument("--params-file")
    ap.add_argument("--recipe")
    ap.add_argument("--dvc-remote")
    ap.add_argument("--publish-to")
    ap.add_argument("--gpus", type=int, help="training processes on this machine (torchrun, one per GPU)")
    ap.add_argument("--curate-engine", choices=["local", "dask"], help="where curation runs (default: data.engine)")
    ap.add_argument("--dask-address", help="Dask scheduler for curation, tcp://HOST:8786 (implies --curate-engine dask)")
    add_s3_arguments(ap)
    args = ap.parse_args(argv)
    with user_errors_in_one_line(StageUserError):
        s3 = s3_from_args(args)
        # Before the flow starts Prefect's server (many seconds): a typo fails at once, in one line.
        cfg = flow_config(repo=args.repo and Path(args.repo), params_file=args.params_file and Path(args.params_file),
                          recipe=args.recipe, dvc_remote=args.dvc_remote,
                          publish_to=args.publish_to and Path(args.publish_to), s3=s3, gpus=args.gpus,
                          curate_engine=args.curate_engine, dask_address=args.dask_address)
        cfg.check_sources(load_params(cfg.source_params()))
        try:
            retrain(repo=args.repo, params_file=args.params_file, recipe=args.recipe,
                    dvc_remote=args.dvc_remote, publish_to=args.publish_to, s3=s3, gpus=args.gpus,
                    curate_engine=args.curate_engine, dask_address=args.dask_address)
        except StageUserError:
            raise
        except StageFailed as err:  # may pass on a retry: exit 1, the traceback is Prefect's above
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)

if __name__ == "__main__":
    main()
