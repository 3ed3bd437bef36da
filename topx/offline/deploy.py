"""What the CDK stack creates on AWS, created in moto: bucket, table, topic, the Lambda functions, the
train and search job queues and definitions, the state machine from the ASL file, the upload queue and the
rules that feed it (uploads under incoming/, ends of executions), and the starter that reads it.

``LocalSettings`` are the deploy-time knobs CDK context sets (explicit value > ``TOPX_*`` variable > CDK
default), baked into every function's and job's environment as infra/ bakes them; ``LocalPipeline`` names
what ``deploy`` created, as the stack's outputs and substitutions name it. ``deploy`` runs inside
``topx.offline.offline()``, which starts moto.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from topx.config import env_or, search_method
from topx.contract import (
    BATCH_RETRY_STRATEGIES,
    DEFAULT_RETENTION_DAYS,
    DEFAULT_SHARDS,
    DEFAULT_TOP_X,
    ENV_BUCKET,
    ENV_DATASET,
    ENV_EPOCHS,
    ENV_HYPERPARAMETERS,
    ENV_MAX_RMSE,
    ENV_MIN_AUC,
    ENV_MIN_RECALL,
    ENV_NUM_FACTORS,
    ENV_RETENTION_DAYS,
    ENV_SEARCH_METHOD,
    ENV_SERVICE_NAME,
    ENV_SHARDS,
    ENV_STATE_MACHINE_ARN,
    ENV_TABLE,
    ENV_TOP_X,
    ENV_TOPIC_ARN,
    HANDLER_MODULE,
    SEARCH_COMMAND,
    TRAIN_COMMAND,
    TTL_ATTRIBUTE,
    table_attribute_definitions,
    table_key_schema,
)
from topx.offline.definition import (
    FUNCTION_PLACEHOLDERS,
    fill_definition,
    load_definition,
    load_trigger,
    run_ended_event_pattern,
    upload_event_pattern,
)

DEFAULT_REGION = "us-east-1"
ACCOUNT_ID = "123456789012"  # moto's default account
NAME_PREFIX = "topx-local"
# The handler of the function the upload queue feeds (infra/lambdas.py's "starter").
STARTER_HANDLER = "starter"


@dataclass(frozen=True)
class LocalSettings:
    """The deploy-time knobs CDK context sets on AWS, baked into the functions' and jobs' environment.

    Each is the explicit value, else the ``TOPX_*`` environment variable, else the CDK default. The
    model's size (``num_factors``, ``epochs``: the objective's own defaults), the quality-gate thresholds,
    ``hyperparameters`` (JSON object text) and ``search_method`` have none:
    unset, they are left out (and the stages search exactly).
    """

    top_x: int | None = None
    num_factors: int | None = None
    epochs: int | None = None
    shards: int | None = None
    retention_days: int | None = None
    max_rmse: float | None = None
    min_auc: float | None = None
    min_recall: float | None = None
    hyperparameters: str | None = None
    search_method: str | None = None
    # The dataset configuration (JSON object text, as context ``dataset``), and the shorthands for three of
    # its fields that infra/ folds into it too.
    dataset: str | None = None
    time_col: str | None = None
    half_life_days: float | None = None
    since: str | None = None

    def resolved(self) -> dict[str, int | float | str]:
        from topx.aws.stages import parse_hyperparameters

        resolved: dict[str, int | float | str] = {
            ENV_TOP_X: env_or(ENV_TOP_X, self.top_x, DEFAULT_TOP_X, int),
            ENV_SHARDS: env_or(ENV_SHARDS, self.shards, DEFAULT_SHARDS, int),
            ENV_RETENTION_DAYS: env_or(ENV_RETENTION_DAYS, self.retention_days, DEFAULT_RETENTION_DAYS, int),
        }
        for name, explicit in ((ENV_NUM_FACTORS, self.num_factors), (ENV_EPOCHS, self.epochs)):
            size = env_or(name, explicit, None, int)
            if size is not None:  # unset: the train job takes the objective's own default
                resolved[name] = int(size)
        for name, explicit in ((ENV_MAX_RMSE, self.max_rmse), (ENV_MIN_AUC, self.min_auc),
                               (ENV_MIN_RECALL, self.min_recall)):
            threshold = env_or(name, explicit, None, float)
            if threshold is not None:
                resolved[name] = float(threshold)
        hyperparameters = env_or(ENV_HYPERPARAMETERS, self.hyperparameters, None)
        if hyperparameters:
            # The train job would refuse a bad value only once the run is under way; refuse it here.
            parse_hyperparameters(hyperparameters, ENV_HYPERPARAMETERS)
            resolved[ENV_HYPERPARAMETERS] = hyperparameters
        method = env_or(ENV_SEARCH_METHOD, self.search_method, None)
        if method:
            # Refused here too rather than by the train job once the run is under way.
            resolved[ENV_SEARCH_METHOD] = search_method(method)
        dataset = self._dataset()
        if dataset:
            resolved[ENV_DATASET] = json.dumps(dataset, sort_keys=True)
        return resolved

    def _dataset(self) -> dict[str, Any]:
        """The dataset configuration, checked by the contract's rule as infra/ checks it at synth."""
        from topx.contract import DatasetConfigError, check_dataset_config, merge_dataset_configs
        from topx.errors import ConfigError

        text = env_or(ENV_DATASET, self.dataset, None)
        shorthands = {name: value for name, value in (("time_col", self.time_col), ("since", self.since),
                                                      ("half_life_days", self.half_life_days)) if value is not None}
        try:
            doc = json.loads(text) if text else {}
            return merge_dataset_configs(check_dataset_config(shorthands, deployed=True, together=False),
                                         check_dataset_config(doc, deployed=True))
        except (ValueError, DatasetConfigError) as exc:
            raise ConfigError(f"dataset configuration ({ENV_DATASET}): {exc}") from exc

    def environment(self, *, bucket: str, table: str, topic_arn: str) -> dict[str, str]:
        """What every function and job gets, as infra's ``DeploySettings.job_environment`` builds it."""
        names = {ENV_BUCKET: bucket, ENV_TABLE: table, ENV_TOPIC_ARN: topic_arn}
        return {**names, **{name: str(value) for name, value in self.resolved().items()}}


