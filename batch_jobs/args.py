"""Argument checks shared by the Batch entry points."""

from __future__ import annotations

from topx.config import env_or
from topx.contract import ENV_BUCKET
from topx.errors import ConfigError

# AWS Batch leaves `Ref::name` in the command when the job was submitted without that parameter.
UNFILLED_PREFIX = "Ref::"


def filled(value: str | None, option: str) -> str | None:
    """``value``, unless AWS Batch left its ``Ref::`` placeholder in it."""
    if value is not None and value.startswith(UNFILLED_PREFIX):
        parameter = value.removeprefix(UNFILLED_PREFIX)
        raise ConfigError(f"{option} was not set: submit the job with the parameter {parameter!r}")
    return value


def bucket_name(explicit: str | None) -> str:
    """--bucket, else TOPX_BUCKET."""
    bucket = env_or(ENV_BUCKET, filled(explicit, "--bucket"), None)
    if not bucket:
        raise ConfigError(f"no bucket: pass --bucket or set {ENV_BUCKET}")
    return bucket


def run_id(explicit: str) -> str:
    value = filled(explicit, "--run-id")
    if not value:
        raise ConfigError("--run-id must not be empty")
    return value
