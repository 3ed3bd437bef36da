"""The AWS stages under moto, run in the state machine's order: upload -> recommendations read
from DynamoDB through the pointer, equal to what `topx run` computes locally from the same data."""

from __future__ import annotations

import io
import json
import re

import boto3
import numpy as np
import pandas as pd
import pytest
from moto import mock_aws
from reliability_stack import base_ratings

from topx import contract
from topx.aws import client, stages, store
from topx.config import default_hyperparameters
from topx.dataset import DataOptions
from topx.errors import ArtifactFormatError, ConfigError, InputDataError, StoreError
from topx.run import run_all
from topx.steps import RunOptions

BUCKET, TABLE = "topx-test-bucket", "topx-test-table"


@pytest.fixture()
def aws(monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("TOPX_EPOCHS", "3")
    monkeypatch.setenv("TOPX_NUM_FACTORS", "8")
    monkeypatch.setenv("TOPX_TOP_X", "5")
    monkeypatch.setenv("TOPX_SHARDS", "3")
    with mock_aws():
        s3 = boto3.client("s3")
        ddb = boto3.client("dynamodb")
        s3.create_bucket(Bucket=BUCKET)
        ddb.create_table(
            TableName=TABLE, BillingMode="PAY_PER_REQUEST",
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"},
                                  {"AttributeName": "sk", "AttributeType": "S"}],
        )
        stages.use_clients(s3=s3, dynamodb=ddb)
        yield s3, ddb
        stages.use_clients(s3=None, dynamodb=None)


def run_pipeline(key: str) -> str:
    prepared = stages.prepare_run(BUCKET, key)
    run_id = prepared["run_id"]
    stages.train_run(BUCKET, run_id)
    gate = stages.quality_gate(BUCKET, run_id, TABLE)
    assert gate["passed"], gate
    stages.repackage_run(BUCKET, run_id)
    for shard in prepared["shard_ids"]:
        stages.search_shard(BUCKET, run_id, shard, prepared["shards"])
    for shard in prepared["shard_ids"]:
        stages.load_shard(BUCKET, run_id, shard, TABLE)
    result = stages.publish_version(BUCKET, run_id, TABLE, prepared["shards"])
    assert result["published"]
    # What Publish reports to CloudWatch is the run's own hold-out quality.
    metrics = json.loads(stages.s3_client().get_object(Bucket=BUCKET, Key=contract.metrics_key(run_id))["Body"].read())
    x = metrics["top_x"]
    assert result["quality"] == {"x": x, "recall_at_x": metrics[f"recall_at_{x}"],
                                 "lift_over_popularity": metrics[f"lift_over_popularity_recall_at_{x}"]}
    return run_id


def test_published_quality_keeps_only_finite_measures_of_the_run_s_x() -> None:
    metrics = {"top_x": 5, "recall_at_5": 0.2, "lift_over_popularity_recall_at_5": 1.5, "recall_at_10": 0.9}
    assert stages.published_quality(metrics) == {"x": 5, "recall_at_x": 0.2, "lift_over_popularity": 1.5}
    # No hold-out: neither measure. A diverged model's NaN, or popularity's zero recall (no lift): left out.
    assert stages.published_quality({"top_x": 5}) == {"x": 5}
    assert stages.published_quality({"top_x": 5, "recall_at_5": float("nan")}) == {"x": 5}
    assert stages.published_quality({"recall_at_10": 0.3}) == {"x": 10, "recall_at_x": 0.3}


def test_upload_to_dynamodb_matches_the_local_run(aws, tmp_path):
    s3, ddb = aws
    data = base_ratings(150, 80, seed=11)
    csv = tmp_path / "ratings.csv"
    data.to_csv(csv, index=False)
    s3.upload_file(str(csv), BUCKET, "incoming/ratings.csv")

    run_id = run_pipeline("incoming/ratings.csv")
    assert store.active_version(TABLE, client=ddb) == run_id

    local = tmp_path / "local"
    run_all(DataOptions(str(csv), implicit=True), default_hyperparameters("ranking", num_factors=8, epochs=3),
            RunOptions(top_x=5, progress=False), local)
    expected = pd.read_parquet(local / "recommendations.parquet")
    for user, group in expected.groupby("user_id"):
        rec = store.get_recommendations(TABLE, user, client=ddb)
        assert rec is not None and rec.items == list(group.sort_values("rank")["item_id"]), user
        np.testing.assert_allclose(rec.scores, group.sort_values("rank")["score"], rtol=1e-5)
        assert not rec.fallback
    # A user the run has not seen gets the run's fallback list, the same one `topx run` writes.
    unknown = store.get_recommendations(TABLE, "nobody", client=ddb)
    fallback = pd.read_parquet(local / "fallback.parquet").sort_values("rank")
    assert unknown.fallback and unknown.items == fallback["item_id"].tolist()
    np.testing.assert_allclose(unknown.scores, fallback["score"], rtol=1e-5)


