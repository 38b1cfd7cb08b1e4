"""Validated flow parameters: a bad flow invocation fails before any stage or upload runs."""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vaeft.config import HubPublishParams, Params, ParamsError, S3PublishParams, load_params
from vaeft.errors import VaeftError
from vaeft.runtime_env import PROJECT_ROOT

RECIPES = "vaeft/recipes"  # in the repo the flow runs (package data: the wheel has them too)


class FlowConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo: Path = PROJECT_ROOT
    # A params file or a recipe name (vaeft/recipes/<name>.yaml) to run with; it is copied over the
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
        if self.recipe and not (self.repo / RECIPES / f"{self.recipe}.yaml").is_file():
            raise ValueError(f"recipe {self.recipe!r}: no {RECIPES}/{self.recipe}.yaml")
        if self.dask_address and self.curate_engine == "local":
            raise ValueError("dask_address needs curate_engine dask (or none)")
        return self

    def check_sources(self, params: Params) -> None:
        """The folder sources exist (the curate stage runs in the repo, so relative paths are
        the repo's): a wrong path fails before Prefect starts, not at the first stage."""
        for src in params.data.sources:
            if src.kind == "folder" and src.path and not (self.repo / src.path).is_dir():
                raise ParamsError(f"data source {src.name!r}: folder {src.path} does not exist")

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
            return self.repo / RECIPES / f"{self.recipe}.yaml"
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


class _UserErrorConsoleFilter(logging.Filter):
    """Keeps a user error's traceback off the terminal: Prefect logs the exception (with its
    traceback) and a "Finished in state Failed(... an exception NAME: message)" line for the task
    and again for the flow, before the flow re-raises it to the entry point, which prints it once.
    Attached to the console handlers only: the run's logs in the Prefect UI keep everything."""

    _STATE = re.compile(r"encountered an exception:? (\w+):")

    def __init__(self, user_errors: tuple[type[BaseException], ...]) -> None:
        super().__init__()
        self.user_errors = user_errors
        self.names = {c.__name__ for c in _subclasses(user_errors)}

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, self.user_errors):
            return False
        state = self._STATE.search(record.getMessage())
        return not (state and state.group(1) in self.names)


def _subclasses(classes: tuple[type[BaseException], ...]) -> set[type[BaseException]]:
    seen: set[type[BaseException]] = set()
    todo = list(classes)
    while todo:
        c = todo.pop()
        if c not in seen:
            seen.add(c)
            todo.extend(c.__subclasses__())
    return seen


def _console_handlers() -> list[logging.Handler]:
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    return list({id(h): h for lg in loggers for h in lg.handlers if isinstance(h, PrefectConsoleHandler)}.values())


@contextlib.contextmanager
def user_errors_in_one_line(*extra: type[BaseException]) -> Iterator[_UserErrorConsoleFilter]:
    """Around a flow's command line: a user error (bad params, a missing input, a stage that
    exited 2) ends in one ``error: ...`` line on stderr and exit 2, with no Prefect traceback."""
    user_errors = (VaeftError, *extra)
    quiet = _UserErrorConsoleFilter(user_errors)
    handlers = _console_handlers()
    for h in handlers:
        h.addFilter(quiet)
    try:
        yield quiet
    except user_errors as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        for h in handlers:
            h.removeFilter(quiet)
