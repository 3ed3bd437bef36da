"""Run the deployed pipeline offline: the real state machine under moto, every step doing its real work.

``offline()`` starts moto in-process and installs a small execution layer; ``deploy()`` then creates,
in moto, what the CDK stack creates on AWS (bucket, table, topic, the five Lambda functions, two Batch
queues and job definitions, the upload rule) and the state machine from ``statemachine/pipeline.asl.json``
with its ``${...}`` placeholders filled with those resources' ARNs. Dropping a file under ``incoming/``
then starts an execution, as on AWS.

What the layer adds to moto, and why (moto 5.2.5; see docs/LOCAL.md):

* **Lambda.** moto's docker-free Lambda returns the request body instead of running code. Here an
  invocation imports the handler the function's image CMD names (``functions.handlers.<name>``) and calls
  it with the function's environment; an exception becomes a function error whose ``errorType`` is the
  exception's class name, as the Python runtime reports it, so the ASL's ``Retry``/``Catch`` match on it.
  An invocation that ran longer than the function's timeout is answered as Lambda answers a timed-out
  one (``Sandbox.Timedout``); it cannot be stopped in-process, so it runs to its end first. How long it
  ran is read from the layer's clock: the wall clock by default, or a ``ManualClock`` that moves only
  when a test says a handler took time, so that no outcome depends on how busy the machine is.
* **Batch.** moto's docker-free Batch marks every job succeeded without running it. Here ``SubmitJob``
  runs the job definition's command (``python -m batch_jobs.<job>.main ...``, ``Ref::name`` resolved from
  the submitted parameters over the definition's defaults) with the definition's environment; an array
  job runs one child per index with ``AWS_BATCH_JOB_ARRAY_INDEX`` set and fails if any child fails.
  Entry points run in-process (``main(argv) -> int``), one at a time: moto's mock only intercepts this
  process's AWS calls, and the process environment is shared.
* **Step Functions -> Batch.** moto's interpreter hands a Batch task's parameters to boto3 as the ASL
  spells them (``JobName``), not as the Batch API does (``jobName``), and so fails with ``KeyError:
  'JobName'``; nor does it rename the reply (``jobId`` -> ``JobId``). ``MOTO_BATCH_PARAMS_FIXED_IN``
  switches this patch off for moto releases that do both themselves. And moto reports a ``.sync`` task
  that succeeds on a retry as ``States.Timeout`` (every attempt reuses the first attempt's task token,
  whose callback endpoint that attempt closed); here each attempt gets a fresh one
  (``MOTO_SYNC_RETRY_FIXED_IN``).
* **EventBridge -> Step Functions.** moto matches S3 events against rules but cannot deliver to a state
  machine. Here a rule target that is a state machine gets an execution, with the target's input
  transformer applied as EventBridge applies it.
* **Retry waits** are scaled by ``RETRY_TIME_SCALE``: the ASL waits 60 s before retrying a Batch job.
  Which errors are retried, and how often, is unchanged.
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import os
import re
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import datetime
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any
from unittest import mock

from topx.config import env_or, search_method
from topx.contract import (
    DEFAULT_EPOCHS,
    DEFAULT_NUM_FACTORS,
    DEFAULT_RETENTION_DAYS,
    DEFAULT_SHARDS,
    DEFAULT_TOP_X,
    ENV_ARRAY_INDEX,
    ENV_BUCKET,
    ENV_ENDPOINT_URL,
    ENV_EPOCHS,
    ENV_HYPERPARAMETERS,
    ENV_MAX_RMSE,
    ENV_MIN_AUC,
    ENV_MIN_RECALL,
    ENV_NUM_FACTORS,
    ENV_RETENTION_DAYS,
    ENV_SEARCH_METHOD,
    ENV_SHARDS,
    ENV_TABLE,
    ENV_TOP_X,
    ENV_TOPIC_ARN,
    HANDLER_MODULE,
    SEARCH_COMMAND,
    TRAIN_COMMAND,
    TTL_ATTRIBUTE,
    table_attribute_definitions,
    table_key_schema,
)
from topx.errors import ConfigError

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- moto pins

MOTO_VERSION_TESTED = "5.2.5"
# The first moto release whose Step Functions interpreter normalises Batch task parameters and replies
# itself. None: no release does yet, so the patch is applied. After upgrading moto past the fix, set this
# to that release (one line); tests/offline/test_local.py tells which way the installed moto behaves.
MOTO_BATCH_PARAMS_FIXED_IN: str | None = None
# The first moto release in which a `.sync` task that succeeds on a retry is not reported as
# States.Timeout (every attempt reuses the token whose endpoint the first attempt closed). None: not yet.
MOTO_SYNC_RETRY_FIXED_IN: str | None = None

# moto's configuration for the offline pipeline: run state machines, and use the docker-free Lambda
# and Batch backends, whose invoke and submit_job this module replaces.
MOCK_CONFIG: dict[str, Any] = {
    "stepfunctions": {"execute_state_machine": True},
    "lambda": {"use_docker": False},
    "batch": {"use_docker": False},
}

# Retry intervals in the ASL are multiplied by this offline (60 s before a Batch retry becomes 0.6 s).
RETRY_TIME_SCALE = 0.01

# --------------------------------------------------------------------------- the deployed shape

REPO_ROOT = Path(__file__).resolve().parent.parent
ASL_PATH = REPO_ROOT / "statemachine" / "pipeline.asl.json"
TRIGGER_PATH = REPO_ROOT / "statemachine" / "trigger.json"
PLACEHOLDER_RE = re.compile(r"\$\{([A-Za-z][A-Za-z0-9]*)\}")

DEFAULT_REGION = "us-east-1"
ACCOUNT_ID = "123456789012"  # moto's default account
NAME_PREFIX = "topx-local"

# The ASL's placeholder for each handler's function (statemachine/pipeline.asl.json; infra/pipeline.py fills
# the same ones). The handler module and the Batch job commands are the deploy contract's.
FUNCTION_PLACEHOLDERS = {
    "prepare": "PrepareFunctionArn",
    "quality_gate": "QualityGateFunctionArn",
    "repackage": "RepackageFunctionArn",
    "load_shard": "LoadShardFunctionArn",
    "publish": "PublishFunctionArn",
}
# Exit status of a Python process that died of an uncaught exception.
UNCAUGHT_EXIT = 1
# What AWS Batch reports for a container that exited non-zero.
CONTAINER_EXITED = "Essential container in task exited"
# The errorType Lambda reports for an invocation that ran past the function's timeout; Step Functions
# matches it as an error name.
LAMBDA_TIMEOUT_ERROR = "Sandbox.Timedout"


class DefinitionError(ConfigError):
    """The ASL's placeholders and the values offered for them do not match."""


