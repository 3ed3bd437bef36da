"""The refresh path, offline end to end: a change of the filter file or the responses alone serves the live
model again with them (no training), through the starter and the state machine as deployed.

Uploads go to S3; moto's EventBridge queues them; ``offline.deliver_uploads`` closes the batching window.
Each test first publishes one model by a full run, then changes what a refresh reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
import pytest
from reliability_stack import base_ratings

from topx import offline
from topx.aws import client, stages, store
from topx.cli import main
from topx.contract import run_record_key, vectors_prefix

TOP_X, SHARDS = 4, 2
REFRESH_PATH = ["Defaults", "Mode", "PrepareRefresh", "RefreshChoice", "UseLiveModel", "Repackage", "Search", "Load", "Report",
                "Publish", "NotifySuccess", "Succeed"]


@dataclass
class Deployed:
    pipeline: offline.LocalPipeline
    s3: Any = field(default_factory=lambda: boto3.client("s3"))
    ddb: Any = field(default_factory=lambda: boto3.client("dynamodb"))
    seen: set[str] = field(default_factory=set)

    def put(self, key: str, body: bytes) -> None:
        self.s3.put_object(Bucket=self.pipeline.bucket, Key=key, Body=body)

    def deliver(self) -> list[dict[str, Any]]:
        """Close the batching window; the executions it started, each after it ended, with its history."""
        offline.deliver_uploads(self.pipeline)
        started = [e for e in offline.executions(self.pipeline.state_machine_arn) if e["executionArn"] not in self.seen]
        self.seen.update(e["executionArn"] for e in started)
        described = []
        for execution in started:
            ended = offline.wait_for_execution(execution["executionArn"], timeout_s=300)
            ended["history"] = offline.history(execution["executionArn"])
            described.append(ended)
        # The ends come back through the queue: hand them to the starter, as its next batch would.
        offline.deliver_uploads(self.pipeline)
        return described

    def live(self) -> str | None:
        return store.active_version(self.pipeline.table, client=self.ddb)

    def record(self, run_id: str) -> dict[str, Any]:
        return json.loads(self.s3.get_object(Bucket=self.pipeline.bucket, Key=run_record_key(run_id))["Body"].read())

    def bytes(self, key: str) -> bytes:
        return self.s3.get_object(Bucket=self.pipeline.bucket, Key=key)["Body"].read()

    def lists(self) -> dict[str, list[str]]:
        users = self.record(self.live())["n_users"]
        found = {f"u{u:05d}": client.get_recommendations(f"u{u:05d}", table=self.pipeline.table) for u in range(users)}
        return {user: rec.items for user, rec in found.items() if rec is not None and not rec.fallback}


def exited_states(history: list[dict[str, Any]]) -> list[str]:
    top = set(offline.top_level_states())
    return [e.state for e in offline.state_events(history) if e.outcome == "done" and e.state in top]


@pytest.fixture()
def deployed() -> Iterator[Deployed]:
    with offline.offline():
        yield Deployed(offline.deploy(offline.LocalSettings(top_x=TOP_X, num_factors=8, epochs=2, shards=SHARDS)))


def published(deployed: Deployed) -> str:
    """One full run from an upload under incoming/; its run id, now live."""
    deployed.put("incoming/ratings.csv", base_ratings(120, 60, seed=5).to_csv(index=False).encode())
    (run,) = deployed.deliver()
    assert run["status"] == "SUCCEEDED", (run.get("error"), run.get("cause", "")[:800])
    assert json.loads(run["input"])["mode"] == "full" and "Train" in exited_states(run["history"])
    return json.loads(run["output"])["prepare"]["run_id"]


def test_responses_alone_refresh_the_live_model_without_training_and_rollback_still_works(
        deployed: Deployed, capsys: pytest.CaptureFixture[str]) -> None:
    model_run = published(deployed)
    before = deployed.lists()
    user, dismissed = sorted(before.items())[0][0], sorted(before.items())[0][1][0]

    deployed.put("responses/2024-05-02.csv", f"user_id,item_id\n{user},{dismissed}\n".encode())
    (refresh,) = deployed.deliver()

    assert refresh["status"] == "SUCCEEDED", (refresh.get("error"), refresh.get("cause", "")[:800])
    assert refresh["name"].startswith("refresh-")
    assert json.loads(refresh["input"]) == {"bucket": deployed.pipeline.bucket, "key": None, "mode": "refresh",
                                            "uploads": [{"path": "responses/2024-05-02.csv", "objects": 1}]}
    assert exited_states(refresh["history"]) == REFRESH_PATH  # no Train, no QualityGate
    run_id = json.loads(refresh["output"])["prepare"]["run_id"]
    assert deployed.live() == run_id != model_run
    record = deployed.record(run_id)
    assert record["refresh"] == {"model_run": model_run, "live": model_run}
    assert record["filters"]["responses"] == 1
    # The model is the live one: the vectors searched are the trained run's, byte for byte.
    for name in ("item_vectors.npy", "shard=0000/user_vectors.npy", "shard=0001/user_vectors.npy"):
        assert deployed.bytes(vectors_prefix(run_id) + name) == deployed.bytes(vectors_prefix(model_run) + name)
    after = deployed.lists()
    assert dismissed in before[user] and dismissed not in after[user] and len(after[user]) == TOP_X
    # The others' lists are what the same model gave them.
    assert {u: items for u, items in after.items() if u != user} == {u: items for u, items in before.items()
                                                                     if u != user}
    (_, note) = offline.notifications(deployed.pipeline)
    assert note.subject == "topx: new recommendations published" and run_id in note.message

    assert main(["status", "--state-machine-arn", deployed.pipeline.state_machine_arn,
                 "--table", deployed.pipeline.table]) == 0
    shown = capsys.readouterr().out
    assert f"{refresh['name']}  (refresh: the live model with the current filters and responses)" in shown
    assert "covers responses/2024-05-02.csv" in shown and f"live version: {run_id}" in shown

    # A refresh is a version as any other: rolling back returns to the trained run's lists.
    back = stages.rollback_version(deployed.pipeline.bucket, deployed.pipeline.table)
    assert back["version"] == model_run and deployed.live() == model_run
    assert deployed.lists() == before


def test_a_bad_filter_rule_fails_the_refresh_before_any_search_and_nothing_live_changes(deployed: Deployed) -> None:
    model_run = published(deployed)
    before = deployed.lists()

    deployed.put("config/filters.json", json.dumps({"items": {"exclude": [{"column": "kind", "like": "x"}]}}).encode())
    (refresh,) = deployed.deliver()

    assert refresh["status"] == "FAILED" and json.loads(refresh["input"])["mode"] == "refresh"
    assert exited_states(refresh["history"]) == ["Defaults", "Mode", "PrepareRefresh", "NotifyFailure"]
    (_, note) = offline.notifications(deployed.pipeline)
    assert note.subject == "topx: pipeline run failed"
    assert "config/filters.json: items.exclude[0]: a rule takes exactly one operator" in note.message
    assert deployed.live() == model_run and deployed.lists() == before
    runs = deployed.s3.list_objects_v2(Bucket=deployed.pipeline.bucket, Prefix="runs/", Delimiter="/")
    assert [p["Prefix"] for p in runs["CommonPrefixes"]] == [f"runs/{model_run}/"]  # nothing of the refresh written


def test_a_new_filter_file_refreshes_every_list_and_each_list_s_fallback(deployed: Deployed) -> None:
    """A filter file with a named list, after a run that had none: the refresh serves the default list and
    the new one, and a user the model has not seen gets each list's own fallback list, x long."""
    published(deployed)
    before = deployed.lists()
    popular = client.get_recommendations("nobody", table=deployed.pipeline.table).items
    deployed.put("config/filters.json", json.dumps({"items": {"exclude_ids": [popular[0]]},
                                                    "lists": {"no-top": {"exclude_ids": popular[:3]}}}).encode())
    (refresh,) = deployed.deliver()

    assert refresh["status"] == "SUCCEEDED", (refresh.get("error"), refresh.get("cause", "")[:800])
    assert exited_states(refresh["history"]) == REFRESH_PATH
    after = deployed.lists()
    assert all(popular[0] not in items for items in after.values()) and after != before
    unknown = client.get_recommendations("nobody", table=deployed.pipeline.table)
    assert unknown.fallback and len(unknown.items) == TOP_X and popular[0] not in unknown.items
    named = client.get_recommendations("nobody", table=deployed.pipeline.table, list_name="no-top")
    assert named.fallback and len(named.items) == TOP_X and not set(named.items) & set(popular[:3])
    user = sorted(after)[0]
    assert not set(client.get_recommendations(user, table=deployed.pipeline.table, list_name="no-top").items) & set(
        popular[:3])


