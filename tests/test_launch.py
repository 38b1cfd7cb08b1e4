"""The torchrun launch contract (VAEFT_* variables), one status per job, `vaeft stage`, flow `gpus`.

The real two-process run through this path is tests/test_ddp.py; here torchrun is a stand-in
script so the folding of the ranks' statuses costs no torch start-up.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from vaeft.cli import app, main
from vaeft.train import launch
from vaeft.train.launch import LaunchError, torchrun_command, worst_status

from .conftest import tiny_params_dict

PY = "/venv/bin/python"
ARGV = ["train", "ema", "--init", "models/base"]
TAIL = ["-m", "vaeft", *ARGV]
HEAD = [PY, "-m", "torch.distributed.run"]


def cmd(env: dict[str, str], gpus: int = 0) -> list[str] | None:
    return torchrun_command(env, ARGV, python=PY, device_count=lambda: gpus)


def test_one_process_is_no_relaunch():
    assert cmd({}) is None
    assert cmd({"VAEFT_NPROC_PER_NODE": "1"}) is None
    assert cmd({"VAEFT_NPROC_PER_NODE": "", "VAEFT_NNODES": " "}) is None  # empty = unset


def test_single_node():
    assert cmd({"VAEFT_NPROC_PER_NODE": "4"}) == [*HEAD, "--nproc_per_node=4", "--standalone", *TAIL]


def test_auto_is_one_process_per_cuda_device():
    assert cmd({"VAEFT_NPROC_PER_NODE": "auto"}, gpus=8) == [*HEAD, "--nproc_per_node=8", "--standalone", *TAIL]
    assert cmd({"VAEFT_NPROC_PER_NODE": "AUTO"}, gpus=0) is None  # no CUDA: one process
    # the real device count (this machine: no CUDA)
    assert torchrun_command({"VAEFT_NPROC_PER_NODE": "auto"}, ARGV) is None


def test_multi_node():
    env = {"VAEFT_NPROC_PER_NODE": "8", "VAEFT_NNODES": "2", "VAEFT_RDZV_ENDPOINT": "vaeft-0.vaeft:29400",
           "VAEFT_RDZV_ID": "retrain-42"}
    rdzv = ["--nproc_per_node=8", "--nnodes=2", "--rdzv_backend=c10d", "--rdzv_endpoint=vaeft-0.vaeft:29400",
            "--rdzv_id=retrain-42"]
    # without a node rank c10d decides itself whether this node hosts the store
    assert cmd(env) == [*HEAD, *rdzv, *TAIL]
    assert cmd({**env, "VAEFT_NODE_RANK": "0"}) == [*HEAD, *rdzv, "--rdzv_conf=is_host=true", *TAIL]
    assert cmd({**env, "VAEFT_NODE_RANK": "1"}) == [*HEAD, *rdzv, "--rdzv_conf=is_host=false", *TAIL]
    # one process per node still needs the rendezvous; the id defaults to "vaeft"
    one = cmd({"VAEFT_NNODES": "3", "VAEFT_RDZV_ENDPOINT": "[fd00::1]:29400"})
    assert one == [*HEAD, "--nproc_per_node=1", "--nnodes=3", "--rdzv_backend=c10d",
                   "--rdzv_endpoint=[fd00::1]:29400", "--rdzv_id=vaeft", *TAIL]


@pytest.mark.parametrize("marker", [{"LOCAL_RANK": "0"}, {"TORCHELASTIC_RUN_ID": "abc"}])
def test_inside_torchrun_runs_here(marker):
    # even with values that would be errors outside: the ranks must never relaunch
    assert cmd({"VAEFT_NPROC_PER_NODE": "8", "VAEFT_NNODES": "x", **marker}) is None


@pytest.mark.parametrize(("env", "message"), [
    ({"VAEFT_NPROC_PER_NODE": "0"}, "VAEFT_NPROC_PER_NODE='0': expected an integer >= 1 or 'auto'"),
    ({"VAEFT_NPROC_PER_NODE": "two"}, "VAEFT_NPROC_PER_NODE='two': expected an integer >= 1 or 'auto'"),
    ({"VAEFT_NPROC_PER_NODE": "1.5"}, "VAEFT_NPROC_PER_NODE='1.5': expected an integer >= 1 or 'auto'"),
    ({"VAEFT_NPROC_PER_NODE": "-2"}, "VAEFT_NPROC_PER_NODE='-2': expected an integer >= 1 or 'auto'"),
    ({"VAEFT_NNODES": "0"}, "VAEFT_NNODES='0': expected an integer >= 1"),
    ({"VAEFT_NNODES": "2"}, "VAEFT_RDZV_ENDPOINT is required when VAEFT_NNODES > 1 (host:port of node 0)"),
    ({"VAEFT_NNODES": "2", "VAEFT_NODE_RANK": "2", "VAEFT_RDZV_ENDPOINT": "h:1"},
     "VAEFT_NODE_RANK='2': must be below VAEFT_NNODES=2"),
    ({"VAEFT_NODE_RANK": "-1"}, "VAEFT_NODE_RANK='-1': expected an integer >= 0"),
    ({"VAEFT_NNODES": "2", "VAEFT_RDZV_ENDPOINT": "leader"}, "VAEFT_RDZV_ENDPOINT='leader': expected host:port"),
    ({"VAEFT_NNODES": "2", "VAEFT_RDZV_ENDPOINT": ":29400"}, "VAEFT_RDZV_ENDPOINT=':29400': expected host:port"),
    ({"VAEFT_NNODES": "2", "VAEFT_RDZV_ENDPOINT": "leader:http"},
     "VAEFT_RDZV_ENDPOINT='leader:http': expected host:port"),
    ({"VAEFT_NNODES": "2", "VAEFT_RDZV_ENDPOINT": "leader:70000"},
     "VAEFT_RDZV_ENDPOINT='leader:70000': expected host:port"),
    ({"VAEFT_NPROC_PER_NODE": "2", "VAEFT_RDZV_ID": "a b"},
     "VAEFT_RDZV_ID='a b': use letters, digits, '_', '.' and '-'"),
])
def test_bad_values_name_the_variable(env, message):
    with pytest.raises(LaunchError) as info:
        cmd(env)
    assert str(info.value) == message


def _train_inputs(tmp_path: Path) -> list[str]:
    """Inputs that pass the launcher's own checks (the ranks would fail on the empty model)."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params_dict()))
    for d in ("data", "init"):
        (tmp_path / d).mkdir()
    return ["train", "ema", "--params", str(params), "--data", str(tmp_path / "data"),
            "--init", str(tmp_path / "init"), "--out", str(tmp_path / "out")]


