"""Batch array job: exact inner-product top-x for one user shard (CPU queue).

    python -m batch_jobs.search.main --bucket BUCKET --run-id RUN_ID --shards N [--shard I]

The job definition passes ``--bucket Ref::bucket --run-id Ref::run_id --shards Ref::shards``. The shard
is ``--shard`` if given, else AWS_BATCH_JOB_ARRAY_INDEX, which AWS Batch sets on each array child.
Exit status 0 on success, 2 on a TopxError. Its duration and users, or its failure, go to CloudWatch as
metrics (batch_jobs/metrics.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from batch_jobs.args import bucket_name, filled, run_id
from batch_jobs.metrics import job_metrics
from topx.aws import stages
from topx.config import env_or
from topx.contract import ENV_ARRAY_INDEX, ENV_SHARDS, METRIC_SEARCHED_USERS, TOPX_ERROR_EXIT
from topx.errors import ConfigError, TopxError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batch_jobs.search.main", description=__doc__.splitlines()[0])
    parser.add_argument("--bucket", help="data bucket (default: $TOPX_BUCKET)")
    parser.add_argument("--run-id", required=True, help="run whose vectors are searched")
    parser.add_argument("--shards", help="number of user shards (default: $TOPX_SHARDS)")
    parser.add_argument("--shard", type=int, help=f"shard to search (default: ${ENV_ARRAY_INDEX})")
    return parser


def _integer(raw: str | None, source: str) -> int:
    if raw is None or not raw.strip().isdigit():
        raise ConfigError(f"{source} must be a non-negative integer, got {raw!r}")
    return int(raw)


def shard_plan(shards_arg: str | None, shard_arg: int | None) -> tuple[int, int]:
    """(shard, shards) from the arguments, falling back to the environment."""
    shards = _integer(env_or(ENV_SHARDS, filled(shards_arg, "--shards"), None), "--shards")
    if shard_arg is not None:
        shard = shard_arg
    else:
        shard = _integer(os.environ.get(ENV_ARRAY_INDEX), f"--shard or {ENV_ARRAY_INDEX}")
    if shards < 1 or not 0 <= shard < shards:
        raise ConfigError(f"shard {shard} is outside 0..{shards - 1}")
    return shard, shards


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with job_metrics("search") as metrics:
        try:
            shard, shards = shard_plan(args.shards, args.shard)
            result = stages.search_shard(bucket_name(args.bucket), run_id(args.run_id), shard, shards)
        except TopxError as exc:
            print(f"search: {exc}", file=sys.stderr)
            metrics.failed = True
            return TOPX_ERROR_EXIT
        metrics.add_count(METRIC_SEARCHED_USERS, result["users"])
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
