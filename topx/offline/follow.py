"""Following an execution of the offline pipeline: waiting for it state by state, its whole history, the
state machine's executions, newest first, and the notifications published to the topic (read back from
the SQS queue ``topx.offline.deploy`` subscribes to it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from topx.offline.definition import load_definition
from topx.offline.deploy import DEFAULT_REGION, LocalPipeline

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
