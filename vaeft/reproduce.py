"""``vaeft reproduce``: rebuild a published release from its receipt and say whether it is the same.

Given a receipt (``<target>/<version>/receipts/<id>.json``, or an ``s3://`` one), this clones the
repository at the receipt's commit into a fresh work dir (the user's checkout is never touched),
pulls the DVC-tracked inputs (``*.dvc`` files) when there are any, runs ``dvc repro --force`` with
this interpreter, then checks every published file of the rebuilt ``export/`` against the
receipt's sha256. Models that differ get a per-tensor comparison against the published files
(max |diff|) and the evaluation metrics of both builds side by side, judged against
:data:`DEFAULT_TOLERANCES`.

Outcome and exit status (documented in the README, "Reproducing a release"):

- ``identical`` (0): every published file rebuilt byte for byte;
- ``within_tolerance`` (3): some bytes differ, but every differing model's toleranced metrics are
  within tolerance (the expected outcome across hardware);
- ``differs`` (4): bytes differ and a metric is out of tolerance or cannot be compared.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field
from rich.markup import escape

from vaeft import atomic
from vaeft.config import load_params, params_as_dict, parse_params
from vaeft.console import banner, console
from vaeft.errors import STATUS_FILE_ENV, VaeftError
from vaeft.export.release import SUMS_FILE
from vaeft.hashing import file_sha256
from vaeft.metrics.summary import headline
from vaeft.publish.receipt import METRICS_FILE, build_environment
from vaeft.train.determinism import CUBLAS_WORKSPACE, CUBLAS_WORKSPACE_ENV, DETERMINISTIC_ENV

EXIT_IDENTICAL = 0
EXIT_WITHIN_TOLERANCE = 3
EXIT_DIFFERS = 4
STATUS_EXIT = {"identical": EXIT_IDENTICAL, "within_tolerance": EXIT_WITHIN_TOLERANCE, "differs": EXIT_DIFFERS}

EXPORT_DIR = "export"  # the export stage's output (dvc.yaml), which the receipt's sums describe
CLONE_DIR = "repo"
MARKER = ".vaeft-reproduce.json"  # says a work dir is ours to reuse
REPORT_NAME = "reproduce_report"

# |rebuilt - release| of an eval-set mean that still counts as the same model when the bytes
# differ (another GPU type, CPU vs GPU). Each is about one standard error of that mean on the
# published protocol (COCO 2017 val, 5000 images; σ from the model cards, REFERENCE §4):
# PSNR σ 3.7-3.9 dB -> 3.8/√5000 = 0.054; SSIM σ 0.13 -> 0.0018; PSIM σ 0.27 -> 0.0038. A rebuild
# further off than that is distinguishable from the release by the release's own evaluation.
DEFAULT_TOLERANCES: dict[str, float] = {"psnr": 0.05, "ssim": 0.002, "psim_candidate": 0.004}

# Environment keys that make a different machine type (the rest are software versions).
MACHINE_KEYS = ("machine", "cpu", "cpu_count", "torch_threads", "cuda_device")


class ReproduceError(VaeftError):
    """A receipt, work dir or repository that cannot be reproduced from (the user can fix it)."""


class RebuildFailed(RuntimeError):
    """Cloning, pulling or ``dvc repro`` failed; the message ends with the tool's own output."""


class ReproduceParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo: str | None = None  # git repo (path or URL) holding the commit; default: this checkout, then the receipt's origin
    remote: str | None = None  # DVC remote for the inputs; default: the receipt's, else the repo's default
    deterministic: bool = False  # deterministic GPU kernels in every training phase of the rebuild
    tolerances: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_TOLERANCES))
    s3_endpoint_url: str | None = None  # for an s3:// receipt on an S3-compatible store


@dataclass(frozen=True)
class ReproduceResult:
    status: str  # identical | within_tolerance | differs
    exit_code: int
    models: dict[str, str]  # model -> identical | differs | missing
    report_json: Path
    report_md: Path
    report: dict[str, Any]


