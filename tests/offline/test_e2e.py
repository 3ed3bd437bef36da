"""Offline end to end: an upload to S3 becomes recommendations in DynamoDB, through the state machine CDK
deploys (statemachine/pipeline.asl.json) running under moto, every step doing its real work (topx.offline).

Nothing here calls a stage by hand: each test drops a file under incoming/ and reads what the execution
left behind: the execution history, the notification, the table.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pandas as pd
import pytest
from reliability_stack import base_ratings

from topx import offline
from topx.aws import client, stages, store
from topx.cli import main

TOP_X, FACTORS, EPOCHS, SHARDS, RETENTION_DAYS = 5, 8, 3, 3, 30
MAIN_PATH = ["Defaults", "Mode", "Prepare", "Train", "QualityGate", "GateChoice", "Repackage", "Search", "Load", "Report", "Publish",
             "NotifySuccess", "Succeed"]


@dataclass
class Offline:
    pipeline: offline.LocalPipeline
    s3: Any
    ddb: Any
    executions_seen: set[str] = field(default_factory=set)

    def upload(self, key: str, body: bytes, **extra: Any) -> dict[str, Any] | None:
        """Put an object and close the upload queue's batching window; return the execution it started (None
        if none), after it ended."""
        self.s3.put_object(Bucket=self.pipeline.bucket, Key=key, Body=body, **extra)
        offline.deliver_uploads(self.pipeline)
        started = [e for e in offline.executions(self.pipeline.state_machine_arn)
                   if e["executionArn"] not in self.executions_seen]
        self.executions_seen.update(e["executionArn"] for e in started)
        assert len(started) <= 1, started
        if not started:
            return None
        described = offline.wait_for_execution(started[0]["executionArn"], timeout_s=300)
        described["history"] = offline.history(started[0]["executionArn"])
        return described


@pytest.fixture()
def stack() -> Iterator[Offline]:
    with offline.offline():
        pipeline = offline.deploy(offline.LocalSettings(top_x=TOP_X, num_factors=FACTORS, epochs=EPOCHS, shards=SHARDS,
                                                      retention_days=RETENTION_DAYS))
        yield Offline(pipeline, boto3.client("s3"), boto3.client("dynamodb"))


@pytest.fixture(scope="module")
def ratings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "ratings.csv"
    base_ratings(150, 80, seed=11).to_csv(path, index=False)
    return path


def exited_states(history: list[dict[str, Any]]) -> list[str]:
    top = set(offline.top_level_states())
    return [e.state for e in offline.state_events(history) if e.outcome == "done" and e.state in top]


def task_events(history: list[dict[str, Any]], state: str) -> list[dict[str, Any]]:
    """The Task* events of one top-level state, in order."""
    found, current = [], None
    for event in history:
        if event["type"].endswith("StateEntered"):
            current = event["stateEnteredEventDetails"]["name"]
        elif event["type"].startswith("Task") and not event["type"].startswith("TaskState") and current == state:
            found.append(event)
    return found


def table_items(ddb: Any, table: str) -> list[dict[str, Any]]:
    items, start = [], None
    while True:
        reply = ddb.scan(TableName=table, ConsistentRead=True, **({"ExclusiveStartKey": start} if start else {}))
        items.extend(reply["Items"])
        start = reply.get("LastEvaluatedKey")
        if not start:
            return items


def seed_live_version(ddb: Any, table: str, users: list[str]) -> str:
    """A version already live before a test's run, as a previous successful run would have left it."""
    version = "20000101T000000000000Z-previous"
    rows = [store.Recommendation(u, ["i-old-1", "i-old-2"], [2.0, 1.0]) for u in users]
    store.write_recommendations(table, version, rows, expires_at=int(time.time()) + 86400, client=ddb)
    assert store.publish_version(table, version, users=len(users), client=ddb)
    return version


# --------------------------------------------------------------------------- the promise


