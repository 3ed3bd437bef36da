"""Using a deployed topx stack: read a user's recommendations, upload data, follow the pipeline's runs.

Works against AWS, or against moto server or LocalStack when ``endpoint_url`` (or ``TOPX_ENDPOINT_URL``)
points there. Resources are named explicitly, or found in the CloudFormation stack's outputs::

    from topx.aws.client import get_recommendations
    rec = get_recommendations("u00042", stack="Topx")   # or table="...", endpoint_url="http://localhost:5000"
    rec.items, rec.scores                                # best first

Reads follow the active-version pointer (``topx.aws.store``), so a reader sees one whole published version,
never a half-loaded one. Every name has one precedence: explicit argument > stack output > environment
variable (``TOPX_TABLE``, ``TOPX_BUCKET``) > the outputs of the default stack ``Topx``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from topx.aws import store
from topx.config import env_or
from topx.contract import (
    ENV_BUCKET,
    ENV_ENDPOINT_URL,
    ENV_TABLE,
    FALLBACK_PARTITION,
    FILTERS_KEY,
    LIST_VERSION_SEPARATOR,
    MODE_METADATA,
    OUTPUT_BUCKET,
    OUTPUT_STATE_MACHINE,
    OUTPUT_TABLE,
    OUTPUT_TOPIC,
    PARTITION_KEY,
    RESPONSES_PREFIX,
    SORT_KEY,
    STACK_NAME,
    active_data_prefix,
    fallback_item_key,
    incoming_key,
    list_version,
    report_key,
    snapshot_label,
    snapshot_prefix,
)
from topx.errors import ConfigError, StoreError

# Uploads go under incoming/ and may carry MODE_METADATA naming their objective (read by
# topx.aws.stages.prepare_run): "ranking" (also "implicit"), the default, or "rating" (also "explicit").
IMPLICIT_MODE = "implicit"
RATING_MODE = "rating"


@dataclass(frozen=True)
class StackOutputs:
    stack: str
    bucket: str | None
    table: str | None
    state_machine_arn: str | None
    topic_arn: str | None


@dataclass(frozen=True)
class ExecutionSummary:
    name: str
    status: str
    started: datetime
    stopped: datetime | None
    arn: str
    # What the starter started the run for ({"path", "objects"} per folder; the run record keeps it too);
    # None for an execution started another way.
    uploads: list[dict[str, Any]] | None = None
    # "refresh" (the live model served again with the current filters and responses), "full", or None for an
    # execution started another way (a full run).
    mode: str | None = None

    @property
    def duration_s(self) -> float | None:
        return None if self.stopped is None else (self.stopped - self.started).total_seconds()


@dataclass(frozen=True)
class LiveVersion:
    version: str
    users: int | None
    published_at: datetime | None  # when the version went live: published, or rolled back to
    rolled_back_from: str | None = None  # the version `topx rollback` moved the pointer back from


def endpoint(endpoint_url: str | None = None) -> str | None:
    """The AWS endpoint to talk to: the argument, else ``TOPX_ENDPOINT_URL``, else AWS itself."""
    return env_or(ENV_ENDPOINT_URL, endpoint_url, None) or None


def aws_client(service: str, endpoint_url: str | None = None) -> Any:
    import boto3

    with aws_errors():
        return boto3.client(service, endpoint_url=endpoint(endpoint_url))


@contextmanager
def aws_errors() -> Iterator[None]:
    """Turn "cannot reach AWS at all" into one clear ConfigError (no region, no credentials, no endpoint)."""
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError, NoRegionError

    try:
        yield
    except NoRegionError as exc:
        raise ConfigError("no AWS region: set AWS_REGION or AWS_DEFAULT_REGION (or a profile's region)") from exc
    except NoCredentialsError as exc:
        raise ConfigError("no AWS credentials: configure a profile or set AWS_ACCESS_KEY_ID") from exc
    except EndpointConnectionError as exc:
        raise ConfigError(f"cannot reach {exc.kwargs.get('endpoint_url', 'the AWS endpoint')} "
                          f"(is {ENV_ENDPOINT_URL} right?)") from exc


def stack_outputs(stack: str | None = None, *, endpoint_url: str | None = None, client: Any = None) -> StackOutputs:
    """The named outputs of a deployed stack (``Topx`` unless named)."""
    from botocore.exceptions import ClientError

    name = stack or STACK_NAME
    cloudformation = client or aws_client("cloudformation", endpoint_url)
    with aws_errors():
        try:
            stacks = cloudformation.describe_stacks(StackName=name)["Stacks"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ValidationError":
                raise ConfigError(f"stack {name!r} not found: deploy it (docs/DEPLOY.md) or name "
                                  f"the resource yourself (--table, --bucket, --state-machine-arn)") from exc
            raise
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stacks[0].get("Outputs", [])}
    return StackOutputs(stack=name, bucket=outputs.get(OUTPUT_BUCKET), table=outputs.get(OUTPUT_TABLE),
                        state_machine_arn=outputs.get(OUTPUT_STATE_MACHINE), topic_arn=outputs.get(OUTPUT_TOPIC))


def _from_stack(value: str | None, stack: str | None, env_name: str | None, output: str,
                endpoint_url: str | None, client: Any) -> str:
    if value:
        return value
    if not stack and env_name and os.environ.get(env_name):
        return os.environ[env_name]
    outputs = stack_outputs(stack, endpoint_url=endpoint_url, client=client)
    found = {OUTPUT_BUCKET: outputs.bucket, OUTPUT_TABLE: outputs.table,
             OUTPUT_STATE_MACHINE: outputs.state_machine_arn, OUTPUT_TOPIC: outputs.topic_arn}[output]
    if not found:
        raise ConfigError(f"stack {outputs.stack!r} has no output {output!r}")
    return found


def resolve_table(table: str | None = None, *, stack: str | None = None, endpoint_url: str | None = None,
                  cloudformation: Any = None) -> str:
    return _from_stack(table, stack, ENV_TABLE, OUTPUT_TABLE, endpoint_url, cloudformation)


def resolve_bucket(bucket: str | None = None, *, stack: str | None = None, endpoint_url: str | None = None,
                   cloudformation: Any = None) -> str:
    return _from_stack(bucket, stack, ENV_BUCKET, OUTPUT_BUCKET, endpoint_url, cloudformation)


def resolve_state_machine(arn: str | None = None, *, stack: str | None = None, endpoint_url: str | None = None,
                          cloudformation: Any = None) -> str:
    return _from_stack(arn, stack, None, OUTPUT_STATE_MACHINE, endpoint_url, cloudformation)


@contextmanager
def _table_errors(table: str) -> Iterator[None]:
    from botocore.exceptions import ClientError

    with aws_errors():
        try:
            yield
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
                raise StoreError(f"table {table!r} does not exist") from exc
            raise


def get_recommendations(user_id: str, *, list_name: str | None = None, table: str | None = None,
                        stack: str | None = None, endpoint_url: str | None = None,
                        client: Any = None) -> store.Recommendation | None:
    """The live top-x of ``user_id`` (items best first, with scores): its own list, or the version's
    fallback list marked ``fallback``; None only while nothing is published. ``list_name``: a named list of
    the filter file instead of the default list (``store.get_recommendations`` says what it returns; a
    name the live version does not make raises ``store.UnknownList``). One call resolves the table and
    reads the pointer afresh: an application serving many reads uses ``Reader``."""
    name = resolve_table(table, stack=stack, endpoint_url=endpoint_url)
    ddb = client or aws_client("dynamodb", endpoint_url)
    with _table_errors(name), _naming_lists(name, ddb):
        return store.get_recommendations(name, str(user_id), list_name=list_name, client=ddb)


@contextmanager
def _naming_lists(table: str, ddb: Any) -> Iterator[None]:
    """An unknown list's error names the lists the live version does make (one Query, on that error only:
    the reader's own credentials make it; no function needs it)."""
    try:
        yield
    except store.UnknownList as exc:
        if exc.version is None:
            raise
        known = version_lists(table, exc.version, ddb)
        raise store.UnknownList(f"{exc} (its lists: {', '.join(known) if known else 'none but the default'})",
                                exc.version) from None


