"""The offline execution layer (topx/offline/): it deploys what CDK deploys, and patches moto only where needed.

The placeholders, the upload rule, the functions' handlers and the jobs' commands are checked against the
synthesized template, so the offline pipeline cannot drift from the deployed one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from unittest import mock

import boto3
import pytest
from moto import mock_aws

from infra.lambdas import SPECS
from infra.pipeline import placeholders
from infra.settings import ASL_PATH, DATASET_SHORTHANDS, DeploySettings
from topx import offline
from topx.contract import (
    BATCH_RETRY_STRATEGIES,
    ENV_SERVICE_NAME,
    HANDLER_MODULE,
    SEARCH_COMMAND,
    TRAIN_COMMAND,
)
from topx.errors import ConfigError
from topx.offline import patches
from topx.offline.deploy import STARTER_HANDLER, _create_job
from topx.offline.execute import _Attempt, retry_action
from topx.offline.patches import (
    _fresh_token_per_attempt,
    _normalise_batch_parameters,
    _normalise_batch_response,
)

DUMMY = offline.LocalPipeline(
    region="us-east-1", bucket="b", table="t", topic_arn="arn:topic",
    function_arns={name: f"arn:function:{name}" for name in offline.FUNCTION_PLACEHOLDERS},
    train_queue_arn="arn:tq", train_definition_arn="arn:td", search_queue_arn="arn:sq", search_definition_arn="arn:sd",
    state_machine_arn="arn:sm", rule_name="r", inbox_queue_url="q",
)


@pytest.fixture(scope="module")
def template(default_app: tuple[Any, Any, Path]) -> dict[str, Any]:
    from aws_cdk.assertions import Template

    return Template.from_stack(default_app[1]).to_json()


def _resources(template: dict[str, Any], resource_type: str) -> dict[str, dict[str, Any]]:
    return {k: v["Properties"] for k, v in template["Resources"].items() if v["Type"] == resource_type}


def _substitutions(template: dict[str, Any]) -> dict[str, Any]:
    (machine,) = _resources(template, "AWS::StepFunctions::StateMachine").values()
    return machine["DefinitionSubstitutions"]


def _referenced(template: dict[str, Any], value: dict[str, Any]) -> dict[str, Any]:
    """The properties of the resource a {"Ref": id} or {"Fn::GetAtt": [id, attr]} points at."""
    logical_id = value["Ref"] if "Ref" in value else value["Fn::GetAtt"][0]
    return template["Resources"][logical_id]["Properties"]


# --------------------------------------------------------------------------- the same definition as CDK's


def test_placeholders_are_exactly_those_cdk_substitutes(template: dict[str, Any]) -> None:
    text = ASL_PATH.read_text(encoding="utf-8")
    offered = set(DUMMY.substitutions())
    assert offered == placeholders(text) == offline.placeholders(text)
    assert offered == set(_substitutions(template))
    filled = offline.fill_definition(offline.load_definition(), DUMMY.substitutions())
    assert "${" not in filled
    assert json.loads(filled)["States"]["Prepare"]["Parameters"]["FunctionName"] == "arn:function:prepare"


def test_a_placeholder_without_a_value_or_a_value_without_a_placeholder_is_refused() -> None:
    values = DUMMY.substitutions()
    with pytest.raises(offline.DefinitionError, match="placeholders without a value: \\['TopicArn'\\]"):
        offline.fill_definition(offline.load_definition(), {k: v for k, v in values.items() if k != "TopicArn"})
    with pytest.raises(offline.DefinitionError, match="values without a placeholder: \\['Extra'\\]"):
        offline.fill_definition(offline.load_definition(), {**values, "Extra": "x"})


def test_each_function_placeholder_names_the_function_running_that_handler(template: dict[str, Any]) -> None:
    from infra.lambdas import STATE_MACHINE_HANDLERS

    # Every function but the starter, which its queue invokes (offline: topx.offline.deliver), and the compute
    # health check, which a schedule invokes.
    assert set(offline.FUNCTION_PLACEHOLDERS) == set(STATE_MACHINE_HANDLERS) == {spec.handler for spec in SPECS} - {
        STARTER_HANDLER, "compute_health"}
    substitutions = _substitutions(template)
    for handler, placeholder in offline.FUNCTION_PLACEHOLDERS.items():
        function = _referenced(template, substitutions[placeholder])
        assert function["ImageConfig"]["Command"] == [f"{HANDLER_MODULE}.{handler}"], placeholder


def test_job_definitions_run_the_commands_and_parameters_cdk_deploys(template: dict[str, Any]) -> None:
    substitutions = _substitutions(template)
    for placeholder, command, defaults, job in (("TrainJobDefinitionArn", TRAIN_COMMAND, {"bucket"}, "train"),
                                                ("SearchJobDefinitionArn", SEARCH_COMMAND, {"bucket", "shards"},
                                                 "search")):
        definition = _referenced(template, substitutions[placeholder])
        assert definition["ContainerProperties"]["Command"] == list(command)
        # The retry strategy the offline job definitions get (the contract's), in CloudFormation's spelling.
        retry = BATCH_RETRY_STRATEGIES[job]
        assert definition["RetryStrategy"] == {"Attempts": retry["attempts"], "EvaluateOnExit": [
            {name[0].upper() + name[1:]: value for name, value in rule.items()} for rule in retry["evaluateOnExit"]]}
        assert set(definition["Parameters"]) == defaults
        names = {item["Name"] for item in definition["ContainerProperties"]["Environment"]}
        # The settings' environment, and the stack's name as the service of the logs and metrics.
        assert names == set(offline.LocalSettings().environment(bucket="b", table="t", topic_arn="a")) | {ENV_SERVICE_NAME}


SETTINGS_ENV = (
    "TOPX_TOP_X", "TOPX_NUM_FACTORS", "TOPX_EPOCHS", "TOPX_SHARDS", "TOPX_RETENTION_DAYS",
    "TOPX_MAX_RMSE", "TOPX_MIN_AUC", "TOPX_MIN_RECALL", "TOPX_HYPERPARAMETERS", "TOPX_SEARCH_METHOD",
    "TOPX_DATASET",
)  # fmt: skip


def test_local_settings_have_every_deploy_setting_that_reaches_the_environment() -> None:
    not_environment = {"gpu_instance_types", "spot", "max_vcpus", "schedule", "notification_email", "base_image_digests",
                       "data_function_memory_mb"}
    # The dataset shorthands are context parameters folded into DeploySettings.dataset; LocalSettings takes them too.
    assert set(offline.LocalSettings.__dataclass_fields__) == (
        set(DeploySettings.__dataclass_fields__) - not_environment | set(DATASET_SHORTHANDS))


@pytest.mark.parametrize(
    "values",
    [
        {"top_x": 7, "num_factors": 9, "epochs": 2, "shards": 3, "retention_days": 5},
        {"max_rmse": 0.95, "min_auc": 1, "min_recall": 0.1, "hyperparameters": '{"epochs": 40, "factors_wd": 0.1}'},
        {"search_method": "faiss"},
        {"search_method": "exact"},
        {"dataset": '{"user_col": "customer", "time_col": "ts", "since": 30, "max_bytes": 5000000000}'},
    ],
)
def test_environment_is_what_infra_gives_every_function_and_job(monkeypatch, values: dict[str, Any]) -> None:
    for name in SETTINGS_ENV:
        monkeypatch.delenv(name, raising=False)
    cdk = DeploySettings(**values)
    ours = offline.LocalSettings(**values)
    names = {"bucket": "b", "table": "t", "topic_arn": "a"}
    assert ours.environment(**names) == cdk.job_environment(**names)


def test_local_settings_take_explicit_then_environment_then_cdk_defaults(monkeypatch) -> None:
    for name in SETTINGS_ENV:
        monkeypatch.delenv(name, raising=False)
    names = {"bucket": "b", "table": "t", "topic_arn": "a"}
    assert offline.LocalSettings().environment(**names) == DeploySettings().job_environment(**names)
    assert not {"TOPX_MAX_RMSE", "TOPX_HYPERPARAMETERS", "TOPX_SEARCH_METHOD"} & set(offline.LocalSettings().resolved())
    monkeypatch.setenv("TOPX_EPOCHS", "4")
    monkeypatch.setenv("TOPX_MIN_RECALL", "0.2")
    monkeypatch.setenv("TOPX_HYPERPARAMETERS", '{"factors_lr": 0.02}')
    monkeypatch.setenv("TOPX_SEARCH_METHOD", "hnsw")
    resolved = offline.LocalSettings(top_x=3, epochs=None, min_recall=None).resolved()
    assert resolved["TOPX_TOP_X"] == 3 and resolved["TOPX_EPOCHS"] == 4 and resolved["TOPX_MIN_RECALL"] == 0.2
    assert resolved["TOPX_HYPERPARAMETERS"] == '{"factors_lr": 0.02}' and resolved["TOPX_SEARCH_METHOD"] == "hnsw"
    explicit = offline.LocalSettings(epochs=2, min_recall=0.3, hyperparameters='{"epochs": 5}',
                                   search_method="faiss").resolved()
    assert explicit["TOPX_EPOCHS"] == 2 and explicit["TOPX_MIN_RECALL"] == 0.3
    assert explicit["TOPX_HYPERPARAMETERS"] == '{"epochs": 5}' and explicit["TOPX_SEARCH_METHOD"] == "faiss"


def test_local_settings_refuse_hyperparameters_the_train_job_would(monkeypatch) -> None:
    monkeypatch.delenv("TOPX_HYPERPARAMETERS", raising=False)
    with pytest.raises(ConfigError, match="TOPX_HYPERPARAMETERS: unknown hyperparameter"):
        offline.LocalSettings(hyperparameters='{"epoch": 40}').resolved()


def test_a_deploy_searches_by_default_as_topx_run_does(monkeypatch) -> None:
    from topx.config import search_method
    from topx.steps import RunOptions

    monkeypatch.delenv("TOPX_SEARCH_METHOD", raising=False)  # what the stack sets when search_method is unset
    assert search_method() == RunOptions().search_method == "exact"


def test_local_settings_refuse_a_search_method_the_stages_would(monkeypatch) -> None:
    monkeypatch.delenv("TOPX_SEARCH_METHOD", raising=False)
    with pytest.raises(ConfigError, match="TOPX_SEARCH_METHOD: unknown search method 'annoy'; expected one of exact"):
        offline.LocalSettings(search_method="annoy").resolved()
    monkeypatch.setenv("TOPX_SEARCH_METHOD", "Faiss")
    with pytest.raises(ConfigError, match="TOPX_SEARCH_METHOD"):
        offline.LocalSettings().resolved()


def test_upload_rule_is_the_synthesized_rule(template: dict[str, Any]) -> None:
    rule = next(r for r in _resources(template, "AWS::Events::Rule").values()
                if r.get("EventPattern", {}).get("source") == ["aws.s3"])
    pattern = json.loads(json.dumps(rule["EventPattern"]).replace(json.dumps(rule["EventPattern"]["detail"]["bucket"]
                                                                              ["name"][0]), '"my-bucket"'))
    trigger = offline.load_trigger()
    assert offline.upload_event_pattern(trigger, "my-bucket") == pattern
    # The raw event goes to the upload queue, as offline: the starter reads bucket and key from it.
    (target,) = rule["Targets"]
    assert "InputTransformer" not in target and "Input" not in target
    assert _referenced(template, target["Arn"]) == _referenced(template, _queue_of_starter(template))


def _queue_of_starter(template: dict[str, Any]) -> dict[str, Any]:
    (mapping,) = _resources(template, "AWS::Lambda::EventSourceMapping").values()
    return mapping["EventSourceArn"]


def test_run_ended_rule_is_the_synthesized_rule(template: dict[str, Any]) -> None:
    rule = next(r for r in _resources(template, "AWS::Events::Rule").values()
                if r.get("EventPattern", {}).get("source") == ["aws.states"])
    pattern = rule["EventPattern"]
    assert "Ref" in pattern["detail"]["stateMachineArn"][0]
    expected = offline.run_ended_event_pattern("arn:sm")
    expected["detail"]["stateMachineArn"] = pattern["detail"]["stateMachineArn"]
    assert {**pattern, "detail": {**pattern["detail"], "status": sorted(pattern["detail"]["status"])}} == expected
    (target,) = rule["Targets"]
    assert _referenced(template, target["Arn"]) == _referenced(template, _queue_of_starter(template))


# --------------------------------------------------------------------------- pieces of the layer


@pytest.mark.parametrize(
    ("template_text", "expected"),
    [
        ('{"bucket":<detail-bucket-name>,"key":<detail-object-key>}', {"bucket": "b-1", "key": "incoming/a \"x\".csv"}),
        ('{"where":"s3://<detail-bucket-name>/<detail-object-key>"}', {"where": "s3://b-1/incoming/a \"x\".csv"}),
        ('{"size":<detail-object-size>,"missing":<detail-nothing>}', {"size": 12, "missing": None}),
    ],
)
def test_input_transformer_fills_templates_as_eventbridge_does(template_text: str, expected: dict[str, Any]) -> None:
    event = {"detail": {"bucket": {"name": "b-1"}, "object": {"key": 'incoming/a "x".csv', "size": 12}}}
    paths = {"detail-bucket-name": "$.detail.bucket.name", "detail-object-key": "$.detail.object.key",
             "detail-object-size": "$.detail.object.size", "detail-nothing": "$.detail.nothing"}
    filled = offline.transform_input({"InputPathsMap": paths, "InputTemplate": template_text}, event)
    assert json.loads(filled) == expected


def test_ref_arguments_take_the_submitted_parameters() -> None:
    command = ["python", "-m", "m", "--bucket", "Ref::bucket", "--run-id", "Ref::run_id", "--x", "Ref::other"]
    assert offline.resolve_command(command, {"bucket": "b", "run_id": "r"}) == [
        "python", "-m", "m", "--bucket", "b", "--run-id", "r", "--x", "Ref::other"]


def test_the_patches_follow_the_pinned_versions(monkeypatch) -> None:
    assert offline.moto_needs(None, "99.0.0")
    assert offline.moto_needs("5.3.0", "5.2.5")
    assert not offline.moto_needs("5.3.0", "5.3.0") and not offline.moto_needs("5.3.0", "6.0.1")
    monkeypatch.setattr(patches, "MOTO_BATCH_PARAMS_FIXED_IN", "5.3.0")
    monkeypatch.setattr(patches, "MOTO_SYNC_RETRY_FIXED_IN", "5.4.0")
    assert not offline.batch_params_patch_needed("5.3.1") and offline.sync_retry_patch_needed("5.3.1")


def _probe(task: dict[str, Any], *patches: Any) -> list[dict[str, Any]]:
    """Run a one-task state machine that submits a Batch job, on moto as installed plus ``patches``."""
    machine = {"StartAt": "Submit", "States": {"Submit": {
        "Type": "Task", "Parameters": {"JobName": "probe", "JobQueue": "QUEUE", "JobDefinition": "DEFINITION"},
        "End": True, **task}}}
    with mock_aws(config=offline.MOCK_CONFIG), ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        batch, sfn = boto3.client("batch"), boto3.client("stepfunctions")
        role = boto3.client("iam").create_role(RoleName="probe", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
        queue, definition = _create_job(batch, role, "probe", ["true"], {}, {})
        text = json.dumps(machine).replace("QUEUE", queue).replace("DEFINITION", definition)
        arn = sfn.create_state_machine(name="probe", definition=text, roleArn=role)["stateMachineArn"]
        execution = sfn.start_execution(stateMachineArn=arn)["executionArn"]
        offline.wait_for_execution(execution, timeout_s=30)
        return offline.history(execution)


def test_installed_moto_still_needs_the_batch_parameter_patch(monkeypatch) -> None:
    """Tells when moto's own Step Functions -> Batch call works: then set MOTO_BATCH_PARAMS_FIXED_IN."""
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    events = _probe({"Resource": "arn:aws:states:::batch:submitJob"})
    fixed = events[-1]["type"] == "ExecutionSucceeded"
    assert fixed != offline.batch_params_patch_needed(), (
        "moto now submits Batch jobs from Step Functions itself: set MOTO_BATCH_PARAMS_FIXED_IN in topx/offline/patches.py"
        if fixed else "moto still cannot submit Batch jobs from Step Functions: keep the patch")