@dataclass(frozen=True)
class LocalSettings:
    """The deploy-time knobs CDK context sets on AWS, baked into the functions' and jobs' environment.

    Each is the explicit value, else the ``TOPX_*`` environment variable, else the CDK default. The
    quality-gate thresholds, ``hyperparameters`` (JSON object text) and ``search_method`` have none:
    unset, they are left out (and the stages search exactly).
    """

    top_x: int | None = None
    num_factors: int | None = None
    epochs: int | None = None
    shards: int | None = None
    retention_days: int | None = None
    max_rmse: float | None = None
    min_auc: float | None = None
    min_recall: float | None = None
    hyperparameters: str | None = None
    search_method: str | None = None

    def resolved(self) -> dict[str, int | float | str]:
        from topx.stages import parse_hyperparameters

        resolved: dict[str, int | float | str] = {
            ENV_TOP_X: env_or(ENV_TOP_X, self.top_x, DEFAULT_TOP_X, int),
            ENV_NUM_FACTORS: env_or(ENV_NUM_FACTORS, self.num_factors, DEFAULT_NUM_FACTORS, int),
            ENV_EPOCHS: env_or(ENV_EPOCHS, self.epochs, DEFAULT_EPOCHS, int),
            ENV_SHARDS: env_or(ENV_SHARDS, self.shards, DEFAULT_SHARDS, int),
            ENV_RETENTION_DAYS: env_or(ENV_RETENTION_DAYS, self.retention_days, DEFAULT_RETENTION_DAYS, int),
        }
        for name, explicit in ((ENV_MAX_RMSE, self.max_rmse), (ENV_MIN_AUC, self.min_auc),
                               (ENV_MIN_RECALL, self.min_recall)):
            threshold = env_or(name, explicit, None, float)
            if threshold is not None:
                resolved[name] = float(threshold)
        hyperparameters = env_or(ENV_HYPERPARAMETERS, self.hyperparameters, None)
        if hyperparameters:
            # The train job would refuse a bad value only once the run is under way; refuse it here.
            parse_hyperparameters(hyperparameters, ENV_HYPERPARAMETERS)
            resolved[ENV_HYPERPARAMETERS] = hyperparameters
        method = env_or(ENV_SEARCH_METHOD, self.search_method, None)
        if method:
            # Refused here too rather than by the train job once the run is under way.
            resolved[ENV_SEARCH_METHOD] = search_method(method)
        return resolved

    def environment(self, *, bucket: str, table: str, topic_arn: str) -> dict[str, str]:
        """What every function and job gets, as infra's ``DeploySettings.job_environment`` builds it."""
        names = {ENV_BUCKET: bucket, ENV_TABLE: table, ENV_TOPIC_ARN: topic_arn}
        return {**names, **{name: str(value) for name, value in self.resolved().items()}}


@dataclass(frozen=True)
class LocalPipeline:
    """The resources ``deploy`` created in moto: what the CDK stack's outputs and substitutions name."""

    region: str
    bucket: str
    table: str
    topic_arn: str
    function_arns: Mapping[str, str]  # handler name -> function ARN
    train_queue_arn: str
    train_definition_arn: str
    search_queue_arn: str
    search_definition_arn: str
    state_machine_arn: str
    rule_name: str
    inbox_queue_url: str  # an SQS queue subscribed to the topic, to read notifications back

    def substitutions(self) -> dict[str, str]:
        """The values of the ASL's placeholders, named as infra/pipeline.py names them."""
        return {
            **{FUNCTION_PLACEHOLDERS[name]: arn for name, arn in self.function_arns.items()},
            "TrainJobQueueArn": self.train_queue_arn,
            "TrainJobDefinitionArn": self.train_definition_arn,
            "SearchJobQueueArn": self.search_queue_arn,
            "SearchJobDefinitionArn": self.search_definition_arn,
            "TopicArn": self.topic_arn,
            "TableName": self.table,
        }


# --------------------------------------------------------------------------- definition and trigger


def placeholders(definition: str) -> set[str]:
    return set(PLACEHOLDER_RE.findall(definition))


def load_definition() -> str:
    """The ASL text CDK deploys; the offline runner needs the repository checkout that holds it."""
    try:
        return ASL_PATH.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{ASL_PATH} not found: the offline pipeline runs from a checkout of the repository") from exc


