"""The upload starter: a burst of uploads starts one execution of the pipeline, and never two run at once.

EventBridge puts every S3 "Object Created" event under ``incoming/``, ``config/`` and ``responses/``, every
end of an execution and the schedule's ticks on one SQS queue; Lambda hands the queue's messages to ``start_runs`` in batches, after a
batching window (infra/pipeline.py). One DynamoDB item (``TRIGGER_PARTITION``) holds the run in progress
and the uploads waiting for the next. Every change to it is a conditional write on its sequence number, so
two starters working at once cannot both start a run: the loser reads the item again and tries again.

A batch's uploads join those waiting. While a run is in progress (the item names it and DescribeExecution
says RUNNING, or ListExecutions finds one started another way) nothing starts: the uploads wait for its
end, whose event arrives through the same queue and brings the starter back. Otherwise, when anything
waits, the starter claims the next sequence number, and with it the execution's name, in the item, then
starts the execution under that name. A batch retried after a crash finds the claim and starts the same
name again, which Step Functions answers with the same execution (a name is unique per state machine):
no batch starts two.

Each run has a mode (``run_mode``), in its execution input and its name. A *refresh* reuses the live model
and only applies the filters and responses again (no training): it is chosen when every waiting upload is
refresh-only, that is the filter file (``config/filters.json``) or a file under ``responses/``. Anything
else waiting (data under ``incoming/``, ``config/dataset.json``, which changes how the data is read) and the
schedule's tick make a *full* run, which reads the current filters and responses too. The starter does not
look at what is live: the state machine's refresh Prepare does, and makes the run a full one when nothing is.

When a run ends, waiting uploads that S3 reported at least ``COVERED_MARGIN_S`` before the run was
claimed, and that the run read, are dropped: that run's Prepare listed them after the claim (a burst that
Lambda split over two batches gives one run, not two). A full run reads every kind of upload; a refresh
only the refresh-only ones, so data that arrived during a refresh always gives a full run after it. The
others start the next run.

boto3-level code only (no numpy, torch or faiss): the starter's Lambda imports this and the contract.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from topx.contract import (
    CONFIG_PREFIX,
    ENV_ENDPOINT_URL,
    FILTERS_KEY,
    INCOMING_PREFIX,
    PARTITION_KEY,
    RESPONSES_PREFIX,
    RUN_ENDED_DETAIL_TYPE,
    RUN_ENDED_SOURCE,
    RUN_ENDED_STATUSES,
    RUN_MODE_FULL,
    RUN_MODE_REFRESH,
    SORT_KEY,
    TRIGGER_PARTITION,
    TRIGGER_SORT,
)
from topx.errors import StoreError

logger = logging.getLogger(__name__)

# The events the queue receives (statemachine/trigger.json's upload pattern, the execution status rule, the
# schedule), by (source, detail-type).
UPLOAD_EVENT = ("aws.s3", "Object Created")
RUN_ENDED_EVENT = (RUN_ENDED_SOURCE, RUN_ENDED_DETAIL_TYPE)
SCHEDULE_EVENT = ("aws.events", "Scheduled Event")
ENDED_STATUSES = frozenset(RUN_ENDED_STATUSES)
# An upload S3 reported this long before a run was claimed was listed by that run's Prepare. S3 reports an
# object once it is stored (and listed); the margin covers event times' whole seconds and clock skew.
COVERED_MARGIN_S = 2.0
# Folders recorded one by one; beyond this many, further uploads are counted under incoming/ as a whole,
# so that the item (400 KB) and the execution input (256 KB) stay small.
MAX_UPLOAD_PATHS = 500
# Conditional writes lost to another starter before giving up (the batch is then retried by Lambda).
MAX_CLAIM_ATTEMPTS = 8
# The prefixes whose uploads reach the starter (statemachine/trigger.json's key_prefixes).
UPLOAD_PREFIXES = (INCOMING_PREFIX, CONFIG_PREFIX, RESPONSES_PREFIX)
# Run modes (topx.contract), in the execution input's "mode".
FULL, REFRESH = RUN_MODE_FULL, RUN_MODE_REFRESH


class TriggerConflict(StoreError):
    """Another starter kept changing the trigger item; Lambda retries the batch."""


# --------------------------------------------------------------------------- what a batch says


@dataclass(frozen=True)
class Upload:
    """Uploads of one folder waiting for a run: how many objects, the last one's time, its key."""

    objects: int
    last: float  # epoch seconds S3 reported the latest of them
    key: str  # the latest object's key


@dataclass
class Batch:
    uploads: dict[str, Upload] = field(default_factory=dict)  # folder -> its uploads
    ended: list[str] = field(default_factory=list)  # execution ARNs whose end was reported
    scheduled: bool = False
    ignored: int = 0  # messages that were none of the above (logged)


