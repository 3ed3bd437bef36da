"""moto's configuration for the offline pipeline and what this layer changes in moto, each bug fix switched by
the moto release that fixes it, and ``offline()``, which starts moto in-process with all of it installed.

What changes, and why (moto 5.2.5; see docs/LOCAL.md):

* **Lambda and Batch.** moto's docker-free backends run no code; ``runtime`` puts
  ``topx.offline.execute``'s in-process invocation and job submission in their place.
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
* **Step Functions -> EventBridge.** moto's Step Functions sends no "Execution Status Change" events; here
  an execution that ends puts one on the default event bus, before its status reads as ended, so that the
  run-ended rule queues it for the starter by the time anyone sees the run over.
* **Retry waits** are scaled by ``RETRY_TIME_SCALE``: the ASL waits seconds before retrying a failed call.
  Which errors are retried, and how often, is unchanged.

moto is the ``offline`` extra of topx, not a runtime dependency: this module imports it only inside the
functions that need it, and ``offline()`` names the extra when it is missing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from importlib.metadata import version as installed_version
from typing import Any
from unittest import mock

from topx.contract import ENV_ENDPOINT_URL
from topx.errors import ConfigError
from topx.offline import execute
from topx.offline.definition import transform_input
from topx.offline.deploy import DEFAULT_REGION
from topx.offline.execute import _invoke_function, _submit_job

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- moto pins

MOTO_VERSION_TESTED = "5.2.5"
# The first moto release whose Step Functions interpreter normalises Batch task parameters and replies
# itself. None: no release does yet, so the patch is applied. After upgrading moto past the fix, set this
# to that release (one line); tests/offline/test_offline_layer.py tells which way the installed moto behaves.
MOTO_BATCH_PARAMS_FIXED_IN: str | None = None
# The first moto release in which a `.sync` task that succeeds on a retry is not reported as
# States.Timeout (every attempt reuses the token whose endpoint the first attempt closed). None: not yet.
MOTO_SYNC_RETRY_FIXED_IN: str | None = None

# moto's configuration for the offline pipeline: run state machines, and use the docker-free Lambda
# and Batch backends, whose invoke and submit_job topx.offline.execute replaces.
MOCK_CONFIG: dict[str, Any] = {
    "stepfunctions": {"execute_state_machine": True},
    "lambda": {"use_docker": False},
    "batch": {"use_docker": False},
}

# Retry intervals in the ASL are multiplied by this offline (5 s before a Batch submission retry becomes 0.05 s).
RETRY_TIME_SCALE = 0.01


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


# --------------------------------------------------------------------------- Step Functions -> EventBridge


def _ended_status(program_state: Any) -> str | None:
    """The status an execution ends with, from moto's program state (as moto's own status mapping reads it)."""
    from moto.stepfunctions.parser.asl.eval.program_state import (
        ProgramEnded,
        ProgramError,
        ProgramStopped,
        ProgramTimedOut,
    )

    for kind, status in ((ProgramEnded, "SUCCEEDED"), (ProgramStopped, "ABORTED"), (ProgramError, "FAILED"),
                         (ProgramTimedOut, "TIMED_OUT")):
        if isinstance(program_state, kind):
            return status
    return None


def _announce_end(original: Callable[..., None]) -> Callable[..., None]:
    def terminated(communication: Any) -> None:
        import boto3

        from topx.aws.trigger import RUN_ENDED_EVENT

        execution = communication.execution
        status = _ended_status(execution.exec_worker.env.program_state())
        if status is not None:
            detail = {"executionArn": execution.exec_arn, "stateMachineArn": execution.state_machine_arn,
                      "name": execution.name, "status": status}
            try:
                boto3.client("events", region_name=execution.region_name).put_events(Entries=[{
                    "Source": RUN_ENDED_EVENT[0], "DetailType": RUN_ENDED_EVENT[1], "Detail": json.dumps(detail),
                    "Resources": [execution.exec_arn],
                }])
            except Exception:  # as on AWS, a lost event never changes the execution's outcome
                logger.exception("could not announce the end of %s", execution.exec_arn)
        original(communication)

    return terminated


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
    from moto.stepfunctions.parser.backend.execution import BaseExecutionWorkerCommunication

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(LambdaSimpleBackend, "invoke", _invoke_function))
        stack.enter_context(mock.patch.object(execute, "_lambda_clock", lambda_clock))
        stack.enter_context(mock.patch.object(BatchSimpleBackend, "submit_job", _submit_job))
        stack.enter_context(mock.patch.object(Rule, "send_to_targets", _send_to_targets(Rule.send_to_targets)))
        stack.enter_context(mock.patch.object(BaseExecutionWorkerCommunication, "terminated",
                                              _announce_end(BaseExecutionWorkerCommunication.terminated)))
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


# The packages of the `offline` extra (pyproject.toml), by the module each installs: moto, and what moto's
# Step Functions interpreter needs to run a state machine (an ASL parser and JSONPath).
OFFLINE_EXTRA_MODULES = {"moto": "moto", "antlr4": "antlr4-python3-runtime", "jsonpath_ng": "jsonpath-ng"}


def check_offline_extra() -> None:
    """Refuse, naming the extra to install, when moto or what it needs to run state machines is missing."""
    import importlib.util

    missing = [package for module, package in OFFLINE_EXTRA_MODULES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ConfigError(f"the offline pipeline needs the offline extra ({', '.join(missing)} missing): "
                          f"pip install 'topx[offline]' (in a checkout: pip install -e '.[offline]')")


@contextmanager
def offline(*, region: str = DEFAULT_REGION, retry_time_scale: float = RETRY_TIME_SCALE,
            lambda_clock: Callable[[], float] = time.monotonic) -> Iterator[None]:
    """moto in-process, with the execution layer, and this process's AWS clients pointed at it."""
    check_offline_extra()  # before moto is imported, so that its absence is named, not a bare ImportError
    from moto import mock_aws

    from topx.aws import stages

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