# --- receipt -------------------------------------------------------------------------------------

def load_receipt(src: str | Path, s3_endpoint_url: str | None = None) -> tuple[dict[str, Any], Path | None]:
    """The receipt and, when it is a local file, its path (its release folder is then nearby)."""
    text = str(src)
    if text.startswith("s3://"):
        raw = _read_s3(text, s3_endpoint_url)
        path = None
    else:
        path = Path(src)
        if not path.is_file():
            raise ReproduceError(f"receipt {path} does not exist")
        raw = path.read_bytes()
    try:
        receipt = json.loads(raw)
    except ValueError as err:
        raise ReproduceError(f"receipt {src}: not JSON ({err})") from None
    if not isinstance(receipt, dict) or not (receipt.get("git") or {}).get("commit"):
        raise ReproduceError(f"receipt {src}: no git commit recorded; nothing to rebuild from")
    if not isinstance(receipt.get("outputs_sha256"), dict) or not receipt["outputs_sha256"]:
        raise ReproduceError(f"receipt {src}: no outputs_sha256; nothing to compare a rebuild with")
    return receipt, path


def _read_s3(uri: str, endpoint_url: str | None) -> bytes:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket or not key:
        raise ReproduceError(f"{uri}: expected s3://BUCKET/KEY")
    try:
        client = boto3.session.Session().client("s3", endpoint_url=endpoint_url)
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except (BotoCoreError, ClientError) as err:
        raise ReproduceError(f"{uri}: cannot read the receipt ({err})") from None


def release_dir_for(receipt: dict[str, Any], receipt_path: Path | None) -> Path | None:
    """The published release folder whose ``SHA256SUMS`` is the receipt's, if one is reachable:
    beside the receipt first (wherever the release was copied to), then the recorded local target."""
    candidates = []
    if receipt_path is not None:
        candidates.append(receipt_path.resolve().parent.parent)
    local = (receipt.get("published") or {}).get("local")
    if isinstance(local, str):
        candidates.append(Path(local))
    want = receipt.get("sha256sums_sha256")
    for c in candidates:
        sums = c / SUMS_FILE
        if sums.is_file() and (want is None or file_sha256(sums) == want):
            return c
    return None


# --- comparison (pure functions of folders, so they are testable without a pipeline run) --------

def _finite(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)  # JSON has no NaN/inf


def tensor_diff(release_file: Path, rebuilt_file: Path, top: int = 5) -> dict[str, Any]:
    """Per-tensor max |release - rebuilt| of two safetensors files of the same model."""
    import torch
    from safetensors.torch import load_file

    if not release_file.is_file():
        return {"available": False, "reason": f"release file {release_file} not found"}
    a, b = load_file(str(release_file)), load_file(str(rebuilt_file))
    diffs: dict[str, float] = {}
    mismatched = []
    for name in sorted(set(a) & set(b)):
        ta, tb = a[name], b[name]
        if ta.shape != tb.shape or ta.dtype != tb.dtype:
            mismatched.append(f"{name}: {tuple(ta.shape)} {ta.dtype} vs {tuple(tb.shape)} {tb.dtype}")
        elif not torch.equal(ta, tb):
            diffs[name] = float((ta.double() - tb.double()).abs().max()) if ta.numel() else 0.0
    largest = sorted(diffs.items(), key=lambda kv: (-kv[1] if math.isfinite(kv[1]) else -math.inf, kv[0]))[:top]
    worst = max(diffs.values(), default=0.0)
    out: dict[str, Any] = {
        "available": True,
        "tensors": len(a),
        "differing": len(diffs),
        "max_abs_diff": _finite(worst),
        "largest": [{"tensor": k, "max_abs_diff": _finite(v)} for k, v in largest],
        "missing": sorted(set(a) - set(b)),
        "unexpected": sorted(set(b) - set(a)),
        "shape_or_dtype": mismatched,
    }
    if not diffs and not mismatched and not out["missing"] and not out["unexpected"]:
        out["note"] = "every tensor is equal: only the file's header/metadata differs"
    return out


