"""Shared fixtures: tiny params, a curated copy of the embedded photos, a tiny base model.

Everything runs the real code at toy scale on CPU: a ~0.2 M-parameter kl-f8-shaped
autoencoder (still x8 downsampling), 32x32 crops, a handful of steps.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from vaeft import runtime_env

runtime_env.configure()

import torch  # noqa: E402

from vaeft.config import Params, load_params, params_as_dict, parse_params  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent

# Deterministic CPU math in tests, one thread per process, subprocesses included: the toy models
# gain little from a second thread, and the suite runs two xdist workers on two cores, so a second
# OpenMP thread only waits on the other worker (the pipeline test's pretrain stage on a loaded
# 2-core machine: 28 CPU-s on two threads, 10 on one; the non-finite test: 29 s against 2.3 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


# --------------------------------------------------------------------------- the temp dir, per run
#
# The session and every process it starts get a private temp dir (TMPDIR) inside one run
# directory under the machine's temp dir, for three reasons: whatever is left there at the end was
# left by this suite (the machine's /tmp is shared with other runs, so a snapshot of it cannot
# tell), two suites running at once (two worktrees) share nothing, and removing the run
# directory after a passing session leaves nothing behind, pytest's basetemp included (it is
# pytest-of-<user>/ inside the private TMPDIR: a failing session keeps it for inspection).
# Caches the tools keep in shared temp locations go to the run directory on purpose.

_TOOL_CACHES = {
    "TORCHINDUCTOR_CACHE_DIR": "torchinductor",  # else /tmp/torchinductor_<user>, made by `import torchvision`
    "DVC_SITE_CACHE_DIR": "dvc-site",  # else /var/tmp/dvc/repo/<hash>, one per repository DVC opens
}
_run: dict = {}


def pytest_configure(config: pytest.Config) -> None:
    real = Path(tempfile.gettempdir())
    run = Path(tempfile.mkdtemp(prefix="vaeft-tests-", dir=real))
    tmp = run / "tmp"
    tmp.mkdir()
    env = {"TMPDIR": str(tmp)}
    for var, name in _TOOL_CACHES.items():
        if var not in os.environ:
            env[var] = str(run / "caches" / name)
    _run.update(real=real, run=run, tmp=tmp, before=set(os.listdir(real)), passed=True,
                saved_env={k: os.environ.get(k) for k in env}, saved_tempdir=tempfile.tempdir)
    os.environ.update(env)
    tempfile.tempdir = str(tmp)  # gettempdir() caches its answer: pytest's capture already asked
    if _is_xdist_controller(config) and _SHARED_SERVER_ENV not in os.environ:
        # One Prefect server for all workers: each would otherwise start its own (~15 s of two
        # busy cores, and its services polling for the rest of the run).
        server, url, log = _start_prefect_server(run / "prefect-server")
        _run["server"] = server
        os.environ[_SHARED_SERVER_ENV] = json.dumps({"url": url, "log": str(log)})
    if _is_xdist_controller(config) and _SHARED_BUILDS_ENV not in os.environ:
        os.environ[_SHARED_BUILDS_ENV] = str(run / "shared-fixtures")
        _run["shared_builds"] = True


def _is_xdist_controller(config: pytest.Config) -> bool:
    """The process that hands tests to pytest-xdist workers (its children are the workers, each of
    which checks its own children and temp dir)."""
    return not hasattr(config, "workerinput") and bool(getattr(config.option, "numprocesses", None))


def _leftover_processes() -> list[str]:
    import psutil

    found = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            cmd = " ".join(p.cmdline())
            if "multiprocessing.resource_tracker" in cmd:
                continue  # Python's own helper: it exits with this process
            found.append(f"pid {p.pid}: {cmd[:200]}")
            p.kill()
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _run:
        return
    procs = []
    if _run.get("server") is not None:  # first: what it leaves behind counts too
        procs += [f"the shared prefect server: {p}" for p in stop_process_tree(_run.pop("server"))]
    left = sorted(p.name for p in _run["tmp"].iterdir() if not p.name.startswith("pytest-of-"))
    if not _is_xdist_controller(session.config):
        procs += _leftover_processes()
    elsewhere = sorted(set(os.listdir(_run["real"])) - _run["before"] - {_run["run"].name})
    lines = []
    if left:
        lines.append(f"the suite left these in the temp dir ({_run['tmp']}): {', '.join(left)}")
    if procs:
        lines.append("processes the suite started were still running (killed now): " + "; ".join(procs))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and (lines or elsewhere):
        reporter.ensure_newline()
    for line in lines:
        if reporter is not None:
            reporter.write_line(f"LEFTOVER: {line}", red=True, bold=True)
    if lines and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if elsewhere and reporter is not None:
        # Not a failure: other processes on the machine write there too.
        reporter.write_line(f"note: new in {_run['real']} during the session (this suite's or another "
                            f"process's): {', '.join(elsewhere)}")
    _run["passed"] = session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED)


# xdist hands whole files to the workers in collection order, two to each at the start, then
# one to whichever is free. Longest first (the classic longest-processing-time order) keeps one
# worker from being handed a long file at the very end while the others sit idle. The pipeline
# test goes first with a short file behind it (the second of its worker's opening pair), so the
# other workers start on the next longest. Seconds: quiet 2-core machine, 2026-12-02.
_FILE_SECONDS = {
    "tests/test_pipeline.py": 185, "tests/test_lint.py": 0,
    "tests/test_train.py": 60, "tests/test_bench.py": 40, "tests/test_worker.py": 30,
    "tests/test_ddp.py": 28, "tests/test_reproduce.py": 26, "tests/test_stage_deps.py": 24,
    "tests/test_ux.py": 22, "tests/test_orchestration.py": 20, "tests/test_publish_s3.py": 18,
    "tests/test_resume.py": 16, "tests/test_no_destroy.py": 14, "tests/test_metrics.py": 14,
    "tests/test_engine_options.py": 12, "tests/test_model_io.py": 11, "tests/test_cli.py": 10,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    order = list(_FILE_SECONDS)

    def key(item: pytest.Item) -> int:
        path = item.nodeid.split("::", 1)[0]
        return order.index(path) if path in _FILE_SECONDS else len(order)

    items.sort(key=key)  # stable: tests keep their order within a file


def pytest_unconfigure(config: pytest.Config) -> None:
    if not _run:
        return
    if _run.get("server") is not None:  # the session ended before sessionfinish (an internal error)
        stop_process_tree(_run.pop("server"))
    os.environ.pop(_SHARED_SERVER_ENV, None)
    if _run.pop("shared_builds", False):
        os.environ.pop(_SHARED_BUILDS_ENV, None)
    for key, value in _run["saved_env"].items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    tempfile.tempdir = _run["saved_tempdir"]
    if _run["passed"]:
        shutil.rmtree(_run["run"], ignore_errors=True)
    else:
        print(f"vaeft tests: kept {_run['run']} (pytest's basetemp and any leftovers) for inspection",
              file=sys.stderr)
    _run.clear()


def tiny_params_dict() -> dict:
    """The committed params.yaml, shrunk to test size."""
    raw = params_as_dict(load_params(REPO_ROOT / "params.yaml"))
    raw["augment"]["crop_size"] = 32
    # The ~30 embedded photos are one work shard: a process pool would only add a spawned
    # interpreter (~3 CPU-s of imports) per curation. Tests of the pool ask for one themselves.
    raw["data"]["workers"] = 1
    raw["evaluate"]["image_size"] = 32
    raw["model"]["architecture"].update(block_out_channels=[16, 16, 32, 32], norm_num_groups=8, sample_size=32)
    for phase, steps in (("pretrain", 12), ("ema", 6), ("mse", 6)):
        raw["train"][phase].update(steps=steps, batch_size=4, checkpoint_every=4, log_every=2)
    # fp16 decodes on CPU are slow (~4x fp32): the fp16 phase measures at 64 px, not 128.
    raw["train"]["fp16"].update(check_size=64, batch_size=4)
    return raw


def run_dvc(repo: Path, *args: str, timeout: float = 600) -> str:
    """``dvc ARGS`` in ``repo`` with the environment the flow gives DVC; its stdout (fails the test
    with DVC's output on a non-zero exit)."""
    from tasks.dvc_stage import dvc_env

    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=dvc_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"dvc {' '.join(args)}: {proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture
def tiny_raw() -> dict:
    return tiny_params_dict()


@pytest.fixture
def tiny_params() -> Params:
    return parse_params(tiny_params_dict(), "tiny")


def _built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """``build(folder)`` once per session, for every xdist worker.

    Under xdist the first worker that asks builds it in the controller's run directory, holding a
    file lock, and the others wait and then read the same folder: each worker used to build its
    own copy (a curation and a pretraining each). Alone, pytest builds it in its basetemp.
    Whoever uses the result only reads it.
    """
    shared = os.environ.get(_SHARED_BUILDS_ENV)
    if not shared:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    from filelock import FileLock

    root = Path(shared)
    root.mkdir(exist_ok=True)
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            if folder.exists():
                raise RuntimeError(f"{folder}: another worker's build of this fixture failed (see its error)")
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def curated(tmp_path_factory) -> Path:
    """The embedded photos, curated once per session (read-only for tests)."""
    from vaeft.data.curate import curate

    return _built_once(tmp_path_factory, "curated",
                       lambda folder: curate(parse_params(tiny_params_dict()).data, folder / "data")) / "data"


@pytest.fixture(scope="session")
def base_model(tmp_path_factory, curated) -> Path:
    """A tiny autoencoder pretrained for a few steps: the 'original' of the tests."""
    from vaeft.train.engine import prepare_base

    def build(folder: Path) -> None:
        prepare_base(parse_params(tiny_params_dict()), curated, folder / "model", state_root=folder / "state")

    return _built_once(tmp_path_factory, "base", build) / "model"


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory) -> Path:
    """A weight store of RANDOM VGG16/AlexNet/InceptionV3 weights (plumbing only), written once
    per session (seconds) and shared by the metric tests and the benchmark smoke runs."""
    from tests.randweights import write_random_backbone, write_random_inception

    def build(store: Path) -> None:
        write_random_backbone(store, "lpips-vgg")
        write_random_backbone(store, "lpips-alex")
        write_random_inception(store)

    return _built_once(tmp_path_factory, "random-weights", build)