def fill_definition(definition: str, substitutions: Mapping[str, str]) -> str:
    """Replace every ``${Name}``; a placeholder without a value, or a value without a placeholder, is an error."""
    used = placeholders(definition)
    if used != set(substitutions):
        raise DefinitionError(
            f"{ASL_PATH.name}: placeholders without a value: {sorted(used - set(substitutions))}; "
            f"values without a placeholder: {sorted(set(substitutions) - used)}"
        )
    return PLACEHOLDER_RE.sub(lambda match: substitutions[match.group(1)], definition)


def load_trigger() -> dict[str, Any]:
    """statemachine/trigger.json: the upload rule's fixed parts, shared with infra/pipeline.py."""
    return json.loads(TRIGGER_PATH.read_text(encoding="utf-8"))


def upload_event_pattern(trigger: Mapping[str, Any], bucket: str) -> dict[str, Any]:
    """The upload rule's event pattern, as the CDK rule builds it from the same file."""
    return {
        "source": [trigger["source"]],
        "detail-type": [trigger["detail_type"]],
        "detail": {"bucket": {"name": [bucket]}, "object": {"key": [{"prefix": trigger["key_prefix"]}]}},
    }


def upload_input_transformer(trigger: Mapping[str, Any]) -> dict[str, Any]:
    """The rule target's input transformer, as CDK renders ``RuleTargetInput.from_object`` of EventFields."""
    paths = {_path_name(path): path for path in trigger["input_paths"].values()}
    body = ",".join(f"{json.dumps(name)}:<{_path_name(path)}>" for name, path in trigger["input_paths"].items())
    return {"InputPathsMap": paths, "InputTemplate": "{" + body + "}"}


def _path_name(path: str) -> str:
    """``$.detail.bucket.name`` -> ``detail-bucket-name`` (CDK's name for an event field)."""
    return path.removeprefix("$.").replace(".", "-")


def transform_input(transformer: Mapping[str, Any], event: Mapping[str, Any]) -> str:
    """Apply an EventBridge input transformer to an event.

    A ``<name>`` inside a JSON string takes the value's text; anywhere else it takes the value's JSON
    (a string gets its quotes, a missing path gives null), which is how CDK's ``from_object`` templates read.
    """
    values = {name: _json_path(event, path) for name, path in transformer.get("InputPathsMap", {}).items()}
    template = transformer["InputTemplate"]
    out: list[str] = []
    in_string = False
    i = 0
    while i < len(template):
        char = template[i]
        match = _PLACEHOLDER.match(template, i) if char == "<" else None
        if match and match.group(1) in values:
            value = values[match.group(1)]
            if in_string:
                text = value if isinstance(value, str) else json.dumps(value)
                out.append(json.dumps(text)[1:-1])
            else:
                out.append(json.dumps(value))
            i = match.end()
            continue
        if char == "\\" and in_string:
            out.append(template[i:i + 2])
            i += 2
            continue
        if char == '"':
            in_string = not in_string
        out.append(char)
        i += 1
    return "".join(out)


_PLACEHOLDER = re.compile(r"<([A-Za-z0-9_.-]+)>")


def _json_path(event: Mapping[str, Any], path: str) -> Any:
    node: Any = event
    for part in path.removeprefix("$.").split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


# --------------------------------------------------------------------------- deploy into moto


def deploy(settings: LocalSettings | None = None, *, region: str = DEFAULT_REGION,
           name: str = NAME_PREFIX) -> LocalPipeline:
    """Create the stack's resources in moto and the state machine from the ASL file; call inside ``offline()``."""
    import boto3

    settings = settings or LocalSettings()
    clients = {service: boto3.client(service, region_name=region)
               for service in ("iam", "s3", "dynamodb", "sns", "sqs", "lambda", "batch", "stepfunctions", "events")}
    role = clients["iam"].create_role(RoleName=f"{name}-role", AssumeRolePolicyDocument="{}")["Role"]["Arn"]

    bucket = f"{name}-data"
    _create_bucket(clients["s3"], bucket, region)
    # Uploads reach EventBridge, where the upload rule matches them (storage.py turns this on too).
    clients["s3"].put_bucket_notification_configuration(
        Bucket=bucket, NotificationConfiguration={"EventBridgeConfiguration": {}}
    )
    table = f"{name}-recommendations"
    _create_table(clients["dynamodb"], table)
    topic_arn = clients["sns"].create_topic(Name=f"{name}-notifications")["TopicArn"]
    inbox_url = clients["sqs"].create_queue(QueueName=f"{name}-inbox")["QueueUrl"]
    inbox_arn = clients["sqs"].get_queue_attributes(QueueUrl=inbox_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    clients["sns"].subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=inbox_arn)

    environment = settings.environment(bucket=bucket, table=table, topic_arn=topic_arn)
    function_arns = {
        handler: clients["lambda"].create_function(
            FunctionName=f"{name}-{handler.replace('_', '-')}",
            Role=role,
            PackageType="Image",
            Code={"ImageUri": f"{ACCOUNT_ID}.dkr.ecr.{region}.amazonaws.com/{name}-functions:latest"},
            ImageConfig={"Command": [f"{HANDLER_MODULE}.{handler}"]},
            Environment={"Variables": environment},
            Timeout=900,
        )["FunctionArn"]
        for handler in FUNCTION_PLACEHOLDERS
    }
    train_queue, train_definition = _create_job(clients["batch"], role, f"{name}-train", TRAIN_COMMAND,
                                                environment, {"bucket": bucket})
    search_queue, search_definition = _create_job(
        clients["batch"], role, f"{name}-search", SEARCH_COMMAND, environment,
        {"bucket": bucket, "shards": environment[ENV_SHARDS]},
    )
    partial = LocalPipeline(
        region=region, bucket=bucket, table=table, topic_arn=topic_arn, function_arns=function_arns,
        train_queue_arn=train_queue, train_definition_arn=train_definition, search_queue_arn=search_queue,
        search_definition_arn=search_definition, state_machine_arn="", rule_name=f"{name}-on-upload",
        inbox_queue_url=inbox_url,
    )
    definition = fill_definition(load_definition(), partial.substitutions())
    machine_arn = clients["stepfunctions"].create_state_machine(
        name=f"{name}-pipeline", definition=definition, roleArn=role, type="STANDARD"
    )["stateMachineArn"]

    trigger = load_trigger()
    clients["events"].put_rule(Name=partial.rule_name, EventPattern=json.dumps(upload_event_pattern(trigger, bucket)),
                               State="ENABLED")
    clients["events"].put_targets(Rule=partial.rule_name, Targets=[{
        "Id": "Target0", "Arn": machine_arn, "RoleArn": role, "InputTransformer": upload_input_transformer(trigger),
    }])
    return replace(partial, state_machine_arn=machine_arn)


