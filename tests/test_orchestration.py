"""Orchestration with real components: stage-failure classification, deployments, flow params.

The end-to-end run (S3 DVC remote, S3 publishing, pull, repro determinism) is in test_pipeline.py,
where one training run serves every promise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from .conftest import run_dvc


def _stage_repo(tmp_path: Path, cmd: str) -> Path:
    repo = tmp_path / "stage-repo"
    repo.mkdir()
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"s": {"cmd": cmd, "outs": ["out"]}}}))
    (repo / "params.yaml").write_text("seed: 0\n")
    run_dvc(repo, "init", "--no-scm", "-q")
    return repo


@pytest.mark.parametrize(("cmd", "error", "attempts"), [
    # exit 2 from our CLI = user error: the same on every try, never retried
    ("python -m vaeft curate --params missing.yaml --out out", "StageUserError", 1),
    # anything else may be transient: retried
    ("python -c \"import sys; sys.exit(1)\"", "StageFailed", 3),
])
def test_stage_failures_are_classified_for_retries(prefect_harness, tmp_path, cmd, error, attempts):
    """... and, under the flows' command line wrapper, a user error ends in one line, exit 2."""
    import contextlib
    import io
    import logging

    from prefect import flow
    from prefect.logging.handlers import PrefectConsoleHandler

    from flows.config import user_errors_in_one_line
    from tasks.dvc_stage import StageFailed, StageUserError, run_stage

    repo = _stage_repo(tmp_path, f"echo x >> attempts.txt && {cmd}")

    @flow
    def one_stage() -> None:
        run_stage.with_options(retry_delay_seconds=0, retry_jitter_factor=None)("s", str(repo))

    # A console handler of our own (capfd would leave Prefect's bound to a stream it closes).
    console, stderr = io.StringIO(), io.StringIO()
    handler = PrefectConsoleHandler(stream=console)
    logging.getLogger().addHandler(handler)
    try:
        with (pytest.raises((StageFailed, SystemExit)) as info, contextlib.redirect_stderr(stderr),
              user_errors_in_one_line(StageUserError)):
            one_stage()
    finally:
        logging.getLogger().removeHandler(handler)
    assert (repo / "attempts.txt").read_text().count("x") == attempts
    if error == "StageUserError":
        assert isinstance(info.value, SystemExit) and info.value.code == 2
        assert stderr.getvalue() == "error: stage s: missing.yaml: params file not found\n"
        assert "Beginning flow run" in console.getvalue()  # the console still shows the run ...
        assert "Traceback" not in console.getvalue() and "Failed" not in console.getvalue()  # ... not the error
    else:
        assert type(info.value).__name__ == error
        assert "Traceback" in console.getvalue()  # any other failure keeps Prefect's full report


def test_evaluate_flow_has_a_cron_deployment():
    from flows.evaluate import deployment

    dep = deployment("0 3 * * *", {"m": "/models/m"}, {"eval": "/data/curated"}, "/out")
    assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * *"]
    assert dep.parameters["eval_sets"] == {"eval": "/data/curated"}


def test_flow_parameters_are_validated(tmp_path):
    from flows.config import flow_config
    from vaeft.config import ParamsError

    with pytest.raises(ParamsError, match="dvc_remote"):
        flow_config(dvc_remote="bad name; rm -rf /")
    with pytest.raises(ParamsError, match="no dvc.yaml"):
        flow_config(repo=tmp_path)
    with pytest.raises(ParamsError, match="dask_address"):
        flow_config(dask_address="tcp://host:8786; rm -rf /")
    with pytest.raises(ParamsError, match="curate_engine"):
        flow_config(curate_engine="local", dask_address="tcp://dask-scheduler:8786")
    # The curate stage learns its engine from the environment (vaeft curate --engine/--dask-address).
    assert flow_config(dask_address="tcp://dask-scheduler:8786").stage_env() == {
        "VAEFT_CURATE_ENGINE": "dask", "VAEFT_DASK_ADDRESS": "tcp://dask-scheduler:8786"}


def test_evaluate_flow_scores_checkpoints_and_writes_receipts(prefect_harness, tmp_path, curated, base_model):
    import json

    from flows.evaluate import evaluate
    from vaeft.hashing import tree_sha256

    from .conftest import tiny_params_dict

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params_dict()))
    results = evaluate(checkpoints={"base": str(base_model)}, eval_sets={"held-out": str(curated)},
                       out=str(tmp_path / "eval"), params_file=str(params_file))
    metrics = results["held-out"]["metrics"]
    assert set(metrics) == {"base"} and 5 < metrics["base"]["psnr"] < 60
    receipt = json.loads((tmp_path / "eval" / "held-out" / "receipt.json").read_text())
    assert receipt["checkpoints_sha256"] == {"base": tree_sha256(base_model)}
    assert receipt["eval_set"]["sha256"] == tree_sha256(curated)
    assert (tmp_path / "eval" / "held-out" / "report" / "eval_table.md").is_file()


def test_stage_runs_are_not_followed_by_dvc_advice(tmp_path):
    """The flow passes each `dvc repro`'s stdout through without_dvc_hints: on real DVC output it
    drops the git add / autostage / dvc push block and keeps the stage's own lines."""
    from tasks.dvc_stage import without_dvc_hints

    from .test_pipeline import _git

    repo = tmp_path / "git-repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"s": {"cmd": "echo stage-said-this > out && cat out",
                                                                    "outs": ["out"]}}}))
    (repo / ".dvc").mkdir()  # what `dvc init` would make that repro needs, without a second DVC start
    (repo / ".dvc" / "config").write_text("[core]\n    analytics = false\n")
    raw = run_dvc(repo, "repro")
    assert "To track the changes with git" in raw and "dvc push" in raw  # what DVC says at a shell
    kept = "".join(without_dvc_hints(raw.splitlines(keepends=True)))
    assert "stage-said-this" in kept and "Running stage 's'" in kept
    assert "git add" not in kept and "autostage" not in kept and "dvc push" not in kept and "\n\n\n" not in kept