def test_an_upload_becomes_the_recommendations_topx_run_computes(stack: Offline, ratings: Path,
                                                                 tmp_path: Path) -> None:
    execution = stack.upload("incoming/ratings.csv", ratings.read_bytes())

    assert execution is not None and execution["status"] == "SUCCEEDED", execution
    assert json.loads(execution["input"]) == {"bucket": stack.pipeline.bucket, "key": None, "mode": "full",
                                                 "uploads": [{"path": "incoming/ratings.csv", "objects": 1}]}
    assert exited_states(execution["history"]) == MAIN_PATH
    run_id = json.loads(execution["output"])["prepare"]["run_id"]
    assert store.active_version(stack.pipeline.table, client=stack.ddb) == run_id
    metrics = json.loads(stack.s3.get_object(Bucket=stack.pipeline.bucket,
                                             Key=f"runs/{run_id}/metrics.json")["Body"].read())
    # No mode metadata: the upload trains for ranking, as `topx run` does with no mode flag.
    assert (metrics["objective"], metrics["learner"], metrics["top_x"]) == ("ranking", "icd", TOP_X)

    out = tmp_path / "local"
    assert main(["run", "--interactions", str(ratings), "--top-x", str(TOP_X), "--num-factors", str(FACTORS),
                 "--epochs", str(EPOCHS), "--out", str(out), "--quiet"]) == 0
    expected = pd.read_parquet(out / "recommendations.parquet").sort_values(["user_id", "rank"])
    assert expected["user_id"].nunique() == 150
    for user, group in expected.groupby("user_id"):
        rec = client.get_recommendations(user, table=stack.pipeline.table)
        assert rec is not None, user
        assert rec.items == list(group["item_id"]), user
        assert rec.scores == pytest.approx(list(group["score"]), rel=1e-5)

    (note,) = offline.notifications(stack.pipeline)
    assert note.subject == "topx: new recommendations published"
    assert run_id in note.message and "150 users" in note.message
    assert_the_largest_run_fits_one_execution(execution["history"])

    # The run report: under the run's prefix, named by the notification, fetched by `topx report --run-id`.
    uri = f"s3://{stack.pipeline.bucket}/runs/{run_id}/report.html"
    assert f"Report: {uri}." in note.message
    page = tmp_path / "deployed-report.html"
    assert main(["report", "--run-id", run_id, "--bucket", stack.pipeline.bucket, "--out", str(page), "--no-open"]) == 0
    html = page.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and f"topx run {run_id}" in html
    assert 'data-verdict="good"' in html and "The quality gate <b>passed</b>" in html
    assert f'data-metric="recall_at_{TOP_X}" data-value="{json.dumps(metrics[f"recall_at_{TOP_X}"])}"' in html
    assert html.count('class="user"') == 5 and 'data-plot="popularity"' in html and 'data-plot="training"' in html
    assert_an_operator_can_follow_the_run(stack, run_id, metrics)


def log_lines(group: str) -> list[dict[str, Any]]:
    """Every line of a log group in the offline CloudWatch Logs, each parsed as JSON (each must be)."""
    logs = boto3.client("logs")
    lines = []
    for stream in logs.describe_log_streams(logGroupName=group)["logStreams"]:
        events = logs.get_log_events(logGroupName=group, logStreamName=stream["logStreamName"])["events"]
        lines.extend(json.loads(event["message"]) for event in events)
    return lines


def emf_values(lines: list[dict[str, Any]], name: str) -> list[Any]:
    """The values of metric ``name`` in the EMF lines among ``lines``, each with its stage."""
    return [(line["stage"], line[name]) for line in lines if "_aws" in line
            and name in {m["Name"] for d in line["_aws"]["CloudWatchMetrics"] for m in d["Metrics"]}]


def assert_an_operator_can_follow_the_run(stack: Offline, run_id: str, metrics: dict[str, Any]) -> None:
    """What the functions and jobs printed is in CloudWatch Logs, as on AWS: each function's JSON lines carry
    the run id as their correlation id, and the EMF lines hold the metrics the dashboard charts."""
    for handler, arn in stack.pipeline.function_arns.items():
        lines = log_lines(f"/aws/lambda/{arn.rsplit(':', 1)[1]}")
        records = [line for line in lines if "_aws" not in line]
        # Prepare's first line comes before the run id exists; it mints it, and its next line carries it.
        expected = [None, run_id] if handler == "prepare" else [run_id] * len(records)
        assert records and [record.get("correlation_id") for record in records] == expected, handler
        assert {stage for stage, _ in emf_values(lines, "StageSeconds")} == {handler}
    publish = log_lines(f"/aws/lambda/{stack.pipeline.function_arns['publish'].rsplit(':', 1)[1]}")
    assert emf_values(publish, "UsersPublished") == [("publish", [150.0])]
    assert emf_values(publish, "RecallAtX") == [("publish", [metrics[f"recall_at_{TOP_X}"]])]
    assert emf_values(publish, "LiftOverPopularity") == [
        ("publish", [metrics[f"lift_over_popularity_recall_at_{TOP_X}"]])]
    jobs = log_lines("/aws/batch/job")
    assert emf_values(jobs, "TrainEpochs") == [("train", [float(metrics["epochs_run"])])]
    searched = emf_values(jobs, "SearchedUsers")  # one line per search shard
    assert len(searched) == SHARDS and sum(users for _, (users,) in searched) == 150
    assert sorted(stage for stage, _ in emf_values(jobs, "StageSeconds")) == ["search"] * SHARDS + ["train"]