def _create_bucket(s3: Any, bucket: str, region: str) -> None:
    if region == "us-east-1":
        s3.create_bucket(Bucket=bucket)
    else:
        s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": region})


def _create_table(ddb: Any, table: str) -> None:
    """Keys and TTL as the deploy contract declares them (infra/storage.py builds the same)."""
    ddb.create_table(
        TableName=table, BillingMode="PAY_PER_REQUEST",
        KeySchema=table_key_schema(), AttributeDefinitions=table_attribute_definitions(),
    )
    ddb.update_time_to_live(TableName=table,
                            TimeToLiveSpecification={"Enabled": True, "AttributeName": TTL_ATTRIBUTE})


def _create_job(batch: Any, role: str, name: str, command: Sequence[str], environment: Mapping[str, str],
                parameters: Mapping[str, str]) -> tuple[str, str]:
    environment_arn = batch.create_compute_environment(
        computeEnvironmentName=name, type="UNMANAGED", state="ENABLED", serviceRole=role
    )["computeEnvironmentArn"]
    queue_arn = batch.create_job_queue(
        jobQueueName=name, state="ENABLED", priority=1,
        computeEnvironmentOrder=[{"order": 1, "computeEnvironment": environment_arn}],
    )["jobQueueArn"]
    definition_arn = batch.register_job_definition(
        jobDefinitionName=name, type="container", parameters=dict(parameters),
        containerProperties={
            "image": f"{ACCOUNT_ID}.dkr.ecr.{DEFAULT_REGION}.amazonaws.com/{name}:latest",
            "command": list(command),
            "environment": [{"name": key, "value": value} for key, value in environment.items()],
            "resourceRequirements": [{"type": "VCPU", "value": "1"}, {"type": "MEMORY", "value": "2048"}],
        },
    )["jobDefinitionArn"]
    return queue_arn, definition_arn


# --------------------------------------------------------------------------- running code in-process

# Lambda functions and Batch jobs run one at a time: each gets the process environment for its run.
_RUN_LOCK = threading.RLock()
# Environment variables a function or job only has when its configuration gives them (TOPX_ENDPOINT_URL
# included: a client made for another endpoint would bypass the in-process mock).
_CONFIGURED_PREFIXES = ("TOPX_", "AWS_BATCH_", "AWS_LAMBDA_")


@contextmanager
def _environment(variables: Mapping[str, str]) -> Iterator[None]:
    """The process environment of one function or job run: the caller's, minus topx settings, plus ``variables``."""
    saved = dict(os.environ)
    try:
        for name in [n for n in os.environ if n.startswith(_CONFIGURED_PREFIXES)]:
            del os.environ[name]
        os.environ.update(variables)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class _RoutedStream(io.TextIOBase):
    """Stands in for sys.stdout or sys.stderr while a function or job runs: what the running thread writes
    goes to the run's buffer (then to its log), what any other thread writes goes where it went before."""

    def __init__(self, original: Any, buffer: io.StringIO) -> None:
        super().__init__()
        self.original = original
        self.buffer = buffer
        self.owner = threading.get_ident()

    def _target(self) -> Any:
        return self.buffer if threading.get_ident() == self.owner else self.original

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self._target().flush()

    def isatty(self) -> bool:
        return threading.get_ident() != self.owner and bool(getattr(self.original, "isatty", lambda: False)())


class _Discard(io.TextIOBase):
    """Where a finished run's late writes go."""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return len(text)


_DISCARD = _Discard()
# CPython 3.11's print() holds a borrowed reference to sys.stdout while it writes, so a stream swapped
# out while another thread prints must stay alive: freeing it crashed the process (use after free).
# A print can hold it for any length of time (a blocked write), so every stream a run installed is
# kept, its buffer dropped: two small objects per run, whose originals are the process's own streams.
_SWAPPED_OUT: list[_RoutedStream] = []


@contextmanager
def _captured_output() -> Iterator[io.StringIO]:
    """Route the calling thread's output into a buffer; runs hold _RUN_LOCK, so they do not overlap."""
    buffer = io.StringIO()
    saved = sys.stdout, sys.stderr
    routed = _RoutedStream(saved[0], buffer), _RoutedStream(saved[1], buffer)
    sys.stdout, sys.stderr = routed
    try:
        yield buffer
    finally:
        sys.stdout, sys.stderr = saved
        for stream in routed:
            stream.buffer = _DISCARD
        _SWAPPED_OUT.extend(routed)


