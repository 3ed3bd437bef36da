"""Every stage of the deployed pipeline at scale, each in a process of its own: seconds and peak memory.

    .venv/bin/python -m benchmarks.scale --interactions 1000000 --users 200000 --items 20000 --epochs 1
    .venv/bin/python -m benchmarks.scale --interactions 50000000 --users 2500000 --items 100000 --epochs 1 \\
        --load-shards 2

Generated implicit data (integer user and item ids, item popularity falling as a power law, 1 + a Poisson
play count), as part files of 5M rows and a ``_SUCCESS`` marker, goes to ``incoming/export/`` of a bucket in moto's server (its Flask is pinned in requirements.txt),
which runs in this process; the stages then run in order as the state machine runs them, each in a fresh
Python process that reaches the server through ``TOPX_ENDPOINT_URL``, so that a stage's peak resident memory
is its own (interpreter and imports included) and not the bucket's: Prepare, Train (1 epoch by default, on
this machine's CPU), QualityGate, Repackage, one Search child per shard, Report, one LoadShard per shard
(into moto's DynamoDB), Publish. The stage functions are the deployed ones (``functions.handlers`` for the
Lambda functions, ``topx.aws.stages`` for the Batch jobs' work).

``--prepare-only`` runs Prepare alone (the other stages are left out and said so), to measure the ingest;
``--one-file`` uploads the same rows as one Parquet file of 5M-row row groups; ``--csv`` uploads CSV.

``--run-shards N`` runs only the first N shards' Search children and loads (every shard holds about as
many users, so one shard's figures are every shard's); Report and Publish then need every shard, so they
are left out and said so. ``--load-shards N`` searches every shard (so Report runs) and loads only the first
N: loading into moto's DynamoDB over HTTP is the slow part, and Publish, left out, is a few reads. Keys: ``stages`` maps each stage to ``s`` (wall seconds; for the per-shard stages the sum over
the shards run, and ``max_s``), ``peak_rss_mb`` (the largest of its processes), and ``processes``;
``shards``, ``users_per_shard``; the sizes of what the stages read and wrote (``bytes``). One JSON line on
stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    REPO_ROOT,
    aws_client,
    log,
    main_with_children,
    moto_server,
    peak_rss_mb,
    power_law_chunks,
)

BUCKET, TABLE, REGION = "topx-scale", "topx-scale-recommendations", "us-east-1"
USERS_PER_SHARD = 100_000  # the default shard size: what one Search child and one LoadShard take on
LATER_STAGES = ["train", "quality_gate", "repackage", "search", "report", "load_shard", "publish"]
CHUNK = 5_000_000  # interactions generated (and written as one Parquet part file) at a time
UPLOAD_PREFIX = "incoming/export/"  # where the parts go, as a Spark or Glue job writes them


# ----------------------------------------------------------------------------- one stage, in its own process


def child(spec: dict[str, Any]) -> None:
    """Run one stage as ``spec`` says ({"kind": "handler"|"stage", "name", "args"}) and print its reply, its
    wall seconds and this process's peak resident memory."""
    import importlib

    module = importlib.import_module("functions.handlers" if spec["kind"] == "handler" else "topx.aws.stages")
    function = getattr(module, spec["name"])
    # What the Lambda runtime's context gives a handler (its logger reads these).
    context = type("Context", (), {"function_name": spec["name"], "memory_limit_in_mb": 10240,
                                   "aws_request_id": "scale", "invoked_function_arn": "arn:aws:lambda:scale"})()
    start = time.perf_counter()
    reply = function(spec["args"], context) if spec["kind"] == "handler" else function(*spec["args"])
    seconds = time.perf_counter() - start
    print(json.dumps({"reply": reply, "s": round(seconds, 3), "peak_rss_mb": round(peak_rss_mb(), 1)}, default=str))