def assert_the_largest_run_fits_one_execution(history: list[dict[str, Any]]) -> None:
    """Measured here, not assumed: the history events each shard's Load iteration adds. With the most
    shards the settings allow, a run's history stays under the execution's limit, with room for the
    other states and a retried load per ten shards."""
    from topx.contract import EXECUTION_HISTORY_LIMIT, MAX_SHARDS

    load = [i for i, e in enumerate(history) if e["type"].endswith("StateEntered")
            and e["stateEnteredEventDetails"]["name"] in ("Load", "Report")]
    inside = history[load[0] + 1:load[1]]
    per_shard = len(inside) / SHARDS
    others = len(history) - len(inside)
    retries = MAX_SHARDS / 10 * 4  # a retried attempt adds its scheduled, started and ended events, and more
    assert per_shard * MAX_SHARDS + others + retries < EXECUTION_HISTORY_LIMIT, (per_shard, others)


# --------------------------------------------------------------------------- publishing is atomic


@dataclass
class Observation:
    pointer: str | None
    complete: bool  # the pointer's version holds every user, each with a full, duplicate-free list
    other_versions: dict[str, int]  # user items under versions the pointer does not name


def watch(ddb: Any, table: str, users: set[str], stop: threading.Event, seen: list[Observation]) -> None:
    """A reader polling while the pipeline runs, and once more after it ended."""
    while True:
        finished = stop.is_set()
        pointer = store.active_version(table, client=ddb)
        by_version: dict[str, dict[str, list[str]]] = {}
        for item in table_items(ddb, table):
            if item["pk"]["S"].startswith("user#"):
                by_version.setdefault(item["version"]["S"], {})[item["user_id"]["S"]] = [
                    v["S"] for v in item["items"]["L"]]
        live = by_version.get(pointer, {}) if pointer else {}
        complete = set(live) == users and all(len(v) == TOP_X and len(set(v)) == TOP_X for v in live.values())
        others = {v: len(u) for v, u in by_version.items() if v != pointer}
        seen.append(Observation(pointer, complete, others))
        if finished:
            return
        time.sleep(0.01)


def test_readers_never_see_a_partial_version_and_a_rerun_changes_nothing(stack: Offline, ratings: Path,
                                                                       monkeypatch) -> None:
    users = set(pd.read_csv(ratings, dtype=str)["user_id"])
    first = stack.upload("incoming/ratings.csv", ratings.read_bytes())
    assert first is not None and first["status"] == "SUCCEEDED"
    first_run = json.loads(first["output"])["prepare"]["run_id"]
    before = {u: client.get_recommendations(u, table=stack.pipeline.table) for u in users}

    # Slow the load down between shards, so the reader surely polls while the new version is half written.
    load_shard = stages.load_shard

    def slow_load_shard(*args: Any) -> dict[str, Any]:
        result = load_shard(*args)
        time.sleep(0.3)
        return result

    monkeypatch.setattr(stages, "load_shard", slow_load_shard)
    stop, seen = threading.Event(), []
    reader = threading.Thread(target=watch, args=(boto3.client("dynamodb"), stack.pipeline.table, users, stop, seen))
    reader.start()
    try:
        second = stack.upload("incoming/ratings.csv", ratings.read_bytes())
    finally:
        stop.set()
        reader.join()

    assert second is not None and second["status"] == "SUCCEEDED"
    second_run = json.loads(second["output"])["prepare"]["run_id"]
    assert second_run != first_run
    assert all(o.complete for o in seen), [o for o in seen if not o.complete][:3]
    assert {o.pointer for o in seen} == {first_run, second_run}
    pointers = [o.pointer for o in seen]
    assert pointers == sorted(pointers), "the pointer went back"
    half_loaded = [o for o in seen if o.pointer == first_run and 0 < o.other_versions.get(second_run, 0) < len(users)]
    assert half_loaded, "the reader never polled during the load"

    # The same upload gives the same recommendations; each (user, version) is one item. Loads write no
    # TTL: the first version, superseded only now, gets one at a later run's load (tests/offline/test_reliability.py).
    after = {u: client.get_recommendations(u, table=stack.pipeline.table) for u in users}
    assert after == before
    items = [i for i in table_items(stack.ddb, stack.pipeline.table) if i["pk"]["S"].startswith("user#")]
    assert len(items) == 2 * len(users)
    assert len({(i["pk"]["S"], i["sk"]["S"]) for i in items}) == len(items)
    for item in items:
        assert item["version"]["S"] in (first_run, second_run) and "expires_at" not in item