def _import_entry_point(module: str) -> Any:
    """Import ``functions.*`` or ``batch_jobs.*`` from the checkout, as the images' working directory holds them."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))
    return importlib.import_module(module)


def _write_log(region: str, group: str, stream: str, text: str) -> None:
    """The run's output into moto's CloudWatch Logs, where a deployed function's or job's output goes."""
    if not text:
        return
    import boto3

    logs = boto3.client("logs", region_name=region)
    with suppress(logs.exceptions.ResourceAlreadyExistsException):
        logs.create_log_group(logGroupName=group)
    logs.create_log_stream(logGroupName=group, logStreamName=stream)
    now = int(time.time() * 1000)
    logs.put_log_events(logGroupName=group, logStreamName=stream,
                        logEvents=[{"timestamp": now, "message": line} for line in text.splitlines() if line])


@dataclass(frozen=True)
class _LambdaContext:
    """The attributes of the Python runtime's context object a handler may read."""

    function_name: str
    invoked_function_arn: str
    memory_limit_in_mb: int
    aws_request_id: str
    log_group_name: str
    log_stream_name: str
    timeout_s: int
    clock: Callable[[], float] = time.monotonic
    started: float = 0.0
    function_version: str = "$LATEST"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.timeout_s - (self.clock() - self.started)) * 1000))


class ManualClock:
    """A monotonic clock that stands still until ``advance`` moves it.

    Given to ``offline(lambda_clock=...)``, it makes a handler's duration what the test says it was
    (``advance(1.05)`` inside a handler with a 1 s timeout), whatever the machine's load.
    """

    def __init__(self) -> None:
        self._now = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a monotonic clock cannot go back ({seconds} s)")
        with self._lock:
            self._now += seconds


# The clock Lambda invocations are timed by (see ``runtime``).
_lambda_clock: Callable[[], float] = time.monotonic


def _invoke_function(backend: Any, function_name: str, qualifier: str | None, body: Any, headers: Any,
                     response_headers: dict[str, str]) -> bytes:
    """Replaces moto's docker-free ``invoke``: run the handler the function's image CMD names."""
    function = backend.get_function(function_name, qualifier)
    handler_path = function.image_config.cmd[0] if function.package_type == "Image" else function.handler
    module_name, _, attribute = handler_path.rpartition(".")
    request_id = str(uuid.uuid4())
    raw = body.decode("utf-8") if isinstance(body, bytes) else (body or "")
    event = json.loads(raw) if raw.strip() else {}
    context = _LambdaContext(
        function_name=function.function_name, invoked_function_arn=function.function_arn,
        memory_limit_in_mb=int(function.memory_size), aws_request_id=request_id,
        log_group_name=f"/aws/lambda/{function.function_name}", log_stream_name=request_id,
        timeout_s=int(function.timeout), clock=_lambda_clock,
    )
    variables = {
        **function.environment_vars, "AWS_REGION": backend.region_name, "AWS_DEFAULT_REGION": backend.region_name,
        "AWS_LAMBDA_FUNCTION_NAME": function.function_name,
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(function.memory_size),
    }
    with _RUN_LOCK, _environment(variables), _captured_output() as output:
        # The clock starts when this invocation runs, not while it waited for another to finish.
        context = replace(context, started=context.clock())
        try:
            handler = getattr(_import_entry_point(module_name), attribute)
            result = handler(event, context)
            payload = json.dumps(result).encode("utf-8")
        except Exception as exc:  # the Lambda runtime's boundary: any exception is a function error
            print(traceback.format_exc(), file=sys.stderr)
            response_headers["x-amz-function-error"] = "Unhandled"
            payload = json.dumps({
                "errorMessage": str(exc), "errorType": type(exc).__name__, "requestId": request_id,
                "stackTrace": traceback.format_tb(exc.__traceback__),
            }).encode("utf-8")
        if context.get_remaining_time_in_millis() == 0:
            # Lambda would have stopped the handler at its timeout; here it ran on, and its reply is
            # replaced by the one Lambda gives for a timed-out invocation.
            message = f"RequestId: {request_id} Error: Task timed out after {context.timeout_s:.2f} seconds"
            print(message, file=sys.stderr)
            response_headers["x-amz-function-error"] = "Unhandled"
            payload = json.dumps({"errorType": LAMBDA_TIMEOUT_ERROR, "errorMessage": message}).encode("utf-8")
    _write_log(backend.region_name, context.log_group_name, request_id, output.getvalue())
    return payload


def resolve_command(command: list[str], parameters: Mapping[str, str]) -> list[str]:
    """Batch's substitution: an argument ``Ref::name`` becomes the parameter's value; an unknown name stays."""
    resolved = []
    for argument in command:
        name = argument.removeprefix("Ref::")
        resolved.append(parameters[name] if argument.startswith("Ref::") and name in parameters else argument)
    return resolved


def _run_command(command: list[str]) -> int:
    """Run ``python -m MODULE ARGS...`` in-process through the module's ``main(argv) -> int``."""
    if len(command) < 3 or command[1] != "-m" or not command[0].startswith("python"):
        raise ConfigError(f"the offline runner runs `python -m MODULE ...` job commands only, got {command!r}")
    module = _import_entry_point(command[2])
    try:
        return int(module.main(command[3:]) or 0)
    except SystemExit as exc:  # argparse errors, or sys.exit inside the job
        return exc.code if isinstance(exc.code, int) else UNCAUGHT_EXIT
    except Exception:  # the container's boundary: an uncaught exception kills the process
        print(traceback.format_exc(), file=sys.stderr)
        return UNCAUGHT_EXIT