def test_installed_moto_still_needs_the_sync_retry_patch(monkeypatch) -> None:
    """Tells when moto lets a retried `.sync` task succeed: then set MOTO_SYNC_RETRY_FIXED_IN."""
    from moto.batch.models import BatchBackend
    from moto.batch_simple.models import BatchSimpleBackend
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service.state_task_service_batch import (
        StateTaskServiceBatch,
    )

    describe_jobs, finish = BatchBackend.describe_jobs, BatchSimpleBackend._mark_job_as_finished
    finished: list[Any] = []

    def slow_describe_jobs(self: Any, *args: Any, **kwargs: Any) -> Any:
        time.sleep(0.2)  # as a busy machine answers; the bug is a race that this makes certain
        return describe_jobs(self, *args, **kwargs)

    def first_job_fails(self: Any, include_start_attempt: bool, job: Any) -> None:
        finished.append(job)
        # moto's docker-free Batch fails jobs while this is "0" ("" does not). Set, never removed: this
        # runs on moto's thread while the test's thread may be iterating the environment.
        os.environ["MOTO_SIMPLE_BATCH_FAIL_AFTER"] = "0" if len(finished) == 1 else ""
        try:
            finish(self, include_start_attempt, job)
        finally:
            os.environ["MOTO_SIMPLE_BATCH_FAIL_AFTER"] = ""

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("MOTO_SIMPLE_BATCH_FAIL_AFTER", "")
    monkeypatch.setattr(BatchBackend, "describe_jobs", slow_describe_jobs)
    monkeypatch.setattr(BatchSimpleBackend, "_mark_job_as_finished", first_job_fails)
    task = {"Resource": "arn:aws:states:::batch:submitJob.sync",
            "Retry": [{"ErrorEquals": ["States.TaskFailed"], "IntervalSeconds": 1, "MaxAttempts": 1}]}
    patches = [
        mock.patch.object(StateTaskServiceBatch, "_normalise_parameters", _normalise_batch_parameters),
        mock.patch.object(StateTaskServiceBatch, "_normalise_response", _normalise_batch_response),
    ]

    def outcomes(*extra: Any) -> list[str]:
        finished.clear()
        events = _probe(task, *patches, *extra)
        return [e["type"] for e in events if e["type"] in ("TaskFailed", "TaskTimedOut", "TaskSucceeded")]

    fresh_token = mock.patch.object(StateTaskServiceBatch, "_eval_execution",
                                    _fresh_token_per_attempt(StateTaskServiceBatch._eval_execution))
    assert outcomes(fresh_token) == ["TaskFailed", "TaskSucceeded"]
    found = outcomes()
    fixed = found == ["TaskFailed", "TaskSucceeded"]
    assert fixed != offline.sync_retry_patch_needed(), (
        "moto now lets a retried `.sync` task succeed: set MOTO_SYNC_RETRY_FIXED_IN in topx/offline/patches.py"
        if fixed else f"moto still ends a retried `.sync` task at once ({found}): keep the patch")


