"""Operations: the SNS topic for successes and failures, and the alarms and event rules that feed it.

Alarms: executions failed or timed out, trigger events undelivered, Lambda throttles (all the pipeline's
functions summed), and a compute environment INVALID or gone. AWS Batch sends EventBridge no compute
environment state change event, so a schedule runs the compute health function every HEALTH_CHECK_EVERY,
which asks Batch for each environment's state and emits the count of bad ones (topx.aws.health): an
INVALID environment raises the alarm before any run needs it. Event rules: a failed Batch job of our
queues, and a queue of ours blocked: the job at the head of the queue stays RUNNABLE with a reason such as
"ACTION_REQUIRED - CE(s) associated with the job queue are invalid", no instance type that fits, or no
capacity, and a "Batch Job Queue Blocked" event carries it.
"""

from __future__ import annotations

from collections.abc import Sequence

import jsii
from aws_cdk import Duration, Stack
from aws_cdk import aws_batch as batch
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cloudwatch_actions
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from aws_cdk import aws_sqs as sqs
from aws_cdk import aws_stepfunctions as sfn
from constructs import Construct

from topx.contract import (
    ENV_COMPUTE_ENVIRONMENTS,
    METRIC_COMPUTE_UNHEALTHY,
    METRICS_NAMESPACE,
    SERVICE_DIMENSION,
    STAGE_DIMENSION,
)

ALARM_PERIOD = Duration.minutes(5)
# How often the compute health check asks Batch for the environments' state (topx.aws.health).
HEALTH_CHECK_EVERY = Duration.minutes(10)
COMPUTE_HEALTH_STAGE = "compute_health"  # its handler's name: the metric's stage dimension
EVENTS = "events.amazonaws.com"
# A CloudWatch alarm on a metric math expression may use at most this many metrics.
ALARM_MATH_METRICS = 10


@jsii.implements(events.IRuleTarget)
class TopicTarget:
    """An EventBridge target that publishes to ``topic`` and grants nothing by itself.

    CDK's ``targets.SnsTopic`` lets events.amazonaws.com publish to the topic with no condition, which lets
    a rule in any account publish to it. The grant is made by ``Notifications`` instead, for our rule only.
    """

    def __init__(self, topic: sns.ITopic, message: events.RuleTargetInput) -> None:
        self._topic = topic
        self._message = message

    def bind(self, rule: events.IRule, id: str | None = None) -> events.RuleTargetConfig:
        return events.RuleTargetConfig(arn=self._topic.topic_arn, input=self._message)