def _run_job(backend: Any, job: Any, array_index: int | None) -> bool:
    """Run one job (or one array child) as the job definition says; True when it exits 0."""
    properties = job.job_definition.container_properties or {}
    command = resolve_command(job.container_overrides.get("command") or properties.get("command", []), job.parameters)
    variables = {item["name"]: item["value"] for item in properties.get("environment", [])}
    variables.update({item["name"]: item["value"] for item in job.container_overrides.get("environment", [])})
    variables.update({"AWS_BATCH_JOB_ID": job.job_id, "AWS_BATCH_JQ_NAME": job.job_queue.name,
                      "AWS_BATCH_JOB_ATTEMPT": "1",
                      "AWS_REGION": backend.region_name, "AWS_DEFAULT_REGION": backend.region_name})
    if array_index is not None:
        variables[ENV_ARRAY_INDEX] = str(array_index)
    job.job_started_at = datetime.now()
    job.log_stream_name = job._stream_name
    job._start_attempt()
    with _RUN_LOCK, _environment(variables), _captured_output() as output:
        exit_code = _run_command(command)
    job.exit_code = exit_code
    if exit_code != 0:
        job.job_stopped_reason = CONTAINER_EXITED
    job._mark_stopped(success=exit_code == 0)
    if job.latest_attempt is not None:
        job.latest_attempt["container"]["exitCode"] = exit_code
        if exit_code != 0:
            job.latest_attempt["container"]["reason"] = CONTAINER_EXITED
    _write_log(backend.region_name, "/aws/batch/job", job._stream_name, output.getvalue())
    return exit_code == 0


def _submit_job(simple_backend: Any, job_name: str, job_def_id: str, job_queue: str,
                array_properties: dict[str, Any], **options: Any) -> tuple[str, str, str]:
    """Replaces moto's docker-free ``submit_job``: register the job, run it (each array child), record the outcome."""
    from moto.batch.exceptions import ClientException
    from moto.batch.models import Job

    backend = simple_backend.backend
    definition = backend.get_job_definition(job_def_id)
    if definition is None:
        raise ClientException(f"Job definition {job_def_id} does not exist")
    queue = backend.get_job_queue(job_queue)
    if queue is None:
        raise ClientException(f"Job queue {job_queue} does not exist")
    options.setdefault("eks_properties_override", None)
    options.setdefault("depends_on", None)
    options.setdefault("container_overrides", None)
    options.setdefault("timeout", None)
    options.setdefault("parameters", None)
    tags = options.pop("tags", None)

    def new_job(properties: dict[str, Any], job_id: str | None = None, with_tags: Any = None) -> Any:
        job = Job(job_name, definition, queue, backend, log_backend=backend.logs_backend, all_jobs=backend._jobs,
                  array_properties=properties, provided_job_id=job_id, tags=with_tags, **options)
        backend._jobs[job.job_id] = job
        return job

    job = new_job(array_properties or {}, with_tags=tags)
    size = (array_properties or {}).get("size")
    if size is None:
        _run_job(backend, job, None)
    else:
        children = [new_job({"statusSummary": {}, "index": index}, f"{job.job_id}:{index}") for index in range(size)]
        job._child_jobs = children
        job.job_started_at = datetime.now()
        succeeded = [_run_job(backend, child, index) for index, child in enumerate(children)]
        if not all(succeeded):
            job.job_stopped_reason = f"{succeeded.count(False)} of {size} child jobs failed"
        job._mark_stopped(success=all(succeeded))
    return job_name, job.job_id, job.arn


# --------------------------------------------------------------------------- Step Functions -> Batch


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def moto_needs(fixed_in: str | None, moto_version: str | None = None) -> bool:
    """Whether moto (the installed one, unless named) predates the release ``fixed_in`` (None: unreleased)."""
    if fixed_in is None:
        return True
    return _version(moto_version or installed_version("moto")) < _version(fixed_in)


def batch_params_patch_needed(moto_version: str | None = None) -> bool:
    """Whether moto needs this module's Batch parameter and reply normalisation."""
    return moto_needs(MOTO_BATCH_PARAMS_FIXED_IN, moto_version)


def sync_retry_patch_needed(moto_version: str | None = None) -> bool:
    """Whether moto needs a fresh task token for each attempt of a `.sync` task."""
    return moto_needs(MOTO_SYNC_RETRY_FIXED_IN, moto_version)


def _operation(service: str, action: str) -> Any:
    """The botocore operation model of ``action`` (``submitJob``, ``describe_jobs``) of ``service``."""
    import botocore.session
    from botocore import xform_name

    model = botocore.session.get_session().get_service_model(service)
    by_name = {xform_name(name): name for name in model.operation_names}
    return model.operation_model(by_name[xform_name(action)])


def _normalise_batch_parameters(task: Any, parameters: dict, boto_service_name: str | None = None,
                                service_action_name: str | None = None) -> None:
    """ASL casing -> Batch API casing (``JobName`` -> ``jobName``, nested structures too), in place."""
    operation = _operation(task._get_boto_service_name(boto_service_name),
                           task._get_boto_service_action(service_action_name))
    task._to_boto_request(parameters, operation.input_shape)