def version_lists(table: str, version: str, ddb: Any) -> list[str]:
    """The named lists ``version`` makes, sorted: those it has a fallback item of."""
    prefix = fallback_item_key(list_version(version, None))[SORT_KEY] + LIST_VERSION_SEPARATOR
    names = []
    for page in ddb.get_paginator("query").paginate(
            TableName=table, KeyConditionExpression="#p = :p AND begins_with(#s, :s)",
            ExpressionAttributeNames={"#p": PARTITION_KEY, "#s": SORT_KEY},
            ExpressionAttributeValues={":p": {"S": FALLBACK_PARTITION}, ":s": {"S": prefix}},
            ProjectionExpression="#s"):
        names.extend(item[SORT_KEY]["S"][len(prefix):] for item in page.get("Items", []))
    return sorted(names)


# How long a Reader trusts the live version it read (seconds): a publish reaches its readers within it.
POINTER_CACHE_S = 5.0


class Reader:
    """Recommendations for an application: the table is resolved and the client made once, and the live
    version is remembered for ``pointer_cache_s`` (read eventually consistently), so a read is one
    GetItem (two when the user has no list: the fallback's), not two or three.

        reader = Reader(stack="Topx")
        reader.get("u00042")
    """

    def __init__(self, *, table: str | None = None, stack: str | None = None, endpoint_url: str | None = None,
                 client: Any = None, pointer_cache_s: float = POINTER_CACHE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not pointer_cache_s >= 0:
            raise ConfigError(f"pointer_cache_s must be >= 0 seconds, got {pointer_cache_s!r}")
        self.table = resolve_table(table, stack=stack, endpoint_url=endpoint_url)
        self._ddb = client or aws_client("dynamodb", endpoint_url)
        self._pointer = store.PointerCache(pointer_cache_s, clock)

    def get(self, user_id: str, list_name: str | None = None) -> store.Recommendation | None:
        """``get_recommendations`` of ``user_id``: the default list, or the named list ``list_name``."""
        with _table_errors(self.table), _naming_lists(self.table, self._ddb):
            return store.get_recommendations(self.table, str(user_id), list_name=list_name, client=self._ddb,
                                             pointer=self._pointer)


def live_version(*, table: str | None = None, stack: str | None = None, endpoint_url: str | None = None,
                 client: Any = None) -> LiveVersion | None:
    """The published version the pointer names, with its user count and time; None before the first."""
    name = resolve_table(table, stack=stack, endpoint_url=endpoint_url)
    ddb = client or aws_client("dynamodb", endpoint_url)
    with _table_errors(name):
        pointer = store.read_pointer(name, client=ddb)
    if pointer is None:
        return None
    return LiveVersion(
        version=pointer.version,
        users=pointer.users,
        published_at=None if pointer.published_at is None else datetime.fromtimestamp(pointer.published_at).astimezone(),
        rolled_back_from=pointer.rolled_back_from,
    )


def rollback(to: str | None = None, *, table: str | None = None, bucket: str | None = None, stack: str | None = None,
             endpoint_url: str | None = None, dynamodb: Any = None, s3: Any = None) -> dict[str, Any]:
    """Point readers back at an earlier version that is still complete: ``to``, or the newest one older than
    the live version (``topx.aws.stages.rollback_version`` says what complete means, and how a run
    publishing at the same moment is kept apart). Returns what it did: ``version``, ``rolled_back_from``,
    ``users``, ``kept``, ``already_live``."""
    from botocore.exceptions import ClientError

    from topx.aws import stages

    table_name = resolve_table(table, stack=stack, endpoint_url=endpoint_url)
    bucket_name = resolve_bucket(bucket, stack=stack, endpoint_url=endpoint_url)
    with aws_errors(), _table_errors(table_name), stages.clients_in_use(
            s3=s3 or aws_client("s3", endpoint_url), dynamodb=dynamodb or aws_client("dynamodb", endpoint_url)):
        try:
            return stages.rollback_version(bucket_name, table_name, to)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NoSuchBucket":
                raise StoreError(f"bucket {bucket_name!r} does not exist") from exc
            raise


def upload(path: str | Path, *, bucket: str | None = None, stack: str | None = None, key: str | None = None,
           implicit: bool = False, objective: str | None = None, snapshot: str | None = None,
           endpoint_url: str | None = None, client: Any = None) -> str:
    """Put a local file, or a folder's files keeping their relative paths (markers such as ``_SUCCESS``
    last, as exports write them), under ``incoming/``, which starts one run; returns the ``s3://`` URI of
    the object or the folder.

    Uploads add to the history: they go under the latest snapshot folder when there is one, else under
    ``incoming/``. ``snapshot`` (a label such as an ISO date) starts a new history instead: the upload goes
    under ``incoming/snapshot=<label>/``, and runs read that folder from then on (older data stay, unread).
    ``key`` names the object or folder (default: the file's or folder's name). ``implicit`` marks the data
    as interaction strengths (object metadata ``topx-mode: implicit``); ``objective="rating"`` asks for a
    rating regressor (``topx-mode: rating``). Unmarked data train for ranking.
    """
    if objective not in (None, "ranking", RATING_MODE):
        raise ConfigError(f"unknown objective {objective!r}: use ranking or rating")
    if implicit and objective == RATING_MODE:
        raise ConfigError("implicit feedback trains for ranking, not for objective rating")
    def target(s3: Any, name: str, source: Path) -> str:
        base = upload_base(s3, name, snapshot)
        return base + (key or source.name).removeprefix(base).removeprefix(incoming_key(""))

    mode = IMPLICIT_MODE if implicit else objective
    return _put(path, target, {"Metadata": {MODE_METADATA: mode}} if mode else {}, bucket=bucket, stack=stack,
                endpoint_url=endpoint_url, client=client)


def _put(path: str | Path, target: Callable[[Any, str, Path], str], extra: dict[str, Any], *, bucket: str | None,
         stack: str | None, endpoint_url: str | None, client: Any) -> str:
    """Upload a file to the key ``target(s3, bucket, source)`` names, or a folder's files under it (relative
    paths kept, markers last), with ``extra`` as each upload's ExtraArgs; the ``s3://`` URI of the object or
    the folder."""
    source = Path(path)
    if not source.exists():
        raise ConfigError(f"{source}: no such file or folder")
    files = _upload_files(source)
    name = resolve_bucket(bucket, stack=stack, endpoint_url=endpoint_url)
    s3 = client or aws_client("s3", endpoint_url)
    with aws_errors():
        key = target(s3, name, source)
        key = key.rstrip("/") + "/" if source.is_dir() else key
        for relative, file in files:
            s3.upload_file(str(file), name, key + relative if relative else key, ExtraArgs=extra)
    return f"s3://{name}/{key}"


def upload_filters(path: str | Path, *, bucket: str | None = None, stack: str | None = None,
                   endpoint_url: str | None = None, client: Any = None) -> str:
    """Put a filter file at ``config/filters.json``, which the next run applies (alone, it starts a refresh:
    the live model's lists made again under it, without training); returns its ``s3://`` URI. The file's
    JSON and rules are checked first, so a malformed one is refused here, before it is uploaded; its columns
    are checked against the items table by the run, which fails naming the rule and leaves the live lists."""
    from topx.filters import load_filters

    load_filters(path)
    name = resolve_bucket(bucket, stack=stack, endpoint_url=endpoint_url)
    s3 = client or aws_client("s3", endpoint_url)
    with aws_errors():
        s3.upload_file(str(path), name, FILTERS_KEY, ExtraArgs={"ContentType": "application/json"})
    return f"s3://{name}/{FILTERS_KEY}"


def upload_responses(path: str | Path, *, bucket: str | None = None, stack: str | None = None, key: str | None = None,
                     endpoint_url: str | None = None, client: Any = None) -> str:
    """Put a responses table (a file, or a folder of parts) under ``responses/`` (``key`` names it; default the
    file's or folder's name): its (user_id, item_id) pairs leave the next lists, and alone it starts a
    refresh. Returns the ``s3://`` URI of the object or the folder."""
    return _put(path, lambda s3, name, source: RESPONSES_PREFIX + (key or source.name).removeprefix(RESPONSES_PREFIX),
                {}, bucket=bucket, stack=stack, endpoint_url=endpoint_url, client=client)


def upload_base(s3: Any, bucket: str, snapshot: str | None = None) -> str:
    """Where an upload goes: ``incoming/snapshot=<snapshot>/`` when given, else the active history
    (the latest snapshot folder, or ``incoming/``)."""
    if snapshot is not None:
        try:
            return snapshot_prefix(snapshot)
        except ValueError as exc:
            raise ConfigError(f"--snapshot: {exc}") from exc
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=incoming_key("")):
        keys.extend(obj["Key"] for obj in page.get("Contents", []) if snapshot_label(obj["Key"]) is not None)
    return active_data_prefix(keys)