def _clean_launch_env(monkeypatch) -> None:
    for var in ("LOCAL_RANK", "RANK", "TORCHELASTIC_RUN_ID", "VAEFT_NNODES", "VAEFT_NODE_RANK",
                "VAEFT_RDZV_ENDPOINT", "VAEFT_RDZV_ID", launch.RANK_STATUS_DIR_ENV):
        monkeypatch.delenv(var, raising=False)


def test_bad_launch_value_is_a_one_line_user_error(tmp_path, monkeypatch, capsys):
    _clean_launch_env(monkeypatch)
    monkeypatch.setenv("VAEFT_NPROC_PER_NODE", "two")
    monkeypatch.setenv("VAEFT_STATUS_FILE", str(tmp_path / "status.json"))
    with pytest.raises(SystemExit) as info:
        main(_train_inputs(tmp_path))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: VAEFT_NPROC_PER_NODE='two': expected an integer >= 1 or 'auto'"
    assert json.loads((tmp_path / "status.json").read_text())["kind"] == "user"


# Stands in for torchrun: starts one "rank" per stage name (real `python -m vaeft stage exec`
# processes with torchrun's variables) and, like torchrun, exits 1 whatever the ranks' codes were.
FAKE_TORCHRUN = textwrap.dedent("""
    import os, subprocess, sys
    repo, stages = sys.argv[1], sys.argv[2:]
    ranks = [subprocess.Popen([sys.executable, "-m", "vaeft", "stage", "exec", stage, "--repo", repo],
                              env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "TORCHELASTIC_RUN_ID": "x"})
             for r, stage in enumerate(stages)]
    sys.exit(1 if any([p.wait() for p in ranks]) else 0)
""")