def _normalise_batch_response(task: Any, response: Any, boto_service_name: str | None = None,
                              service_action_name: str | None = None) -> None:
    """Batch API casing -> the casing Step Functions returns (``jobId`` -> ``JobId``), in place."""
    operation = _operation(task._get_boto_service_name(boto_service_name),
                           task._get_boto_service_action(service_action_name))
    task._from_boto_response(response, operation.output_shape)


def _fresh_token_per_attempt(original: Callable[..., None]) -> Callable[..., None]:
    """Give each attempt of a `.sync` task its own callback endpoint.

    moto mints a task's token once per state, and a finished attempt interrupts the token's endpoint;
    a retry that reuses it ends at once with States.Timeout. A `.sync` task hands no token to anyone,
    so a new one per attempt changes nothing else.
    """

    def _eval_execution(task: Any, env: Any) -> None:
        from moto.stepfunctions.parser.asl.component.state.exec.state_task.service.resource import (
            ResourceCondition,
        )

        if task.resource.condition == ResourceCondition.Sync:
            env.callback_pool_manager.add(env.states.context_object.update_task_token())
        original(task, env)

    return _eval_execution


# --------------------------------------------------------------------------- EventBridge -> Step Functions


def _send_to_targets(original: Callable[..., None]) -> Callable[..., None]:
    def send_to_targets(rule: Any, event: dict[str, Any], transform_input: bool = True) -> None:
        machines = [target for target in rule.targets if target["Arn"].split(":")[2] == "states"]
        if not machines:
            original(rule, event, transform_input)
            return
        if not rule.event_pattern.matches_event(event):
            return
        for target in machines:
            _start_execution(target, event, rule.account_id, rule.region_name)
        others = [target for target in rule.targets if target not in machines]
        if others:
            import copy

            rest = copy.copy(rule)
            rest.targets = others
            original(rest, event, transform_input)

    return send_to_targets


def _start_execution(target: Mapping[str, Any], event: Mapping[str, Any], account_id: str, region: str) -> None:
    from moto.stepfunctions.responses import get_backend

    if "InputTransformer" in target:
        execution_input = transform_input(target["InputTransformer"], event)
    else:
        execution_input = target.get("Input") or json.dumps(event, default=str)
    try:
        get_backend(account_id, region).start_execution(target["Arn"], name=str(uuid.uuid4()),
                                                          execution_input=execution_input)
    except Exception:  # EventBridge delivers asynchronously: a failed delivery never fails the upload
        logger.exception("could not start %s for event %s", target["Arn"], event.get("id"))


# --------------------------------------------------------------------------- the runtime


class _ScaledTime:
    """The ``time`` module as moto's retrier sees it: sleeps are RETRY_TIME_SCALE as long."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds * self.scale)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@contextmanager
def runtime(*, retry_time_scale: float = RETRY_TIME_SCALE,
            lambda_clock: Callable[[], float] = time.monotonic) -> Iterator[None]:
    """Install the execution layer into moto (see the module docstring) for the duration of the block.

    ``lambda_clock`` times Lambda invocations against their functions' timeouts (see ``ManualClock``).
    """
    from moto.awslambda_simple.models import LambdaSimpleBackend
    from moto.batch_simple.models import BatchSimpleBackend
    from moto.events.models import Rule
    from moto.stepfunctions.parser.asl.component.common.retry import retrier_decl
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service.state_task_service_batch import (
        StateTaskServiceBatch,
    )

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(LambdaSimpleBackend, "invoke", _invoke_function))
        stack.enter_context(mock.patch(f"{__name__}._lambda_clock", lambda_clock))
        stack.enter_context(mock.patch.object(BatchSimpleBackend, "submit_job", _submit_job))
        stack.enter_context(mock.patch.object(Rule, "send_to_targets", _send_to_targets(Rule.send_to_targets)))
        stack.enter_context(mock.patch.object(retrier_decl, "time", _ScaledTime(retry_time_scale)))
        if batch_params_patch_needed():
            stack.enter_context(mock.patch.object(StateTaskServiceBatch, "_normalise_parameters",
                                                  _normalise_batch_parameters))
            stack.enter_context(mock.patch.object(StateTaskServiceBatch, "_normalise_response",
                                                  _normalise_batch_response))
        if sync_retry_patch_needed():
            stack.enter_context(mock.patch.object(StateTaskServiceBatch, "_eval_execution",
                                                  _fresh_token_per_attempt(StateTaskServiceBatch._eval_execution)))
        # moto logs every state failure at ERROR, with its whole parse tree; the history holds the same.
        quiet = logging.getLogger("moto.stepfunctions.parser")
        stack.callback(quiet.setLevel, quiet.level)
        quiet.setLevel(logging.CRITICAL)
        yield


def _check_moto_extras() -> None:
    """moto runs state machines only with its `stepfunctions` extra installed (an ASL parser and JSONPath)."""
    import importlib.util

    missing = [name for name in ("antlr4", "jsonpath_ng") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"the offline pipeline needs moto's Step Functions extra ({', '.join(missing)} missing): "
                          f"pip install 'moto[stepfunctions]=={installed_version('moto')}'")


@contextmanager
def offline(*, region: str = DEFAULT_REGION, retry_time_scale: float = RETRY_TIME_SCALE,
            lambda_clock: Callable[[], float] = time.monotonic) -> Iterator[None]:
    """moto in-process, with the execution layer, and this process's AWS clients pointed at it."""
    from moto import mock_aws

    from topx import stages

    _check_moto_extras()
    variables = {"AWS_DEFAULT_REGION": region, "AWS_REGION": region}
    with ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, variables))
        # A client made for a real endpoint (TOPX_ENDPOINT_URL) would bypass the in-process mock.
        os.environ.pop(ENV_ENDPOINT_URL, None)
        stack.enter_context(mock_aws(config=MOCK_CONFIG))
        stack.enter_context(runtime(retry_time_scale=retry_time_scale, lambda_clock=lambda_clock))
        stages.use_clients(s3=None, dynamodb=None)
        stack.callback(stages.use_clients, s3=None, dynamodb=None)
        yield