def upload_folder(key: str) -> str:
    """The folder an upload is recorded under: its parent folder (``incoming/`` for a loose file); a file
    under ``config/`` by its own key, since the filter file and the dataset configuration ask for different
    runs."""
    if key.startswith(CONFIG_PREFIX):
        return key
    parent, slash, _ = key.rpartition("/")
    return parent + slash if slash else INCOMING_PREFIX


def refresh_only(folder: str) -> bool:
    """Whether uploads recorded under ``folder`` (``upload_folder``) need only a refresh of the live model:
    the filter file and responses. Data, the dataset configuration and any other setting need a full run."""
    return folder == FILTERS_KEY or folder.startswith(RESPONSES_PREFIX)


def run_mode(pending: Mapping[str, Upload], scheduled: bool) -> str:
    """The mode of the run that starts for what waits: ``REFRESH`` when every waiting upload is refresh-only
    (and the schedule did not tick), else ``FULL``."""
    if pending and not scheduled and all(refresh_only(folder) for folder in pending):
        return REFRESH
    return FULL


def _claimed_mode(execution_input: str | None) -> str:
    """The mode a claimed run was started in, from its execution input (full when it names none)."""
    try:
        doc = json.loads(execution_input or "{}")
    except json.JSONDecodeError:
        return FULL
    return REFRESH if isinstance(doc, Mapping) and doc.get("mode") == REFRESH else FULL


