"""The Step Functions state machine (statemachine/pipeline.asl.json) and the rules that start it.

The ASL file is the single definition: CDK loads it as text and CloudFormation fills its ``${Name}``
placeholders from ``DefinitionSubstitutions``; an offline runner fills the same names with local ARNs.
Because CDK cannot see which services a text definition calls, every permission is granted here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from aws_cdk import ArnFormat, Duration, Stack
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_lambda_event_sources as lambda_events
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sqs as sqs
from aws_cdk import aws_stepfunctions as sfn
from constructs import Construct

from infra.access import acknowledge_unscoped
from infra.checkov import skip_checks
from infra.compute import Job
from infra.lambdas import STATE_MACHINE_HANDLERS
from infra.logs import log_group
from infra.nag import acknowledge
from infra.settings import ASL_PATH, TRIGGER_PATH
from topx.contract import ENV_STATE_MACHINE_ARN, RUN_ENDED_DETAIL_TYPE, RUN_ENDED_SOURCE, RUN_ENDED_STATUSES

PLACEHOLDER_RE = re.compile(r"\$\{([A-Za-z][A-Za-z0-9]*)\}")
# Step Functions manages this EventBridge rule itself to learn when a submitJob.sync job finishes.
BATCH_SYNC_RULE = "StepFunctionsGetEventsForBatchJobsRule"
# What the state machine's role holds on Resource "*", each for the reason infra/access.py gives:
# following Batch jobs, execution logging (granted by CDK for `logs=`) and tracing (for `tracing_enabled`).
UNSCOPED_STATE_MACHINE_ACTIONS = (
    "batch:DescribeJobs",
    "logs:CreateLogDelivery",
    "logs:GetLogDelivery",
    "logs:UpdateLogDelivery",
    "logs:DeleteLogDelivery",
    "logs:ListLogDeliveries",
    "logs:PutResourcePolicy",
    "logs:DescribeResourcePolicies",
    "logs:DescribeLogGroups",
    "xray:PutTraceSegments",
    "xray:PutTelemetryRecords",
    "xray:GetSamplingRules",
    "xray:GetSamplingTargets",
)


# How EventBridge delivers to the upload queue: retries, how long it keeps trying, and how long an
# undelivered event waits in the dead-letter queue.
TRIGGER_RETRY_ATTEMPTS = 8
TRIGGER_MAX_EVENT_AGE_HOURS = 24
TRIGGER_DEAD_LETTER_DAYS = 14
# The starter's batching window: Lambda gathers the queue's messages this long (or up to the batch size)
# before handing them over, so that an export's part files and its _SUCCESS marker reach one batch.
UPLOAD_BATCH_WINDOW_S = 60
UPLOAD_BATCH_SIZE = 10_000  # the most a batching window gathers (Lambda caps a batch at 6 MB too)
# Receives of one message before it goes to the dead-letter queue (a starter that keeps failing on it).
UPLOAD_MAX_RECEIVES = 5


class DefinitionError(ValueError):
    """The ASL file and the substitutions the stack provides do not match."""


def placeholders(definition: str) -> set[str]:
    """The ``${Name}`` placeholder names used in an ASL text."""
    return set(PLACEHOLDER_RE.findall(definition))


def load_trigger() -> dict[str, Any]:
    """The upload trigger's fixed parts, shared with offline runners (statemachine/trigger.json)."""
    return json.loads(TRIGGER_PATH.read_text(encoding="utf-8"))