def test_each_search_shard_reads_its_own_users_vectors_only(aws, tmp_path):
    """Repackage writes the items' vectors once and each shard's users' apart; a search child needs its own
    shard's files and the items', never another shard's, so its memory follows its own users."""
    s3, _ = aws
    base_ratings(90, 40, seed=3).to_csv(tmp_path / "ratings.csv", index=False)
    s3.upload_file(str(tmp_path / "ratings.csv"), BUCKET, "incoming/ratings.csv")
    prepared = stages.prepare_run(BUCKET, "incoming/ratings.csv")
    run_id, shards = prepared["run_id"], prepared["shards"]
    stages.train_run(BUCKET, run_id)
    # The train job wrote them; repackage only checks them, so it needs no model.
    for obj in s3.list_objects_v2(Bucket=BUCKET, Prefix=contract.model_prefix(run_id))["Contents"]:
        s3.delete_object(Bucket=BUCKET, Key=obj["Key"])
    reply = stages.repackage_run(BUCKET, run_id)
    assert reply["shards"] == shards == 3 and reply["n_users"] == prepared["n_users"]
    assert (reply["n_items"], reply["dimension"]) == (prepared["n_items"], 8 + 1)
    prefix = contract.vectors_prefix(run_id)
    keys = sorted(o["Key"][len(prefix):] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"])
    assert keys == sorted(["item_ids.json", "item_vectors.npy", *(f"shard={s:04d}/{name}" for s in range(shards)
                           for name in ("user_constants.npy", "user_ids.json", "user_vectors.npy"))])
    shard_ids = [json.loads(s3.get_object(Bucket=BUCKET, Key=f"{prefix}shard={s:04d}/user_ids.json")["Body"].read())
                 for s in range(shards)]
    assert [len(ids) for ids in shard_ids] == [len(stages.shard_users(prepared["n_users"], s, shards))
                                               for s in range(shards)]
    assert sorted(sum(shard_ids, [])) == sorted(map(str, base_ratings(90, 40, seed=3)["user_id"].unique()))

    # A shard's vectors of the wrong shape, or a shard's file missing, fail the check naming it.
    good = s3.get_object(Bucket=BUCKET, Key=f"{prefix}shard=0002/user_vectors.npy")["Body"].read()
    wrong = io.BytesIO()
    np.save(wrong, np.zeros((2, 9), np.float32))
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}shard=0002/user_vectors.npy", Body=wrong.getvalue())
    with pytest.raises(ArtifactFormatError, match=r"shard=0002/: vectors \(2, 9\)"):
        stages.repackage_run(BUCKET, run_id)
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}shard=0002/user_vectors.npy", Body=good)
    for name in ("user_vectors.npy", "user_constants.npy", "user_ids.json"):
        s3.delete_object(Bucket=BUCKET, Key=f"{prefix}shard=0001/{name}")
    with pytest.raises(StoreError, match=r"shard=0001/user_vectors.npy cannot be read"):
        stages.repackage_run(BUCKET, run_id)
    assert stages.search_shard(BUCKET, run_id, 0, shards)["users"] == len(shard_ids[0])
    assert stages.search_shard(BUCKET, run_id, 2, shards)["users"] == len(shard_ids[2])
    with pytest.raises(StoreError, match=r"shard=0001/user_vectors.npy cannot be read"):
        stages.search_shard(BUCKET, run_id, 1, shards)


def test_a_failed_run_leaves_the_live_version(aws, tmp_path):
    s3, ddb = aws
    data = base_ratings(60, 40, seed=12)
    csv = tmp_path / "ratings.csv"
    data.to_csv(csv, index=False)
    s3.upload_file(str(csv), BUCKET, "incoming/ratings.csv")
    live = run_pipeline("incoming/ratings.csv")
    before = store.get_recommendations(TABLE, data["user_id"].iloc[0], client=ddb)

    s3.put_object(Bucket=BUCKET, Key="incoming/bad.csv", Body=b"user_id,item_id,rating\nu1,i1,oops\n")
    with pytest.raises(InputDataError, match="row 2"):
        stages.prepare_run(BUCKET, "incoming/bad.csv")
    # A run whose load stopped after one shard cannot publish.
    prepared = stages.prepare_run(BUCKET, "incoming/ratings.csv")
    run_id = prepared["run_id"]
    stages.train_run(BUCKET, run_id)
    stages.repackage_run(BUCKET, run_id)
    for shard in prepared["shard_ids"]:
        stages.search_shard(BUCKET, run_id, shard, prepared["shards"])
    stages.load_shard(BUCKET, run_id, 0, TABLE)
    with pytest.raises(StoreError):
        stages.publish_version(BUCKET, run_id, TABLE, prepared["shards"])
    assert store.active_version(TABLE, client=ddb) == live
    assert store.get_recommendations(TABLE, before.user_id, client=ddb) == before


def test_pointer_never_goes_backwards(aws):
    _, ddb = aws
    assert store.publish_version(TABLE, "20260101T000000Z-b", users=1, client=ddb)
    assert not store.publish_version(TABLE, "20250101T000000Z-a", users=1, client=ddb)
    assert store.active_version(TABLE, client=ddb) == "20260101T000000Z-b"


def test_a_pointer_written_before_rollbacks_existed_reads_and_moves_as_before(aws):
    """Tables deployed earlier hold a pointer without ``newest``: its version counts as the newest."""
    _, ddb = aws
    ddb.put_item(TableName=TABLE, Item={**store.pointer_key(), "version": {"S": "20260101T000000Z-b"},
                                        "users": {"N": "1"}, "published_at": {"N": "1"}})
    read = store.read_pointer(TABLE, client=ddb)
    assert read == store.Pointer(version="20260101T000000Z-b", newest="20260101T000000Z-b", users=1, published_at=1)
    assert not store.publish_version(TABLE, "20250101T000000Z-a", users=1, client=ddb)
    assert store.roll_back_pointer(TABLE, "20250101T000000Z-a", read=read, users=1, client=ddb)
    assert store.read_pointer(TABLE, client=ddb).newest == "20260101T000000Z-b"
    assert not store.roll_back_pointer(TABLE, "20240101T000000Z-z", read=read, users=1, client=ddb)
    assert store.publish_version(TABLE, "20270101T000000Z-c", users=1, client=ddb)


def test_unprocessed_items_are_retried():
    calls = []

    class Throttled:
        def batch_write_item(self, RequestItems):
            calls.append(len(RequestItems["t"]))
            pending = RequestItems["t"]
            # The first reply leaves three items unprocessed, as DynamoDB does under throttling.
            return {"UnprocessedItems": {"t": pending[:3]}} if len(calls) == 1 else {}

    rows = [store.Recommendation(f"u{i}", ["a"], [1.0]) for i in range(30)]
    written = store.write_recommendations("t", "v1", rows, expires_at=1, client=Throttled(), sleep=lambda s: None)
    assert written == 30
    assert calls == [25, 3, 5]


def test_shards_partition_the_users():
    parts = [stages.shard_users(10, s, 3) for s in range(3)]
    assert np.array_equal(np.concatenate(parts), np.arange(10))
    with pytest.raises(InputDataError):
        stages.shard_users(10, 3, 3)


def test_quality_gate_rejects_a_model_worse_than_its_baseline_or_the_live_one(aws):
    s3, ddb = aws

    def put(run_id, **metrics):
        stages._put_json(BUCKET, f"runs/{run_id}/metrics.json", {"predictor_type": "regressor", **metrics})

    put("20260101T000000Z-live", rmse=0.90, rmse_global_mean=1.10)
    store.publish_version(TABLE, "20260101T000000Z-live", users=1, client=ddb)
    put("20260102T000000Z-bad", rmse=1.30, rmse_global_mean=1.10)
    put("20260103T000000Z-worse", rmse=1.00, rmse_global_mean=1.10)
    put("20260104T000000Z-good", rmse=0.91, rmse_global_mean=1.10)
    bad = stages.quality_gate(BUCKET, "20260102T000000Z-bad", TABLE)
    assert not bad["passed"] and "baseline" in bad["reason"]
    worse = stages.quality_gate(BUCKET, "20260103T000000Z-worse", TABLE)
    assert not worse["passed"] and "live" in worse["reason"]
    assert stages.quality_gate(BUCKET, "20260104T000000Z-good", TABLE)["passed"]


