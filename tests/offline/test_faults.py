"""Faults injected into the offline pipeline: each run either retries to success or fails without
publishing, and a rerun of the same upload then publishes exactly once.

The faults, and how each is made (all in this process, see docs/LOCAL.md):

- the training job's instance is taken away mid-run: the FM's epoch callback raises the offline layer's
  ``InfrastructureFailure`` (Batch then reports "Host EC2 ... terminated" and no exit code), on the first
  attempt only, then on every attempt: Batch's retry strategy runs it again, Step Functions never does;
- the training job dies mid-run of itself: the callback raises ``SystemExit(137)`` (what a container
  killed by SIGKILL, e.g. out of memory, exits with) or ``SystemExit(2)`` (a TopxError): it runs once;
- a search shard's Fargate Spot task is interrupted once (Batch runs that child again, only it), and a
  shard keeps failing (its entry point raises: it runs once);
- DynamoDB throttles the load: the store's client answers some ``BatchWriteItem`` calls with
  ``UnprocessedItems``, as DynamoDB does when it throttles, then every call;
- a Lambda function runs past its timeout (its timeout set to 1 s, and the offline layer's clock moved
  1.05 s inside the handler, so no outcome depends on the machine's speed): the offline layer reports it
  as Lambda does, ``Sandbox.Timedout``, in Prepare, Load and Publish;
- a crash between the last shard and the pointer flip (Publish raises before its write), and a Publish
  that times out after its write.

Throughout, a reader polls the table: it must never be served an item of a run that did not publish,
and the pointer must never go back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from reliability_stack import SEEDED_VERSION, SHARDS, Reader, Run, Stack, base_ratings, csv_bytes, deployed

from topx import steps
from topx.aws import stages, store
from topx.contract import TOPX_ERROR_EXIT
from topx.offline.execute import InfrastructureFailure

BASE = base_ratings()
UPLOAD = csv_bytes(BASE)
USERS = sorted(BASE["user_id"].unique())
KILLED = 137  # the exit status of a process killed by SIGKILL


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with deployed() as deployed_stack:
        yield deployed_stack


@pytest.fixture()
def live(stack: Stack) -> Iterator[Stack]:
    """The stack with a version live before the fault, and a record of every pointer write."""
    stack.reset()
    stack.seed_live_version(USERS[:20])
    yield stack


@pytest.fixture()
def pointer_writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """(version, whether the conditional write moved the pointer) for every publish attempt."""
    writes: list[tuple[str, bool]] = []
    real = store.publish_version

    def recorded(table: str, version: str, **kwargs: Any) -> bool:
        moved = real(table, version, **kwargs)
        writes.append((version, moved))
        return moved

    monkeypatch.setattr(store, "publish_version", recorded)
    return writes


@pytest.fixture()
def fault() -> Iterator[pytest.MonkeyPatch]:
    """Patches that inject a fault; a test undoes them before its rerun (the pointer record stays)."""
    patch = pytest.MonkeyPatch()
    yield patch
    patch.undo()


def failed_cleanly(stack: Stack, run: Run, state: str, error: str, reader: Reader) -> None:
    """The run failed at ``state`` with ``error``, said so, and left readers where they were."""
    failures = [(e.state, e.error) for e in run.failures()]
    assert run.status == "FAILED" and run.error == "PipelineFailed", (run.status, run.error, failures)
    assert (state, error) in failures, failures
    assert run.exited_states()[-1] == "NotifyFailure", run.exited_states()
    assert len(run.notes) == 1, [(n.subject, n.message[-300:]) for n in run.notes]
    (note,) = run.notes
    assert note.subject == "topx: pipeline run failed" and error in note.message, (note.subject, note.message[-500:])
    assert stack.pointer() == SEEDED_VERSION
    assert run.run_id not in reader.served and reader.never_went_back()


def rerun_publishes_once(stack: Stack, writes: list[tuple[str, bool]], key: str = "incoming/ratings.csv") -> Run:
    """Upload the same data again: it succeeds, and the pointer is written once, to it."""
    before, live_before = len(writes), stack.pointer()
    with Reader(stack, USERS) as reader:
        run = stack.upload(key, UPLOAD)
    assert run.status == "SUCCEEDED", (run.error, [n.message[:300] for n in run.notes])
    assert [w for w in writes[before:] if w[1]] == [(run.run_id, True)]
    assert stack.pointer() == run.run_id and stack.versions()[run.run_id] == len(USERS)
    assert reader.never_went_back() and reader.served <= {live_before, run.run_id}
    return run


def batch_attempts(run: Run, state: str) -> list[int | str]:
    """How each Batch attempt of ``state``'s failed job ended (its exit code, or the status reason of one
    that infrastructure ended), as the job description Step Functions received says."""
    (cause,) = [json.loads(event["taskFailedEventDetails"]["cause"]) for event in run.history
                if event.get("taskFailedEventDetails", {}).get("error") == "States.TaskFailed"
                and '"Attempts"' in event["taskFailedEventDetails"].get("cause", "")]
    return [a["Container"].get("ExitCode", a.get("StatusReason")) for a in cause["Attempts"]]


# --------------------------------------------------------------------------- training


def fail_training(monkeypatch: pytest.MonkeyPatch, *, attempts: int | None,
                  fault: Callable[[], BaseException]) -> list[str]:
    """Raise ``fault()`` from the training job after its first epoch, on its first ``attempts`` Batch
    attempts (None: always). Returns AWS_BATCH_JOB_ATTEMPT of every training that started."""
    started: list[str] = []
    real = steps.fit

    def fit(*args: Any, **kwargs: Any) -> Any:
        started.append(os.environ["AWS_BATCH_JOB_ATTEMPT"])
        if attempts is None or len(started) <= attempts:
            def die(record: dict[str, float]) -> None:
                raise fault()

            kwargs["on_epoch"] = die
        return real(*args, **kwargs)

    monkeypatch.setattr(steps, "fit", fit)
    return started


def test_a_training_job_whose_instance_is_reclaimed_is_retried_by_batch_and_publishes_once(
        live: Stack, pointer_writes: list[tuple[str, bool]], fault: pytest.MonkeyPatch) -> None:
    started = fail_training(fault, attempts=1, fault=InfrastructureFailure)
    with Reader(live, USERS) as reader:
        run = live.upload("incoming/ratings.csv", UPLOAD)

    assert run.status == "SUCCEEDED"
    assert started == ["1", "2"] and run.attempts("Train") == 1  # Batch's second attempt, one task
    assert pointer_writes == [(run.run_id, True)]
    assert reader.served <= {SEEDED_VERSION, run.run_id} and reader.never_went_back()
    rerun_publishes_once(live, pointer_writes)


def test_a_training_job_reclaimed_on_every_attempt_fails_without_publishing(
        live: Stack, pointer_writes: list[tuple[str, bool]], fault: pytest.MonkeyPatch) -> None:
    started = fail_training(fault, attempts=None, fault=InfrastructureFailure)
    with Reader(live, USERS) as reader:
        run = live.upload("incoming/ratings.csv", UPLOAD)

    failed_cleanly(live, run, "Train", "States.TaskFailed", reader)
    reclaimed = InfrastructureFailure().status_reason
    assert started == ["1", "2"] and batch_attempts(run, "Train") == [reclaimed, reclaimed]
    assert run.attempts("Train") == 1
    assert not any(key.startswith(f"runs/{run.run_id}/model/") for key in object_keys(live))
    assert pointer_writes == [] and live.versions() == {SEEDED_VERSION: 20}
    fault.undo()
    rerun_publishes_once(live, pointer_writes)


@pytest.mark.parametrize("exit_code", [KILLED, TOPX_ERROR_EXIT], ids=["killed", "topx_error"])
def test_a_training_job_that_fails_of_itself_runs_once(
        live: Stack, pointer_writes: list[tuple[str, bool]], fault: pytest.MonkeyPatch, exit_code: int) -> None:
    """A crash, an out-of-memory kill or bad data fails the same way again: neither Batch nor Step
    Functions trains a second time."""
    started = fail_training(fault, attempts=None, fault=lambda: SystemExit(exit_code))
    with Reader(live, USERS) as reader:
        run = live.upload("incoming/ratings.csv", UPLOAD)

    failed_cleanly(live, run, "Train", "States.TaskFailed", reader)
    assert started == ["1"] and batch_attempts(run, "Train") == [exit_code] and run.attempts("Train") == 1
    assert pointer_writes == []


def object_keys(stack: Stack) -> list[str]:
    pages = stack.s3.get_paginator("list_objects_v2").paginate(Bucket=stack.pipeline.bucket)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


# --------------------------------------------------------------------------- search


def searched_shards(monkeypatch: pytest.MonkeyPatch, fails: Callable[[int, int], BaseException | None]) -> list[int]:
    """Record every search child's shard, raising ``fails(shard, its earlier runs)`` where not None."""
    real, calls = stages.search_shard, []

    def search_shard(bucket: str, run_id: str, shard: int, shards: int) -> dict[str, Any]:
        error = fails(shard, calls.count(shard))
        calls.append(shard)
        if error is not None:
            raise error
        return real(bucket, run_id, shard, shards)

    monkeypatch.setattr(stages, "search_shard", search_shard)
    return calls