# --------------------------------------------------------------------------- failure paths, as the ASL says


def test_a_failing_training_job_runs_once_is_notified_and_the_live_version_stays(
        stack: Offline, ratings: Path, monkeypatch) -> None:
    """A crash of the job itself would crash again: neither Batch's retry strategy (it retries only what
    infrastructure broke) nor the ASL runs it a second time."""
    users = sorted(set(pd.read_csv(ratings, dtype=str)["user_id"]))
    live = seed_live_version(stack.ddb, stack.pipeline.table, users)
    before = client.get_recommendations(users[0], table=stack.pipeline.table)
    attempts = []

    def broken_train(bucket: str, run_id: str) -> dict[str, Any]:
        attempts.append(run_id)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(stages, "train_run", broken_train)
    execution = stack.upload("incoming/ratings.csv", ratings.read_bytes())

    assert execution is not None and execution["status"] == "FAILED"
    assert execution["error"] == "PipelineFailed"
    train = task_events(execution["history"], "Train")
    assert [e["type"] for e in train].count("TaskSubmitted") == 1
    (failure,) = [e["taskFailedEventDetails"] for e in train if e["type"] == "TaskFailed"]
    assert failure["error"] == "States.TaskFailed"
    cause = json.loads(failure["cause"])  # the job as Batch describes it: one attempt, exit status 1
    assert cause["Status"] == "FAILED" and [a["Container"]["ExitCode"] for a in cause["Attempts"]] == [1]
    assert len(attempts) == 1
    assert exited_states(execution["history"]) == ["Defaults", "Mode", "Prepare", "Train", "NotifyFailure"]  # Train left by its Catch

    (note,) = offline.notifications(stack.pipeline)
    assert note.subject == "topx: pipeline run failed"
    assert "States.TaskFailed" in note.message and "stays live" in note.message
    assert store.active_version(stack.pipeline.table, client=stack.ddb) == live
    assert client.get_recommendations(users[0], table=stack.pipeline.table) == before


def test_a_search_child_whose_task_could_not_start_is_run_again_alone_and_the_run_publishes(
        stack: Offline, ratings: Path, monkeypatch) -> None:
    search_shard = stages.search_shard
    calls: list[int] = []

    def flaky_search_shard(bucket: str, run_id: str, shard: int, shards: int) -> dict[str, Any]:
        calls.append(shard)
        if shard == 1 and calls.count(1) == 1:
            raise offline.InfrastructureFailure("ResourceInitializationError: failed to pull secrets or registry auth")
        return search_shard(bucket, run_id, shard, shards)

    monkeypatch.setattr(stages, "search_shard", flaky_search_shard)
    execution = stack.upload("incoming/ratings.csv", ratings.read_bytes())

    assert execution is not None and execution["status"] == "SUCCEEDED"
    search = task_events(execution["history"], "Search")
    assert [e["type"] for e in search] == ["TaskScheduled", "TaskStarted", "TaskSubmitted", "TaskSucceeded"]
    assert sorted(calls) == [0, 1, 1, 2]  # Batch ran child 1 again, and only it
    assert exited_states(execution["history"]) == MAIN_PATH
    run_id = json.loads(execution["output"])["prepare"]["run_id"]
    assert store.active_version(stack.pipeline.table, client=stack.ddb) == run_id
    for user in set(pd.read_csv(ratings, dtype=str)["user_id"]):
        rec = client.get_recommendations(user, table=stack.pipeline.table)
        assert rec is not None and len(rec.items) == TOP_X


def test_only_uploads_under_incoming_start_a_run_and_a_bad_one_fails_in_prepare(stack: Offline) -> None:
    assert stack.upload("features/users.csv", b"user_id,country\nu1,de\n") is None
    assert stack.upload("runs/x/metrics.json", b"{}") is None
    live = seed_live_version(stack.ddb, stack.pipeline.table, ["u1"])

    execution = stack.upload("incoming/bad.csv", b"user_id,item_id,rating\nu1,i1,5\nu1,i2,lots\n")

    assert execution is not None and execution["status"] == "FAILED"
    assert json.loads(execution["input"]) == {"bucket": stack.pipeline.bucket, "key": None, "mode": "full",
                                                 "uploads": [{"path": "incoming/bad.csv", "objects": 1}]}
    prepare = task_events(execution["history"], "Prepare")
    assert [e["type"] for e in prepare].count("TaskScheduled") == 1  # InputDataError is not retried
    (failure,) = [e["taskFailedEventDetails"] for e in prepare if e["type"] == "TaskFailed"]
    assert failure["error"] == "InputDataError"
    assert exited_states(execution["history"]) == ["Defaults", "Mode", "Prepare", "NotifyFailure"]
    (note,) = offline.notifications(stack.pipeline)
    assert note.subject == "topx: pipeline run failed"
    assert "incoming/bad.csv, row 3, column 'rating'" in note.message
    assert store.active_version(stack.pipeline.table, client=stack.ddb) == live


