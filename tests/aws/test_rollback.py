"""Rolling back (``stages.rollback_version``, ``topx rollback``) and what retiring does around it, on moto.

Versions are built by hand as the loads and the publish leave them (manifests, items, fallback list, the
publish's record), so each case sets the order of events itself: a publish or a retire that overlaps a
rollback is run at a chosen point inside it, never by timing.
"""

from __future__ import annotations

import time
from typing import Any

import boto3
import pandas as pd
import pytest
from moto import mock_aws

from topx import contract
from topx.aws import client, stages, store
from topx.cli import main
from topx.errors import StoreError

BUCKET, TABLE = "topx-test-bucket", "topx-test-table"
RETENTION_DAYS = 7
# Run ids sort by time: A, then B, then C. B_PRIME started between A and B, and loaded after B published.
A, B_PRIME, B, C = ("20260101T000000000000Z-a", "20260115T000000000000Z-bp", "20260201T000000000000Z-b",
                    "20260301T000000000000Z-c")
SHARDS = [["u1", "u2"], ["u3"]]
USERS = [u for shard in SHARDS for u in shard]


def later() -> float:
    """A time past the age limit of every manifest written so far: when the loads of a later run retire."""
    return time.time() + stages.RETIRE_AFTER_S + 1


@pytest.fixture()
def aws(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv(contract.ENV_RETENTION_DAYS, str(RETENTION_DAYS))
    with mock_aws():
        s3, ddb = boto3.client("s3"), boto3.client("dynamodb")
        s3.create_bucket(Bucket=BUCKET)
        ddb.create_table(TableName=TABLE, BillingMode="PAY_PER_REQUEST", KeySchema=contract.table_key_schema(),
                         AttributeDefinitions=contract.table_attribute_definitions())
        stages.use_clients(s3=s3, dynamodb=ddb)
        yield s3, ddb
        stages.use_clients(s3=None, dynamodb=None)


def loaded(s3: Any, version: str, lists: tuple[str, ...] = ()) -> None:
    """A version as its loads leave it: each shard's manifest, its items (no expiry), the fallback list, and
    what publish reads under runs/. Every user's one item is named after the version. Each named list in
    ``lists`` holds one item named after it and the version for every user but u2, who has none left in it."""
    for shard, users in enumerate(SHARDS):
        frame = pd.DataFrame({"user_id": users, "rank": [1] * len(users), "item_id": [f"i-{version}"] * len(users),
                              "score": [1.0] * len(users)})
        prefix = contract.version_shard_prefix(version, shard)
        s3.put_object(Bucket=BUCKET, Key=prefix + contract.MANIFEST_RECOMMENDATIONS, Body=frame.to_parquet())
        searched: dict[str, Any] = {"shard": shard, "users": len(users), "rows": len(users), "users_without_items": []}
        for name in lists:
            listed = [u for u in users if u != "u2"]
            s3.put_object(Bucket=BUCKET, Key=prefix + contract.list_file(name), Body=pd.DataFrame(
                {"user_id": listed, "rank": [1] * len(listed), "item_id": [f"{name}-{version}"] * len(listed),
                 "score": [1.0] * len(listed)}).to_parquet())
            searched.setdefault("lists", {})[name] = {"rows": len(listed),
                                                      "users_without_items": sorted(set(users) - set(listed))}
            store.write_recommendations(TABLE, contract.list_version(version, name),
                                        [store.Recommendation(u, [f"{name}-{version}"] if u in listed else [],
                                                              [1.0] if u in listed else []) for u in users],
                                        expires_at=None, client=stages.dynamodb_client())
        stages._put_json(BUCKET, prefix + contract.MANIFEST_SEARCHED, searched)
        stages._put_json(BUCKET, contract.searched_key(version, shard), searched)
        stages._put_json(BUCKET, contract.loaded_key(version, shard), {"shard": shard, "written": len(users),
                                                                         "lists": dict.fromkeys(lists, len(users))})
        store.write_recommendations(TABLE, version, [store.Recommendation(u, [f"i-{version}"], [1.0]) for u in users],
                                    expires_at=None, client=stages.dynamodb_client())
    store.write_fallback(TABLE, version, [f"top-{version}"], [1.0], client=stages.dynamodb_client())
    for name in lists:
        store.write_fallback(TABLE, contract.list_version(version, name), [f"top-{name}-{version}"], [1.0],
                             client=stages.dynamodb_client())
    stages._put_json(BUCKET, contract.run_record_key(version), {
        "report": {"n_users": len(USERS)}, "filters": {"lists": [{"name": name} for name in lists]} if lists else None})
    stages._put_json(BUCKET, contract.metrics_key(version), {"recall_at_10": 0.5})


def published(s3: Any, version: str, lists: tuple[str, ...] = ()) -> dict[str, Any]:
    loaded(s3, version, lists)
    return stages.publish_version(BUCKET, version, TABLE, len(SHARDS))


def retire(now: float) -> list[dict[str, int]]:
    """What the two loads of a later run retire."""
    return [stages.retire_versions(BUCKET, TABLE, shard, 2, now=now) for shard in range(2)]


def expiries(ddb: Any, version: str) -> set[int | None]:
    keys = [store.user_key(u, version) for u in USERS] + [store._typed(contract.fallback_item_key(version))]
    items = [ddb.get_item(TableName=TABLE, Key=key, ConsistentRead=True)["Item"] for key in keys]
    return {int(i["expires_at"]["N"]) if "expires_at" in i else None for i in items}


def list_expiries(ddb: Any, version: str, name: str) -> set[int | None]:
    """The expiries of a named list's items and its fallback item under ``version``."""
    keyed = contract.list_version(version, name)
    keys = [store.user_key(u, keyed) for u in USERS] + [store._typed(contract.fallback_item_key(keyed))]
    items = [ddb.get_item(TableName=TABLE, Key=key, ConsistentRead=True)["Item"] for key in keys]
    return {int(i["expires_at"]["N"]) if "expires_at" in i else None for i in items}


def markers(s3: Any, version: str) -> list[str]:
    reply = s3.list_objects_v2(Bucket=BUCKET, Prefix=contract.version_prefix(version))
    return sorted(o["Key"] for o in reply.get("Contents", []) if o["Key"].endswith(contract.MANIFEST_RETIRED))


def served(ddb: Any) -> dict[str, list[str]]:
    """What readers get: every user's list, and an unknown user's (the fallback list)."""
    return {u: store.get_recommendations(TABLE, u, client=ddb).items for u in [*USERS, "nobody"]}


def served_from(version: str) -> dict[str, list[str]]:
    return {**{u: [f"i-{version}"] for u in USERS}, "nobody": [f"top-{version}"]}


def test_a_rollback_serves_the_previous_version_again_without_expiry_until_a_newer_run_publishes(aws) -> None:
    s3, ddb = aws
    published(s3, A)
    published(s3, B)
    now = later()
    retired = retire(now)  # A is superseded: its items get their expiry, and its manifests are kept, marked
    assert sum(r["manifests"] for r in retired) == 2 and sum(r["users"] for r in retired) == len(USERS)
    assert expiries(ddb, A) == {int(now) + RETENTION_DAYS * 86400} and len(markers(s3, A)) == 2
    assert expiries(ddb, B) == {None}

    done = stages.rollback_version(BUCKET, TABLE, now=now)

    assert done == {"version": A, "rolled_back_from": B, "users": len(USERS), "kept": 2, "already_live": False}
    assert store.read_pointer(TABLE, client=ddb) == store.Pointer(
        version=A, newest=B, users=len(USERS), published_at=store.read_pointer(TABLE, client=ddb).published_at,
        rolled_back_from=B)
    assert served(ddb) == served_from(A)
    assert expiries(ddb, A) == {None} and markers(s3, A) == []  # live again: it never expires
    # Rolling back to the live version again finishes a rollback that stopped halfway, and changes nothing here.
    assert stages.rollback_version(BUCKET, TABLE, A, now=now) == {
        "version": A, "rolled_back_from": B, "users": len(USERS), "kept": 0, "already_live": True}

    # The next loads retire the version rolled back from, and keep the one rolled back to.
    assert sum(r["users"] for r in retire(now + 60)) == len(USERS)
    assert expiries(ddb, B) == {int(now + 60) + RETENTION_DAYS * 86400} and expiries(ddb, A) == {None}
    # The version rolled back from does not publish again (a retried Publish), nor does a run that started
    # before it; the next newer run does.
    with pytest.raises(stages.VersionSuperseded, match=f"run {B} was not published: it was live and was rolled back"):
        stages.publish_version(BUCKET, B, TABLE, len(SHARDS))
    with pytest.raises(stages.VersionSuperseded, match=f"the newer version {B} was published before it"):
        published(s3, B_PRIME)
    assert store.active_version(TABLE, client=ddb) == A and served(ddb) == served_from(A)
    assert published(s3, C)["published"]
    assert store.read_pointer(TABLE, client=ddb).newest == C and served(ddb) == served_from(C)
    assert store.read_pointer(TABLE, client=ddb).rolled_back_from is None


def test_retiring_and_rolling_back_rewrite_a_named_lists_items_and_fallback_too(aws) -> None:
    s3, ddb = aws
    for version in (A, B, C):
        published(s3, version, ("sale",))
    now = later()
    retire(now)
    expiry = int(now) + RETENTION_DAYS * 86400
    assert list_expiries(ddb, A, "sale") == list_expiries(ddb, B, "sale") == {expiry}
    assert list_expiries(ddb, C, "sale") == {None}
    # A manifest without the list's file cannot give the list back: B is not whole, so a rollback goes to A.
    s3.delete_object(Bucket=BUCKET, Key=contract.version_shard_prefix(B, 1) + contract.list_file("sale"))
    with pytest.raises(stages.RollbackRefused, match=f"version {B} cannot go live again: the manifests of 1 of its "
                                                     "2 shards are gone"):
        stages.rollback_version(BUCKET, TABLE, B, now=now)

    assert stages.rollback_version(BUCKET, TABLE, now=now)["version"] == A

    assert list_expiries(ddb, A, "sale") == {None} and markers(s3, A) == []
    served_list = {u: store.get_recommendations(TABLE, u, list_name="sale", client=ddb) for u in [*USERS, "nobody"]}
    assert {u: (rec.items, rec.fallback) for u, rec in served_list.items()} == {
        "u1": ([f"sale-{A}"], False), "u2": ([], False), "u3": ([f"sale-{A}"], False),
        "nobody": ([f"top-sale-{A}"], True)}
    # A version whose list's fallback item is gone is not whole either.
    ddb.delete_item(TableName=TABLE, Key=store._typed(contract.fallback_item_key(contract.list_version(C, "sale"))))
    with pytest.raises(stages.RollbackRefused, match="its fallback list is not in the table for the list sale"):
        stages.rollback_version(BUCKET, TABLE, C, now=now)


def test_a_run_whose_named_list_is_not_loaded_for_every_user_is_not_published(aws) -> None:
    s3, ddb = aws
    loaded(s3, A, ("sale",))
    stages._put_json(BUCKET, contract.loaded_key(A, 1), {"shard": 1, "written": 1, "lists": {}})
    with pytest.raises(StoreError, match=f"run {A}: 2 users loaded in the list sale, expected 3; not publishing"):
        stages.publish_version(BUCKET, A, TABLE, len(SHARDS))
    stages._put_json(BUCKET, contract.loaded_key(A, 1), {"shard": 1, "written": 1, "lists": {"sale": 1}})
    ddb.delete_item(TableName=TABLE, Key=store._typed(contract.fallback_item_key(contract.list_version(A, "sale"))))
    with pytest.raises(StoreError, match="the fallback list of its list sale is not in the table; not publishing"):
        stages.publish_version(BUCKET, A, TABLE, len(SHARDS))
    assert store.active_version(TABLE, client=ddb) is None


def test_rollback_goes_to_a_named_version_or_refuses_naming_why(aws) -> None:
    s3, ddb = aws
    with pytest.raises(stages.RollbackRefused, match="no version was ever published"):
        stages.rollback_version(BUCKET, TABLE)
    published(s3, A)
    with pytest.raises(stages.RollbackRefused, match=f"no version earlier than the live {A} is kept"):
        stages.rollback_version(BUCKET, TABLE)
    published(s3, B)
    published(s3, C)
    loaded(s3, "20260401T000000000000Z-loading")  # loaded, not published (yet)
    now = later()
    retire(now)
    refusals = {
        "nope": "unknown version 'nope': nothing of it is kept",
        "20260401T000000000000Z-loading": "it was never live",
    }
    for version, reason in refusals.items():
        with pytest.raises(stages.RollbackRefused, match=reason):
            stages.rollback_version(BUCKET, TABLE, version, now=now)
    # Within a day of its expiry, a version is not offered: DynamoDB may delete it any time after.
    soon = now + RETENTION_DAYS * 86400 - stages.ROLLBACK_MARGIN_S + 1
    with pytest.raises(stages.RollbackRefused, match=f"version {A} cannot go live again: its items expire at .* less "
                                                     "than 24 hours from now"):
        stages.rollback_version(BUCKET, TABLE, A, now=soon)
    # A version a shard's manifest of which is gone, or whose fallback list is, cannot be made whole again.
    s3.delete_object(Bucket=BUCKET, Key=contract.version_shard_prefix(B, 1) + contract.MANIFEST_SEARCHED)
    with pytest.raises(stages.RollbackRefused, match=f"{B}: the manifests of 1 of its 2 shards are gone"):
        stages.rollback_version(BUCKET, TABLE, now=soon)  # B is incomplete, A expires too soon: nothing to go to
    ddb.delete_item(TableName=TABLE, Key=store._typed(contract.fallback_item_key(A)))
    with pytest.raises(stages.RollbackRefused, match="its fallback list is not in the table"):
        stages.rollback_version(BUCKET, TABLE, A, now=now)
    assert store.read_pointer(TABLE, client=ddb) == store.read_pointer(TABLE, client=ddb) and \
        store.active_version(TABLE, client=ddb) == C and served(ddb) == served_from(C)

    # Forward again, to a version rolled back from, is a rollback too: to one that was live and is whole.
    published(s3, "20260501T000000000000Z-d")
    assert stages.rollback_version(BUCKET, TABLE, now=now)["version"] == C
    done = stages.rollback_version(BUCKET, TABLE, "20260501T000000000000Z-d", now=now)
    assert done["version"] == "20260501T000000000000Z-d" and done["rolled_back_from"] == C


def test_a_publish_between_the_rollbacks_read_and_its_write_wins_and_the_rollback_changes_nothing(
        aws, monkeypatch: pytest.MonkeyPatch) -> None:
    s3, ddb = aws
    published(s3, A)
    published(s3, B)
    now = later()
    retire(now)
    loaded(s3, C)
    roll_back_pointer = store.roll_back_pointer

    def a_run_publishes_first(*args: Any, **kwargs: Any) -> bool:
        assert stages.publish_version(BUCKET, C, TABLE, len(SHARDS))["published"]
        return roll_back_pointer(*args, **kwargs)

    monkeypatch.setattr(store, "roll_back_pointer", a_run_publishes_first)
    with pytest.raises(stages.RollbackRefused, match=f"the pointer moved while rolling back: {C} is live now, not {B}"):
        stages.rollback_version(BUCKET, TABLE, now=now)

    assert store.read_pointer(TABLE, client=ddb).version == C and served(ddb) == served_from(C)
    assert None not in expiries(ddb, A) and len(markers(s3, A)) == 2  # A stays retired, as it was


def test_a_rollback_stopped_after_moving_the_pointer_says_so_and_is_finished_by_running_it_again(
        aws, monkeypatch: pytest.MonkeyPatch) -> None:
    s3, ddb = aws
    published(s3, A)
    published(s3, B)
    now = later()
    retire(now)
    keep_manifest = stages._keep_manifest

    def fails_on_shard_1(bucket: str, table: str, version: str, manifest_shard: int, lists: list[str]) -> int:
        if manifest_shard == 1:
            raise StoreError("s3://topx-test-bucket/...: cannot be read")
        return keep_manifest(bucket, table, version, manifest_shard, lists)

    monkeypatch.setattr(stages, "_keep_manifest", fails_on_shard_1)
    with pytest.raises(StoreError, match=f"{A} is live now, in place of {B}, but some of its items may still carry "
                                         f"their expiry: .*; run `topx rollback --to {A}` again to finish"):
        stages.rollback_version(BUCKET, TABLE, now=now)
    assert served(ddb) == served_from(A) and None in expiries(ddb, A) and len(markers(s3, A)) == 1
    monkeypatch.setattr(stages, "_keep_manifest", keep_manifest)

    assert stages.rollback_version(BUCKET, TABLE, A, now=now)["kept"] == 1
    assert expiries(ddb, A) == {None} and markers(s3, A) == [] and served(ddb) == served_from(A)


def test_a_run_publishing_right_after_a_rollback_goes_live(aws) -> None:
    s3, ddb = aws
    published(s3, A)
    published(s3, B)
    loaded(s3, C)  # in flight while the rollback runs
    assert stages.rollback_version(BUCKET, TABLE)["version"] == A
    assert stages.publish_version(BUCKET, C, TABLE, len(SHARDS))["published"]
    assert served(ddb) == served_from(C)


def test_a_load_retiring_the_version_a_rollback_makes_live_gives_back_the_expiry_it_wrote(
        aws, monkeypatch: pytest.MonkeyPatch) -> None:
    """A load retires A (superseded by B) while an operator rolls back to A: the rollback finds A's
    manifests unmarked, moves the pointer and keeps nothing; then the load writes A's items with their
    expiry and marks them. Reading the pointer again after its marker, the load sees A live and writes the
    items again without an expiry."""
    s3, ddb = aws
    published(s3, A)
    published(s3, B)
    now = later()
    write_recommendations = store.write_recommendations
    rolled_back: list[dict[str, Any]] = []

    def rollback_lands_first(table: str, version: str, rows: Any, *, expires_at: int | None, **kwargs: Any) -> int:
        if version == A and expires_at is not None and not rolled_back:
            rolled_back.append(stages.rollback_version(BUCKET, TABLE, now=now))
        return write_recommendations(table, version, rows, expires_at=expires_at, **kwargs)

    monkeypatch.setattr(store, "write_recommendations", rollback_lands_first)
    # Load shard 0 took A's shard 0 back; load shard 1, after the rollback, leaves A alone and retires B's shard 1.
    assert retire(now) == [{"manifests": 0, "users": 0}, {"manifests": 1, "users": 1}]

    assert rolled_back == [{"version": A, "rolled_back_from": B, "users": len(USERS), "kept": 0,
                            "already_live": False}]
    assert store.active_version(TABLE, client=ddb) == A and served(ddb) == served_from(A)
    assert expiries(ddb, A) == {None} and markers(s3, A) == []


def test_a_retired_version_is_forgotten_once_its_items_have_expired(aws) -> None:
    s3, ddb = aws
    published(s3, A)
    published(s3, B)
    now = later()
    retire(now)
    assert len(markers(s3, A)) == 2
    expired = now + RETENTION_DAYS * 86400 + 1
    assert retire(expired) == [{"manifests": 0, "users": 0}] * 2  # the manifests go, then the record and metrics
    retire(expired)
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix=contract.version_prefix(A)).get("KeyCount") == 0
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix=contract.version_prefix(B))["KeyCount"] == 6
    with pytest.raises(stages.RollbackRefused, match=f"unknown version '{A}'"):
        stages.rollback_version(BUCKET, TABLE, A, now=expired)
    with pytest.raises(StoreError):  # a damaged marker is named, and left for the next load
        s3.put_object(Bucket=BUCKET, Key=contract.version_shard_prefix(A, 0) + contract.MANIFEST_RETIRED, Body=b"{}")
        stages._retired_until(BUCKET, contract.version_shard_prefix(A, 0))


