"""Reading recommendations, uploading and following runs of a deployed stack: topx.aws.client and its commands.

Name resolution is tested with a stand-in CloudFormation client; the commands run against the offline
pipeline (topx.offline), which the client cannot tell from a deployed stack once the names are given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws
from reliability_stack import base_ratings

from topx import offline
from topx.aws import client, stages, store
from topx.cli import main
from topx.errors import ConfigError, StoreError


class FakeCloudFormation:
    def __init__(self, stacks: dict[str, dict[str, str]]) -> None:
        self.stacks = stacks
        self.asked: list[str] = []

    def describe_stacks(self, StackName: str) -> dict[str, Any]:
        self.asked.append(StackName)
        if StackName not in self.stacks:
            raise ClientError({"Error": {"Code": "ValidationError", "Message": f"Stack with id {StackName} does "
                                                                              "not exist"}}, "DescribeStacks")
        outputs = [{"OutputKey": k, "OutputValue": v} for k, v in self.stacks[StackName].items()]
        return {"Stacks": [{"StackName": StackName, "Outputs": outputs}]}


def test_with_no_stack_named_the_client_finds_every_resource_in_the_deployed_stack(
    default_app: tuple[Any, Any, Path],
) -> None:
    from aws_cdk.assertions import Template

    _, stack, _ = default_app
    declared = Template.from_stack(stack).to_json()["Outputs"]
    fake = FakeCloudFormation({stack.stack_name: {name: f"value-of-{name}" for name in declared}})
    outputs = client.stack_outputs(client=fake)
    assert fake.asked == [stack.stack_name]
    assert {outputs.bucket, outputs.table, outputs.state_machine_arn, outputs.topic_arn} == {
        f"value-of-{name}" for name in declared
    }


OUTPUTS = {"BucketName": "data-bucket", "TableName": "recs-table", "StateMachineArn": "arn:sm", "TopicArn": "arn:t"}


def test_stack_outputs_name_the_resources() -> None:
    fake = FakeCloudFormation({"Topx": OUTPUTS, "Staging": {**OUTPUTS, "TableName": "staging-table"}})
    outputs = client.stack_outputs(client=fake)
    assert (outputs.bucket, outputs.table, outputs.state_machine_arn, outputs.topic_arn) == (
        "data-bucket", "recs-table", "arn:sm", "arn:t")
    assert client.stack_outputs("Staging", client=fake).table == "staging-table"
    assert fake.asked == ["Topx", "Staging"]


def test_names_resolve_explicit_then_stack_then_environment_then_default_stack(monkeypatch) -> None:
    fake = FakeCloudFormation({"Topx": OUTPUTS, "Staging": {**OUTPUTS, "TableName": "staging-table"}})
    monkeypatch.setenv("TOPX_TABLE", "env-table")
    assert client.resolve_table("mine", stack="Staging", cloudformation=fake) == "mine"
    assert client.resolve_table(stack="Staging", cloudformation=fake) == "staging-table"
    assert client.resolve_table(cloudformation=fake) == "env-table"
    monkeypatch.delenv("TOPX_TABLE")
    assert client.resolve_table(cloudformation=fake) == "recs-table"
    assert client.resolve_state_machine(cloudformation=fake) == "arn:sm"


def test_a_missing_stack_or_output_says_what_to_do() -> None:
    with pytest.raises(ConfigError, match="stack 'Nope' not found.*--table"):
        client.resolve_table(stack="Nope", cloudformation=FakeCloudFormation({}))
    with pytest.raises(ConfigError, match="has no output 'BucketName'"):
        client.resolve_bucket(stack="Topx", cloudformation=FakeCloudFormation({"Topx": {"TableName": "t"}}))


def test_the_endpoint_comes_from_the_argument_then_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("TOPX_ENDPOINT_URL", "http://localhost:4566")
    assert client.endpoint() == "http://localhost:4566"
    assert client.endpoint("http://localhost:5000") == "http://localhost:5000"
    monkeypatch.delenv("TOPX_ENDPOINT_URL")
    assert client.endpoint() is None


def test_upload_marks_the_objective_as_prepare_reads_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    path = tmp_path / "plays.csv"
    path.write_text("user_id,item_id,rating\nu1,i1,3\n")
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="data")
        assert client.upload(path, bucket="data", implicit=True) == "s3://data/incoming/plays.csv"
        assert client.upload(path, bucket="data", key="incoming/other.csv") == "s3://data/incoming/other.csv"
        implicit = s3.head_object(Bucket="data", Key="incoming/plays.csv")
        explicit = s3.head_object(Bucket="data", Key="incoming/other.csv")
        assert client.upload(path, bucket="data", key="rated.csv", objective="rating") == "s3://data/incoming/rated.csv"
        rated = s3.head_object(Bucket="data", Key="incoming/rated.csv")
        with pytest.raises(ConfigError, match="cannot go with|not for objective rating"):
            client.upload(path, bucket="data", implicit=True, objective="rating")
    assert implicit["Metadata"] == {"topx-mode": "implicit"} and "topx-mode" not in explicit["Metadata"]
    assert stages._objective(implicit, "plays.csv") == stages._objective(explicit, "other.csv") == "ranking"
    assert rated["Metadata"] == {"topx-mode": "rating"} and stages._objective(rated, "rated.csv") == "rating"
    with pytest.raises(ConfigError, match="unknown mode 'stars'"):
        stages._objective({"Metadata": {"topx-mode": "stars"}}, "s.csv")
    with pytest.raises(ConfigError, match="no such file"):
        client.upload(tmp_path / "missing.csv", bucket="data")


def test_upload_as_filters_checks_the_file_first_and_as_responses_keeps_a_folder_s_paths(
        tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"items": {"exclude": [{"column": "in_stock", "equals": False}]}}))
    (tmp_path / "dismissed" / "day=1").mkdir(parents=True)
    (tmp_path / "dismissed" / "day=1" / "part-0.csv").write_text("user_id,item_id\nu1,i1\n")
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="data")
        assert main(["upload", str(rules), "--as", "filters", "--bucket", "data"]) == 0
        assert json.loads(s3.get_object(Bucket="data", Key="config/filters.json")["Body"].read()) == json.loads(
            rules.read_text())
        assert "starts a refresh" in capsys.readouterr().out
        assert client.upload_responses(tmp_path / "dismissed", bucket="data") == "s3://data/responses/dismissed/"
        assert s3.get_object(Bucket="data", Key="responses/dismissed/day=1/part-0.csv")["Body"].read() == \
            b"user_id,item_id\nu1,i1\n"
        # A malformed filter file is refused before it is uploaded: the one there stays.
        rules.write_text(json.dumps({"items": {"exclude": [{"column": "in_stock", "like": "x"}]}}))
        assert main(["upload", str(rules), "--as", "filters", "--bucket", "data"]) == 2
        assert "rules.json: items.exclude[0]: a rule takes exactly one operator" in capsys.readouterr().err
        assert b"equals" in s3.get_object(Bucket="data", Key="config/filters.json")["Body"].read()
        # Flags of data uploads are refused with the other kinds.
        assert main(["upload", str(rules), "--as", "responses", "--implicit", "--bucket", "data"]) == 2
        assert "--implicit applies to data uploads, not to --as responses" in capsys.readouterr().err


def test_reading_a_table_that_does_not_exist_is_a_store_error(monkeypatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws(), pytest.raises(StoreError, match="table 'nope' does not exist"):
        client.get_recommendations("u1", table="nope")


def test_upload_recs_and_status_commands_on_the_offline_stack(tmp_path: Path, capsys) -> None:
    path = tmp_path / "ratings.csv"
    base_ratings(120, 60, seed=5).to_csv(path, index=False)
    with offline.offline():
        pipeline = offline.deploy(offline.LocalSettings(top_x=4, num_factors=8, epochs=3, shards=2))
        assert main(["status", "--state-machine-arn", pipeline.state_machine_arn, "--table", pipeline.table]) == 0
        assert "no executions yet" in capsys.readouterr().out

        assert main(["upload", str(path), "--bucket", pipeline.bucket]) == 0
        assert f"uploaded s3://{pipeline.bucket}/incoming/ratings.csv" in capsys.readouterr().out
        assert offline.executions(pipeline.state_machine_arn) == []  # queued, until the batching window closes
        offline.deliver_uploads(pipeline)
        (execution,) = offline.executions(pipeline.state_machine_arn)
        assert offline.wait_for_execution(execution["executionArn"])["status"] == "SUCCEEDED"
        live = store.active_version(pipeline.table, client=boto3.client("dynamodb"))

        assert main(["status", "--state-machine-arn", pipeline.state_machine_arn, "--table", pipeline.table]) == 0
        status = capsys.readouterr().out
        assert "SUCCEEDED" in status and execution["name"] in status
        assert "covers incoming/ratings.csv" in status
        assert f"live version: {live}, 120 users" in status

        assert main(["recs", "u00003", "--table", pipeline.table]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == f"recommendations for u00003 ({pipeline.table}):" and len(lines) == 5
        assert main(["recs", "u00003", "--table", pipeline.table, "--json"]) == 0
        reply = json.loads(capsys.readouterr().out)
        rec = client.get_recommendations("u00003", table=pipeline.table)
        assert reply == {"user_id": "u00003", "list": None, "items": rec.items, "scores": rec.scores, "fallback": False,
                         "cold_user": False}
        assert not rec.fallback
        # A user the model has not seen gets the version's fallback list, marked as such.
        assert main(["recs", "nobody", "--table", pipeline.table]) == 0
        printed = capsys.readouterr().out.splitlines()
        assert printed[0].startswith("fallback list for nobody") and len(printed) == 5
        assert main(["recs", "nobody", "--table", pipeline.table, "--json"]) == 0
        reply = json.loads(capsys.readouterr().out)
        unknown = client.get_recommendations("nobody", table=pipeline.table)
        assert unknown.fallback and reply == {"user_id": "nobody", "list": None, "items": unknown.items, "scores": unknown.scores,
                                              "fallback": True, "cold_user": False}
        assert len(unknown.items) == len(rec.items)


@pytest.fixture()
def table_t(monkeypatch) -> Any:
    """A recommendations table "t" in moto's DynamoDB; its client."""
    from topx.contract import table_attribute_definitions, table_key_schema

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        ddb = boto3.client("dynamodb")
        ddb.create_table(TableName="t", BillingMode="PAY_PER_REQUEST", KeySchema=table_key_schema(),
                         AttributeDefinitions=table_attribute_definitions())
        yield ddb


