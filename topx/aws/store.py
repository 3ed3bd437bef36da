"""The DynamoDB store: versioned recommendations and the active-version pointer.

One table; its keys, TTL attribute and pointer item are the deploy contract's (topx/contract.py):

* a recommendations item per (user, version): ``pk = "user#<user_id>"``, ``sk = "v#<version>"``,
  ``items`` (list of item ids, best first), ``scores`` (list of strings, to keep DynamoDB's
  number type out of float round-trips), and ``expires_at`` (epoch seconds, the table's TTL) once the
  version is retired: a version is loaded without one, so the live version never expires, and is
  written again with one after a newer version went live (``topx.aws.stages.retire_versions``);
* a fallback item per version, ``pk = "fallback"``, ``sk = "v#<version>"``: the list for a user the
  version has no item for (``topx.steps.fallback_list``), which the reader returns marked as such;
* a named list of the filter file (``"lists"``) is a version of its own for these keys: each user's item of
  the list ``summer-books`` has ``sk = "v#<version>#list=summer-books"`` (``topx.contract.list_version``), and
  so has the list's fallback item (the version's fallback list cut to the list's eligible items);
* one pointer item ``pk = "pointer"``, ``sk = "active"`` whose ``version`` names the live version, with
  ``users`` and ``published_at``; ``newest``, the newest version it ever named; and ``rolled_back_from``,
  the version ``topx rollback`` moved it back from, while it stays there.

Readers follow the pointer, so they see one whole version or the previous one, never a mix.
Versions sort by their string (run ids begin with a UTC timestamp). Publishing moves the pointer only to a
version newer than ``newest``; rolling back moves it to an earlier version and leaves ``newest`` as it was,
so the rolled-back version and the runs older than it do not publish again, and the next newer run does.
Every pointer write is conditional on what the writer read, so a publish and a rollback at the same moment
never interleave: one of them finds the pointer moved and changes nothing.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from topx.contract import (
    ENV_ENDPOINT_URL,
    PARTITION_KEY,
    POINTER_KEY,
    TTL_ATTRIBUTE,
    fallback_item_key,
    list_version,
    user_item_key,
)
from topx.errors import ConfigError, StoreError

BATCH_LIMIT = 25  # DynamoDB BatchWriteItem takes at most 25 items per request
MAX_ATTEMPTS = 8
# Concurrent BatchWriteItem requests per load. One request of 25 items takes ~10-30 ms inside a
# region, so a writer moves ~1,000-2,500 items/s; eight give one shard ~10-20k items/s, and the
# Map state's 8 concurrent shards reach the default table quota of 40,000 write units/s (an item
# under 1 KB is one unit) with room to spare. Beyond that, DynamoDB throttles and the unprocessed
# items come back to the backoff below, so more writers cannot overload the table, only wait.
# See docs/PERFORMANCE.md ("Loading") for the arithmetic.
DEFAULT_WRITERS = 8
SEQUENTIAL_BATCHES_PER_WRITER = 4  # smaller loads are written in order on the calling thread


def dynamodb_client(client: Any = None) -> Any:
    """The injected client, or a new one (created only when first needed)."""
    if client is not None:
        return client
    import boto3

    return boto3.client("dynamodb", endpoint_url=os.environ.get(ENV_ENDPOINT_URL) or None)


@dataclass(frozen=True)
class Recommendation:
    """One user's list, best first. ``fallback``: the user has no list of their own in the version (the
    model has not seen them), and this is the version's list for such users."""

    user_id: str
    items: list[str]
    scores: list[float]
    fallback: bool = False
    # The user had no interactions: the list comes from their features alone (a cold user).
    cold_user: bool = False


def recommendations_from_columns(
    user_id: np.ndarray, rank: np.ndarray, item_id: np.ndarray, score: np.ndarray, cold_user: np.ndarray | None = None
) -> Iterator[Recommendation]:
    """Per-user records from a shard's rows (the columns of its Parquet file, any order), items by rank;
    ``cold_user`` (per row, the same on every row of a user) marks users recommended from features.

    Vectorised grouping (factorize + one lexsort): about 14 s per million users of 20 rows, where a
    pandas group-by over the same frame takes about 50 s.
    """
    import pandas as pd

    if len(user_id) == 0:
        return
    codes, users = pd.factorize(np.asarray(user_id))
    order = np.lexsort((np.asarray(rank), codes))
    codes = codes[order]
    items = np.asarray(item_id)[order].tolist()
    scores = np.asarray(score, dtype=np.float64)[order].tolist()
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    ends = np.r_[starts[1:], len(codes)]
    cold = (np.zeros(len(codes), bool) if cold_user is None else np.asarray(cold_user, bool)[order])[starts].tolist()
    for user, start, end, is_cold in zip(np.asarray(users)[codes[starts]].tolist(), starts.tolist(), ends.tolist(),
                                         cold, strict=True):
        yield Recommendation(str(user), items[start:end], scores[start:end], cold_user=is_cold)