def test_the_rollback_command_says_what_it_did_and_why_it_did_not(aws, capsys: pytest.CaptureFixture[str]) -> None:
    s3, ddb = aws
    published(s3, A)
    assert main(["rollback", "--table", TABLE, "--bucket", BUCKET]) == 2
    assert f"topx: error: no version earlier than the live {A} is kept" in capsys.readouterr().err
    published(s3, B)

    assert main(["rollback", "--table", TABLE, "--bucket", BUCKET]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"rolled back: {A} is live (3 users), in place of {B}.") and "retired by the next" in out
    assert client.live_version(table=TABLE).rolled_back_from == B
    assert main(["rollback", "--to", A, "--table", TABLE, "--bucket", BUCKET]) == 0
    assert capsys.readouterr().out == f"{A} is already live; its items carry no expiry\n"
    assert main(["rollback", "--to", "nope", "--table", TABLE, "--bucket", BUCKET]) == 2
    assert "unknown version 'nope'" in capsys.readouterr().err
    assert main(["rollback", "--table", TABLE, "--bucket", "nope"]) == 2
    assert "topx: error: bucket 'nope' does not exist" in capsys.readouterr().err
    assert main(["rollback", "--table", "nope", "--bucket", BUCKET]) == 2
    assert "topx: error: table 'nope' does not exist" in capsys.readouterr().err
    assert stages._clients == {"s3": s3, "dynamodb": ddb}  # the command's clients were put back