def test_recs_reads_a_named_list_by_name(table_t, capsys) -> None:
    from topx.contract import list_version

    ddb = table_t
    store.write_recommendations("t", "v1", [store.Recommendation("u1", ["a", "b"], [2.0, 1.0]),
                                            store.Recommendation("u2", ["b"], [1.5])], expires_at=None, client=ddb)
    store.write_fallback("t", "v1", ["top", "book-1"], [9.0, 8.0], client=ddb)
    books = list_version("v1", "summer-books")
    store.write_recommendations("t", books, [store.Recommendation("u1", ["book-2"], [0.5]),
                                             store.Recommendation("u2", [], [])], expires_at=None, client=ddb)
    store.write_fallback("t", books, ["book-1"], [8.0], client=ddb)
    store.publish_version("t", "v1", users=2, client=ddb)

    assert main(["recs", "u1", "--table", "t", "--list", "summer-books"]) == 0
    assert capsys.readouterr().out.splitlines() == ["recommendations for u1 (t, list summer-books):",
                                                     "    1. book-2  +0.5000"]
    # A user the version knows, with nothing left in the list: an empty list of their own, not the fallback.
    assert main(["recs", "u2", "--table", "t", "--list", "summer-books", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"user_id": "u2", "list": "summer-books", "items": [],
                                                   "scores": [], "fallback": False, "cold_user": False}
    assert main(["recs", "u2", "--table", "t", "--list", "summer-books"]) == 0
    assert "the user has already had every item this list may recommend" in capsys.readouterr().out
    # A user it does not know: the list's own fallback list.
    assert main(["recs", "nobody", "--table", "t", "--list", "summer-books"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("fallback list for nobody (t, list summer-books)") and printed[1:] == [
        "    1. book-1  +8.0000"]
    assert client.Reader(table="t", client=ddb).get("u1", "summer-books").items == ["book-2"]
    assert client.get_recommendations("u1", table="t", client=ddb).items == ["a", "b"]
    # A list the live version does not make, or a name no list can have: one line naming the lists it has.
    assert main(["recs", "u1", "--table", "t", "--list", "winter"]) == 2
    assert "the live version v1 has no list 'winter' (its lists: summer-books)" in capsys.readouterr().err
    assert main(["recs", "u1", "--table", "t", "--list", "Winter Sale"]) == 2
    assert "'Winter Sale' is not a list name" in capsys.readouterr().err


def test_a_reader_reads_the_pointer_once_per_cache_period_and_each_list_in_one_get(table_t) -> None:
    from topx.aws import store as store_module

    ddb = table_t
    for version, item in (("v1", "old"), ("v2", "new")):
        store_module.write_recommendations("t", version, [store_module.Recommendation("u1", [item], [1.0])],
                                           expires_at=None, client=ddb)
        store_module.write_fallback("t", version, ["top"], [9.0], client=ddb)
    store_module.publish_version("t", "v1", users=1, client=ddb)

    calls: list[tuple[str, bool]] = []

    class Counting:
        def get_item(self, **kwargs):
            calls.append((kwargs["Key"]["pk"]["S"], kwargs.get("ConsistentRead", False)))
            return ddb.get_item(**kwargs)

    now = [100.0]
    reader = client.Reader(table="t", client=Counting(), pointer_cache_s=5.0, clock=lambda: now[0])
    assert reader.get("u1").items == ["old"]
    assert reader.get("u1").items == ["old"] and reader.get("nobody").fallback
    # One eventually consistent pointer read, then one GetItem per list (two for the fallback).
    assert calls == [("pointer", False), ("user#u1", False), ("user#u1", False), ("user#nobody", False),
                     ("fallback", False)]
    store_module.publish_version("t", "v2", users=1, client=ddb)
    now[0] += 4.9
    assert reader.get("u1").items == ["old"], "within the cache period the reader keeps its version"
    now[0] += 0.2
    assert reader.get("u1").items == ["new"]
    assert calls[-2:] == [("pointer", False), ("user#u1", False)]
    with pytest.raises(ConfigError, match="pointer_cache_s must be >= 0"):
        client.Reader(table="t", client=object(), pointer_cache_s=-1)
