"""Lambda functions and Batch jobs run in-process, where moto's docker-free backends run nothing.

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
  job runs one child per index with ``AWS_BATCH_JOB_ARRAY_INDEX`` set and fails if any child fails. A
  failed job or child is run again as the definition's ``retryStrategy`` says (``retry_action``), as
  Batch does; a test stands for infrastructure ending an attempt by raising ``InfrastructureFailure``.
  Entry points run in-process (``main(argv) -> int``), one at a time: moto's mock only intercepts this
  process's AWS calls, and the process environment is shared.

Each run's output goes to moto's CloudWatch Logs, as a deployed function's or job's does.
``topx.offline.patches.runtime`` puts ``_invoke_function`` and ``_submit_job`` in place of moto's own.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from topx.contract import ENV_ARRAY_INDEX
from topx.errors import ConfigError
from topx.offline.definition import REPO_ROOT

# Exit status of a Python process that died of an uncaught exception.
UNCAUGHT_EXIT = 1
# What AWS Batch reports for a container that exited non-zero.
CONTAINER_EXITED = "Essential container in task exited"
# The errorType Lambda reports for an invocation that ran past the function's timeout; Step Functions
# matches it as an error name.
LAMBDA_TIMEOUT_ERROR = "Sandbox.Timedout"


# --------------------------------------------------------------------------- running code in-process

# Lambda functions and Batch jobs run one at a time: each gets the process environment for its run.
_RUN_LOCK = threading.RLock()
# Environment variables a function or job only has when its configuration gives them (TOPX_ENDPOINT_URL
# included: a client made for another endpoint would bypass the in-process mock).
_CONFIGURED_PREFIXES = ("TOPX_", "AWS_BATCH_", "AWS_LAMBDA_")


@contextmanager
def _environment(variables: Mapping[str, str]) -> Iterator[None]:
    """The process environment of one function or job run: the caller's, minus topx settings, plus ``variables``.

    Keys are only ever set, never removed, during the run or after it: other threads read the
    environment meanwhile (botocore iterates it to find proxies whenever a client is made), and a key
    removed between an iteration's listing and its lookup raises KeyError in that thread. A setting
    the run must not see (``_CONFIGURED_PREFIXES``) is set to "" instead, which topx reads as unset
    (``topx.config.env_or``); afterwards such a key the caller did not have stays "", the others get
    their values back.
    """
    saved = {name: os.environ.get(name) for name in [*os.environ, *variables]}
    try:
        for name, value in saved.items():
            if value is not None and name.startswith(_CONFIGURED_PREFIXES) and name not in variables:
                os.environ[name] = ""
        os.environ.update(variables)
        yield
    finally:
        for name, value in saved.items():
            if value is not None:
                os.environ[name] = value
            elif name.startswith(_CONFIGURED_PREFIXES):
                os.environ[name] = ""


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
    # A job's later attempt writes on after its earlier one (which printed its metrics before it failed).
    with suppress(logs.exceptions.ResourceAlreadyExistsException):
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


class InfrastructureFailure(BaseException):
    """Raised inside a job run offline, it stands for infrastructure ending the job: the instance or the
    Spot task taken away. The attempt then has no exit code and this status reason, as Batch reports it
    (a BaseException, so that the job's own error handling does not take it for one of its errors)."""

    def __init__(self, status_reason: str = "Host EC2 (instance i-0offline) terminated.") -> None:
        super().__init__(status_reason)
        self.status_reason = status_reason


@dataclass(frozen=True)
class _Attempt:
    """How one attempt of a job ended, in the terms a retry strategy's rules match on."""

    exit_code: int | None
    status_reason: str | None = None
    reason: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0


def _run_command(command: list[str]) -> _Attempt:
    """Run ``python -m MODULE ARGS...`` in-process through the module's ``main(argv) -> int``."""
    if len(command) < 3 or command[1] != "-m" or not command[0].startswith("python"):
        raise ConfigError(f"the offline runner runs `python -m MODULE ...` job commands only, got {command!r}")
    module = _import_entry_point(command[2])
    try:
        code = int(module.main(command[3:]) or 0)
    except SystemExit as exc:  # argparse errors, or sys.exit inside the job
        code = exc.code if isinstance(exc.code, int) else UNCAUGHT_EXIT
    except InfrastructureFailure as failure:
        return _Attempt(None, failure.status_reason)
    except Exception:  # the container's boundary: an uncaught exception kills the process
        print(traceback.format_exc(), file=sys.stderr)
        code = UNCAUGHT_EXIT
    return _Attempt(code) if code == 0 else _Attempt(code, CONTAINER_EXITED, CONTAINER_EXITED)


def retry_action(strategy: Mapping[str, Any] | None, attempt: _Attempt) -> str:
    """What Batch does after a failed attempt under a job definition's ``retryStrategy``: the action of
    the first ``evaluateOnExit`` rule whose every condition matches ("RETRY" when none does, as Batch
    does). A pattern matches its value exactly, or by prefix when it ends in "*"."""
    values = {"onExitCode": "" if attempt.exit_code is None else str(attempt.exit_code),
              "onStatusReason": attempt.status_reason or "", "onReason": attempt.reason or ""}
    for rule in (strategy or {}).get("evaluateOnExit") or ():
        if all(_matches(rule[name], value) for name, value in values.items() if rule.get(name) is not None):
            return str(rule["action"]).upper()
    return "RETRY"


def _matches(pattern: str, value: str) -> bool:
    return value.startswith(pattern[:-1]) if pattern.endswith("*") else value == pattern


def _run_job(backend: Any, job: Any, array_index: int | None) -> bool:
    """Run one job (or one array child) as the job definition says, attempt after attempt as its retry
    strategy allows (Batch's own retries); True when it exits 0."""
    properties = job.job_definition.container_properties or {}
    command = resolve_command(job.container_overrides.get("command") or properties.get("command", []), job.parameters)
    variables = {item["name"]: item["value"] for item in properties.get("environment", [])}
    variables.update({item["name"]: item["value"] for item in job.container_overrides.get("environment", [])})
    variables.update({"AWS_BATCH_JOB_ID": job.job_id, "AWS_BATCH_JQ_NAME": job.job_queue.name,
                      "AWS_REGION": backend.region_name, "AWS_DEFAULT_REGION": backend.region_name})
    if array_index is not None:
        variables[ENV_ARRAY_INDEX] = str(array_index)
    strategy = job.job_definition.retry_strategy or {}
    attempts = max(int(strategy.get("attempts") or 1), 1)
    job.job_started_at = datetime.now()
    job.log_stream_name = job._stream_name
    for number in range(1, attempts + 1):
        variables["AWS_BATCH_JOB_ATTEMPT"] = str(number)
        job._start_attempt()
        with _RUN_LOCK, _environment({**variables}), _captured_output() as output:
            attempt = _run_command(command)
        _write_log(backend.region_name, "/aws/batch/job", job._stream_name, output.getvalue())
        container = job.latest_attempt["container"]
        if attempt.exit_code is not None:
            container["exitCode"] = attempt.exit_code
        if attempt.reason is not None:
            container["reason"] = attempt.reason
        if attempt.status_reason is not None:
            job.latest_attempt["statusReason"] = attempt.status_reason
        if attempt.succeeded or number == attempts or retry_action(strategy, attempt) == "EXIT":
            break
        job.latest_attempt["stoppedAt"] = int(datetime.now().timestamp() * 1000)
    job.exit_code = attempt.exit_code
    if not attempt.succeeded:
        job.job_stopped_reason = attempt.status_reason
    job._mark_stopped(success=attempt.succeeded)
    return attempt.succeeded


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