def _event_time(value: Any) -> float:
    """EventBridge's ``time`` (ISO-8601, ``2024-05-01T12:00:00Z``), or epoch seconds; now when absent."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    return time.time()


def read_batch(records: Iterable[Mapping[str, Any]], bucket: str) -> Batch:
    """The SQS records of one Lambda invocation (each body an EventBridge event) as uploads, ends and ticks."""
    batch = Batch()
    for record in records:
        try:
            event = json.loads(record.get("body") or "")
        except (TypeError, json.JSONDecodeError):
            event = None
        if not isinstance(event, Mapping):
            batch.ignored += 1
            logger.warning("ignored message %s: not an EventBridge event", record.get("messageId"))
            continue
        kind = (event.get("source"), event.get("detail-type"))
        detail = event.get("detail") if isinstance(event.get("detail"), Mapping) else {}
        if kind == UPLOAD_EVENT:
            key = (detail.get("object") or {}).get("key")
            if (detail.get("bucket") or {}).get("name") != bucket or not isinstance(key, str) \
                    or not key.startswith(UPLOAD_PREFIXES):
                batch.ignored += 1
                continue
            batch.uploads = merge_uploads(batch.uploads, {upload_folder(key): Upload(1, _event_time(event.get("time")),
                                                                                     key)})
        elif kind == RUN_ENDED_EVENT and detail.get("status") in ENDED_STATUSES:
            batch.ended.append(str(detail.get("executionArn")))
        elif kind == SCHEDULE_EVENT:
            batch.scheduled = True
        else:
            batch.ignored += 1
            logger.warning("ignored message %s: %s", record.get("messageId"), kind)
    return batch


def merge_uploads(into: Mapping[str, Upload], more: Mapping[str, Upload]) -> dict[str, Upload]:
    """Both sets of waiting uploads, folder by folder; past MAX_UPLOAD_PATHS folders, new ones count under incoming/."""
    merged = dict(into)
    for folder, upload in more.items():
        if folder not in merged and len(merged) >= MAX_UPLOAD_PATHS:
            folder = INCOMING_PREFIX
        old = merged.get(folder)
        if old is None:
            merged[folder] = upload
        else:
            latest = upload if (upload.last, upload.key) >= (old.last, old.key) else old
            merged[folder] = Upload(old.objects + upload.objects, latest.last, latest.key)
    return merged


def describe_uploads(uploads: Mapping[str, Upload]) -> list[dict[str, Any]]:
    """What a run covers, as its execution input and run record list it: ``{"path", "objects"}`` per folder
    (the key itself for a folder of one upload), in path order."""
    return [{"path": upload.key if upload.objects == 1 else folder, "objects": upload.objects}
            for folder, upload in sorted(uploads.items())]


# --------------------------------------------------------------------------- the trigger item


@dataclass(frozen=True)
class TriggerState:
    seq: int = 0  # claims so far; the item is written only if it still holds the seq it was read with
    running: str | None = None  # the ARN of the execution claimed last, until its end is seen
    claimed_at: float | None = None  # epoch seconds of that claim
    execution_input: str | None = None  # its input, to start it again if the claim's start was lost
    pending: Mapping[str, Upload] = field(default_factory=dict)
    scheduled: bool = False
    exists: bool = False  # whether the item was there when read

    @property
    def waiting(self) -> bool:
        return bool(self.pending) or self.scheduled


def _key() -> dict[str, dict[str, str]]:
    return {PARTITION_KEY: {"S": TRIGGER_PARTITION}, SORT_KEY: {"S": TRIGGER_SORT}}


def read_state(table: str, ddb: Any) -> TriggerState:
    item = ddb.get_item(TableName=table, Key=_key(), ConsistentRead=True).get("Item")
    if item is None:
        return TriggerState()
    pending = {folder: Upload(int(u["objects"]), float(u["last"]), str(u["key"]))
               for folder, u in json.loads(item.get("pending", {}).get("S", "{}")).items()}
    return TriggerState(
        seq=int(item["seq"]["N"]),
        running=item.get("running", {}).get("S"),
        claimed_at=float(item["claimed_at"]["N"]) if "claimed_at" in item else None,
        execution_input=item.get("execution_input", {}).get("S"),
        pending=pending,
        scheduled=bool(item.get("scheduled", {}).get("BOOL", False)),
        exists=True,
    )


def write_state(table: str, ddb: Any, state: TriggerState, *, read: TriggerState) -> bool:
    """Write ``state`` if the item still holds what ``read`` saw; False when another starter changed it."""
    item: dict[str, Any] = {
        **_key(),
        "seq": {"N": str(state.seq)},
        "pending": {"S": json.dumps({folder: {"objects": u.objects, "last": u.last, "key": u.key}
                                     for folder, u in sorted(state.pending.items())}, separators=(",", ":"))},
        "scheduled": {"BOOL": state.scheduled},
    }
    if state.running is not None:
        item["running"] = {"S": state.running}
    if state.claimed_at is not None:
        item["claimed_at"] = {"N": repr(state.claimed_at)}
    if state.execution_input is not None:
        item["execution_input"] = {"S": state.execution_input}
    # The pending uploads change without a claim, so the check covers them too.
    condition = ("attribute_not_exists(pk)" if not read.exists
                 else "seq = :seq AND pending = :pending AND scheduled = :scheduled")
    values = {} if not read.exists else {
        ":seq": {"N": str(read.seq)},
        ":pending": {"S": json.dumps({folder: {"objects": u.objects, "last": u.last, "key": u.key}
                                      for folder, u in sorted(read.pending.items())}, separators=(",", ":"))},
        ":scheduled": {"BOOL": read.scheduled},
    }
    try:
        ddb.put_item(TableName=table, Item=item, ConditionExpression=condition,
                     **({"ExpressionAttributeValues": values} if values else {}))
    except ddb.exceptions.ConditionalCheckFailedException:
        return False
    return True


# --------------------------------------------------------------------------- starting runs


@dataclass(frozen=True)
class Outcome:
    """What one batch did: the execution it started (None: none), the run it waits for, what waits."""

    started: str | None
    waiting_for: str | None
    pending_uploads: int
    dropped_uploads: int  # waiting uploads the ended run had already read

    def as_dict(self) -> dict[str, Any]:
        return {"started": self.started, "waiting_for": self.waiting_for, "pending_uploads": self.pending_uploads,
                "dropped_uploads": self.dropped_uploads}


def execution_arn(state_machine_arn: str, name: str) -> str:
    """``arn:...:stateMachine:M`` -> ``arn:...:execution:M:<name>``."""
    return state_machine_arn.replace(":stateMachine:", ":execution:", 1) + ":" + name


def execution_name(seq: int, claimed_at: float, scheduled_only: bool, mode: str = FULL) -> str:
    """Unique per claim: the sequence number, and the claim's time against a trigger item made anew; led by
    what the run is (``refresh``, ``scheduled`` or ``uploads``), so that a list of executions shows it."""
    stamp = datetime.fromtimestamp(claimed_at, UTC).strftime("%Y%m%dT%H%M%SZ")
    kind = REFRESH if mode == REFRESH else "scheduled" if scheduled_only else "uploads"
    return f"{kind}-{seq:06d}-{stamp}"


def _status(sfn: Any, arn: str) -> str | None:
    """The execution's status; None when there is no such execution (a claim whose start was lost)."""
    try:
        return sfn.describe_execution(executionArn=arn)["status"]
    except sfn.exceptions.ExecutionDoesNotExist:
        return None


def _running_elsewhere(sfn: Any, state_machine_arn: str) -> str | None:
    """A running execution of the state machine (one started from the console, say), if any."""
    found = sfn.list_executions(stateMachineArn=state_machine_arn, statusFilter="RUNNING", maxResults=1)
    executions = found.get("executions", [])
    return executions[0]["executionArn"] if executions else None


