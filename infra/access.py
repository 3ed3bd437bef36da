"""IAM statements the pipeline's roles share: which S3 prefixes a role may touch.

Actions are listed one by one (no `s3:Get*`); object access is scoped to the `runs/` and `incoming/`
prefixes. Acknowledgments for the remaining object-ARN wildcards live next to the roles that use them.
"""

from __future__ import annotations

from aws_cdk import Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3 as s3
from constructs import IConstruct

from infra.nag import acknowledge
from infra.storage import INCOMING_PREFIX, RUNS_PREFIX


def list_bucket(bucket: s3.IBucket) -> iam.PolicyStatement:
    return iam.PolicyStatement(
        actions=["s3:ListBucket", "s3:GetBucketLocation"], resources=[bucket.bucket_arn]
    )


def read_write_runs(bucket: s3.IBucket) -> iam.PolicyStatement:
    return iam.PolicyStatement(
        actions=["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"],
        resources=[bucket.arn_for_objects(f"{RUNS_PREFIX}*")],
    )


def read_incoming(bucket: s3.IBucket) -> iam.PolicyStatement:
    return iam.PolicyStatement(
        actions=["s3:GetObject"], resources=[bucket.arn_for_objects(f"{INCOMING_PREFIX}*")]
    )


def object_wildcard_finding(bucket: s3.IBucket, prefix: str) -> str:
    """The cdk-nag IAM5 finding id for ``<bucket arn>/<prefix>*``, as cdk-nag prints it."""
    logical_id = Stack.of(bucket).get_logical_id(bucket.node.default_child)  # type: ignore[arg-type]
    return f"AwsSolutions-IAM5[Resource::<{logical_id}.Arn>/{prefix}*]"


def acknowledge_run_objects(scope: IConstruct, bucket: s3.IBucket, *, incoming: bool = False) -> None:
    acknowledge(
        scope,
        object_wildcard_finding(bucket, RUNS_PREFIX),
        "Object keys are minted per run (runs/<run_id>/...), so access is scoped to the runs/ prefix "
        "of the project's own bucket, not to single keys.",
    )
    if incoming:
        acknowledge(
            scope,
            object_wildcard_finding(bucket, INCOMING_PREFIX),
            "Prepare reads whatever the user uploads under incoming/; read-only and limited to that prefix.",
        )
