"""CDK assertion tests: the stack synthesizes offline and each piece is what DESIGN.md asks for.

The app is synthesized twice per module (jsii is slow): once with default context, once with every
optional context parameter set.
"""

from __future__ import annotations

import ast
import json
import math
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
from aws_cdk import App
from aws_cdk import aws_s3 as s3
from aws_cdk.assertions import Annotations, Match, Template
from cdk_nag import AwsSolutionsChecks
from dockerfiles import dockerfile_instructions, exec_form

from infra.app import build_app
from infra.images import (
    BATCH_EXCLUDE,
    FUNCTIONS_DOCKERFILE,
    FUNCTIONS_EXCLUDE,
    SEARCH_DOCKERFILE,
    TRAIN_DOCKERFILE,
)
from infra.pipeline import PLACEHOLDER_RE, load_trigger, placeholders
from infra.settings import ASL_PATH, REPO_ROOT, DeploySettings, SettingsError
from topx import contract
from topx.contract import SEARCH_COMMAND, TRAIN_COMMAND

HANDLERS = ("prepare", "quality_gate", "repackage", "load_shard", "publish", "report", "starter", "compute_health")
MAIN_PATH = [
    "Defaults", "Mode", "Prepare", "Train", "QualityGate", "GateChoice", "Repackage", "Search", "Load", "Report", "Publish",
    "NotifySuccess", "Succeed",
]  # fmt: skip
# Only the filter file or the responses changed: the live model, searched and loaded again, no training.
REFRESH_PATH = [
    "Defaults", "Mode", "PrepareRefresh", "RefreshChoice", "UseLiveModel", "Repackage", "Search", "Load", "Report", "Publish",
    "NotifySuccess", "Succeed",
]  # fmt: skip
CUSTOM_CONTEXT = {
    "top_x": "20",
    "num_factors": "32",
    "epochs": "5",
    "shards": "6",
    "gpu_instance_types": '["g6.2xlarge"]',
    "spot": "true",
    "max_vcpus": "32",
    "schedule": "cron(0 3 * * ? *)",
    "notification_email": "ops@example.com",
    "retention_days": "14",
    "max_rmse": "0.95",
    "min_auc": "0.6",
    "min_recall": "0.1",
    "hyperparameters": '{"epochs": 40, "factors_wd": 0.1}',
    "search_method": "faiss",
    "data_function_memory_mb": "6144",
    # The search image is left on its tag.
    "base_image_digests": json.dumps({"train": "sha256:" + "a1" * 32, "functions": "sha256:" + "0f" * 32}),
}


class Synth:
    def __init__(self, app: App, stack: Any, outdir: Path) -> None:
        self.app = app
        self.stack = stack
        self.outdir = outdir
        self.template = Template.from_stack(stack)
        self.json: dict[str, Any] = self.template.to_json()

    def resources(self, resource_type: str) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self.json["Resources"].items() if v["Type"] == resource_type}

    def only_with(self, resource_type: str, key: str) -> dict[str, Any]:
        found = [r["Properties"] for r in self.resources(resource_type).values() if key in r["Properties"]]
        assert len(found) == 1, f"expected one {resource_type} with {key}, found {len(found)}"
        return found[0]

    def only(self, resource_type: str) -> dict[str, Any]:
        found = list(self.resources(resource_type).values())
        assert len(found) == 1, f"expected one {resource_type}, found {len(found)}"
        return found[0]["Properties"]


def _synth(tmp_path_factory: pytest.TempPathFactory, name: str, context: dict[str, Any] | None) -> Synth:
    outdir = tmp_path_factory.mktemp(name)
    app, stack = build_app(context=context, outdir=str(outdir))
    app.synth()  # runs the AwsSolutions plugin too; any finding fails here
    return Synth(app, stack, outdir)


@pytest.fixture(scope="module")
def default(default_app: tuple[Any, Any, Path]) -> Synth:
    return Synth(*default_app)


@pytest.fixture(scope="module")
def custom(tmp_path_factory: pytest.TempPathFactory) -> Synth:
    return _synth(tmp_path_factory, "custom", CUSTOM_CONTEXT)


def _definition(synth: Synth) -> tuple[str, dict[str, Any]]:
    props = synth.only("AWS::StepFunctions::StateMachine")
    definition = props["DefinitionString"]
    assert isinstance(definition, str), (
        "the definition should be inline text with CloudFormation substitutions"
    )
    return definition, props["DefinitionSubstitutions"]


def _states(synth: Synth) -> dict[str, Any]:
    return json.loads(_definition(synth)[0])["States"]


def _env(container_or_function: dict[str, Any]) -> dict[str, Any]:
    if "Environment" in container_or_function and isinstance(container_or_function["Environment"], list):
        return {item["Name"]: item["Value"] for item in container_or_function["Environment"]}
    return container_or_function["Environment"]["Variables"]


# --- storage ---------------------------------------------------------------------------------------