def _rebuilt_sums(rebuilt: Path) -> dict[str, str]:
    sums = rebuilt / SUMS_FILE
    if not sums.is_file():
        return {}
    return {rel: d for d, _, rel in (ln.partition("  ") for ln in sums.read_text(encoding="utf-8").splitlines() if ln)}


def compare_outputs(expected: dict[str, str], rebuilt: Path, release_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    """Every file the receipt lists (``model/...`` relative paths) re-hashed from ``rebuilt``.

    Returns model -> {"status": identical|differs|missing, "files": [...], "max_abs_diff"}.
    Files the rebuild added that the release lacks also make the model differ. ``release_dir``
    (the published release) lets differing ``.safetensors`` be compared tensor by tensor.
    """
    models: dict[str, dict[str, Any]] = {}
    for rel, digest in sorted(expected.items()):
        model = rel.split("/", 1)[0] if "/" in rel else "(release)"
        path = rebuilt / rel
        actual = file_sha256(path) if path.is_file() else None
        entry: dict[str, Any] = {"path": rel, "release_sha256": digest, "rebuilt_sha256": actual,
                                 "identical": actual == digest}
        if actual is not None and actual != digest and rel.endswith(".safetensors"):
            entry["tensors"] = (tensor_diff(release_dir / rel, path) if release_dir is not None
                                else {"available": False, "reason": "the published release folder was not found"})
        models.setdefault(model, {"files": []})["files"].append(entry)
    for rel in sorted(set(_rebuilt_sums(rebuilt)) - set(expected)):
        model = rel.split("/", 1)[0] if "/" in rel else "(release)"
        models.setdefault(model, {"files": []})["files"].append(
            {"path": rel, "release_sha256": None, "rebuilt_sha256": file_sha256(rebuilt / rel), "identical": False})
    for m in models.values():
        files = m["files"]
        if all(f["rebuilt_sha256"] is None for f in files if f["release_sha256"] is not None):
            m["status"] = "missing"
        else:
            m["status"] = "identical" if all(f["identical"] for f in files) else "differs"
        worst = [f["tensors"]["max_abs_diff"] for f in files
                 if f.get("tensors", {}).get("available") and isinstance(f["tensors"]["max_abs_diff"], float)]
        m["max_abs_diff"] = max(worst) if worst else None
    return models


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def compare_metrics(release: dict[str, Any] | None, rebuilt: dict[str, Any] | None,
                    tolerances: dict[str, float]) -> list[dict[str, Any]]:
    """Rows of (model, metric, release, rebuilt, delta, tolerance, within) for every headline
    number of either ``metrics/eval.json``; ``within`` is None where no tolerance applies or a side
    lacks it. Receipts from before the headline split (``psnr_mean`` ...) compare in the short
    form, and so do tolerances named the old way."""
    release = {m: headline(v or {}) for m, v in (release or {}).items()}
    rebuilt = {m: headline(v or {}) for m, v in (rebuilt or {}).items()}
    tolerances = {k.removesuffix("_mean"): v for k, v in tolerances.items()}
    rows = []
    for model in sorted(set(release) | set(rebuilt)):
        r, b = release.get(model) or {}, rebuilt.get(model) or {}
        for key in sorted(k for k in set(r) | set(b) if _num(r.get(k)) or _num(b.get(k))):
            rv, bv = r.get(key), b.get(key)
            delta = bv - rv if _num(rv) and _num(bv) else None
            tol = tolerances.get(key)
            rows.append({"model": model, "metric": key, "release": rv if _num(rv) else None,
                         "rebuilt": bv if _num(bv) else None, "delta": delta, "tolerance": tol,
                         "within": (abs(delta) <= tol) if tol is not None and delta is not None
                         else (False if tol is not None else None)})
    return rows


def verdict(models: dict[str, dict[str, Any]], metric_rows: list[dict[str, Any]]) -> str:
    """identical | within_tolerance | differs (see the module docstring)."""
    if models and all(m["status"] == "identical" for m in models.values()):
        return "identical"
    for name, m in models.items():
        if m["status"] == "identical":
            continue
        judged = [r for r in metric_rows if r["model"] == name and r["tolerance"] is not None]
        if not judged or not all(r["within"] for r in judged):
            return "differs"  # a differing model nobody evaluated is not "close enough"
    return "within_tolerance"


def environment_diff(release_env: dict[str, Any] | None, rebuild_env: dict[str, Any]) -> dict[str, Any]:
    if not release_env:
        return {"known": False, "same_machine_type": None, "differs": {}}
    differs = {k: {"release": release_env.get(k), "rebuild": rebuild_env.get(k)}
               for k in sorted(set(release_env) | set(rebuild_env)) if release_env.get(k) != rebuild_env.get(k)}
    return {"known": True, "same_machine_type": not any(k in differs for k in MACHINE_KEYS), "differs": differs}


# --- report --------------------------------------------------------------------------------------

def _short(d: str | None) -> str:
    return f"`{d[:12]}…`" if d else "—"


def _fmt(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:+.3g}" if abs(x) < 1e-3 and x != 0 else f"{x:.4f}"
    return str(x)


def model_line(name: str, m: dict[str, Any]) -> str:
    if m["status"] == "identical":
        weights = [f"{f['release_sha256'][:12]}… {f['path'].split('/', 1)[-1]}" for f in m["files"]
                   if f["path"].endswith(".safetensors")]
        return f"{name}: identical (sha256 {', '.join(weights) or str(len(m['files'])) + ' files'})"
    if m["status"] == "missing":
        return f"{name}: missing (the rebuild produced none of its files)"
    bad = [f["path"] for f in m["files"] if not f["identical"]]
    tail = f"; max |Δ| over tensors {m['max_abs_diff']:.3g}" if m.get("max_abs_diff") is not None else ""
    return f"{name}: differs ({', '.join(bad)}{tail})"


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Reproducing release {report['release']}", "",
             (f"Result: **{report['status']}** (exit {report['exit_code']}). Commit `{report['commit']}`; "
              f"rebuilt in `{report['clone']}` in {report['seconds']:.0f} s"
              f"{' with deterministic kernels' if report['deterministic'] else ''}."), "",
             "| model | file | release sha256 | rebuilt sha256 | result | max abs diff (tensors) |",
             "|---|---|---|---|---|---|"]
    for name, m in report["models"].items():
        lines.append(f"| **{name}** | | | | **{m['status']}** | {_fmt(m.get('max_abs_diff')) if m.get('max_abs_diff') is not None else ''} |")
        for f in m["files"]:
            t = f.get("tensors") or {}
            diff = _fmt(t.get("max_abs_diff")) if t.get("available") else (t.get("reason", "") if t else "")
            same = "identical" if f["identical"] else ("missing" if f["rebuilt_sha256"] is None else
                                                       "unexpected" if f["release_sha256"] is None else "differs")
            lines.append(f"| | `{f['path']}` | {_short(f['release_sha256'])} | {_short(f['rebuilt_sha256'])} | "
                         f"{same} | {diff} |")
    for m in report["models"].values():
        for f in m["files"]:
            t = f.get("tensors") or {}
            if t.get("available") and (t["differing"] or t["shape_or_dtype"] or t["missing"] or t["unexpected"]):
                lines += ["", f"`{f['path']}`: {t['differing']} of {t['tensors']} tensors differ; largest: "
                          + ", ".join(f"`{x['tensor']}` {_fmt(x['max_abs_diff'])}" for x in t["largest"])]
                for what in ("missing", "unexpected", "shape_or_dtype"):
                    if t[what]:
                        lines.append(f"- {what}: " + ", ".join(f"`{x}`" for x in t[what]))
    lines += [""]
    if report["status"] == "identical":
        lines.append("Every published file rebuilt byte for byte, so the evaluation metrics are the release's.")
    else:
        lines += ["## Evaluation metrics, release vs rebuild", "",
                  "| model | metric | release | rebuilt | Δ | tolerance | within |", "|---|---|---|---|---|---|---|"]
        for r in report["metrics"]:
            if r["metric"].endswith("_std"):
                continue
            within = {True: "yes", False: "**no**", None: ""}[r["within"]]
            lines.append(f"| {r['model']} | {r['metric']} | {_fmt(r['release'])} | {_fmt(r['rebuilt'])} | "
                         f"{_fmt(r['delta'])} | {_fmt(r['tolerance'])} | {within} |")
        if not report["metrics"]:
            lines.append("| n/a | the receipt records no metrics (schema 1) or the rebuild wrote none | | | | | |")
    env = report["environment"]
    lines += ["", "## Environment", ""]
    if not env["known"]:
        lines.append("The receipt does not record the release's environment (schema 1).")
    else:
        lines.append("Same machine type as the release." if env["same_machine_type"]
                     else "**Different machine type** from the release: bit-exact results are not expected.")
        lines += [f"- {k}: release `{v['release']}`, rebuild `{v['rebuild']}`" for k, v in env["differs"].items()]
    lock = report["dvc_lock"]
    lines += ["", f"dvc.lock: {lock['status']}."]
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


