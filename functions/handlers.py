"""Lambda handlers of the pipeline. Each parses its event, calls one ``topx.aws.stages`` function (the
starter, fed by the upload queue: ``topx.aws.trigger``), returns a dict.

The image CMD picks the handler (``functions.handlers.prepare`` and so on). Events come from the state
machine (statemachine/pipeline.asl.json); bucket and table names may also come from ``TOPX_BUCKET`` /
``TOPX_TABLE`` (an explicit event value wins). A missing or malformed field raises ``EventError`` naming
the field; Step Functions sees it as the error name ``EventError`` and does not retry it.

Each handler logs structured JSON (Powertools' Logger) whose ``correlation_id`` is the run id, so one run's
lines can be found across every function, and emits CloudWatch metrics in the embedded metric format
(Powertools' Metrics, namespace ``topx``, dimensions ``service`` and ``stage``): its duration, or a failure;
Publish also the users it published and the model's recall@x and lift over popularity.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.logging.utils import copy_config_to_registered_loggers
from aws_lambda_powertools.metrics import MetricUnit

from topx.aws import stages
from topx.config import env_or
from topx.contract import (
    DEFAULT_SERVICE_NAME,
    ENV_BUCKET,
    ENV_COMPUTE_ENVIRONMENTS,
    ENV_SERVICE_NAME,
    ENV_STATE_MACHINE_ARN,
    ENV_TABLE,
    METRIC_COMPUTE_UNHEALTHY,
    METRIC_LIFT,
    METRIC_RECALL,
    METRIC_STAGE_FAILURES,
    METRIC_STAGE_SECONDS,
    METRIC_USERS_PUBLISHED,
    METRICS_NAMESPACE,
    MIN_SHARDS,
    RUN_MODE_FULL,
    RUN_MODE_REFRESH,
    RUN_MODES,
    STAGE_DIMENSION,
)
from topx.errors import TopxError


class _StdoutHandler(logging.StreamHandler):
    """Writes to ``sys.stdout`` as it is at each record, not as it was at import: the Lambda runtime's stdout
    never changes, but the offline layer (topx/offline/execute.py) and the tests capture each run's own."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:
        pass  # always the current sys.stdout


SERVICE = env_or(ENV_SERVICE_NAME, None, DEFAULT_SERVICE_NAME)
# A module imported again (the tests do) finds its service's logger configured: it keeps that handler.
logger = Logger(service=SERVICE, logger_handler=(logging.getLogger(SERVICE).handlers or [_StdoutHandler()])[0])
# topx's own log lines (a retired version not yet expired, say) come out as JSON with the run id too.
copy_config_to_registered_loggers(source_logger=logger, include={"topx"})
metrics = Metrics(namespace=METRICS_NAMESPACE, service=SERVICE)


class EventError(TopxError):
    """A Lambda event, or a stage's reply to one, lacks a field the pipeline contract needs."""


def _object(event: Any) -> Mapping[str, Any]:
    if not isinstance(event, Mapping):
        raise EventError(f"event must be a JSON object, got {type(event).__name__}")
    return event


def _field(event: Mapping[str, Any], name: str) -> Any:
    if name not in _object(event):
        raise EventError(f"event has no {name!r} field (fields present: {sorted(event)})")
    return event[name]


def _str(event: Mapping[str, Any], name: str) -> str:
    value = _field(event, name)
    if not isinstance(value, str) or not value:
        raise EventError(f"event field {name!r} must be a non-empty string, got {value!r}")
    return value


def _optional_str(event: Mapping[str, Any], name: str) -> str | None:
    value = _object(event).get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise EventError(f"event field {name!r} must be a non-empty string or null, got {value!r}")
    return value


def _int(event: Mapping[str, Any], name: str, *, minimum: int = 0) -> int:
    value = _field(event, name)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise EventError(f"event field {name!r} must be an integer >= {minimum}, got {value!r}")
    return value


def _named(event: Mapping[str, Any], name: str, env_name: str) -> str:
    """A resource name: the event's value, else the environment variable, else an error."""
    value = env_or(env_name, _optional_str(event, name), None)
    if not value:
        raise EventError(f"event has no {name!r} field and {env_name} is not set")
    return value