def test_responses_with_data_in_the_same_burst_make_a_full_run(deployed: Deployed) -> None:
    published(deployed)
    for day in range(3):
        deployed.put(f"responses/day={day}/part-0.csv", b"user_id,item_id\nu00001,i00001\n")
    deployed.put("incoming/more.csv", base_ratings(120, 60, seed=6).to_csv(index=False).encode())

    (run,) = deployed.deliver()

    assert run["name"].startswith("uploads-") and json.loads(run["input"])["mode"] == "full"
    assert exited_states(run["history"])[:4] == ["Defaults", "Mode", "Prepare", "Train"]
    assert deployed.deliver() == []  # the ended run read every upload: nothing waits


def test_a_refresh_with_nothing_live_becomes_a_full_run(deployed: Deployed) -> None:
    deployed.put("responses/r.csv", b"user_id,item_id\nu00001,i00001\n")

    (run,) = deployed.deliver()

    assert json.loads(run["input"])["mode"] == "refresh"
    # No model to refresh: the full Prepare runs, and fails here only because no data was ever uploaded.
    assert exited_states(run["history"]) == ["Defaults", "Mode", "PrepareRefresh", "RefreshChoice", "Prepare", "NotifyFailure"]
    assert run["status"] == "FAILED" and deployed.live() is None
    (note,) = offline.notifications(deployed.pipeline)
    assert "holds no data to train on" in note.message


def test_an_execution_started_by_hand_with_an_empty_input_is_a_full_run_of_the_data(deployed: Deployed) -> None:
    """Every field of the input has a default (the Defaults state): {} reads the data under incoming/ of the
    functions' bucket, as a full run, and Prepare records no uploads."""
    deployed.put("incoming/ratings.csv", base_ratings(120, 60, seed=5).to_csv(index=False).encode())
    sfn = boto3.client("stepfunctions")
    started = sfn.start_execution(stateMachineArn=deployed.pipeline.state_machine_arn, name="by-hand", input="{}")
    run = offline.wait_for_execution(started["executionArn"], timeout_s=300)
    assert run["status"] == "SUCCEEDED", (run.get("error"), run.get("cause", "")[:800])
    states = exited_states(offline.history(started["executionArn"]))
    assert states[:4] == ["Defaults", "Mode", "Prepare", "Train"] and states[-1] == "Succeed"
    run_id = json.loads(run["output"])["prepare"]["run_id"]
    assert deployed.live() == run_id and deployed.record(run_id)["uploads"] is None