def test_a_batch_array_job_runs_every_child_with_its_index_and_fails_with_any(tmp_path: Path) -> None:
    """Search shards of a run that was never prepared: each child runs, exits 2 (a topx error), and says why."""
    with offline.offline():
        pipeline = offline.deploy(offline.LocalSettings(shards=3))
        batch, logs = boto3.client("batch"), boto3.client("logs")
        job_id = batch.submit_job(jobName="probe", jobQueue=pipeline.search_queue_arn,
                                  jobDefinition=pipeline.search_definition_arn, arrayProperties={"size": 3},
                                  parameters={"run_id": "no-such-run"})["jobId"]
        (parent,) = batch.describe_jobs(jobs=[job_id])["jobs"]
        children = batch.describe_jobs(jobs=[f"{job_id}:{i}" for i in range(3)])["jobs"]
        messages = []
        for child in children:
            stream = child["container"]["logStreamName"]
            events = logs.get_log_events(logGroupName="/aws/batch/job", logStreamName=stream)["events"]
            messages.append(" ".join(e["message"] for e in events))
    assert parent["status"] == "FAILED" and parent["statusReason"] == "3 of 3 child jobs failed"
    assert [c["status"] for c in children] == ["FAILED"] * 3
    assert {c["attempts"][0]["container"]["exitCode"] for c in children} == {2}
    # Ref::bucket and Ref::shards came from the job definition's defaults, run_id from the submission.
    assert all(f"s3://{pipeline.bucket}/runs/no-such-run/prepared/" in m for m in messages), messages


