"""The health of the stack's AWS Batch compute environments, checked on a schedule.

AWS Batch sends EventBridge an event for each job state change and for a blocked job queue, but none when a
compute environment becomes INVALID (a deleted service role, a launch template or subnet it can no longer
use): the first sign would be the next run's jobs waiting in a blocked queue. The compute health function
asks Batch for each environment's state every few minutes and counts those that cannot run jobs, a
CloudWatch metric that an alarm watches (infra/notifications.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from topx.errors import ConfigError

# DescribeComputeEnvironments takes at most this many environments per call.
DESCRIBE_LIMIT = 100


@dataclass(frozen=True)
class ComputeHealth:
    """Each environment asked about, by what it is: ``invalid`` (status INVALID: name and Batch's reason),
    ``missing`` (Batch knows no such environment), ``disabled`` (state DISABLED: an operator's choice, so
    reported but not counted), ``healthy``."""

    invalid: list[dict[str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    disabled: list[str] = field(default_factory=list)
    healthy: list[str] = field(default_factory=list)

    @property
    def unhealthy(self) -> int:
        """Environments that cannot run the pipeline's jobs: INVALID or gone."""
        return len(self.invalid) + len(self.missing)

    def as_dict(self) -> dict[str, Any]:
        return {"unhealthy": self.unhealthy, "invalid": self.invalid, "missing": self.missing,
                "disabled": self.disabled, "healthy": self.healthy}


def compute_environments(value: str | None) -> list[str]:
    """The environments to check, from ``TOPX_COMPUTE_ENVIRONMENTS`` (ARNs or names, comma-separated)."""
    names = [part.strip() for part in (value or "").split(",") if part.strip()]
    if not names:
        raise ConfigError("TOPX_COMPUTE_ENVIRONMENTS names no compute environment to check")
    if len(names) > DESCRIBE_LIMIT:
        raise ConfigError(f"TOPX_COMPUTE_ENVIRONMENTS names {len(names)} environments; at most {DESCRIBE_LIMIT}")
    return names


def check_compute_environments(names: Sequence[str], client: Any) -> ComputeHealth:
    """Ask Batch (``client``: boto3's batch client) for each environment of ``names`` (ARNs or names)."""
    found = client.describe_compute_environments(computeEnvironments=list(names))["computeEnvironments"]
    by_key = {}
    for environment in found:
        by_key[environment["computeEnvironmentArn"]] = environment
        by_key[environment["computeEnvironmentName"]] = environment
    health = ComputeHealth()
    for name in names:
        environment = by_key.get(name)
        if environment is None:
            health.missing.append(name)
        elif environment.get("status") == "INVALID":
            health.invalid.append({"name": environment["computeEnvironmentName"],
                                   "reason": environment.get("statusReason") or "no reason given"})
        elif environment.get("state") == "DISABLED":
            health.disabled.append(environment["computeEnvironmentName"])
        else:
            health.healthy.append(environment["computeEnvironmentName"])
    return health