# --- the run -------------------------------------------------------------------------------------

def _git(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)


def _tool_env(deterministic: bool) -> dict[str, str]:
    """This interpreter's bin dir first, so ``python -m vaeft`` in the stage commands is the venv's
    python running the clone's vaeft (cwd comes first on ``sys.path``)."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    # A status file an orchestrator gave *this* command must not be overwritten by the stages.
    env.pop(STATUS_FILE_ENV, None)
    if deterministic:
        env[DETERMINISTIC_ENV] = "1"
        env.setdefault(CUBLAS_WORKSPACE_ENV, CUBLAS_WORKSPACE)
    return env


def _dvc(clone: Path, env: dict[str, str], *args: str, capture: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=clone, env=env, text=True,
                          capture_output=capture, check=False)


def _prepare_workdir(workdir: Path, receipt_src: str) -> None:
    if workdir.exists():
        if not workdir.is_dir():
            raise ReproduceError(f"--workdir {workdir} is a file")
        if any(workdir.iterdir()) and not (workdir / MARKER).is_file():
            raise ReproduceError(f"--workdir {workdir} is not empty and was not made by `vaeft reproduce`; "
                                 "give a new or empty directory")
        # Our own earlier attempt: its clone is ours to replace.
        shutil.rmtree(workdir / CLONE_DIR, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    atomic.write_json(workdir / MARKER, {"receipt": receipt_src})


def _has_commit(repo: str | Path, commit: str) -> bool:
    return _git("cat-file", "-e", f"{commit}^{{commit}}", cwd=Path(repo)).returncode == 0


def resolve_source(receipt: dict[str, Any], repo: str | None) -> str:
    """Where to clone from: ``repo`` if given, this checkout if it has the commit, else the
    receipt's recorded origin."""
    if repo:
        return repo
    commit = receipt["git"]["commit"]
    top = _git("rev-parse", "--show-toplevel", cwd=Path.cwd())
    if top.returncode == 0 and _has_commit(top.stdout.strip(), commit):
        return top.stdout.strip()
    url = receipt["git"].get("remote_url")
    if url:
        return url
    raise ReproduceError(f"commit {commit[:12]} is not in this checkout and the receipt records no git "
                         "remote; pass --repo with a clone that has it")


