"""The quality gate, concurrent runs and the lifetime of versions, on the offline pipeline.

- A model worse than its baseline, than a configured threshold, or clearly worse than the live model
  is not published, and the notification says why; a diverging training configuration is refused so.
- Two runs never interleave their publishes: the pointer moves only to a newer run id (ids begin with
  the UTC time Prepare started), and a run that finishes after a newer one published fails with
  ``VersionSuperseded`` instead of going live.
- Loads write no TTL, so the live version never expires; later loads give superseded and never
  published versions their TTL (docs/RELIABILITY.md, "Versions and TTL").
- ``topx rollback`` moves the pointer back to an earlier complete version, which readers then get whole and
  which never expires while live; the next newer run publishes past it.
"""

from __future__ import annotations

import html
import json
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto.awslambda_simple.models import LambdaSimpleBackend
from reliability_stack import (
    RETENTION_DAYS,
    SEEDED_VERSION,
    SHARDS,
    Reader,
    Stack,
    base_ratings,
    csv_bytes,
    deployed,
)

from topx.aws import client, stages, store
from topx.cli import main
from topx.contract import (
    ENV_EPOCHS,
    ENV_HYPERPARAMETERS,
    ENV_MAX_RMSE,
    ENV_NUM_FACTORS,
    report_key,
    version_metrics_key,
    version_prefix,
)
from topx.errors import ConfigError

BASE = base_ratings()
UPLOAD = csv_bytes(BASE)
USERS = sorted(BASE["user_id"].unique())
# The gate cases about RMSE need a rating regressor: the upload says so, as `topx upload --objective rating` does.
RATING = {"topx-mode": "rating"}
DIVERGING = json.dumps({"factors_lr": 1e5, "linear_lr": 1e5, "factors_init_sigma": 1e5})


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with deployed() as deployed_stack:
        yield deployed_stack


@pytest.fixture()
def live(stack: Stack) -> Stack:
    stack.reset()
    stack.seed_live_version(USERS[:20])
    return stack


def rejected_and_untouched(stack: Stack, run, reason: str) -> None:
    assert run.status == "FAILED" and run.error == "QualityGateRejected"
    assert run.exited_states()[-3:] == ["GateChoice", "ReportRejected", "NotifyRejected"]
    (note,) = run.notes
    assert note.subject == "topx: model rejected by the quality gate"
    assert f"topx run {run.run_id} was not published: " in note.message and reason in note.message, note.message
    # The refused model's report says why, and the notification names it.
    uri = f"s3://{stack.pipeline.bucket}/{report_key(run.run_id)}"
    assert f"Report: {uri}." in note.message
    page = stack.s3.get_object(Bucket=stack.pipeline.bucket, Key=report_key(run.run_id))["Body"].read().decode()
    assert "The quality gate refused this model" in page and 'data-verdict="bad"' in page
    assert html.escape(reason, quote=False) in page
    assert stack.pointer() == SEEDED_VERSION and run.run_id not in stack.versions()


# --------------------------------------------------------------------------- the quality gate


def test_a_diverging_training_configuration_is_not_published(live: Stack) -> None:
    run = live.upload("incoming/ratings.csv", UPLOAD, {"topx-hyperparameters": DIVERGING, **RATING})

    rejected_and_untouched(live, run, "is worse than the baseline's")
    metrics = live.run_json(run.run_id, "metrics.json")
    assert metrics["hyperparameters"]["factors_lr"] == 1e5  # the upload's setting reached the training