def test_one_status_for_the_job_reflects_the_worst_rank(tmp_path, monkeypatch):
    _clean_launch_env(monkeypatch)
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"crash": {"cmd": "exit 3"}}}))
    # rank 0 crashes (exit 3), rank 1 has a user error (unknown stage, exit 2)
    fake = [sys.executable, "-c", FAKE_TORCHRUN, str(repo), "crash", "unknown-stage"]
    seen = []

    def fake_command(env, argv, **_):
        seen.append(list(argv))
        return fake

    monkeypatch.setattr(launch, "torchrun_command", fake_command)
    status = tmp_path / "status.json"
    monkeypatch.setenv("VAEFT_STATUS_FILE", str(status))
    monkeypatch.setenv("VAEFT_NPROC_PER_NODE", "2")
    argv = _train_inputs(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert seen == [argv]  # the ranks get the launcher's own arguments
    # A user error on any rank fails every retry alike: the job is a user error (exit 2, not retried).
    assert info.value.code == 2
    assert json.loads(status.read_text()) == {"exit_code": 2, "kind": "user", "error": "UsageError",
                                              "message": "unknown stage 'unknown-stage' (stages: crash)",
                                              "rank": 1, "rank_reports": 2}
    # the ranks' own files went to a private directory that is gone
    assert [p.name for p in tmp_path.iterdir() if "status" in p.name or "rank" in p.name] == ["status.json"]


def test_outputs_are_written_by_local_rank_0_of_node_0():
    from vaeft.train.distributed import main_rank

    # c10d put node 1's processes first: the writer is still node 0's first process.
    assert main_rank([("1", 0), ("1", 1), ("0", 0), ("0", 1)]) == 2
    assert main_rank([("0", 0), ("0", 1), ("1", 0), ("1", 1)]) == 0
    assert main_rank([(None, 0), (None, 1)]) == 0  # one node, no index given


def test_worst_status():
    ok = {"exit_code": 0, "kind": "ok", "error": None}
    crash = {"exit_code": 3, "kind": "failure", "error": None}
    assert worst_status({0: ok, 1: ok}, 0) == launch.LaunchResult(0, {**ok, "rank_reports": 2})
    assert worst_status({0: ok, 1: crash}, 1) == launch.LaunchResult(3, {**crash, "rank": 1, "rank_reports": 2})
    # killed before any rank could write (OOM killer, preemption): torchrun's code, a failure
    killed = worst_status({0: ok}, launch.exit_status(-9))
    assert killed.exit_code == 137 and killed.status["kind"] == "failure"


def test_sigterm_to_the_launcher_reaches_torchrun(tmp_path):
    """A pod shutdown or Prefect cancellation signals the launcher only; torchrun must hear it."""
    import os
    import signal
    import threading
    import time

    ready = tmp_path / "ready"
    child = ("import signal, sys, time, pathlib; signal.signal(signal.SIGTERM, lambda *a: sys.exit(7)); "
             f"pathlib.Path({str(ready)!r}).touch(); time.sleep(60)")

    def kill_launcher() -> None:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=kill_launcher, daemon=True).start()
    assert launch.run_torchrun([sys.executable, "-c", child]).exit_code == 7
    assert signal.getsignal(signal.SIGTERM) is before


# --- vaeft stage list | exec ----------------------------------------------------------------------