class Notifications(Construct):
    """A KMS-encrypted topic that the state machine, the alarms and the Batch failure rule publish to."""

    def __init__(self, scope: Construct, construct_id: str, *, email: str | None) -> None:
        super().__init__(scope, construct_id)
        # A customer-managed key: the AWS-managed SNS key cannot be granted to CloudWatch alarms or to
        # EventBridge, which both publish to this topic. (EventBridge's grant is made in add_alarms.)
        self.key = kms.Key(
            self,
            "TopicKey",
            description="topx notifications topic",
            enable_key_rotation=True,
        )
        self.key.add_to_resource_policy(
            iam.PolicyStatement(
                principals=[iam.ServicePrincipal("cloudwatch.amazonaws.com")],
                actions=["kms:Decrypt", "kms:GenerateDataKey"],
                resources=["*"],  # in a key policy, "*" means this key
                conditions={"StringEquals": {"aws:SourceAccount": Stack.of(self).account}},
            )
        )
        self.topic = sns.Topic(
            self,
            "Topic",
            display_name="topx pipeline",
            master_key=self.key,
            enforce_ssl=True,
        )
        if email:
            self.topic.add_subscription(subscriptions.EmailSubscription(email))

    def add_alarms(self, state_machine: sfn.IStateMachine, queues: Sequence[batch.IJobQueue],
                   dead_letters: sqs.IQueue | None = None,
                   functions: Sequence[lambda_.IFunction] = ()) -> list[cloudwatch.Alarm]:
        """Alarm on failed or timed-out executions, on undelivered trigger events and on throttled
        ``functions``; forward failed Batch jobs of our queues, and our queues blocked. -> the alarms."""
        alarms: list[tuple[str, cloudwatch.IMetric]] = [
            ("ExecutionsFailed", state_machine.metric_failed(period=ALARM_PERIOD)),
            ("ExecutionsTimedOut", state_machine.metric_timed_out(period=ALARM_PERIOD)),
        ]
        if dead_letters is not None:
            alarms.append(("TriggerEventsUndelivered",
                           dead_letters.metric_approximate_number_of_messages_visible(period=ALARM_PERIOD)))
        if functions:
            alarms.append(("LambdaThrottles", throttles(functions)))
        created = [self._alarm(name, f"topx pipeline: {name} >= 1 in {ALARM_PERIOD.to_minutes()} minutes", metric)
                   for name, metric in alarms]

        rule = events.Rule(
            self,
            "BatchJobFailed",
            description="Forward failed topx Batch jobs (train, search and each search shard) to the topic",
            event_pattern=events.EventPattern(
                source=["aws.batch"],
                detail_type=["Batch Job State Change"],
                detail={"status": ["FAILED"], "jobQueue": [queue.job_queue_arn for queue in queues]},
            ),
        )
        rule.add_target(
            TopicTarget(
                self.topic,
                message=events.RuleTargetInput.from_text(
                    f"topx: AWS Batch job {events.EventField.from_path('$.detail.jobName')} "
                    f"({events.EventField.from_path('$.detail.jobId')}) failed: "
                    f"{events.EventField.from_path('$.detail.statusReason')}"
                ),
            )
        )
        blocked = events.Rule(
            self,
            "BatchQueueBlocked",
            description="Forward a blocked topx Batch queue (an INVALID compute environment, no capacity) to the topic",
            event_pattern=events.EventPattern(
                source=["aws.batch"],
                detail_type=["Batch Job Queue Blocked"],
                detail={"jobQueue": [queue.job_queue_arn for queue in queues]},
            ),
        )
        blocked.add_target(
            TopicTarget(
                self.topic,
                message=events.RuleTargetInput.from_text(
                    f"topx: AWS Batch queue {events.EventField.from_path('$.detail.jobQueue')} is blocked: job "
                    f"{events.EventField.from_path('$.detail.jobName')} "
                    f"({events.EventField.from_path('$.detail.jobId')}) cannot start: "
                    f"{events.EventField.from_path('$.detail.statusReason')} (docs/DEPLOY.md, Operations)"
                ),
            )
        )
        # EventBridge publishes to SNS under a resource policy (AWS advises against a target role for SNS,
        # above all for encrypted topics); the source-ARN condition keeps it to these rules.
        self.topic.add_to_resource_policy(
            iam.PolicyStatement(
                principals=[iam.ServicePrincipal(EVENTS)],
                actions=["sns:Publish"],
                resources=[self.topic.topic_arn],
                conditions={"ArnEquals": {"aws:SourceArn": [rule.rule_arn, blocked.rule_arn]}},
            )
        )
        # SNS encrypts what EventBridge publishes with the topic key on EventBridge's behalf. AWS documents
        # this statement without conditions: the KMS request carries no source ARN or account to test.
        self.key.add_to_resource_policy(
            iam.PolicyStatement(
                principals=[iam.ServicePrincipal(EVENTS)],
                actions=["kms:Decrypt", "kms:GenerateDataKey*"],
                resources=["*"],  # in a key policy, "*" means this key
            )
        )
        return created

    def add_compute_health(self, function: lambda_.Function, environments: Sequence[batch.IComputeEnvironment],
                           dead_letters: sqs.IQueue, service: str) -> cloudwatch.Alarm:
        """Run ``function`` (the compute health check) on a schedule over ``environments``, and alarm when it
        counts one INVALID or gone: AWS Batch sends no event for that. -> the alarm."""
        function.add_environment(ENV_COMPUTE_ENVIRONMENTS,
                                 ",".join(environment.compute_environment_arn for environment in environments))
        events.Rule(
            self,
            "ComputeHealthSchedule",
            description="Check the topx Batch compute environments' state (an INVALID one sends no event)",
            schedule=events.Schedule.rate(HEALTH_CHECK_EVERY),
            targets=[targets.LambdaFunction(function, dead_letter_queue=dead_letters, retry_attempts=2,
                                            max_event_age=HEALTH_CHECK_EVERY)],
        )
        return self._alarm(
            "ComputeEnvironmentsUnhealthy",
            "topx pipeline: a Batch compute environment is INVALID or gone (the compute health function's log names "
            "it and Batch's reason; docs/DEPLOY.md, Operations)",
            cloudwatch.Metric(namespace=METRICS_NAMESPACE, metric_name=METRIC_COMPUTE_UNHEALTHY,
                              dimensions_map={SERVICE_DIMENSION: service, STAGE_DIMENSION: COMPUTE_HEALTH_STAGE},
                              statistic="Maximum", period=HEALTH_CHECK_EVERY))

    def _alarm(self, name: str, description: str, metric: cloudwatch.IMetric) -> cloudwatch.Alarm:
        """An alarm ``<name>Alarm`` to the topic when ``metric`` is 1 or more in one period; no data is no alarm."""
        alarm = cloudwatch.Alarm(
            self,
            f"{name}Alarm",
            alarm_description=description,
            metric=metric,
            threshold=1,
            evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        alarm.add_alarm_action(cloudwatch_actions.SnsAction(self.topic))
        return alarm


def throttles(functions: Sequence[lambda_.IFunction]) -> cloudwatch.MathExpression:
    """Throttled invocations of all ``functions``, summed: one alarm for the pipeline's functions."""
    if len(functions) > ALARM_MATH_METRICS:
        raise ValueError(f"{len(functions)} functions: an alarm sums at most {ALARM_MATH_METRICS} metrics")
    return cloudwatch.MathExpression(
        expression="SUM(METRICS())",
        using_metrics={f"throttles{i}": function.metric_throttles(period=ALARM_PERIOD, statistic="Sum")
                       for i, function in enumerate(functions)},
        label="Throttles (all functions)",
        period=ALARM_PERIOD,
    )
