"""Run the deployed pipeline offline: the real state machine under moto, every step doing its real work.

``offline()`` starts moto in-process and installs a small execution layer; ``deploy()`` then creates,
in moto, what the CDK stack creates on AWS (bucket, table, topic, the Lambda functions, two Batch
queues and job definitions, the upload queue, its rules and its starter) and the state machine from
``statemachine/pipeline.asl.json`` with its ``${...}`` placeholders filled with those resources' ARNs.
Dropping files under ``incoming/`` then queues them, and ``deliver_uploads`` (the batching window closing)
starts one execution for them, as on AWS. ``topx demo`` (``topx.offline.demo``) and the offline tests run on it.

The package is the ``offline`` extra (``pip install 'topx[offline]'``: moto and what its Step Functions
interpreter needs) and is left out of the container images: nothing that runs on AWS imports it. Importing
it does not import moto; ``offline()`` does, and names the extra when it is missing. By job:

* ``definition``: the ASL definition and its placeholders, the upload rule, EventBridge's input transformer.
* ``deploy``: the stack's resources created in moto (``LocalSettings``, ``LocalPipeline``, ``deploy``).
* ``execute``: Lambda handlers and Batch entry points run in-process, with their environment, output and clock.
* ``patches``: moto's configuration, its patches and the moto releases they wait for, ``offline()``.
* ``deliver``: the upload queue's batching window, closed when the caller says (``deliver_uploads``).
* ``follow``: following an execution, its history, the notifications.
* ``demo``: ``topx demo``.

See docs/LOCAL.md for what the layer adds to moto, and why.
"""

from __future__ import annotations

from topx.offline.definition import (
    FUNCTION_PLACEHOLDERS,
    DefinitionError,
    fill_definition,
    load_definition,
    load_trigger,
    placeholders,
    run_ended_event_pattern,
    transform_input,
    upload_event_pattern,
)
from topx.offline.deliver import Delivery, StarterError, deliver_uploads
from topx.offline.deploy import DEFAULT_REGION, LocalPipeline, LocalSettings, deploy
from topx.offline.execute import InfrastructureFailure, ManualClock, resolve_command
from topx.offline.follow import (
    TERMINAL,
    Notification,
    StateEvent,
    executions,
    history,
    notifications,
    state_events,
    top_level_states,
    wait_for_execution,
)
from topx.offline.patches import (
    MOCK_CONFIG,
    MOTO_VERSION_TESTED,
    RETRY_TIME_SCALE,
    batch_params_patch_needed,
    check_offline_extra,
    moto_needs,
    offline,
    runtime,
    sync_retry_patch_needed,
)

__all__ = [
    "DEFAULT_REGION",
    "Delivery",
    "StarterError",
    "FUNCTION_PLACEHOLDERS",
    "MOCK_CONFIG",
    "MOTO_VERSION_TESTED",
    "RETRY_TIME_SCALE",
    "TERMINAL",
    "DefinitionError",
    "InfrastructureFailure",
    "LocalPipeline",
    "LocalSettings",
    "ManualClock",
    "Notification",
    "StateEvent",
    "batch_params_patch_needed",
    "check_offline_extra",
    "deliver_uploads",
    "deploy",
    "executions",
    "fill_definition",
    "history",
    "load_definition",
    "load_trigger",
    "moto_needs",
    "notifications",
    "offline",
    "placeholders",
    "resolve_command",
    "run_ended_event_pattern",
    "runtime",
    "state_events",
    "sync_retry_patch_needed",
    "top_level_states",
    "transform_input",
    "upload_event_pattern",
    "wait_for_execution",
]