@dataclass
class PrefectServer:
    """A real ``prefect server start`` in its own process group, with its own PREFECT_HOME."""

    url: str  # PREFECT_API_URL
    process: subprocess.Popen | None  # None: the xdist controller's, shared by the workers
    log: Path
    start_seconds: float

    def cli_env(self, home: Path, **extra: str) -> dict[str, str]:
        """Environment for a Prefect CLI subprocess talking to this server (its own home)."""
        home.mkdir(parents=True, exist_ok=True)
        return {**os.environ, "PREFECT_API_URL": self.url, "PREFECT_HOME": str(home),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", **extra}

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_tree(proc: subprocess.Popen, timeout: float = 30) -> list[str]:
    """SIGTERM ``proc``'s process group (and descendants that left it), then SIGKILL what is left.

    Returns what did not stop on SIGTERM (empty: a clean stop) so a test can assert on it after
    its own failure, if any, has been reported.
    """
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    for p in tree[1:]:  # a child in a session of its own (Prefect isolates flow-run processes)
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    problems = []
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        problems.append(f"pid {proc.pid} ({' '.join(map(str, proc.args[:4]))}) ignored SIGTERM")
    _, alive = psutil.wait_procs(tree, timeout=5)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            problems.append(f"pid {p.pid} ({' '.join(p.cmdline()[:4])}) still running after SIGTERM")
            p.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    return problems


def _wait_healthy(server: subprocess.Popen | None, url: str, log: Path, timeout: float) -> None:
    """``server`` None: another process (the xdist controller) started it and watches it."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise RuntimeError(f"prefect server exited ({server.returncode}):\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:  # noqa: S310 - our own http server
                if resp.status == 200:
                    return
        time.sleep(0.2)
    raise RuntimeError(f"prefect server not healthy after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


# Services a test server does not need: they poll the database every few seconds for things no
# test does (late or paused runs, cancellations, automations, crashed workers), on two busy cores.
_IDLE_SERVICES = ("CANCELLATION_CLEANUP", "FOREMAN", "LATE_RUNS", "PAUSE_EXPIRATIONS", "REPOSSESSOR",
                  "CLEANUP_RECONCILER", "TRIGGERS")
# Set by the xdist controller for its workers: {"url", "log"} of the one server they share.
_SHARED_SERVER_ENV = "VAEFT_TEST_PREFECT_SERVER"
# Set by the xdist controller: where its workers build the read-only session fixtures once.
_SHARED_BUILDS_ENV = "VAEFT_TEST_SHARED_BUILDS"


def _start_prefect_server(root: Path) -> tuple[subprocess.Popen, str, Path]:
    """``prefect server start`` in its own process group and PREFECT_HOME; returns at once."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    log = root / "server.log"
    env = {**os.environ, "PREFECT_HOME": str(root / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_API_HOST": "127.0.0.1",
           "PREFECT_SERVER_API_PORT": str(port),
           **{f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false" for name in _IDLE_SERVICES}}
    env.pop("PREFECT_API_URL", None)
    env.pop(_SHARED_SERVER_ENV, None)
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
             "--no-scheduler", "--no-ui", "--analytics-off"],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return server, url, log


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One real ``prefect server start`` for the whole session (a fresh database costs ~15 s on 2
    cores), which the flows run in-process, the CLI and the worker of test_worker.py all use.

    Under xdist the controller starts it once for both workers (it starts while they collect)
    and stops it at the end; run without xdist, the first test that needs it starts its own.
    Tests share it, so each names its own pools, deployments and flows.

    The scheduler service is off: nothing here needs it, and a worker must only ever see the flow
    runs a test creates, never runs of a deployment's cron schedule.
    """
    shared = os.environ.get(_SHARED_SERVER_ENV)
    t0 = time.perf_counter()
    if shared:
        spec = json.loads(shared)
        server, url, log = None, spec["url"], Path(spec["log"])
    else:
        server, url, log = _start_prefect_server(tmp_path_factory.mktemp("prefect-server"))
    info = PrefectServer(url, server, log, 0.0)
    old_url = os.environ.get("PREFECT_API_URL")
    try:
        import prefect.context  # while the server starts
        import prefect.settings

        _wait_healthy(server, url, log, timeout=180)
        info.start_seconds = time.perf_counter() - t0
        os.environ["PREFECT_API_URL"] = url  # for subprocesses
        with contextlib.ExitStack() as stack:
            # Prefect read its settings at import; point this process's client at the server too.
            stack.enter_context(prefect.settings.temporary_settings(updates={prefect.settings.PREFECT_API_URL: url}))
            # ... and code that copied its context before this fixture (as prefect_test_harness does)
            stack.enter_context(
                prefect.context._temporary_global_settings_context(prefect.context.get_settings_context()))
            yield info
            _drain_prefect_clients()
    finally:
        if old_url is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = old_url
        problems = stop_process_tree(server) if server is not None else []
    assert not problems, f"prefect server did not stop cleanly: {problems}"


def _drain_prefect_clients() -> None:
    """Send buffered logs and events before the server goes, as prefect_test_harness does."""
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        with contextlib.suppress(RuntimeError):  # never started
            result = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    run_coro_as_sync(drain())


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 (real HTTP, real boto3/DVC clients), fake credentials."""
    from moto.server import ThreadedMotoServer

    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(AWS_ACCESS_KEY_ID="test-key-id", AWS_SECRET_ACCESS_KEY=FAKE_SECRET,
                      AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


FAKE_SECRET = "fake-secret-must-never-be-recorded"
