"""A real Prefect server, a process work pool and a worker run a deployment of infra/prefect.local.yaml.

`prefect deploy` from the yaml and `prefect worker start` are the real CLIs; the pool, the flow
run and its polling go through the Python client (every CLI call costs seconds of imports here).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import yaml

from vaeft.hashing import tree_sha256

from .conftest import REPO_ROOT, stop_process_tree, tiny_params_dict

POOL = "vaeft-local"
PULL_STEPS = [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $VAEFT_REPO }}"}}]


def _prefect(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


@pytest.mark.timeout(300)
def test_worker_runs_the_local_evaluate_deployment(prefect_harness, tmp_path, curated, base_model):
    import fastapi
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.workers.process import ProcessWorker

    # Prefect 3.8.8's client sends `"limit": null`, which fastapi >= 0.151 rejects with a 422:
    # `prefect deploy` then fails after creating the deployment.
    version = tuple(int(x) for x in fastapi.__version__.split(".")[:2])
    assert version < (0, 151), f"fastapi {fastapi.__version__}: reinstall with constraints.txt (fastapi<0.151)"
    server = prefect_harness
    t0 = time.perf_counter()
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=POOL, type="process",
                                               base_job_template=ProcessWorker.get_default_base_job_template()))

    # Deploy without VAEFT_REPO: the pull step keeps its placeholder, so the worker's own
    # environment says where the checkout is (no machine path is stored in the deployment).
    deploy_env = server.cli_env(tmp_path / "deploy-home")
    deploy_env.pop("VAEFT_REPO", None)
    deploy = subprocess.Popen(
        _prefect("--no-prompt", "deploy", "--prefect-file", "infra/prefect.local.yaml", "--all"),
        cwd=REPO_ROOT, env=deploy_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    worker_log = tmp_path / "worker.log"
    # Started alongside the deploy (both spend seconds importing); it polls every second. It runs
    # from elsewhere on purpose: the pull step must take the flow run to the checkout.
    # Its own temp dir: Prefect's runner keeps flow-run code under <temp>/runner_storage/ and
    # removes only the run's subdirectory, never runner_storage itself.
    (tmp_path / "worker-tmp").mkdir()
    worker_env = server.cli_env(tmp_path / "worker-home", VAEFT_REPO=str(REPO_ROOT), PYTHONPATH=str(REPO_ROOT),
                                PREFECT_WORKER_QUERY_SECONDS="1", TMPDIR=str(tmp_path / "worker-tmp"))
    with open(worker_log, "wb") as log:
        worker = subprocess.Popen(_prefect("worker", "start", "--pool", POOL, "--name", "vaeft-test-worker"),
                                  cwd=tmp_path, env=worker_env, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
    problems: list[str] = []
    try:
        try:
            deploy_out, _ = deploy.communicate(timeout=120)
        finally:
            problems += stop_process_tree(deploy) if deploy.poll() is None else []
        assert deploy.returncode == 0, deploy_out[-3000:]
        t_deployed = time.perf_counter()

        params_file = tmp_path / "params.yaml"
        params_file.write_text(yaml.safe_dump(tiny_params_dict()))
        out = tmp_path / "eval"
        with get_client(sync_client=True) as client:
            retrain = client.read_deployment_by_name("retrain/retrain-local")
            assert (retrain.work_pool_name, retrain.parameters, retrain.schedules) == (POOL, {"repo": "."}, [])
            dep = client.read_deployment_by_name("evaluate/evaluate-local")
            assert dep.work_pool_name == POOL
            assert dep.pull_steps == PULL_STEPS
            assert [(s.schedule.cron, s.active) for s in dep.schedules] == [("0 3 * * *", True)]
            run = client.create_flow_run_from_deployment(dep.id, parameters={
                "checkpoints": {"base": str(base_model)}, "eval_sets": {"held-out": str(curated)},
                "out": str(out), "params_file": str(params_file)})
            deadline = time.monotonic() + 150
            while not (run := client.read_flow_run(run.id)).state.is_final():
                assert time.monotonic() < deadline, f"flow run stuck in {run.state.name}:\n{_tail(worker_log)}"
                assert worker.poll() is None, f"worker exited {worker.returncode}:\n{_tail(worker_log)}"
                time.sleep(0.5)
            assert run.state.is_completed(), f"{run.state.name}: {run.state.message}\n{_tail(worker_log)}"
            # The worker saw only this run (no schedule fired, nothing else queued).
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
            assert [r.id for r in runs] == [run.id]
        t_done = time.perf_counter()
    finally:
        # Prefect's worker turns SIGTERM into a SIGINT to itself and shuts down its runner and
        # client; on a busy 2-core box that once took over 35 s. Kubernetes' default grace is 30 s
        # per pod, and a pod holds nothing else, so a minute here is still a real bound.
        problems += stop_process_tree(worker, timeout=60)
    assert not problems, problems

    metrics = json.loads((out / "held-out" / "metrics.json").read_text())
    assert set(metrics) == {"base"} and 5 < metrics["base"]["psnr"] < 60
    assert (out / "held-out" / "report" / "eval_table.md").is_file()
    receipt = json.loads((out / "held-out" / "receipt.json").read_text())
    assert receipt["flow_run_id"] == str(run.id)
    assert receipt["checkpoints_sha256"] == {"base": tree_sha256(base_model)}
    assert receipt["eval_set"] == {"name": "held-out", "path": str(curated), "sha256": tree_sha256(curated)}
    print(f"\nprefect server start {server.start_seconds:.1f} s; pool+deploy {t_deployed - t0:.1f} s; "
          f"flow run via worker {t_done - t_deployed:.1f} s; worker stop {time.perf_counter() - t_done:.1f} s")


def _tail(path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:]