def _clone(source: str, commit: str, dest: Path) -> None:
    proc = _git("clone", "--quiet", "--no-checkout", source, str(dest))
    if proc.returncode != 0:
        raise RebuildFailed(f"git clone {source} failed: {proc.stderr.strip()[-1000:]}")
    if not _has_commit(dest, commit):
        raise ReproduceError(f"commit {commit[:12]} is not in {source} (unpushed, or history rewritten); "
                             "pass --repo with a clone that has it")
    proc = _git("checkout", "--quiet", "--detach", commit, cwd=dest)
    if proc.returncode != 0:
        raise RebuildFailed(f"git checkout {commit[:12]} failed: {proc.stderr.strip()[-1000:]}")


def _align_params(clone: Path, receipt: dict[str, Any], notes: list[str]) -> None:
    """Rebuild with the params the release was built with: the commit's params.yaml normally is
    them, but a run may have used a params file or recipe it did not commit."""
    recorded = receipt.get("params")
    if not isinstance(recorded, dict):
        notes.append("The receipt records no params; the commit's params.yaml was used as is.")
        return
    try:
        # Both resolved by this vaeft, so a default added since the release does not count as a change.
        if params_as_dict(load_params(clone / "params.yaml")) == params_as_dict(parse_params(recorded, "receipt")):
            return
        why = "differs from the receipt's params"
    except VaeftError as err:
        why = f"could not be compared with the receipt's params ({err})"
    atomic.write_text(clone / "params.yaml", yaml.safe_dump(recorded, sort_keys=False))
    notes.append(f"The commit's params.yaml {why}; rebuilt with the receipt's params.")