@dataclass(frozen=True)
class PrepareEvent:
    """``{"bucket": str, "key": str | null, "uploads": [{"path": str, "objects": int}] | null}``; key null means
    "the data under incoming/" (every increment, or the latest snapshot); uploads, what the starter started the
    run for, goes into the run record."""

    bucket: str
    key: str | None
    uploads: list[dict[str, Any]] | None

    @classmethod
    def parse(cls, event: Mapping[str, Any]) -> PrepareEvent:
        uploads = _uploads(event)
        return cls(bucket=_named(event, "bucket", ENV_BUCKET), key=_optional_str(event, "key"), uploads=uploads)


def _uploads(event: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The event's ``uploads``: a list of ``{"path", "objects"}`` (what the starter started the run for), or null."""
    uploads = _object(event).get("uploads")
    if uploads is not None and not (isinstance(uploads, list) and all(
            isinstance(u, Mapping) and isinstance(u.get("path"), str) and isinstance(u.get("objects"), int)
            for u in uploads)):
        raise EventError(f"event field 'uploads' must be a list of {{\"path\", \"objects\"}} or null, got {uploads!r}")
    return None if uploads is None else [dict(u) for u in uploads]


@dataclass(frozen=True)
class RefreshEvent:
    """``{"bucket": str, "table": str, "uploads": [...] | null}``: the refresh path's Prepare (the state machine
    sends ``"mode": "refresh"`` to the prepare function)."""

    bucket: str
    table: str
    uploads: list[dict[str, Any]] | None

    @classmethod
    def parse(cls, event: Mapping[str, Any]) -> RefreshEvent:
        uploads = _uploads(event)
        return cls(bucket=_named(event, "bucket", ENV_BUCKET), table=_named(event, "table", ENV_TABLE),
                   uploads=uploads)


@dataclass(frozen=True)
class QueueBatch:
    """An SQS batch, as Lambda's event source mapping hands it over: ``{"Records": [{"body": str, ...}]}``."""

    records: list[Mapping[str, Any]]
    bucket: str
    table: str
    state_machine_arn: str

    @classmethod
    def parse(cls, event: Mapping[str, Any]) -> QueueBatch:
        records = _field(event, "Records")
        if not isinstance(records, list) or not all(isinstance(r, Mapping) for r in records):
            raise EventError(f"event field 'Records' must be a list of SQS records, got {records!r}")
        return cls(records=list(records), bucket=_named(event, "bucket", ENV_BUCKET),
                   table=_named(event, "table", ENV_TABLE),
                   state_machine_arn=_named(event, "state_machine_arn", ENV_STATE_MACHINE_ARN))


@dataclass(frozen=True)
class RunEvent:
    """``{"bucket": str, "run_id": str}``."""

    bucket: str
    run_id: str

    @classmethod
    def parse(cls, event: Mapping[str, Any]) -> RunEvent:
        return cls(bucket=_named(event, "bucket", ENV_BUCKET), run_id=_str(event, "run_id"))


@dataclass(frozen=True)
class TableRunEvent:
    """``{"bucket": str, "run_id": str, "table": str}``."""

    bucket: str
    run_id: str
    table: str

    @classmethod
    def parse(cls, event: Mapping[str, Any]) -> TableRunEvent:
        return cls(
            bucket=_named(event, "bucket", ENV_BUCKET),
            run_id=_str(event, "run_id"),
            table=_named(event, "table", ENV_TABLE),
        )


@dataclass(frozen=True)
class LoadShardEvent:
    """``{"bucket": str, "run_id": str, "shard": int, "table": str}``."""

    bucket: str
    run_id: str
    shard: int
    table: str

    @classmethod
    def parse(cls, event: Mapping[str, Any]) -> LoadShardEvent:
        return cls(
            bucket=_named(event, "bucket", ENV_BUCKET),
            run_id=_str(event, "run_id"),
            shard=_int(event, "shard"),
            table=_named(event, "table", ENV_TABLE),
        )


@dataclass(frozen=True)
class PublishEvent:
    """``{"bucket": str, "run_id": str, "table": str, "expected_shards": int}``."""

    bucket: str
    run_id: str
    table: str
    expected_shards: int

    @classmethod
    def parse(cls, event: Mapping[str, Any]) -> PublishEvent:
        return cls(
            bucket=_named(event, "bucket", ENV_BUCKET),
            run_id=_str(event, "run_id"),
            table=_named(event, "table", ENV_TABLE),
            expected_shards=_int(event, "expected_shards", minimum=1),
        )


def _check_prepared(result: Mapping[str, Any]) -> dict[str, Any]:
    """The state machine sizes the search array job and the load Map from these fields (an array job needs
    at least MIN_SHARDS children)."""
    shards = _int(result, "shards", minimum=MIN_SHARDS)
    _str(result, "run_id")
    _str(result, "bucket")
    if _field(result, "shard_ids") != list(range(shards)):
        raise EventError(f"prepare returned shard_ids {result['shard_ids']!r}; expected 0..{shards - 1}")
    for name in ("n_users", "n_items", "n_interactions"):
        _int(result, name)
    return dict(result)


def _log(handler: str, parsed: Any) -> None:
    """Log the parsed event; from here on each line carries the event's run id as its correlation id."""
    run_id = getattr(parsed, "run_id", None)
    if run_id is not None:
        logger.set_correlation_id(run_id)
    logger.info("%s", handler, extra={"event": asdict(parsed)})


def _stage(handler: Callable[[Mapping[str, Any], Any], dict[str, Any]]) -> Callable[[Mapping[str, Any], Any], dict[str, Any]]:
    """A Lambda handler with its logs and metrics: the Lambda context's keys on each log line (state from
    an earlier invocation cleared), then its reply or its error logged, and its duration or a failure
    emitted under the dimension ``stage`` = the handler's name, flushed as one EMF line when it returns."""
    name = handler.__name__

    @functools.wraps(handler)
    def observed(event: Mapping[str, Any], context: Any) -> dict[str, Any]:
        metrics.add_dimension(name=STAGE_DIMENSION, value=name)
        started = time.monotonic()
        try:
            result = handler(event, context)
        except Exception:  # the handler's boundary: logged with the run id, counted, and raised as it was
            metrics.add_metric(name=METRIC_STAGE_FAILURES, unit=MetricUnit.Count, value=1)
            logger.exception("%s failed", name)
            raise
        metrics.add_metric(name=METRIC_STAGE_SECONDS, unit=MetricUnit.Seconds, value=time.monotonic() - started)
        if isinstance(result.get("run_id"), str):
            logger.set_correlation_id(result["run_id"])  # Prepare's reply names the run it minted
        logger.info("%s done", name, extra={"result": result})
        return result

    return logger.inject_lambda_context(metrics.log_metrics(observed), clear_state=True)


def _publish_metrics(result: Mapping[str, Any]) -> None:
    """The published run's user count and hold-out quality (``stages.publish_version``'s reply)."""
    users = result.get("users")
    if isinstance(users, int):
        metrics.add_metric(name=METRIC_USERS_PUBLISHED, unit=MetricUnit.Count, value=users)
    quality = result.get("quality") or {}
    for key, metric in (("recall_at_x", METRIC_RECALL), ("lift_over_popularity", METRIC_LIFT)):
        if isinstance(quality.get(key), (int, float)):
            metrics.add_metric(name=metric, unit=MetricUnit.NoUnit, value=quality[key])
    if "x" in quality:
        metrics.add_metadata(key="x", value=quality["x"])


@_stage
def prepare(event: Mapping[str, Any], context: Any) -> dict[str, Any]:
    """-> ``{"run_id", "bucket", "shards" (>= 2), "shard_ids" [0..shards-1], "n_users", "n_items", "n_interactions"}``.

    With ``"mode": "refresh"`` (``RefreshEvent``): a refresh of the live model (``stages.refresh_run``) ->
    ``{"refreshed": false, "reason"}`` (nothing to refresh: the state machine runs a full Prepare), or
    ``{"refreshed": true, "prepare": <the reply above>, "gate", "model_run", "live"}``."""
    mode = _object(event).get("mode", RUN_MODE_FULL)
    if mode not in RUN_MODES:
        raise EventError(f"event field 'mode' must be \"{RUN_MODE_FULL}\" or \"{RUN_MODE_REFRESH}\", got {mode!r}")
    if mode == RUN_MODE_REFRESH:
        refresh = RefreshEvent.parse(event)
        _log("prepare", refresh)
        result = dict(stages.refresh_run(refresh.bucket, refresh.table, refresh.uploads))
        if not isinstance(_field(result, "refreshed"), bool):
            raise EventError(f"refresh returned refreshed={result['refreshed']!r}; expected true or false")
        if result["refreshed"]:
            result["prepare"] = _check_prepared(_field(result, "prepare"))
            result["run_id"] = result["prepare"]["run_id"]  # the log lines' correlation id
        return result
    parsed = PrepareEvent.parse(event)
    _log("prepare", parsed)
    return _check_prepared(stages.prepare_run(parsed.bucket, parsed.key, parsed.uploads))


@_stage
def quality_gate(event: Mapping[str, Any], context: Any) -> dict[str, Any]:
    """-> ``{"passed": bool, "reason": str, "metrics": {...}}``."""
    parsed = TableRunEvent.parse(event)
    _log("quality_gate", parsed)
    result = stages.quality_gate(parsed.bucket, parsed.run_id, parsed.table)
    if not isinstance(_field(result, "passed"), bool):
        raise EventError(f"quality_gate returned passed={result['passed']!r}; expected true or false")
    return dict(result)


@_stage
def repackage(event: Mapping[str, Any], context: Any) -> dict[str, Any]:
    parsed = RunEvent.parse(event)
    _log("repackage", parsed)
    return dict(stages.repackage_run(parsed.bucket, parsed.run_id))


@_stage
def report(event: Mapping[str, Any], context: Any) -> dict[str, Any]:
    """``{"bucket", "run_id", "gate": {...} | null, "searched": bool (default true)}`` ->
    ``{"run_id", "report": "s3://...", "bytes"}``; ``searched`` false for a model the gate refused."""
    parsed = RunEvent.parse(event)
    gate = _object(event).get("gate")
    if gate is not None and not isinstance(gate, Mapping):
        raise EventError(f"event field 'gate' must be the quality gate's reply (an object) or null, got {gate!r}")
    searched = _object(event).get("searched", True)
    if not isinstance(searched, bool):
        raise EventError(f"event field 'searched' must be true or false, got {searched!r}")
    _log("report", parsed)
    return dict(stages.report_run(parsed.bucket, parsed.run_id, None if gate is None else dict(gate),
                                  searched=searched))


@_stage
def load_shard(event: Mapping[str, Any], context: Any) -> dict[str, Any]:
    """-> ``{"shard": int, "written": int, "retired": {"manifests": int, "users": int}}``."""
    parsed = LoadShardEvent.parse(event)
    _log("load_shard", parsed)
    return dict(stages.load_shard(parsed.bucket, parsed.run_id, parsed.shard, parsed.table))


@_stage
def publish(event: Mapping[str, Any], context: Any) -> dict[str, Any]:
    parsed = PublishEvent.parse(event)
    _log("publish", parsed)
    result = dict(stages.publish_version(parsed.bucket, parsed.run_id, parsed.table, parsed.expected_shards))
    _publish_metrics(result)
    return result


@_stage
def starter(event: Mapping[str, Any], context: Any) -> dict[str, Any]:
    """The upload queue's batch -> ``{"batchItemFailures": [], "started", "waiting_for", "pending_uploads",
    "dropped_uploads"}``: starts one execution when none runs and uploads wait (topx.aws.trigger). A failure
    raises, and Lambda hands the whole batch over again."""
    from topx.aws import trigger

    parsed = QueueBatch.parse(event)
    logger.info("starter %d message(s)", len(parsed.records))
    batch = trigger.read_batch(parsed.records, parsed.bucket)
    outcome = trigger.start_runs(batch, bucket=parsed.bucket, table=parsed.table,
                                 state_machine_arn=parsed.state_machine_arn)
    return {"batchItemFailures": [], **outcome.as_dict()}


@_stage
def compute_health(event: Mapping[str, Any], context: Any) -> dict[str, Any]:
    """A schedule's tick -> ``{"unhealthy", "invalid", "missing", "disabled", "healthy"}``: the stack's Batch
    compute environments (``TOPX_COMPUTE_ENVIRONMENTS``) that cannot run jobs, counted as the metric
    ``ComputeEnvironmentsUnhealthy`` that an alarm watches, each INVALID one's reason logged as an error."""
    import boto3

    from topx.aws import health

    names = health.compute_environments(os.environ.get(ENV_COMPUTE_ENVIRONMENTS))
    checked = health.check_compute_environments(names, boto3.client("batch"))
    metrics.add_metric(name=METRIC_COMPUTE_UNHEALTHY, unit=MetricUnit.Count, value=checked.unhealthy)
    for environment in checked.invalid:
        logger.error("compute environment %s is INVALID: %s", environment["name"], environment["reason"])
    for name in checked.missing:
        logger.error("compute environment %s does not exist", name)
    return checked.as_dict()