def test_a_search_child_whose_spot_task_is_interrupted_is_run_again_alone(
        live: Stack, pointer_writes: list[tuple[str, bool]], fault: pytest.MonkeyPatch) -> None:
    interrupted = InfrastructureFailure("Your Spot Task was interrupted.")
    calls = searched_shards(fault, lambda shard, before: interrupted if (shard, before) == (1, 0) else None)
    with Reader(live, USERS) as reader:
        run = live.upload("incoming/ratings.csv", UPLOAD)

    assert run.status == "SUCCEEDED" and run.attempts("Search") == 1
    assert sorted(calls) == sorted([*range(SHARDS), 1])  # shard 1 twice, every other shard once
    assert pointer_writes == [(run.run_id, True)] and reader.never_went_back()


def test_a_search_shard_that_keeps_failing_fails_the_run_and_its_other_shards_stay_unread(
        live: Stack, pointer_writes: list[tuple[str, bool]], fault: pytest.MonkeyPatch) -> None:
    calls = searched_shards(fault, lambda shard, before: MemoryError("Cannot allocate memory") if shard == 1 else None)
    with Reader(live, USERS) as reader:
        run = live.upload("incoming/ratings.csv", UPLOAD)

    failed_cleanly(live, run, "Search", "States.TaskFailed", reader)
    assert run.attempts("Search") == 1 and calls.count(1) == 1  # a failure of its own: never run again
    written = [k for k in object_keys(live) if k.startswith(f"runs/{run.run_id}/recommendations/")]
    assert f"runs/{run.run_id}/recommendations/shard=0000/part-0.parquet" in written
    assert f"runs/{run.run_id}/recommendations/shard=0001/part-0.parquet" not in written
    assert run.run_id not in live.versions() and pointer_writes == []
    fault.undo()
    rerun_publishes_once(live, pointer_writes)