def _upload_files(source: Path) -> list[tuple[str, Path]]:
    """(relative key, file) for a file ("", itself) or each file under a folder, markers last."""
    if source.is_file():
        return [("", source)]
    found = [(f.relative_to(source).as_posix(), f) for f in sorted(source.rglob("*")) if f.is_file()]
    if not found:
        raise ConfigError(f"{source}: the folder holds no file")
    return sorted(found, key=lambda pair: (any(part.startswith("_") for part in pair[0].split("/")), pair[0]))


def fetch_report(run_id: str, out: str | Path, *, bucket: str | None = None, stack: str | None = None,
                 endpoint_url: str | None = None, client: Any = None) -> Path:
    """Download a deployed run's report (``runs/<run_id>/report.html``) to ``out``; returns its path."""
    from botocore.exceptions import ClientError

    name = resolve_bucket(bucket, stack=stack, endpoint_url=endpoint_url)
    key = report_key(run_id)
    s3 = client or aws_client("s3", endpoint_url)
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    with aws_errors():
        try:
            body = s3.get_object(Bucket=name, Key=key)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise ConfigError(f"s3://{name}/{key} does not exist: no run {run_id!r}, its report is not written "
                                  "yet, or runs/ has expired it (`topx status` lists the executions)") from exc
            raise
    target.write_bytes(body)
    return target


