"""The DynamoDB store: versioned recommendations and the active-version pointer.

One table, key ``pk`` / ``sk``:

* a recommendations item per (user, version): ``pk = "user#<user_id>"``, ``sk = "v#<version>"``,
  ``items`` (list of item ids, best first), ``scores`` (list of strings, to keep DynamoDB's
  number type out of float round-trips), ``expires_at`` (epoch seconds, the table's TTL);
* one pointer item ``pk = "pointer"``, ``sk = "active"`` whose ``version`` names the live version.

Readers follow the pointer, so they see one whole version or the previous one, never a mix.
Versions sort by their string (run ids begin with a UTC timestamp): the pointer only moves forward.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from topx.config import ENV_ENDPOINT_URL
from topx.errors import StoreError

POINTER_KEY = {"pk": "pointer", "sk": "active"}
BATCH_LIMIT = 25  # DynamoDB BatchWriteItem takes at most 25 items per request
MAX_ATTEMPTS = 8


def dynamodb_client(client: Any = None) -> Any:
    """The injected client, or a new one (created only when first needed)."""
    if client is not None:
        return client
    import boto3

    return boto3.client("dynamodb", endpoint_url=os.environ.get(ENV_ENDPOINT_URL) or None)


@dataclass(frozen=True)
class Recommendation:
    user_id: str
    items: list[str]
    scores: list[float]


def user_key(user_id: str, version: str) -> dict[str, dict[str, str]]:
    return {"pk": {"S": f"user#{user_id}"}, "sk": {"S": f"v#{version}"}}


def write_recommendations(
    table: str,
    version: str,
    rows: Iterable[Recommendation],
    *,
    expires_at: int,
    client: Any = None,
    sleep: Any = time.sleep,
) -> int:
    """Batch-write one version's recommendations, retrying unprocessed items with backoff and
    jitter. Returns the number of items written. Rewriting the same version is idempotent."""
    ddb = dynamodb_client(client)
    written = 0
    batch: list[dict[str, Any]] = []
    for rec in rows:
        item = {
            **user_key(rec.user_id, version),
            "user_id": {"S": rec.user_id},
            "version": {"S": version},
            "items": {"L": [{"S": i} for i in rec.items]},
            "scores": {"L": [{"N": repr(float(s))} for s in rec.scores]},
            "expires_at": {"N": str(int(expires_at))},
        }
        batch.append({"PutRequest": {"Item": item}})
        if len(batch) == BATCH_LIMIT:
            written += _flush(ddb, table, batch, sleep)
            batch = []
    if batch:
        written += _flush(ddb, table, batch, sleep)
    return written


def _flush(ddb: Any, table: str, requests: list[dict[str, Any]], sleep: Any) -> int:
    pending = list(requests)
    for attempt in range(MAX_ATTEMPTS):
        reply = ddb.batch_write_item(RequestItems={table: pending})
        pending = reply.get("UnprocessedItems", {}).get(table, [])
        if not pending:
            return len(requests)
        sleep(min(5.0, 0.05 * 2 ** attempt) * random.uniform(0.5, 1.0))
    raise StoreError(f"table {table}: {len(pending)} item(s) still unprocessed after {MAX_ATTEMPTS} attempts")


def active_version(table: str, *, client: Any = None) -> str | None:
    ddb = dynamodb_client(client)
    reply = ddb.get_item(TableName=table, Key={k: {"S": v} for k, v in POINTER_KEY.items()}, ConsistentRead=True)
    item = reply.get("Item")
    return None if item is None else item["version"]["S"]


def publish_version(table: str, version: str, *, users: int, client: Any = None) -> bool:
    """Point readers at ``version`` in one conditional write. Returns False (and changes nothing)
    when the live version is already the same or newer, so the pointer never goes backwards."""
    from botocore.exceptions import ClientError

    ddb = dynamodb_client(client)
    try:
        ddb.put_item(
            TableName=table,
            Item={**{k: {"S": v} for k, v in POINTER_KEY.items()}, "version": {"S": version},
                  "users": {"N": str(int(users))}, "published_at": {"N": str(int(time.time()))}},
            ConditionExpression="attribute_not_exists(pk) OR #v < :v",
            ExpressionAttributeNames={"#v": "version"},
            ExpressionAttributeValues={":v": {"S": version}},
        )
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
            return False
        raise
    return True


def get_recommendations(table: str, user_id: str, *, client: Any = None) -> Recommendation | None:
    """The live recommendations of one user, following the pointer; None when there are none."""
    ddb = dynamodb_client(client)
    version = active_version(table, client=ddb)
    if version is None:
        return None
    reply = ddb.get_item(TableName=table, Key=user_key(user_id, version))
    item = reply.get("Item")
    if item is None:
        return None
    return Recommendation(
        user_id=user_id,
        items=[v["S"] for v in item["items"]["L"]],
        scores=[float(v["N"]) for v in item["scores"]["L"]],
    )