def _manifest(s3, version: str, shard: int, users: list[str], *, searched: bool = True) -> None:
    """A load's manifest as load_shard leaves it: the shard's recommendations and its searched counts."""
    frame = pd.DataFrame({"user_id": users, "rank": [1] * len(users), "item_id": ["i1"] * len(users),
                          "score": [1.0] * len(users)})
    prefix = contract.version_shard_prefix(version, shard)
    s3.put_object(Bucket=BUCKET, Key=prefix + contract.MANIFEST_RECOMMENDATIONS, Body=frame.to_parquet())
    if searched:
        stages._put_json(BUCKET, prefix + contract.MANIFEST_SEARCHED,
                         {"shard": shard, "users": len(users), "rows": len(users), "users_without_items": []})
    store.write_recommendations(TABLE, version, [store.Recommendation(u, ["i1"], [1.0]) for u in users],
                                expires_at=None, client=stages.dynamodb_client())


def _version_keys(s3) -> list[str]:
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="versions/").get("Contents", []))


def test_retiring_skips_what_is_not_older_than_live_and_cleans_up_half_written_manifests(aws, monkeypatch):
    s3, ddb = aws
    monkeypatch.setenv("TOPX_RETENTION_DAYS", "7")
    old, live, newer = "20260101T000000000000Z-a", "20260201T000000000000Z-b", "20260301T000000000000Z-c"
    _manifest(s3, old, 0, ["u1", "u2"])
    _manifest(s3, old, 1, ["u3"], searched=False)  # a load that died between its two copies
    _manifest(s3, live, 0, ["u1"])
    _manifest(s3, newer, 0, ["u1"])  # still loading
    for version in (old, live):
        stages._put_json(BUCKET, contract.version_metrics_key(version), {"rmse": 1.0})
    s3.put_object(Bucket=BUCKET, Key="versions/notes.txt", Body=b"not the stages'")
    assert store.publish_version(TABLE, live, users=1, client=ddb)

    assert stages.retire_versions(BUCKET, TABLE, 0, 2) == {"manifests": 0, "users": 0}  # all too young
    now = 1e10
    # Load shard 1 takes manifest shard 1, which has no searched file: only its Parquet to delete.
    assert stages.retire_versions(BUCKET, TABLE, 1, 2, now=now) == {"manifests": 0, "users": 0}
    assert f"versions/{old}/shard=0001/part-0.parquet" not in _version_keys(s3)
    assert stages.retire_versions(BUCKET, TABLE, 0, 2, now=now) == {"manifests": 1, "users": 2}

    def expiry(user: str, version: str):
        item = ddb.get_item(TableName=TABLE, Key=store.user_key(user, version))["Item"]
        return int(item["expires_at"]["N"]) if "expires_at" in item else None

    assert expiry("u1", old) == expiry("u2", old) == int(now) + 7 * 86400
    assert expiry("u3", old) is None  # not listed by a complete manifest, so not written again
    assert expiry("u1", live) is None and expiry("u1", newer) is None
    # The retired manifest is kept, marked with its items' expiry, for as long as they may be rolled back to.
    kept = sorted([
        f"versions/{live}/metrics.json", f"versions/{live}/shard=0000/part-0.parquet",
        f"versions/{live}/shard=0000/searched.json", f"versions/{newer}/shard=0000/part-0.parquet",
        f"versions/{newer}/shard=0000/searched.json", "versions/notes.txt",
    ])
    retired = [f"versions/{old}/metrics.json", f"versions/{old}/shard=0000/part-0.parquet",
               f"versions/{old}/shard=0000/retired.json", f"versions/{old}/shard=0000/searched.json"]
    assert _version_keys(s3) == sorted(kept + retired)
    assert stages._get_json(BUCKET, retired[2]) == {"expires_at": int(now) + 7 * 86400}
    # Once the items have expired, one load deletes the manifest, and the next the version's metrics.
    expired = now + 7 * 86400
    assert stages.retire_versions(BUCKET, TABLE, 0, 2, now=expired) == {"manifests": 0, "users": 0}
    assert _version_keys(s3) == sorted([*kept, f"versions/{old}/metrics.json"])
    stages.retire_versions(BUCKET, TABLE, 0, 2, now=expired)
    assert _version_keys(s3) == kept


def test_retiring_stops_at_its_time_budget_and_the_next_call_goes_on(aws, monkeypatch):
    s3, ddb = aws
    old, live = "20260101T000000000000Z-a", "20260201T000000000000Z-b"
    for shard in range(3):
        _manifest(s3, old, shard, [f"u{shard}"])
    assert store.publish_version(TABLE, live, users=1, client=ddb)
    monkeypatch.setattr(stages, "RETIRE_BUDGET_S", -1.0)  # spent before the first manifest
    assert stages.retire_versions(BUCKET, TABLE, 0, 1, now=1e10)["manifests"] == 0
    monkeypatch.setattr(stages, "RETIRE_BUDGET_S", 300.0)
    assert stages.retire_versions(BUCKET, TABLE, 0, 1, now=1e10) == {"manifests": 3, "users": 3}
    assert [key.rpartition("/")[2] for key in _version_keys(s3)] == ["part-0.parquet", "retired.json",
                                                                     "searched.json"] * 3


def test_a_shard_builds_the_seen_items_of_its_own_users_only(tmp_path):
    from topx.dataset import Dataset
    from topx.errors import ArtifactFormatError
    from topx.feature_index import FeatureIndex
    from topx.rundir import INTERACTIONS_FILE, save_interactions, user_range_interactions

    rng = np.random.default_rng(0)
    index = FeatureIndex.one_hot([f"u{i}" for i in range(50)], [f"i{j}" for j in range(30)])
    users, items = rng.integers(0, 50, 400), rng.integers(0, 30, 400)  # repeated pairs among them
    ds = Dataset(index, users, items, np.ones(400, np.float32), True)
    save_interactions(tmp_path, ds, np.zeros(400, bool))
    whole = ds.matrix()
    for chunk in (7, 400, 1 << 22):  # chunks that split the arrays unevenly, exactly, and not at all
        for shard in range(4):
            rows = stages.shard_users(50, shard, 4)
            part = user_range_interactions(tmp_path, int(rows[0]), int(rows[-1]) + 1, 30, data_dir="", chunk=chunk)
            assert part.shape == (len(rows), 30) and (part != whole[rows]).nnz == 0
            assert part.nnz == whole[rows].nnz and part.sum() == whole[rows].sum()
    assert user_range_interactions(tmp_path, 0, 0, 30, data_dir="").shape == (0, 30)

    path = tmp_path / INTERACTIONS_FILE
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ArtifactFormatError, match=f"{INTERACTIONS_FILE}: cannot read the run's interactions"):
        user_range_interactions(tmp_path, 0, 50, 30, data_dir="", chunk=7)


