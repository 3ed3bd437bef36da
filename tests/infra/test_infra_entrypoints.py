"""The thin entry points: Lambda handlers and Batch mains parse their input and call one topx.aws.stages function.

``topx.aws.stages`` is replaced by a recording fake, so these tests check only the parsing layer: which
stage is called with which arguments, env fallbacks, and the errors a malformed event gets; and what the
entry points say about it: JSON log lines carrying the run id, CloudWatch metrics in EMF lines on stdout.
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from topx.errors import InputDataError

BUCKET, TABLE, RUN = "data-bucket", "recs-table", "run-0001"


@dataclass(frozen=True)
class LambdaContext:
    """The attributes of the Lambda runtime's context that Powertools' Logger reads."""

    function_name: str = "topx-publish"
    memory_limit_in_mb: int = 1024
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:topx-publish"
    aws_request_id: str = "request-1"


CONTEXT = LambdaContext()


class FakeStages(types.ModuleType):
    """Records each call; returns canned replies shaped like the real stages'."""

    def __init__(self) -> None:
        super().__init__("topx.aws.stages")
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.replies: dict[str, Any] = {
            "prepare_run": {
                "run_id": RUN,
                "bucket": BUCKET,
                "shards": 3,
                "shard_ids": [0, 1, 2],
                "n_users": 10,
                "n_items": 5,
                "n_interactions": 40,
            },
            "quality_gate": {"passed": True, "reason": "ok", "metrics": {"auc": 0.9}},
            "repackage_run": {"item_vectors": f"s3://{BUCKET}/runs/{RUN}/vectors/items.npy"},
            "load_shard": {"shard": 1, "written": 7},
            "publish_version": {"run_id": RUN, "published": True, "users": 21, "already_live": False,
                                "report": f"s3://{BUCKET}/runs/{RUN}/report.html",
                                "quality": {"x": 10, "recall_at_x": 0.25, "lift_over_popularity": 1.6}},
            "train_run": {"run_id": RUN, "best_epoch": 6, "epochs_run": 9, "device": "cpu"},
            "search_shard": {"shard": 2, "users": 4, "rows": 40},
        }
        for name in self.replies:
            setattr(self, name, self._recorder(name))

    def _recorder(self, name: str) -> Any:
        def call(*args: Any) -> Any:
            self.calls.append((name, args))
            reply = self.replies[name]
            if isinstance(reply, Exception):
                raise reply
            return reply

        return call