def user_key(user_id: str, version: str) -> dict[str, dict[str, str]]:
    """The DynamoDB-typed key of one user's recommendations under one version."""
    return _typed(user_item_key(user_id, version))


def pointer_key() -> dict[str, dict[str, str]]:
    """The DynamoDB-typed key of the active-version pointer item."""
    return _typed(POINTER_KEY)


def _typed(key: Mapping[str, str]) -> dict[str, dict[str, str]]:
    return {name: {"S": value} for name, value in key.items()}


def write_recommendations(
    table: str,
    version: str,
    rows: Iterable[Recommendation],
    *,
    expires_at: int | None,
    client: Any = None,
    sleep: Any = time.sleep,
    writers: int = DEFAULT_WRITERS,
) -> int:
    """Batch-write one version's recommendations, retrying unprocessed items with backoff and
    jitter. Returns the number of items written. Rewriting the same version is idempotent.

    ``expires_at`` (epoch seconds) sets the items' TTL; None writes them without one.

    ``writers`` BatchWriteItem requests run at once (threads sharing the client, which boto3
    allows); a load of fewer than a few batches per writer is written in order on this thread.
    """
    if writers < 1:
        raise ConfigError(f"writers must be at least 1, got {writers}")
    ddb = dynamodb_client(client)
    batches = _batches(rows, version, expires_at)
    head = list(itertools.islice(batches, SEQUENTIAL_BATCHES_PER_WRITER * writers))
    if writers == 1 or len(head) < SEQUENTIAL_BATCHES_PER_WRITER * writers:
        return sum(_flush(ddb, table, batch, sleep) for batch in itertools.chain(head, batches))
    return _write_in_parallel(ddb, table, itertools.chain(head, batches), sleep, writers)


def _item(rec: Recommendation, version: str, expires_at: int | None) -> dict[str, Any]:
    item = {
        **user_key(rec.user_id, version),
        "user_id": {"S": rec.user_id},
        "version": {"S": version},
        "items": {"L": [{"S": i} for i in rec.items]},
        "scores": {"L": [{"N": repr(float(s))} for s in rec.scores]},
    }
    if rec.cold_user:
        item["cold_user"] = {"BOOL": True}
    if expires_at is not None:
        item[TTL_ATTRIBUTE] = {"N": str(int(expires_at))}
    return item


def _batches(rows: Iterable[Recommendation], version: str, expires_at: int | None) -> Iterator[list[dict[str, Any]]]:
    """PutRequests in lists of at most BATCH_LIMIT."""
    batch: list[dict[str, Any]] = []
    for rec in rows:
        batch.append({"PutRequest": {"Item": _item(rec, version, expires_at)}})
        if len(batch) == BATCH_LIMIT:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_in_parallel(ddb: Any, table: str, batches: Iterator[list[dict[str, Any]]], sleep: Any, writers: int) -> int:
    """Keep ``writers`` batches in flight (and as many queued, so memory stays bounded); the first
    failure stops the load and is raised once the requests already sent have finished."""
    written = 0
    with ThreadPoolExecutor(max_workers=writers) as pool:
        pending: set[Future[int]] = set()
        try:
            for batch in batches:
                pending.add(pool.submit(_flush, ddb, table, batch, sleep))
                if len(pending) >= 2 * writers:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    written += sum(f.result() for f in done)
            done, pending = wait(pending)
            written += sum(f.result() for f in done)
        except BaseException:
            for future in pending:
                future.cancel()
            raise
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


@dataclass(frozen=True)
class Pointer:
    """The pointer item as read. ``version`` is live; ``newest`` is the newest version the pointer ever named
    (``version`` itself unless a rollback moved it back from ``rolled_back_from``): a publish needs a newer one.
    ``published_at``: epoch seconds of the write that made ``version`` live (a publish or a rollback)."""

    version: str
    newest: str
    users: int | None = None
    published_at: int | None = None
    rolled_back_from: str | None = None