def test_a_pipeline_set_to_faiss_publishes_what_the_exact_default_does(aws, tmp_path, monkeypatch):
    from topx import search

    s3, ddb = aws
    monkeypatch.setenv("TOPX_SEARCH_METHOD", "faiss")  # as the search_method context parameter sets it
    built, real_build_index = [], search.build_index

    def build_index(item_vectors, *, method="exact", **options):
        built.append(method)
        return real_build_index(item_vectors, method=method, **options)

    monkeypatch.setattr(search, "build_index", build_index)
    data = base_ratings(60, 40, seed=13)
    csv = tmp_path / "ratings.csv"
    data.to_csv(csv, index=False)
    s3.upload_file(str(csv), BUCKET, "incoming/ratings.csv")
    run_id = run_pipeline("incoming/ratings.csv")
    metrics = stages._get_json(BUCKET, contract.metrics_key(run_id))
    # The hold-out metrics and every shard ranked with FAISS; nothing fell back to the exact scan.
    assert metrics["search_method"] == "faiss" and set(built) == {"faiss"} and len(built) > 3

    local = tmp_path / "local"
    run_all(DataOptions(str(csv), implicit=True), default_hyperparameters("ranking", num_factors=8, epochs=3),
            RunOptions(top_x=5, progress=False), local)  # search_method="exact", the default
    expected = pd.read_parquet(local / "recommendations.parquet")
    assert expected["user_id"].nunique() == 60
    for user, group in expected.groupby("user_id"):
        rec = store.get_recommendations(TABLE, user, client=ddb)
        assert rec is not None and rec.items == list(group.sort_values("rank")["item_id"]), user
        np.testing.assert_allclose(rec.scores, group.sort_values("rank")["score"], rtol=1e-5)


def test_an_unknown_search_method_is_refused_before_the_shard_reads_anything(monkeypatch):
    from topx.errors import ConfigError

    monkeypatch.setenv("TOPX_SEARCH_METHOD", "annoy")
    with pytest.raises(ConfigError, match="TOPX_SEARCH_METHOD: unknown search method 'annoy'; expected one of "
                                          "exact, faiss, hnsw, ivf"):
        stages.search_shard(BUCKET, "20260101T000000000000Z-a", 0, 2)


def test_a_time_column_set_at_deploy_makes_the_deployed_hold_out_temporal(aws, tmp_path, monkeypatch):
    s3, _ = aws
    data = base_ratings(150, 80, seed=11)
    data["ts"] = 1_700_000_000 + np.random.default_rng(3).permutation(len(data)) * 3600
    data.to_csv(tmp_path / "ratings.csv", index=False)
    s3.upload_file(str(tmp_path / "ratings.csv"), BUCKET, "incoming/ratings.csv")
    monkeypatch.setenv(contract.ENV_DATASET, json.dumps({"time_col": "ts", "since": "2023-11-15"}))

    run_id = run_pipeline("incoming/ratings.csv")
    metrics = stages._get_json(BUCKET, contract.metrics_key(run_id))
    assert metrics["holdout_split"] == "temporal"
    record = stages._get_json(BUCKET, contract.run_record_key(run_id))
    kept = data["ts"] >= pd.Timestamp("2023-11-15", tz="UTC").timestamp()
    assert record["report"]["rows_before_window_dropped"] == int((~kept).sum()) > 0


def test_an_upload_with_a_timestamp_column_trains_with_the_recency_boost_by_default(aws, tmp_path):
    s3, _ = aws
    data = base_ratings(150, 80, seed=13)
    data["timestamp"] = 1_700_000_000 + np.random.default_rng(4).permutation(len(data)) * 3600
    data.to_csv(tmp_path / "ratings.csv", index=False)
    s3.upload_file(str(tmp_path / "ratings.csv"), BUCKET, "incoming/ratings.csv")

    run_id = run_pipeline("incoming/ratings.csv")
    metrics = stages._get_json(BUCKET, contract.metrics_key(run_id))
    assert metrics["holdout_split"] == "temporal" and metrics["recency_boost"] == contract.DEFAULT_RECENCY_BOOST
    assert stages._get_json(BUCKET, contract.run_record_key(run_id))["report"]["time_first"] == "2023-11-14T22:13:20Z"

    s3.put_object(Bucket=BUCKET, Key=contract.DATASET_KEY, Body=b'{"no_time_col": true}')
    run_id = run_pipeline("incoming/ratings.csv")
    metrics = stages._get_json(BUCKET, contract.metrics_key(run_id))
    assert metrics["holdout_split"] == "random" and metrics["recency_boost"] == 0.0
    assert stages._get_json(BUCKET, contract.run_record_key(run_id))["report"]["unused_columns"] == ["timestamp"]


def test_a_run_whose_fallback_list_is_missing_is_not_published(aws, tmp_path):
    s3, ddb = aws
    base_ratings(60, 40, seed=12).to_csv(tmp_path / "ratings.csv", index=False)
    s3.upload_file(str(tmp_path / "ratings.csv"), BUCKET, "incoming/ratings.csv")
    prepared = stages.prepare_run(BUCKET, "incoming/ratings.csv")
    run_id = prepared["run_id"]
    stages.train_run(BUCKET, run_id)
    stages.repackage_run(BUCKET, run_id)
    for shard in prepared["shard_ids"]:
        stages.search_shard(BUCKET, run_id, shard, prepared["shards"])
        stages.load_shard(BUCKET, run_id, shard, TABLE)
    assert store.has_fallback(TABLE, run_id, client=ddb)
    ddb.delete_item(TableName=TABLE, Key=store._typed(contract.fallback_item_key(run_id)))
    with pytest.raises(StoreError, match="its fallback list is not in the table; not publishing"):
        stages.publish_version(BUCKET, run_id, TABLE, prepared["shards"])
    assert store.active_version(TABLE, client=ddb) is None