def test_data_bucket_is_private_encrypted_versioned_and_expires_old_runs(
    default: Synth, custom: Synth
) -> None:
    default.template.has_resource_properties(
        "AWS::S3::Bucket",
        {
            "BucketEncryption": {
                "ServerSideEncryptionConfiguration": [
                    {"ServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}
                ]
            },
            "PublicAccessBlockConfiguration": {
                "BlockPublicAcls": True,
                "BlockPublicPolicy": True,
                "IgnorePublicAcls": True,
                "RestrictPublicBuckets": True,
            },
            "VersioningConfiguration": {"Status": "Enabled"},
            "NotificationConfiguration": {"EventBridgeConfiguration": {"EventBridgeEnabled": True}},
            "LoggingConfiguration": Match.object_like({"DestinationBucketName": Match.any_value()}),
            "LifecycleConfiguration": {
                "Rules": Match.array_with(
                    [
                        Match.object_like({"Prefix": "runs/", "ExpirationInDays": 30, "Status": "Enabled"}),
                        Match.object_like(
                            {"NoncurrentVersionExpiration": Match.object_like({"NoncurrentDays": 7})}
                        ),
                    ]
                )
            },
        },
    )
    custom.template.has_resource_properties(
        "AWS::S3::Bucket",
        {
            "LifecycleConfiguration": {
                "Rules": Match.array_with([Match.object_like({"Prefix": "runs/", "ExpirationInDays": 14})])
            }
        },
    )


def test_every_bucket_denies_plain_http(default: Synth) -> None:
    buckets = default.resources("AWS::S3::Bucket")
    policies = default.resources("AWS::S3::BucketPolicy").values()
    secured = set()
    for policy in policies:
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
            if statement.get("Condition") == {"Bool": {"aws:SecureTransport": "false"}}:
                assert statement["Effect"] == "Deny"
                secured.add(policy["Properties"]["Bucket"]["Ref"])
    assert secured == set(buckets)


def test_table_keys_billing_recovery_encryption_and_ttl(default: Synth) -> None:
    default.template.has_resource_properties(
        "AWS::DynamoDB::Table",
        {
            "KeySchema": [
                {"AttributeName": "pk", "KeyType": "HASH"},
                {"AttributeName": "sk", "KeyType": "RANGE"},
            ],
            "AttributeDefinitions": Match.array_with(
                [{"AttributeName": "pk", "AttributeType": "S"}, {"AttributeName": "sk", "AttributeType": "S"}]
            ),
            "BillingMode": "PAY_PER_REQUEST",
            "PointInTimeRecoverySpecification": {"PointInTimeRecoveryEnabled": True},
            "SSESpecification": {"SSEEnabled": True},
            "TimeToLiveSpecification": {"AttributeName": "expires_at", "Enabled": True},
        },
    )


# --- network and compute ---------------------------------------------------------------------------


def test_vpc_has_no_nat_gateway_and_free_gateway_endpoints_only(default: Synth) -> None:
    default.template.resource_count_is("AWS::EC2::NatGateway", 0)
    endpoints = default.resources("AWS::EC2::VPCEndpoint").values()
    assert {e["Properties"].get("VpcEndpointType", "Gateway") for e in endpoints} == {"Gateway"}
    assert len(endpoints) == 2
    for subnet in default.resources("AWS::EC2::Subnet").values():
        assert subnet["Properties"]["MapPublicIpOnLaunch"] is True
    group = default.only("AWS::EC2::SecurityGroup")
    assert "SecurityGroupIngress" not in group
    assert [rule["FromPort"] for rule in group["SecurityGroupEgress"]] == [443]


def test_gpu_environment_scales_to_zero_on_the_configured_instance_types(
    default: Synth, custom: Synth
) -> None:
    default.template.has_resource_properties(
        "AWS::Batch::ComputeEnvironment",
        {
            "Type": "managed",
            "ComputeResources": Match.object_like(
                {
                    "Type": "EC2",
                    "InstanceTypes": ["g5.xlarge", "g6.xlarge"],
                    "MinvCpus": 0,
                    "MaxvCpus": 16,
                    "Ec2Configuration": [{"ImageType": "ECS_AL2023_NVIDIA"}],
                }
            ),
        },
    )
    custom.template.has_resource_properties(
        "AWS::Batch::ComputeEnvironment",
        {
            "ComputeResources": Match.object_like(
                {"Type": "SPOT", "InstanceTypes": ["g6.2xlarge"], "MinvCpus": 0, "MaxvCpus": 32}
            )
        },
    )
    default.template.has_resource_properties(
        "AWS::Batch::ComputeEnvironment", {"ComputeResources": Match.object_like({"Type": "FARGATE"})}
    )


def test_train_job_needs_one_gpu_and_has_timeout_and_retries(default: Synth) -> None:
    default.template.has_resource_properties(
        "AWS::Batch::JobDefinition",
        {
            "PlatformCapabilities": ["EC2"],
            "ContainerProperties": Match.object_like(
                {
                    "Command": list(TRAIN_COMMAND),
                    "ResourceRequirements": Match.array_with([{"Type": "GPU", "Value": "1"}]),
                }
            ),
            "Timeout": {"AttemptDurationSeconds": Match.any_value()},
            "RetryStrategy": Match.object_like(
                {"EvaluateOnExit": Match.array_with([{"Action": "EXIT", "OnExitCode": "2"}])}
            ),
        },
    )


def test_batch_retries_only_what_infrastructure_broke(default: Synth) -> None:
    """Each job definition's retry strategy: exit code 2 (a TopxError: bad data or settings) ends the job
    first, infrastructure failures (image pull, Spot or Fargate Spot reclaimed, a task that could not
    start) are retried, and every other failure ends it (Batch would retry it otherwise)."""
    infrastructure = ("CannotPullContainerError", "Host EC2", "Your Spot Task", "ResourceInitializationError")
    definitions = default.resources("AWS::Batch::JobDefinition").values()
    assert len(definitions) == 2
    for definition in definitions:
        rules = definition["Properties"]["RetryStrategy"]["EvaluateOnExit"]
        assert rules[0] == {"Action": "EXIT", "OnExitCode": "2"}
        assert rules[-1] == {"Action": "EXIT", "OnReason": "*"}
        for rule in rules[1:-1]:
            assert rule["Action"] == "RETRY", rule
            reason = rule.get("OnReason") or rule.get("OnStatusReason")
            assert reason and reason.startswith(infrastructure), rule


def test_search_job_runs_on_fargate_with_a_public_ip(default: Synth) -> None:
    default.template.has_resource_properties(
        "AWS::Batch::JobDefinition",
        {
            "PlatformCapabilities": ["FARGATE"],
            "ContainerProperties": Match.object_like(
                {"Command": list(SEARCH_COMMAND), "NetworkConfiguration": {"AssignPublicIp": "ENABLED"}}
            ),
            "Timeout": {"AttemptDurationSeconds": Match.any_value()},
            "RetryStrategy": Match.object_like({"Attempts": Match.any_value()}),
        },
    )


def test_functions_are_container_images_one_handler_each(default: Synth) -> None:
    functions = [f["Properties"] for f in default.resources("AWS::Lambda::Function").values()]
    commands = sorted(f["ImageConfig"]["Command"][0] for f in functions)
    assert commands == sorted(f"functions.handlers.{name}" for name in HANDLERS)
    defined = _top_level_functions(REPO_ROOT / "functions" / "handlers.py")
    for function in functions:
        assert function["PackageType"] == "Image"
        assert function["ImageConfig"]["Command"][0].rsplit(".", 1)[1] in defined
        assert function["TracingConfig"] == {"Mode": "Active"}
        assert 128 <= function["MemorySize"] <= 3008 and function["Timeout"] <= 900


def test_the_data_functions_take_the_memory_the_context_gives_them(default: Synth, custom: Synth) -> None:
    """Prepare and Report hold what grows with the data; data_function_memory_mb sizes them, and only them."""
    def memory(synth: Synth) -> dict[str, int]:
        return {f["Properties"]["ImageConfig"]["Command"][0].rsplit(".", 1)[1]: f["Properties"]["MemorySize"]
                for f in synth.resources("AWS::Lambda::Function").values()}

    assert memory(default)["prepare"] == memory(default)["report"] == 3008
    assert memory(custom)["prepare"] == memory(custom)["report"] == 6144
    assert {h: m for h, m in memory(custom).items() if h not in ("prepare", "report")} == {
        h: m for h, m in memory(default).items() if h not in ("prepare", "report")}


def test_context_reaches_every_job_and_function_as_environment(default: Synth, custom: Synth) -> None:
    expected = {
        "TOPX_TOP_X": "20",
        "TOPX_NUM_FACTORS": "32",
        "TOPX_EPOCHS": "5",
        "TOPX_SHARDS": "6",
        "TOPX_RETENTION_DAYS": "14",
        "TOPX_MAX_RMSE": "0.95",
        "TOPX_MIN_AUC": "0.6",
        "TOPX_MIN_RECALL": "0.1",
        "TOPX_HYPERPARAMETERS": '{"epochs": 40, "factors_wd": 0.1}',
        "TOPX_SEARCH_METHOD": "faiss",
    }
    names = {"TOPX_BUCKET", "TOPX_TABLE", "TOPX_TOPIC_ARN", *expected}
    carriers = [f["Properties"] for f in custom.resources("AWS::Lambda::Function").values()] + [
        j["Properties"]["ContainerProperties"] for j in custom.resources("AWS::Batch::JobDefinition").values()
    ]
    assert len(carriers) == len(HANDLERS) + 2
    for carrier in carriers:
        env = _env(carrier)
        assert names <= set(env)
        assert {name: env[name] for name in expected} == expected
    for function in default.resources("AWS::Lambda::Function").values():
        assert _env(function["Properties"])["TOPX_TOP_X"] == "10"


def test_thresholds_reach_the_gate_and_hyperparameters_the_train_job_only_when_set(
    default: Synth, custom: Synth
) -> None:
    optional = {"TOPX_MAX_RMSE", "TOPX_MIN_AUC", "TOPX_MIN_RECALL", "TOPX_HYPERPARAMETERS"}
    for synth in (default, custom):
        functions = synth.resources("AWS::Lambda::Function").values()
        (gate,) = [f for f in functions if f["Properties"]["ImageConfig"]["Command"][0].endswith(".quality_gate")]
        (train,) = [
            j for j in synth.resources("AWS::Batch::JobDefinition").values()
            if j["Properties"]["ContainerProperties"]["Command"] == list(TRAIN_COMMAND)
        ]  # fmt: skip
        gate_env, train_env = _env(gate["Properties"]), _env(train["Properties"]["ContainerProperties"])
        if synth is default:  # unset: no variable, so topx's own defaults (no thresholds) hold
            assert not optional & (set(gate_env) | set(train_env))
        else:
            assert (gate_env["TOPX_MAX_RMSE"], gate_env["TOPX_MIN_AUC"], gate_env["TOPX_MIN_RECALL"]) == (
                "0.95", "0.6", "0.1"
            )
            assert json.loads(train_env["TOPX_HYPERPARAMETERS"]) == {"epochs": 40, "factors_wd": 0.1}


def test_search_method_reaches_the_train_and_search_jobs_only_when_set(default: Synth, custom: Synth) -> None:
    for synth in (default, custom):
        jobs = [j["Properties"]["ContainerProperties"] for j in synth.resources("AWS::Batch::JobDefinition").values()]
        # train and search
        assert sorted(job["Command"] == list(TRAIN_COMMAND) for job in jobs) == [False, True]
        for job in jobs:
            # unset: no variable, so the stages search exactly, topx's default
            assert _env(job).get("TOPX_SEARCH_METHOD") == (None if synth is default else "faiss")


def test_an_unknown_search_method_is_refused_naming_the_key_and_the_choices() -> None:
    with pytest.raises(SettingsError, match=r"context search_method must be one of exact, faiss, hnsw, ivf, got 'annoy'"):
        DeploySettings.from_context({"search_method": "annoy"}.get)


def test_the_dataset_configuration_reaches_every_function_and_job_only_when_set(tmp_path: Path) -> None:
    doc = {"user_col": "customer_id", "item_col": "product_id", "rating_col": "quantity", "objective": "ranking",
           "items": "features/catalogue.parquet", "item_key": "sku", "max_bytes": 5_000_000_000}
    (tmp_path / "dataset.json").write_text(json.dumps(doc))
    for raw in (doc, json.dumps(doc), str(tmp_path / "dataset.json")):  # cdk.json, -c dataset='{...}', a file
        env = DeploySettings.from_context({"dataset": raw}.get).job_environment(bucket="b", table="t", topic_arn="a")
        assert json.loads(env[contract.ENV_DATASET]) == doc
    # The shorthands from before the dataset configuration fold into it.
    env = DeploySettings.from_context({"time_col": "event_time", "half_life_days": "45", "since": "90",
                                       "dataset": {"user_col": "u"}}.get).job_environment(bucket="b", table="t",
                                                                                          topic_arn="a")
    assert json.loads(env[contract.ENV_DATASET]) == {"time_col": "event_time", "half_life_days": 45.0, "since": "90",
                                                     "user_col": "u"}
    env = DeploySettings.from_context({"since": "30", "dataset": {"time_col": "ts"}}.get).job_environment(
        bucket="b", table="t", topic_arn="a")
    assert json.loads(env[contract.ENV_DATASET]) == {"time_col": "ts", "since": "30"}
    plain = DeploySettings().job_environment(bucket="b", table="t", topic_arn="a")
    assert contract.ENV_DATASET not in plain and not any(name.startswith("TOPX_TIME") for name in plain)


@pytest.mark.parametrize(("context", "message"), [
    ({"half_life_days": "30", "dataset": {"no_time_col": True}},
     "context dataset with context half_life_days: half_life_days: needs a time column (time_col)"),
    ({"time_col": "t", "half_life_days": "-3"}, "context half_life_days: expected a positive number of days"),
    ({"time_col": "t", "since": "last week"}, "context since: expected an ISO-8601 date"),
    ({"dataset": {"user_col": ["a"]}}, "context dataset: user_col: expected a column name, or a 0-based position"),
    ({"dataset": '{"objective": "clicks"}'}, "context dataset: objective: expected one of ranking, rating"),
    ({"dataset": {"interactions": "x.csv"}}, "context dataset: interactions: the deployment trains on what arrives"),
    ({"dataset": {"users": "s3://elsewhere/u.csv"}}, "context dataset: users: expected a key under features/ in the data bucket"),
    ({"dataset": "{oops"}, "context dataset: not valid JSON"),
    ({"dataset": "no/such/dataset.json"}, "context dataset (no/such/dataset.json): cannot read the file"),
    ({"time_col": "t", "dataset": {"time_col": "ts"}}, "context time_col is 't' but context dataset sets time_col 'ts'"),
    ({"since": "30", "dataset": {"user_col": "u", "no_time_col": True}},
     "context dataset with context since: since: needs a time column (time_col)"),
])
def test_a_bad_dataset_setting_is_refused_at_synth_naming_the_key_and_the_field(context: dict[str, Any],
                                                                                message: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(message)):
        DeploySettings.from_context(context.get)


def test_a_dataset_file_is_named_in_its_error(tmp_path: Path) -> None:
    (tmp_path / "dataset.json").write_text('{"time_col": "ts", "since": "yesterday"}')
    with pytest.raises(SettingsError, match=re.escape(f"context dataset ({tmp_path / 'dataset.json'}): since: expected "
                                                      "an ISO-8601 date")):
        DeploySettings.from_context({"dataset": str(tmp_path / "dataset.json")}.get)


def test_infra_imports_nothing_of_topx_but_the_contract() -> None:
    """The rest of topx would drag numpy, torch and faiss into `cdk synth` (tests/unit/test_import_cost.py
    checks that the contract does not)."""
    for path in (REPO_ROOT / "infra").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            topx_modules = [m for m in modules if m == "topx" or m.startswith("topx.")]
            assert topx_modules in ([], ["topx.contract"]), path


# --- state machine ---------------------------------------------------------------------------------


def test_state_machine_runs_the_states_in_order(default: Synth) -> None:
    states = _states(default)
    definition = json.loads(_definition(default)[0])
    assert states["GateChoice"]["Choices"] == [
        {"Variable": "$.gate.passed", "BooleanEquals": True, "Next": "Repackage"}
    ]
    assert states["GateChoice"]["Default"] == "ReportRejected"
    assert states["Mode"]["Choices"] == [
        {"And": [{"Variable": "$.mode", "IsPresent": True}, {"Variable": "$.mode", "StringEquals": "refresh"}],
         "Next": "PrepareRefresh"}
    ]
    assert states["Mode"]["Default"] == "Prepare"  # no mode (started by hand), or "full"
    assert states["RefreshChoice"]["Choices"] == [
        {"Variable": "$.refresh.result.refreshed", "BooleanEquals": True, "Next": "UseLiveModel"}
    ]
    assert states["RefreshChoice"]["Default"] == "Prepare"  # nothing live: a full run

    def walk(refresh: bool) -> list[str]:
        path, name = [], definition["StartAt"]
        while name:
            path.append(name)
            state = states[name]
            if state["Type"] == "Choice":
                name = state["Choices"][0]["Next"] if refresh or name == "GateChoice" else state["Default"]
            else:
                name = state.get("Next")
        return path

    assert walk(refresh=False) == MAIN_PATH
    assert walk(refresh=True) == REFRESH_PATH
    refresh = states["PrepareRefresh"]
    assert refresh["Parameters"]["FunctionName"] == states["Prepare"]["Parameters"]["FunctionName"]
    assert refresh["Parameters"]["Payload"]["mode"] == "refresh"
    assert refresh["Catch"][0]["Next"] == "NotifyFailure"  # a bad filter file: notified, nothing searched
    assert (
        states["Train"]["Resource"] == states["Search"]["Resource"] == "arn:aws:states:::batch:submitJob.sync"
    )
    assert states["Search"]["Parameters"]["ArrayProperties"] == {"Size.$": "$.prepare.shards"}
    assert states["Load"]["Type"] == "Map"
    assert states["Load"]["ItemsPath"] == "$.prepare.shard_ids"
    assert states["NotifySuccess"]["Resource"] == "arn:aws:states:::sns:publish"
    # A refused model gets its report too (nothing searched), and the notification names it either way.
    assert states["ReportRejected"]["Parameters"]["Payload"]["searched"] is False
    assert states["ReportRejected"]["Next"] == states["NoRejectedReport"]["Next"] == "NotifyRejected"
    assert "$.report.report" in states["NotifyRejected"]["Parameters"]["Message.$"]
    assert (states["NotifyRejected"]["Next"], states["Rejected"]["Type"]) == ("Rejected", "Fail")
    assert (states["NotifyFailure"]["Next"], states["Fail"]["Type"]) == ("Fail", "Fail")


def test_every_task_retries_and_every_step_is_caught(default: Synth) -> None:
    states = _states(default)
    tasks = {name: state for name, state in states.items() if state["Type"] in ("Task", "Map")}
    inner = states["Load"]["ItemProcessor"]["States"]
    for name, state in {**tasks, **inner}.items():
        if state["Type"] == "Task":
            assert state["Retry"], f"{name} has no Retry"
            retried = {
                error
                for retrier in state["Retry"]
                if retrier["MaxAttempts"] > 0
                for error in retrier["ErrorEquals"]
            }
            assert "InputDataError" not in retried and "States.ALL" not in retried, name
            if state["Resource"] == "arn:aws:states:::lambda:invoke":
                assert state["Retry"][0] == {"ErrorEquals": ["InputDataError"], "MaxAttempts": 0}, name
                assert "States.TaskFailed" not in retried, f"{name} would retry project errors"
        if name in inner:
            continue  # the Map state catches for its iterations
        # A report that fails is kept in the output and the run goes on to publish.
        expected_next = {"NotifySuccess": "Succeed", "NotifyRejected": "Rejected", "NotifyFailure": "Fail",
                         "Report": "Publish", "ReportRejected": "NoRejectedReport"}
        (catcher,) = state["Catch"]
        assert catcher["ErrorEquals"] == ["States.ALL"]
        assert catcher["Next"] == expected_next.get(name, "NotifyFailure"), name
        if name in ("Report", "ReportRejected"):
            assert catcher["ResultPath"] == "$.report_error"
        elif name not in expected_next:
            assert catcher["ResultPath"] == "$.error"
    # A failed Batch job is never run again by Step Functions: an exit code 2 (bad data), a bug or a job the
    # queue cancelled for want of capacity would fail the same way, after another training or another
    # whole array. Batch's own retry strategy retries what infrastructure broke, per job or array child.
    for name in ("Train", "Search"):
        assert [r["ErrorEquals"] for r in states[name]["Retry"]] == [["Batch.AWSBatchException"]], name


def test_every_placeholder_is_filled_by_a_cloudformation_reference(default: Synth) -> None:
    definition, substitutions = _definition(default)
    assert placeholders(definition) == set(substitutions)
    for name, value in substitutions.items():
        assert isinstance(value, dict) and set(value) <= {"Ref", "Fn::GetAtt"}, name
    filled = PLACEHOLDER_RE.sub(lambda m: f"arn:aws:test:::{m.group(1)}", definition)
    assert "${" not in filled
    json.loads(filled)


def test_asl_file_is_plain_json_with_whole_string_placeholders() -> None:
    text = ASL_PATH.read_text(encoding="utf-8")
    names = placeholders(text)
    assert {
        "PrepareFunctionArn",
        "TrainJobQueueArn",
        "SearchJobDefinitionArn",
        "TopicArn",
        "TableName",
    } <= names

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str) and "${" in node:
            assert PLACEHOLDER_RE.fullmatch(node), f"placeholder inside a longer string: {node!r}"

    walk(json.loads(text))