def test_a_refused_model_whose_report_fails_is_still_refused_and_says_so(live: Stack,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> dict:
        raise OSError("No space left on device")

    monkeypatch.setattr(stages, "report_run", broken)
    run = live.upload("incoming/ratings.csv", UPLOAD, {"topx-hyperparameters": DIVERGING, **RATING})

    assert run.status == "FAILED" and run.error == "QualityGateRejected"
    assert run.exited_states()[-4:] == ["GateChoice", "ReportRejected", "NoRejectedReport", "NotifyRejected"]
    (note,) = run.notes
    assert "Report: none (see the ReportRejected state's error)." in note.message
    assert live.pointer() == SEEDED_VERSION


def test_a_configured_threshold_rejects_a_model_that_beats_its_baseline(live: Stack) -> None:
    functions = boto3.client("lambda")
    gate = live.pipeline.function_arns["quality_gate"]
    variables = functions.get_function_configuration(FunctionName=gate)["Environment"]["Variables"]
    functions.update_function_configuration(FunctionName=gate,
                                            Environment={"Variables": {**variables, ENV_MAX_RMSE: "0.5"}})
    try:
        run = live.upload("incoming/ratings.csv", UPLOAD, RATING)
    finally:
        functions.update_function_configuration(FunctionName=gate, Environment={"Variables": variables})

    rejected_and_untouched(live, run, f"is above the threshold {ENV_MAX_RMSE}=0.5")
    metrics = live.run_json(run.run_id, "metrics.json")
    assert metrics["rmse"] < metrics["rmse_global_mean"]  # it beat its baseline: the threshold decided


def test_a_model_clearly_worse_than_the_live_one_is_not_published(live: Stack) -> None:
    first = live.upload("incoming/ratings.csv", UPLOAD, RATING)
    assert first.status == "SUCCEEDED"
    # The live model was better than this data can make one (e.g. trained on a cleaner export):
    # its recorded hold-out RMSE is planted at 0.8.
    # The run's own files have expired by the bucket's lifecycle rule since; the copy kept when it
    # published (versions/) is what the gate reads.
    metrics = live.run_json(first.run_id, "metrics.json")
    live.s3.delete_object(Bucket=live.pipeline.bucket, Key=f"runs/{first.run_id}/metrics.json")
    live.s3.put_object(Bucket=live.pipeline.bucket, Key=version_metrics_key(first.run_id),
                       Body=json.dumps({**metrics, "rmse": 0.8}).encode())
    before = live.view(USERS[:10])

    run = live.upload("incoming/ratings.csv", UPLOAD, RATING)

    assert run.status == "FAILED" and run.error == "QualityGateRejected"
    (note,) = run.notes
    assert f"is clearly worse than the live model's 0.8000 ({first.run_id})" in note.message
    assert live.view(USERS[:10]) == before


def test_non_finite_metrics_never_pass_and_the_reply_stays_json(live: Stack) -> None:
    for value in (math.nan, math.inf):
        run_id = f"20260101T000000000000Z-{value}"
        stages._put_json(live.pipeline.bucket, f"runs/{run_id}/metrics.json",
                         {"predictor_type": "regressor", "top_x": 3, "rmse": value, "rmse_global_mean": 1.0})
        verdict = stages.quality_gate(live.pipeline.bucket, run_id, live.pipeline.table)
        assert not verdict["passed"] and "not a finite number: the training diverged" in verdict["reason"]
        json.dumps(verdict, allow_nan=False)  # Step Functions reads the reply as strict JSON


def test_training_settings_follow_one_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_EPOCHS, "5")
    monkeypatch.setenv(ENV_NUM_FACTORS, "6")
    assert stages.training_hyperparameters(False, {}).epochs == 5
    monkeypatch.setenv(ENV_HYPERPARAMETERS, '{"epochs": 7, "factors_lr": 0.01}')
    hp = stages.training_hyperparameters(True, {})
    assert (hp.epochs, hp.num_factors, hp.factors_lr, hp.predictor_type) == (7, 6, 0.01, "binary_classifier")
    assert stages.training_hyperparameters(True, {"epochs": 9}).epochs == 9  # the upload's own setting wins
    for bad, message in (("{", "not JSON"), ("[1]", "JSON object"), ('{"predictor_type": "regressor"}', "follows"),
                         ('{"epochs": 0}', "positive integer")):
        monkeypatch.setenv(ENV_HYPERPARAMETERS, bad)
        with pytest.raises(ConfigError, match=message):
            stages.training_hyperparameters(False, {})


# --------------------------------------------------------------------------- concurrent runs


