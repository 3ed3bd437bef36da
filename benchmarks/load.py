"""Loading recommendations into DynamoDB: items/s against moto, requests per item, and the arithmetic
for 10M users against DynamoDB's documented limits.

    .venv/bin/python -m benchmarks.load                      # 20,000 users x 20 items
    .venv/bin/python -m benchmarks.load --users 50000 --latency-ms 15

Measured, in one run, with ``topx.aws.store.write_recommendations``:

* ``moto``: items/s into an in-process moto table, 1 writer and ``--writers`` writers. moto is
  Python and runs in this process, so this is the loader's own overhead plus moto's, not AWS;
* ``latency``: the same into a stand-in service that only holds each request ``--latency-ms`` (a
  BatchWriteItem inside a region takes ~10-30 ms) and accepts it: what the writers buy against a
  service whose time per request is latency, as DynamoDB's is, with the loader's own CPU (building
  the items) still in the way; moto's CPU would otherwise cap both cases at the same rate;
* ``requests_per_item``: BatchWriteItem calls / items (1/25 = 0.04 when nothing is throttled);
* ``rows_from_parquet_s_per_million``: turning a shard's Parquet rows into per-user records with a
  pandas group-by (what ``topx.aws.stages.load_shard`` first did), per million users, and
  ``rows_from_columns_s_per_million`` with ``topx.aws.store.recommendations_from_columns`` (what it does
  now).

``estimate_10m``: hours of writing for 10M users, from the documented limits: 1 write request unit
per item up to 1 KB, new on-demand tables sustain 4,000 writes/s and accommodate up to double the
previous peak (throttling can occur if traffic exceeds double the previous peak within 30 minutes),
and the default table quota of 40,000 write units/s; 1,000 WCU/s per partition, which user-keyed
items spread across. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import log, print_json_line  # noqa: E402
from topx.aws import store  # noqa: E402

TABLE = "topx-bench"
NEW_TABLE_WRITES_PER_S = 4_000
TABLE_QUOTA_WRITES_PER_S = 40_000
PARTITION_WRITES_PER_S = 1_000
DOUBLING_WINDOW_S = 30 * 60


class LatencyOnly:
    """A stand-in table: each BatchWriteItem takes ``latency_s`` and succeeds."""

    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s
        self.items = 0
        self.lock = threading.Lock()

    def batch_write_item(self, RequestItems: dict) -> dict:
        time.sleep(self.latency_s)
        with self.lock:
            self.items += sum(len(v) for v in RequestItems.values())
        return {}


class Counting:
    """Pass-through client counting BatchWriteItem requests."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.requests = 0
        self.lock = threading.Lock()

    def batch_write_item(self, **kwargs: Any) -> dict:
        with self.lock:
            self.requests += 1
        return self.client.batch_write_item(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def recommendations(n_users: int, x: int, seed: int = 0) -> list[store.Recommendation]:
    rng = np.random.default_rng(seed)
    items = rng.integers(0, 100_000, (n_users, x))
    scores = np.sort(rng.normal(3.5, 0.5, (n_users, x)), axis=1)[:, ::-1]
    return [store.Recommendation(f"u{u:08d}", [f"i{i:06d}" for i in items[u]], scores[u].tolist())
            for u in range(n_users)]


def item_bytes(rec: store.Recommendation, version: str) -> int:
    """DynamoDB's item size: attribute names plus values (numbers ~ their digits), lists 3 B/element."""
    names = sum(len(n) for n in ("pk", "sk", "user_id", "version", "items", "scores", "expires_at"))
    values = (len(f"user#{rec.user_id}") + len(f"v#{version}") + len(rec.user_id) + len(version)
              + sum(len(i) + 3 for i in rec.items) + sum(len(repr(float(s))) + 3 for s in rec.scores) + 10)
    return names + values


def fresh_table(ddb: Any) -> None:
    if TABLE in ddb.list_tables()["TableNames"]:
        ddb.delete_table(TableName=TABLE)
    ddb.create_table(
        TableName=TABLE, BillingMode="PAY_PER_REQUEST",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}, {"AttributeName": "sk", "AttributeType": "S"}],
    )


def timed_load(ddb: Any, rows: list[store.Recommendation], writers: int, latency_s: float) -> dict:
    """Load ``rows`` into moto (latency_s = 0) or the latency-only stand-in; check what arrived."""
    if latency_s:
        target = LatencyOnly(latency_s)
        client = Counting(target)
    else:
        fresh_table(ddb)
        client = Counting(ddb)
    start = time.perf_counter()
    written = store.write_recommendations(TABLE, "20260101T000000Z-bench", rows, expires_at=2_000_000_000,
                                          client=client, writers=writers)
    elapsed = time.perf_counter() - start
    assert written == len(rows), (written, len(rows))
    if latency_s:
        arrived = target.items
    else:
        pages = ddb.get_paginator("scan").paginate(TableName=TABLE, Select="COUNT")
        arrived = sum(page["Count"] for page in pages)
    assert arrived == len(rows), (arrived, len(rows))
    return {"items_per_s": written / elapsed, "s": elapsed, "requests_per_item": client.requests / written}