def test_swapping_the_output_streams_under_a_printing_thread_does_not_crash():
    """A run swaps sys.stdout and sys.stderr in and out while other threads print. CPython 3.11's print()
    borrows its reference to sys.stdout while writing, so a swapped-out stream that was freed crashed the
    process (segfault) within a few thousand swaps; here 200,000 in a child process must end cleanly."""
    script = textwrap.dedent('''
        import io, sys, threading
        from topx.offline.execute import _captured_output

        stop = False

        def printer():
            while not stop:
                print("x" * 50)

        sys.stdout = io.StringIO()
        thread = threading.Thread(target=printer, daemon=True)
        thread.start()
        for _ in range(200_000):
            with _captured_output():
                pass
        stop = True
        thread.join()
    ''')
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])


def test_a_run_never_removes_an_environment_key_another_thread_may_be_iterating(monkeypatch) -> None:
    """botocore iterates os.environ whenever a client is made, on any thread; a key removed under that
    iteration raised KeyError in a test's thread while a function ran. A run only ever sets keys."""
    from topx.offline import execute

    class NoRemoval(dict):
        def __delitem__(self, key: str) -> None:
            raise AssertionError(f"removed {key}")

        def clear(self) -> None:
            raise AssertionError("cleared")

        def pop(self, *args: Any) -> Any:
            raise AssertionError(f"popped {args[0]}")

    env = NoRemoval({"HOME": "/root", "TOPX_TOP_X": "7", "AWS_LAMBDA_FUNCTION_NAME": "caller"})
    monkeypatch.setattr(os, "environ", env)
    with execute._environment({"TOPX_BUCKET": "b", "AWS_BATCH_JOB_ARRAY_INDEX": "2", "AWS_REGION": "us-east-1"}):
        # The run sees its own settings, and none of the caller's topx or Lambda ones ("" reads as unset).
        assert (env["TOPX_BUCKET"], env["AWS_BATCH_JOB_ARRAY_INDEX"]) == ("b", "2")
        assert env["TOPX_TOP_X"] == env["AWS_LAMBDA_FUNCTION_NAME"] == ""
    assert env == {"HOME": "/root", "TOPX_TOP_X": "7", "AWS_LAMBDA_FUNCTION_NAME": "caller", "TOPX_BUCKET": "",
                   "AWS_BATCH_JOB_ARRAY_INDEX": "", "AWS_REGION": "us-east-1"}


