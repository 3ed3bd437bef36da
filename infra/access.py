"""IAM statements the pipeline's roles share, and the one list of what may be granted on ``Resource: "*"``.

Actions are listed one by one (no ``s3:Get*``). Object access is scoped to the prefixes a role reads or
writes (``runs/``, and for prepare ``incoming/`` and ``features/``); table access to the actions and the
partition keys a function uses. ``Resource: "*"`` appears only for actions in ``UNSCOPED_ACTIONS``, each with
the reason AWS offers no narrower form; tests/infra/test_security.py fails on any other, and docs/RELIABILITY.md
lists them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from aws_cdk import Stack
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3 as s3
from constructs import IConstruct

from infra.nag import acknowledge
from topx.contract import (
    CONFIG_PREFIX,
    FEATURES_PREFIX,
    INCOMING_PREFIX,
    RESPONSES_PREFIX,
    RUNS_PREFIX,
    VERSIONS_PREFIX,
)

# What Prepare reads besides runs/: the upload, the side tables, the filter file and the responses.
INPUT_PREFIXES = (INCOMING_PREFIX, FEATURES_PREFIX, CONFIG_PREFIX, RESPONSES_PREFIX)

_XRAY_PUT = "X-Ray trace upload (active tracing) has no resource-level permissions."
_XRAY_SAMPLING = "X-Ray sampling (state machine tracing) has no resource-level permissions."
_SFN_LOGS = (
    "Step Functions execution logging sets up a CloudWatch Logs vended-log delivery; these delivery and "
    "resource-policy actions have no resource-level permissions (AWS documents them on Resource '*')."
)
# action -> why AWS offers nothing narrower than Resource "*" for it. The single allow-list: the roles'
# cdk-nag acknowledgments are built from it, and the tests reject any unlisted action on "*".
UNSCOPED_ACTIONS: Mapping[str, str] = {
    "ecr:GetAuthorizationToken": (
        "Returns the account's registry login token and has no resource-level permissions; the image pulls "
        "themselves (BatchGetImage, GetDownloadUrlForLayer) are limited to the CDK assets repository."
    ),
    "batch:DescribeComputeEnvironments": (
        "Read by the compute health check for the stack's own environments; AWS Batch has no resource-level "
        "permissions for DescribeComputeEnvironments."
    ),
    "batch:DescribeJobs": (
        "Polled by submitJob.sync to follow the job it started; AWS Batch has no resource-level permissions "
        "for DescribeJobs."
    ),
    "xray:PutTraceSegments": _XRAY_PUT,
    "xray:PutTelemetryRecords": _XRAY_PUT,
    "xray:GetSamplingRules": _XRAY_SAMPLING,
    "xray:GetSamplingTargets": _XRAY_SAMPLING,
    "logs:CreateLogDelivery": _SFN_LOGS,
    "logs:GetLogDelivery": _SFN_LOGS,
    "logs:UpdateLogDelivery": _SFN_LOGS,
    "logs:DeleteLogDelivery": _SFN_LOGS,
    "logs:ListLogDeliveries": _SFN_LOGS,
    "logs:PutResourcePolicy": _SFN_LOGS,
    "logs:DescribeResourcePolicies": _SFN_LOGS,
    "logs:DescribeLogGroups": _SFN_LOGS,
}

# AWS-managed policies a role may carry, with the reason; any other managed policy fails the tests.
ECS_INSTANCE_POLICY = "service-role/AmazonEC2ContainerServiceforEC2Role"
MANAGED_POLICIES: Mapping[str, str] = {
    ECS_INSTANCE_POLICY: (
        "The GPU instances' role: the ECS agent registers the instance in the cluster AWS Batch creates and "
        "names at run time, and AWS Batch documents this policy for it; a hand-copied policy would drift "
        "from what each new agent needs. Containers do not use it: Batch runs EC2 jobs with host networking, "
        "so the instances drop the train image's user's packets to the metadata service at boot "
        "(infra/compute.py), and jobs run with their own job role."
    ),
}


def list_bucket(bucket: s3.IBucket) -> iam.PolicyStatement:
    # Unconditioned on s3:prefix on purpose: with a prefix condition S3 answers a missing key with 403
    # instead of 404, and the stages tell "not written yet" from "not allowed" by that.
    return iam.PolicyStatement(
        actions=["s3:ListBucket", "s3:GetBucketLocation"], resources=[bucket.bucket_arn]
    )


def read_runs(bucket: s3.IBucket) -> iam.PolicyStatement:
    return iam.PolicyStatement(
        actions=["s3:GetObject"], resources=[bucket.arn_for_objects(f"{RUNS_PREFIX}*")]
    )


def write_runs(bucket: s3.IBucket) -> iam.PolicyStatement:
    return iam.PolicyStatement(
        actions=["s3:PutObject", "s3:AbortMultipartUpload"],
        resources=[bucket.arn_for_objects(f"{RUNS_PREFIX}*")],
    )


def version_objects(bucket: s3.IBucket, actions: Sequence[str]) -> iam.PolicyStatement:
    """Object actions under versions/: what a live or unretired version keeps beyond the runs/ lifecycle."""
    return iam.PolicyStatement(actions=list(actions), resources=[bucket.arn_for_objects(f"{VERSIONS_PREFIX}*")])


def read_inputs(bucket: s3.IBucket) -> iam.PolicyStatement:
    """The upload under incoming/, the side tables under features/, the filter file under config/ and the
    responses under responses/ (read by prepare only)."""
    return iam.PolicyStatement(
        actions=["s3:GetObject"],
        resources=[bucket.arn_for_objects(f"{prefix}*") for prefix in INPUT_PREFIXES],
    )


def table_items(
    table: dynamodb.ITable, actions: Sequence[str], leading_keys: Sequence[str]
) -> iam.PolicyStatement:
    """Item actions on ``table``, limited to items whose partition key matches one of ``leading_keys``."""
    return iam.PolicyStatement(
        actions=list(actions),
        resources=[table.table_arn],
        conditions={"ForAllValues:StringLike": {"dynamodb:LeadingKeys": list(leading_keys)}},
    )


def object_wildcard_finding(bucket: s3.IBucket, prefix: str) -> str:
    """The cdk-nag IAM5 finding id for ``<bucket arn>/<prefix>*``, as cdk-nag prints it."""
    logical_id = Stack.of(bucket).get_logical_id(bucket.node.default_child)  # type: ignore[arg-type]
    return f"AwsSolutions-IAM5[Resource::<{logical_id}.Arn>/{prefix}*]"


def acknowledge_run_objects(
    scope: IConstruct, bucket: s3.IBucket, *, inputs: bool = False, versions: bool = False
) -> None:
    acknowledge(
        scope,
        object_wildcard_finding(bucket, RUNS_PREFIX),
        "Object keys are minted per run (runs/<run_id>/...), so access is scoped to the runs/ prefix "
        "of the project's own bucket, not to single keys.",
    )
    if versions:
        acknowledge(
            scope,
            object_wildcard_finding(bucket, VERSIONS_PREFIX),
            "Object keys are minted per published or loaded version (versions/<run_id>/...), so access is "
            "scoped to the versions/ prefix of the project's own bucket, not to single keys.",
        )
    if inputs:
        reason = (
            "Prepare reads whatever the user uploads under incoming/, the side tables under features/, the "
            "filter file under config/ and the responses under responses/; read-only and limited to those "
            "prefixes."
        )
        for prefix in INPUT_PREFIXES:
            acknowledge(scope, object_wildcard_finding(bucket, prefix), reason)


def acknowledge_unscoped(scope: IConstruct, actions: Iterable[str]) -> None:
    """Acknowledge cdk-nag's ``Resource::*`` finding on ``scope`` for ``actions``, with their reasons."""
    actions = sorted(set(actions))
    unknown = [action for action in actions if action not in UNSCOPED_ACTIONS]
    if unknown:
        raise ValueError(f"{scope.node.path}: {unknown} are not in UNSCOPED_ACTIONS; scope them to resources")
    reasons = dict.fromkeys(UNSCOPED_ACTIONS[action] for action in actions)
    acknowledge(scope, "AwsSolutions-IAM5[Resource::*]", f"{', '.join(actions)}: {' '.join(reasons)}")


def acknowledge_managed_policy(scope: IConstruct, policy: str) -> None:
    """Acknowledge cdk-nag's IAM4 finding for an AWS-managed policy listed in ``MANAGED_POLICIES``."""
    acknowledge(
        scope,
        f"AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/{policy}]",
        MANAGED_POLICIES[policy],
    )