def rows_from_parquet(n_users: int, x: int) -> tuple[float, float]:
    """Seconds per million users to turn a shard's Parquet into records: with a pandas group-by, and
    with store.recommendations_from_columns."""
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({
        "user_id": np.repeat([f"u{u:08d}" for u in range(n_users)], x),
        "rank": np.tile(np.arange(1, x + 1, dtype=np.int32), n_users),
        "item_id": [f"i{i:06d}" for i in rng.integers(0, 100_000, n_users * x)],
        "score": rng.normal(3.5, 0.5, n_users * x).astype(np.float32),
    })
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "part-0.parquet"
        frame.to_parquet(path)
        start = time.perf_counter()
        read = pd.read_parquet(path)
        rows = [store.Recommendation(str(user), list(group["item_id"]), [float(s) for s in group["score"]])
                for user, group in read.sort_values(["user_id", "rank"]).groupby("user_id", sort=False)]
        group_by = time.perf_counter() - start
        start = time.perf_counter()
        read = pd.read_parquet(path)
        fast = list(store.recommendations_from_columns(read["user_id"].to_numpy(), read["rank"].to_numpy(),
                                                       read["item_id"].to_numpy(), read["score"].to_numpy()))
        columns = time.perf_counter() - start
    assert len(rows) == len(fast) == n_users and fast[0] == rows[0]
    return group_by / n_users * 1e6, columns / n_users * 1e6


def estimate_10m(users: int, item_kb: float, writers_per_shard: int, shards: int, writer_items_per_s: float) -> dict:
    """Time to write ``users`` items, by the documented on-demand behaviour (see the module docstring)."""
    units = users * max(1, int(np.ceil(item_kb)))
    loader_rate = shards * writers_per_shard * writer_items_per_s
    # A table already scaled by earlier loads: the quota or the loader, whichever is lower.
    warm_rate = min(TABLE_QUOTA_WRITES_PER_S, loader_rate)
    # A brand-new table: 4,000/s, doubling at most every 30 minutes, up to the same cap.
    t, left, rate = 0.0, float(units), float(NEW_TABLE_WRITES_PER_S)
    while left > 0:
        rate = min(rate, warm_rate)
        step = min(DOUBLING_WINDOW_S, left / rate)
        t, left = t + step, left - rate * step
        rate *= 2
    return {"users": users, "write_units": units, "loader_items_per_s": loader_rate,
            "warm_table_s": units / warm_rate, "new_table_s": t,
            "partitions_needed_at_quota": TABLE_QUOTA_WRITES_PER_S // PARTITION_WRITES_PER_S}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--x", type=int, default=20)
    parser.add_argument("--writers", type=int, default=store.DEFAULT_WRITERS)
    parser.add_argument("--latency-ms", type=float, default=15.0)
    parser.add_argument("--shards", type=int, default=8, help="shards loading at once (the Map's MaxConcurrency)")
    args = parser.parse_args(argv)

    for name, value in (("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_ACCESS_KEY_ID", "bench"),
                        ("AWS_SECRET_ACCESS_KEY", "bench")):
        os.environ.setdefault(name, value)
    import boto3
    from moto import mock_aws

    rows = recommendations(args.users, args.x)
    size_kb = max(item_bytes(r, "20260101T000000Z-bench") for r in rows[:1000]) / 1024
    doc: dict = {"benchmark": "load", "users": args.users, "x": args.x, "item_kb_max": size_kb,
                 "writers": args.writers, "latency_ms": args.latency_ms}
    with mock_aws():
        ddb = boto3.client("dynamodb")
        for label, latency in (("moto", 0.0), ("latency", args.latency_ms / 1000)):
            n = len(rows)
            for writers in (1, args.writers):
                result = timed_load(ddb, rows[:n], writers, latency)
                log(f"{label}, {writers} writer(s): {result}")
                doc[f"{label}_{writers}_writers"] = result
            doc[f"{label}_speedup"] = (doc[f"{label}_{args.writers}_writers"]["items_per_s"]
                                       / doc[f"{label}_1_writers"]["items_per_s"])
    doc["items_per_s"] = doc[f"moto_{args.writers}_writers"]["items_per_s"]
    doc["requests_per_item"] = doc[f"moto_{args.writers}_writers"]["requests_per_item"]
    group_by, columns = rows_from_parquet(min(args.users, 200_000), args.x)
    doc["rows_from_parquet_s_per_million"], doc["rows_from_columns_s_per_million"] = group_by, columns
    writer_rate = 25 / (args.latency_ms / 1000)
    doc["estimate_10m"] = estimate_10m(10_000_000, size_kb, args.writers, args.shards, writer_rate)
    log(json.dumps(doc["estimate_10m"]))
    print_json_line(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
