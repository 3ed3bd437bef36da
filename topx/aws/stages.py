"""The pipeline's stages on AWS, one function per state of statemachine/pipeline.asl.json.

Each stage reads its inputs from the run's S3 prefix, does its work with the same core functions
the local CLI uses, writes its outputs under the run's prefix, and returns a small JSON-able dict
(Step Functions passes references, not data). The S3 layout, one bucket, is topx/contract.py's: its
functions build every key used here.

``runs/`` expires by the bucket's lifecycle rule; ``versions/`` does not: a version stays live for as
long as no newer run publishes, and its items in DynamoDB carry no TTL until it is superseded.
Retiring (``retire_versions``, run by each load) writes a superseded or never-published version's
items again with ``expires_at``, and deletes its ``versions/`` objects once they have expired; until
then ``rollback_version`` (``topx rollback``, not a state) can make the version live again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from botocore.exceptions import ClientError

from topx.aws import store
from topx.config import HyperParameters, env_or, search_method
from topx.contract import (
    DATASET_KEY,
    DEFAULT_OBJECTIVE,
    DEFAULT_RETENTION_DAYS,
    DEFAULT_SHARDS,
    DEFAULT_TOP_X,
    ENV_DATASET,
    ENV_ENDPOINT_URL,
    ENV_EPOCHS,
    ENV_HYPERPARAMETERS,
    ENV_MAX_RMSE,
    ENV_MIN_AUC,
    ENV_MIN_RECALL,
    ENV_NUM_FACTORS,
    ENV_RETENTION_DAYS,
    ENV_SHARDS,
    ENV_TOP_X,
    FILTERS_KEY,
    FIXED_HYPERPARAMETERS,
    HYPERPARAMETERS_METADATA,
    INCOMING_PREFIX,
    MANIFEST_RECOMMENDATIONS,
    MANIFEST_RETIRED,
    MANIFEST_SEARCHED,
    MIN_SHARDS,
    MODE_METADATA,
    RESPONSES_PREFIX,
    VERSION_OBJECT_RE,
    VERSION_RECORD,
    VERSIONS_PREFIX,
    DatasetConfigError,
    active_data_prefix,
    check_dataset_config,
    fallback_key,
    feature_table_prefix,
    list_file,
    list_version,
    loaded_key,
    manifest_lists,
    metrics_key,
    model_prefix,
    prepared_prefix,
    recommendations_key,
    report_key,
    run_filters_key,
    run_record_key,
    searched_key,
    snapshot_label,
    vectors_prefix,
    vectors_shard_prefix,
    version_metrics_key,
    version_prefix,
    version_record_key,
    version_shard_prefix,
)
from topx.errors import ArtifactFormatError, ConfigError, InputDataError, StoreError
from topx.feature_index import FeatureIndex

logger = logging.getLogger(__name__)

# topx-mode values: what each trains for. Unmarked uploads train for ranking.
MODES = {"ranking": "ranking", "implicit": "ranking", "rating": "rating", "explicit": "rating"}
# A load writes its manifest before its items and runs for at most 15 minutes (the Lambda timeout), so
# a manifest this old belongs to a load that has ended: retiring it cannot race the items' writes.
RETIRE_AFTER_S = 3600
# A load starts retiring no new manifest after this long at it, so that its own items come first and
# the Lambda's 15 minutes are not spent on housekeeping; the next load takes the rest.
RETIRE_BUDGET_S = 300.0
# Within this fraction of the live model's metric a new model still counts as "as good".
LIVE_RMSE_SLACK = 1.05
LIVE_RECALL_SLACK = 0.9


class VersionSuperseded(StoreError):
    """A run that finished after a newer run published: the pointer never goes backwards."""

_clients: dict[str, Any] = {}


def s3_client() -> Any:
    """A lazily created S3 client (tests and the local runner may set one with ``use_clients``)."""
    if "s3" not in _clients:
        import boto3

        _clients["s3"] = boto3.client("s3", endpoint_url=os.environ.get(ENV_ENDPOINT_URL) or None)
    return _clients["s3"]


def dynamodb_client() -> Any:
    if "dynamodb" not in _clients:
        _clients["dynamodb"] = store.dynamodb_client()
    return _clients["dynamodb"]


def use_clients(**clients: Any) -> None:
    """Inject clients (``s3=..., dynamodb=...``); None removes one so it is created again lazily."""
    for name, client in clients.items():
        if client is None:
            _clients.pop(name, None)
        else:
            _clients[name] = client


@contextmanager
def clients_in_use(**clients: Any) -> Iterator[None]:
    """``use_clients`` for the duration of a block, then the clients that were in use before."""
    before = {name: _clients.get(name) for name in clients}
    use_clients(**clients)
    try:
        yield
    finally:
        use_clients(**before)


# ----------------------------------------------------------------------------- S3 helpers


def _upload_dir(local: Path, bucket: str, prefix: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            s3_client().upload_file(str(path), bucket, prefix + path.relative_to(local).as_posix())


def _download_prefix(bucket: str, prefix: str, local: Path) -> int:
    count = 0
    paginator = s3_client().get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            target = local / obj["Key"][len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            s3_client().download_file(bucket, obj["Key"], str(target))
            count += 1
    if count == 0:
        raise StoreError(f"s3://{bucket}/{prefix} holds nothing: an earlier stage did not write it")
    return count


def _get_json(bucket: str, key: str) -> dict[str, Any]:
    try:
        body = s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except s3_client().exceptions.NoSuchKey as exc:
        raise StoreError(f"s3://{bucket}/{key} does not exist") from exc
    return json.loads(body)


def _put_json(bucket: str, key: str, doc: dict[str, Any]) -> None:
    s3_client().put_object(Bucket=bucket, Key=key, Body=json.dumps(doc, sort_keys=True, default=_plain).encode())


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


@contextmanager
def _workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="topx-stage-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _latest_key(bucket: str, prefix: str) -> str | None:
    latest = None
    for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith("/"):
                continue
            if latest is None or (obj["LastModified"], obj["Key"]) > (latest["LastModified"], latest["Key"]):
                latest = obj
    return None if latest is None else latest["Key"]


# ----------------------------------------------------------------------------- stages


def active_data(bucket: str) -> dict[str, Any]:
    """What a run trains on when no key is given: every data object under incoming/ (all increments), or,
    when there are snapshot folders, under the latest one (``topx.contract.active_data_prefix``). Returns
    ``{"prefix", "snapshot", "objects", "bytes", "newest"}``; ``newest`` is the latest data object's key,
    whose metadata (``topx-mode``, ``topx-hyperparameters``) the run takes, as it took a single upload's."""
    from topx.io import is_data_object

    listed = []
    for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=INCOMING_PREFIX):
        listed.extend(page.get("Contents", []))
    prefix = active_data_prefix(obj["Key"] for obj in listed)
    data = [obj for obj in listed if obj["Key"].startswith(prefix)
            and is_data_object(obj["Key"][len(prefix):], int(obj.get("Size", 0)))]
    if not data:
        empty = [obj["Key"] for obj in listed if obj["Key"].startswith(prefix) and not obj["Key"].endswith("/")
                 and int(obj.get("Size", 0)) == 0]
        why = f"{', '.join(empty[:3])}{' ...' if len(empty) > 3 else ''} is empty" if empty else \
            "only markers, or nothing"
        raise InputDataError(f"s3://{bucket}/{prefix} holds no data to train on: {why}")
    newest = max(data, key=lambda obj: (obj["LastModified"], obj["Key"]))
    return {"prefix": prefix, "snapshot": snapshot_label(prefix), "objects": len(data),
            "bytes": sum(int(obj.get("Size", 0)) for obj in data), "newest": newest["Key"],
            "newest_etag": newest.get("ETag", "")}


