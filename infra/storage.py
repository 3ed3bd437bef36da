"""Storage: the data bucket (uploads, runs), its access-log bucket, and the recommendations table.

The bucket's layout and the table's key schema are the deploy contract's (topx/contract.py): runs/
expires by lifecycle, versions/ lies outside it and does not.
"""

from __future__ import annotations

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_s3 as s3
from constructs import Construct

from infra.checkov import skip_checks
from infra.nag import acknowledge
from topx.contract import KEY_ATTRIBUTE_TYPE, PARTITION_KEY, RUNS_PREFIX, SORT_KEY, TTL_ATTRIBUTE

# The key attributes' DynamoDB type letter (the contract's) as CDK names it.
ATTRIBUTE_TYPES = {
    "S": dynamodb.AttributeType.STRING,
    "N": dynamodb.AttributeType.NUMBER,
    "B": dynamodb.AttributeType.BINARY,
}
# How long noncurrent object versions and access logs are kept. Deleted or overwritten access logs stay
# recoverable for a month, so removing the trail of an intrusion takes more than one DeleteObject.
NONCURRENT_VERSION_DAYS = 7
ACCESS_LOG_DAYS = 90
NONCURRENT_ACCESS_LOG_DAYS = 30


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
            versioned=True,
            lifecycle_rules=[
                s3.LifecycleRule(id="expire-logs", expiration=Duration.days(ACCESS_LOG_DAYS)),
                s3.LifecycleRule(
                    id="expire-noncurrent-logs",
                    noncurrent_version_expiration=Duration.days(NONCURRENT_ACCESS_LOG_DAYS),
                    expired_object_delete_marker=True,
                ),
            ],
            removal_policy=RemovalPolicy.RETAIN,
        )
        self_logging = (
            "This is the access-log bucket itself; logging it into itself would log its own log deliveries."
        )
        acknowledge(self.log_bucket, "AwsSolutions-S1", self_logging)
        skip_checks(self.log_bucket, {"CKV_AWS_18": self_logging})

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
            partition_key=dynamodb.Attribute(name=PARTITION_KEY, type=ATTRIBUTE_TYPES[KEY_ATTRIBUTE_TYPE]),
            sort_key=dynamodb.Attribute(name=SORT_KEY, type=ATTRIBUTE_TYPES[KEY_ATTRIBUTE_TYPE]),
            billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True
            ),
            encryption=dynamodb.TableEncryption.AWS_MANAGED,
            time_to_live_attribute=TTL_ATTRIBUTE,
            removal_policy=RemovalPolicy.RETAIN,
        )
        skip_checks(
            self.table,
            {
                "CKV_AWS_119": "Encrypted at rest with the AWS-managed KMS key (aws/dynamodb), whose use CloudTrail "
                "logs. A customer-managed key would make every reader of recommendations outside this stack need "
                "kms:Decrypt on it besides its table permissions, while the items hold only ids and scores."
            },
        )