def latest_executions(*, state_machine_arn: str | None = None, stack: str | None = None, limit: int = 10,
                      endpoint_url: str | None = None, client: Any = None) -> list[ExecutionSummary]:
    """The pipeline's most recent executions, newest first."""
    arn = resolve_state_machine(state_machine_arn, stack=stack, endpoint_url=endpoint_url)
    sfn = client or aws_client("stepfunctions", endpoint_url)
    with aws_errors():
        found = sfn.list_executions(stateMachineArn=arn, maxResults=max(1, limit))["executions"]
    found = sorted(found, key=lambda e: e["startDate"], reverse=True)[:limit]
    summaries = []
    for e in found:
        with aws_errors():
            described = sfn.describe_execution(executionArn=e["executionArn"])
        summaries.append(ExecutionSummary(name=e["name"], status=e["status"], started=e["startDate"],
                                          stopped=e.get("stopDate"), arn=e["executionArn"],
                                          uploads=_input_field(described.get("input"), "uploads", list),
                                          mode=_input_field(described.get("input"), "mode", str)))
    return summaries


def _input_field(execution_input: str | None, name: str, kind: type) -> Any:
    """One field of an execution's input, when it is there and of the kind the starter gives it."""
    try:
        value = json.loads(execution_input or "{}").get(name)
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, kind) else None