# --------------------------------------------------------------------------- DynamoDB throttling


def throttle(monkeypatch: pytest.MonkeyPatch, stack: Stack, *, every_call: bool) -> list[int]:
    """Make the store's client leave items unprocessed, as a throttled BatchWriteItem does: half of
    every other request (or all of every request). Returns the size of each request."""
    client = stages.dynamodb_client()
    real = client.batch_write_item
    table = stack.pipeline.table
    calls: list[int] = []

    def batch_write_item(**kwargs: Any) -> dict[str, Any]:
        requests = kwargs["RequestItems"][table]
        calls.append(len(requests))
        if every_call:
            return {"UnprocessedItems": {table: requests}}
        if len(calls) % 2 == 1 and len(requests) > 1:
            done, deferred = requests[: len(requests) // 2], requests[len(requests) // 2:]
            real(RequestItems={table: done})
            return {"UnprocessedItems": {table: deferred}}
        return real(**kwargs)

    monkeypatch.setattr(client, "batch_write_item", batch_write_item)
    return calls


def test_throttled_writes_are_retried_and_every_user_is_loaded(
        live: Stack, pointer_writes: list[tuple[str, bool]], fault: pytest.MonkeyPatch) -> None:
    calls = throttle(fault, live, every_call=False)
    run = live.upload("incoming/ratings.csv", UPLOAD)

    assert run.status == "SUCCEEDED"
    assert len(calls) > 2 * len(USERS) // 25  # deferred items were sent again
    assert live.versions()[run.run_id] == len(USERS)
    assert pointer_writes == [(run.run_id, True)]
    fault.undo()
    rerun_publishes_once(live, pointer_writes)


def test_throttling_that_does_not_end_fails_the_load_and_nothing_is_published(
        live: Stack, pointer_writes: list[tuple[str, bool]], fault: pytest.MonkeyPatch) -> None:
    throttle(fault, live, every_call=True)
    # The store's backoff is real; only its waits are removed here, so the test takes no seconds.
    fault.setattr(store.random, "uniform", lambda low, high: 0.0)
    with Reader(live, USERS) as reader:
        run = live.upload("incoming/ratings.csv", UPLOAD)

    failed_cleanly(live, run, "LoadShard", "StoreError", reader)
    assert "unprocessed after 8 attempts" in run.notes[0].message, run.notes[0].message[-500:]
    assert pointer_writes == []
    fault.undo()
    rerun_publishes_once(live, pointer_writes)


# --------------------------------------------------------------------------- Lambda timeouts


def set_timeout(stack: Stack, handler: str, seconds: int) -> None:
    boto3.client("lambda").update_function_configuration(FunctionName=stack.pipeline.function_arns[handler],
                                                         Timeout=seconds)


def slower(monkeypatch: pytest.MonkeyPatch, stack: Stack, handler: str, stage: str, *, times: int | None,
           after: bool = False) -> list[Any]:
    """Make ``stages.<stage>`` outlast a 1-second timeout of function ``handler``, the first ``times``
    calls (None: every call), before its work or ``after`` it (the ``timeouts`` fixture restores it).
    The handler's time is the stack's manual clock, moved 1.05 s: the other calls take no time at all."""
    real: Callable[..., Any] = getattr(stages, stage)
    calls: list[Any] = []

    def slow(*args: Any) -> Any:
        calls.append(args)
        late = times is None or len(calls) <= times
        if late and not after:
            stack.clock.advance(1.05)
        result = real(*args)
        if late and after:
            stack.clock.advance(1.05)
        return result

    set_timeout(stack, handler, 1)
    monkeypatch.setattr(stages, stage, slow)
    return calls


@pytest.fixture()
def timeouts(live: Stack) -> Iterator[Stack]:
    yield live
    for handler in ("prepare", "load_shard", "publish"):
        set_timeout(live, handler, 900)


def test_a_load_that_times_out_is_retried_and_the_run_publishes(
        timeouts: Stack, pointer_writes: list[tuple[str, bool]], fault: pytest.MonkeyPatch) -> None:
    calls = slower(fault, timeouts, "load_shard", "load_shard", times=1)
    run = timeouts.upload("incoming/ratings.csv", UPLOAD)

    assert run.status == "SUCCEEDED"
    assert [(e.state, e.error) for e in run.failures()] == [("LoadShard", "Sandbox.Timedout")]
    assert len(calls) == 3  # two shards, one of them twice
    assert timeouts.versions()[run.run_id] == len(USERS) and pointer_writes == [(run.run_id, True)]
    fault.undo()
    rerun_publishes_once(timeouts, pointer_writes)


def test_a_prepare_that_times_out_fails_the_run_without_a_retry(
        timeouts: Stack, pointer_writes: list[tuple[str, bool]], fault: pytest.MonkeyPatch) -> None:
    slower(fault, timeouts, "prepare", "prepare_run", times=None)
    with Reader(timeouts, USERS) as reader:
        run = timeouts.upload("incoming/ratings.csv", UPLOAD)

    failed_cleanly(timeouts, run, "Prepare", "Sandbox.Timedout", reader)
    assert run.attempts("Prepare") == 1 and "Task timed out after 1.00 seconds" in run.notes[0].message
    fault.undo()
    rerun_publishes_once(timeouts, pointer_writes)


# --------------------------------------------------------------------------- around the pointer flip


def test_a_crash_between_the_last_shard_and_the_pointer_flip_publishes_nothing(
        live: Stack, pointer_writes: list[tuple[str, bool]], fault: pytest.MonkeyPatch) -> None:
    def crash(*args: Any, **kwargs: Any) -> bool:
        raise ConnectionResetError("Connection reset by peer")

    fault.setattr(store, "publish_version", crash)
    with Reader(live, USERS) as reader:
        run = live.upload("incoming/ratings.csv", UPLOAD)

    failed_cleanly(live, run, "Publish", "ConnectionResetError", reader)
    assert live.versions()[run.run_id] == len(USERS)  # every shard was loaded, and none is read
    fault.undo()
    rerun_publishes_once(live, pointer_writes)


def test_a_publish_that_times_out_after_its_write_is_retried_and_publishes_once(
        timeouts: Stack, pointer_writes: list[tuple[str, bool]], fault: pytest.MonkeyPatch) -> None:
    slower(fault, timeouts, "publish", "publish_version", times=1, after=True)
    run = timeouts.upload("incoming/ratings.csv", UPLOAD)

    assert run.status == "SUCCEEDED"
    assert [(e.state, e.error) for e in run.failures()] == [("Publish", "Sandbox.Timedout")]
    # The first attempt moved the pointer; the retry found it there and said so.
    assert pointer_writes == [(run.run_id, True), (run.run_id, False)]
    report = f"s3://{run.output['prepare']['bucket']}/runs/{run.run_id}/report.html"
    published = dict(run.output["publish"]["result"])
    assert set(published.pop("quality")) >= {"x"}  # the model's hold-out quality, for CloudWatch (tests/aws)
    assert published == {"run_id": run.run_id, "published": True, "users": len(USERS), "already_live": True,
                         "report": report}
    (note,) = run.notes
    assert note.subject == "topx: new recommendations published"
    fault.undo()
    rerun_publishes_once(timeouts, pointer_writes)
