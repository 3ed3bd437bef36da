"""cdk-nag (AwsSolutions) wiring and the one way this app acknowledges a finding.

cdk-nag 3 runs as a CDK policy-validation plugin: findings fail `cdk synth` and are written to
cdk.out/policy-validation-report.json. A finding is acknowledged on the construct it concerns (or an
ancestor) with a reason; findings that name a detail (IAM5 wildcards) are acknowledged one detail at a
time, e.g. ``AwsSolutions-IAM5[Resource::*]``.
"""

from __future__ import annotations

from aws_cdk import Acknowledgment, Validations
from cdk_nag import AwsSolutionsChecks
from constructs import IConstruct


def acknowledge(scope: IConstruct, rule_id: str, reason: str) -> None:
    """Acknowledge one cdk-nag finding on ``scope`` and everything below it."""
    Validations.of(scope).acknowledge(Acknowledgment(id=rule_id, reason=reason))


def add_checks(app: IConstruct) -> AwsSolutionsChecks:
    """Register the AwsSolutions pack on the app so synthesis fails on any unacknowledged finding."""
    checks = AwsSolutionsChecks(app, verbose=True)
    Validations.of(app).add_plugins(checks)
    return checks