def _start(sfn: Any, state_machine_arn: str, arn: str, execution_input: str) -> bool:
    """Start the claimed execution; True when it runs under that name with this input (started now or by
    an earlier try of this claim), False when the name belongs to another execution, or to one that has
    ended (a claim is started before anything can end it: an ended one is older than the claim)."""
    name = arn.rsplit(":", 1)[-1]
    try:
        sfn.start_execution(stateMachineArn=state_machine_arn, name=name, input=execution_input)
    except sfn.exceptions.ExecutionAlreadyExists:
        described = sfn.describe_execution(executionArn=arn)
        return described.get("input") == execution_input and described.get("status") == "RUNNING"
    return True


def start_runs(batch: Batch, *, bucket: str, table: str, state_machine_arn: str, sfn: Any = None,
               ddb: Any = None, clock: Callable[[], float] = time.time) -> Outcome:
    """Add the batch to what waits, and start one execution when none runs and anything waits."""
    sfn = sfn or _client("stepfunctions")
    ddb = ddb or _client("dynamodb")
    for _ in range(MAX_CLAIM_ATTEMPTS):
        read = read_state(table, ddb)
        state = TriggerState(read.seq, read.running, read.claimed_at, read.execution_input,
                             merge_uploads(read.pending, batch.uploads), read.scheduled or batch.scheduled, True)
        dropped = 0
        if state.running is not None:
            status = _status(sfn, state.running)
            # Claimed, but the start was lost (the starter stopped in between): start it now.
            if status is None and state.execution_input is not None \
                    and _start(sfn, state_machine_arn, state.running, state.execution_input):
                status = "RUNNING"
            if status == "RUNNING":
                if write_state(table, ddb, state, read=read):
                    return Outcome(None, state.running, _count(state.pending), 0)
                continue
            # The run has ended: what it read needs no other run (a refresh read only refresh-only uploads).
            refreshed = _claimed_mode(state.execution_input) == REFRESH
            kept = {folder: u for folder, u in state.pending.items()
                    if state.claimed_at is None or u.last > state.claimed_at - COVERED_MARGIN_S
                    or (refreshed and not refresh_only(folder))}
            dropped = _count(state.pending) - _count(kept)
            state = TriggerState(state.seq, None, None, None, kept, False, True)
        elsewhere = _running_elsewhere(sfn, state_machine_arn)
        if elsewhere is not None:
            # Not ours (nothing claimed it), but one at a time all the same: wait for its end too.
            state = TriggerState(state.seq, elsewhere, None, None, state.pending, state.scheduled, True)
            if write_state(table, ddb, state, read=read):
                return Outcome(None, elsewhere, _count(state.pending), dropped)
            continue
        if not state.waiting:
            if state == read or write_state(table, ddb, state, read=read):
                return Outcome(None, None, 0, dropped)
            continue
        claimed_at = clock()
        seq = state.seq + 1
        mode = run_mode(state.pending, state.scheduled)
        arn = execution_arn(state_machine_arn, execution_name(seq, claimed_at, not state.pending, mode))
        execution_input = json.dumps({"bucket": bucket, "key": None, "uploads": describe_uploads(state.pending),
                                      "mode": mode}, separators=(",", ":"))
        claim = TriggerState(seq, arn, claimed_at, execution_input, {}, False, True)
        if not write_state(table, ddb, claim, read=read):
            continue
        if not _start(sfn, state_machine_arn, arn, execution_input):
            # The name is an older execution's (the item was made anew): put what waits back under the
            # claimed seq, and the next claim takes the next name.
            logger.warning("execution name %s is taken; claiming the next one", arn)
            write_state(table, ddb, TriggerState(seq, None, None, None, state.pending, state.scheduled, True),
                        read=claim)
            continue
        logger.info("started %s (%s) for %d upload(s)", arn, mode, _count(state.pending))
        return Outcome(arn, None, 0, dropped)
    raise TriggerConflict(f"the trigger item in {table} kept changing under {MAX_CLAIM_ATTEMPTS} tries; "
                          "the batch is retried")


def _count(uploads: Mapping[str, Upload]) -> int:
    return sum(u.objects for u in uploads.values())


def _client(service: str) -> Any:
    import boto3

    return boto3.client(service, endpoint_url=os.environ.get(ENV_ENDPOINT_URL) or None)


__all__ = [
    "COVERED_MARGIN_S",
    "FULL",
    "REFRESH",
    "Batch",
    "Outcome",
    "TriggerConflict",
    "TriggerState",
    "Upload",
    "describe_uploads",
    "execution_arn",
    "read_batch",
    "read_state",
    "refresh_only",
    "run_mode",
    "start_runs",
]