def _pull_inputs(clone: Path, env: dict[str, str], remote: str | None, notes: list[str]) -> None:
    tracked = [p for p in _git("ls-files", "*.dvc", cwd=clone).stdout.splitlines() if p]
    if not tracked:
        notes.append("No DVC-tracked inputs (*.dvc): the pipeline starts from sources in the repository "
                     "or installed packages; nothing pulled.")
        return
    console.print(f"reproduce: dvc pull {' '.join(tracked)}" + (f" -r {remote}" if remote else ""))
    proc = _dvc(clone, env, "pull", *tracked, *(["-r", remote] if remote else []))
    if proc.returncode != 0:
        raise RebuildFailed(f"dvc pull failed: {(proc.stderr or proc.stdout).strip()[-2000:]}")
    notes.append(f"Pulled {', '.join(tracked)}" + (f" from remote {remote!r}." if remote else " from the default remote."))


def uncommitted_inputs(git: dict[str, Any]) -> list[str]:
    """Tracked files the release's checkout had changed, other than what the pipeline itself
    rewrites (dvc.lock, the .gitignore entries DVC adds); schema 1 only knew ``dirty``."""
    changed = git.get("changed")
    if changed is None:
        return ["(unknown files)"] if git.get("dirty") else []
    return [p for p in changed if p != "dvc.lock" and Path(p).name != ".gitignore"]