def prepared_and_loaded(stack: Stack, key: str) -> dict:
    """Run every stage of one run up to Publish, by hand."""
    bucket, table = stack.pipeline.bucket, stack.pipeline.table
    stack.s3.put_object(Bucket=bucket, Key=f"manual/{key}", Body=UPLOAD)
    prepared = stages.prepare_run(bucket, f"manual/{key}")
    run_id = prepared["run_id"]
    stages.train_run(bucket, run_id)
    stages.repackage_run(bucket, run_id)
    for shard in prepared["shard_ids"]:
        stages.search_shard(bucket, run_id, shard, prepared["shards"])
    for shard in prepared["shard_ids"]:
        stages.load_shard(bucket, run_id, shard, table)
    return prepared


def test_an_older_run_that_publishes_last_does_not_go_live_and_says_so(live: Stack,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in live.pipeline_environment().items():
        monkeypatch.setenv(name, value)
    older = prepared_and_loaded(live, "a.csv")
    newer = prepared_and_loaded(live, "b.csv")
    assert older["run_id"] < newer["run_id"]
    bucket, table = live.pipeline.bucket, live.pipeline.table

    assert stages.publish_version(bucket, newer["run_id"], table, newer["shards"])["published"]
    with pytest.raises(stages.VersionSuperseded, match=f"the live version {newer['run_id']} is newer"):
        stages.publish_version(bucket, older["run_id"], table, older["shards"])
    assert live.pointer() == newer["run_id"]
    assert store.get_recommendations(table, USERS[0], client=live.ddb).items == live_items(live, newer["run_id"])
    # Publishing the live run again changes nothing and says it was already live.
    again = stages.publish_version(bucket, newer["run_id"], table, newer["shards"])
    # (Its stages were called one by one here, without the Report state: the reply says no report was written.)
    assert set(again.pop("quality")) >= {"x"}  # the model's hold-out quality, for CloudWatch (tests/aws)
    assert again == {"run_id": newer["run_id"], "published": True, "users": len(USERS), "already_live": True,
                     "report": f"none: s3://{bucket}/runs/{newer['run_id']}/report.html was not written "
                               "(see the Report state's error)"}


def live_items(stack: Stack, version: str) -> list[str]:
    item = stack.ddb.get_item(TableName=stack.pipeline.table, Key=store.user_key(USERS[0], version))["Item"]
    return [v["S"] for v in item["items"]["L"]]


def test_a_run_finishing_after_a_newer_version_went_live_fails_with_the_reason(live: Stack) -> None:
    newer = "29991231T000000000000Z-newer"
    store.write_recommendations(live.pipeline.table, newer, [store.Recommendation(u, ["i-new"], [1.0]) for u in USERS],
                                expires_at=int(time.time()) + 86400, client=live.ddb)
    assert store.publish_version(live.pipeline.table, newer, users=len(USERS), client=live.ddb)

    run = live.upload("incoming/ratings.csv", UPLOAD)

    assert run.status == "FAILED" and [(e.state, e.error) for e in run.failures()] == [("Publish", "VersionSuperseded")]
    assert run.attempts("Publish") == 1
    (note,) = run.notes
    assert f"run {run.run_id} was not published: the live version {newer} is newer" in note.message
    assert live.pointer() == newer
    assert store.get_recommendations(live.pipeline.table, USERS[0], client=live.ddb).items == ["i-new"]


@pytest.mark.parametrize("overtaken", [False, True], ids=["in_step", "older_run_overtaken"])
def test_two_uploads_close_together_never_move_the_pointer_back(live: Stack, monkeypatch: pytest.MonkeyPatch,
                                                                 overtaken: bool) -> None:
    """Both executions run at once: the starter never starts two, but an execution started by hand (the
    console, a script) runs beside its run all the same. In step, each publishes in turn. When the older
    one is overtaken (its Publish comes after the newer run's), it fails at Publish with VersionSuperseded:
    later uploads win, and the pointer never goes back.

    Which execution gets ahead is otherwise up to the scheduler, so each ordering is pinned: the run ids
    are recorded as Prepare mints them, and the run that must publish second waits (before its Publish
    function is invoked, outside the one-at-a-time lock the offline runner holds while code runs) until
    the other has published."""
    prepare_run, publish_version = stages.prepare_run, stages.publish_version
    prepared: list[str] = []
    both_prepared = threading.Event()
    published: dict[str, threading.Event] = {}

    def records_run_ids(bucket: str, key: str | None, uploads: Any = None) -> dict:
        result = prepare_run(bucket, key, uploads)
        published[result["run_id"]] = threading.Event()
        prepared.append(result["run_id"])
        if len(prepared) == 2:
            both_prepared.set()
        return result

    def signals(bucket: str, run_id: str, table: str, expected_shards: int) -> dict:
        try:
            return publish_version(bucket, run_id, table, expected_shards)
        finally:
            published[run_id].set()

    monkeypatch.setattr(stages, "prepare_run", records_run_ids)
    monkeypatch.setattr(stages, "publish_version", signals)
    invoke = LambdaSimpleBackend.invoke
    publish_arn = live.pipeline.function_arns["publish"]
    second, first = (min, max) if overtaken else (max, min)

    def publishes_second(backend: Any, function_name: str, qualifier: str | None, body: Any, *rest: Any) -> bytes:
        function_arn = backend.get_function(function_name, qualifier).function_arn
        if function_arn == publish_arn:
            assert both_prepared.wait(60), "the second upload was never prepared"
            if json.loads(body)["run_id"] == second(prepared):
                assert published[first(prepared)].wait(60), "the run that publishes first never published"
        return invoke(backend, function_name, qualifier, body, *rest)

    monkeypatch.setattr(LambdaSimpleBackend, "invoke", publishes_second)
    with Reader(live, USERS) as reader:
        arns = [live.start_by_hand(key, UPLOAD) for key in ("incoming/monday.csv", "incoming/tuesday.csv")]
        older, newer = sorted((live.wait(arn) for arn in arns), key=lambda run: run.run_id)

    assert newer.status == "SUCCEEDED" and live.pointer() == newer.run_id
    if overtaken:
        assert older.status == "FAILED"
        assert [(e.state, e.error) for e in older.failures()] == [("Publish", "VersionSuperseded")]
        (note,) = [n for n in older.notes + newer.notes if n.subject == "topx: pipeline run failed"]
        assert f"the live version {newer.run_id} is newer" in note.message
    else:
        assert older.status == "SUCCEEDED"
    assert reader.never_went_back()
    assert reader.served <= {SEEDED_VERSION, newer.run_id} | ({older.run_id} if not overtaken else set())


# --------------------------------------------------------------------------- versions and TTL


def test_items_can_be_written_without_an_expiry(live: Stack) -> None:
    store.write_recommendations(live.pipeline.table, "v-no-ttl", [store.Recommendation("u1", ["i1"], [1.0])],
                                expires_at=None, client=live.ddb)
    item = live.ddb.get_item(TableName=live.pipeline.table, Key=store.user_key("u1", "v-no-ttl"))["Item"]
    assert "expires_at" not in item


def expiry_by_version(stack: Stack) -> dict[str, set[int | None]]:
    expiry: dict[str, set[int | None]] = {}
    for item in stack.items():
        if "version" in item and item["pk"]["S"] != "pointer":
            expiry.setdefault(item["version"]["S"], set()).add(int(item["expires_at"]["N"]) if "expires_at" in
                                                              item else None)
    return expiry


def version_objects(stack: Stack, version: str) -> list[str]:
    reply = stack.s3.list_objects_v2(Bucket=stack.pipeline.bucket, Prefix=version_prefix(version))
    return [o["Key"] for o in reply.get("Contents", [])]


def retired_shards(stack: Stack, version: str) -> set[int]:
    """The expiries the version's retired manifests are marked with, one per shard retired."""
    objects = version_objects(stack, version)
    shards = {key.rpartition("/")[0] for key in objects if "/shard=" in key}
    marked = [key for key in objects if key.endswith("/retired.json")]
    assert len(marked) in (0, len(shards)) and len(shards) in (0, SHARDS), objects
    return {json.loads(stack.s3.get_object(Bucket=stack.pipeline.bucket, Key=key)["Body"].read())["expires_at"]
            for key in marked}


def test_only_superseded_versions_expire(live: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loads write no TTL, so the live version never expires however long no run publishes. The next
    load after a version was superseded gives its items their TTL and forgets its manifest."""
    monkeypatch.setattr(stages, "RETIRE_AFTER_S", 0)
    first = live.upload("incoming/ratings.csv", UPLOAD)
    second = live.upload("incoming/ratings.csv", UPLOAD)
    assert first.status == second.status == "SUCCEEDED"
    expiry = expiry_by_version(live)
    # The first was superseded when the second published after its own load: retired at the next load.
    assert expiry[first.run_id] == expiry[second.run_id] == {None}
    assert version_objects(live, first.run_id) and version_objects(live, second.run_id)

    third = live.upload("incoming/ratings.csv", UPLOAD)
    assert third.status == "SUCCEEDED" and live.pointer() == third.run_id
    expiry = expiry_by_version(live)
    assert expiry[second.run_id] == expiry[third.run_id] == {None}, "a version live during the load is kept"
    now = time.time()  # each shard of the third load retired a share, at its own time
    assert all(now + (RETENTION_DAYS - 1) * 86400 < t < now + (RETENTION_DAYS + 1) * 86400 for t in expiry[first.run_id])
    first_items = [i for i in live.items() if i.get("version", {}).get("S") == first.run_id]
    assert len([i for i in first_items if i["pk"]["S"].startswith("user#")]) == len(USERS)
    # Its fallback list (one item, pk "fallback") expires with it: it is among the expiries checked above.
    (fallback,) = [i for i in first_items if i["pk"]["S"] == "fallback"]
    assert "expires_at" in fallback
    # Its manifests are kept until then, each marked with the expiry, so that it can be rolled back to.
    assert retired_shards(live, first.run_id) == expiry[first.run_id]
    # Retired, not deleted: the first version stays readable until its TTL (a reader who followed the
    # pointer just before it moved still finds its items), with what it held.
    assert live_items(live, first.run_id) == live_items(live, third.run_id)


def test_a_manifest_is_retired_only_once_its_load_has_surely_ended(live: Stack,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    first = live.upload("incoming/ratings.csv", UPLOAD)
    second = live.upload("incoming/ratings.csv", UPLOAD)
    third = live.upload("incoming/ratings.csv", UPLOAD)
    assert {first.status, second.status, third.status} == {"SUCCEEDED"}
    # Manifests younger than RETIRE_AFTER_S: the loads left them alone.
    assert expiry_by_version(live)[first.run_id] == {None} and version_objects(live, first.run_id)
    bucket, table = live.pipeline.bucket, live.pipeline.table
    for name, value in live.pipeline_environment().items():
        monkeypatch.setenv(name, value)
    later = time.time() + stages.RETIRE_AFTER_S + 1
    done = [stages.retire_versions(bucket, table, shard, 2, now=later) for shard in range(2)]
    # Two superseded versions of 2 shards each, shared out over the 2 shards, every user once per version.
    assert sum(d["manifests"] for d in done) == 4 and sum(d["users"] for d in done) == 2 * len(USERS)
    expiry = expiry_by_version(live)
    assert None not in expiry[first.run_id] | expiry[second.run_id] and expiry[third.run_id] == {None}
    assert retired_shards(live, first.run_id) == retired_shards(live, second.run_id) == {int(later) + RETENTION_DAYS
                                                                                         * 86400}
    assert version_objects(live, third.run_id) and not retired_shards(live, third.run_id)  # live: kept, unmarked
    # Nothing is left to retire, and repeating is harmless.
    assert stages.retire_versions(bucket, table, 0, 1, now=later) == {"manifests": 0, "users": 0}


def test_a_run_that_loaded_but_never_went_live_is_retired_too(live: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    newer = "29991231T000000000000Z-newer"
    store.write_recommendations(live.pipeline.table, newer, [store.Recommendation(u, ["i-new"], [1.0]) for u in USERS],
                                expires_at=None, client=live.ddb)
    assert store.publish_version(live.pipeline.table, newer, users=len(USERS), client=live.ddb)
    run = live.upload("incoming/ratings.csv", UPLOAD)
    assert [(e.state, e.error) for e in run.failures()] == [("Publish", "VersionSuperseded")]
    assert expiry_by_version(live)[run.run_id] == {None}

    for name, value in live.pipeline_environment().items():
        monkeypatch.setenv(name, value)
    later = time.time() + stages.RETIRE_AFTER_S + 1
    retired = stages.retire_versions(live.pipeline.bucket, live.pipeline.table, 0, 1, now=later)
    assert retired == {"manifests": SHARDS, "users": len(USERS)}
    assert None not in expiry_by_version(live)[run.run_id]
    assert expiry_by_version(live)[newer] == {None}


# --------------------------------------------------------------------------- rollback


def lists_of(stack: Stack, version: str) -> dict[str, list[str]]:
    """Each user's list in ``version``, and the version's fallback list (under "nobody"), read by key."""
    table = stack.pipeline.table
    lists = {u: [v["S"] for v in stack.ddb.get_item(TableName=table, Key=store.user_key(u, version))["Item"]["items"]["L"]]
             for u in USERS}
    fallback = stack.ddb.get_item(TableName=table, Key={"pk": {"S": "fallback"}, "sk": {"S": f"v#{version}"}})["Item"]
    return {**lists, "nobody": [v["S"] for v in fallback["items"]["L"]]}


def served(stack: Stack) -> dict[str, list[str]]:
    """What a reader gets through the pointer, for every user and an unknown one."""
    return {u: store.get_recommendations(stack.pipeline.table, u, client=stack.ddb).items for u in [*USERS, "nobody"]}


def test_a_rollback_serves_an_earlier_version_whole_until_the_next_run_moves_forward(
        live: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Three runs publish in turn, and the third's load retires the first. `topx rollback` goes back to the
    second (the previous complete version), then `--to` the first, whose items lose their expiry again;
    readers get each version whole. The next run publishes past them all, and its load retires the
    versions rolled back from, never the live one."""
    monkeypatch.setattr(stages, "RETIRE_AFTER_S", 0)
    runs = [live.upload("incoming/ratings.csv", UPLOAD) for _ in range(3)]
    assert [run.status for run in runs] == ["SUCCEEDED"] * 3
    first, second, third = (run.run_id for run in runs)
    assert None not in expiry_by_version(live)[first]  # retired by the third run's load
    bucket, table = live.pipeline.bucket, live.pipeline.table
    command = ["rollback", "--table", table, "--bucket", bucket]

    with Reader(live, USERS) as reader:
        assert main(command) == 0
        assert capsys.readouterr().out.startswith(f"rolled back: {second} is live ({len(USERS)} users), in place "
                                                  f"of {third}.")
        assert served(live) == lists_of(live, second)
        assert client.live_version(table=table).rolled_back_from == third
        assert main([*command, "--to", first]) == 0
        assert capsys.readouterr().out.startswith(f"rolled back: {first} is live ({len(USERS)} users), in place "
                                                  f"of {second}; {SHARDS} retired shard(s) of it kept again.")
    named = [p for p in reader.pointers if p is not None]
    assert named == sorted(named, reverse=True) and named[-1] == first  # back, and only back
    assert reader.served <= {first, second, third}
    assert served(live) == lists_of(live, first) and live.pointer() == first
    assert expiry_by_version(live)[first] == {None} and not retired_shards(live, first)

    fourth = live.upload("incoming/ratings.csv", UPLOAD)

    assert fourth.status == "SUCCEEDED" and live.pointer() == fourth.run_id
    assert served(live) == lists_of(live, fourth.run_id)
    expiry = expiry_by_version(live)
    assert expiry[first] == {None}, "the version live during the load is kept"
    assert None not in expiry[second] | expiry[third], "the versions rolled back from are retired"
