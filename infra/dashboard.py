"""The operations dashboard: runs, stage durations, model quality over time, failures, and the alarms.

Runs come from the state machine's own metrics (AWS/States); stage durations, failures, users published,
recall@x and lift over popularity from the EMF metrics the functions and jobs print (namespace topx,
dimensions service = the stack's name and stage: functions/handlers.py, batch_jobs/metrics.py); Lambda
errors and throttles from AWS/Lambda. A log widget lists the latest errors of every function with their
run id (the correlation id), which is where to look next.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from aws_cdk import Duration, Stack
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_stepfunctions as sfn
from constructs import Construct

from topx.contract import (
    METRIC_LIFT,
    METRIC_RECALL,
    METRIC_SEARCHED_USERS,
    METRIC_STAGE_FAILURES,
    METRIC_STAGE_SECONDS,
    METRIC_TRAIN_EPOCHS,
    METRIC_USERS_PUBLISHED,
    METRICS_NAMESPACE,
    SERVICE_DIMENSION,
    STAGE_DIMENSION,
)

# Runs are a few a day at most: hourly points keep a fortnight readable.
PERIOD = Duration.hours(1)
# The pipeline's stages in the order a run meets them: each Lambda function's handler, and the two jobs.
JOB_STAGES = ("train", "search")
WIDTH = 12  # half of the dashboard's 24 columns
HEIGHT = 6
# Every function's error lines of the period, newest first, with the run they belong to.
ERRORS_QUERY = (
    "fields @timestamp, correlation_id, message, exception_name\n"
    "| filter level = \"ERROR\"\n"
    "| sort @timestamp desc\n"
    "| limit 50"
)


def stage_metric(name: str, stage: str, statistic: str, service: str, label: str | None = None) -> cloudwatch.Metric:
    """A topx EMF metric of one stage, as functions/handlers.py and batch_jobs/metrics.py emit it."""
    return cloudwatch.Metric(
        namespace=METRICS_NAMESPACE,
        metric_name=name,
        dimensions_map={SERVICE_DIMENSION: service, STAGE_DIMENSION: stage},
        statistic=statistic,
        period=PERIOD,
        label=label or stage,
    )


class Dashboard(Construct):
    """One CloudWatch dashboard named after the stack."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        state_machine: sfn.IStateMachine,
        functions: Mapping[str, lambda_.IFunction],
        function_logs: Sequence[logs.ILogGroup],
        alarms: Sequence[cloudwatch.IAlarm],
    ) -> None:
        super().__init__(scope, construct_id)
        service = Stack.of(self).stack_name
        stages = (*functions, *JOB_STAGES)

        def of_stages(name: str, statistic: str, which: Sequence[str] = stages) -> list[cloudwatch.IMetric]:
            return [stage_metric(name, stage, statistic, service) for stage in which]

        runs = cloudwatch.GraphWidget(
            title="Runs",
            left=[
                state_machine.metric_started(period=PERIOD, label="started"),
                state_machine.metric_succeeded(period=PERIOD, label="succeeded"),
                state_machine.metric_failed(period=PERIOD, label="failed"),
                state_machine.metric_timed_out(period=PERIOD, label="timed out"),
                state_machine.metric_aborted(period=PERIOD, label="aborted"),
            ],
            width=WIDTH, height=HEIGHT,
        )
        run_time = cloudwatch.GraphWidget(
            title="Run duration (ms)",
            left=[state_machine.metric_time(period=PERIOD, statistic="Maximum", label="longest run")],
            width=WIDTH, height=HEIGHT,
        )
        durations = cloudwatch.GraphWidget(
            title="Stage durations (s, longest per hour)",
            left=of_stages(METRIC_STAGE_SECONDS, "Maximum"),
            stacked=False, width=WIDTH, height=HEIGHT,
        )
        quality = cloudwatch.GraphWidget(
            title="Published model: recall@x (left), lift over popularity (right)",
            left=[stage_metric(METRIC_RECALL, "publish", "Average", service, "recall@x")],
            right=[stage_metric(METRIC_LIFT, "publish", "Average", service, "lift over popularity")],
            width=WIDTH, height=HEIGHT,
        )
        volume = cloudwatch.GraphWidget(
            title="Users published (left), searched users and training epochs (right)",
            left=[stage_metric(METRIC_USERS_PUBLISHED, "publish", "Maximum", service, "users published")],
            right=[stage_metric(METRIC_SEARCHED_USERS, "search", "Sum", service, "users searched"),
                   stage_metric(METRIC_TRAIN_EPOCHS, "train", "Maximum", service, "training epochs")],
            width=WIDTH, height=HEIGHT,
        )
        failures = cloudwatch.GraphWidget(
            title="Failures: stages that raised or exited non-zero",
            left=of_stages(METRIC_STAGE_FAILURES, "Sum"),
            width=WIDTH, height=HEIGHT,
        )
        lambda_health = cloudwatch.GraphWidget(
            title="Lambda errors (left) and throttles (right)",
            left=[function.metric_errors(period=PERIOD, label=f"{name} errors") for name, function in functions.items()],
            right=[function.metric_throttles(period=PERIOD, label=f"{name} throttles")
                   for name, function in functions.items()],
            width=WIDTH, height=HEIGHT,
        )
        alarm_status = cloudwatch.AlarmStatusWidget(alarms=list(alarms), title="Alarms", width=WIDTH, height=HEIGHT)
        errors = cloudwatch.LogQueryWidget(
            title="Latest function errors, with their run id (correlation_id)",
            log_group_names=[group.log_group_name for group in function_logs],
            query_string=ERRORS_QUERY,
            view=cloudwatch.LogQueryVisualizationType.TABLE,
            width=2 * WIDTH, height=HEIGHT,
        )
        self.dashboard = cloudwatch.Dashboard(
            self,
            "Dashboard",
            dashboard_name=f"{service}-pipeline",
            default_interval=Duration.days(14),
            widgets=[[runs, run_time], [durations, quality], [volume, failures], [lambda_health, alarm_status],
                     [errors]],
        )