def test_a_shard_is_loaded_a_batch_of_rows_at_a_time_and_every_user_whole(aws, tmp_path, monkeypatch):
    """Batches of 7 rows cut most users' 5-row lists in two: the load carries a user's first rows over to the
    next batch, so every list in the table is the search's whole list, in rank order."""
    s3, ddb = aws
    monkeypatch.setattr(stages, "LOAD_BATCH_ROWS", 7)
    base_ratings(90, 50, seed=21).to_csv(tmp_path / "ratings.csv", index=False)
    s3.upload_file(str(tmp_path / "ratings.csv"), BUCKET, "incoming/ratings.csv")
    run_id = run_pipeline("incoming/ratings.csv")
    searched = pd.concat([pd.read_parquet(io.BytesIO(s3.get_object(
        Bucket=BUCKET, Key=contract.recommendations_key(run_id, shard))["Body"].read())) for shard in range(3)])
    assert searched["user_id"].nunique() == 90
    for user, group in searched.groupby("user_id"):
        rec = store.get_recommendations(TABLE, user, client=ddb)
        assert rec is not None and rec.items == group.sort_values("rank")["item_id"].tolist(), user


def test_a_shard_file_whose_users_rows_are_apart_is_refused_before_anything_is_written(aws, tmp_path):
    s3, ddb = aws
    run_id, shard = "20260101T000000000000Z-abc", 0
    rows = pd.DataFrame({"user_id": ["a", "a", "b", "a"], "rank": np.array([1, 2, 1, 3], np.int32),
                         "item_id": ["i1", "i2", "i1", "i3"], "score": np.ones(4, np.float32),
                         "cold_user": np.zeros(4, bool)})
    s3.put_object(Bucket=BUCKET, Key=contract.recommendations_key(run_id, shard), Body=_parquet(rows))
    s3.put_object(Bucket=BUCKET, Key=contract.searched_key(run_id, shard),
                  Body=json.dumps({"shard": 0, "users": 2, "rows": 4, "users_without_items": []}))
    with pytest.raises(StoreError, match="a user's rows are not together .3 runs of rows for 2 users.; .*not loading"):
        stages._write_shard(BUCKET, TABLE, run_id, contract.searched_key(run_id, shard),
                            contract.recommendations_key(run_id, shard), [], None)
    # And a count that disagrees with the search's is refused the same way, before any item is written.
    s3.put_object(Bucket=BUCKET, Key=contract.recommendations_key(run_id, shard), Body=_parquet(rows.iloc[:3]))
    with pytest.raises(StoreError, match="2 users and 3 rows, but the search wrote 2 users and 4 rows; not loading"):
        stages._write_shard(BUCKET, TABLE, run_id, contract.searched_key(run_id, shard),
                            contract.recommendations_key(run_id, shard), [], None)
    assert ddb.scan(TableName=TABLE)["Count"] == 0


def test_the_deployed_pipeline_recommends_cold_items_and_serves_cold_users(aws, tmp_path, monkeypatch):
    """Items and users the feature tables list but the interactions do not reach the table: new items in
    lists, and new users with a list of their own, marked cold_user."""
    s3, ddb = aws
    monkeypatch.setenv("TOPX_EPOCHS", "8")
    rng = np.random.default_rng(7)
    rows = [(f"u{u}", f"{'ab'[u % 2]}{i}") for u in range(60) for i in rng.choice(12, size=7, replace=False)]
    pd.DataFrame(rows, columns=["user_id", "item_id"]).to_csv(tmp_path / "plays.csv", index=False)
    items = [(f"{c}{i}", c) for c in "ab" for i in range(12)] + [("new-a", "a"), ("new-b", "b")]
    pd.DataFrame(items, columns=["item_id", "category"]).to_csv(tmp_path / "items.csv", index=False)
    users = [(f"u{u}", "ab"[u % 2]) for u in range(60)] + [("newbie-a", "a")]
    pd.DataFrame(users, columns=["user_id", "taste"]).to_csv(tmp_path / "users.csv", index=False)
    s3.upload_file(str(tmp_path / "items.csv"), BUCKET, contract.feature_table_prefix("items") + "items.csv")
    s3.upload_file(str(tmp_path / "users.csv"), BUCKET, contract.feature_table_prefix("users") + "users.csv")
    s3.upload_file(str(tmp_path / "plays.csv"), BUCKET, "incoming/plays.csv")

    run_id = run_pipeline("incoming/plays.csv")
    newbie = store.get_recommendations(TABLE, "newbie-a", client=ddb)
    assert newbie.cold_user and not newbie.fallback and all(i.startswith(("a", "new-a")) for i in newbie.items)
    lists = [store.get_recommendations(TABLE, f"u{u}", client=ddb) for u in range(60)]
    assert not any(rec.cold_user for rec in lists)
    assert sum("new-a" in rec.items for rec in lists[::2]) >= 0.25 * 30  # beside 5 unseen a-items each
    assert not any("new-b" in rec.items for rec in lists[::2])
    searched = [stages._get_json(BUCKET, contract.searched_key(run_id, s)) for s in range(3)]
    assert sum(s["cold_item_rows"] for s in searched) == sum(rec.items.count("new-a") + rec.items.count("new-b")
                                                             for rec in [*lists, newbie])


