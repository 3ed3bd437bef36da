"""The one way this app suppresses a checkov finding: CloudFormation metadata on the resource it concerns.

checkov reads ``Metadata: {"checkov": {"skip": [{"id": ..., "comment": ...}]}}`` on a resource and reports
the check as skipped with that comment instead of failed. Every suppression is made here, on one
resource at a time, with a reason; tests/infra/test_security.py runs checkov on the synthesized template and
fails on any failed check, on any skip without a reason, and on any skipped check that
docs/RELIABILITY.md does not list.
"""

from __future__ import annotations

from collections.abc import Mapping

from aws_cdk import CfnResource
from constructs import IConstruct

METADATA_KEY = "checkov"

# Reasons shared by several resources, so each is written once.
LAMBDA_DLQ = (
    "Invoked synchronously by the state machine (lambda:invoke task), never asynchronously; a DLQ only "
    "receives failed asynchronous invocations. Failures are retried and caught in the ASL and notified."
)
LAMBDA_VPC = (
    "The functions accept no inbound connections and call only AWS APIs over TLS, so a VPC would add no "
    "control that their IAM roles do not already give. The VPC is NAT-free (docs/DEPLOY.md): inside it every "
    "AWS API other than S3 and DynamoDB would need a paid interface endpoint."
)
LAMBDA_CONCURRENCY = (
    "Concurrency is bounded by the caller: one execution runs each function once, and the Load map runs at "
    "most 8 load_shard at a time (MaxConcurrency). Reserving concurrency would fail to deploy in new accounts, "
    "whose quota of 10 must stay unreserved."
)
LAMBDA_ENV_ENCRYPTION = (
    "The environment holds resource names and deploy-time numbers only (tests/infra/test_security.py fails on "
    "anything that looks like a secret); Lambda encrypts it at rest with an AWS-managed key already."
)


def skip_checks(resource: IConstruct, reasons: Mapping[str, str]) -> None:
    """Suppress checkov checks ``{check_id: reason}`` on one CloudFormation resource.

    ``resource`` is an L1 resource or an L2 construct whose default child is one. Skips accumulate: a
    second call adds to (or replaces the reason of) the checks the first one named.
    """
    cfn = resource if isinstance(resource, CfnResource) else resource.node.default_child
    if not isinstance(cfn, CfnResource):
        raise TypeError(
            f"{resource.node.path} is not, and has no default child that is, a CloudFormation resource"
        )
    for check_id, reason in reasons.items():
        if not reason.strip():
            raise ValueError(f"{resource.node.path}: checkov {check_id} needs a reason to be skipped")
    existing = cfn.get_metadata(METADATA_KEY) or {}
    skips = {entry["id"]: entry["comment"] for entry in existing.get("skip", [])}
    skips.update(reasons)
    cfn.add_metadata(
        METADATA_KEY,
        {"skip": [{"id": check_id, "comment": reason} for check_id, reason in sorted(skips.items())]},
    )