def test_state_machine_logs_everything_and_traces(default: Synth) -> None:
    default.template.has_resource_properties(
        "AWS::StepFunctions::StateMachine",
        {
            "LoggingConfiguration": Match.object_like({"Level": "ALL", "IncludeExecutionData": True}),
            "TracingConfiguration": {"Enabled": True},
        },
    )
    default.template.has_resource_properties(
        "AWS::Logs::LogGroup",
        {"LogGroupName": Match.string_like_regexp("^/aws/vendedlogs/states/"), "RetentionInDays": 30},
    )


def test_state_machine_role_is_granted_each_integration(default: Synth) -> None:
    (policy,) = [
        p["Properties"]["PolicyDocument"]["Statement"]
        for name, p in default.resources("AWS::IAM::Policy").items()
        if name.startswith("PipelineStateMachineRole")
    ]
    by_action: dict[str, list[Any]] = {}
    for statement in policy:
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        resources = (
            statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        )
        for action in actions:
            by_action.setdefault(action, []).extend(resources)
    # Every function but the starter, which its queue invokes and which itself starts the state machine, and
    # the compute health check, which a schedule invokes.
    functions = {k for k in default.resources("AWS::Lambda::Function")
                 if not k.startswith(("FunctionsStarter", "FunctionsComputeHealth"))}
    assert len(functions) == len(HANDLERS) - 2
    assert {r["Fn::GetAtt"][0] for r in by_action["lambda:InvokeFunction"]} == functions
    submit = json.dumps(by_action["batch:SubmitJob"])
    for logical_id in [
        *default.resources("AWS::Batch::JobQueue"),
        *default.resources("AWS::Batch::JobDefinition"),
    ]:
        assert logical_id in submit
    for action in ("batch:DescribeJobs", "batch:TerminateJob", "sns:Publish", "kms:GenerateDataKey"):
        assert action in by_action
    for action in ("events:PutTargets", "events:PutRule", "events:DescribeRule"):
        assert "rule/StepFunctionsGetEventsForBatchJobsRule" in json.dumps(by_action[action])