def _remote_name(receipt: dict[str, Any], params: ReproduceParams) -> str | None:
    if params.remote:
        return params.remote
    recorded = receipt.get("dvc_remote") or {}
    return recorded.get("name") if isinstance(recorded, dict) else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def reproduce(receipt_src: str | Path, workdir: str | Path | None = None, params: ReproduceParams | None = None,
              report: str | Path | None = None) -> ReproduceResult:
    """Rebuild the release of ``receipt_src`` in ``workdir`` and compare it (module docstring).

    ``workdir``: new, empty, or one this function made before; None: a new ``vaeft-reproduce-*``
    in the temp dir (kept: the rebuild is worth inspecting). ``report``: the JSON report's path
    (markdown beside it, ``.md``); default ``workdir/reproduce_report.json``.
    """
    params = params or ReproduceParams()
    receipt, receipt_path = load_receipt(receipt_src, params.s3_endpoint_url)
    commit = receipt["git"]["commit"]
    source = resolve_source(receipt, params.repo)
    # Made only once the receipt and the repository check out, so a typo leaves nothing behind.
    workdir = Path(workdir).resolve() if workdir is not None else Path(tempfile.mkdtemp(prefix="vaeft-reproduce-"))
    banner("reproduce", f"release {receipt.get('release')} from commit {commit[:12]} -> {workdir}")
    notes: list[str] = []
    changed = uncommitted_inputs(receipt["git"])
    if changed:
        notes.append(f"The release was built with uncommitted changes to {', '.join(changed)}; the rebuild "
                     "uses the commit as committed (and the receipt's params).")
    if receipt.get("schema", 1) < 2:
        notes.append("Schema-1 receipt: no metrics or environment recorded, so neither can be compared.")
    _prepare_workdir(workdir, str(receipt_src))
    clone = workdir / CLONE_DIR
    console.print(f"reproduce: cloning {source} at {commit[:12]}")
    _clone(source, commit, clone)
    _align_params(clone, receipt, notes)
    if params.deterministic:
        off = [ph for ph, cfg in ((receipt.get("params") or {}).get("train") or {}).items()
               if isinstance(cfg, dict) and not cfg.get("deterministic")]
        if off:
            notes.append(f"--deterministic: the release trained {', '.join(off)} without deterministic kernels, "
                         "so on a GPU this rebuild is repeatable but not expected to match it bit for bit.")
    env = _tool_env(params.deterministic)
    _pull_inputs(clone, env, _remote_name(receipt, params), notes)

    console.print("reproduce: dvc repro --force (every stage runs; nothing comes from a cache)")
    t0 = time.perf_counter()
    proc = _dvc(clone, env, "repro", "--force", capture=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RebuildFailed(f"dvc repro failed in {clone} (exit {proc.returncode}); see its output above")

    release_dir = release_dir_for(receipt, receipt_path)
    if release_dir is None:
        notes.append("The published release folder was not found next to the receipt or at its recorded "
                     "local path: differing weights cannot be compared tensor by tensor.")
    models = compare_outputs(receipt["outputs_sha256"], clone / EXPORT_DIR, release_dir)
    metric_rows = compare_metrics(receipt.get("metrics"), _read_json(clone / METRICS_FILE), params.tolerances)
    status = verdict(models, metric_rows)
    lock = clone / "dvc.lock"
    lock_sha = file_sha256(lock) if lock.is_file() else None
    want_lock = receipt.get("dvc_lock_sha256")
    lock_status = ("identical to the release's" if lock_sha and lock_sha == want_lock
                   else "not recorded in the receipt" if not want_lock
                   else "differs from the release's (an output or a dependency hashed differently)")
    out = {
        "schema": 1,
        "status": status,
        "exit_code": STATUS_EXIT[status],
        "receipt": str(receipt_src),
        "release": receipt.get("release"),
        "commit": commit,
        "source": source,
        "clone": str(clone),
        "release_dir": str(release_dir) if release_dir else None,
        "deterministic": params.deterministic,
        "seconds": round(seconds, 1),
        "models": models,
        "metrics": metric_rows,
        "tolerances": params.tolerances,
        "environment": {**environment_diff(receipt.get("environment"), build_environment()),
                        "release": receipt.get("environment"), "rebuild": build_environment()},
        "dvc_lock": {"status": lock_status, "release_sha256": want_lock, "rebuilt_sha256": lock_sha},
        "notes": notes,
    }
    report_json = Path(report) if report is not None else workdir / f"{REPORT_NAME}.json"
    report_md = report_json.with_suffix(".md")
    atomic.write_json(report_json, out)
    atomic.write_text(report_md, render_markdown(out))

    # soft_wrap: one line per model however narrow the terminal, so logs can be grepped.
    for name, m in models.items():
        colour = {"identical": "green", "differs": "red", "missing": "red"}[m["status"]]
        console.print(f"[{colour}]{escape(model_line(name, m))}[/]", soft_wrap=True)
    if status != "identical":
        for r in metric_rows:
            if r["tolerance"] is not None:
                console.print(f"  {r['model']} {r['metric']}: release {_fmt(r['release'])}, rebuilt {_fmt(r['rebuilt'])}, "
                              f"Δ {_fmt(r['delta'])} (tolerance {r['tolerance']}) {'ok' if r['within'] else 'OUT'}",
                              soft_wrap=True, markup=False)
    console.print(f"reproduce: [bold]{status}[/]; report {escape(str(report_json))} (+ .md)", soft_wrap=True)
    return ReproduceResult(status, STATUS_EXIT[status], {k: m["status"] for k, m in models.items()},
                           report_json, report_md, out)
