"""The pipeline's Lambda functions: one container image (functions/Dockerfile), one function per handler.

Each function's image CMD is overridden with its handler, ``functions.handlers.<name>``. Sizes follow the
work: prepare and repackage hold a dataset or a model in memory; the gate and publish read small objects
and a few table items. 3008 MB is the largest memory a new account's default quota allows.
"""

from __future__ import annotations

from dataclasses import dataclass

from aws_cdk import Duration, RemovalPolicy, Size
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from constructs import Construct

from infra.access import acknowledge_run_objects, list_bucket, read_incoming, read_write_runs
from infra.images import function_code
from infra.nag import LAMBDA_BASIC_EXECUTION, acknowledge

HANDLER_MODULE = "functions.handlers"


@dataclass(frozen=True)
class FunctionSpec:
    handler: str  # a function in functions/handlers.py
    description: str
    memory_mb: int
    timeout: Duration
    ephemeral_gib: int = 1
    reads_incoming: bool = False
    table_access: str | None = None  # None, "read" or "write"


SPECS: tuple[FunctionSpec, ...] = (
    FunctionSpec(
        "prepare",
        "Validate an upload, build the feature index, write the training data, mint run_id",
        memory_mb=3008,
        timeout=Duration.minutes(15),
        ephemeral_gib=4,
        reads_incoming=True,
    ),
    FunctionSpec(
        "quality_gate",
        "Compare a run's metrics with the thresholds and with the live version",
        memory_mb=1024,
        timeout=Duration.minutes(2),
        table_access="read",
    ),
    FunctionSpec(
        "repackage",
        "Turn the FM artifact into item and user vectors for inner-product search",
        memory_mb=3008,
        timeout=Duration.minutes(15),
        ephemeral_gib=4,
    ),
    FunctionSpec(
        "load_shard",
        "Write one shard of recommendations into the table under the new version",
        memory_mb=1769,  # one full vCPU
        timeout=Duration.minutes(15),
        ephemeral_gib=2,
        table_access="write",
    ),
    FunctionSpec(
        "publish",
        "Check every shard is loaded, then flip the active-version pointer",
        memory_mb=1024,
        timeout=Duration.minutes(5),
        table_access="write",
    ),
)


class Functions(Construct):
    """Creates one DockerImageFunction per spec; ``by_handler`` maps handler name to function."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        bucket: s3.IBucket,
        table: dynamodb.ITable,
        environment: dict[str, str],
    ) -> None:
        super().__init__(scope, construct_id)
        self.by_handler: dict[str, lambda_.DockerImageFunction] = {}
        for spec in SPECS:
            self.by_handler[spec.handler] = self._function(spec, bucket, table, environment)
        acknowledge(
            self,
            f"AwsSolutions-IAM4[{LAMBDA_BASIC_EXECUTION}]",
            "AWSLambdaBasicExecutionRole only lets a function write its own CloudWatch Logs streams.",
        )
        acknowledge(
            self,
            "AwsSolutions-IAM5[Resource::*]",
            "X-Ray tracing: xray:PutTraceSegments and xray:PutTelemetryRecords have no resource-level "
            "permissions, so AWS requires Resource '*' for them.",
        )

    def _function(
        self,
        spec: FunctionSpec,
        bucket: s3.IBucket,
        table: dynamodb.ITable,
        environment: dict[str, str],
    ) -> lambda_.DockerImageFunction:
        construct_id = "".join(part.capitalize() for part in spec.handler.split("_"))
        log_group = logs.LogGroup(
            self,
            f"{construct_id}Logs",
            retention=logs.RetentionDays.ONE_MONTH,
            removal_policy=RemovalPolicy.DESTROY,
        )
        function = lambda_.DockerImageFunction(
            self,
            construct_id,
            code=function_code(f"{HANDLER_MODULE}.{spec.handler}"),
            description=f"topx {spec.handler}: {spec.description}",
            architecture=lambda_.Architecture.X86_64,
            memory_size=spec.memory_mb,
            timeout=spec.timeout,
            ephemeral_storage_size=Size.gibibytes(spec.ephemeral_gib),
            environment=environment,
            tracing=lambda_.Tracing.ACTIVE,
            log_group=log_group,
        )
        function.add_to_role_policy(list_bucket(bucket))
        function.add_to_role_policy(read_write_runs(bucket))
        if spec.reads_incoming:
            function.add_to_role_policy(read_incoming(bucket))
        acknowledge_run_objects(function, bucket, incoming=spec.reads_incoming)
        if spec.table_access == "read":
            table.grant_read_data(function)
        elif spec.table_access == "write":
            table.grant_read_write_data(function)
        return function