def test_the_deployed_pipeline_applies_the_filter_file_and_the_responses(aws, tmp_path):
    s3, ddb = aws
    data = base_ratings(150, 80, seed=11)
    data.to_csv(tmp_path / "ratings.csv", index=False)
    items = sorted(data["item_id"].unique())
    table = pd.DataFrame({"item_id": items, "category": [["a", "b", "c"][i % 3] for i in range(len(items))],
                          "in_stock": ["false" if i % 10 == 0 else "true" for i in range(len(items))]})
    s3.put_object(Bucket=BUCKET, Key="features/items/items.csv", Body=table.to_csv(index=False).encode())
    rules = {"items": {"exclude": [{"column": "in_stock", "equals": False}], "max_per": {"column": "category",
                                                                                        "count": 2}}}
    s3.put_object(Bucket=BUCKET, Key=contract.FILTERS_KEY, Body=json.dumps(rules).encode())
    users = sorted(data["user_id"].unique())
    dismissed = pd.DataFrame({"user_id": users[:20], "item_id": [items[1]] * 20})
    s3.put_object(Bucket=BUCKET, Key=contract.RESPONSES_PREFIX + "2024-05-01.csv",
                  Body=dismissed.to_csv(index=False).encode())
    s3.upload_file(str(tmp_path / "ratings.csv"), BUCKET, "incoming/ratings.csv")

    run_pipeline("incoming/ratings.csv")
    category = dict(zip(table["item_id"], table["category"], strict=True))
    out_of_stock = set(table.loc[table["in_stock"] == "false", "item_id"])
    for user in users:
        rec = store.get_recommendations(TABLE, user, client=ddb)
        assert len(rec.items) == 5 and not set(rec.items) & out_of_stock, user
        assert max(pd.Series([category[i] for i in rec.items]).value_counts()) <= 2, user
        if user in users[:20]:
            assert items[1] not in rec.items, user
    # A user the model has not seen gets the fallback list: the best x of the items the filters let through.
    unknown = store.get_recommendations(TABLE, "nobody", client=ddb)
    assert unknown.fallback and len(unknown.items) == 5 and not set(unknown.items) & out_of_stock, unknown.items

    s3.put_object(Bucket=BUCKET, Key=contract.FILTERS_KEY,
                  Body=json.dumps({"items": {"include": [{"column": "colour", "in": ["red"]}]}}).encode())
    with pytest.raises(ConfigError, match=r"items.include\[0\]: the items table has no column 'colour'"):
        stages.prepare_run(BUCKET, "incoming/ratings.csv")
    bad_list = {"lists": {"summer": {}, "red": {"include": [{"column": "colour", "in": ["red"]}]}}}
    s3.put_object(Bucket=BUCKET, Key=contract.FILTERS_KEY, Body=json.dumps(bad_list).encode())
    with pytest.raises(ConfigError, match=r"lists.red.include\[0\]: the items table has no column 'colour'"):
        stages.prepare_run(BUCKET, "incoming/ratings.csv")


def test_the_deployed_pipeline_serves_named_lists_as_topx_run_writes_them(aws, tmp_path):
    """Each named list of config/filters.json is the exact top-x of its eligible unseen items, as `topx run
    --filters` writes it locally from the same data: read with list_name, under its own keys."""
    s3, ddb = aws
    data = base_ratings(150, 80, seed=11)
    data.to_csv(tmp_path / "ratings.csv", index=False)
    items = sorted(data["item_id"].unique())
    table = pd.DataFrame({"item_id": items, "category": [["a", "b", "c"][i % 3] for i in range(len(items))],
                          "in_stock": ["false" if i % 10 == 0 else "true" for i in range(len(items))],
                          "solo": ["yes" if i == 3 else "no" for i in range(len(items))]})
    table.to_csv(tmp_path / "items.csv", index=False)
    s3.upload_file(str(tmp_path / "items.csv"), BUCKET, "features/items/items.csv")
    rules = {"items": {"exclude": [{"column": "in_stock", "equals": False}]},
             "lists": {"cat-a": {"include": [{"column": "category", "in": ["a"]}]},
                       "mixed": {"max_per": {"column": "category", "count": 1}},
                       "solo": {"include": [{"column": "solo", "equals": "yes"}]}}}
    (tmp_path / "filters.json").write_text(json.dumps(rules))
    s3.upload_file(str(tmp_path / "filters.json"), BUCKET, contract.FILTERS_KEY)
    users = sorted(data["user_id"].unique())
    # The first ten users dismissed the one item of "solo": a list of theirs with nothing left in it.
    pd.DataFrame({"user_id": users[:10], "item_id": [items[3]] * 10}).to_csv(tmp_path / "responses.csv", index=False)
    s3.upload_file(str(tmp_path / "responses.csv"), BUCKET, contract.RESPONSES_PREFIX + "responses.csv")
    s3.upload_file(str(tmp_path / "ratings.csv"), BUCKET, "incoming/ratings.csv")

    run_id = run_pipeline("incoming/ratings.csv")
    local = tmp_path / "local"
    run_all(DataOptions(str(tmp_path / "ratings.csv"), implicit=True, items=str(tmp_path / "items.csv")),
            default_hyperparameters("ranking", num_factors=8, epochs=3),
            RunOptions(top_x=5, progress=False, filters=str(tmp_path / "filters.json"),
                       responses=str(tmp_path / "responses.csv")), local)
    record = stages._get_json(BUCKET, contract.run_record_key(run_id))
    assert [entry["name"] for entry in record["filters"]["lists"]] == ["cat-a", "mixed", "solo"]
    assert stages._get_json(BUCKET, contract.version_record_key(run_id)) == {
        "shards": 3, "users": len(users), "lists": ["cat-a", "mixed", "solo"]}
    empty = 0
    for name, path in ((None, local / "recommendations.parquet"),
                       *((n, local / "lists" / f"{n}.parquet") for n in ("cat-a", "mixed", "solo"))):
        expected = {user: group.sort_values("rank") for user, group in pd.read_parquet(path).groupby("user_id")}
        for user in users:
            rec = store.get_recommendations(TABLE, user, list_name=name, client=ddb)
            assert not rec.fallback, (name, user)
            if user not in expected:  # nothing eligible and unseen is left: an empty list, not the fallback
                assert rec.items == [], (name, user)
                empty += 1
                continue
            assert rec.items == expected[user]["item_id"].tolist(), (name, user)
            np.testing.assert_allclose(rec.scores, expected[user]["score"], rtol=1e-5)
    solo_empty = [u for u in users if not store.get_recommendations(TABLE, u, list_name="solo", client=ddb).items]
    assert set(users[:10]) <= set(solo_empty) and empty == len(solo_empty)
    category = dict(zip(table["item_id"], table["category"], strict=True))
    assert all(category[i] == "a" for u in users
               for i in store.get_recommendations(TABLE, u, list_name="cat-a", client=ddb).items)
    # An unknown user: the fallback list; in a named list, that list's own, x long, of the items it may
    # recommend and at most its cap per category, as `topx run` writes it (lists/<name>.fallback.parquet).
    fallback = pd.read_parquet(local / "fallback.parquet").sort_values("rank")["item_id"].tolist()
    assert store.get_recommendations(TABLE, "nobody", client=ddb).items == fallback
    for name in ("cat-a", "mixed", "solo"):
        own = pd.read_parquet(local / "lists" / f"{name}.fallback.parquet").sort_values("rank")["item_id"].tolist()
        rec = store.get_recommendations(TABLE, "nobody", list_name=name, client=ddb)
        assert rec.fallback and rec.items == own, name
    in_a = store.get_recommendations(TABLE, "nobody", list_name="cat-a", client=ddb).items
    assert len(in_a) == 5 and all(category[i] == "a" and i not in set(items[::10]) for i in in_a)
    mixed = store.get_recommendations(TABLE, "nobody", list_name="mixed", client=ddb).items
    assert sorted(category[i] for i in mixed) == ["a", "b", "c"]
    assert store.get_recommendations(TABLE, "nobody", list_name="solo", client=ddb).items == [items[3]]
    with pytest.raises(store.UnknownList, match=rf"the live version {run_id} has no list 'nope'$"):
        store.get_recommendations(TABLE, users[0], list_name="nope", client=ddb)
    # The client names the lists there are (a Query the reader's credentials make; no function needs it).
    with pytest.raises(store.UnknownList, match=rf"the live version {run_id} has no list 'nope' \(its lists: "
                                                r"cat-a, mixed, solo\)"):
        client.get_recommendations(users[0], list_name="nope", table=TABLE, client=ddb)
    with pytest.raises(store.UnknownList, match="'Summer Books' is not a list name"):
        store.get_recommendations(TABLE, users[0], list_name="Summer Books", client=ddb)
    # The list's items sit under their own sort key; publish counted the users once, from the default list.
    item = ddb.get_item(TableName=TABLE, Key=store.user_key(users[0], f"{run_id}#list=cat-a"))["Item"]
    assert item["sk"]["S"] == f"v#{run_id}#list=cat-a"
    assert store.read_pointer(TABLE, client=ddb).users == len(users)
    manifest = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET,
                                                     Prefix=contract.version_shard_prefix(run_id, 0))["Contents"]]
    assert sorted(k.rpartition("/")[2] for k in manifest) == [
        "list=cat-a.parquet", "list=mixed.parquet", "list=solo.parquet", "part-0.parquet", "searched.json"]