# --- triggers --------------------------------------------------------------------------------------


def _upload_queue(synth: Synth) -> str:
    """The logical id of the queue the starter reads."""
    (mapping,) = synth.resources("AWS::Lambda::EventSourceMapping").values()
    return mapping["Properties"]["EventSourceArn"]["Fn::GetAtt"][0]


def _rule(synth: Synth, source: str) -> dict[str, Any]:
    return next(r["Properties"] for r in synth.resources("AWS::Events::Rule").values()
                if r["Properties"].get("EventPattern", {}).get("source") == [source])


def test_upload_rule_is_built_from_the_shared_trigger_file_and_queues_the_raw_event(default: Synth) -> None:
    trigger = load_trigger()
    assert trigger["key_prefixes"] == ["incoming/", "config/", "responses/"]
    rule = _rule(default, "aws.s3")
    assert rule["EventPattern"]["detail-type"] == [trigger["detail_type"]]
    assert rule["EventPattern"]["detail"]["object"] == {"key": [{"prefix": "incoming/"}, {"prefix": "config/"},
                                                                {"prefix": "responses/"}]}
    (target,) = rule["Targets"]
    # The starter reads bucket and key from the S3 event itself.
    assert "InputTransformer" not in target and "Input" not in target
    assert target["Arn"] == {"Fn::GetAtt": [_upload_queue(default), "Arn"]}


def test_the_starter_reads_the_queue_in_batching_windows_and_may_start_only_this_state_machine(
        default: Synth) -> None:
    from infra.pipeline import UPLOAD_BATCH_SIZE, UPLOAD_BATCH_WINDOW_S

    (mapping,) = [m["Properties"] for m in default.resources("AWS::Lambda::EventSourceMapping").values()]
    assert mapping["BatchSize"] == UPLOAD_BATCH_SIZE and mapping["MaximumBatchingWindowInSeconds"] == UPLOAD_BATCH_WINDOW_S
    assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    (starter_id,) = [k for k in default.resources("AWS::Lambda::Function") if k.startswith("FunctionsStarter")]
    starter = default.resources("AWS::Lambda::Function")[starter_id]["Properties"]
    (machine_id,) = default.resources("AWS::StepFunctions::StateMachine")
    assert starter["Environment"]["Variables"]["TOPX_STATE_MACHINE_ARN"] == {"Ref": machine_id}
    statements = [st for name, p in default.resources("AWS::IAM::Policy").items() if name.startswith("FunctionsStarter")
                  for st in p["Properties"]["PolicyDocument"]["Statement"]]
    by_action = {a: st["Resource"] for st in statements
                 for a in (st["Action"] if isinstance(st["Action"], list) else [st["Action"]])}
    assert by_action["states:StartExecution"] == by_action["states:ListExecutions"] == {"Ref": machine_id}
    assert machine_id in json.dumps(by_action["states:DescribeExecution"])
    assert not any(a.startswith("s3:") for a in by_action)
    assert by_action["sqs:ReceiveMessage"] == {"Fn::GetAtt": [_upload_queue(default), "Arn"]}