@dataclass(frozen=True)
class LocalPipeline:
    """The resources ``deploy`` created in moto: what the CDK stack's outputs and substitutions name."""

    region: str
    bucket: str
    table: str
    topic_arn: str
    function_arns: Mapping[str, str]  # handler name -> function ARN
    train_queue_arn: str
    train_definition_arn: str
    search_queue_arn: str
    search_definition_arn: str
    state_machine_arn: str
    rule_name: str
    inbox_queue_url: str  # an SQS queue subscribed to the topic, to read notifications back
    # The queue the upload rule and the run-ended rule feed, and the starter function that reads it
    # (topx.offline.deliver hands its messages over, as Lambda's event source mapping does on AWS).
    upload_queue_url: str = ""
    starter_arn: str = ""

    def substitutions(self) -> dict[str, str]:
        """The values of the ASL's placeholders, named as infra/pipeline.py names them."""
        return {
            **{FUNCTION_PLACEHOLDERS[name]: arn for name, arn in self.function_arns.items()},
            "TrainJobQueueArn": self.train_queue_arn,
            "TrainJobDefinitionArn": self.train_definition_arn,
            "SearchJobQueueArn": self.search_queue_arn,
            "SearchJobDefinitionArn": self.search_definition_arn,
            "TopicArn": self.topic_arn,
            "TableName": self.table,
        }


# --------------------------------------------------------------------------- deploy into moto


