"""A Batch job's CloudWatch metrics, in the embedded metric format (EMF).

Powertools' Metrics, which the Lambda functions use too, prints them as one JSON line on stdout when the job
ends; the job's awslogs driver sends its output to CloudWatch Logs, which turns an EMF line into metrics. So
the job needs no agent and no cloudwatch:PutMetricData. Namespace and dimensions are the functions' own
(topx/contract.py): ``service`` (the stack's name) and ``stage`` (``train`` or ``search``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from aws_lambda_powertools import Metrics
from aws_lambda_powertools.metrics import MetricUnit

from topx.config import env_or
from topx.contract import (
    DEFAULT_SERVICE_NAME,
    ENV_SERVICE_NAME,
    METRIC_STAGE_FAILURES,
    METRIC_STAGE_SECONDS,
    METRICS_NAMESPACE,
    STAGE_DIMENSION,
)


class JobMetrics:
    """What one job run reports: counts it adds, and whether it failed."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.failed = False
        self._counts: dict[str, int] = {}

    def add_count(self, name: str, value: int) -> None:
        self._counts[name] = int(value)

    def flush(self, seconds: float) -> None:
        """Print the EMF line: the job's duration and counts when it succeeded, one failure otherwise."""
        metrics = Metrics(namespace=METRICS_NAMESPACE, service=env_or(ENV_SERVICE_NAME, None, DEFAULT_SERVICE_NAME))
        metrics.add_dimension(name=STAGE_DIMENSION, value=self.stage)
        if self.failed:
            metrics.add_metric(name=METRIC_STAGE_FAILURES, unit=MetricUnit.Count, value=1)
        else:
            metrics.add_metric(name=METRIC_STAGE_SECONDS, unit=MetricUnit.Seconds, value=seconds)
            for name, value in self._counts.items():
                metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)
        metrics.flush_metrics(raise_on_empty_metrics=True)


@contextmanager
def job_metrics(stage: str) -> Iterator[JobMetrics]:
    """Time the block and print its metrics when it ends; an exception out of it counts as a failure (so
    does ``JobMetrics.failed = True``, for a job that reports its error and returns an exit status)."""
    job = JobMetrics(stage)
    started = time.monotonic()
    try:
        yield job
    except BaseException:  # counted, then raised as it was: the job still crashes as it would have
        job.failed = True
        raise
    finally:
        job.flush(time.monotonic() - started)
