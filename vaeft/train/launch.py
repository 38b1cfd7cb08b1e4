"""Relaunch a training command under torchrun when the environment asks for more processes.

The cloud templates (``infra/``) and the ``retrain`` flow's ``gpus`` set these; a plain
``vaeft train ...`` sets none and runs as one process:

``VAEFT_NPROC_PER_NODE``  processes on this node: an int >= 1, or ``auto`` (one per CUDA device,
                          1 without CUDA). Default 1.
``VAEFT_NNODES``          nodes in the job. Default 1.
``VAEFT_NODE_RANK``       this node's index; 0 is the node at ``VAEFT_RDZV_ENDPOINT``. Default 0.
``VAEFT_RDZV_ENDPOINT``   ``host:port`` of the rendezvous store on node 0; required with >1 node.
``VAEFT_RDZV_ID``         the job's rendezvous id (the same on every node). Default ``vaeft``.

Empty values count as unset (templates often render a missing value as ""). The relaunched
command is ``python -m torch.distributed.run ... -m vaeft <the same arguments>``; inside it
torchrun's ``LOCAL_RANK`` is set, so the ranks run the command instead of relaunching again.

Exit status: torchrun reports any failed rank as its own exit 1, which would turn a user error
(exit 2, never retried by the retrain flow) into a retried failure. So every rank leaves its
status in a private directory (``VAEFT_RANK_STATUS_DIR``) and the launching process reports the
worst one as the command's single status and exit code.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vaeft.errors import STATUS_FILE_ENV, VaeftError

NPROC_ENV = "VAEFT_NPROC_PER_NODE"
NNODES_ENV = "VAEFT_NNODES"
NODE_RANK_ENV = "VAEFT_NODE_RANK"
RDZV_ENDPOINT_ENV = "VAEFT_RDZV_ENDPOINT"
RDZV_ID_ENV = "VAEFT_RDZV_ID"
RANK_STATUS_DIR_ENV = "VAEFT_RANK_STATUS_DIR"

USER_ERROR_EXIT = 2
_INT = re.compile(r"[0-9]+")
_RDZV_ID = re.compile(r"[A-Za-z0-9_.-]+")


class LaunchError(VaeftError):
    """A launch variable has a value torchrun cannot use."""


def inside_torchrun(env: Mapping[str, str]) -> bool:
    return bool(env.get("TORCHELASTIC_RUN_ID") or env.get("LOCAL_RANK"))


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


def _int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = _get(env, name)
    if raw is None:
        return default
    if not _INT.fullmatch(raw) or int(raw) < minimum:
        raise LaunchError(f"{name}={env[name]!r}: expected an integer >= {minimum}")
    return int(raw)


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def nproc_per_node(env: Mapping[str, str], device_count: Callable[[], int] = _cuda_device_count) -> int:
    raw = _get(env, NPROC_ENV)
    if raw is not None and raw.lower() == "auto":
        return max(1, device_count())
    try:
        return _int(env, NPROC_ENV, 1, 1)
    except LaunchError:
        raise LaunchError(f"{NPROC_ENV}={env[NPROC_ENV]!r}: expected an integer >= 1 or 'auto'") from None


def _endpoint(env: Mapping[str, str]) -> str:
    raw = _get(env, RDZV_ENDPOINT_ENV)
    if raw is None:
        raise LaunchError(f"{RDZV_ENDPOINT_ENV} is required when {NNODES_ENV} > 1 (host:port of node 0)")
    host, sep, port = raw.rpartition(":")
    if (not sep or not host or any(c.isspace() for c in host) or not _INT.fullmatch(port)
            or not 0 < int(port) < 65536):
        raise LaunchError(f"{RDZV_ENDPOINT_ENV}={env[RDZV_ENDPOINT_ENV]!r}: expected host:port")
    return raw


def torchrun_command(env: Mapping[str, str], argv: Sequence[str], *, python: str | None = None,
                     device_count: Callable[[], int] = _cuda_device_count) -> list[str] | None:
    """The torchrun command that reruns ``vaeft <argv>`` as the environment asks, or None.

    None: one process on one node, or already a torchrun worker. Raises :class:`LaunchError`
    naming the variable for a value torchrun cannot use.
    """
    if inside_torchrun(env):
        return None
    nnodes = _int(env, NNODES_ENV, 1, 1)
    nproc = nproc_per_node(env, device_count)
    explicit_rank = _get(env, NODE_RANK_ENV) is not None
    node_rank = _int(env, NODE_RANK_ENV, 0, 0)
    if node_rank >= nnodes:
        raise LaunchError(f"{NODE_RANK_ENV}={env[NODE_RANK_ENV]!r}: must be below {NNODES_ENV}={nnodes}")
    rdzv_id = _get(env, RDZV_ID_ENV) or "vaeft"
    if not _RDZV_ID.fullmatch(rdzv_id):
        raise LaunchError(f"{RDZV_ID_ENV}={env[RDZV_ID_ENV]!r}: use letters, digits, '_', '.' and '-'")
    if nnodes == 1 and nproc == 1:
        return None
    cmd = [python or sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes == 1:
        # A private store on a free port: several single-node jobs can share a machine.
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={_endpoint(env)}",
                f"--rdzv_id={rdzv_id}"]
        if explicit_rank:
            # c10d otherwise guesses whether this node hosts the store by matching the endpoint's
            # host against its own names and addresses, which service names and NAT can defeat.
            cmd.append(f"--rdzv_conf=is_host={'true' if node_rank == 0 else 'false'}")
    return [*cmd, "-m", "vaeft", *argv]


# --- exit status across ranks -------------------------------------------------------------------


def rank_status_file(env: Mapping[str, str]) -> Path | None:
    """Where this torchrun worker leaves its status, when a launching vaeft process asked for it."""
    directory = env.get(RANK_STATUS_DIR_ENV)
    if not directory or not inside_torchrun(env):
        return None
    return Path(directory) / f"rank-{env.get('RANK', '0')}.json"


def _severity(status: Mapping[str, Any]) -> int:
    # A user error on any rank fails every retry the same way, so it outranks a crash: the
    # orchestrator must not retry it. Any failure outranks success.
    code = status.get("exit_code")
    return 2 if code == USER_ERROR_EXIT else (1 if code != 0 else 0)


@dataclass(frozen=True)
class LaunchResult:
    exit_code: int
    # the worst rank's status, with its global "rank" and how many of this node's ranks reported
    status: dict[str, Any] = field(default_factory=dict)


def worst_status(statuses: Mapping[int, Mapping[str, Any]], launcher_code: int) -> LaunchResult:
    """One exit code and status for the whole job from each rank's status and torchrun's code."""
    if launcher_code == 0:
        return LaunchResult(0, {"exit_code": 0, "kind": "ok", "error": None, "rank_reports": len(statuses)})
    failed = {r: s for r, s in statuses.items() if _severity(s) > 0}
    if not failed:
        # No rank reported a failure: killed, or torchrun itself failed (rendezvous timeout).
        return LaunchResult(launcher_code, {"exit_code": launcher_code, "kind": "failure",
                                            "error": "torchrun", "rank_reports": len(statuses)})
    rank = max(sorted(failed), key=lambda r: _severity(failed[r]))
    status = dict(failed[rank])
    code = status.get("exit_code")
    code = code if isinstance(code, int) and code != 0 else launcher_code
    return LaunchResult(code, {**status, "exit_code": code, "rank": rank, "rank_reports": len(statuses)})


def _read_statuses(directory: Path) -> dict[int, dict[str, Any]]:
    out = {}
    for path in directory.glob("rank-*.json"):
        with contextlib.suppress(OSError, ValueError):
            out[int(path.stem.removeprefix("rank-"))] = json.loads(path.read_text(encoding="utf-8"))
    return out


def exit_status(returncode: int) -> int:
    """A child's exit status as a shell reports it."""
    return 128 - returncode if returncode < 0 else returncode  # killed by signal N -> 128 + N


