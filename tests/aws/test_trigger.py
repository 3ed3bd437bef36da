"""The upload starter (topx.aws.trigger) against moto: one run per burst, one at a time, deduped by name.

moto's Step Functions here runs nothing: an execution stays RUNNING until the test stops it, so "a run in
progress" is a state the test sets, and the starter's clock is a number the test gives.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws

from topx.aws import trigger
from topx.contract import table_attribute_definitions, table_key_schema

BUCKET, TABLE = "data", "recs"
T0 = 1_714_560_000.0  # 2024-05-01T10:40:00Z


class Env:
    def __init__(self) -> None:
        self.sfn = boto3.client("stepfunctions")
        self.ddb = boto3.client("dynamodb")
        self.ddb.create_table(TableName=TABLE, BillingMode="PAY_PER_REQUEST", KeySchema=table_key_schema(),
                              AttributeDefinitions=table_attribute_definitions())
        role = boto3.client("iam").create_role(RoleName="r", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
        self.machine = self.sfn.create_state_machine(
            name="pipeline", roleArn=role,
            definition=json.dumps({"StartAt": "S", "States": {"S": {"Type": "Succeed"}}}))["stateMachineArn"]
        self.now = T0

    def start(self, records: list[dict[str, Any]], **kwargs: Any) -> trigger.Outcome:
        return trigger.start_runs(trigger.read_batch(records, BUCKET), bucket=BUCKET, table=TABLE,
                                  state_machine_arn=self.machine, sfn=kwargs.pop("sfn", self.sfn), ddb=self.ddb,
                                  clock=lambda: self.now)

    def executions(self) -> list[dict[str, Any]]:
        return sorted(self.sfn.list_executions(stateMachineArn=self.machine)["executions"],
                      key=lambda e: e["startDate"])

    def end(self, arn: str) -> dict[str, Any]:
        self.sfn.stop_execution(executionArn=arn)
        return ended(arn)


def message(event: dict[str, Any], index: int = 0) -> dict[str, Any]:
    return {"messageId": f"m{index}", "body": json.dumps(event)}


def upload(key: str, at: float, bucket: str = BUCKET) -> dict[str, Any]:
    return message({"source": "aws.s3", "detail-type": "Object Created", "time": at,
                    "detail": {"bucket": {"name": bucket}, "object": {"key": key}}})


def ended(arn: str) -> dict[str, Any]:
    return message({"source": "aws.states", "detail-type": "Step Functions Execution Status Change",
                    "detail": {"executionArn": arn, "status": "ABORTED"}})


@pytest.fixture()
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        yield Env()


def test_a_burst_is_one_execution_named_by_its_claim_with_the_uploads_as_input(env: Env) -> None:
    parts = [upload(f"incoming/orders/day=1/part-{i:05d}.csv", T0 - 30 + i * 0.01) for i in range(500)]
    outcome = env.start([*parts, upload("incoming/orders/day=1/_SUCCESS", T0 - 20),
                         upload("elsewhere/x.csv", T0 - 20), upload("incoming/a.csv", T0 - 20, bucket="other")])
    (execution,) = env.executions()
    assert outcome.started == execution["executionArn"]
    assert execution["name"] == "uploads-000001-20240501T104000Z"
    described = env.sfn.describe_execution(executionArn=outcome.started)
    assert json.loads(described["input"]) == {"bucket": BUCKET, "key": None, "mode": "full",
                                              "uploads": [{"path": "incoming/orders/day=1/", "objects": 501}]}


def test_uploads_during_a_run_wait_for_its_end_then_start_exactly_one_more(env: Env) -> None:
    first = env.start([upload("incoming/day1.csv", T0 - 10)]).started
    env.now = T0 + 60
    for day in ("day2", "day3"):
        outcome = env.start([upload(f"incoming/{day}/part-0.csv", T0 + 30), upload(f"incoming/{day}/_SUCCESS", T0 + 31)])
        assert outcome.started is None and outcome.waiting_for == first
    assert len(env.executions()) == 1

    env.now = T0 + 600
    after = env.start([env.end(first)])
    assert after.started is not None and after.pending_uploads == 0
    assert [e["executionArn"] for e in env.executions()] == [first, after.started]
    uploads = json.loads(env.sfn.describe_execution(executionArn=after.started)["input"])["uploads"]
    assert uploads == [{"path": "incoming/day2/", "objects": 2}, {"path": "incoming/day3/", "objects": 2}]
    # That run's end starts nothing: nothing waits.
    assert env.start([env.end(after.started)]).started is None
    assert len(env.executions()) == 2


def test_a_burst_split_over_two_batches_is_still_one_run(env: Env) -> None:
    """Lambda may hand a burst over in two batches; the second finds the first's run, and once that run
    ends, the uploads S3 reported before its claim were read by it and start nothing more."""
    first = env.start([upload(f"incoming/x/part-{i}.csv", T0 - 5) for i in range(3)]).started
    env.now = T0 + 1
    assert env.start([upload("incoming/x/part-3.csv", T0 - 4), upload("incoming/x/_SUCCESS", T0 - 4)]).waiting_for == first
    outcome = env.start([env.end(first)])
    assert outcome.started is None and outcome.dropped_uploads == 2
    assert len(env.executions()) == 1


def test_an_upload_reported_near_the_claim_is_not_taken_as_read(env: Env) -> None:
    first = env.start([upload("incoming/a.csv", T0 - 30)]).started
    env.start([upload("incoming/b.csv", T0 - trigger.COVERED_MARGIN_S / 2)])
    outcome = env.start([env.end(first)])
    assert outcome.started is not None and outcome.dropped_uploads == 0


def test_an_execution_started_another_way_is_waited_for_too(env: Env) -> None:
    manual = env.sfn.start_execution(stateMachineArn=env.machine, name="by-hand", input="{}")["executionArn"]
    assert env.start([upload("incoming/a.csv", T0)]).waiting_for == manual
    assert len(env.executions()) == 1
    outcome = env.start([env.end(manual)])
    assert outcome.started is not None and len(env.executions()) == 2


def test_a_schedule_tick_starts_a_run_without_uploads(env: Env) -> None:
    outcome = env.start([message({"source": "aws.events", "detail-type": "Scheduled Event", "detail": {}})])
    assert outcome.started is not None and ":scheduled-000001-" in outcome.started
    assert json.loads(env.sfn.describe_execution(executionArn=outcome.started)["input"])["uploads"] == []


def test_nothing_to_do_starts_nothing_and_garbage_is_ignored(env: Env) -> None:
    batch = trigger.read_batch([{"messageId": "x", "body": "not json"}, message({"source": "aws.other"}),
                                upload("incoming/folder/", T0, bucket="other")], BUCKET)
    assert batch.ignored == 3 and not batch.uploads
    assert env.start([{"messageId": "x", "body": "not json"}]).started is None
    assert env.executions() == []


class LosesTheFirstStart:
    """Step Functions whose first StartExecution fails after the claim was written (the starter stopped)."""

    def __init__(self, sfn: Any) -> None:
        self.sfn, self.failed = sfn, False

    def start_execution(self, **kwargs: Any) -> Any:
        if not self.failed:
            self.failed = True
            raise ConnectionError("the starter stopped here")
        return self.sfn.start_execution(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sfn, name)


def test_a_batch_retried_after_a_lost_start_starts_the_claimed_name_once(env: Env) -> None:
    flaky = LosesTheFirstStart(env.sfn)
    batch = [upload("incoming/a.csv", T0 - 10)]
    with pytest.raises(ConnectionError):
        env.start(batch, sfn=flaky)
    assert env.executions() == []
    claimed = trigger.read_state(TABLE, env.ddb).running
    assert claimed is not None and claimed.endswith(":uploads-000001-20240501T104000Z")
    # Lambda hands the same batch over again: the claim is started, under its name, and only once.
    env.now = T0 + 30
    outcome = env.start(batch, sfn=flaky)
    (execution,) = env.executions()
    assert execution["executionArn"] == claimed and outcome.waiting_for == claimed
    assert json.loads(env.sfn.describe_execution(executionArn=claimed)["input"])["uploads"] == [
        {"path": "incoming/a.csv", "objects": 1}]
    assert env.start(batch).started is None and len(env.executions()) == 1


def test_a_write_from_a_stale_read_loses_to_the_other_starter(env: Env) -> None:
    read = trigger.read_state(TABLE, env.ddb)
    other = trigger.TriggerState(seq=1, running="arn:x", exists=True)
    assert trigger.write_state(TABLE, env.ddb, other, read=read)
    assert not trigger.write_state(TABLE, env.ddb, trigger.TriggerState(seq=1, running="arn:y", exists=True),
                                   read=read)
    assert trigger.read_state(TABLE, env.ddb).running == "arn:x"


def test_a_name_an_older_execution_took_is_passed_over(env: Env) -> None:
    """The trigger item made anew (its sequence back at 1) in the same second as an earlier claim: the
    earlier execution, ended, keeps its name, and the uploads start under the next one."""
    batch = [upload("incoming/a.csv", T0 - 10)]
    first = env.start(batch).started
    env.end(first)
    env.ddb.delete_item(TableName=TABLE, Key=trigger._key())
    outcome = env.start(batch)
    assert outcome.started is not None and outcome.started != first
    assert outcome.started.endswith(":uploads-000002-20240501T104000Z")
    assert env.sfn.describe_execution(executionArn=outcome.started)["status"] == "RUNNING"


# --------------------------------------------------------------------------- refresh or full run


def waiting(*keys: str) -> dict[str, trigger.Upload]:
    return trigger.merge_uploads({}, {trigger.upload_folder(k): trigger.Upload(1, T0, k) for k in keys})


@pytest.mark.parametrize(("keys", "scheduled", "mode"), [
    (("responses/2024-05-01.csv",), False, "refresh"),
    (("responses/day=1/part-0.csv", "responses/day=2/part-0.csv", "config/filters.json"), False, "refresh"),
    (("config/filters.json",), False, "refresh"),
    # The dataset configuration changes how the data is read: only a full run reads it.
    (("config/dataset.json",), False, "full"),
    (("config/filters.json", "config/dataset.json"), False, "full"),
    (("config/other.json",), False, "full"),
    (("responses/r.csv", "incoming/day2/part-0.csv"), False, "full"),
    (("responses/r.csv",), True, "full"),  # the schedule retrains
    ((), True, "full"),
])
def test_only_filter_and_response_uploads_make_a_refresh(keys: tuple[str, ...], scheduled: bool, mode: str) -> None:
    assert trigger.run_mode(waiting(*keys), scheduled) == mode


def test_config_files_are_recorded_one_by_one_so_the_dataset_configuration_is_not_hidden(env: Env) -> None:
    assert trigger.upload_folder("config/dataset.json") == "config/dataset.json"
    assert trigger.upload_folder("responses/day=1/part-0.csv") == "responses/day=1/"
    outcome = env.start([upload("config/filters.json", T0 - 5), upload("config/dataset.json", T0 - 4)])
    execution = json.loads(env.sfn.describe_execution(executionArn=outcome.started)["input"])
    assert execution["mode"] == "full" and execution["uploads"] == [
        {"path": "config/dataset.json", "objects": 1}, {"path": "config/filters.json", "objects": 1}]


def test_responses_alone_start_one_refresh_named_as_such(env: Env) -> None:
    outcome = env.start([upload(f"responses/day=1/part-{i}.csv", T0 - 10) for i in range(3)]
                        + [upload("config/filters.json", T0 - 9), upload("features/items.csv", T0 - 9)])
    (execution,) = env.executions()
    assert outcome.started == execution["executionArn"]
    assert execution["name"] == "refresh-000001-20240501T104000Z"
    assert json.loads(env.sfn.describe_execution(executionArn=outcome.started)["input"]) == {
        "bucket": BUCKET, "key": None, "mode": "refresh",
        "uploads": [{"path": "config/filters.json", "objects": 1}, {"path": "responses/day=1/", "objects": 3}]}


def test_data_that_arrives_during_a_refresh_gives_a_full_run_after_it_even_when_reported_before_its_claim(
        env: Env) -> None:
    first = env.start([upload("responses/a.csv", T0 - 10)]).started
    assert first is not None and "refresh-" in first
    # Reported before the claim, delivered after it: a full run would have read them, a refresh did not.
    env.now = T0 + 60
    late = [upload("incoming/day2.csv", T0 - 30), upload("responses/b/r.csv", T0 - 30),
            upload("responses/c/r.csv", T0 + 30)]
    assert env.start(late).waiting_for == first

    env.now = T0 + 600
    after = env.start([env.end(first)])
    assert after.started is not None and after.dropped_uploads == 1  # responses/b/: the refresh read it
    described = json.loads(env.sfn.describe_execution(executionArn=after.started)["input"])
    assert described["mode"] == "full" and after.started.rsplit(":", 1)[1].startswith("uploads-")
    assert described["uploads"] == [{"path": "incoming/day2.csv", "objects": 1},
                                    {"path": "responses/c/r.csv", "objects": 1}]
