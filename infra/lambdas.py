"""The pipeline's Lambda functions: one container image (functions/Dockerfile), one function per handler.

Each function's image CMD is overridden with its handler, ``functions.handlers.<name>``. Sizes follow the
work: prepare and repackage hold a dataset or a model in memory; the gate and publish read small objects
and a few table items. 3008 MB is the largest memory a new account's default quota allows.

Each function has a role of its own: writing to its own log group, the S3 prefixes it reads and writes,
and only the DynamoDB actions and partition keys it uses (see topx/aws/store.py; the keys are
topx/contract.py's), nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from aws_cdk import Duration, Size
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_s3 as s3
from constructs import Construct

from infra import checkov
from infra.access import (
    acknowledge_run_objects,
    acknowledge_unscoped,
    list_bucket,
    read_inputs,
    read_runs,
    table_items,
    version_objects,
    write_runs,
)
from infra.images import function_code
from infra.logs import log_group
from topx.contract import (
    FALLBACK_PARTITION,
    HANDLER_MODULE,
    POINTER_PARTITION,
    TRIGGER_PARTITION,
    USER_PARTITION_PREFIX,
)

# Active tracing adds these to every function's role; X-Ray offers no narrower resource.
TRACING_ACTIONS = ("xray:PutTraceSegments", "xray:PutTelemetryRecords")


@dataclass(frozen=True)
class TableAccess:
    """The DynamoDB item actions a function calls (topx/aws/store.py) and the partition keys it touches."""

    actions: tuple[str, ...]
    leading_keys: tuple[str, ...]


@dataclass(frozen=True)
class FunctionSpec:
    handler: str  # a function in functions/handlers.py
    description: str
    memory_mb: int
    timeout: Duration
    ephemeral_gib: int = 1
    reads_inputs: bool = False  # incoming/ and features/
    reads_runs: bool = True  # lists the bucket and reads runs/
    writes_runs: bool = True
    table: tuple[TableAccess, ...] = ()
    versions: tuple[str, ...] = ()  # S3 object actions under versions/
    state_machine: bool = True  # a task of the state machine (the starter and the health check are not)
    unscoped: tuple[str, ...] = ()  # actions without resource-level permissions (infra/access.py)


SPECS: tuple[FunctionSpec, ...] = (
    FunctionSpec(
        "prepare",
        "Validate an upload, build the feature index, write the training data, mint run_id",
        memory_mb=3008,
        timeout=Duration.minutes(15),
        ephemeral_gib=4,
        reads_inputs=True,
        # A refresh (stages.refresh_run) reads which version is live: store.active_version, the pointer only.
        table=(TableAccess(("dynamodb:GetItem",), (POINTER_PARTITION,)),),
    ),
    FunctionSpec(
        "quality_gate",
        "Compare a run's metrics with the thresholds and with the live version",
        memory_mb=1024,
        timeout=Duration.minutes(2),
        writes_runs=False,
        # store.active_version: the pointer item only.
        table=(TableAccess(("dynamodb:GetItem",), (POINTER_PARTITION,)),),
        versions=("s3:GetObject",),  # the live model's metrics
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
        # store.write_recommendations: the run's user items and, when retiring, superseded versions'
        # items; store.write_fallback / expire_fallback: the run's fallback list, and a superseded one's
        # TTL; store.active_version: which versions are superseded. Never a write to the pointer.
        table=(
            TableAccess(("dynamodb:BatchWriteItem",), (f"{USER_PARTITION_PREFIX}*",)),
            TableAccess(("dynamodb:PutItem", "dynamodb:UpdateItem"), (FALLBACK_PARTITION,)),
            TableAccess(("dynamodb:GetItem",), (POINTER_PARTITION,)),
        ),
        # The load's manifest (a copy), and retiring: read, then delete, older versions' manifests.
        versions=("s3:GetObject", "s3:PutObject", "s3:DeleteObject"),
    ),
    FunctionSpec(
        "report",
        "Write the run report: one HTML page of the run's data, training, metrics and lists",
        # One count per user and per item, the shards' lists streamed: sized as prepare is.
        memory_mb=3008,
        timeout=Duration.minutes(15),
        ephemeral_gib=4,
        reads_inputs=True,  # the items table, for titles
    ),
    FunctionSpec(
        "publish",
        "Check every shard is loaded, then flip the active-version pointer",
        memory_mb=1024,
        timeout=Duration.minutes(5),
        writes_runs=False,
        # store.publish_version: one conditional write of the pointer item; active_version on a superseded run;
        # store.has_fallback: the run's fallback list is there before readers can be sent to it.
        table=(TableAccess(("dynamodb:PutItem", "dynamodb:GetItem"), (POINTER_PARTITION,)),
               TableAccess(("dynamodb:GetItem",), (FALLBACK_PARTITION,))),
        versions=("s3:PutObject",),  # a copy of the run's metrics
    ),
    FunctionSpec(
        "starter",
        "Start one pipeline execution per burst of uploads, never two at once",
        # Reads a batch of queue messages and one table item: no data, no model.
        memory_mb=512,
        timeout=Duration.minutes(1),
        reads_runs=False,
        writes_runs=False,
        # topx.aws.trigger: the one trigger item, read and conditionally written. The queue, and the state
        # machine's StartExecution, ListExecutions and DescribeExecution, are granted by infra/pipeline.py.
        table=(TableAccess(("dynamodb:GetItem", "dynamodb:PutItem"), (TRIGGER_PARTITION,)),),
        state_machine=False,
    ),
    FunctionSpec(
        "compute_health",
        "Count the stack's Batch compute environments that are INVALID or gone, for the alarm",
        # One Batch API call on a schedule (infra/notifications.py); its environments come from the stack.
        memory_mb=256,
        timeout=Duration.minutes(1),
        reads_runs=False,
        writes_runs=False,
        state_machine=False,
        unscoped=("batch:DescribeComputeEnvironments",),
    ),
)
# The handlers the state machine invokes (the starter is invoked by its queue, and invokes the state machine;
# the compute health check by a schedule).
STATE_MACHINE_HANDLERS = tuple(spec.handler for spec in SPECS if spec.state_machine)


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
        logs_key: kms.IKey,
        base_digest: str | None = None,
        memory_mb: Mapping[str, int] | None = None,
    ) -> None:
        """``memory_mb``: handler -> memory (MB), over its spec's (the data functions, sized by a setting)."""
        super().__init__(scope, construct_id)
        self._base_digest = base_digest  # pins the image's base (infra/images.py)
        self.by_handler: dict[str, lambda_.DockerImageFunction] = {}
        for spec in SPECS:
            if memory_mb and spec.handler in memory_mb:
                spec = replace(spec, memory_mb=memory_mb[spec.handler])
            self.by_handler[spec.handler] = self._function(spec, bucket, table, environment, logs_key)
        acknowledge_unscoped(self, (*TRACING_ACTIONS, *(action for spec in SPECS for action in spec.unscoped)))

    def _function(
        self,
        spec: FunctionSpec,
        bucket: s3.IBucket,
        table: dynamodb.ITable,
        environment: dict[str, str],
        logs_key: kms.IKey,
    ) -> lambda_.DockerImageFunction:
        construct_id = "".join(part.capitalize() for part in spec.handler.split("_"))
        logs = log_group(self, f"{construct_id}Logs", key=logs_key)
        # Its own role instead of AWSLambdaBasicExecutionRole, whose logs actions are on every log group.
        role = iam.Role(
            self,
            f"{construct_id}ServiceRole",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            description=f"topx {spec.handler} function",
        )
        logs.grant_write(role)
        function = lambda_.DockerImageFunction(
            self,
            construct_id,
            code=function_code(f"{HANDLER_MODULE}.{spec.handler}", self._base_digest),
            description=f"topx {spec.handler}: {spec.description}",
            architecture=lambda_.Architecture.X86_64,
            memory_size=spec.memory_mb,
            timeout=spec.timeout,
            ephemeral_storage_size=Size.gibibytes(spec.ephemeral_gib),
            environment=environment,
            tracing=lambda_.Tracing.ACTIVE,
            log_group=logs,
            role=role,
        )
        if spec.reads_runs:
            role.add_to_policy(list_bucket(bucket))
            role.add_to_policy(read_runs(bucket))
        if spec.writes_runs:
            role.add_to_policy(write_runs(bucket))
        if spec.reads_inputs:
            role.add_to_policy(read_inputs(bucket))
        if spec.versions:
            role.add_to_policy(version_objects(bucket, spec.versions))
        if spec.reads_runs or spec.writes_runs:
            acknowledge_run_objects(role, bucket, inputs=spec.reads_inputs, versions=bool(spec.versions))
        for access in spec.table:
            role.add_to_policy(table_items(table, access.actions, access.leading_keys))
        if spec.unscoped:
            role.add_to_policy(iam.PolicyStatement(actions=list(spec.unscoped), resources=["*"]))
        checkov.skip_checks(
            function,
            {
                "CKV_AWS_115": checkov.LAMBDA_CONCURRENCY,
                "CKV_AWS_116": checkov.LAMBDA_DLQ,
                "CKV_AWS_117": checkov.LAMBDA_VPC,
                "CKV_AWS_173": checkov.LAMBDA_ENV_ENCRYPTION,
            },
        )
        return function