def run_torchrun(cmd: Sequence[str], env: Mapping[str, str] | None = None) -> LaunchResult:
    """Run ``cmd`` (from :func:`torchrun_command`) and fold the ranks' statuses into one."""
    with tempfile.TemporaryDirectory(prefix="vaeft-ranks-") as tmp:
        child_env = dict(os.environ if env is None else env)
        # The ranks must not write the launcher's status file: only the folded status goes there.
        child_env.pop(STATUS_FILE_ENV, None)
        child_env[RANK_STATUS_DIR_ENV] = tmp
        # torchrun otherwise makes a torchelastic_* directory in the temp dir for every job and
        # never removes it; its files are only read while the job runs.
        child_env.setdefault("PET_LOG_DIR", str(Path(tmp) / "torchrun"))
        code = _run_forwarding_sigterm(list(cmd), child_env)
        return worst_status(_read_statuses(Path(tmp)), code)


def _run_forwarding_sigterm(cmd: list[str], env: dict[str, str]) -> int:
    proc = subprocess.Popen(cmd, env=env)

    # An orchestrator stopping this process (dvc, a Prefect cancellation, a pod shutdown) sends
    # SIGTERM here only; torchrun must get it to stop the ranks instead of being orphaned.
    def forward(signum: int, _frame: object) -> None:
        proc.send_signal(signum)

    try:
        previous = signal.signal(signal.SIGTERM, forward)
        installed = True
    except ValueError:  # not the main thread: nothing to forward from
        installed = False
    try:
        try:
            return exit_status(proc.wait())
        except KeyboardInterrupt:
            # Ctrl-C in a terminal reaches torchrun too (same process group): let it stop the
            # ranks; only a SIGINT sent to this process alone needs passing on.
            try:
                return exit_status(proc.wait(timeout=30))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGTERM)
                return exit_status(proc.wait())
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous)


def relaunch(argv: Sequence[str], env: Mapping[str, str] | None = None) -> LaunchResult | None:
    """Rerun ``vaeft <argv>`` under torchrun if the environment asks for it; None: run here."""
    env = os.environ if env is None else env
    cmd = torchrun_command(env, argv)
    if cmd is None:
        return None
    launcher = " ".join(cmd[1:len(cmd) - len(argv) - 2])  # between the interpreter and "-m vaeft"
    print(f"vaeft: relaunching under {launcher} (VAEFT_* launch variables)", file=sys.stderr, flush=True)
    return run_torchrun(cmd, env)