def prepare_run(bucket: str, key: str | None, uploads: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Validate the data (under ``key``, an object or a prefix; when None, ``active_data``), index it, mint a
    run id. ``uploads``, what the starter started the run for, goes into the run record as it is."""
    from topx.dataset import data_options, key_column, load_dataset
    from topx.rundir import save_interactions
    from topx.steps import RunOptions

    # The dataset configuration first: a bad one fails the run before any data is read.
    dataset = dataset_config(bucket)
    inputs = None
    if key is None:
        inputs = active_data(bucket)
        key = inputs.pop("prefix")
        head = s3_client().head_object(Bucket=bucket, Key=inputs["newest"])
        etag = f"{inputs['newest']}@{inputs.pop('newest_etag')}#{inputs['objects']}"
    else:
        # A key ending in "/" names a prefix of part files (topx.io.dataset_parts): it has no metadata of its own.
        head = {} if key.endswith("/") else s3_client().head_object(Bucket=bucket, Key=key)
        etag = head.get("ETag", "")
    # Metadata comes from the one object named, or from the newest data object of the data read.
    described = f"s3://{bucket}/{inputs['newest'] if inputs else key}"
    objective = _objective(head, described, dataset.get("objective"))
    implicit = objective == "ranking"
    overrides = _metadata_hyperparameters(head, described)
    options = data_options({**dataset, "objective": objective, "interactions": f"s3://{bucket}/{key}",
                            "users": _feature_table(bucket, "users", dataset.get("users")),
                            "items": _feature_table(bucket, "items", dataset.get("items"))})
    ds = load_dataset(options)
    # The filter file and the responses, checked and resolved now: a bad rule fails the run here, before
    # anything trains, and every shard applies what this run saw.
    filters = _prepared_filters(bucket, options, ds)
    digest = hashlib.sha256(f"{bucket}/{key}@{etag}".encode()).hexdigest()[:10]
    run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}-{digest}"
    asked = int(env_or(ENV_SHARDS, None, DEFAULT_SHARDS, int))
    shards = max(MIN_SHARDS, min(asked, max(ds.feature_index.n_users, 1)))
    # The same seeded hold-out that training draws (RunOptions/HyperParameters defaults).
    holdout = ds.holdout(RunOptions().holdout, HyperParameters().seed)
    with _workdir() as work:
        ds.feature_index.save(work / "prepared")
        save_interactions(work / "prepared", ds, holdout)
        _upload_dir(work / "prepared", bucket, prepared_prefix(run_id))
        if filters is not None:
            np.savez_compressed(work / "filters.npz", **filters)
            s3_client().upload_file(str(work / "filters.npz"), bucket, run_filters_key(run_id))
    _put_json(bucket, run_record_key(run_id), {"source": f"s3://{bucket}/{key}", "inputs": inputs,
                                               "uploads": uploads, "implicit": implicit,
                                               "objective": objective, "dataset": dataset,
                                               "items": options.items,
                                               "item_key": key_column(options.item_key, options.item_col,
                                                                      options.header),
                                               "shards": shards, "n_users": int(ds.feature_index.n_users),
                                               "n_items": int(ds.feature_index.n_items),
                                               "report": ds.report,
                                               "hyperparameters": overrides,
                                               "filters": _filters_summary(filters)})
    return {
        "run_id": run_id, "bucket": bucket, "shards": shards, "shard_ids": list(range(shards)),
        "n_users": int(ds.feature_index.n_users), "n_items": int(ds.feature_index.n_items),
        "n_interactions": int(len(ds.rating)),
    }


def _filters_summary(filters: Mapping[str, np.ndarray] | None) -> dict[str, Any] | None:
    """What the run record says of ``filters.npz``: the eligible items, the cap, the responses and each named
    list (the stages after Prepare read the lists' names from it)."""
    if filters is None:
        return None
    return {"eligible_items": int(filters["eligible"].sum()), "max_per": int(filters["cap"]) or None,
            "responses": int(len(filters["response_users"])),
            "lists": [{"name": name, "eligible_items": int(filters[f"eligible.{name}"].sum()),
                       "max_per": int(filters[f"cap.{name}"]) or None} for name in _npz_lists(filters)]}


def refresh_run(bucket: str, table: str, uploads: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Prepare a refresh: a new run that serves the live model again, with the filter file and the responses
    as they are now, and is searched, loaded and published as any run (statemachine/pipeline.asl.json's
    refresh path). Nothing is trained: the model passed the quality gate when it was.

    The live run's prepared data, model and vectors are copied under the new run (server-side copies, so
    the new run is whole, outlives the live run's runs/ lifecycle, and every later stage reads its own
    prefix); ``filters.npz`` is made again against the live run's items and users and the items table it
    read, and so is the fallback list, as training made it (``topx.steps.fallback_list``) over the new
    eligible items. A bad filter file raises ``ConfigError`` naming the rule before anything is written.
    Memory: the live run's prepared interactions and feature index, less than Prepare holds.

    Returns ``{"refreshed": False, "reason"}`` when there is no model to refresh (no version is live, or the
    live run's files under runs/ have expired): the state machine then makes the run a full one. Otherwise
    ``{"refreshed": True, "prepare": <prepare_run's reply>, "gate": <a passed gate naming the model>,
    "model_run", "live"}``; the run record's ``refresh`` names the trained run and the version refreshed.
    """

    from topx.dataset import data_options
    from topx.vectors import ITEM_VECTORS, RecipeVectors

    live = store.active_version(table, client=dynamodb_client())
    if live is None:
        return {"refreshed": False, "reason": f"table {table}: no version is live, so there is no model to "
                                              f"refresh; a full run trains one"}
    try:
        record = _get_json(bucket, run_record_key(live))
    except StoreError:
        return {"refreshed": False, "reason": f"s3://{bucket}/{run_record_key(live)} is gone (the runs/ lifecycle "
                                              f"expired the live version's run): a full run trains a model again"}
    model_run = str((record.get("refresh") or {}).get("model_run", live))
    shards = int(record["shards"])
    digest = hashlib.sha256(f"refresh:{bucket}/{live}:{json.dumps(uploads, sort_keys=True)}".encode()).hexdigest()[:10]
    run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}-{digest}"
    with _workdir() as work:
        ds, holdout = _load_prepared(bucket, live, work)
        options = data_options({**(record.get("dataset") or {}), "objective": record.get("objective"),
                                "interactions": record["source"], "users": None, "items": record.get("items")})
        # The filter file and responses against the live run's items and users: a bad rule fails here.
        filters = _prepared_filters(bucket, options, ds)
        _download(bucket, vectors_prefix(live) + ITEM_VECTORS, work / ITEM_VECTORS)
        item_vectors = np.load(work / ITEM_VECTORS, mmap_mode="r")  # the fallback reads one column of it
        model = RecipeVectors(np.zeros((0, item_vectors.shape[1]), np.float32), item_vectors,
                              np.zeros(0, np.float32))
        metrics = _get_json(bucket, metrics_key(live))
        top_x = int(metrics.get("top_x", env_or(ENV_TOP_X, None, DEFAULT_TOP_X, int)))
        # Every list's fallback under the new rules, by the source the trained run's validation chose.
        lists = _all_lists(filters, [] if filters is None else _npz_lists(filters))
        metrics["fallback"] = _upload_fallbacks(bucket, run_id, ds, model, holdout, top_x, lists,
                                                (metrics.get("fallback") or {}).get("source"), work)
        for prefix in (prepared_prefix, model_prefix, vectors_prefix):
            _copy_prefix(bucket, prefix(live), prefix(run_id))
        if filters is not None:
            np.savez_compressed(work / "filters.npz", **filters)
            s3_client().upload_file(str(work / "filters.npz"), bucket, run_filters_key(run_id))
        n_interactions = int(len(ds.rating))
    refresh = {"model_run": model_run, "live": live}
    metrics["refresh"] = refresh
    _put_json(bucket, metrics_key(run_id), metrics)
    _put_json(bucket, run_record_key(run_id), {**record, "uploads": uploads, "refresh": refresh,
                                               "filters": _filters_summary(filters)})
    gate = {"passed": True, "metrics": {},
            "reason": f"a refresh of the live version {live}: the model trained by run {model_run}, which passed "
                      f"the quality gate then, with the filter file and the responses as they are now"}
    return {"refreshed": True, "model_run": model_run, "live": live, "gate": gate, "prepare": {
        "run_id": run_id, "bucket": bucket, "shards": shards, "shard_ids": list(range(shards)),
        "n_users": int(record["n_users"]), "n_items": int(record["n_items"]), "n_interactions": n_interactions}}


def _copy_prefix(bucket: str, source: str, target: str) -> int:
    """Copy every object under ``source`` to the same name under ``target`` (server-side); the count."""
    count = 0
    for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=source):
        for obj in page.get("Contents", []):
            # The managed copy goes multipart beyond 5 GB, where a single CopyObject is refused.
            s3_client().copy({"Bucket": bucket, "Key": obj["Key"]}, bucket, target + obj["Key"][len(source):])
            count += 1
    if count == 0:
        raise StoreError(f"s3://{bucket}/{source} holds nothing: the live run's files are gone")
    return count


def _prepared_filters(bucket: str, options: Any, ds: Any) -> dict[str, np.ndarray] | None:
    """The run's filters (``config/filters.json``) and responses (under ``responses/``) resolved against
    its users and items, as arrays for ``filters.npz``; None when there is neither. Each named list of the
    filter file adds its own ``eligible.<name>``, ``groups.<name>`` and ``cap.<name>`` (``_list_arrays``)."""
    from topx.dataset import items_table
    from topx.filters import parse_filters, read_responses, resolve_lists

    rules = None
    try:
        raw = s3_client().get_object(Bucket=bucket, Key=FILTERS_KEY)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("NoSuchKey", "404"):
            raise
    else:
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"s3://{bucket}/{FILTERS_KEY}: the filter file is not valid JSON: {exc}") from exc
        rules = parse_filters(doc, f"s3://{bucket}/{FILTERS_KEY}")
    has_responses = _latest_key(bucket, RESPONSES_PREFIX) is not None
    if rules is None and not has_responses:
        return None
    n_items = ds.feature_index.n_items
    out = {"response_users": np.zeros(0, np.int64), "response_items": np.zeros(0, np.int64)}
    out.update(_list_arrays(None, np.ones(n_items, dtype=bool), None))
    if rules is not None:
        # Every list is checked here, its errors naming it (``lists.<name>``), before anything trains.
        for chosen in resolve_lists(rules, ds.item_ids, items_table(options)):
            out.update(_list_arrays(chosen.name, chosen.eligible, chosen.diversity))
    if has_responses:
        pairs = read_responses(f"s3://{bucket}/{RESPONSES_PREFIX}", ds.user_ids, ds.item_ids,
                               s3_client=s3_client()).tocoo()
        out["response_users"], out["response_items"] = pairs.row.astype(np.int64), pairs.col.astype(np.int64)
    return out


def _list_arrays(name: str | None, eligible: np.ndarray, diversity: tuple[np.ndarray, int] | None
                 ) -> dict[str, np.ndarray]:
    """One list's arrays in ``filters.npz``: ``eligible`` (n_items,) bool, ``groups`` (n_items,) int64 and
    ``cap`` (0: no cap), suffixed ``.<name>`` for a named list."""
    suffix = "" if name is None else f".{name}"
    groups, cap = (np.full(len(eligible), -1, dtype=np.int64), 0) if diversity is None else diversity
    return {f"eligible{suffix}": eligible, f"groups{suffix}": groups, f"cap{suffix}": np.array(cap)}


def _npz_lists(filters: Mapping[str, np.ndarray]) -> list[str]:
    """The named lists among ``filters.npz``'s arrays, in the order they were added (the filter file's)."""
    return [key.removeprefix("eligible.") for key in filters if key.startswith("eligible.")]


def _read_list_filters(z: Any, name: str | None) -> tuple[np.ndarray, tuple[np.ndarray, int] | None]:
    """One list's eligible items and diversity, from an open ``filters.npz`` (``_list_arrays``)."""
    suffix = "" if name is None else f".{name}"
    cap = int(z[f"cap{suffix}"])
    return z[f"eligible{suffix}"], (z[f"groups{suffix}"], cap) if cap > 0 else None


# A list of a run: its name (None: the default list), its eligible items (None: every item) and its diversity.
RunList = tuple[str | None, np.ndarray | None, tuple[np.ndarray, int] | None]


def _all_lists(filters: Any, names: list[str]) -> list[RunList]:
    """The default list, then the named lists ``names``, from an open ``filters.npz`` or its arrays
    (``filters``; None: a run without a filter file, whose one list takes every item)."""
    if filters is None:
        return [(None, None, None)]
    return [(name, *_read_list_filters(filters, name)) for name in (None, *names)]


def _upload_fallbacks(bucket: str, run_id: str, ds: Any, vectors: Any, holdout: np.ndarray, top_x: int,
                      lists: list[RunList], source: str | None, work: Path) -> dict[str, Any]:
    """Each list's fallback list (``topx.steps.fallback_list``: its eligible items and cap) to
    ``fallback_key(run_id, name)``. The default list's takes ``source`` (None: the better on the hold-out),
    each named list's the default's. -> the default list's report."""
    import pyarrow.parquet as pq

    from topx.steps import fallback_list

    report: dict[str, Any] = {}
    for name, eligible, diversity in lists:
        fallback, got = fallback_list(ds, vectors, holdout, top_x, eligible, diversity,
                                      source=source if name is None else report["source"])
        report = got if name is None else report
        pq.write_table(fallback, work / "fallback.parquet")
        s3_client().upload_file(str(work / "fallback.parquet"), bucket, fallback_key(run_id, name))
    return report


def _run_lists(record: Mapping[str, Any]) -> list[str]:
    """The named lists a run makes, from its run.json (in the filter file's order)."""
    return [entry["name"] for entry in (record.get("filters") or {}).get("lists", [])]


def dataset_config(bucket: str) -> dict[str, Any]:
    """The run's dataset configuration: the deployed one (``TOPX_DATASET``, from CDK context ``dataset``),
    overridden field by field by ``config/dataset.json`` when the bucket holds one. Each is checked by the
    contract's one rule, and the error names the field and where it came from."""
    from topx.contract import merge_dataset_configs

    deployed: dict[str, Any] = {}
    text = env_or(ENV_DATASET, None, None)
    if text:
        deployed = _checked_dataset_config(text, ENV_DATASET)
    uri = f"s3://{bucket}/{DATASET_KEY}"
    try:
        raw = s3_client().get_object(Bucket=bucket, Key=DATASET_KEY)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("NoSuchKey", "404"):
            raise
        return merge_dataset_configs(deployed)
    from_bucket = _checked_dataset_config(raw, uri)
    try:
        return merge_dataset_configs(deployed, from_bucket)
    except DatasetConfigError as exc:
        raise ConfigError(f"{uri} over {ENV_DATASET}: {exc}") from exc


def _checked_dataset_config(raw: str | bytes, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{where}: the dataset configuration is not valid JSON: {exc}") from exc
    try:
        return check_dataset_config(doc, deployed=True)
    except DatasetConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _objective(head: dict[str, Any], source: str, configured: str | None = None) -> str:
    """The dataset configuration's objective (ranking when it names none). An upload's ``topx-mode``
    metadata (``ranking``/``implicit``, ``rating``/``explicit``), the older way to say it, still holds
    where the configuration names none, and must agree with it where it does."""
    mode = head.get("Metadata", {}).get(MODE_METADATA)
    if mode is None:
        return configured or DEFAULT_OBJECTIVE
    if mode.lower() not in MODES:
        raise ConfigError(f"{source} metadata {MODE_METADATA}: unknown mode {mode!r}; expected one of "
                          f"{', '.join(MODES)} (or leave it out and set objective in the dataset configuration)")
    if configured is not None and MODES[mode.lower()] != configured:
        raise ConfigError(f"{source} metadata {MODE_METADATA}: {mode!r} trains for {MODES[mode.lower()]}, but the "
                          f"dataset configuration's objective is {configured!r}; drop the metadata (objective "
                          f"replaces it) or make them agree")
    return MODES[mode.lower()]


def _metadata_hyperparameters(head: dict[str, Any], source: str) -> dict[str, Any]:
    """The upload's ``topx-hyperparameters`` metadata (a JSON object), checked now so that a typo fails
    the run in Prepare instead of after the training job started."""
    raw = head.get("Metadata", {}).get(HYPERPARAMETERS_METADATA)
    return {} if raw is None else parse_hyperparameters(raw, f"{source} metadata {HYPERPARAMETERS_METADATA}")


def parse_hyperparameters(raw: str, where: str) -> dict[str, Any]:
    """A JSON object of HyperParameters fields, validated; returns the fields it sets."""
    try:
        values = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"{where}: not JSON ({exc}): {raw!r}") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a JSON object of hyperparameters, got {raw!r}")
    fixed = sorted(FIXED_HYPERPARAMETERS & set(values))
    if fixed:
        raise ConfigError(f"{where}: {', '.join(fixed)} follows the upload's {MODE_METADATA} and cannot be set")
    try:
        parsed = HyperParameters.from_dict(values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return {name: getattr(parsed, name) for name in values}


def training_hyperparameters(implicit: bool, upload_overrides: dict[str, Any]) -> HyperParameters:
    """Defaults by mode < TOPX_EPOCHS / TOPX_NUM_FACTORS < TOPX_HYPERPARAMETERS < the upload's metadata."""
    from topx.config import default_hyperparameters

    hp = default_hyperparameters(
        implicit, num_factors=env_or(ENV_NUM_FACTORS, None, None, int), epochs=env_or(ENV_EPOCHS, None, None, int)
    )
    chosen = given_hyperparameters(upload_overrides)
    try:
        return replace(hp, **chosen)
    except TypeError as exc:
        raise ConfigError(f"hyperparameters {chosen}: {exc}") from exc


def given_hyperparameters(upload_overrides: dict[str, Any]) -> dict[str, Any]:
    """The settings the deployment (TOPX_HYPERPARAMETERS) and, over it, the upload's metadata set."""
    from_env = env_or(ENV_HYPERPARAMETERS, None, None)
    return {**(parse_hyperparameters(from_env, ENV_HYPERPARAMETERS) if from_env else {}), **upload_overrides}


def _feature_table(bucket: str, name: str, configured: str | None) -> str | None:
    """The ``users`` or ``items`` table: the dataset configuration's key in the bucket (the latest object
    under it when it ends in "/"), else the latest object under ``features/<name>``; None without one."""
    if configured is None:
        key = _latest_key(bucket, feature_table_prefix(name))
        return None if key is None else f"s3://{bucket}/{key}"
    if configured.endswith("/"):
        key = _latest_key(bucket, configured)
        if key is None:
            raise InputDataError(f"no object under the prefix the dataset configuration's {name} names",
                                 source=f"s3://{bucket}/{configured}", column=None)
        return f"s3://{bucket}/{key}"
    return f"s3://{bucket}/{configured}"


def _load_prepared(bucket: str, run_id: str, work: Path):
    from topx.rundir import load_interactions

    _download_prefix(bucket, prepared_prefix(run_id), work / "prepared")
    feature_index = FeatureIndex.load(work / "prepared")
    ds, holdout = load_interactions(work / "prepared", feature_index, data_dir="")
    return ds, holdout


def train_run(bucket: str, run_id: str) -> dict[str, Any]:
    """Train the FM on the prepared data, evaluate on the hold-out, write model/ and metrics.json."""

    from topx.rundir import MODEL_DIR
    from topx.steps import (
        Reporter,
        RunOptions,
        evaluate_model,
        train_stage,
        training_summary,
        tuned_hyperparameters,
    )
    from topx.tune import tune_mode
    from topx.vectors import export_vectors

    with _workdir() as work:
        ds, holdout = _load_prepared(bucket, run_id, work)
        record = _get_json(bucket, run_record_key(run_id))
        upload_overrides = record.get("hyperparameters") or {}
        hp = training_hyperparameters(ds.implicit, upload_overrides)
        # Ranked by the search that will write the recommendations: metrics.json judges what is served. The
        # ranking learner's settings are searched first where topx run would search them (topx.tune, "auto"),
        # unless the deployment or the upload set one of them.
        run = RunOptions(top_x=int(env_or(ENV_TOP_X, None, DEFAULT_TOP_X, int)), progress=False,
                         search_method=search_method(), tune=tune_mode("auto", given_hyperparameters(upload_overrides)))
        hp, tuning = tuned_hyperparameters(ds, hp, run, Reporter(False))
        out = work / "out"
        params, _, result, ds = train_stage(ds, hp, run, out, Reporter(False))
        vectors = export_vectors(params, ds.feature_index)
        metrics = evaluate_model(params, vectors, ds, holdout, run, hp.seed, hp.learner)
        # The fallback list holds only what the filter file lets through, and its cap per group (Prepare resolved
        # them: filters.npz); each named list has its own, by the source the default list's validation chose.
        lists = _all_lists(None, [])
        if record.get("filters"):
            s3_client().download_file(bucket, run_filters_key(run_id), str(work / "filters.npz"))
            with np.load(work / "filters.npz") as z:
                lists = _all_lists(z, _run_lists(record))
        metrics["fallback"] = _upload_fallbacks(bucket, run_id, ds, vectors, holdout, run.top_x, lists, None, work)
        metrics.update(training_summary(hp, result, ds.report))  # the history and the data, for the run report
        if tuning is not None:
            metrics["tuning"] = tuning
        metrics.update(predictor_type=hp.predictor_type, learner=hp.learner,
                       objective="ranking" if ds.implicit else "rating", top_x=run.top_x, best_epoch=result.best_epoch,
                       epochs_run=len(result.history), device=result.device, hyperparameters=hp.to_dict(),
                       holdout_split=ds.split, recency_boost=ds.recency_boost)
        _upload_dir(out / MODEL_DIR, bucket, model_prefix(run_id))
        # The recipe's vectors, which evaluating needed anyway: written here, where every user's already are
        # in memory, each search shard's users apart (repackage_run checks them).
        _write_vectors(bucket, run_id, vectors, ds.feature_index, int(record["shards"]), work / "vectors")
        _put_json(bucket, metrics_key(run_id), metrics)
    return {"run_id": run_id, "best_epoch": result.best_epoch, "epochs_run": len(result.history), "device": result.device}


def _write_vectors(bucket: str, run_id: str, vectors: Any, feature_index: FeatureIndex, shards: int,
                   work: Path) -> None:
    """The items' vectors and ids under runs/<run_id>/vectors/, and each search shard's users' under
    vectors/shard=NNNN/, so that a search child reads only its own users'."""
    from topx.vectors import ITEM_VECTORS, USER_CONSTANTS, USER_VECTORS

    work.mkdir(parents=True, exist_ok=True)
    np.save(work / ITEM_VECTORS, vectors.item_vectors)
    (work / ITEM_IDS).write_text(json.dumps(list(feature_index.item_ids), ensure_ascii=False), encoding="utf-8")
    for name in (ITEM_VECTORS, ITEM_IDS):
        s3_client().upload_file(str(work / name), bucket, vectors_prefix(run_id) + name)
    user_ids = feature_index.user_ids
    for shard in range(shards):
        rows = shard_users(feature_index.n_users, shard, shards)
        start, stop = (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 0)
        np.save(work / USER_VECTORS, vectors.user_vectors[start:stop])
        np.save(work / USER_CONSTANTS, vectors.user_constants[start:stop])
        (work / USER_IDS).write_text(json.dumps(list(user_ids[start:stop]), ensure_ascii=False), encoding="utf-8")
        for name in (USER_VECTORS, USER_CONSTANTS, USER_IDS):
            s3_client().upload_file(str(work / name), bucket, vectors_shard_prefix(run_id, shard) + name)


def quality_gate(bucket: str, run_id: str, table: str) -> dict[str, Any]:
    """Pass a model unless its metrics are not finite, miss a configured threshold, lose to their
    baseline, or are clearly worse than the live model's.

    A regressor must beat the global-mean rating's RMSE and stay within 5 % of the live RMSE; a
    ranking model must beat popularity's recall@x (a tie loses: it is no better than the most popular
    items) and keep 90 % of the live recall@x. Thresholds, each
    off unless set: ``TOPX_MAX_RMSE``, ``TOPX_MIN_AUC``, ``TOPX_MIN_RECALL``.
    """
    metrics = _get_json(bucket, metrics_key(run_id))
    x = metrics.get("top_x", DEFAULT_TOP_X)
    regressor = metrics.get("predictor_type") == "regressor"
    name, baseline_name = ("rmse", "rmse_global_mean") if regressor else (f"recall_at_{x}", f"popularity_recall_at_{x}")
    value, baseline = metrics.get(name), metrics.get(baseline_name)
    judged = (name, baseline_name, "rmse", "auc", f"recall_at_{x}")
    # A diverged model's NaN would make the reply invalid JSON: non-finite values travel as text.
    summary = {k: metrics[k] if _finite(metrics[k]) else str(metrics[k]) for k in dict.fromkeys(judged) if k in metrics}

    def rejected(reason: str) -> dict[str, Any]:
        return {"passed": False, "reason": reason, "metrics": summary}

    for metric in ("rmse", "auc", f"recall_at_{x}", "log_loss"):
        if metric in metrics and not _finite(metrics[metric]):
            return rejected(f"{metric} is {metrics[metric]!r}, not a finite number: the training diverged")
    for metric, env_name, too_bad in ((f"recall_at_{x}", ENV_MIN_RECALL, lambda v, t: v < t),
                                      ("rmse" if regressor else "auc", ENV_MAX_RMSE if regressor else ENV_MIN_AUC,
                                       (lambda v, t: v > t) if regressor else (lambda v, t: v < t))):
        threshold = env_or(env_name, None, None, float)
        if threshold is not None and metrics.get(metric) is not None and too_bad(metrics[metric], threshold):
            bound = "above" if env_name == ENV_MAX_RMSE else "below"
            return rejected(f"{metric} {metrics[metric]:.4f} is {bound} the threshold {env_name}={threshold:g}")
    if value is None:
        return {"passed": True, "reason": f"no {name} to judge (too little data for a hold-out)", "metrics": summary}
    worse = (lambda a, b: a > b) if regressor else (lambda a, b: a < b)
    if baseline is not None and regressor and worse(value, baseline):
        return rejected(f"{name} {value:.4f} is worse than the baseline's {baseline:.4f}")
    if baseline is not None and not regressor and value <= baseline:
        return rejected(f"{name} {value:.4f} does not beat recommending the most popular items "
                        f"({baseline_name} {baseline:.4f})")
    live = store.active_version(table, client=dynamodb_client())
    compared: dict[str, Any] = {}
    if live is not None and live != run_id:
        live_metrics = _live_metrics(bucket, live)
        # What the report shows beside this run's metrics: the live model's, on its own hold-out.
        compared = {"live": {"version": live, "metrics": {k: live_metrics[k] for k in _live_shown(x)
                                                          if _finite(live_metrics.get(k))}}}
        live_value = live_metrics.get(name)
        slack = LIVE_RMSE_SLACK if regressor else LIVE_RECALL_SLACK
        if live_value is not None and _finite(live_value) and worse(value, live_value * slack):
            return {**rejected(f"{name} {value:.4f} is clearly worse than the live model's {live_value:.4f} ({live})"),
                    **compared}
    return {"passed": True, "reason": "metrics within thresholds", "metrics": summary, **compared}


def _live_shown(x: int) -> tuple[str, ...]:
    return ("rmse", "auc", "log_loss", f"recall_at_{x}", f"ndcg_at_{x}", f"map_at_{x}", f"coverage_at_{x}")


def _live_metrics(bucket: str, live: str) -> dict[str, Any]:
    """The live model's metrics: kept under versions/ when it published (runs/ expires by lifecycle);
    runs/ for a version published before that copy existed; empty when neither is there."""
    for key in (version_metrics_key(live), metrics_key(live)):
        try:
            return _get_json(bucket, key)
        except StoreError:
            continue
    return {}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


def repackage_run(bucket: str, run_id: str) -> dict[str, Any]:
    """Check the recipe's vectors the train job wrote (``_write_vectors``) before the search reads them:
    the items' vectors and ids, and every search shard's users' vectors, constants and ids, each shaped for
    its rows. Reads the arrays' headers and the listing only, so its memory does not grow with the users:
    the vectors themselves are built where the whole model is in memory anyway, in the train job."""
    from numpy.lib import format as npy

    from topx.vectors import ITEM_VECTORS, USER_CONSTANTS, USER_VECTORS

    record = _get_json(bucket, run_record_key(run_id))
    shards, n_users, n_items = int(record["shards"]), int(record["n_users"]), int(record["n_items"])

    def shape(key: str) -> tuple[int, ...]:
        try:
            head = s3_client().get_object(Bucket=bucket, Key=key, Range="bytes=0-4095")["Body"].read()
        except ClientError as exc:
            raise StoreError(f"s3://{bucket}/{key} cannot be read: {exc}") from exc
        stream = io.BytesIO(head)
        try:
            version = npy.read_magic(stream)
            found = npy.read_array_header_1_0(stream) if version == (1, 0) else npy.read_array_header_2_0(stream)
        except ValueError as exc:
            raise ArtifactFormatError(f"s3://{bucket}/{key}: not a numpy array file ({exc})") from exc
        return tuple(found[0])

    items = shape(vectors_prefix(run_id) + ITEM_VECTORS)
    if items[0] != n_items:
        raise ArtifactFormatError(f"s3://{bucket}/{vectors_prefix(run_id)}{ITEM_VECTORS}: {items[0]} item vectors "
                                  f"for the run's {n_items} items")
    _head(bucket, vectors_prefix(run_id) + ITEM_IDS)
    for shard in range(shards):
        rows = len(shard_users(n_users, shard, shards))
        prefix = vectors_shard_prefix(run_id, shard)
        users, constants = shape(prefix + USER_VECTORS), shape(prefix + USER_CONSTANTS)
        if users != (rows, items[1]) or constants != (rows,):
            raise ArtifactFormatError(f"s3://{bucket}/{prefix}: vectors {users} and constants {constants} for the "
                                      f"shard's {rows} users of dimension {items[1]}")
        _head(bucket, prefix + USER_IDS)
    return {"run_id": run_id, "n_users": n_users, "n_items": n_items, "dimension": int(items[1]), "shards": shards}


def _download(bucket: str, key: str, path: Path) -> None:
    """Download s3://bucket/key to ``path``; a missing or unreadable object is a StoreError naming it."""
    try:
        s3_client().download_file(bucket, key, str(path))
    except ClientError as exc:
        raise StoreError(f"s3://{bucket}/{key} cannot be read: {exc}") from exc


def _head(bucket: str, key: str) -> None:
    try:
        s3_client().head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        raise StoreError(f"s3://{bucket}/{key} cannot be read: {exc}") from exc


def shard_users(n_users: int, shard: int, shards: int) -> np.ndarray:
    """The user rows of one shard: contiguous, near-equal ranges, so shards partition the users."""
    if not 0 <= shard < shards:
        raise InputDataError(f"shard {shard} is outside 0..{shards - 1}")
    bounds = np.linspace(0, n_users, shards + 1).astype(np.int64)
    return np.arange(bounds[shard], bounds[shard + 1])


def search_shard(bucket: str, run_id: str, shard: int, shards: int) -> dict[str, Any]:
    """Top-x for one shard of users, seen items excluded, written as Parquet; the search is
    ``TOPX_SEARCH_METHOD`` (default "exact")."""
    from topx.filters import exclude_also
    from topx.rundir import INTERACTIONS_FILE, user_range_interactions
    from topx.steps import write_recommendations_parquet
    from topx.vectors import ITEM_VECTORS, USER_CONSTANTS, USER_VECTORS, RecipeVectors

    top_x = int(env_or(ENV_TOP_X, None, DEFAULT_TOP_X, int))
    method = search_method()
    with _workdir() as work:
        interactions = prepared_prefix(run_id) + INTERACTIONS_FILE
        (work / "prepared").mkdir()
        _download(bucket, interactions, work / "prepared" / INTERACTIONS_FILE)
        # The items' vectors and ids, and this shard's users' (written per shard by repackage_run), and the
        # seen items of the shard's users only, streamed from the interactions: a shard's memory follows its
        # own users and the items.
        (work / "vectors").mkdir()
        for key in (vectors_prefix(run_id) + ITEM_VECTORS, vectors_prefix(run_id) + ITEM_IDS,
                    *(vectors_shard_prefix(run_id, shard) + name for name in (USER_VECTORS, USER_CONSTANTS, USER_IDS))):
            _download(bucket, key, work / "vectors" / key.rsplit("/", 1)[1])
        part = RecipeVectors(np.load(work / "vectors" / USER_VECTORS), np.load(work / "vectors" / ITEM_VECTORS),
                             np.load(work / "vectors" / USER_CONSTANTS))
        shard_user_ids = np.asarray(_read_ids(work / "vectors" / USER_IDS), object)
        item_ids = _read_ids(work / "vectors" / ITEM_IDS)
        record = _get_json(bucket, run_record_key(run_id))
        n_users = int(record["n_users"])  # every user row, cold ones included: what the shards partition
        rows = shard_users(n_users, shard, shards)
        if len(rows) != len(shard_user_ids) or len(part.user_vectors) != len(rows):
            raise ArtifactFormatError(f"s3://{bucket}/{vectors_shard_prefix(run_id, shard)}: {len(part.user_vectors)} "
                                      f"vectors and {len(shard_user_ids)} ids for the shard's {len(rows)} users")
        start, stop = (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 0)
        seen = user_range_interactions(work / "prepared", start, stop, len(item_ids), data_dir="")
        # (list name, eligible, diversity): the default list (None), then the filter file's named lists.
        lists = _all_lists(None, [])
        if record.get("filters"):
            s3_client().download_file(bucket, run_filters_key(run_id), str(work / "filters.npz"))
            with np.load(work / "filters.npz") as z:
                lists = _all_lists(z, _run_lists(record))
                mine = (z["response_users"] >= start) & (z["response_users"] < stop)
                dismissed = sp.csr_matrix((np.ones(int(mine.sum()), np.float32),
                                           (z["response_users"][mine] - start, z["response_items"][mine])),
                                          shape=seen.shape)
            seen = exclude_also(seen, dismissed)
        # Cold users and items (no interactions: recommended from their features) are the last rows.
        report = record["report"]
        searched: dict[str, Any] = {"shard": shard, "users": int(len(rows))}
        for name, eligible, diversity in lists:
            path = work / ("part-0.parquet" if name is None else list_file(name))
            counts: dict[str, int] = {}
            written = write_recommendations_parquet(
                path, part, shard_user_ids, np.asarray(item_ids, object), top_x, seen, method=method,
                cold_users_from=n_users - int(report.get("cold_users", 0)) - start,
                cold_items_from=len(item_ids) - int(report.get("cold_items", 0)), counts=counts,
                eligible=eligible, diversity=diversity)
            with_items = set(pd.read_parquet(path, columns=["user_id"])["user_id"])
            # A user who has seen every (eligible) item gets no row; load still writes them (an empty list),
            # so that publish can count every user of the run.
            without = [str(u) for u in shard_user_ids if u not in with_items]
            s3_client().upload_file(str(path), bucket, recommendations_key(run_id, shard, name))
            this = {"rows": int(written), "users_without_items": without,
                    "cold_item_rows": int(counts.get("cold_item_rows", 0))}
            if name is None:
                searched.update(this)
            else:
                searched.setdefault("lists", {})[name] = this
    # Written last: a shard's counts are there only once every list of it is.
    _put_json(bucket, searched_key(run_id, shard), searched)
    return {"run_id": run_id, "shard": shard, "users": int(len(rows)), "rows": int(searched["rows"]),
            "lists": len(lists) - 1}


def load_shard(bucket: str, run_id: str, shard: int, table: str) -> dict[str, Any]:
    """Write one shard's recommendations to DynamoDB under the run's version, and count them.

    Every user of the shard gets an item, those with nothing left to recommend an empty one, and the
    count must match what the search wrote, so a shard that is half there is never counted whole. Each
    named list of the run is written the same way under its own version (``contract.list_version``).
    The items carry no TTL (the version may go live); the shard's files are first copied under
    ``versions/`` so that the items can be given one when the version is retired. Then the load
    retires its share of the superseded versions (``retire_versions``).
    """
    record = _get_json(bucket, run_record_key(run_id))
    names = _run_lists(record)
    searched = searched_key(run_id, shard)
    # The manifest goes first: items that exist are always listed, even if this load dies halfway. Its
    # searched file last: a manifest without it was never complete.
    manifest = version_shard_prefix(run_id, shard)
    for source, name in ((recommendations_key(run_id, shard), MANIFEST_RECOMMENDATIONS),
                         *((recommendations_key(run_id, shard, n), list_file(n)) for n in names),
                         (searched, MANIFEST_SEARCHED)):
        # The managed copy goes multipart beyond 5 GB, where a single CopyObject is refused.
        s3_client().copy({"Bucket": bucket, "Key": source}, bucket, manifest + name)
    written = _write_shard(bucket, table, run_id, searched, recommendations_key(run_id, shard), names, None)
    if shard == 0:
        _load_fallback(bucket, run_id, table, names)
    _put_json(bucket, loaded_key(run_id, shard), {"shard": shard, "written": written[None],
                                                  "lists": {n: written[n] for n in names}})
    retired = retire_versions(bucket, table, shard, int(record["shards"]))
    return {"shard": shard, "written": int(written[None]), "retired": retired}


def _write_shard(bucket: str, table: str, version: str, counts_key: str, key: str, names: list[str],
                 expires_at: int | None) -> dict[str | None, int]:
    """Write one shard's lists to the table: the default list (``key``) and each named list in ``names``
    (its file beside ``key``), each checked against the search's counts (``counts_key``). Returns the users
    written per list (None: the default)."""
    folder = key.rpartition("/")[0] + "/"
    written = {}
    for name in (None, *names):
        rows = _shard_recommendations(bucket, counts_key, folder + (MANIFEST_RECOMMENDATIONS if name is None
                                                                    else list_file(name)), name)
        written[name] = store.write_recommendations(table, list_version(version, name), rows,
                                                    expires_at=expires_at, client=dynamodb_client())
    return written


def _load_fallback(bucket: str, run_id: str, table: str, names: list[str]) -> None:
    """Write the run's fallback list (``fallback_key``) to the table under the run's version, and each named
    list's own (``fallback_key(run_id, name)``: its items and cap) under that list's version."""
    with _workdir() as work:
        for name in (None, *names):
            _download(bucket, fallback_key(run_id, name), work / "fallback.parquet")
            frame = pd.read_parquet(work / "fallback.parquet").sort_values("rank")
            store.write_fallback(table, run_id if name is None else list_version(run_id, name),
                                 frame["item_id"].astype(str).tolist(), frame["score"].astype(float).tolist(),
                                 client=dynamodb_client())


# Beside the deployed vectors (repackage_run): the items' ids, and each shard's users' ids.
ITEM_IDS, USER_IDS = "item_ids.json", "user_ids.json"


def _read_ids(path: Path) -> list[str]:
    """A JSON list of ids, as repackage_run writes them beside the vectors."""
    try:
        ids = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactFormatError(f"{path.name}: cannot read the ids beside the vectors ({exc})") from exc
    if not isinstance(ids, list):
        raise ArtifactFormatError(f"{path.name}: the ids beside the vectors are not a list")
    return ids


# Rows of a shard's recommendations read at a time by the load: its memory follows this, not the shard.
LOAD_BATCH_ROWS = 100_000


def _shard_recommendations(bucket: str, counts_key: str, key: str,
                           list_name: str | None = None) -> Iterator[store.Recommendation]:
    """One shard's recommendations (``key``) as the search wrote them (each user's rows together), checked
    against the search's counts (``counts_key``; a named list's are under its ``lists``) before the first is
    given, then streamed ``LOAD_BATCH_ROWS`` rows at a time."""
    import pyarrow.parquet as pq

    searched = _get_json(bucket, counts_key)
    counts = searched if list_name is None else searched.get("lists", {}).get(list_name)
    if counts is None:
        raise StoreError(f"s3://{bucket}/{counts_key}: no counts of the list {list_name!r}; not loading")
    with _workdir() as work:
        local = work / "part.parquet"
        _download(bucket, key, local)
        parquet = pq.ParquetFile(local)
        users = _grouped_users(parquet, f"s3://{bucket}/{key}")
        rows = parquet.metadata.num_rows
        without = [str(u) for u in counts.get("users_without_items", [])]
        if users + len(without) != int(searched["users"]) or rows != int(counts["rows"]):
            raise StoreError(f"s3://{bucket}/{key}: {users} users and {rows} rows, but the search wrote "
                             f"{searched['users']} users and {counts['rows']} rows; not loading")
        yield from _streamed_recommendations(parquet)
        parquet.close()
    for user in without:
        yield store.Recommendation(user, [], [])


def _grouped_users(parquet: Any, where: str) -> int:
    """The number of users in a shard's file, read a batch of ids at a time, checking that each user's rows
    are together (as the search writes them): the load streams users and must never split one."""
    seen: set[str] = set()
    runs, last = 0, None
    for batch in parquet.iter_batches(batch_size=LOAD_BATCH_ROWS, columns=["user_id"]):
        ids = batch.column(0).to_numpy(zero_copy_only=False)
        if not len(ids):
            continue
        starts = np.flatnonzero(np.r_[ids[0] != last, ids[1:] != ids[:-1]])
        runs += len(starts)
        seen.update(ids[starts].tolist())
        last = ids[-1]
    if runs != len(seen):
        raise StoreError(f"{where}: a user's rows are not together ({runs} runs of rows for {len(seen)} users); "
                         "the search writes each user's list in one piece; not loading")
    return len(seen)


def _streamed_recommendations(parquet: Any) -> Iterator[store.Recommendation]:
    """Per-user records from a shard's file, a batch of rows at a time; the last user of a batch waits for
    the next batch, which may hold the rest of their rows."""
    carry = None
    for batch in parquet.iter_batches(batch_size=LOAD_BATCH_ROWS):
        if not batch.num_rows:
            continue
        frame = batch.to_pandas() if carry is None else pd.concat([carry, batch.to_pandas()], ignore_index=True)
        user = frame["user_id"].to_numpy()
        others = np.flatnonzero(user != user[-1])  # rows of users before the batch's last
        tail = int(others[-1]) + 1 if len(others) else 0
        carry = frame.iloc[tail:]
        yield from _frame_recommendations(frame.iloc[:tail])
    if carry is not None:
        yield from _frame_recommendations(carry)


def _frame_recommendations(frame: pd.DataFrame) -> Iterator[store.Recommendation]:
    cold = frame["cold_user"].to_numpy() if "cold_user" in frame.columns else None
    return store.recommendations_from_columns(frame["user_id"].to_numpy(), frame["rank"].to_numpy(),
                                              frame["item_id"].to_numpy(), frame["score"].to_numpy(), cold)


def retire_versions(bucket: str, table: str, shard: int, shards: int, *, now: float | None = None) -> dict[str, int]:
    """Give the items of superseded versions their TTL, and forget their manifests once the items expired.

    A version is retired when it is not the live one and not newer than the newest the pointer ever named
    (``store.Pointer.newest``): superseded, rolled back from, or never live (a run that failed or was
    overtaken after loading). Versions newer than that are still loading, and are left alone. Each retired
    version's shard manifests are shared out among a load's shards (manifest shard i goes to load shard i
    mod shards); each one's items are written again with ``expires_at`` = now + ``TOPX_RETENTION_DAYS``, and
    the manifest is marked with that expiry (``MANIFEST_RETIRED``). It is kept until then, so that
    ``rollback_version`` can make the version live again, and deleted by the first load after it.
    Manifests younger than ``RETIRE_AFTER_S`` wait for a later load, as does everything while no version
    is live, and what is left once this call has spent ``RETIRE_BUDGET_S`` on it. Safe to repeat: a retry
    writes the same items with a later expiry. Returns the manifests and users retired.
    """
    now = time.time() if now is None else now
    started = time.monotonic()
    pointer = store.read_pointer(table, client=dynamodb_client())
    retired = {"manifests": 0, "users": 0}
    if pointer is None:
        return retired
    objects = _version_objects(bucket)
    expires_at = int(now) + int(env_or(ENV_RETENTION_DAYS, None, DEFAULT_RETENTION_DAYS, int)) * 86400
    # Manifest shard i is retired by load shard i mod shards: stable while other loads retire theirs.
    mine = sorted((version, manifest_shard, files) for version, by_shard in objects.items()
                  if _retirable(version, pointer)
                  for manifest_shard, files in by_shard.items()
                  if manifest_shard is not None and manifest_shard % shards == shard)
    for version, manifest_shard, files in mine:
        prefix = version_shard_prefix(version, manifest_shard)
        if time.monotonic() - started > RETIRE_BUDGET_S:
            logger.info("retiring stopped after %.0f s; the next load goes on", time.monotonic() - started)
            break
        try:
            if MANIFEST_RETIRED in files:
                if _retired_until(bucket, prefix) <= now:  # its items have expired: nothing to roll back to
                    _delete_manifest(bucket, prefix, files)
                continue
            if now - max(files.values()).timestamp() < RETIRE_AFTER_S:
                continue
            # Without its searched file, a manifest was never complete (a load that died between the two
            # copies, before writing items): only the file is left to delete.
            if MANIFEST_SEARCHED not in files:
                _delete_manifest(bucket, prefix, files)
                continue
            users = _retire_manifest(bucket, table, version, manifest_shard, expires_at, manifest_lists(files))
            if users is not None:
                retired["manifests"] += 1
                retired["users"] += users
        except (StoreError, ClientError) as exc:
            # Retiring is housekeeping: a later load tries again, and this load's own items stand.
            logger.warning("not retired yet: s3://%s/%s: %s", bucket, prefix, exc)
    if shard == 0:
        # A retired version's metrics and record go with its last manifest (deleted by an earlier load).
        for version, by_shard in objects.items():
            if _retirable(version, pointer) and set(by_shard) == {None}:
                for name in by_shard[None]:
                    s3_client().delete_object(Bucket=bucket, Key=version_prefix(version) + name)
    return retired


def _retirable(version: str, pointer: store.Pointer) -> bool:
    """Whether ``version`` is done with: not live, and not newer than every version published (still loading)."""
    return version != pointer.version and version <= pointer.newest


def _version_objects(bucket: str, prefix: str = VERSIONS_PREFIX) -> dict[str, dict[int | None, dict[str, Any]]]:
    """The objects the stages keep under ``prefix`` (``versions/`` or one version's): {version: {manifest shard,
    or None for the version's own metrics and record: {file name: LastModified}}}. Others are ignored."""
    found: dict[str, dict[int | None, dict[str, Any]]] = {}
    for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            match = VERSION_OBJECT_RE.fullmatch(obj["Key"])
            if match is None:
                continue  # not written by the stages
            shard = None if match["shard"] is None else int(match["shard"])
            found.setdefault(match["version"], {}).setdefault(shard, {})[obj["Key"].rpartition("/")[2]] = \
                obj["LastModified"]
    return found


def _retired_until(bucket: str, prefix: str) -> int:
    """The expiry a retired manifest's items were given (epoch seconds), from its ``MANIFEST_RETIRED``."""
    key = prefix + MANIFEST_RETIRED
    try:
        return int(_get_json(bucket, key)["expires_at"])
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"s3://{bucket}/{key}: no expires_at in it ({exc})") from exc


def _delete_manifest(bucket: str, prefix: str, files: dict[str, Any]) -> None:
    # The searched file first (a manifest without it is never retired or rolled back to), the marker last
    # (while it is there, a retired manifest is recognised as one).
    for name in sorted(files, key=lambda n: (n != MANIFEST_SEARCHED, n == MANIFEST_RETIRED)):
        s3_client().delete_object(Bucket=bucket, Key=prefix + name)


def _retire_manifest(bucket: str, table: str, version: str, manifest_shard: int, expires_at: int,
                     lists: list[str]) -> int | None:
    """Write one manifest's items (and shard 0's fallback lists) with ``expires_at`` and mark it retired; the
    users written (of the default list). None when a rollback made the version live meanwhile: then its items
    are kept again. ``lists``: the named lists whose files the manifest holds.

    The pointer is read again after the marker is written: a rollback to this version moves the pointer
    first and then keeps the items of every marked manifest (``rollback_version``). Either it moved the
    pointer before that read, and this call sees it and keeps the items itself; or after, and then it
    lists this marker and rewrites the items after this call wrote them. So no live item keeps an expiry."""
    prefix = version_shard_prefix(version, manifest_shard)
    users = _write_shard(bucket, table, version, prefix + MANIFEST_SEARCHED, prefix + MANIFEST_RECOMMENDATIONS,
                         lists, expires_at)[None]
    if manifest_shard == 0:
        for name in (None, *lists):
            store.expire_fallback(table, list_version(version, name), expires_at, client=dynamodb_client())
    _put_json(bucket, prefix + MANIFEST_RETIRED, {"expires_at": expires_at})
    pointer = store.read_pointer(table, client=dynamodb_client())
    if pointer is not None and not _retirable(version, pointer):
        logger.info("version %s went live again while shard %d was retired: its items are kept", version,
                    manifest_shard)
        _keep_manifest(bucket, table, version, manifest_shard, lists)
        return None
    return users


def _keep_manifest(bucket: str, table: str, version: str, manifest_shard: int, lists: list[str]) -> int:
    """Write a retired manifest's items (and shard 0's fallback lists) again without an expiry, then unmark it.
    Returns the users written (of the default list). ``lists``: the named lists whose files it holds."""
    prefix = version_shard_prefix(version, manifest_shard)
    users = _write_shard(bucket, table, version, prefix + MANIFEST_SEARCHED, prefix + MANIFEST_RECOMMENDATIONS,
                         lists, None)[None]
    if manifest_shard == 0:
        for name in (None, *lists):
            store.keep_fallback(table, list_version(version, name), client=dynamodb_client())
    s3_client().delete_object(Bucket=bucket, Key=prefix + MANIFEST_RETIRED)
    return users


# ----------------------------------------------------------------------------- rollback (`topx rollback`)


class RollbackRefused(StoreError):
    """``topx rollback`` changed nothing: no version to go to, one that is not whole or expires soon, or the
    pointer moved while it ran."""


# A version whose items expire within this many seconds is not rolled back to: DynamoDB deletes expired
# items within days of their expiry, and keeping a large version's items takes minutes.
ROLLBACK_MARGIN_S = 86400


def rollback_version(bucket: str, table: str, to: str | None = None, *, now: float | None = None) -> dict[str, Any]:
    """Point readers back at an earlier version: ``to``, or the newest complete one older than the live one.

    A version can go live again while it is complete: it was live once (publish left its record), every
    shard's manifest is still under ``versions/``, its fallback list is in the table, and nothing of it
    expires within ``ROLLBACK_MARGIN_S``. The pointer moves in one write conditional on the pointer read
    at the start (``store.roll_back_pointer``): a run that publishes meanwhile makes the rollback fail with
    ``RollbackRefused``, having changed nothing. Then the version's retired manifests have their items (and
    its fallback list) written again without an expiry, so the live version never expires. Rolling back
    to the live version finishes that part of a rollback that stopped before it (it is idempotent).

    The version rolled back from is retired by the next load; the next run newer than it publishes as usual.
    Returns ``version`` (now live), ``rolled_back_from``, ``users`` and ``kept`` (manifests written again).
    """
    now = time.time() if now is None else now
    pointer = store.read_pointer(table, client=dynamodb_client())
    if pointer is None:
        raise RollbackRefused(f"table {table}: no version was ever published, so there is none to roll back to")
    if to == pointer.version:
        return {"version": to, "rolled_back_from": pointer.rolled_back_from, "users": pointer.users,
                "kept": _keep_version(bucket, table, to), "already_live": True}
    objects = _version_objects(bucket)
    if to is None:
        target, users = _previous_complete(bucket, table, pointer, objects, now)
    else:
        if to not in objects:
            raise RollbackRefused(f"unknown version {to!r}: nothing of it is kept under s3://{bucket}/"
                                  f"{version_prefix(to)} (never loaded, or expired after it was superseded)")
        users, problem = _completeness(bucket, table, to, objects[to], now)
        if problem is not None:
            raise RollbackRefused(f"version {to} cannot go live again: {problem}")
        target = to
    if not store.roll_back_pointer(table, target, read=pointer, users=users, client=dynamodb_client()):
        moved = store.read_pointer(table, client=dynamodb_client())
        raise RollbackRefused(
            f"the pointer moved while rolling back: {moved.version if moved else None} is live now, not "
            f"{pointer.version} (a run published, or another rollback ran); nothing was changed, and "
            f"`topx rollback` can be run again against what is live now")
    try:
        kept = _keep_version(bucket, table, target)
    except (StoreError, ClientError) as exc:
        raise StoreError(f"{target} is live now, in place of {pointer.version}, but some of its items may still carry "
                         f"their expiry: {exc}; run `topx rollback --to {target}` again to finish") from exc
    return {"version": target, "rolled_back_from": pointer.version, "users": users, "kept": kept,
            "already_live": False}


def _previous_complete(bucket: str, table: str, pointer: store.Pointer, objects: dict[str, Any],
                       now: float) -> tuple[str, int]:
    """The newest complete version older than the live one, and its users; RollbackRefused naming why each
    earlier version that was live cannot go live again."""
    earlier = sorted((v for v, by_shard in objects.items()
                      if v < pointer.version and VERSION_RECORD in by_shard.get(None, {})), reverse=True)
    problems = []
    for version in earlier:
        users, problem = _completeness(bucket, table, version, objects[version], now)
        if problem is None:
            return version, users
        problems.append(f"{version}: {problem}")
    if not problems:
        raise RollbackRefused(f"no version earlier than the live {pointer.version} is kept: a superseded version "
                              f"stays for the stack's retention_days ({DEFAULT_RETENTION_DAYS} unless set) after "
                              f"the first load that follows it, and one published before rollbacks existed is not "
                              f"kept")
    raise RollbackRefused("no earlier version is complete: " + "; ".join(problems))


def _completeness(bucket: str, table: str, version: str, by_shard: dict[int | None, dict[str, Any]],
                  now: float) -> tuple[int, str | None]:
    """The users of ``version`` and what keeps it from going live again (None: nothing does)."""
    if VERSION_RECORD not in by_shard.get(None, {}):
        return 0, f"it was never live (no {version_record_key(version)}: it was loaded but not published)"
    record = _get_json(bucket, version_record_key(version))
    try:
        shards, users = int(record["shards"]), int(record["users"])
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"s3://{bucket}/{version_record_key(version)}: not a version record ({exc})") from exc
    lists = [str(name) for name in record.get("lists", [])]
    whole = {MANIFEST_RECOMMENDATIONS, MANIFEST_SEARCHED, *map(list_file, lists)}
    missing = [s for s in range(shards) if not whole <= set(by_shard.get(s, {}))]
    if missing:
        return users, (f"the manifests of {len(missing)} of its {shards} shards are gone (e.g. "
                       f"{version_shard_prefix(version, missing[0])}), so its items cannot be kept")
    fallback_expiries = []
    for name in (None, *lists):
        present, fallback_expires = store.fallback_expiry(table, list_version(version, name), client=dynamodb_client())
        if not present:
            return users, "its fallback list is not in the table" + ("" if name is None else f" for the list {name}")
        if fallback_expires is not None:
            fallback_expiries.append(fallback_expires)
    expiries = [_retired_until(bucket, version_shard_prefix(version, s)) for s in range(shards)
                if MANIFEST_RETIRED in by_shard[s]] + fallback_expiries
    if expiries and min(expiries) < now + ROLLBACK_MARGIN_S:
        when = datetime.fromtimestamp(min(expiries), UTC)
        return users, (f"its items expire{'d' if min(expiries) <= now else ''} at {when:%Y-%m-%d %H:%M} UTC, "
                       f"less than {ROLLBACK_MARGIN_S // 3600} hours from now")
    counted = sum(int(_get_json(bucket, version_shard_prefix(version, s) + MANIFEST_SEARCHED)["users"])
                  for s in range(shards))
    if counted != users:
        return users, f"its manifests hold {counted} users, but {users} were published"
    return users, None


def _keep_version(bucket: str, table: str, version: str) -> int:
    """Keep the live ``version``'s items: every retired manifest's items written again without an expiry,
    listed after the pointer moved (see ``_retire_manifest``); the fallback list's expiry removed. Returns the
    manifests written again."""
    by_shard = _version_objects(bucket, version_prefix(version)).get(version, {})
    for name in (None, *manifest_lists(by_shard.get(0, {}))):
        store.keep_fallback(table, list_version(version, name), client=dynamodb_client())
    kept = 0
    for manifest_shard, files in sorted(by_shard.items(), key=lambda item: -1 if item[0] is None else item[0]):
        if manifest_shard is not None and MANIFEST_RETIRED in files:
            _keep_manifest(bucket, table, version, manifest_shard, manifest_lists(files))
            kept += 1
    return kept


def publish_version(bucket: str, run_id: str, table: str, expected_shards: int) -> dict[str, Any]:
    """Flip the pointer once every shard is loaded and the counts add up to every user.

    Safe to retry: when an earlier attempt flipped the pointer and then failed (a timeout after the
    write), the pointer already names this run and the result says so (``already_live``). A run
    not newer than every version published (the live one, or one rolled back from) is never published:
    that raises ``VersionSuperseded``. Once live, the run's record (``version_record_key``) is written.
    """
    run = _get_json(bucket, run_record_key(run_id))
    names = _run_lists(run)
    # The users count is the default list's; each named list must have an item for every one of them too.
    loaded: dict[str | None, int] = dict.fromkeys((None, *names), 0)
    for shard in range(expected_shards):
        marker = _get_json(bucket, loaded_key(run_id, shard))
        loaded[None] += int(marker["written"])
        for name in names:
            loaded[name] += int(marker.get("lists", {}).get(name, 0))
    expected_users = int(run["report"]["n_users"])
    for name, count in loaded.items():
        if count != expected_users:
            what = "users loaded" if name is None else f"users loaded in the list {name}"
            raise StoreError(f"run {run_id}: {count} {what}, expected {expected_users}; not publishing")
    for name in (None, *names):
        if not store.has_fallback(table, list_version(run_id, name), client=dynamodb_client()):
            # Readers get the fallback list for any user without one of their own: never publish without it.
            what = "its fallback list" if name is None else f"the fallback list of its list {name}"
            raise StoreError(f"run {run_id}: {what} is not in the table; not publishing")
    written = loaded[None]
    # Kept beyond the runs/ lifecycle, for the quality gate to compare later models with this one; with
    # what the search made of the cold users and items, which only the shards know.
    metrics = _get_json(bucket, metrics_key(run_id))
    searched = [_get_json(bucket, searched_key(run_id, shard)) for shard in range(expected_shards)]
    cold_rows = sum(int(counts.get("cold_item_rows", 0)) for counts in searched)
    rows = sum(int(counts["rows"]) for counts in searched)
    metrics["cold"] = {"items": int(run["report"].get("cold_items", 0)), "users": int(run["report"].get("cold_users", 0)),
                       "cold_item_rows": cold_rows, "cold_item_share": cold_rows / max(rows, 1)}
    _put_json(bucket, version_metrics_key(run_id), metrics)
    published = store.publish_version(table, run_id, users=written, client=dynamodb_client())
    if not published:
        pointer = store.read_pointer(table, client=dynamodb_client())
        live = None if pointer is None else pointer.version
        if live != run_id:
            if pointer is None or live > run_id:
                why = f"the live version {live} is newer, and the pointer never goes backwards"
            elif pointer.newest == run_id:
                why = f"it was live and was rolled back from (the live version is {live}), so it does not publish again"
            else:
                why = (f"the newer version {pointer.newest} was published before it and has since been rolled back "
                       f"from (the live version is {live}); only a run newer than {pointer.newest} publishes")
            raise VersionSuperseded(
                f"run {run_id} was not published: {why}; its items stay unread and are given an expiry by a later "
                f"run's load"
            )
    # The pointer names the run (now or after an earlier attempt): what rollback_version needs to make the
    # version live again once it is superseded. Written after the flip, so a version without one was never live.
    _put_json(bucket, version_record_key(run_id), {"shards": int(expected_shards), "users": written,
                                                   "lists": names})
    return {"run_id": run_id, "published": True, "users": written, "already_live": not published,
            "report": _report_uri(bucket, run_id), "quality": published_quality(metrics)}


def published_quality(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """What the published model scored on its hold-out, for the run's metrics in CloudWatch:
    ``{"x", "recall_at_x", "lift_over_popularity"}``, each measure only when metrics.json has it as a
    finite number (a run with too little data for a hold-out has neither)."""
    x = int(metrics.get("top_x", DEFAULT_TOP_X))
    quality: dict[str, Any] = {"x": x}
    for name, key in (("recall_at_x", f"recall_at_{x}"), ("lift_over_popularity", f"lift_over_popularity_recall_at_{x}")):
        if _finite(metrics.get(key)):
            quality[name] = float(metrics[key])
    return quality


def _report_uri(bucket: str, run_id: str) -> str:
    """The run report's S3 URI, or why there is none (the Report state failed; the run publishes anyway)."""
    key = report_key(run_id)
    try:
        s3_client().head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
            return f"none: s3://{bucket}/{key} was not written (see the Report state's error)"
        raise
    return f"s3://{bucket}/{key}"


def report_run(bucket: str, run_id: str, gate: dict[str, Any] | None, *, searched: bool = True) -> dict[str, Any]:
    """Write the run report (topx.report) to ``runs/<run_id>/report.html``: the prepared interactions, the
    metrics, every shard's recommendations, the items table's titles, and the quality gate's reply
    ``gate`` with the live model it compared against. Streams the interactions and the shards, so its
    memory follows the users and items counts, not the interactions or the lists. ``searched`` False:
    the gate refused the model, so there are no recommendations, and the page says why."""
    from topx.ingest import read_feature_table
    from topx.report import build_report, parquet_rows, recommendation_frames
    from topx.rundir import INTERACTIONS_FILE, iter_interaction_rows

    metrics = _get_json(bucket, metrics_key(run_id))
    record = _get_json(bucket, run_record_key(run_id))
    shards = int(record["shards"])
    with _workdir() as work:
        _download_prefix(bucket, prepared_prefix(run_id), work / "prepared")
        feature_index = FeatureIndex.load(work / "prepared")
        paths = []
        for shard in range(shards if searched else 0):
            path = work / f"part-{shard}.parquet"
            key = recommendations_key(run_id, shard)
            _download(bucket, key, path)
            paths.append(path)
        # The items table this run's Prepare read (not whatever lies under features/ now), by its key column.
        items = None if record.get("items") is None else read_feature_table(
            record["items"], key_col=record["item_key"], sep=(record.get("dataset") or {}).get("sep"),
            header=(record.get("dataset") or {}).get("no_header") is not True, s3_client=s3_client())
        interactions = (iter_interaction_rows(work / "prepared", data_dir="")
                        if (work / "prepared" / INTERACTIONS_FILE).exists() else None)
        refused = f"The quality gate refused this model ({(gate or {}).get('reason', 'no reason given')}): " \
                  "nothing was searched or published."
        page = build_report(metrics, feature_index, interactions,
                            recommendation_frames(paths) if searched else None,
                            title=f"topx run {run_id}", expected_rows=parquet_rows(paths), items_table=items,
                            gate=gate, live=(gate or {}).get("live"), recommendations_absent=refused)
    key = report_key(run_id)
    s3_client().put_object(Bucket=bucket, Key=key, Body=page.encode("utf-8"), ContentType="text/html; charset=utf-8")
    return {"run_id": run_id, "report": f"s3://{bucket}/{key}", "bytes": len(page.encode("utf-8"))}
