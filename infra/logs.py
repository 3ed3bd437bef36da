"""CloudWatch Logs: one customer-managed key for every log group, and the log groups themselves.

Function, job and execution logs can carry user and item ids and error text about the input, so they
are encrypted with a key of this stack (rotated yearly) rather than only the service default. The key
policy lets CloudWatch Logs use the key for this account's log groups in this region, nothing else.
"""

from __future__ import annotations

from aws_cdk import ArnFormat, Duration, RemovalPolicy, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_logs as logs
from constructs import Construct

RETENTION = logs.RetentionDays.ONE_MONTH
# The actions CloudWatch Logs documents for a key that encrypts log groups, named one by one.
LOGS_KEY_ACTIONS = (
    "kms:Encrypt",
    "kms:Decrypt",
    "kms:ReEncryptFrom",
    "kms:ReEncryptTo",
    "kms:GenerateDataKey",
    "kms:GenerateDataKeyWithoutPlaintext",
    "kms:DescribeKey",
)


def logs_key(scope: Construct, construct_id: str) -> kms.Key:
    stack = Stack.of(scope)
    key = kms.Key(
        scope,
        construct_id,
        description="topx log groups",
        enable_key_rotation=True,
        # The log groups go with the stack (RemovalPolicy.DESTROY), so nothing would be left to decrypt.
        removal_policy=RemovalPolicy.DESTROY,
        pending_window=Duration.days(30),
    )
    key.add_to_resource_policy(
        iam.PolicyStatement(
            principals=[iam.ServicePrincipal(f"logs.{stack.region}.amazonaws.com")],
            actions=list(LOGS_KEY_ACTIONS),
            resources=["*"],  # in a key policy, "*" means this key
            conditions={
                "ArnLike": {
                    "kms:EncryptionContext:aws:logs:arn": stack.format_arn(
                        service="logs",
                        resource="log-group",
                        resource_name="*",
                        arn_format=ArnFormat.COLON_RESOURCE_NAME,
                    )
                }
            },
        )
    )
    return key


def log_group(
    scope: Construct, construct_id: str, *, key: kms.IKey, log_group_name: str | None = None
) -> logs.LogGroup:
    """A log group kept a month, encrypted with ``key``, deleted with the stack."""
    return logs.LogGroup(
        scope,
        construct_id,
        log_group_name=log_group_name,
        retention=RETENTION,
        encryption_key=key,
        removal_policy=RemovalPolicy.DESTROY,
    )