def test_run_ended_rule_queues_the_ends_of_this_state_machine(default: Synth) -> None:
    rule = _rule(default, "aws.states")
    (machine_id,) = default.resources("AWS::StepFunctions::StateMachine")
    assert rule["EventPattern"]["detail"] == {"stateMachineArn": [{"Ref": machine_id}],
                                              "status": ["SUCCEEDED", "FAILED", "TIMED_OUT", "ABORTED"]}
    assert rule["Targets"][0]["Arn"] == {"Fn::GetAtt": [_upload_queue(default), "Arn"]}


def test_schedule_rule_exists_only_when_context_sets_it_and_goes_through_the_starter(default: Synth,
                                                                                     custom: Synth) -> None:
    def scheduled(synth: Synth) -> list[dict[str, Any]]:
        return [
            r["Properties"]
            for r in synth.resources("AWS::Events::Rule").values()
            if "ScheduleExpression" in r["Properties"] and _upload_queue(synth) in json.dumps(r["Properties"])
        ]

    assert scheduled(default) == []
    (rule,) = scheduled(custom)
    assert rule["ScheduleExpression"] == "cron(0 3 * * ? *)"
    (target,) = rule["Targets"]
    assert target["Arn"] == {"Fn::GetAtt": [_upload_queue(custom), "Arn"]} and "Input" not in target


def test_an_event_that_cannot_start_a_run_is_retried_then_kept_and_alarmed(custom: Synth) -> None:
    """Every rule's queue target retries, then sends what it could not deliver to one dead-letter queue;
    a message the starter keeps failing on goes there too; an alarm on that queue tells the topic (an
    upload is never lost silently)."""
    from infra.pipeline import TRIGGER_MAX_EVENT_AGE_HOURS, TRIGGER_RETRY_ATTEMPTS, UPLOAD_MAX_RECEIVES

    queues = custom.resources("AWS::SQS::Queue")
    upload_queue = _upload_queue(custom)
    (dead_id,) = set(queues) - {upload_queue}
    assert queues[upload_queue]["Properties"]["RedrivePolicy"] == {
        "deadLetterTargetArn": {"Fn::GetAtt": [dead_id, "Arn"]}, "maxReceiveCount": UPLOAD_MAX_RECEIVES}
    rules = [r["Properties"] for r in custom.resources("AWS::Events::Rule").values()
             if upload_queue in json.dumps(r["Properties"]["Targets"])]
    assert len(rules) == 3  # uploads, ends of runs, the schedule
    for rule in rules:
        (target,) = rule["Targets"]
        assert target["Arn"] == {"Fn::GetAtt": [upload_queue, "Arn"]}
        assert target["DeadLetterConfig"]["Arn"] == {"Fn::GetAtt": [dead_id, "Arn"]}
        assert target["RetryPolicy"] == {"MaximumRetryAttempts": TRIGGER_RETRY_ATTEMPTS,
                                         "MaximumEventAgeInSeconds": TRIGGER_MAX_EVENT_AGE_HOURS * 3600}
    alarms = [a["Properties"] for a in custom.resources("AWS::CloudWatch::Alarm").values()
              if a["Properties"].get("Namespace") == "AWS/SQS"]
    (alarm,) = alarms
    assert alarm["MetricName"] == "ApproximateNumberOfMessagesVisible" and alarm["AlarmActions"]
    assert alarm["Dimensions"] == [{"Name": "QueueName", "Value": {"Fn::GetAtt": [dead_id, "QueueName"]}}]
    for queue in queues.values():
        assert queue["Properties"]["SqsManagedSseEnabled"] is True


def _log_bucket(synth: Synth) -> str:
    """The logical id of the access-log bucket (the one other buckets log into)."""
    data = synth.only_with("AWS::S3::Bucket", "LoggingConfiguration")
    return data["LoggingConfiguration"]["DestinationBucketName"]["Ref"]


# --- operations ------------------------------------------------------------------------------------


def test_topic_is_encrypted_and_alarms_feed_it(default: Synth, custom: Synth) -> None:
    default.template.has_resource_properties("AWS::SNS::Topic", {"KmsMasterKeyId": Match.any_value()})
    default.template.has_resource_properties("AWS::KMS::Key", {"EnableKeyRotation": True})
    default.template.has_resource_properties(
        "AWS::SNS::TopicPolicy",
        {
            "PolicyDocument": Match.object_like(
                {
                    "Statement": Match.array_with(
                        [
                            Match.object_like(
                                {"Effect": "Deny", "Condition": {"Bool": {"aws:SecureTransport": "false"}}}
                            )
                        ]
                    )
                }
            )
        },
    )
    default.template.has_resource_properties(
        "AWS::CloudWatch::Alarm",
        {"MetricName": "ExecutionsFailed", "Namespace": "AWS/States", "AlarmActions": [Match.any_value()]},
    )
    default.template.has_resource_properties(
        "AWS::Events::Rule",
        {
            "EventPattern": {
                "source": ["aws.batch"],
                "detail-type": ["Batch Job State Change"],
                "detail": {"status": ["FAILED"], "jobQueue": Match.any_value()},
            }
        },
    )
    default.template.resource_count_is("AWS::SNS::Subscription", 0)
    custom.template.has_resource_properties(
        "AWS::SNS::Subscription", {"Protocol": "email", "Endpoint": "ops@example.com"}
    )


def test_lambda_throttles_of_every_function_sum_into_one_alarm(default: Synth) -> None:
    functions = set(default.resources("AWS::Lambda::Function"))
    (alarm,) = [a["Properties"] for a in default.resources("AWS::CloudWatch::Alarm").values()
                if "Metrics" in a["Properties"]]
    (expression,) = [m for m in alarm["Metrics"] if "Expression" in m]
    assert expression["Expression"] == "SUM(METRICS())" and expression["ReturnData"] is True
    throttled = [m["MetricStat"] for m in alarm["Metrics"] if "MetricStat" in m]
    assert {(s["Metric"]["Namespace"], s["Metric"]["MetricName"], s["Stat"]) for s in throttled} == {
        ("AWS/Lambda", "Throttles", "Sum")}
    assert {s["Metric"]["Dimensions"][0]["Value"]["Ref"] for s in throttled} == functions
    assert len(functions) == len(HANDLERS)
    assert alarm["Threshold"] == 1 and alarm["AlarmActions"] == [{"Ref": _topic(default)}]


def test_a_blocked_batch_queue_of_ours_reaches_the_topic_with_its_reason(default: Synth) -> None:
    """A job that cannot start (its compute environment INVALID, no instance type that fits, no capacity) shows
    as the queue's head job blocked ("Batch Job Queue Blocked", with the reason), on our queues only."""
    queues = sorted(default.resources("AWS::Batch::JobQueue"))
    (rule,) = [r["Properties"] for r in default.resources("AWS::Events::Rule").values()
               if r["Properties"].get("EventPattern", {}).get("detail-type") == ["Batch Job Queue Blocked"]]
    assert rule["EventPattern"]["source"] == ["aws.batch"]
    assert sorted(q["Fn::GetAtt"][0] for q in rule["EventPattern"]["detail"]["jobQueue"]) == queues
    (target,) = rule["Targets"]
    assert target["Arn"] == {"Ref": _topic(default)}
    transformer = target["InputTransformer"]
    assert transformer["InputPathsMap"]["detail-statusReason"] == "$.detail.statusReason"
    assert "<detail-statusReason>" in transformer["InputTemplate"]