def run_stage(kind: str, name: str, args: Any, env: dict[str, str]) -> dict[str, Any]:
    spec = json.dumps({"kind": kind, "name": name, "args": args})
    done = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--child", spec], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-6000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- data


def write_interactions(folder: Path, interactions: int, users: int, items: int, seed: int,
                       one_file: bool = False, csv: bool = False) -> list[Path]:
    """Parquet part files of ``CHUNK`` rows each (``part-NNNNN.parquet`` in ``folder``), or with ``one_file``
    one file of ``CHUNK``-row row groups (the same rows); with ``csv``, CSV instead (one file: the parts one
    after the other): user_id (int64, uniform), item_id (int64, popularity ~ 1/rank), plays (int64, 1 +
    Poisson(1)). Every user and item id below the counts is likely to occur. -> the files' paths."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("plays", pa.int64())])
    paths: list[Path] = []
    writer: Any = None
    if one_file:
        writer = (pa_csv.CSVWriter(folder / "interactions.csv", schema) if csv
                  else pq.ParquetWriter(folder / "interactions.parquet", schema))
    for user, item, plays in power_law_chunks(interactions, users, items, seed, CHUNK):
        table = pa.table({"user_id": user, "item_id": item, "plays": plays}, schema=schema)
        if writer is not None and csv:
            writer.write_table(table)
        elif writer is not None:
            writer.write_table(table, row_group_size=CHUNK)
        elif csv:
            paths.append(folder / f"part-{len(paths):05d}.csv")
            pa_csv.write_csv(table, paths[-1])
        else:
            paths.append(folder / f"part-{len(paths):05d}.parquet")
            pq.write_table(table, paths[-1])
    if writer is not None:
        writer.close()
        paths.append(folder / ("interactions.csv" if csv else "interactions.parquet"))
    return paths


def prefix_bytes(s3: Any, prefix: str) -> int:
    return sum(obj["Size"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
               for obj in page.get("Contents", []))


# ----------------------------------------------------------------------------- the pipeline


def run(args: argparse.Namespace) -> dict[str, Any]:
    from topx.contract import (
        MAX_SHARDS,
        prepared_prefix,
        run_prefix,
        table_attribute_definitions,
        table_key_schema,
        vectors_prefix,
    )

    shards = args.shards or max(2, min(MAX_SHARDS, math.ceil(args.users / USERS_PER_SHARD)))
    with moto_server(REGION) as (endpoint, server_env):
        env = {**server_env, "TOPX_BUCKET": BUCKET, "TOPX_TABLE": TABLE, "TOPX_EPOCHS": str(args.epochs),
               "TOPX_NUM_FACTORS": str(args.factors), "TOPX_SHARDS": str(shards), "TOPX_TOP_X": str(args.top_x)}
        s3 = aws_client("s3", endpoint, REGION)
        s3.create_bucket(Bucket=BUCKET)
        aws_client("dynamodb", endpoint, REGION).create_table(
            TableName=TABLE, BillingMode="PAY_PER_REQUEST", KeySchema=table_key_schema(),
            AttributeDefinitions=table_attribute_definitions())
        with tempfile.TemporaryDirectory(prefix="topx-scale-") as tmp:
            log(f"generating {args.interactions:,} interactions ({args.users:,} users, {args.items:,} items)")
            files = write_interactions(Path(tmp), args.interactions, args.users, args.items, args.seed,
                                       one_file=args.one_file, csv=args.csv)
            # As a warehouse exports it: part files, then the commit marker.
            for path in files:
                s3.upload_file(str(path), BUCKET, f"{UPLOAD_PREFIX}{path.name}")
            s3.put_object(Bucket=BUCKET, Key=f"{UPLOAD_PREFIX}_SUCCESS", Body=b"")
            upload_bytes = sum(path.stat().st_size for path in files)
        stages: dict[str, dict[str, Any]] = {}

        def timed(stage: str, kind: str, name: str, call_args: Any) -> Any:
            log(f"{stage} ...")
            got = run_stage(kind, name, call_args, env)
            entry = stages.setdefault(stage, {"s": 0.0, "max_s": 0.0, "peak_rss_mb": 0.0, "processes": 0})
            entry["s"] = round(entry["s"] + got["s"], 3)
            entry["max_s"] = max(entry["max_s"], got["s"])
            entry["peak_rss_mb"] = max(entry["peak_rss_mb"], got["peak_rss_mb"])
            entry["processes"] += 1
            log(f"{stage}: {got['s']:.1f} s, peak {got['peak_rss_mb']:.0f} MB")
            return got["reply"]

        prepared = timed("prepare", "handler", "prepare", {"bucket": BUCKET, "key": None, "uploads": None})
        run_id = prepared["run_id"]
        if args.prepare_only:
            return {"benchmark": "scale", "interactions": args.interactions, "users": prepared["n_users"],
                    "items": prepared["n_items"], "one_file": args.one_file, "csv": args.csv,
                    "shards": prepared["shards"],
                    "left_out": LATER_STAGES,
                    "bytes": {"upload": upload_bytes, "prepared": prefix_bytes(s3, prepared_prefix(run_id))},
                    "stages": stages}
        run = {"bucket": BUCKET, "run_id": run_id}
        timed("train", "stage", "train_run", [BUCKET, run_id])
        gate = timed("quality_gate", "handler", "quality_gate", {**run, "table": TABLE})
        timed("repackage", "handler", "repackage", run)
        ran = prepared["shard_ids"][: args.run_shards] if args.run_shards else prepared["shard_ids"]
        for shard in ran:
            timed("search", "stage", "search_shard", [BUCKET, run_id, shard, prepared["shards"]])
        if len(ran) == prepared["shards"]:
            timed("report", "handler", "report", {**run, "gate": gate})
        loaded = ran[: args.load_shards] if args.load_shards else ran
        for shard in loaded:
            timed("load_shard", "handler", "load_shard", {**run, "table": TABLE, "shard": shard})
        if len(loaded) == prepared["shards"]:
            timed("publish", "handler", "publish", {**run, "table": TABLE, "expected_shards": prepared["shards"]})
        sizes = {"upload": upload_bytes, "prepared": prefix_bytes(s3, prepared_prefix(run_id)),
                 "vectors": prefix_bytes(s3, vectors_prefix(run_id)), "run": prefix_bytes(s3, run_prefix(run_id))}
    return {"benchmark": "scale", "interactions": args.interactions, "users": prepared["n_users"],
            "items": prepared["n_items"], "epochs": args.epochs, "factors": args.factors, "shards": prepared["shards"],
            "users_per_shard": math.ceil(prepared["n_users"] / prepared["shards"]), "shards_run": len(ran),
            "shards_loaded": len(loaded),
            "left_out": ([] if len(ran) == prepared["shards"] else ["report"])
            + ([] if len(loaded) == prepared["shards"] else ["publish"]),
            "gate_passed": gate.get("passed"), "bytes": sizes, "stages": stages}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--interactions", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--factors", type=int, default=32)
    parser.add_argument("--top-x", type=int, default=10)
    parser.add_argument("--shards", type=int, help=f"search and load shards (default: {USERS_PER_SHARD:,} users each)")
    parser.add_argument("--run-shards", type=int, help="run only the first N shards' search and load (see above)")
    parser.add_argument("--load-shards", type=int, help="of the shards searched, load only the first N (see above)")
    parser.add_argument("--prepare-only", action="store_true", help="run Prepare alone (see above)")
    parser.add_argument("--one-file", action="store_true",
                        help="upload one Parquet file of 5M-row row groups instead of 5M-row part files")
    parser.add_argument("--csv", action="store_true", help="upload CSV instead of Parquet")
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return main_with_children(parse_args(argv), run, child)


if __name__ == "__main__":
    raise SystemExit(main())