# --------------------------------------------------------------------------- following an execution


@dataclass(frozen=True)
class StateEvent:
    """One state's outcome, read from the execution history."""

    state: str
    outcome: str  # "done", "failed" (a task attempt failed; a retry or a Catch may follow), "succeeded"
    seconds: float  # how long the state (or, for the execution's end, the whole execution) took
    error: str = ""


TERMINAL = {"SUCCEEDED", "FAILED", "TIMED_OUT", "ABORTED"}


def wait_for_execution(execution_arn: str, *, region: str = DEFAULT_REGION, timeout_s: float = 900.0,
                       on_state: Callable[[StateEvent], None] | None = None, poll_s: float = 0.1) -> dict[str, Any]:
    """Poll until the execution ends, passing each state's outcome to ``on_state``; returns describe_execution's reply."""
    import boto3

    sfn = boto3.client("stepfunctions", region_name=region)
    follower = _HistoryFollower()
    deadline = time.monotonic() + timeout_s
    while True:
        described = sfn.describe_execution(executionArn=execution_arn)
        events = history(execution_arn, region=region)
        for event in follower.new(events):
            if on_state is not None:
                on_state(event)
        if described["status"] in TERMINAL:
            return described
        if time.monotonic() > deadline:
            raise TimeoutError(f"execution {execution_arn} still {described['status']} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def history(execution_arn: str, *, region: str = DEFAULT_REGION) -> list[dict[str, Any]]:
    """The execution's whole history (get_execution_history, every page), oldest first."""
    import boto3

    sfn = boto3.client("stepfunctions", region_name=region)
    events: list[dict[str, Any]] = []
    token = None
    while True:
        reply = sfn.get_execution_history(executionArn=execution_arn, maxResults=1000,
                                          **({"nextToken": token} if token else {}))
        events.extend(reply["events"])
        token = reply.get("nextToken")
        if not token:
            return events


def state_events(events: list[dict[str, Any]]) -> list[StateEvent]:
    """A whole history as one outcome per state exit or failed task attempt."""
    return list(_HistoryFollower().new(events))


class _HistoryFollower:
    """Turns a growing history into StateEvents, each reported once."""

    def __init__(self) -> None:
        self.seen = 0
        self.entered: dict[str, Any] = {}
        self.current: str | None = None
        self.started: Any = None

    def new(self, events: list[dict[str, Any]]) -> Iterator[StateEvent]:
        for event in events[self.seen:]:
            kind, at = event["type"], event["timestamp"]
            if kind == "ExecutionStarted":
                self.started = at
            elif kind.endswith("StateEntered"):
                self.current = event["stateEnteredEventDetails"]["name"]
                self.entered[self.current] = at
            elif kind.endswith("StateExited"):
                name = event["stateExitedEventDetails"]["name"]
                yield StateEvent(name, "done", _seconds(self.entered.get(name, at), at))
            elif kind == "TaskFailed":
                name = self.current or "?"
                yield StateEvent(name, "failed", _seconds(self.entered.get(name, at), at),
                                 event.get("taskFailedEventDetails", {}).get("error", ""))
            elif kind == "ExecutionFailed":
                yield StateEvent("(execution)", "failed", _seconds(self.started or at, at),
                                 event.get("executionFailedEventDetails", {}).get("error", ""))
            elif kind == "ExecutionSucceeded":
                yield StateEvent("(execution)", "succeeded", _seconds(self.started or at, at))
        self.seen = len(events)


def _seconds(start: Any, end: Any) -> float:
    return max(0.0, (end - start).total_seconds())


def top_level_states() -> list[str]:
    """The state machine's own states, in the order the ASL file lists them (Map iterations excluded)."""
    return list(json.loads(load_definition())["States"])


def executions(state_machine_arn: str, *, region: str = DEFAULT_REGION) -> list[dict[str, Any]]:
    """The state machine's executions, newest first."""
    import boto3

    sfn = boto3.client("stepfunctions", region_name=region)
    found = sfn.list_executions(stateMachineArn=state_machine_arn)["executions"]
    return sorted(found, key=lambda e: e["startDate"], reverse=True)


@dataclass(frozen=True)
class Notification:
    subject: str
    message: str


def notifications(pipeline: LocalPipeline) -> list[Notification]:
    """Messages published to the topic since the last call (read from the subscribed SQS inbox)."""
    import boto3

    sqs = boto3.client("sqs", region_name=pipeline.region)
    found = []
    while True:
        reply = sqs.receive_message(QueueUrl=pipeline.inbox_queue_url, MaxNumberOfMessages=10)
        messages = reply.get("Messages", [])
        if not messages:
            return found
        for message in messages:
            envelope = json.loads(message["Body"])
            found.append(Notification(envelope.get("Subject", ""), envelope.get("Message", "")))
            sqs.delete_message(QueueUrl=pipeline.inbox_queue_url, ReceiptHandle=message["ReceiptHandle"])
