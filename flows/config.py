"""Validated flow parameters: a bad flow invocation fails before any stage or upload runs."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vaeft.config import HubPublishParams, Params, ParamsError, S3PublishParams, load_params
from vaeft.runtime_env import PROJECT_ROOT


class FlowConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo: Path = PROJECT_ROOT
    # A params file or a recipe name (recipes/<name>.yaml) to run with; it is copied over the
    # repo's params.yaml because that is the file the DVC stages depend on. None: use params.yaml.
    params_file: Path | None = None
    recipe: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$")
    # Name of a DVC remote the user configured (`dvc remote add`); None: no pull/push.
    dvc_remote: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$")
    publish_to: Path | None = None  # local target; None: params.publish.target
    s3: S3PublishParams | None = None  # overrides params.publish.s3
    hub: HubPublishParams | None = None  # overrides params.publish.hub
    # Training processes per node (torchrun, one per GPU); None: one process, or whatever
    # VAEFT_NPROC_PER_NODE the worker's environment already sets.
    gpus: int | None = Field(default=None, ge=1)
    # Where the curate stage runs its work shards: "dask" with dask_address (a scheduler, e.g. the
    # one in infra/k8s/dask-cluster.yaml) or without (a local cluster); None: data.engine. Passed
    # to the stage through its environment, so switching engines never makes DVC rerun it.
    curate_engine: Literal["local", "dask"] | None = None
    dask_address: str | None = Field(default=None, pattern=r"^(tcp|tls)://[A-Za-z0-9_.:\[\]-]+$")

    @model_validator(mode="after")
    def _check(self) -> FlowConfig:
        # A deployment passes repo="." (the pull step's working directory); stages need it absolute.
        self.repo = self.repo.expanduser().resolve()
        if not (self.repo / "dvc.yaml").is_file():
            raise ValueError(f"repo {self.repo}: no dvc.yaml")
        if self.params_file and self.recipe:
            raise ValueError("give params_file or recipe, not both")
        if self.params_file and not self.params_file.is_file():
            raise ValueError(f"params_file {self.params_file}: not a file")
        if self.recipe and not (self.repo / "recipes" / f"{self.recipe}.yaml").is_file():
            raise ValueError(f"recipe {self.recipe!r}: no recipes/{self.recipe}.yaml")
        if self.dask_address and self.curate_engine == "local":
            raise ValueError("dask_address needs curate_engine dask (or none)")
        return self

    def stage_env(self) -> dict[str, str]:
        """Environment for the stage commands: the torchrun launch variables (vaeft.train.launch)
        and the curate stage's engine (read by `vaeft curate`'s --engine / --dask-address)."""
        from vaeft.train.launch import NPROC_ENV

        env = {NPROC_ENV: str(self.gpus)} if self.gpus is not None else {}
        if self.dask_address:
            env.update(VAEFT_CURATE_ENGINE="dask", VAEFT_DASK_ADDRESS=self.dask_address)
        elif self.curate_engine:
            env["VAEFT_CURATE_ENGINE"] = self.curate_engine
        return env

    def source_params(self) -> Path:
        if self.recipe:
            return self.repo / "recipes" / f"{self.recipe}.yaml"
        return self.params_file or self.repo / "params.yaml"

    def apply_params(self) -> Params:
        """Validate the chosen params, then make them the repo's params.yaml."""
        src = self.source_params()
        params = load_params(src)
        dst = self.repo / "params.yaml"
        if src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)
        return params

    def local_target(self, params: Params) -> Path:
        target = self.publish_to or Path(params.publish.target)
        return target if target.is_absolute() else self.repo / target

    def s3_target(self, params: Params) -> S3PublishParams | None:
        return self.s3 or params.publish.s3

    def hub_target(self, params: Params) -> HubPublishParams:
        return self.hub or params.publish.hub


def flow_config(**kwargs: object) -> FlowConfig:
    """Build a :class:`FlowConfig`, turning validation errors into one-line ParamsErrors."""
    try:
        return FlowConfig(**{k: v for k, v in kwargs.items() if v is not None})
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        # Cross-field checks (recipe, params_file, repo) have no location and pydantic prefixes
        # their message with "Value error, ": the message already names the parameter.
        msg = first["msg"].removeprefix("Value error, ")
        raise ParamsError(f"flow parameter {where}: {msg}" if where else msg) from None


def add_s3_arguments(ap: argparse.ArgumentParser) -> None:
    """The S3 publish target options shared by the flows' command lines."""
    ap.add_argument("--s3-bucket", help="publish to this S3 bucket as well")
    ap.add_argument("--s3-prefix", default="vaeft")
    ap.add_argument("--s3-endpoint-url", help="S3-compatible endpoint (credentials: standard AWS chain)")


def s3_from_args(args: argparse.Namespace) -> S3PublishParams | None:
    if not args.s3_bucket:
        return None
    return S3PublishParams(bucket=args.s3_bucket, prefix=args.s3_prefix, endpoint_url=args.s3_endpoint_url)