def test_a_schedule_checks_the_compute_environments_and_an_alarm_watches_what_it_counts(default: Synth) -> None:
    """AWS Batch sends no event when a compute environment becomes INVALID: the compute health function, on
    a schedule, asks Batch about both of the stack's environments and emits the count of bad ones."""
    from infra.notifications import HEALTH_CHECK_EVERY

    (function_id,) = [k for k in default.resources("AWS::Lambda::Function") if k.startswith("FunctionsComputeHealth")]
    function = default.resources("AWS::Lambda::Function")[function_id]["Properties"]
    assert function["ImageConfig"]["Command"] == ["functions.handlers.compute_health"]
    checked = json.dumps(_env(function)[contract.ENV_COMPUTE_ENVIRONMENTS])
    environments = sorted(default.resources("AWS::Batch::ComputeEnvironment"))
    assert len(environments) == 2 and all(environment in checked for environment in environments)
    (rule,) = [r["Properties"] for r in default.resources("AWS::Events::Rule").values()
               if function_id in json.dumps(r["Properties"].get("Targets", []))]
    assert rule["ScheduleExpression"] == f"rate({HEALTH_CHECK_EVERY.to_minutes()} minutes)"
    (target,) = rule["Targets"]
    assert target["RetryPolicy"]["MaximumRetryAttempts"] == 2 and "DeadLetterConfig" in target
    (alarm,) = [a["Properties"] for a in default.resources("AWS::CloudWatch::Alarm").values()
                if a["Properties"].get("MetricName") == contract.METRIC_COMPUTE_UNHEALTHY]
    assert alarm["Namespace"] == contract.METRICS_NAMESPACE and alarm["Statistic"] == "Maximum"
    assert {d["Name"]: d["Value"] for d in alarm["Dimensions"]} == {
        contract.SERVICE_DIMENSION: "Topx", contract.STAGE_DIMENSION: "compute_health"}
    assert alarm["Threshold"] == 1 and alarm["AlarmActions"] == [{"Ref": _topic(default)}]
    # Its role: DescribeComputeEnvironments (no resource-level permissions), and no S3 or table access.
    role = function["Role"]["Fn::GetAtt"][0]
    granted = json.dumps([p["Properties"]["PolicyDocument"] for p in default.resources("AWS::IAM::Policy").values()
                          if {"Ref": role} in p["Properties"]["Roles"]])
    assert "batch:DescribeComputeEnvironments" in granted and "s3:" not in granted and "dynamodb:" not in granted


def _topic(synth: Synth) -> str:
    (topic,) = synth.resources("AWS::SNS::Topic")
    return topic


def _dashboard_metrics(synth: Synth) -> list[list[Any]]:
    """Each metric line of the dashboard's graphs, its CloudFormation references rendered as {Ref: id}."""
    body = synth.only("AWS::CloudWatch::Dashboard")["DashboardBody"]["Fn::Join"][1]
    text = "".join(part if isinstance(part, str) else json.dumps(json.dumps(part))[1:-1] for part in body)
    widgets = json.loads(text)["widgets"]
    return [line for w in widgets if w["type"] == "metric" for line in w["properties"].get("metrics", [])]


def test_the_dashboard_charts_runs_durations_quality_and_failures(default: Synth) -> None:
    lines = _dashboard_metrics(default)
    charted = {(line[0], line[1]) for line in lines}
    for name in ("ExecutionsStarted", "ExecutionsSucceeded", "ExecutionsFailed", "ExecutionsTimedOut", "ExecutionTime"):
        assert ("AWS/States", name) in charted
    assert {("AWS/Lambda", "Errors"), ("AWS/Lambda", "Throttles")} <= charted
    # The EMF metrics, under the dimensions the handlers and jobs emit them with: the stack's name, the stage.
    topx = {(line[1], line[5]) for line in lines if line[0] == contract.METRICS_NAMESPACE}
    assert all(line[2:5:2] == [contract.SERVICE_DIMENSION, contract.STAGE_DIMENSION] and line[3] == "Topx"
               for line in lines if line[0] == contract.METRICS_NAMESPACE)
    stages = {*HANDLERS, "train", "search"}
    assert {stage for name, stage in topx if name == contract.METRIC_STAGE_SECONDS} == stages
    assert {stage for name, stage in topx if name == contract.METRIC_STAGE_FAILURES} == stages
    assert {(contract.METRIC_RECALL, "publish"), (contract.METRIC_LIFT, "publish"),
            (contract.METRIC_USERS_PUBLISHED, "publish"), (contract.METRIC_TRAIN_EPOCHS, "train"),
            (contract.METRIC_SEARCHED_USERS, "search")} <= topx


def test_the_dashboard_shows_every_alarm_and_every_function_s_errors(default: Synth) -> None:
    body = json.dumps(default.only("AWS::CloudWatch::Dashboard")["DashboardBody"])
    for alarm in default.resources("AWS::CloudWatch::Alarm"):
        assert alarm in body
    for group in default.resources("AWS::Logs::LogGroup"):
        function_group = any(f["Properties"]["LoggingConfig"]["LogGroup"] == {"Ref": group}
                             for f in default.resources("AWS::Lambda::Function").values())
        assert (group in body) == function_group


def test_functions_and_jobs_name_the_stack_as_their_metrics_service(default: Synth) -> None:
    carriers = [f["Properties"] for f in default.resources("AWS::Lambda::Function").values()] + [
        j["Properties"]["ContainerProperties"] for j in default.resources("AWS::Batch::JobDefinition").values()
    ]
    assert [_env(carrier)[contract.ENV_SERVICE_NAME] for carrier in carriers] == ["Topx"] * len(carriers)


def test_named_outputs(default: Synth) -> None:
    for name in ("BucketName", "TableName", "StateMachineArn", "TopicArn"):
        default.template.has_output(name, {"Value": Match.any_value()})


# --- whole-template checks -------------------------------------------------------------------------


def test_cdk_nag_reports_nothing(default: Synth, custom: Synth) -> None:
    for synth in (default, custom):
        # The app's own AwsSolutions plugin ran during synth (a finding would have failed it) ...
        report = json.loads((synth.outdir / "validation-report.json").read_text(encoding="utf-8"))
        assert all(r["conclusion"] == "success" and r["violations"] == [] for r in report["pluginReports"])
        # ... and the same checks, run directly, leave no error and no warning unacknowledged.
        direct = AwsSolutionsChecks().validate_scope(synth.app)
        findings = [
            (v.rule_name, v.severity, [r.construct_path for r in v.violating_resources])
            for v in direct.violations
        ]
        assert findings == []


def test_no_error_or_warning_annotations(default: Synth, custom: Synth) -> None:
    """Neither CDK (deprecations, unsupported settings) nor a rule pack left an error or a warning: the only
    warnings are the stack's own, of base images built from tags (the test above)."""
    for synth in (default, custom):
        annotations = Annotations.from_stack(synth.stack)
        assert annotations.find_error("*", Match.string_like_regexp("AwsSolutions-.*")) == []
        assert annotations.find_warning("*", Match.string_like_regexp("AwsSolutions-.*")) == []
        assert annotations.find_error("*", Match.any_value()) == []
        others = [w for w in annotations.find_warning("*", Match.any_value())
                  if "builds FROM its base image's tag" not in str(w.entry.data)]
        assert others == []


def test_cdk_nag_checks_are_live(tmp_path: Path) -> None:
    """A control: the same checks flag a bare bucket, and the app's synth refuses it."""
    app, stack = build_app(outdir=str(tmp_path))
    s3.Bucket(stack, "Unhardened")
    found = {v.rule_name for v in AwsSolutionsChecks().validate_scope(app).violations}
    assert {"AwsSolutions-S1", "AwsSolutions-S10"} <= found
    with pytest.raises(RuntimeError, match="ValidationFailed"):
        app.synth()


def test_cfn_lint_finds_no_errors(default: Synth, custom: Synth) -> None:
    from cfnlint.api import ManualArgs, lint_file

    for synth in (default, custom):
        matches = lint_file(
            synth.outdir / "Topx.template.json", config=ManualArgs(regions=["us-east-1", "eu-west-1"])
        )
        # W3005 is the redundant DependsOn CDK writes next to a GetAtt; everything else must be clean.
        assert [f"{m.rule.id} {m.message}" for m in matches if m.rule.id != "W3005"] == []


