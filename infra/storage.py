"""Storage: the data bucket (uploads, runs), its access-log bucket, and the recommendations table."""

from __future__ import annotations

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_s3 as s3
from constructs import Construct

from infra.nag import acknowledge

INCOMING_PREFIX = "incoming/"
RUNS_PREFIX = "runs/"
# Table key schema. A recommendations item per (user, version) is pk="user#<user_id>", sk="v#<version>";
# the active-version pointer is pk="pointer", sk="active". Old versions carry `expires_at` (epoch seconds).
PARTITION_KEY = "pk"
SORT_KEY = "sk"
TTL_ATTRIBUTE = "expires_at"
# How long noncurrent object versions and access logs are kept.
NONCURRENT_VERSION_DAYS = 7
ACCESS_LOG_DAYS = 90


class Storage(Construct):
    """One S3 bucket for everything the pipeline reads and writes, and one DynamoDB table."""

    def __init__(self, scope: Construct, construct_id: str, *, retention_days: int) -> None:
        super().__init__(scope, construct_id)

        self.log_bucket = s3.Bucket(
            self,
            "AccessLogs",
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            # S3 server access logging can only deliver to buckets encrypted with S3-managed keys.
            encryption=s3.BucketEncryption.S3_MANAGED,
            enforce_ssl=True,
            lifecycle_rules=[s3.LifecycleRule(id="expire-logs", expiration=Duration.days(ACCESS_LOG_DAYS))],
            removal_policy=RemovalPolicy.RETAIN,
        )
        acknowledge(
            self.log_bucket,
            "AwsSolutions-S1",
            "This is the access-log bucket itself; logging it into itself would log its own log deliveries.",
        )

        self.bucket = s3.Bucket(
            self,
            "Data",
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            encryption=s3.BucketEncryption.S3_MANAGED,
            enforce_ssl=True,
            versioned=True,
            server_access_logs_bucket=self.log_bucket,
            server_access_logs_prefix="data-bucket/",
            lifecycle_rules=[
                s3.LifecycleRule(
                    id="expire-old-runs",
                    prefix=RUNS_PREFIX,
                    expiration=Duration.days(retention_days),
                ),
                s3.LifecycleRule(
                    id="expire-noncurrent-versions",
                    noncurrent_version_expiration=Duration.days(NONCURRENT_VERSION_DAYS),
                    expired_object_delete_marker=True,
                    abort_incomplete_multipart_upload_after=Duration.days(1),
                ),
            ],
            removal_policy=RemovalPolicy.RETAIN,
        )
        # EventBridge delivery is set on the bucket resource itself: the L2 `event_bridge_enabled` flag
        # would add a custom-resource Lambda just to flip this one property.
        self.bucket.node.default_child.add_property_override(  # type: ignore[union-attr]
            "NotificationConfiguration.EventBridgeConfiguration.EventBridgeEnabled", True
        )

        self.table = dynamodb.Table(
            self,
            "Recommendations",
            partition_key=dynamodb.Attribute(name=PARTITION_KEY, type=dynamodb.AttributeType.STRING),
            sort_key=dynamodb.Attribute(name=SORT_KEY, type=dynamodb.AttributeType.STRING),
            billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True
            ),
            encryption=dynamodb.TableEncryption.AWS_MANAGED,
            time_to_live_attribute=TTL_ATTRIBUTE,
            removal_policy=RemovalPolicy.RETAIN,
        )