def test_batch_retry_rules_match_as_batch_matches_them() -> None:
    """The first rule whose every condition matches decides; a trailing "*" matches a prefix; with no
    rule matching, Batch retries."""
    strategy = {"attempts": 3, "evaluateOnExit": [
        {"action": "EXIT", "onExitCode": "2"},
        {"action": "RETRY", "onStatusReason": "Host EC2*"},
        {"action": "exit", "onExitCode": "1", "onReason": "Essential*"},
    ]}
    assert retry_action(strategy, _Attempt(2, "Essential container in task exited")) == "EXIT"
    assert retry_action(strategy, _Attempt(None, "Host EC2 (instance i-1) terminated.")) == "RETRY"
    assert retry_action(strategy, _Attempt(1, "x", "Essential container in task exited")) == "EXIT"
    assert retry_action(strategy, _Attempt(1, "x", "OutOfMemoryError")) == "RETRY"   # no rule matches
    catch_all = {"attempts": 2, "evaluateOnExit": [{"action": "RETRY", "onStatusReason": "Host EC2*"},
                                                   {"action": "EXIT", "onReason": "*"}]}
    assert retry_action(catch_all, _Attempt(None, "Host EC2 (instance i-1) terminated.")) == "RETRY"
    assert retry_action(catch_all, _Attempt(None, "Host EC")) == "EXIT"           # shorter than the prefix
    assert retry_action(catch_all, _Attempt(1)) == "EXIT"                         # "*" matches no reason too
    assert retry_action(None, _Attempt(137)) == "RETRY"
