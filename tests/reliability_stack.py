"""The offline stack the reliability tests share: deploy once per module, reset between cases, upload,
follow the execution, and read what a reader reads.

Imported by the offline tests (tests/offline/) and, for its planted-taste ratings, by tests/aws/.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import boto3
import numpy as np
import pandas as pd

from topx import offline
from topx.aws import store

TOP_X, FACTORS, EPOCHS, SHARDS, RETENTION_DAYS = 3, 4, 3, 2, 30
SETTINGS = offline.LocalSettings(top_x=TOP_X, num_factors=FACTORS, epochs=EPOCHS, shards=SHARDS,
                                 retention_days=RETENTION_DAYS)
# A version live before a case runs, as an earlier successful run would have left it. It has no
# metrics.json, so the quality gate compares a case's model with its baseline only.
SEEDED_VERSION = "20000101T000000000000Z-seeded"
SEEDED_ITEMS = ["i-old-1", "i-old-2"]


def base_ratings(n_users: int = 120, n_items: int = 40, seed: int = 3) -> pd.DataFrame:
    """Ratings with planted tastes that a 3-epoch, k=4 model learns either way the gate judges it:
    ranked, it beats popularity (users take items of their own of four groups, every item about as
    popular); as a regressor, it beats the global mean (each item has its own level, one step higher
    for users of its group)."""
    rng = np.random.default_rng(seed)
    groups = 4
    level = rng.integers(2, 5, n_items)
    users, items, ratings = [], [], []
    for user in range(n_users):
        own = np.arange(user % groups, n_items, groups)
        others = np.setdiff1d(np.arange(n_items), own)
        chosen = np.concatenate([rng.choice(own, size=min(7, len(own)), replace=False),
                                 rng.choice(others, size=min(2, len(others)), replace=False)])
        liked = np.isin(chosen, own)
        users += [f"u{user:05d}"] * len(chosen)
        items += [f"i{item:05d}" for item in chosen]
        ratings += list(np.clip(level[chosen] + np.where(liked, 1, -1), 1, 5))
    order = rng.permutation(len(users))
    return pd.DataFrame({"user_id": np.array(users)[order], "item_id": np.array(items)[order],
                         "rating": np.array(ratings)[order]})


def csv_bytes(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False).encode("utf-8")


@dataclass
class Run:
    """One execution, after it ended."""

    arn: str
    status: str
    error: str | None
    output: dict[str, Any] | None
    history: list[dict[str, Any]]
    notes: list[offline.Notification]

    @property
    def run_id(self) -> str | None:
        if self.output is not None:
            return self.output["prepare"]["run_id"]
        for event in self.history:  # a failed execution has no output: Prepare's reply has the run id
            details = event.get("taskSucceededEventDetails", {})
            if '"run_id"' in details.get("output", "") and '"shard_ids"' in details.get("output", ""):
                return json.loads(details["output"])["Payload"]["run_id"]
        return None

    def exited_states(self) -> list[str]:
        top = set(offline.top_level_states())
        return [e.state for e in offline.state_events(self.history) if e.outcome == "done" and e.state in top]

    def failures(self, state: str | None = None) -> list[offline.StateEvent]:
        """Failed task attempts (Map iterations report under their inner state's name)."""
        return [e for e in offline.state_events(self.history)
                if e.outcome == "failed" and e.state != "(execution)" and state in (None, e.state)]

    def attempts(self, state: str) -> int:
        """How many times ``state``'s task was scheduled (the first try and each retry)."""
        count, current = 0, None
        for event in self.history:
            if event["type"].endswith("StateEntered"):
                current = event["stateEnteredEventDetails"]["name"]
            elif event["type"] == "TaskScheduled" and current == state:
                count += 1
        return count


@dataclass
class Stack:
    pipeline: offline.LocalPipeline
    s3: Any
    ddb: Any
    # Times Lambda invocations: it moves only when a test says a handler took time (see offline.ManualClock).
    clock: offline.ManualClock
    seen: set[str] = field(default_factory=set)

    # ------------------------------------------------------------------ driving it

    def put(self, key: str, body: bytes, metadata: dict[str, str] | None = None) -> list[str]:
        """Put an object and close the upload queue's batching window; return the ARNs of the executions started."""
        self.s3.put_object(Bucket=self.pipeline.bucket, Key=key, Body=body, **({"Metadata": metadata} if metadata else {}))
        offline.deliver_uploads(self.pipeline)
        started = [e["executionArn"] for e in offline.executions(self.pipeline.state_machine_arn)
                   if e["executionArn"] not in self.seen]
        self.seen.update(started)
        return started

    def start_by_hand(self, key: str, body: bytes) -> str:
        """Put an object and start an execution on it directly, as one started from the console would be,
        beside the starter (which never starts two at once); returns its ARN. The upload's queued event is
        dropped, so the starter does not see it."""
        self.s3.put_object(Bucket=self.pipeline.bucket, Key=key, Body=body)
        self.drop_queued()
        sfn = boto3.client("stepfunctions", region_name=self.pipeline.region)
        arn = sfn.start_execution(stateMachineArn=self.pipeline.state_machine_arn, name=f"by-hand-{uuid.uuid4()}",
                                  input=json.dumps({"bucket": self.pipeline.bucket, "key": key, "uploads": None}),
                                  )["executionArn"]
        self.seen.add(arn)
        return arn

    def wait(self, arn: str, *, notes: bool = True, timeout_s: float = 300.0) -> Run:
        # Only the status is polled: reading the whole history on every poll slows the execution down.
        sfn = boto3.client("stepfunctions", region_name=self.pipeline.region)
        deadline = time.monotonic() + timeout_s
        while (described := sfn.describe_execution(executionArn=arn))["status"] not in offline.TERMINAL:
            assert time.monotonic() < deadline, f"{arn} still {described['status']} after {timeout_s:.0f} s"
            time.sleep(0.05)
        output = json.loads(described["output"]) if described.get("output") else None
        return Run(arn, described["status"], described.get("error"), output, offline.history(arn),
                   offline.notifications(self.pipeline) if notes else [])

    def upload(self, key: str, body: bytes, metadata: dict[str, str] | None = None) -> Run:
        """Upload under incoming/ and follow the one execution it starts to its end."""
        (arn,) = self.put(key, body, metadata)
        return self.wait(arn)

    def pipeline_environment(self) -> dict[str, str]:
        """The environment every function and job of the stack runs with."""
        return SETTINGS.environment(bucket=self.pipeline.bucket, table=self.pipeline.table,
                                    topic_arn=self.pipeline.topic_arn)

    # ------------------------------------------------------------------ state between cases

    def reset(self) -> None:
        """An empty table and bucket, and no notification left unread."""
        keys = [{"DeleteRequest": {"Key": {"pk": i["pk"], "sk": i["sk"]}}} for i in self.items()]
        for start in range(0, len(keys), 25):
            self.ddb.batch_write_item(RequestItems={self.pipeline.table: keys[start:start + 25]})
        bucket = self.pipeline.bucket
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            if page.get("Contents"):
                self.s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": o["Key"]} for o in page["Contents"]]})
        offline.notifications(self.pipeline)
        # Nothing queued for the starter either (the trigger item went with the table's items).
        self.drop_queued()

    def drop_queued(self) -> None:
        """Delete what waits in the upload queue (PurgeQueue is allowed once a minute only)."""
        sqs = boto3.client("sqs", region_name=self.pipeline.region)
        while messages := sqs.receive_message(QueueUrl=self.pipeline.upload_queue_url,
                                              MaxNumberOfMessages=10).get("Messages", []):
            for message in messages:
                sqs.delete_message(QueueUrl=self.pipeline.upload_queue_url, ReceiptHandle=message["ReceiptHandle"])

    def seed_live_version(self, users: list[str]) -> str:
        rows = [store.Recommendation(u, list(SEEDED_ITEMS), [2.0, 1.0]) for u in users]
        store.write_recommendations(self.pipeline.table, SEEDED_VERSION, rows, expires_at=int(time.time()) + 86400,
                                    client=self.ddb)
        assert store.publish_version(self.pipeline.table, SEEDED_VERSION, users=len(users), client=self.ddb)
        return SEEDED_VERSION

    # ------------------------------------------------------------------ what readers see

    def pointer(self) -> str | None:
        return store.active_version(self.pipeline.table, client=self.ddb)

    def view(self, users: list[str]) -> dict[str, Any]:
        """What a reader gets: the pointer, and each user's recommendations through it."""
        return {"pointer": self.pointer(),
                **{u: store.get_recommendations(self.pipeline.table, u, client=self.ddb) for u in users}}

    def items(self) -> list[dict[str, Any]]:
        found, start = [], None
        while True:
            reply = self.ddb.scan(TableName=self.pipeline.table, ConsistentRead=True,
                                  **({"ExclusiveStartKey": start} if start else {}))
            found.extend(reply["Items"])
            start = reply.get("LastEvaluatedKey")
            if not start:
                return found

    def versions(self) -> dict[str, int]:
        """User items per version."""
        counts: dict[str, int] = {}
        for item in self.items():
            if item["pk"]["S"].startswith("user#"):
                counts[item["version"]["S"]] = counts.get(item["version"]["S"], 0) + 1
        return counts

    def run_json(self, run_id: str, name: str) -> dict[str, Any]:
        body = self.s3.get_object(Bucket=self.pipeline.bucket, Key=f"runs/{run_id}/{name}")["Body"].read()
        return json.loads(body)

    def run_prefixes(self) -> set[str]:
        reply = self.s3.list_objects_v2(Bucket=self.pipeline.bucket, Prefix="runs/", Delimiter="/")
        return {p["Prefix"].split("/")[1] for p in reply.get("CommonPrefixes", [])}


@contextmanager
def deployed(settings: offline.LocalSettings = SETTINGS) -> Iterator[Stack]:
    clock = offline.ManualClock()
    with offline.offline(lambda_clock=clock):
        pipeline = offline.deploy(settings)
        yield Stack(pipeline, boto3.client("s3"), boto3.client("dynamodb"), clock)


class Reader:
    """A reader polling the table while runs go on: every version the pointer named, and every version
    whose items it was served. Use as a context manager around the runs."""

    def __init__(self, stack: Stack, users: list[str]) -> None:
        self.table, self.users = stack.pipeline.table, users[:5]
        self.ddb = boto3.client("dynamodb")
        self.pointers: list[str | None] = []
        self.served: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while True:
            finished = self._stop.is_set()
            pointer = store.active_version(self.table, client=self.ddb)
            self.pointers.append(pointer)
            if pointer is not None:
                for user in self.users:
                    reply = self.ddb.get_item(TableName=self.table, Key=store.user_key(user, pointer))
                    if "Item" in reply:
                        self.served.add(reply["Item"]["version"]["S"])
            if finished:
                return
            time.sleep(0.02)

    def __enter__(self) -> Reader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def never_went_back(self) -> bool:
        named = [p for p in self.pointers if p is not None]
        return named == sorted(named)
