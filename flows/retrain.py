"""The ``retrain`` flow: every DVC stage in order (one task each), then publish.

    python -m flows.retrain            # what `make demo` runs

Params are validated before anything runs, so a bad params.yaml fails in a second, not after
training. Each stage is skipped when DVC finds it up to date.
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

from tasks.dvc_stage import StageResult, pipeline_stages, run_stage
from tasks.publish import publish_release
from vaeft.config import ParamsError, load_params
from vaeft.runtime_env import PROJECT_ROOT


class RetrainSummary(BaseModel):
    repo: str
    stages: dict[str, bool]  # stage -> ran (False: DVC found it unchanged)
    export_dir: str
    published: str
    release: str
    uploaded: bool


@flow(name="retrain", log_prints=True)
def retrain(repo: str | None = None, publish_to: str | None = None) -> RetrainSummary:
    """Run the DVC pipeline of ``repo`` (default: this checkout) and publish its export."""
    root = Path(repo) if repo else PROJECT_ROOT
    params = load_params(root / "params.yaml")
    target = Path(publish_to or params.publish.target)
    if not target.is_absolute():
        target = root / target

    results: list[StageResult] = []
    for stage in pipeline_stages(root):
        results.append(run_stage(stage, str(root)))
    published = publish_release(str(root / "export"), str(target))

    table = root / "reports" / "eval" / "eval_table.md"
    if table.is_file():
        create_markdown_artifact(key="eval-table", markdown=table.read_text(encoding="utf-8"),
                                 description="Reconstruction metrics on the eval split")
    summary = RetrainSummary(
        repo=str(root),
        stages={r.stage: r.ran for r in results},
        export_dir=str(root / "export"),
        published=str(published.path),
        release=published.version,
        uploaded=published.uploaded,
    )
    ran = [s for s, r in summary.stages.items() if r]
    print(f"stages run: {', '.join(ran) or 'none (all up to date)'}")
    print(f"models (diffusers): {root / 'export'}/<model>/diffusers")
    print(f"eval report: {root / 'reports' / 'eval'}  metrics: {root / 'metrics' / 'eval.json'}")
    print(f"published release {published.version}: {published.path}")
    return summary


def main() -> None:
    try:
        retrain()
    except ParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
