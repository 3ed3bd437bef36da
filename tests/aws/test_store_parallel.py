"""The parallel DynamoDB loader: every item written once, retries still exact, failures stop the load."""

from __future__ import annotations

import threading
import time

import boto3
import pytest
from moto import mock_aws

from topx.aws import store
from topx.errors import ConfigError, StoreError


def recs(n: int) -> list[store.Recommendation]:
    return [store.Recommendation(f"u{i:05d}", [f"i{i % 7}", f"i{i % 11}"], [1.5, 0.25]) for i in range(n)]


class Recording:
    """A fake client: records the items it receives and how many requests ran at once."""

    def __init__(self, unprocessed_every: int = 0, delay: float = 0.002) -> None:
        self.lock = threading.Lock()
        self.keys: list[str] = []
        self.calls = 0
        self.active = 0
        self.max_active = 0
        self.unprocessed_every = unprocessed_every
        self.delay = delay

    def batch_write_item(self, RequestItems):
        (table, requests), = RequestItems.items()
        with self.lock:
            self.calls += 1
            call = self.calls
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        time.sleep(self.delay)
        # Every n-th full request leaves its last two items unprocessed, as throttling does.
        throttled = self.unprocessed_every and call % self.unprocessed_every == 0 and len(requests) == 25
        left = requests[-2:] if throttled else []
        with self.lock:
            self.keys.extend(r["PutRequest"]["Item"]["pk"]["S"] for r in requests[:len(requests) - len(left)])
            self.active -= 1
        return {"UnprocessedItems": {table: left}} if left else {}


def test_parallel_load_writes_every_item_exactly_once_with_retries():
    client = Recording(unprocessed_every=3)
    rows = recs(2000)
    written = store.write_recommendations("t", "v1", rows, expires_at=1, client=client, sleep=lambda s: None,
                                          writers=6)
    assert written == 2000
    assert sorted(client.keys) == sorted(f"user#{r.user_id}" for r in rows)
    assert 1 < client.max_active <= 6
    # 80 batches, a third of the requests retried once: about 1.5 requests per 25 items.
    assert client.calls < 2000 / 25 * 1.6


def test_small_loads_stay_in_order_on_the_calling_thread():
    client = Recording(delay=0)
    store.write_recommendations("t", "v1", recs(60), expires_at=1, client=client, writers=8)
    assert client.max_active == 1
    assert client.keys == [f"user#u{i:05d}" for i in range(60)]


def test_a_batch_that_never_goes_through_stops_the_load():
    class Stuck(Recording):
        def batch_write_item(self, RequestItems):
            super().batch_write_item(RequestItems)
            (table, requests), = RequestItems.items()
            return {"UnprocessedItems": {table: requests[:1]}}  # one item is never accepted

    client = Stuck(delay=0)
    with pytest.raises(StoreError, match="unprocessed"):
        store.write_recommendations("t", "v1", recs(100_000), expires_at=1, client=client, sleep=lambda s: None,
                                    writers=4)
    # The load stopped long before its 4,000 batches: at most the in-flight and queued ones ran.
    assert client.calls <= 4 * 3 * store.MAX_ATTEMPTS + 4 * store.SEQUENTIAL_BATCHES_PER_WRITER


def test_writers_must_be_positive():
    with pytest.raises(ConfigError, match="writers"):
        store.write_recommendations("t", "v1", recs(1), expires_at=1, client=Recording(), writers=0)


def test_parallel_load_into_moto_reads_back(monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        ddb = boto3.client("dynamodb")
        ddb.create_table(
            TableName="t", BillingMode="PAY_PER_REQUEST",
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"},
                                  {"AttributeName": "sk", "AttributeType": "S"}],
        )
        rows = recs(600)
        assert store.write_recommendations("t", "v9", rows, expires_at=5, client=ddb, writers=4) == 600
        assert store.publish_version("t", "v9", users=600, client=ddb)
        back = store.get_recommendations("t", "u00123", client=ddb)
        assert back == rows[123]
        assert ddb.scan(TableName="t", Select="COUNT")["Count"] == 601  # and the pointer


def test_records_from_columns_match_a_group_by_in_any_row_order():
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"user_id": np.repeat(["b", "a", "c"], [3, 2, 1]), "rank": [1, 2, 3, 1, 2, 1],
                          "item_id": ["x", "y", "z", "p", "q", "r"], "score": [3.0, 2.5, 2.0, 9.0, 8.0, 1.0]})
    frame = frame.iloc[rng.permutation(len(frame))]
    got = {r.user_id: r for r in store.recommendations_from_columns(
        frame["user_id"].to_numpy(), frame["rank"].to_numpy(), frame["item_id"].to_numpy(), frame["score"].to_numpy())}
    want = {str(u): store.Recommendation(str(u), list(g["item_id"]), [float(s) for s in g["score"]])
            for u, g in frame.sort_values(["user_id", "rank"]).groupby("user_id", sort=False)}
    assert got == want
    assert list(store.recommendations_from_columns(*(np.zeros(0),) * 4)) == []
