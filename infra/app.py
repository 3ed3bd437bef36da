"""CDK app entry point: ``python -m infra.app`` (what cdk.json runs) synthesizes into cdk.out.

Synthesis needs neither Docker nor AWS credentials: the stack is environment-agnostic and container
images are only staged here, built by `cdk deploy`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from aws_cdk import App

from infra.nag import add_checks
from infra.settings import DeploySettings
from infra.stack import TopxStack
from topx.contract import STACK_NAME

# CDK feature flags this app is written for. They live here rather than in cdk.json so that
# `python -m infra.app`, the tests and `cdk deploy` all synthesize the same template; context given on
# the command line still wins.
FEATURE_FLAGS: dict[str, Any] = {
    # Access-log and flow-log delivery permissions as bucket-policy statements, not legacy ACLs; and the
    # template, not the log service, owns that policy (so a stack update cannot drop it).
    "@aws-cdk/aws-s3:serverAccessLogsUseBucketPolicy": True,
    "@aws-cdk/aws-s3:createDefaultLoggingPolicy": True,
    "@aws-cdk/aws-iam:minimizePolicies": True,
    "@aws-cdk/core:enablePartitionLiterals": True,
}


def build_app(context: Mapping[str, Any] | None = None, outdir: str | None = None) -> tuple[App, TopxStack]:
    """The app with its one stack and the AwsSolutions checks; ``context`` overrides CDK context values."""
    app = App(context={**FEATURE_FLAGS, **(context or {})}, outdir=outdir)
    settings = DeploySettings.from_context(app.node.try_get_context)
    stack = TopxStack(
        app,
        STACK_NAME,
        settings=settings,
        description="topx: batch top-x recommendations (FM on Batch GPU, FAISS search, DynamoDB)",
    )
    add_checks(app)
    return app, stack


def main() -> None:
    # The CDK CLI sets CDK_OUTDIR; run directly, synthesize into ./cdk.out like the CLI would.
    app, _ = build_app(outdir=os.environ.get("CDK_OUTDIR", "cdk.out"))
    app.synth()


if __name__ == "__main__":
    main()