def test_base_image_digests_reach_the_builds_as_build_arguments(default: Synth, custom: Synth) -> None:
    """Context base_image_digests pins each named image's base (its Dockerfile's BASE_DIGEST); the others,
    and every image by default, build from their tag."""
    def build_args(synth: Synth) -> dict[str, Any]:
        manifest = json.loads((synth.outdir / "Topx.assets.json").read_text(encoding="utf-8"))
        return {image["source"]["dockerFile"]: image["source"].get("dockerBuildArgs")
                for image in manifest["dockerImages"].values()}

    assert build_args(default) == dict.fromkeys((FUNCTIONS_DOCKERFILE, TRAIN_DOCKERFILE, SEARCH_DOCKERFILE))
    assert build_args(custom) == {FUNCTIONS_DOCKERFILE: {"BASE_DIGEST": "sha256:" + "0f" * 32},
                                  TRAIN_DOCKERFILE: {"BASE_DIGEST": "sha256:" + "a1" * 32},
                                  SEARCH_DOCKERFILE: None}


def test_synth_needs_no_docker_and_stages_lean_build_contexts(default: Synth) -> None:
    manifest = json.loads((default.outdir / "Topx.assets.json").read_text(encoding="utf-8"))
    images = manifest["dockerImages"].values()
    files = sorted(image["source"]["dockerFile"] for image in images)
    assert files == sorted([FUNCTIONS_DOCKERFILE, SEARCH_DOCKERFILE, TRAIN_DOCKERFILE])
    assert all(image["source"].get("platform") == "linux/amd64" for image in images)
    for image in images:
        staged = default.outdir / image["source"]["directory"]
        assert (staged / "topx").is_dir()
        # What the Dockerfile copies is there (its own requirement files among it); the test environment's
        # requirements.txt is not.
        copies = [shlex.split(rest) for name, rest in dockerfile_instructions(image["source"]["dockerFile"])
                  if name == "COPY"]
        for *sources, _destination in copies:
            assert all((staged / source).exists() for source in sources), (image["source"]["dockerFile"], sources)
        for absent in (".venv", ".git", "tests", "infra", "cdk.out", "docs", "benchmarks", "requirements.txt"):
            assert not (staged / absent).exists(), f"{absent} staged into {staged.name}"
        assert not list(staged.rglob("__pycache__"))
    # No file assets besides the template: nothing is bundled, so nothing needs Docker at synth time.
    bundles = [
        f for f in manifest.get("files", {}).values() if not f["source"]["path"].endswith(".template.json")
    ]
    assert bundles == []