def read_pointer(table: str, *, client: Any = None) -> Pointer | None:
    """The pointer item, read strongly consistently; None before the first publish. A pointer written before
    rollbacks existed has no ``newest``: its version is the newest."""
    ddb = dynamodb_client(client)
    item = ddb.get_item(TableName=table, Key=pointer_key(), ConsistentRead=True).get("Item")
    if item is None:
        return None
    version = item["version"]["S"]
    return Pointer(
        version=version,
        newest=item.get("newest", {}).get("S", version),
        users=int(item["users"]["N"]) if "users" in item else None,
        published_at=int(item["published_at"]["N"]) if "published_at" in item else None,
        rolled_back_from=item.get("rolled_back_from", {}).get("S"),
    )


def active_version(table: str, *, client: Any = None, consistent: bool = True) -> str | None:
    """The live version; ``consistent=False`` reads the pointer eventually consistently (half the cost,
    and it may lag a just-moved pointer by about a second)."""
    ddb = dynamodb_client(client)
    reply = ddb.get_item(TableName=table, Key=pointer_key(), ConsistentRead=consistent)
    item = reply.get("Item")
    return None if item is None else item["version"]["S"]


@dataclass
class PointerCache:
    """The live version per table, remembered for ``max_age_s`` (read eventually consistently), so that
    a reader's request is one GetItem, not two. A reader sees a newly published version at most
    ``max_age_s`` (plus the read's own lag) after the pointer moved; versions stay complete well beyond
    that, so a list is never read from half a version. ``clock``: seconds, monotonic (injectable)."""

    max_age_s: float
    clock: Callable[[], float] = time.monotonic
    _entries: dict[str, tuple[str | None, float]] = field(default_factory=dict)

    def version(self, table: str, ddb: Any) -> str | None:
        now = self.clock()
        cached = self._entries.get(table)
        if cached is not None and now - cached[1] < self.max_age_s:
            return cached[0]
        version = active_version(table, client=ddb, consistent=False)
        self._entries[table] = (version, now)
        return version


def publish_version(table: str, version: str, *, users: int, client: Any = None) -> bool:
    """Point readers at ``version`` in one conditional write. Returns False (and changes nothing)
    when the live version, or the newest the pointer ever named (``Pointer.newest``: a rollback leaves it),
    is the same or newer: the pointer never moves back by a publish, and a version rolled back from, or
    one older than it, does not go live again this way."""
    ddb = dynamodb_client(client)
    return _put_pointer(ddb, table, {"version": {"S": version}, "newest": {"S": version},
                                     "users": {"N": str(int(users))}, "published_at": {"N": str(int(time.time()))}},
                        f"attribute_not_exists({PARTITION_KEY}) OR (#v < :v AND (attribute_not_exists(#n) OR #n < :v))",
                        {":v": {"S": version}})


def roll_back_pointer(table: str, version: str, *, read: Pointer, users: int, client: Any = None) -> bool:
    """Point readers at ``version``, an earlier version, in one write conditional on the pointer still being
    ``read`` (as ``read_pointer`` returned it). Returns False, and changes nothing, when the pointer moved
    since (a run published, or another rollback): the caller reads it again and decides afresh.

    ``newest`` is kept, so the next publish still needs a version newer than every one published."""
    ddb = dynamodb_client(client)
    item = {"version": {"S": version}, "newest": {"S": max(read.newest, version)}, "users": {"N": str(int(users))},
            "published_at": {"N": str(int(time.time()))}, "rolled_back_from": {"S": read.version}}
    return _put_pointer(ddb, table, item, "#v = :read AND (attribute_not_exists(#n) OR #n = :newest)",
                        {":read": {"S": read.version}, ":newest": {"S": read.newest}})


def _put_pointer(ddb: Any, table: str, attributes: dict[str, Any], condition: str,
                 values: dict[str, Any]) -> bool:
    """One conditional PutItem of the pointer item (``condition`` names ``#v``, the version, and ``#n``,
    newest); False when the condition does not hold."""
    from botocore.exceptions import ClientError

    try:
        ddb.put_item(TableName=table, Item={**pointer_key(), **attributes}, ConditionExpression=condition,
                     ExpressionAttributeNames={"#v": "version", "#n": "newest"}, ExpressionAttributeValues=values)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
            return False
        raise
    return True


