"""The ``evaluate`` flow: evaluate given checkpoints on given eval sets, on demand or on a cron.

    python -m flows.evaluate run  -m ft-mse=models/ft-mse -d data/curated --out reports/adhoc
    python -m flows.evaluate serve --cron "0 3 * * *" -m ft-mse=models/ft-mse -d data/curated --out reports/nightly

``serve`` registers a deployment with that cron schedule and keeps a process polling for its runs
(Prefect's ``Flow.serve``); use ``prefect deploy`` with :func:`deployment` for a worker pool.
Each eval set gets ``<out>/<set>/{metrics.json, report/, receipt.json}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context

from flows.config import user_errors_in_one_line
from vaeft import atomic, runtime_env
from vaeft.config import load_params
from vaeft.hashing import file_sha256, tree_sha256
from vaeft.provenance import git_commit
from vaeft.runtime_env import PROJECT_ROOT

runtime_env.configure()

DEPLOYMENT_NAME = "evaluate-scheduled"


@task(name="evaluate-set", task_run_name="{name}", cache_policy=NO_CACHE)
def evaluate_set(name: str, data: str, checkpoints: dict[str, str], params_file: str, out: str) -> dict[str, Any]:
    from vaeft.evaluate.report import GRID_FILE, TABLE_FILE, evaluate_models

    params = load_params(params_file)
    out_dir = Path(out)
    res = evaluate_models(params.evaluate, data, checkpoints, out_dir / "metrics.json", out_dir / "report")
    create_markdown_artifact(key=f"eval-table-{_key(name)}",
                             markdown=(res.report_dir / TABLE_FILE).read_text(encoding="utf-8"),
                             description=f"Eval table on {name} ({data})")
    grid = res.report_dir / GRID_FILE
    if grid.is_file():
        create_link_artifact(key=f"comparison-grid-{_key(name)}", link=grid.resolve().as_uri(),
                             description=f"Comparison grid on {name}")
    return {"metrics": res.metrics, "report": str(res.report_dir), "metrics_file": str(res.metrics_file)}


def _key(name: str) -> str:
    # Prefect artifact keys: lowercase letters, digits and dashes only.
    return "".join(c if c.isalnum() else "-" for c in name.lower())


def _flow_run_id() -> str | None:
    try:
        return str(get_run_context().flow_run.id)  # type: ignore[union-attr]
    except Exception:  # noqa: BLE001 - outside a run
        return None


@flow(name="evaluate", log_prints=True)
def evaluate(checkpoints: dict[str, str], eval_sets: dict[str, str], out: str,
             params_file: str | None = None) -> dict[str, Any]:
    """``checkpoints``: name -> model dir; ``eval_sets``: name -> curated data dir."""
    if not checkpoints or not eval_sets:
        raise ValueError("evaluate needs at least one checkpoint and one eval set")
    pfile = params_file or str(PROJECT_ROOT / "params.yaml")
    params = load_params(pfile)  # fail on bad params before any model loads
    results = {}
    for name, data in eval_sets.items():
        set_out = Path(out) / name
        results[name] = evaluate_set(name, data, checkpoints, pfile, str(set_out))
        receipt = {
            "flow": "evaluate",
            "flow_run_id": _flow_run_id(),
            "git": git_commit(PROJECT_ROOT),
            "params": params.evaluate.model_dump(mode="json"),
            "params_file_sha256": file_sha256(pfile),
            "checkpoints_sha256": {k: tree_sha256(v) for k, v in checkpoints.items()},
            "eval_set": {"name": name, "path": data, "sha256": tree_sha256(data)},
            "outputs_sha256": {"metrics.json": file_sha256(set_out / "metrics.json"),
                               "report": tree_sha256(set_out / "report")},
        }
        atomic.write_json(set_out / "receipt.json", receipt)
        create_markdown_artifact(key=f"eval-receipt-{_key(name)}",
                                 markdown=f"```json\n{json.dumps(receipt, indent=2, sort_keys=True)}\n```",
                                 description=f"Receipt (also at {set_out / 'receipt.json'})")
    return results


def deployment(cron: str, checkpoints: dict[str, str], eval_sets: dict[str, str], out: str,
               params_file: str | None = None, name: str = DEPLOYMENT_NAME) -> Any:
    """A deployment of :func:`evaluate` on ``cron`` (for ``serve`` or ``prefect deploy``)."""
    return evaluate.to_deployment(name=name, cron=cron, parameters={
        "checkpoints": checkpoints, "eval_sets": eval_sets, "out": out, "params_file": params_file})


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).name, item
        out[name] = str(Path(path).resolve())
    if not out:
        raise SystemExit(f"error: give at least one {what}")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m flows.evaluate")
    ap.add_argument("mode", choices=["run", "serve"])
    ap.add_argument("-m", "--model", action="append", default=[], help="NAME=MODEL_DIR")
    ap.add_argument("-d", "--data", action="append", default=[], help="[NAME=]CURATED_DIR")
    ap.add_argument("--out", required=True)
    ap.add_argument("--params-file")
    ap.add_argument("--cron", default="0 3 * * *")
    args = ap.parse_args(argv)
    models, sets = _pairs(args.model, "-m NAME=MODEL_DIR"), _pairs(args.data, "-d CURATED_DIR")
    out = str(Path(args.out).resolve())
    if args.mode == "run":
        with user_errors_in_one_line():
            evaluate(models, sets, out, args.params_file)
    else:
        from prefect import serve

        serve(deployment(args.cron, models, sets, out, args.params_file))


if __name__ == "__main__":
    main()