def deploy(settings: LocalSettings | None = None, *, region: str = DEFAULT_REGION,
           name: str = NAME_PREFIX) -> LocalPipeline:
    """Create the stack's resources in moto and the state machine from the ASL file; call inside ``offline()``."""
    import boto3

    settings = settings or LocalSettings()
    clients = {service: boto3.client(service, region_name=region)
               for service in ("iam", "s3", "dynamodb", "sns", "sqs", "lambda", "batch", "stepfunctions", "events")}
    role = clients["iam"].create_role(RoleName=f"{name}-role", AssumeRolePolicyDocument="{}")["Role"]["Arn"]

    bucket = f"{name}-data"
    _create_bucket(clients["s3"], bucket, region)
    # Uploads reach EventBridge, where the upload rule matches them (storage.py turns this on too).
    clients["s3"].put_bucket_notification_configuration(
        Bucket=bucket, NotificationConfiguration={"EventBridgeConfiguration": {}}
    )
    table = f"{name}-recommendations"
    _create_table(clients["dynamodb"], table)
    topic_arn = clients["sns"].create_topic(Name=f"{name}-notifications")["TopicArn"]
    inbox_url = clients["sqs"].create_queue(QueueName=f"{name}-inbox")["QueueUrl"]
    inbox_arn = clients["sqs"].get_queue_attributes(QueueUrl=inbox_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    clients["sns"].subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=inbox_arn)

    # The stack's name is the service of the logs and metrics (infra/stack.py); here the pipeline's name is.
    environment = {**settings.environment(bucket=bucket, table=table, topic_arn=topic_arn), ENV_SERVICE_NAME: name}
    function_arns = {
        handler: clients["lambda"].create_function(
            FunctionName=f"{name}-{handler.replace('_', '-')}",
            Role=role,
            PackageType="Image",
            Code={"ImageUri": f"{ACCOUNT_ID}.dkr.ecr.{region}.amazonaws.com/{name}-functions:latest"},
            ImageConfig={"Command": [f"{HANDLER_MODULE}.{handler}"]},
            Environment={"Variables": environment},
            Timeout=900,
        )["FunctionArn"]
        for handler in FUNCTION_PLACEHOLDERS
    }
    train_queue, train_definition = _create_job(clients["batch"], role, f"{name}-train", TRAIN_COMMAND,
                                                environment, {"bucket": bucket}, BATCH_RETRY_STRATEGIES["train"])
    search_queue, search_definition = _create_job(
        clients["batch"], role, f"{name}-search", SEARCH_COMMAND, environment,
        {"bucket": bucket, "shards": environment[ENV_SHARDS]}, BATCH_RETRY_STRATEGIES["search"],
    )
    partial = LocalPipeline(
        region=region, bucket=bucket, table=table, topic_arn=topic_arn, function_arns=function_arns,
        train_queue_arn=train_queue, train_definition_arn=train_definition, search_queue_arn=search_queue,
        search_definition_arn=search_definition, state_machine_arn="", rule_name=f"{name}-on-upload",
        inbox_queue_url=inbox_url,
    )
    definition = fill_definition(load_definition(), partial.substitutions())
    machine_arn = clients["stepfunctions"].create_state_machine(
        name=f"{name}-pipeline", definition=definition, roleArn=role, type="STANDARD"
    )["stateMachineArn"]

    upload_queue_url = clients["sqs"].create_queue(QueueName=f"{name}-uploads")["QueueUrl"]
    upload_queue_arn = clients["sqs"].get_queue_attributes(
        QueueUrl=upload_queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    starter_arn = clients["lambda"].create_function(
        FunctionName=f"{name}-{STARTER_HANDLER}",
        Role=role,
        PackageType="Image",
        Code={"ImageUri": f"{ACCOUNT_ID}.dkr.ecr.{region}.amazonaws.com/{name}-functions:latest"},
        ImageConfig={"Command": [f"{HANDLER_MODULE}.{STARTER_HANDLER}"]},
        Environment={"Variables": {**environment, ENV_STATE_MACHINE_ARN: machine_arn}},
        Timeout=60,
    )["FunctionArn"]
    trigger = load_trigger()
    rules = {partial.rule_name: upload_event_pattern(trigger, bucket),
             f"{name}-on-run-ended": run_ended_event_pattern(machine_arn)}
    for rule, pattern in rules.items():
        clients["events"].put_rule(Name=rule, EventPattern=json.dumps(pattern), State="ENABLED")
        clients["events"].put_targets(Rule=rule, Targets=[{"Id": "Target0", "Arn": upload_queue_arn}])
    return replace(partial, state_machine_arn=machine_arn, upload_queue_url=upload_queue_url, starter_arn=starter_arn)


def _create_bucket(s3: Any, bucket: str, region: str) -> None:
    if region == "us-east-1":
        s3.create_bucket(Bucket=bucket)
    else:
        s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": region})


def _create_table(ddb: Any, table: str) -> None:
    """Keys and TTL as the deploy contract declares them (infra/storage.py builds the same)."""
    ddb.create_table(
        TableName=table, BillingMode="PAY_PER_REQUEST",
        KeySchema=table_key_schema(), AttributeDefinitions=table_attribute_definitions(),
    )
    ddb.update_time_to_live(TableName=table,
                            TimeToLiveSpecification={"Enabled": True, "AttributeName": TTL_ATTRIBUTE})


def _create_job(batch: Any, role: str, name: str, command: Sequence[str], environment: Mapping[str, str],
                parameters: Mapping[str, str], retry: Mapping[str, Any] | None = None) -> tuple[str, str]:
    environment_arn = batch.create_compute_environment(
        computeEnvironmentName=name, type="UNMANAGED", state="ENABLED", serviceRole=role
    )["computeEnvironmentArn"]
    queue_arn = batch.create_job_queue(
        jobQueueName=name, state="ENABLED", priority=1,
        computeEnvironmentOrder=[{"order": 1, "computeEnvironment": environment_arn}],
    )["jobQueueArn"]
    definition_arn = batch.register_job_definition(
        jobDefinitionName=name, type="container", parameters=dict(parameters),
        containerProperties={
            "image": f"{ACCOUNT_ID}.dkr.ecr.{DEFAULT_REGION}.amazonaws.com/{name}:latest",
            "command": list(command),
            "environment": [{"name": key, "value": value} for key, value in environment.items()],
            "resourceRequirements": [{"type": "VCPU", "value": "1"}, {"type": "MEMORY", "value": "2048"}],
        },
        # The retry strategy the stack gives the job (infra/compute.py builds it from the same contract).
        **({} if retry is None else {"retryStrategy": {
            "attempts": retry["attempts"], "evaluateOnExit": [dict(rule) for rule in retry["evaluateOnExit"]]}}),
    )["jobDefinitionArn"]
    return queue_arn, definition_arn