def test_time_cold_entities_the_fallback_and_a_named_list_through_the_state_machine(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With a time column set at deploy and feature tables listing new users and items, one upload gives
    a temporal hold-out, lists for new users (marked cold_user) that may hold new items, and the
    fallback list for an id nobody uploaded; config/filters.json naming a list gives every user that list
    too, read by name."""
    ratings = base_ratings(150, 80, seed=11)
    ratings["ts"] = 1_700_000_000 + ratings.index.to_numpy() * 600
    items = pd.DataFrame({"item_id": sorted(ratings["item_id"].unique()) + ["new-item"]})
    items["kind"] = ["k" + str(len(i) % 3) for i in items["item_id"]]
    users = pd.DataFrame({"user_id": sorted(ratings["user_id"].unique()) + ["new-user"]})
    users["segment"] = ["s" + str(len(u) % 2) for u in users["user_id"]]
    dropped = items["item_id"].tolist()[::2] + ["new-item"]  # what the named list leaves out
    with offline.offline():
        pipeline = offline.deploy(offline.LocalSettings(top_x=TOP_X, num_factors=FACTORS, epochs=EPOCHS,
                                                      shards=SHARDS, time_col="ts"))
        s3, ddb = boto3.client("s3"), boto3.client("dynamodb")
        s3.put_object(Bucket=pipeline.bucket, Key="features/items/items.csv", Body=items.to_csv(index=False).encode())
        s3.put_object(Bucket=pipeline.bucket, Key="features/users/users.csv", Body=users.to_csv(index=False).encode())
        s3.put_object(Bucket=pipeline.bucket, Key="config/filters.json",
                      Body=json.dumps({"lists": {"half": {"exclude_ids": dropped}}}).encode())
        run = Offline(pipeline, s3, ddb).upload("incoming/ratings.csv", ratings.to_csv(index=False).encode())
        assert run is not None and run["status"] == "SUCCEEDED", run
        live = store.active_version(pipeline.table, client=ddb)
        metrics = json.loads(s3.get_object(Bucket=pipeline.bucket, Key=f"versions/{live}/metrics.json")["Body"].read())
        assert metrics["holdout_split"] == "temporal" and metrics["fallback"]["source"] in ("popularity", "model")
        newcomer = client.get_recommendations("new-user", table=pipeline.table)
        assert newcomer.cold_user and not newcomer.fallback and len(newcomer.items) == TOP_X
        stranger = client.get_recommendations("never-seen", table=pipeline.table)
        assert stranger.fallback and len(stranger.items) == TOP_X
        record = json.loads(s3.get_object(Bucket=pipeline.bucket, Key=f"runs/{live}/run.json")["Body"].read())
        assert record["report"]["cold_items"] == 1 and record["report"]["cold_users"] == 1
        # The published metrics count the cold ones and how often the new item made a list.
        lists = [client.get_recommendations(u, table=pipeline.table) for u in users["user_id"]]
        assert metrics["cold"]["items"] == metrics["cold"]["users"] == 1
        assert metrics["cold"]["cold_item_rows"] == sum(rec.items.count("new-item") for rec in lists)
        # The named list ranks as the default one does, over the items it keeps: each user's default list less
        # the items left out begins it, and it is filled to x from further down.
        assert sum(bool(set(rec.items) & set(dropped)) for rec in lists) > len(lists) // 2
        for user, default in zip(users["user_id"], lists, strict=True):
            named = client.get_recommendations(user, list_name="half", table=pipeline.table)
            kept = [i for i in default.items if i not in dropped]
            assert not named.fallback and len(named.items) == TOP_X and named.items[:len(kept)] == kept, user
            assert not set(named.items) & set(dropped), user
        assert main(["recs", "new-user", "--table", pipeline.table, "--list", "half", "--json"]) == 0
        reply = json.loads(capsys.readouterr().out)
        assert reply["list"] == "half" and reply["cold_user"] and not set(reply["items"]) & set(dropped)
        assert main(["recs", "new-user", "--table", pipeline.table, "--list", "summer"]) == 2
        assert f"the live version {live} has no list 'summer' (its lists: half)" in capsys.readouterr().err