def _imported_at_module_level(path: Path) -> set[str]:
    """The modules a file imports when it is imported (an import inside a function waits for its call)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        for inner in ast.walk(node) if not isinstance(node, ast.FunctionDef | ast.ClassDef) else ():
            if isinstance(inner, ast.Import):
                found.update(alias.name for alias in inner.names)
            elif isinstance(inner, ast.ImportFrom) and inner.module:
                found.update([inner.module, *(f"{inner.module}.{alias.name}" for alias in inner.names)])
    return found


def test_the_images_leave_out_the_offline_package_and_nothing_they_run_imports_it(default: Synth) -> None:
    """topx/offline (moto, the demo) is an optional extra: the staged contexts leave it out, so `COPY topx`
    cannot ship it, and no module that is staged imports it on import (the CLI imports the demo only when
    `topx demo` runs, which no image does)."""
    assert (REPO_ROOT / "topx" / "offline" / "__init__.py").is_file()
    manifest = json.loads((default.outdir / "Topx.assets.json").read_text(encoding="utf-8"))
    for image in manifest["dockerImages"].values():
        staged = default.outdir / image["source"]["directory"]
        assert not (staged / "topx" / "offline").exists(), f"topx/offline staged into {staged.name}"
        for path in staged.rglob("*.py"):
            offline = {name for name in _imported_at_module_level(path) if name.startswith("topx.offline")}
            assert not offline, f"{path.relative_to(staged)} imports {sorted(offline)}"


# --- Dockerfiles -----------------------------------------------------------------------------------


def _top_level_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}


def _has_main_guard(path: Path) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body)


def test_functions_image_cmd_names_an_existing_handler() -> None:
    (handler,) = exec_form(FUNCTIONS_DOCKERFILE, "CMD")
    module, function = handler.rsplit(".", 1)
    path = REPO_ROOT / (module.replace(".", "/") + ".py")
    assert path.is_file(), path
    assert function in _top_level_functions(path)
    assert set(HANDLERS) <= _top_level_functions(path)


@pytest.mark.parametrize(
    ("dockerfile", "command"), [(TRAIN_DOCKERFILE, TRAIN_COMMAND), (SEARCH_DOCKERFILE, SEARCH_COMMAND)]
)
def test_batch_image_cmd_and_job_command_name_an_existing_main(
    dockerfile: str, command: tuple[str, ...]
) -> None:
    cmd = exec_form(dockerfile, "CMD")
    assert cmd[:2] == ["python", "-m"] and cmd == list(command[:3])
    path = REPO_ROOT / (cmd[2].replace(".", "/") + ".py")
    assert path.is_file(), path
    assert "main" in _top_level_functions(path) and _has_main_guard(path)
    for package in Path(cmd[2].replace(".", "/")).parents:
        if str(package) != ".":
            assert (REPO_ROOT / package / "__init__.py").is_file(), package


@pytest.mark.parametrize(
    ("dockerfile", "exclude"),
    [
        (FUNCTIONS_DOCKERFILE, FUNCTIONS_EXCLUDE),
        (TRAIN_DOCKERFILE, BATCH_EXCLUDE),
        (SEARCH_DOCKERFILE, BATCH_EXCLUDE),
    ],
)
def test_dockerfile_copies_only_what_the_staged_context_holds(
    dockerfile: str, exclude: tuple[str, ...]
) -> None:
    copies = [shlex.split(rest) for name, rest in dockerfile_instructions(dockerfile) if name == "COPY"]
    assert copies
    for *sources, _destination in copies:
        for source in sources:
            assert (REPO_ROOT / source).exists(), f"{dockerfile} copies missing {source}"
            assert source.split("/")[0] not in exclude, f"{dockerfile} copies excluded {source}"


def test_the_offline_extra_is_pinned_as_requirements_txt_pins_it() -> None:
    """`pip install 'topx[offline]'` gets the moto the offline layer patches, tested with it, and what moto
    needs to run state machines; `make` (requirements.txt) installs the same versions."""
    from topx.offline import MOTO_VERSION_TESTED

    pins = {}
    for line in (REPO_ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==", line.strip())
        if match:
            pins[match.group(1).lower()] = line.strip()
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extra = project["optional-dependencies"]["offline"]
    names = [re.split(r"[<>=!~ \[;]", dep)[0].lower() for dep in extra]
    assert set(names) == {"moto", "antlr4-python3-runtime", "jsonpath-ng"}
    assert [pins[name] for name in names] == extra
    assert f"moto=={MOTO_VERSION_TESTED}" in extra


# --- context parsing (no synthesis) ----------------------------------------------------------------


def test_settings_defaults_and_command_line_strings() -> None:
    assert DeploySettings.from_context(lambda name: None) == DeploySettings()
    settings = DeploySettings.from_context(CUSTOM_CONTEXT.get)
    assert settings.top_x == 20 and settings.shards == 6 and settings.spot is True
    assert settings.gpu_instance_types == ("g6.2xlarge",)
    assert DeploySettings.from_context(
        {"gpu_instance_types": "g5.xlarge, g6.xlarge"}.get
    ).gpu_instance_types == (
        "g5.xlarge",
        "g6.xlarge",
    )
    assert DeploySettings.from_context({"schedule": ""}.get).schedule is None
    assert (settings.max_rmse, settings.min_auc, settings.min_recall) == (0.95, 0.6, 0.1)
    assert json.loads(settings.hyperparameters or "") == {"epochs": 40, "factors_wd": 0.1}
    # cdk.json gives JSON values; an empty `-c name=` leaves an option unset.
    from_json = DeploySettings.from_context({"max_rmse": 1, "hyperparameters": {"factors_lr": "0.02"}}.get)
    assert from_json.max_rmse == 1.0 and json.loads(from_json.hyperparameters or "") == {"factors_lr": "0.02"}
    cleared = DeploySettings.from_context({"min_recall": "", "hyperparameters": " ", "search_method": ""}.get)
    assert cleared.min_recall is None and cleared.hyperparameters is None and cleared.search_method is None
    assert settings.search_method == "faiss"
    for method in contract.SEARCH_METHODS:
        chosen = DeploySettings.from_context({"search_method": method}.get)
        assert chosen.job_environment(bucket="b", table="t", topic_arn="a")["TOPX_SEARCH_METHOD"] == method
    assert "TOPX_SEARCH_METHOD" not in DeploySettings().job_environment(bucket="b", table="t", topic_arn="a")


def test_synth_warns_of_each_image_built_from_a_tag_and_not_of_one_pinned_by_digest(default: Synth,
                                                                                    custom: Synth) -> None:
    def warned(synth: Synth) -> set[str]:
        found = Annotations.from_stack(synth.stack).find_warning("*", Match.string_like_regexp("builds FROM"))
        return {w.entry.data.split(" image builds")[0].removeprefix("the ") for w in found}

    assert warned(default) == {"functions", "train", "search"}
    assert warned(custom) == {"search"}  # the custom context pins train and functions


@pytest.mark.parametrize(
    "context",
    [
        {"shards": "1"},
        {"top_x": "ten"},
        {"spot": "maybe"},
        {"max_vcpus": "2"},
        {"schedule": "every day"},
        {"gpu_instance_types": "[]"},
        {"notification_email": "nobody"},
        {"retention_days": "0"},
        {"max_rmse": "0"},
        {"max_rmse": "nan"},
        {"max_rmse": "inf"},
        {"min_auc": "1.5"},
        {"min_auc": "high"},
        {"min_recall": "-0.1"},
        {"min_recall": "true"},
        {"hyperparameters": "[40]"},
        {"hyperparameters": "epochs=40"},
        {"hyperparameters": '{"epoch": 40}'},
        {"hyperparameters": '{"epochs": 0}'},
        {"hyperparameters": '{"epochs": 2.5}'},
        {"hyperparameters": '{"factors_lr": "NaN"}'},
        {"hyperparameters": '{"validation_fraction": 0.5}'},
        {"hyperparameters": '{"predictor_type": "binary_classifier"}'},
        {"search_method": "annoy"},
        {"data_function_memory_mb": "2048"},
        {"data_function_memory_mb": "10241"},
        {"search_method": "FAISS"},
        {"search_method": ["faiss"]},
        {"base_image_digests": '{"train": "sha256:abc"}'},
        {"base_image_digests": '{"train": "python:3.11-slim-bookworm@sha256:' + "a1" * 32 + '"}'},
        {"base_image_digests": '{"gpu": "sha256:' + "a1" * 32 + '"}'},
        {"base_image_digests": '["sha256:' + "a1" * 32 + '"]'},
    ],
)
def test_settings_reject_values_the_stack_cannot_use(context: dict[str, str]) -> None:
    with pytest.raises(SettingsError, match=next(iter(context))):
        DeploySettings.from_context(context.get)


def _hyperparameter_samples() -> list[tuple[str, Any]]:
    """Each settable hyperparameter at and just beyond the ends of its range, as the contract states them."""
    samples: list[tuple[str, Any]] = []
    for name, (kind, low, high) in contract.HYPERPARAMETER_RANGES.items():
        step = 1 if kind is int else 0.001
        for value in (low - step, low, high - step, high):
            if value not in (float("inf"), float("-inf")):
                samples.append((name, kind(value)))
        samples.append((name, "x"))
    for name, choices in contract.HYPERPARAMETER_CHOICES.items():
        samples += [(name, choice) for choice in choices] + [(name, "x"), (name, 1)]
    return samples


def test_settings_accept_exactly_the_hyperparameters_the_contract_names() -> None:
    settable = [*contract.HYPERPARAMETER_RANGES, *contract.HYPERPARAMETER_CHOICES]
    for name, (kind, low, _) in contract.HYPERPARAMETER_RANGES.items():
        DeploySettings(hyperparameters=json.dumps({name: kind(low if math.isfinite(low) else 0)}))
    for name, choices in contract.HYPERPARAMETER_CHOICES.items():
        DeploySettings(hyperparameters=json.dumps({name: choices[0]}))
    for name in contract.FIXED_HYPERPARAMETERS:
        fixed = rf"context hyperparameters: {name} follows each upload's topx-mode"
        with pytest.raises(SettingsError, match=fixed):
            DeploySettings(hyperparameters=json.dumps({name: "regressor"}))
    with pytest.raises(SettingsError) as refused:
        DeploySettings(hyperparameters='{"factor_lr": 0.1}')
    assert str(refused.value) == (
        f"context hyperparameters: unknown hyperparameter 'factor_lr'; known: {', '.join(settable)}"
    )


@pytest.mark.parametrize(
    ("hyperparameters", "message"),
    [
        ('{"epochs": 0}', "context hyperparameters: epochs must be at least 1, got 0"),
        (
            '{"validation_fraction": 0.5}',
            r"context hyperparameters: validation_fraction must be in \[0, 0.5\), got 0.5",
        ),
        ('{"learner": "als"}', "context hyperparameters: learner must be one of sgd, icd, got 'als'"),
        ('{"num_factors": "many"}', "context hyperparameters: num_factors: cannot read 'many'"),
    ],
)
def test_an_out_of_range_hyperparameter_is_refused_naming_it(hyperparameters: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        DeploySettings.from_context({"hyperparameters": hyperparameters}.get)


@pytest.mark.parametrize(("name", "value"), _hyperparameter_samples())
def test_hyperparameters_infra_accepts_are_those_topx_accepts(name: str, value: Any) -> None:
    """Synth refuses what training (topx.aws.stages.parse_hyperparameters, which the train job runs on the
    value) would refuse, and accepts what it would accept (it is stricter only about an integer written
    as a fraction or a boolean, which topx would truncate)."""
    stages = pytest.importorskip("topx.aws.stages")
    errors = pytest.importorskip("topx.errors")
    text = json.dumps({name: value})
    try:
        stages.parse_hyperparameters(text, "TOPX_HYPERPARAMETERS")
        topx_accepts = True
    except errors.ConfigError:
        topx_accepts = False
    try:
        DeploySettings(hyperparameters=text)
        infra_accepts = True
    except SettingsError:
        infra_accepts = False
    assert infra_accepts == topx_accepts, text


def test_the_model_size_is_unset_by_default_so_the_train_job_uses_the_objectives_defaults(monkeypatch):
    """No TOPX_NUM_FACTORS / TOPX_EPOCHS unless context sets them: the deployed ranking model is then the one
    `topx run` trains with no flags; set, they reach the job as given (an empty value leaves them unset)."""
    from topx.aws.stages import training_hyperparameters
    from topx.config import default_hyperparameters

    plain = DeploySettings.from_context({}.get).job_environment(bucket="b", table="t", topic_arn="a")
    assert contract.ENV_NUM_FACTORS not in plain and contract.ENV_EPOCHS not in plain
    for name in (contract.ENV_NUM_FACTORS, contract.ENV_EPOCHS, contract.ENV_HYPERPARAMETERS):
        monkeypatch.delenv(name, raising=False)
    for objective in ("ranking", "rating"):
        assert training_hyperparameters(objective == "ranking", {}) == default_hyperparameters(objective)
    sized = DeploySettings.from_context({"num_factors": "48", "epochs": 12}.get).job_environment(
        bucket="b", table="t", topic_arn="a")
    assert sized[contract.ENV_NUM_FACTORS] == "48" and sized[contract.ENV_EPOCHS] == "12"
    empty = DeploySettings.from_context({"epochs": ""}.get)
    assert empty.epochs is None
    with pytest.raises(SettingsError, match="epochs must be at least 1"):
        DeploySettings.from_context({"epochs": "0"}.get)