def _run_prefixes(s3) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=contract.RUNS_PREFIX).get("Contents", [])]


def test_the_bucket_dataset_configuration_overrides_the_deployed_one_field_by_field(aws, tmp_path, monkeypatch):
    s3, _ = aws
    data = base_ratings(80, 40, seed=5)
    data["ts"] = 1_700_000_000 + np.arange(len(data)) * 600
    data.rename(columns={"user_id": "customer", "item_id": "sku", "rating": "stars"}).to_csv(
        tmp_path / "orders.csv", index=False)
    s3.upload_file(str(tmp_path / "orders.csv"), BUCKET, "incoming/orders.csv")
    items = pd.DataFrame({"product": sorted(data["item_id"].unique()), "shelf": "a"})
    s3.put_object(Bucket=BUCKET, Key="features/catalogue/items.csv", Body=items.to_csv(index=False).encode())
    monkeypatch.setenv(contract.ENV_DATASET, json.dumps({"user_col": "customer", "item_col": "sku",
                                                         "rating_col": "stars", "time_col": "ts", "since": "1"}))
    s3.put_object(Bucket=BUCKET, Key=contract.DATASET_KEY, Body=json.dumps(
        {"since": None, "objective": "rating", "min_rating": 2, "items": "features/catalogue/items.csv",
         "item_key": "product"}).encode())

    prepared = stages.prepare_run(BUCKET, "incoming/orders.csv")
    record = stages._get_json(BUCKET, contract.run_record_key(prepared["run_id"]))
    assert record["dataset"] == {"user_col": "customer", "item_col": "sku", "rating_col": "stars", "time_col": "ts",
                                 "objective": "rating", "min_rating": 2.0, "items": "features/catalogue/items.csv",
                                 "item_key": "product"}
    assert record["objective"] == "rating" and record["implicit"] is False
    report = record["report"]
    assert report["rows_below_min_rating_dropped"] == int((data["rating"] < 2).sum()) > 0
    assert "rows_before_window_dropped" not in report  # the bucket's null unset the deployed window
    assert report["items_features"]["source"] == f"s3://{BUCKET}/features/catalogue/items.csv"
    assert report["time_first"] == "2023-11-14T22:13:20Z"


@pytest.mark.parametrize(("in_bucket", "in_env", "message"), [
    ({"user_col": 3.5}, None, "config/dataset.json: user_col: expected a column name, or a 0-based position, got 3.5"),
    ({"interactions": "incoming/x.csv"}, None, "config/dataset.json: interactions: the deployment trains on what "
                                               "arrives under incoming/"),
    ({"max_bytes": "1GB"}, None, "config/dataset.json: max_bytes: expected a positive whole number of bytes"),
    ({"half_life_days": 30, "no_time_col": True}, None,
     "config/dataset.json: half_life_days: needs a time column (time_col)"),
    ({"half_life_days": 30}, None, f"half_life_days (--half-life-days) needs a time column, and s3://{BUCKET}/incoming/"
                                   "r.csv has no column 'timestamp': name the time column with time_col (--time-col)"),
    ({"time_col": None, "no_time_col": True}, {"time_col": "ts", "since": "30"},
     "config/dataset.json over TOPX_DATASET: since: needs a time column (time_col)"),
    (None, {"objective": "clicks"}, "TOPX_DATASET: objective: expected one of ranking, rating, got 'clicks'"),
    (b"{not json", None, "config/dataset.json: the dataset configuration is not valid JSON"),
])
def test_a_bad_dataset_configuration_fails_prepare_naming_the_field_before_anything_is_written(
        aws, tmp_path, monkeypatch, in_bucket, in_env, message):
    s3, _ = aws
    base_ratings(40, 20, seed=6).to_csv(tmp_path / "r.csv", index=False)
    s3.upload_file(str(tmp_path / "r.csv"), BUCKET, "incoming/r.csv")
    if in_env is not None:
        monkeypatch.setenv(contract.ENV_DATASET, json.dumps(in_env))
    if in_bucket is not None:
        body = in_bucket if isinstance(in_bucket, bytes) else json.dumps(in_bucket).encode()
        s3.put_object(Bucket=BUCKET, Key=contract.DATASET_KEY, Body=body)
    with pytest.raises(ConfigError, match=re.escape(message)):
        stages.prepare_run(BUCKET, "incoming/r.csv")
    assert _run_prefixes(s3) == []