@pytest.fixture
def stage_repo(tmp_path) -> Path:
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "first": {"cmd": ["echo one > a.txt", "command -v python > which.txt; pwd > pwd.txt"]},
        "in-sub": {"cmd": "pwd > pwd.txt", "wdir": "sub"},
        "fails": {"cmd": "exit 5"},
        "templated": {"cmd": "echo ${seed}"},
    }}, sort_keys=False))
    return repo


def test_stage_list_and_exec(stage_repo, monkeypatch):
    runner = CliRunner()
    assert runner.invoke(app, ["stage", "--help"]).exit_code == 0
    listed = runner.invoke(app, ["stage", "list", "--repo", str(stage_repo)])
    assert listed.output.split() == ["first", "in-sub", "fails", "templated"]
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # the venv's bin must come first all the same
    assert runner.invoke(app, ["stage", "exec", "first", "--repo", str(stage_repo)]).exit_code == 0
    assert (stage_repo / "a.txt").read_text() == "one\n"
    assert (stage_repo / "which.txt").read_text().strip() == str(Path(sys.executable).parent / "python")
    assert Path((stage_repo / "pwd.txt").read_text().strip()).resolve() == stage_repo.resolve()
    assert runner.invoke(app, ["stage", "exec", "in-sub", "--repo", str(stage_repo)]).exit_code == 0
    assert (stage_repo / "sub" / "pwd.txt").is_file()
    assert runner.invoke(app, ["stage", "exec", "fails", "--repo", str(stage_repo)]).exit_code == 5


@pytest.mark.parametrize(("stage", "message"), [
    ("nope", "error: unknown stage 'nope' (stages: first, in-sub, fails, templated)"),
    ("templated", "error: stage 'templated' uses ${...} templating: run it with `dvc repro templated`"),
])
def test_stage_exec_errors_are_one_line(stage_repo, capsys, stage, message):
    with pytest.raises(SystemExit) as info:
        main(["stage", "exec", stage, "--repo", str(stage_repo)])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == message


# --- the retrain flow's gpus ----------------------------------------------------------------------


def test_flow_gpus_sets_the_launch_variable(tmp_path, monkeypatch):
    from flows.config import flow_config
    from vaeft.config import ParamsError
    from vaeft.runtime_env import PROJECT_ROOT

    assert flow_config(gpus=4).stage_env() == {"VAEFT_NPROC_PER_NODE": "4"}
    assert flow_config().stage_env() == {}
    with pytest.raises(ParamsError, match="flow parameter gpus: Input should be greater than or equal to 1"):
        flow_config(gpus=0)
    monkeypatch.chdir(PROJECT_ROOT)
    assert flow_config(repo=Path(".")).repo == PROJECT_ROOT  # a deployment's repo="." is made absolute


def test_run_stage_passes_the_launch_environment(monkeypatch):
    import tasks.dvc_stage as dvc_stage

    calls = []

    def fake_repro(repo, stage, extra_env=None):
        calls.append((stage, extra_env or {}))
        Path(extra_env["VAEFT_STATUS_FILE"]).write_text('{"exit_code": 0, "kind": "ok"}')  # as our CLI does
        return 0

    monkeypatch.setattr(dvc_stage, "repro_quietly", fake_repro)
    assert dvc_stage.run_stage.fn("s", "/repo", env={"VAEFT_NPROC_PER_NODE": "3"}).ran
    ((stage, repro_env),) = calls
    assert stage == "s" and repro_env["VAEFT_NPROC_PER_NODE"] == "3" and "VAEFT_STATUS_FILE" in repro_env


def test_retrain_cli_rejects_bad_gpus_before_any_stage(prefect_harness, capsys):
    from flows.retrain import main as retrain_main

    with pytest.raises(SystemExit) as info:
        retrain_main(["--gpus", "0"])
    assert info.value.code == 2
    assert "error: flow parameter gpus: Input should be greater than or equal to 1" in capsys.readouterr().err
