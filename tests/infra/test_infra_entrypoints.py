"""The thin entry points: Lambda handlers and Batch mains parse their input and call one topx.aws.stages function.

``topx.aws.stages`` is replaced by a recording fake, so these tests check only the parsing layer: which
stage is called with which arguments, env fallbacks, and the errors a malformed event gets.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest

from topx.errors import InputDataError

BUCKET, TABLE, RUN = "data-bucket", "recs-table", "run-0001"


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
            "publish_version": {"version": RUN, "items": 21},
            "train_run": {"metrics": f"s3://{BUCKET}/runs/{RUN}/metrics.json"},
            "search_shard": {"shard": 2, "users": 4},
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
    result = _handlers().prepare({"bucket": BUCKET, "key": "incoming/plays.csv"}, None)
    assert stages.calls == [("prepare_run", (BUCKET, "incoming/plays.csv", None))]
    assert result == stages.replies["prepare_run"]


def test_prepare_takes_null_key_and_bucket_from_the_environment(
    stages: FakeStages, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOPX_BUCKET", "env-bucket")
    _handlers().prepare({"key": None}, None)
    _handlers().prepare({"bucket": BUCKET, "key": None}, None)
    assert stages.calls == [("prepare_run", ("env-bucket", None, None)), ("prepare_run", (BUCKET, None, None))]


def test_prepare_passes_the_uploads_the_starter_listed(stages: FakeStages) -> None:
    handlers = _handlers()
    uploads = [{"path": "incoming/day=2/", "objects": 501}]
    handlers.prepare({"bucket": BUCKET, "key": None, "uploads": uploads}, None)
    assert stages.calls == [("prepare_run", (BUCKET, None, uploads))]
    with pytest.raises(handlers.EventError, match="'uploads'"):
        handlers.prepare({"bucket": BUCKET, "key": None, "uploads": ["incoming/a.csv"]}, None)


def test_prepare_refuses_a_run_the_state_machine_cannot_fan_out(stages: FakeStages) -> None:
    handlers = _handlers()
    stages.replies["prepare_run"] = {**stages.replies["prepare_run"], "shards": 1, "shard_ids": [0]}
    with pytest.raises(handlers.EventError, match="'shards'"):
        handlers.prepare({"bucket": BUCKET, "key": None}, None)
    stages.replies["prepare_run"] = {**stages.replies["prepare_run"], "shards": 2, "shard_ids": [0, 2]}
    with pytest.raises(handlers.EventError, match="shard_ids"):
        handlers.prepare({"bucket": BUCKET, "key": None}, None)


def test_quality_gate_load_and_publish_call_their_stage(stages: FakeStages) -> None:
    handlers = _handlers()
    run = {"bucket": BUCKET, "run_id": RUN, "table": TABLE}
    assert handlers.quality_gate(run, None)["passed"] is True
    assert handlers.repackage({"bucket": BUCKET, "run_id": RUN}, None) == stages.replies["repackage_run"]
    assert handlers.load_shard({**run, "shard": 1}, None) == {"shard": 1, "written": 7}
    assert handlers.publish({**run, "expected_shards": 3}, None) == stages.replies["publish_version"]
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
    handlers.load_shard({"run_id": RUN, "shard": 0}, None)
    handlers.load_shard({"bucket": BUCKET, "run_id": RUN, "shard": 0, "table": TABLE}, None)
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
        getattr(handlers, handler)(event, None)
    assert stages.calls == []


def test_stage_errors_propagate_under_their_own_name(stages: FakeStages) -> None:
    """Step Functions matches Retry/Catch on the exception's class name, so handlers must not wrap it."""
    stages.replies["prepare_run"] = InputDataError(
        "bad id", source="incoming/plays.csv", row=3, column="user_id"
    )
    with pytest.raises(InputDataError, match="row 3"):
        _handlers().prepare({"bucket": BUCKET, "key": "incoming/plays.csv"}, None)


# --- Batch mains -----------------------------------------------------------------------------------


def test_train_main_calls_train_run(stages: FakeStages, capsys: pytest.CaptureFixture[str]) -> None:
    main = importlib.import_module("batch_jobs.train.main").main
    assert main(["--bucket", BUCKET, "--run-id", RUN]) == 0
    assert stages.calls == [("train_run", (BUCKET, RUN))]
    assert "metrics.json" in capsys.readouterr().out


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