@pytest.fixture
def stages(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeStages]:
    fake = FakeStages()
    monkeypatch.setitem(sys.modules, "topx.aws.stages", fake)
    import topx.aws

    monkeypatch.setattr(topx.aws, "stages", fake, raising=False)
    for name in ("functions.handlers", "batch_jobs.train.main", "batch_jobs.search.main"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    for name in ("TOPX_BUCKET", "TOPX_TABLE", "TOPX_SHARDS", "AWS_BATCH_JOB_ARRAY_INDEX"):
        monkeypatch.delenv(name, raising=False)
    yield fake
    for name in ("functions.handlers", "batch_jobs.train.main", "batch_jobs.search.main"):
        sys.modules.pop(name, None)


def _handlers() -> Any:
    return importlib.import_module("functions.handlers")


# --- Lambda handlers -------------------------------------------------------------------------------


def test_prepare_passes_bucket_and_key_and_returns_the_run(stages: FakeStages) -> None:
    result = _handlers().prepare({"bucket": BUCKET, "key": "incoming/plays.csv"}, CONTEXT)
    assert stages.calls == [("prepare_run", (BUCKET, "incoming/plays.csv", None))]
    assert result == stages.replies["prepare_run"]


def test_prepare_takes_null_key_and_bucket_from_the_environment(
    stages: FakeStages, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOPX_BUCKET", "env-bucket")
    _handlers().prepare({"key": None}, CONTEXT)
    _handlers().prepare({"bucket": BUCKET, "key": None}, CONTEXT)
    assert stages.calls == [("prepare_run", ("env-bucket", None, None)), ("prepare_run", (BUCKET, None, None))]


def test_prepare_passes_the_uploads_the_starter_listed(stages: FakeStages) -> None:
    handlers = _handlers()
    uploads = [{"path": "incoming/day=2/", "objects": 501}]
    handlers.prepare({"bucket": BUCKET, "key": None, "uploads": uploads}, CONTEXT)
    assert stages.calls == [("prepare_run", (BUCKET, None, uploads))]
    with pytest.raises(handlers.EventError, match="'uploads'"):
        handlers.prepare({"bucket": BUCKET, "key": None, "uploads": ["incoming/a.csv"]}, CONTEXT)


def test_prepare_refuses_a_run_the_state_machine_cannot_fan_out(stages: FakeStages) -> None:
    handlers = _handlers()
    stages.replies["prepare_run"] = {**stages.replies["prepare_run"], "shards": 1, "shard_ids": [0]}
    with pytest.raises(handlers.EventError, match="'shards'"):
        handlers.prepare({"bucket": BUCKET, "key": None}, CONTEXT)
    stages.replies["prepare_run"] = {**stages.replies["prepare_run"], "shards": 2, "shard_ids": [0, 2]}
    with pytest.raises(handlers.EventError, match="shard_ids"):
        handlers.prepare({"bucket": BUCKET, "key": None}, CONTEXT)


def test_quality_gate_load_and_publish_call_their_stage(stages: FakeStages) -> None:
    handlers = _handlers()
    run = {"bucket": BUCKET, "run_id": RUN, "table": TABLE}
    assert handlers.quality_gate(run, CONTEXT)["passed"] is True
    assert handlers.repackage({"bucket": BUCKET, "run_id": RUN}, CONTEXT) == stages.replies["repackage_run"]
    assert handlers.load_shard({**run, "shard": 1}, CONTEXT) == {"shard": 1, "written": 7}
    assert handlers.publish({**run, "expected_shards": 3}, CONTEXT) == stages.replies["publish_version"]
    assert stages.calls == [
        ("quality_gate", (BUCKET, RUN, TABLE)),
        ("repackage_run", (BUCKET, RUN)),
        ("load_shard", (BUCKET, RUN, 1, TABLE)),
        ("publish_version", (BUCKET, RUN, TABLE, 3)),
    ]


def test_event_values_win_over_the_environment(stages: FakeStages, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOPX_BUCKET", "env-bucket")
    monkeypatch.setenv("TOPX_TABLE", "env-table")
    handlers = _handlers()
    handlers.load_shard({"run_id": RUN, "shard": 0}, CONTEXT)
    handlers.load_shard({"bucket": BUCKET, "run_id": RUN, "shard": 0, "table": TABLE}, CONTEXT)
    assert stages.calls == [
        ("load_shard", ("env-bucket", RUN, 0, "env-table")),
        ("load_shard", (BUCKET, RUN, 0, TABLE)),
    ]


@pytest.mark.parametrize(
    ("handler", "event", "message"),
    [
        ("quality_gate", {"bucket": BUCKET, "table": TABLE}, "'run_id'"),
        ("load_shard", {"bucket": BUCKET, "run_id": RUN, "table": TABLE}, "'shard'"),
        ("load_shard", {"bucket": BUCKET, "run_id": RUN, "table": TABLE, "shard": -1}, "'shard'"),
        ("load_shard", {"bucket": BUCKET, "run_id": RUN, "shard": 0}, "TOPX_TABLE"),
        (
            "publish",
            {"bucket": BUCKET, "run_id": RUN, "table": TABLE, "expected_shards": True},
            "expected_shards",
        ),
        ("repackage", {"run_id": RUN}, "TOPX_BUCKET"),
        ("repackage", {"bucket": BUCKET, "run_id": ""}, "'run_id'"),
        ("prepare", ["not", "an", "object"], "JSON object"),
    ],
)
def test_malformed_events_fail_with_the_field_named(
    stages: FakeStages, handler: str, event: Any, message: str
) -> None:
    handlers = _handlers()
    with pytest.raises(handlers.EventError, match=message):
        getattr(handlers, handler)(event, CONTEXT)
    assert stages.calls == []


def test_stage_errors_propagate_under_their_own_name(stages: FakeStages) -> None:
    """Step Functions matches Retry/Catch on the exception's class name, so handlers must not wrap it."""
    stages.replies["prepare_run"] = InputDataError(
        "bad id", source="incoming/plays.csv", row=3, column="user_id"
    )
    with pytest.raises(InputDataError, match="row 3"):
        _handlers().prepare({"bucket": BUCKET, "key": "incoming/plays.csv"}, CONTEXT)


# --- Batch mains -----------------------------------------------------------------------------------


def test_train_main_calls_train_run(stages: FakeStages, capsys: pytest.CaptureFixture[str]) -> None:
    main = importlib.import_module("batch_jobs.train.main").main
    assert main(["--bucket", BUCKET, "--run-id", RUN]) == 0
    assert stages.calls == [("train_run", (BUCKET, RUN))]
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == stages.replies["train_run"]


def test_train_main_returns_2_on_a_topx_error(stages: FakeStages, capsys: pytest.CaptureFixture[str]) -> None:
    main = importlib.import_module("batch_jobs.train.main").main
    stages.replies["train_run"] = InputDataError("no prepared data", source=f"runs/{RUN}/prepared/")
    assert main(["--bucket", BUCKET, "--run-id", RUN]) == 2
    assert "no prepared data" in capsys.readouterr().err


def test_train_main_names_an_unfilled_batch_parameter(
    stages: FakeStages, capsys: pytest.CaptureFixture[str]
) -> None:
    main = importlib.import_module("batch_jobs.train.main").main
    assert main(["--bucket", BUCKET, "--run-id", "Ref::run_id"]) == 2
    assert "'run_id'" in capsys.readouterr().err
    assert stages.calls == []


def test_search_main_takes_the_shard_from_the_array_index(
    stages: FakeStages, monkeypatch: pytest.MonkeyPatch
) -> None:
    main = importlib.import_module("batch_jobs.search.main").main
    monkeypatch.setenv("AWS_BATCH_JOB_ARRAY_INDEX", "2")
    assert main(["--bucket", BUCKET, "--run-id", RUN, "--shards", "4"]) == 0
    assert main(["--bucket", BUCKET, "--run-id", RUN, "--shards", "4", "--shard", "0"]) == 0
    assert stages.calls == [("search_shard", (BUCKET, RUN, 2, 4)), ("search_shard", (BUCKET, RUN, 0, 4))]


@pytest.mark.parametrize(
    ("argv", "index", "message"),
    [
        (["--shards", "4"], None, "AWS_BATCH_JOB_ARRAY_INDEX"),
        (["--shards", "4"], "4", "outside 0..3"),
        (["--shards", "Ref::shards"], "0", "'shards'"),
    ],
)
def test_search_main_rejects_a_bad_shard_plan(
    stages: FakeStages,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    index: str | None,
    message: str,
) -> None:
    main = importlib.import_module("batch_jobs.search.main").main
    if index is not None:
        monkeypatch.setenv("AWS_BATCH_JOB_ARRAY_INDEX", index)
    assert main(["--bucket", BUCKET, "--run-id", RUN, *argv]) == 2
    assert message in capsys.readouterr().err
    assert stages.calls == []


# --- logs and metrics ------------------------------------------------------------------------------


def _lines(out: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(log records, EMF documents) of what an entry point printed; every line must be JSON."""
    parsed = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [p for p in parsed if "_aws" not in p], [p for p in parsed if "_aws" in p]


def _metrics(document: dict[str, Any]) -> dict[str, Any]:
    """One EMF document's metrics by name -> (value, unit), after checking it declares them as CloudWatch
    reads EMF: in the namespace topx, with exactly the dimensions service and stage, each one present."""
    (directive,) = document["_aws"]["CloudWatchMetrics"]
    assert directive["Namespace"] == "topx"
    assert [sorted(dimensions) for dimensions in directive["Dimensions"]] == [["service", "stage"]]
    assert {"service", "stage"} <= set(document)
    return {m["Name"]: (document[m["Name"]], m["Unit"]) for m in directive["Metrics"]}


def test_a_handler_logs_json_whose_correlation_id_is_the_run_id(
        stages: FakeStages, capsys: pytest.CaptureFixture[str]) -> None:
    handlers = _handlers()
    handlers.quality_gate({"bucket": BUCKET, "run_id": RUN, "table": TABLE}, CONTEXT)
    logs, _ = _lines(capsys.readouterr().out)
    assert [record["message"] for record in logs] == ["quality_gate", "quality_gate done"]
    for record in logs:
        assert record["correlation_id"] == RUN and record["level"] == "INFO" and record["service"] == "topx"
        assert record["function_request_id"] == CONTEXT.aws_request_id
    assert logs[0]["event"] == {"bucket": BUCKET, "run_id": RUN, "table": TABLE}
    assert logs[1]["result"] == stages.replies["quality_gate"]


def test_prepare_s_lines_carry_the_run_it_minted_and_the_next_invocation_starts_clean(
        stages: FakeStages, capsys: pytest.CaptureFixture[str]) -> None:
    handlers = _handlers()
    handlers.prepare({"bucket": BUCKET, "key": None}, CONTEXT)
    stages.replies["prepare_run"] = InputDataError("bad id", source="incoming/plays.csv", row=3, column="user_id")
    with pytest.raises(InputDataError):
        handlers.prepare({"bucket": BUCKET, "key": None}, CONTEXT)
    logs, _ = _lines(capsys.readouterr().out)
    assert [(r["message"], r.get("correlation_id")) for r in logs] == [
        ("prepare", None), ("prepare done", RUN), ("prepare", None), ("prepare failed", None)]
    assert logs[-1]["level"] == "ERROR" and "row 3" in logs[-1]["exception"]


def test_a_handler_emits_its_duration_or_its_failure_under_its_stage(
        stages: FakeStages, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "TopxStaging")
    handlers = _handlers()
    handlers.load_shard({"bucket": BUCKET, "run_id": RUN, "shard": 1, "table": TABLE}, CONTEXT)
    with pytest.raises(handlers.EventError):
        handlers.load_shard({"bucket": BUCKET, "run_id": RUN, "table": TABLE}, CONTEXT)
    logs, documents = _lines(capsys.readouterr().out)
    assert [(d["service"], d["stage"]) for d in documents] == [("TopxStaging", "load_shard")] * 2
    assert all(record["service"] == "TopxStaging" for record in logs)
    done, failed = (_metrics(d) for d in documents)
    assert set(done) == {"StageSeconds"} and done["StageSeconds"][1] == "Seconds"
    assert done["StageSeconds"][0][0] >= 0
    assert failed == {"StageFailures": ([1.0], "Count")}
    # A run id is never a dimension: it is in the logs, not in the metrics.
    assert all(RUN not in json.dumps(d) for d in documents)


def test_publish_emits_the_users_it_published_and_the_model_s_quality(
        stages: FakeStages, capsys: pytest.CaptureFixture[str]) -> None:
    _handlers().publish({"bucket": BUCKET, "run_id": RUN, "table": TABLE, "expected_shards": 3}, CONTEXT)
    _, (document,) = _lines(capsys.readouterr().out)
    published = _metrics(document)
    assert published["UsersPublished"] == ([21.0], "Count")
    assert published["RecallAtX"] == ([0.25], "None") and published["LiftOverPopularity"] == ([1.6], "None")
    assert set(published) == {"UsersPublished", "RecallAtX", "LiftOverPopularity", "StageSeconds"}
    assert document["stage"] == "publish" and document["x"] == 10  # x is metadata: no dimension


def test_publish_of_a_run_without_a_hold_out_emits_no_quality(
        stages: FakeStages, capsys: pytest.CaptureFixture[str]) -> None:
    stages.replies["publish_version"] = {**stages.replies["publish_version"], "quality": {"x": 10}}
    _handlers().publish({"bucket": BUCKET, "run_id": RUN, "table": TABLE, "expected_shards": 3}, CONTEXT)
    _, (document,) = _lines(capsys.readouterr().out)
    assert set(_metrics(document)) == {"UsersPublished", "StageSeconds"}


def test_the_train_job_emits_its_duration_and_epochs_or_its_failure(
        stages: FakeStages, capsys: pytest.CaptureFixture[str]) -> None:
    main = importlib.import_module("batch_jobs.train.main").main
    assert main(["--bucket", BUCKET, "--run-id", RUN]) == 0
    stages.replies["train_run"] = InputDataError("no prepared data", source=f"runs/{RUN}/prepared/")
    assert main(["--bucket", BUCKET, "--run-id", RUN]) == 2
    _, documents = _lines(capsys.readouterr().out)
    done, failed = (_metrics(d) for d in documents)
    assert [d["stage"] for d in documents] == ["train", "train"]
    assert done["TrainEpochs"] == ([9.0], "Count") and done["StageSeconds"][0][0] >= 0
    assert failed == {"StageFailures": ([1.0], "Count")}


def test_a_search_shard_emits_its_users_and_a_crash_counts_as_a_failure(
        stages: FakeStages, capsys: pytest.CaptureFixture[str]) -> None:
    main = importlib.import_module("batch_jobs.search.main").main
    assert main(["--bucket", BUCKET, "--run-id", RUN, "--shards", "4", "--shard", "2"]) == 0
    stages.replies["search_shard"] = MemoryError("out of memory")
    with pytest.raises(MemoryError):
        main(["--bucket", BUCKET, "--run-id", RUN, "--shards", "4", "--shard", "2"])
    out = capsys.readouterr().out
    documents = [json.loads(line) for line in out.splitlines() if line.startswith('{"_aws"')]
    done, crashed = (_metrics(d) for d in documents)
    assert [d["stage"] for d in documents] == ["search", "search"]
    assert done["SearchedUsers"] == ([4.0], "Count") and set(done) == {"SearchedUsers", "StageSeconds"}
    assert crashed == {"StageFailures": ([1.0], "Count")}


# --- the compute health check ----------------------------------------------------------------------


class _Batch:
    """DescribeComputeEnvironments as AWS Batch answers it, for environments in given states."""

    def __init__(self, environments: list[dict[str, str]]) -> None:
        self.environments = environments
        self.asked: list[list[str]] = []

    def describe_compute_environments(self, computeEnvironments: list[str]) -> dict[str, Any]:  # noqa: N803
        self.asked.append(computeEnvironments)
        return {"computeEnvironments": [e for e in self.environments
                                        if {e["computeEnvironmentArn"], e["computeEnvironmentName"]} & set(computeEnvironments)]}


def _environment(name: str, status: str = "VALID", state: str = "ENABLED", reason: str = "") -> dict[str, str]:
    return {"computeEnvironmentName": name, "status": status, "state": state, "statusReason": reason,
            "computeEnvironmentArn": f"arn:aws:batch:us-east-1:123456789012:compute-environment/{name}"}


def test_the_health_check_counts_invalid_and_missing_environments_and_reports_disabled_ones_apart() -> None:
    from topx.aws import health

    batch = _Batch([_environment("gpu", "INVALID", reason="CLIENT_ERROR - the service role is gone"),
                    _environment("cpu"), _environment("spare", state="DISABLED")])
    checked = health.check_compute_environments(
        [_environment("gpu")["computeEnvironmentArn"], "cpu", "spare", "deleted"], batch)
    assert checked.as_dict() == {"unhealthy": 2, "healthy": ["cpu"], "disabled": ["spare"], "missing": ["deleted"],
                                 "invalid": [{"name": "gpu", "reason": "CLIENT_ERROR - the service role is gone"}]}
    assert len(batch.asked) == 1  # one call for all of them
    with pytest.raises(health.ConfigError, match="names no compute environment"):
        health.compute_environments(" , ")


def test_the_compute_health_handler_emits_the_count_and_logs_each_bad_environment(
        stages: FakeStages, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    batch = _Batch([_environment("gpu", "INVALID", reason="CLIENT_ERROR - no such subnet"), _environment("cpu")])
    monkeypatch.setattr(boto3, "client", lambda service, *a, **k: batch if service == "batch" else None)
    monkeypatch.setenv("TOPX_COMPUTE_ENVIRONMENTS", ",".join(e["computeEnvironmentArn"] for e in batch.environments))
    reply = _handlers().compute_health({"source": "aws.events", "detail-type": "Scheduled Event"}, CONTEXT)
    assert reply["unhealthy"] == 1 and reply["healthy"] == ["cpu"]
    logs, (document,) = _lines(capsys.readouterr().out)
    assert _metrics(document)["ComputeEnvironmentsUnhealthy"] == ([1.0], "Count")
    assert document["stage"] == "compute_health"
    (error,) = [record for record in logs if record["level"] == "ERROR"]
    assert error["message"] == "compute environment gpu is INVALID: CLIENT_ERROR - no such subnet"
    # All well: the count is 0 (the alarm sees a value, not missing data), and nothing is logged as an error.
    batch.environments[0] = _environment("gpu")
    assert _handlers().compute_health({}, CONTEXT)["unhealthy"] == 0
    logs, (document,) = _lines(capsys.readouterr().out)
    assert _metrics(document)["ComputeEnvironmentsUnhealthy"] == ([0.0], "Count")
    assert not [record for record in logs if record["level"] == "ERROR"]