def test_an_uploads_mode_metadata_holds_where_the_configuration_names_no_objective(aws, tmp_path):
    s3, _ = aws
    base_ratings(40, 20, seed=7).to_csv(tmp_path / "r.csv", index=False)
    s3.upload_file(str(tmp_path / "r.csv"), BUCKET, "incoming/r.csv", ExtraArgs={"Metadata": {"topx-mode": "rating"}})
    run_id = stages.prepare_run(BUCKET, "incoming/r.csv")["run_id"]
    assert stages._get_json(BUCKET, contract.run_record_key(run_id))["objective"] == "rating"
    s3.put_object(Bucket=BUCKET, Key=contract.DATASET_KEY, Body=b'{"objective": "rating"}')
    run_id = stages.prepare_run(BUCKET, "incoming/r.csv")["run_id"]
    assert stages._get_json(BUCKET, contract.run_record_key(run_id))["objective"] == "rating"
    s3.put_object(Bucket=BUCKET, Key=contract.DATASET_KEY, Body=b'{"objective": "ranking"}')
    with pytest.raises(ConfigError, match="metadata topx-mode: 'rating' trains for rating, but the dataset "
                                          "configuration's objective is 'ranking'; drop the metadata"):
        stages.prepare_run(BUCKET, "incoming/r.csv")


def _export(s3, prefix: str, parts: dict[str, bytes]) -> None:
    for name, body in parts.items():
        s3.put_object(Bucket=BUCKET, Key=prefix + name, Body=body)
    s3.put_object(Bucket=BUCKET, Key=prefix + "_SUCCESS", Body=b"")


def _parquet(frame: pd.DataFrame) -> bytes:
    return frame.to_parquet(index=False)


def test_prepare_reads_an_export_prefix_and_names_the_bad_part_of_one(aws):
    s3, _ = aws
    data = base_ratings(60, 30, seed=8)
    thirds = np.array_split(np.arange(len(data)), 3)
    prefix = "incoming/export/"
    _export(s3, prefix, {f"part-{n:05d}.csv": data.iloc[rows].to_csv(index=False).encode()
                         for n, rows in enumerate(thirds)})
    prepared = stages.prepare_run(BUCKET, prefix)
    assert prepared["n_interactions"] == len(data)

    runs_before = _run_prefixes(s3)
    bad = data.iloc[thirds[1]].astype(str)
    bad.iloc[4, bad.columns.get_loc("rating")] = "high"
    s3.put_object(Bucket=BUCKET, Key=prefix + "part-00001.csv", Body=bad.to_csv(index=False).encode())
    with pytest.raises(InputDataError, match=re.escape(f"s3://{BUCKET}/{prefix}part-00001.csv, row 6, column "
                                                       "'rating': rating 'high' is not a number")):
        stages.prepare_run(BUCKET, prefix)

    s3.put_object(Bucket=BUCKET, Key=prefix + "part-00001.csv", Body=_parquet(data.iloc[thirds[1]]))
    with pytest.raises(InputDataError, match=re.escape(f"s3://{BUCKET}/{prefix}part-00001.csv: it is Parquet but "
                                                       f"s3://{BUCKET}/{prefix}part-00000.csv is delimited text")):
        stages.prepare_run(BUCKET, prefix)
    assert _run_prefixes(s3) == runs_before


def test_prepare_refuses_parts_of_other_schemas_and_a_dataset_over_max_bytes(aws):
    s3, _ = aws
    data = base_ratings(60, 30, seed=9)
    halves = np.array_split(np.arange(len(data)), 2)
    prefix = "incoming/glue/"
    first = data.iloc[halves[0]]
    second = data.iloc[halves[1]].assign(item_id=lambda f: f["item_id"].str[1:].astype(int))
    _export(s3, prefix, {"dt=1/part-0.parquet": _parquet(first), "dt=2/part-0.parquet": _parquet(second)})
    with pytest.raises(InputDataError, match=re.escape(
            f"s3://{BUCKET}/{prefix}dt=2/part-0.parquet: its column 'item_id' is integer (int64) but in "
            f"s3://{BUCKET}/{prefix}dt=1/part-0.parquet it is text")):
        stages.prepare_run(BUCKET, prefix)

    s3.put_object(Bucket=BUCKET, Key=prefix + "dt=2/part-0.parquet", Body=_parquet(data.iloc[halves[1]]))
    size = sum(o["Size"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"])
    s3.put_object(Bucket=BUCKET, Key=contract.DATASET_KEY, Body=json.dumps({"max_bytes": size - 1}).encode())
    with pytest.raises(InputDataError, match=re.escape(f"s3://{BUCKET}/{prefix}: the dataset holds {size:,} bytes in "
                                                       f"2 part(s), over max_bytes {size - 1:,}; nothing was read")):
        stages.prepare_run(BUCKET, prefix)
    assert _run_prefixes(s3) == []
    s3.put_object(Bucket=BUCKET, Key=contract.DATASET_KEY, Body=json.dumps({"max_bytes": size}).encode())
    assert stages.prepare_run(BUCKET, prefix)["n_interactions"] == len(data)


def test_the_train_job_searches_its_settings_where_topx_run_would_unless_they_were_set(aws, tmp_path, monkeypatch):
    """The deployed default searches as `topx run`'s does (here on a few rows: the size bounds lowered), and
    says so in metrics.json; a setting of the search's grid in the deployment's hyperparameters leaves it off."""
    import topx.tune

    s3, _ = aws
    monkeypatch.setattr(topx.tune, "AUTO_MIN_ROWS", 0)
    base_ratings(60, 30, seed=4).to_csv(tmp_path / "ratings.csv", index=False)
    s3.upload_file(str(tmp_path / "ratings.csv"), BUCKET, "incoming/ratings.csv")

    def trained() -> dict:
        run_id = stages.prepare_run(BUCKET, "incoming/ratings.csv")["run_id"]
        stages.train_run(BUCKET, run_id)
        return json.loads(s3.get_object(Bucket=BUCKET, Key=contract.metrics_key(run_id))["Body"].read())

    metrics = trained()
    tuning = metrics["tuning"]
    assert tuning["mode"] == "auto" and len(tuning["trials"]) == 6  # topx.tune.AUTO_GRID
    for name, value in tuning["chosen"].items():
        assert metrics["hyperparameters"][name] == value
    monkeypatch.setenv("TOPX_HYPERPARAMETERS", json.dumps({"unobserved_weight": 2.0}))
    metrics = trained()
    assert "tuning" not in metrics and metrics["hyperparameters"]["unobserved_weight"] == 2.0