class Pipeline(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        functions: Mapping[str, lambda_.IFunction],
        train: Job,
        search: Job,
        topic: sns.ITopic,
        topic_key: kms.IKey,
        bucket: s3.IBucket,
        table_name: str,
        schedule: str | None,
        logs_key: kms.IKey,
    ) -> None:
        super().__init__(scope, construct_id)
        substitutions = {
            "PrepareFunctionArn": functions["prepare"].function_arn,
            "QualityGateFunctionArn": functions["quality_gate"].function_arn,
            "RepackageFunctionArn": functions["repackage"].function_arn,
            "LoadShardFunctionArn": functions["load_shard"].function_arn,
            "PublishFunctionArn": functions["publish"].function_arn,
            "ReportFunctionArn": functions["report"].function_arn,
            "TrainJobQueueArn": train.queue.job_queue_arn,
            "TrainJobDefinitionArn": train.definition.job_definition_arn,
            "SearchJobQueueArn": search.queue.job_queue_arn,
            "SearchJobDefinitionArn": search.definition.job_definition_arn,
            "TopicArn": topic.topic_arn,
            "TableName": table_name,
        }
        definition = ASL_PATH.read_text(encoding="utf-8")
        used = placeholders(definition)
        if used != set(substitutions):
            raise DefinitionError(
                f"{ASL_PATH.name}: placeholders without a value: {sorted(used - set(substitutions))}; "
                f"values without a placeholder: {sorted(set(substitutions) - used)}"
            )

        stack = Stack.of(self)
        execution_logs = log_group(
            self,
            "ExecutionLogs",
            key=logs_key,
            # The /aws/vendedlogs/ prefix keeps Step Functions from growing the account's log resource policy.
            log_group_name=f"/aws/vendedlogs/states/{stack.stack_name}-pipeline",
        )
        self.state_machine = sfn.StateMachine(
            self,
            "StateMachine",
            definition_body=sfn.DefinitionBody.from_string(definition),
            definition_substitutions=substitutions,
            state_machine_type=sfn.StateMachineType.STANDARD,
            logs=sfn.LogOptions(
                destination=execution_logs, level=sfn.LogLevel.ALL, include_execution_data=True
            ),
            tracing_enabled=True,
        )
        self._grant(functions, train, search, topic, topic_key)
        self._add_triggers(bucket, schedule, functions["starter"])

    def _grant(
        self,
        functions: Mapping[str, lambda_.IFunction],
        train: Job,
        search: Job,
        topic: sns.ITopic,
        topic_key: kms.IKey,
    ) -> None:
        stack = Stack.of(self)
        machine = self.state_machine
        machine.add_to_role_policy(
            iam.PolicyStatement(
                actions=["lambda:InvokeFunction"],
                resources=[functions[handler].function_arn for handler in STATE_MACHINE_HANDLERS],
            )
        )
        machine.add_to_role_policy(
            iam.PolicyStatement(
                actions=["batch:SubmitJob"],
                resources=[
                    train.queue.job_queue_arn,
                    train.definition.job_definition_arn,
                    search.queue.job_queue_arn,
                    search.definition.job_definition_arn,
                ],
            )
        )
        job_arns = stack.format_arn(service="batch", resource="job", resource_name="*")
        machine.add_to_role_policy(iam.PolicyStatement(actions=["batch:TerminateJob"], resources=[job_arns]))
        machine.add_to_role_policy(iam.PolicyStatement(actions=["batch:DescribeJobs"], resources=["*"]))
        machine.add_to_role_policy(
            iam.PolicyStatement(
                actions=["events:PutTargets", "events:PutRule", "events:DescribeRule"],
                resources=[
                    stack.format_arn(service="events", resource="rule", resource_name=BATCH_SYNC_RULE)
                ],
            )
        )
        machine.add_to_role_policy(iam.PolicyStatement(actions=["sns:Publish"], resources=[topic.topic_arn]))
        machine.add_to_role_policy(
            iam.PolicyStatement(actions=["kms:GenerateDataKey", "kms:Decrypt"], resources=[topic_key.key_arn])
        )
        acknowledge_unscoped(machine, UNSCOPED_STATE_MACHINE_ACTIONS)
        acknowledge(
            machine,
            "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:batch:<AWS::Region>:<AWS::AccountId>:job/*]",
            "Job ids are minted by AWS Batch at submit time; TerminateJob (used when an execution stops) can "
            "only be scoped to this account's jobs.",
        )

    def _add_triggers(self, bucket: s3.IBucket, schedule: str | None, starter: lambda_.IFunction) -> None:
        """Uploads, execution ends and the schedule's ticks go to one queue; the starter reads it in batches
        and starts one execution at a time (topx/aws/trigger.py; docs/DEPLOY.md)."""
        trigger = load_trigger()
        # An event EventBridge could not deliver (past the retries), or a message the starter failed on
        # UPLOAD_MAX_RECEIVES times, lands here instead of vanishing, and an alarm says so
        # (infra/notifications.py).
        self.trigger_dead_letters = sqs.Queue(
            self,
            "TriggerDeadLetters",
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            retention_period=Duration.days(TRIGGER_DEAD_LETTER_DAYS),
        )
        acknowledge(
            self.trigger_dead_letters,
            "AwsSolutions-SQS3",
            "This queue is itself the dead-letter queue of the pipeline's EventBridge targets and upload queue.",
        )
        sqs_managed = (
            "Encrypted at rest with SQS-managed keys (SqsManagedSseEnabled), which this check does not "
            "recognise; EventBridge cannot send to a queue under the AWS-managed KMS key, and the events hold "
            "only bucket names, object keys and execution ARNs."
        )
        skip_checks(self.trigger_dead_letters, {"CKV_AWS_27": sqs_managed})
        self.upload_queue = sqs.Queue(
            self,
            "UploadQueue",
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            retention_period=Duration.days(TRIGGER_DEAD_LETTER_DAYS),
            # Lambda's advice for a queue a function reads: six times the function's timeout.
            visibility_timeout=Duration.minutes(6),
            dead_letter_queue=sqs.DeadLetterQueue(max_receive_count=UPLOAD_MAX_RECEIVES,
                                                  queue=self.trigger_dead_letters),
        )
        skip_checks(self.upload_queue, {"CKV_AWS_27": sqs_managed})
        delivery = {"dead_letter_queue": self.trigger_dead_letters, "retry_attempts": TRIGGER_RETRY_ATTEMPTS,
                    "max_event_age": Duration.hours(TRIGGER_MAX_EVENT_AGE_HOURS)}
        on_upload = events.Rule(
            self,
            "OnUpload",
            description=f"Queue each object created under {', '.join(trigger['key_prefixes'])} for the topx starter",
            event_pattern=events.EventPattern(
                source=[trigger["source"]],
                detail_type=[trigger["detail_type"]],
                detail={
                    "bucket": {"name": [bucket.bucket_name]},
                    "object": {"key": [{"prefix": prefix} for prefix in trigger["key_prefixes"]]},
                },
            ),
        )
        on_upload.add_target(targets.SqsQueue(self.upload_queue, **delivery))
        on_end = events.Rule(
            self,
            "OnRunEnded",
            description="Queue each end of a topx execution, so that the starter starts what waited for it",
            event_pattern=events.EventPattern(
                source=[RUN_ENDED_SOURCE],
                detail_type=[RUN_ENDED_DETAIL_TYPE],
                detail={"stateMachineArn": [self.state_machine.state_machine_arn], "status": list(RUN_ENDED_STATUSES)},
            ),
        )
        on_end.add_target(targets.SqsQueue(self.upload_queue, **delivery))
        if schedule:
            scheduled = events.Rule(
                self,
                "OnSchedule",
                description="Retrain the topx model on the data under incoming/ (through the starter)",
                schedule=events.Schedule.expression(schedule),
            )
            scheduled.add_target(targets.SqsQueue(self.upload_queue, **delivery))

        starter.add_event_source(
            lambda_events.SqsEventSource(
                self.upload_queue,
                batch_size=UPLOAD_BATCH_SIZE,
                max_batching_window=Duration.seconds(UPLOAD_BATCH_WINDOW_S),
                report_batch_item_failures=True,
            )
        )
        starter.add_environment(ENV_STATE_MACHINE_ARN, self.state_machine.state_machine_arn)  # type: ignore[attr-defined]
        stack = Stack.of(self)
        machine_arn = self.state_machine.state_machine_arn
        starter.add_to_role_policy(
            iam.PolicyStatement(actions=["states:StartExecution", "states:ListExecutions"], resources=[machine_arn])
        )
        executions = stack.format_arn(
            service="states",
            resource="execution",
            resource_name=f"{self.state_machine.state_machine_name}:*",
            arn_format=ArnFormat.COLON_RESOURCE_NAME,
        )
        starter.add_to_role_policy(iam.PolicyStatement(actions=["states:DescribeExecution"], resources=[executions]))
        machine_id = stack.get_logical_id(self.state_machine.node.default_child)  # type: ignore[arg-type]
        acknowledge(
            starter.role,  # type: ignore[arg-type]
            "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:states:<AWS::Region>:<AWS::AccountId>:execution:"
            f"<{machine_id}.Name>:*]",
            "Execution names are minted per run; DescribeExecution is limited to this state machine's executions.",
        )