class UnknownList(StoreError):
    """A named list the live version does not make (the filter file it ran with names no such list);
    ``version``: that live version, when the name was a valid one."""

    def __init__(self, message: str, version: str | None = None) -> None:
        super().__init__(message)
        self.version = version


def get_recommendations(table: str, user_id: str, *, list_name: str | None = None, client: Any = None,
                        pointer: PointerCache | None = None) -> Recommendation | None:
    """The live recommendations of one user, following the pointer: the default list, or the named list
    ``list_name`` (the filter file's ``lists``). A user the live version has no item for (one the model has
    not seen) gets the version's fallback list, marked ``fallback=True``; in a named list, the fallback list
    cut to that list's eligible items. A user the version knows always has an item, empty when nothing is
    left to recommend, and never gets the fallback. None only while nothing is live (or the live version
    predates fallback lists). Raises ``UnknownList`` when the live version makes no list ``list_name``."""
    ddb = dynamodb_client(client)
    version = active_version(table, client=ddb) if pointer is None else pointer.version(table, ddb)
    if version is None:
        return None
    try:
        keyed = list_version(version, list_name)
    except ValueError as exc:
        raise UnknownList(f"table {table}: {exc}") from exc
    item = ddb.get_item(TableName=table, Key=user_key(user_id, keyed)).get("Item")
    fallback = item is None
    if fallback:
        item = ddb.get_item(TableName=table, Key=_typed(fallback_item_key(keyed))).get("Item")
        if item is None:
            if list_name is None:
                return None
            raise UnknownList(f"table {table}: the live version {version} has no list {list_name!r}", version)
    return Recommendation(
        user_id=user_id,
        items=[v["S"] for v in item["items"]["L"]],
        scores=[float(v["N"]) for v in item["scores"]["L"]],
        fallback=fallback,
        cold_user=bool(item.get("cold_user", {}).get("BOOL", False)),
    )


def write_fallback(table: str, version: str, items: list[str], scores: list[float], *, client: Any = None) -> None:
    """Write one version's fallback list (no TTL: the version may go live)."""
    ddb = dynamodb_client(client)
    ddb.put_item(TableName=table, Item={
        **_typed(fallback_item_key(version)),
        "version": {"S": version},
        "items": {"L": [{"S": i} for i in items]},
        "scores": {"L": [{"N": repr(float(s))} for s in scores]},
    })


def has_fallback(table: str, version: str, *, client: Any = None) -> bool:
    ddb = dynamodb_client(client)
    return "Item" in ddb.get_item(TableName=table, Key=_typed(fallback_item_key(version)), ConsistentRead=True)


def fallback_expiry(table: str, version: str, *, client: Any = None) -> tuple[bool, int | None]:
    """Whether the version's fallback list is in the table, and its expiry (epoch seconds; None: it has
    none). Read strongly consistently."""
    ddb = dynamodb_client(client)
    item = ddb.get_item(TableName=table, Key=_typed(fallback_item_key(version)), ConsistentRead=True).get("Item")
    if item is None:
        return False, None
    return True, int(item[TTL_ATTRIBUTE]["N"]) if TTL_ATTRIBUTE in item else None


def keep_fallback(table: str, version: str, *, client: Any = None) -> bool:
    """Remove the expiry of a version's fallback list, which is live again. Returns False when the version
    has none."""
    return _update_fallback(table, version, "REMOVE #t", None, client)


def expire_fallback(table: str, version: str, expires_at: int, *, client: Any = None) -> bool:
    """Give a retired version's fallback list its TTL. Returns False when the version has none."""
    return _update_fallback(table, version, "SET #t = :t", expires_at, client)


def _update_fallback(table: str, version: str, update: str, expires_at: int | None, client: Any) -> bool:
    from botocore.exceptions import ClientError

    ddb = dynamodb_client(client)
    values = {} if expires_at is None else {"ExpressionAttributeValues": {":t": {"N": str(int(expires_at))}}}
    try:
        ddb.update_item(TableName=table, Key=_typed(fallback_item_key(version)),
                        UpdateExpression=update, ConditionExpression=f"attribute_exists({PARTITION_KEY})",
                        ExpressionAttributeNames={"#t": TTL_ATTRIBUTE}, **values)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
            return False
        raise
    return True
