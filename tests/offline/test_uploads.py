"""The upload side of the data contract, offline end to end: exports as warehouses write them, increments
on top of history, snapshots that replace it, and one run per burst, one run at a time.

Uploads go to S3; moto's EventBridge queues them; ``offline.deliver_uploads`` closes the batching window
and hands the queue to the starter, which starts executions of the real state machine. Nothing waits on
the clock: a run is held in Prepare by an event the test sets, so "a burst during a run" is a burst during
a run whatever the machine's speed.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pandas as pd
import pytest
from reliability_stack import base_ratings

from topx import offline
from topx.cli import main
from topx.contract import run_record_key

SETTINGS = offline.LocalSettings(top_x=4, num_factors=8, epochs=2, shards=2)
# The columns a warehouse names, and the dataset configuration that maps them (config/dataset.json).
WAREHOUSE = {"user_id": "customer_id", "item_id": "sku", "rating": "quantity"}
DATASET = {"user_col": "customer_id", "item_col": "sku", "rating_col": "quantity", "time_col": "event_ts"}


class Uploads:
    def __init__(self, pipeline: offline.LocalPipeline) -> None:
        self.pipeline = pipeline
        self.s3 = boto3.client("s3")
        self.sfn = boto3.client("stepfunctions")

    def put(self, key: str, body: bytes) -> None:
        self.s3.put_object(Bucket=self.pipeline.bucket, Key=key, Body=body)

    def export(self, folder: str, frame: pd.DataFrame, parts: int) -> None:
        """A Spark-style export: part files in partition folders, checksum files, the _SUCCESS marker last."""
        for index in range(parts):
            chunk = frame.iloc[index::parts]
            partition = f"region={'eu' if index % 2 else 'us'}"
            name = f"part-{index:05d}-c000.csv"
            self.put(f"{folder}/{partition}/{name}", chunk.to_csv(index=False).encode())
            self.put(f"{folder}/{partition}/.{name}.crc", b"\x00crc")
        self.put(f"{folder}/_SUCCESS", b"")

    def executions(self) -> list[dict[str, Any]]:
        return sorted(offline.executions(self.pipeline.state_machine_arn), key=lambda e: e["startDate"])

    def finish(self, arn: str) -> dict[str, Any]:
        described = offline.wait_for_execution(arn, timeout_s=300)
        assert described["status"] == "SUCCEEDED", (described.get("error"), described.get("cause", "")[:800])
        return described

    def prepared(self, arn: str) -> dict[str, Any]:
        """Prepare's reply in an execution that ended, published or not (a quality gate may keep a small
        model from publishing; what the run read is the point here)."""
        described = offline.wait_for_execution(arn, timeout_s=300)
        assert described["status"] == "SUCCEEDED" or described.get("error") == "QualityGateRejected", described
        for event in offline.history(arn):
            if event["type"] == "TaskSucceeded":
                payload = json.loads(event["taskSucceededEventDetails"]["output"]).get("Payload", {})
                if "n_interactions" in payload:
                    return payload
        raise AssertionError(f"{arn}: Prepare did not succeed")

    def run_record(self, run_id: str) -> dict[str, Any]:
        return json.loads(self.s3.get_object(Bucket=self.pipeline.bucket, Key=run_record_key(run_id))["Body"].read())

    def record(self, described: dict[str, Any]) -> dict[str, Any]:
        run_id = json.loads(described["output"])["prepare"]["run_id"]
        return json.loads(self.s3.get_object(Bucket=self.pipeline.bucket, Key=run_record_key(run_id))["Body"].read())


def interactions_in_one_file(frames: list[pd.DataFrame], dataset: dict[str, Any], folder: Path) -> int:
    """How many interactions the same rows make in one file, read by `topx run`'s loader: repeated
    (user, item) pairs across files must count as repeated rows of one file do."""
    from topx.dataset import data_options, load_dataset

    path = folder / "all.csv"
    pd.concat(frames).to_csv(path, index=False)
    return int(len(load_dataset(data_options({**dataset, "interactions": str(path)})).rating))


@pytest.fixture()
def uploads() -> Iterator[Uploads]:
    with offline.offline():
        yield Uploads(offline.deploy(SETTINGS))


def warehouse_frame(n_users: int, n_items: int, seed: int, day: str) -> pd.DataFrame:
    frame = base_ratings(n_users, n_items, seed=seed).rename(columns=WAREHOUSE)
    frame["event_ts"] = f"{day}T12:00:00Z"
    return frame


def test_an_export_is_one_run_and_an_increment_one_more_on_history_and_increment(uploads: Uploads,
                                                                                 tmp_path: Path) -> None:
    uploads.put("config/dataset.json", json.dumps(DATASET).encode())
    day1 = warehouse_frame(120, 60, seed=3, day="2024-05-01")
    uploads.export("incoming/orders/dt=2024-05-01", day1, parts=6)
    assert uploads.executions() == []  # queued until the batching window closes

    first = offline.deliver_uploads(uploads.pipeline)
    # 6 parts, 6 checksums, 1 marker and the dataset configuration: one batch, one full run.
    assert first is not None and first.messages == 14
    (execution,) = uploads.executions()
    assert first.started == execution["executionArn"]
    described = uploads.finish(execution["executionArn"])
    assert json.loads(described["input"])["mode"] == "full"
    assert json.loads(described["input"])["uploads"] == [
        {"path": "config/dataset.json", "objects": 1},
        {"path": "incoming/orders/dt=2024-05-01/_SUCCESS", "objects": 1},
        {"path": "incoming/orders/dt=2024-05-01/region=eu/", "objects": 6},
        {"path": "incoming/orders/dt=2024-05-01/region=us/", "objects": 6},
    ]
    assert json.loads(described["output"])["prepare"]["n_interactions"] == interactions_in_one_file(
        [day1], DATASET, tmp_path)
    record = uploads.record(described)
    assert record["inputs"] == {"snapshot": None, "objects": 6, "bytes": record["inputs"]["bytes"],
                                "newest": record["inputs"]["newest"]}
    assert record["uploads"] == json.loads(described["input"])["uploads"]

    # The run's end comes back through the queue and starts nothing: nothing waits.
    ended = offline.deliver_uploads(uploads.pipeline)
    assert ended is not None and ended.started is None and ended.reply["pending_uploads"] == 0
    assert len(uploads.executions()) == 1

    day2 = warehouse_frame(120, 60, seed=4, day="2024-05-02")
    uploads.export("incoming/orders/dt=2024-05-02", day2, parts=3)
    second = offline.deliver_uploads(uploads.pipeline)
    assert second is not None and second.started is not None
    assert len(uploads.executions()) == 2
    described = uploads.finish(second.started)
    # History plus increment: every row of both days (a pair repeated across files counts as repeated rows do).
    both = interactions_in_one_file([day1, day2], DATASET, tmp_path)
    assert both < len(day1) + len(day2)  # the days share (user, item) pairs, as real increments do
    assert json.loads(described["output"])["prepare"]["n_interactions"] == both
    assert [u["path"] for u in json.loads(described["input"])["uploads"]] == [
        "incoming/orders/dt=2024-05-02/_SUCCESS", "incoming/orders/dt=2024-05-02/region=eu/",
        "incoming/orders/dt=2024-05-02/region=us/"]
    assert uploads.record(described)["inputs"]["objects"] == 9


def test_a_burst_during_a_run_waits_for_it_and_then_gives_exactly_one_more_run(
        uploads: Uploads, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from moto.awslambda_simple.models import LambdaSimpleBackend

    ratings = base_ratings(100, 50, seed=5)
    in_prepare, release = threading.Event(), threading.Event()
    invoke = LambdaSimpleBackend.invoke
    prepare_arn = uploads.pipeline.function_arns["prepare"]

    def held(backend: Any, function_name: str, qualifier: str | None, *rest: Any) -> bytes:
        # Held before the invocation runs: outside the offline runner's one-at-a-time lock, which the
        # starter's own invocations need meanwhile.
        if backend.get_function(function_name, qualifier).function_arn == prepare_arn:
            in_prepare.set()
            assert release.wait(120), "the test never released the run"
        return invoke(backend, function_name, qualifier, *rest)

    monkeypatch.setattr(LambdaSimpleBackend, "invoke", held)
    uploads.put("incoming/day1.csv", ratings.to_csv(index=False).encode())
    first = offline.deliver_uploads(uploads.pipeline)
    assert first is not None and first.started is not None
    assert in_prepare.wait(120)

    # While the first run is in Prepare, two bursts arrive, each closing a batching window.
    for day in ("day2", "day3"):
        uploads.put(f"incoming/{day}/part-00000.csv", ratings.iloc[:50].to_csv(index=False).encode())
        uploads.put(f"incoming/{day}/_SUCCESS", b"")
        waiting = offline.deliver_uploads(uploads.pipeline)
        assert waiting is not None and waiting.started is None and waiting.reply["waiting_for"] == first.started
    assert len(uploads.executions()) == 1, "never two runs at once"

    release.set()
    uploads.finish(first.started)
    after = offline.deliver_uploads(uploads.pipeline)  # the first run's end, through the queue
    assert after is not None and after.started is not None
    runs = uploads.executions()
    assert [e["executionArn"] for e in runs] == [first.started, after.started]
    described = uploads.finish(after.started)
    assert json.loads(described["input"])["uploads"] == [{"path": "incoming/day2/", "objects": 2},
                                                        {"path": "incoming/day3/", "objects": 2}]
    three = [ratings, ratings.iloc[:50], ratings.iloc[:50]]
    assert json.loads(described["output"])["prepare"]["n_interactions"] == interactions_in_one_file(three, {}, tmp_path)
    # Its end starts nothing more.
    last = offline.deliver_uploads(uploads.pipeline)
    assert last is not None and last.started is None and len(uploads.executions()) == 2


def test_a_snapshot_replaces_the_history_without_deleting_it_and_the_window_drops_old_rows(
        uploads: Uploads, tmp_path: Path) -> None:
    old = base_ratings(100, 50, seed=6)
    uploads.put("incoming/history.csv", old.to_csv(index=False).encode())
    uploads.prepared(offline.deliver_uploads(uploads.pipeline).started)

    # A snapshot, with a time column and a 10-day window: rows older than 10 days before the latest go.
    uploads.put("config/dataset.json", json.dumps({"time_col": "ts", "since": 10}).encode())
    snapshot = base_ratings(110, 55, seed=7)
    snapshot["ts"] = ["2024-06-01T00:00:00Z" if i % 4 == 0 else "2024-06-20T00:00:00Z" for i in range(len(snapshot))]
    folder = tmp_path / "export"
    folder.mkdir()
    snapshot.iloc[::2].to_csv(folder / "part-0.csv", index=False)
    snapshot.iloc[1::2].to_csv(folder / "part-1.csv", index=False)
    (folder / "_SUCCESS").write_bytes(b"")
    assert main(["upload", str(folder), "--bucket", uploads.pipeline.bucket, "--snapshot", "2024-06-20"]) == 0
    keys = [o["Key"] for o in uploads.s3.list_objects_v2(Bucket=uploads.pipeline.bucket, Prefix="incoming/")["Contents"]]
    assert "incoming/snapshot=2024-06-20/export/_SUCCESS" in keys and "incoming/history.csv" in keys

    prepared = uploads.prepared(offline.deliver_uploads(uploads.pipeline).started)
    window = {"time_col": "ts", "since": 10}
    kept = interactions_in_one_file([snapshot[snapshot["ts"] == "2024-06-20T00:00:00Z"]], window, tmp_path)
    assert kept < interactions_in_one_file([snapshot], {"time_col": "ts"}, tmp_path)
    assert prepared["n_interactions"] == kept
    assert uploads.run_record(prepared["run_id"])["inputs"]["snapshot"] == "2024-06-20"

    # A later upload adds to the snapshot's history: `topx upload` puts it under the latest snapshot.
    more = tmp_path / "more.csv"
    snapshot.iloc[:10].assign(ts="2024-06-21T00:00:00Z").to_csv(more, index=False)
    assert main(["upload", str(more), "--bucket", uploads.pipeline.bucket]) == 0
    assert "incoming/snapshot=2024-06-20/more.csv" in [
        o["Key"] for o in uploads.s3.list_objects_v2(Bucket=uploads.pipeline.bucket, Prefix="incoming/")["Contents"]]
    prepared = uploads.prepared(offline.deliver_uploads(uploads.pipeline).started)
    assert prepared["n_interactions"] == interactions_in_one_file(
        [snapshot, snapshot.iloc[:10].assign(ts="2024-06-21T00:00:00Z")], window, tmp_path)


def test_topx_offline_runs_the_deployed_pipeline_on_a_users_own_export(tmp_path: Path, capsys,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOPX_EPOCHS", "2")
    monkeypatch.setenv("TOPX_NUM_FACTORS", "8")
    export = tmp_path / "orders"
    frame = warehouse_frame(90, 45, seed=8, day="2024-05-01")
    (export / "dt=2024-05-01").mkdir(parents=True)
    frame.iloc[::2].to_csv(export / "dt=2024-05-01" / "part-00000.csv", index=False)
    frame.iloc[1::2].to_csv(export / "dt=2024-05-01" / "part-00001.csv", index=False)
    (export / "_SUCCESS").write_bytes(b"")
    # The next day's export, in the same layout (its partition folder gives every part the same columns).
    increment = tmp_path / "day2" / "orders"
    (increment / "dt=2024-05-02").mkdir(parents=True)
    warehouse_frame(90, 45, seed=9, day="2024-05-02").to_csv(increment / "dt=2024-05-02" / "part-00000.csv",
                                                              index=False)
    dataset = tmp_path / "dataset.json"
    dataset.write_text(json.dumps(DATASET))

    code = main(["offline", "--upload", str(export), "--upload", str(increment), "--dataset", str(dataset)])

    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0, summary
    assert [e["status"] for e in summary["executions"]] == ["SUCCEEDED", "SUCCEEDED"]
    assert [e["uploads"] for e in summary["executions"]] == [
        [{"path": "incoming/orders/_SUCCESS", "objects": 1}, {"path": "incoming/orders/dt=2024-05-01/", "objects": 2}],
        [{"path": "incoming/orders/dt=2024-05-02/part-00000.csv", "objects": 1}],
    ]
    assert summary["users_published"] == 90


def test_topx_offline_runs_responses_and_a_filter_file_after_the_data_as_refreshes(tmp_path: Path, capsys,
                                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Bursts in the order given: the data (a full run), then responses, then a filter file (a refresh each)."""
    monkeypatch.setenv("TOPX_EPOCHS", "2")
    monkeypatch.setenv("TOPX_NUM_FACTORS", "8")
    base_ratings(60, 30, seed=8).to_csv(tmp_path / "ratings.csv", index=False)
    (tmp_path / "dismissed.csv").write_text("user_id,item_id\nu00001,i00001\n")
    (tmp_path / "filters.json").write_text(json.dumps({"items": {"exclude_ids": ["i00002"]}}))
    code = main(["--quiet", "offline", "--upload", str(tmp_path / "ratings.csv"), "--responses",
                 str(tmp_path / "dismissed.csv"), "--filters", str(tmp_path / "filters.json")])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0, summary
    assert [(e["mode"], e["status"]) for e in summary["executions"]] == [
        ("full", "SUCCEEDED"), ("refresh", "SUCCEEDED"), ("refresh", "SUCCEEDED")]
    assert [e["uploads"] for e in summary["executions"]][1:] == [
        [{"path": "responses/dismissed.csv", "objects": 1}], [{"path": "config/filters.json", "objects": 1}]]
    # A malformed filter file is refused before anything is deployed.
    (tmp_path / "filters.json").write_text("{")
    assert main(["--quiet", "offline", "--upload", str(tmp_path / "ratings.csv"), "--filters",
                 str(tmp_path / "filters.json")]) == 2
    assert "filters.json: the filter file is not valid JSON" in capsys.readouterr().err


def test_topx_offline_shows_why_an_export_would_fail_before_it_is_deployed(tmp_path: Path, capsys,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A loose file beside a partitioned export lacks the partition column: refused, and the JSON says why."""
    monkeypatch.setenv("TOPX_EPOCHS", "2")
    export = tmp_path / "orders" / "dt=2024-05-01"
    export.mkdir(parents=True)
    base_ratings(60, 30, seed=8).to_csv(export / "part-00000.csv", index=False)
    loose = tmp_path / "extra.csv"
    base_ratings(60, 30, seed=9).to_csv(loose, index=False)

    code = main(["--quiet", "offline", "--upload", str(tmp_path / "orders"), "--upload", str(loose)])

    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 1
    first, second = summary["executions"]
    assert first["status"] == "SUCCEEDED" and second["status"] == "FAILED"
    assert "incoming/orders/dt=2024-05-01/part-00000.csv: its columns" in second["cause"]
    assert "the parts of one dataset must have the same columns" in second["cause"]
