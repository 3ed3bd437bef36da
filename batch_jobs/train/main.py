"""Batch job: train the factorization machine of one run (GPU queue).

    python -m batch_jobs.train.main --bucket BUCKET --run-id RUN_ID

The job definition passes ``--bucket Ref::bucket --run-id Ref::run_id``; the state machine submits the
job with those parameters. Exit status 0 on success, 2 on a TopxError (the job's retry strategy does not
retry that status). Its duration and epochs, or its failure, go to CloudWatch as metrics
(batch_jobs/metrics.py).
"""

from __future__ import annotations

import argparse
import json
import sys

from batch_jobs.args import bucket_name, run_id
from batch_jobs.metrics import job_metrics
from topx.aws import stages
from topx.contract import METRIC_TRAIN_EPOCHS, TOPX_ERROR_EXIT
from topx.errors import TopxError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batch_jobs.train.main", description=__doc__.splitlines()[0])
    parser.add_argument("--bucket", help="data bucket (default: $TOPX_BUCKET)")
    parser.add_argument("--run-id", required=True, help="run prepared under runs/<run_id>/")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with job_metrics("train") as metrics:
        try:
            result = stages.train_run(bucket_name(args.bucket), run_id(args.run_id))
        except TopxError as exc:
            print(f"train: {exc}", file=sys.stderr)
            metrics.failed = True
            return TOPX_ERROR_EXIT
        metrics.add_count(METRIC_TRAIN_EPOCHS, result["epochs_run"])
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
