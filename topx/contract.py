"""The deploy contract: every name, bound, default and key that topx and the CDK app (``infra/``) share.

Each is defined here once and imported by both sides: the stages, the Lambda handlers, the Batch jobs,
the client and the offline runner on one, the stack's settings, storage, roles and jobs on the other.
Standard library only, and nothing from the rest of topx: ``cdk synth`` imports this module, and must
not pull numpy, torch or faiss in with it (tests/unit/test_import_cost.py checks).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any

# --------------------------------------------------------------------------- environment variables
# What the stack sets on every Lambda function and Batch job, and what topx reads.

ENV_BUCKET = "TOPX_BUCKET"  # the data bucket
ENV_TABLE = "TOPX_TABLE"  # the recommendations table
ENV_TOPIC_ARN = "TOPX_TOPIC_ARN"  # the notifications topic
ENV_TOP_X = "TOPX_TOP_X"  # items recommended per user
ENV_NUM_FACTORS = "TOPX_NUM_FACTORS"  # FM latent dimension k of the pipeline's training
ENV_EPOCHS = "TOPX_EPOCHS"  # training epochs of the pipeline's training
ENV_SHARDS = "TOPX_SHARDS"  # user shards: search array-job children and Load iterations
ENV_RETENTION_DAYS = "TOPX_RETENTION_DAYS"  # days a retired version's items stay in the table
ENV_ENDPOINT_URL = "TOPX_ENDPOINT_URL"  # an AWS stand-in (moto server, LocalStack) instead of AWS
ENV_ARRAY_INDEX = "AWS_BATCH_JOB_ARRAY_INDEX"  # set by AWS Batch on each array child: its shard
# JSON object of HyperParameters fields for the pipeline's training, e.g. '{"factors_lr": 0.02}'; over
# TOPX_EPOCHS / TOPX_NUM_FACTORS, under an upload's own ``topx-hyperparameters`` metadata.
ENV_HYPERPARAMETERS = "TOPX_HYPERPARAMETERS"
# Optional quality-gate thresholds on the hold-out metrics (unset: no threshold).
ENV_MAX_RMSE = "TOPX_MAX_RMSE"  # regressor: highest hold-out RMSE published
ENV_MIN_AUC = "TOPX_MIN_AUC"  # binary classifier: lowest hold-out AUC published
ENV_MIN_RECALL = "TOPX_MIN_RECALL"  # lowest recall@x published (either predictor type)
ENV_SEARCH_METHOD = "TOPX_SEARCH_METHOD"  # the search the recommendations and their hold-out metrics use
# The deployment's dataset configuration (DATASET_FIELDS, as JSON object text): how Prepare reads the uploads.
# config/dataset.json in the bucket overrides it field by field at run time.
ENV_DATASET = "TOPX_DATASET"
# The state machine the upload starter starts (set on the starter function only).
ENV_STATE_MACHINE_ARN = "TOPX_STATE_MACHINE_ARN"

# --------------------------------------------------------------------------- deploy defaults and bounds

DEFAULT_TOP_X = 10  # items per user, when neither an argument nor TOPX_TOP_X says
# TOPX_NUM_FACTORS and TOPX_EPOCHS have no default: unset, the train job uses the objective's own
# (topx.config.MODE_DEFAULTS), as `topx run` does.
DEFAULT_SHARDS = 4  # user shards, when neither context nor TOPX_SHARDS says
DEFAULT_RETENTION_DAYS = 30  # days until runs/ objects expire and a retired version's items do
# AWS Batch rejects array jobs with fewer than 2 children (and caps them at 10,000). The Load state
# runs one iteration per shard inside the execution, 8 history events each, and a standard execution
# stops at 25,000 events: 2,500 shards leave some 5,000 for the other states and retried loads
# (tests/offline/test_e2e.py measures the events per shard).
MIN_SHARDS = 2
MAX_SHARDS = 2_500
EXECUTION_HISTORY_LIMIT = 25_000  # events in one standard Step Functions execution

# The searches topx.search runs: "exact" (topx's bounded scan), "faiss" (FAISS IndexFlatIP, exact in
# float32), "hnsw" / "ivf" (approximate FAISS indexes).
SEARCH_METHODS = ("exact", "faiss", "hnsw", "ivf")
DEFAULT_SEARCH_METHOD = "exact"  # when neither an argument nor TOPX_SEARCH_METHOD says

# --------------------------------------------------------------------------- hyperparameters
# The HyperParameters fields (topx/config.py) that TOPX_HYPERPARAMETERS, the `hyperparameters` context
# parameter and an upload's topx-hyperparameters metadata may set.

LEARNERS = ("sgd", "icd")  # HyperParameters.learner: topx.fm's mini-batch SGD, topx.icd's coordinate descent
# HyperParameters.history_features: each user's training items as user features, each item's users as
# item features, both, or neither (FeatureIndex.with_history).
HISTORY_FEATURES = ("none", "user", "item", "both")
# Follows each upload's topx-mode metadata; never set by name.
FIXED_HYPERPARAMETERS = frozenset({"predictor_type"})
# Each numeric one's type and the values topx accepts: low <= value < high.
HYPERPARAMETER_RANGES: Mapping[str, tuple[type, float, float]] = MappingProxyType({
    "num_factors": (int, 1, math.inf),
    "epochs": (int, 1, math.inf),
    "mini_batch_size": (int, 1, math.inf),
    "bias_lr": (float, 0, 1_000_000),
    "linear_lr": (float, 0, 1_000_000),
    "factors_lr": (float, 0, 1_000_000),
    "bias_wd": (float, 0, 1_000_000),
    "linear_wd": (float, 0, 1_000_000),
    "factors_wd": (float, 0, 1_000_000),
    "bias_init_sigma": (float, 0, 1_000_000),
    "linear_init_sigma": (float, 0, 1_000_000),
    "factors_init_sigma": (float, 0, 1_000_000),
    "negative_samples": (int, 1, math.inf),
    "unobserved_weight": (float, 0, 1_000_000),
    "regularization_exponent": (float, 0, 1_000_000),
    "cg_steps": (int, 0, math.inf),
    "validation_fraction": (float, 0, 0.5),
    "early_stopping_patience": (int, 1, math.inf),
    "seed": (int, -math.inf, math.inf),
})
# Those that take one of a few names.
HYPERPARAMETER_CHOICES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "learner": LEARNERS,
    "history_features": HISTORY_FEATURES,
})

# --------------------------------------------------------------------------- uploads

# Object metadata of an upload (S3 lower-cases user metadata keys): its objective, and hyperparameters.
MODE_METADATA = "topx-mode"
HYPERPARAMETERS_METADATA = "topx-hyperparameters"

# --------------------------------------------------------------------------- the dataset configuration
# How to read a dataset, the same for `topx run --dataset FILE` and the deployment (CDK context ``dataset``,
# then config/dataset.json). Each field is named as the CLI option that sets it (``--user-col`` is
# ``user_col``, ``--no-header`` is ``no_header``); a null field is unset: its default holds.

OBJECTIVES = ("ranking", "rating")  # what the model is trained for (topx.config)
DEFAULT_OBJECTIVE = "ranking"
# The most bytes a dataset's parts may hold together, as stored (compressed): a guard against exporting the
# wrong table, checked from the listing before any part is read. The deployed Prepare holds the data in
# 3008 MB of memory, so larger data fit the CLI on a larger machine better (docs/DEPLOY.md).
DEFAULT_MAX_BYTES = 1 << 30
# The column read as each row's time when the dataset names none (files with a header; no_time_col: none).
DEFAULT_TIME_COL = "timestamp"
# With a time column, each user's latest row weighs 1 + this times their earliest, by default
# (topx.dataset.user_recency; chosen on validation carves, docs/PERFORMANCE.md).
DEFAULT_RECENCY_BOOST = 0.75
# Each field's kind: "path" (a file, folder or s3:// URI; in the deployment a key under features/),
# "column" (a name, or a 0-based position), "objective", "number", "days" (a positive number), "boost" (a
# number >= 0), "window" (an ISO-8601 date, or a positive number of days before the latest row), "flag" (true
# or false), "separator" (one character, or \t), "bytes" (a positive integer).
DATASET_FIELDS: Mapping[str, str] = MappingProxyType({
    "interactions": "path",
    "users": "path",
    "items": "path",
    "user_col": "column",
    "item_col": "column",
    "rating_col": "column",
    "time_col": "column",
    "no_time_col": "flag",
    "user_key": "column",
    "item_key": "column",
    "objective": "objective",
    "min_rating": "number",
    "half_life_days": "days",
    "recency_boost": "boost",
    "since": "window",
    "no_header": "flag",
    "sep": "separator",
    "no_cold_items": "flag",
    "no_cold_users": "flag",
    "max_bytes": "bytes",
})
# The deployment trains on what arrives under incoming/: a dataset configuration there names no interactions.
NOT_DEPLOYED_FIELDS: Mapping[str, str] = MappingProxyType({
    "interactions": "the deployment trains on what arrives under incoming/; interactions is for the CLI",
})


class DatasetConfigError(ValueError):
    """A dataset configuration field has a value topx cannot read with; ``field`` names it (None: the
    configuration as a whole). Callers say where the configuration came from."""

    def __init__(self, field: str | None, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(reason if field is None else f"{field}: {reason}")


def check_dataset_config(doc: Any, *, deployed: bool = False, together: bool = True) -> dict[str, Any]:
    """The fields ``doc`` (a JSON object) sets, each checked, normalised (``since`` as text, ``sep`` as
    its character), with null fields kept as None; raises ``DatasetConfigError`` naming the first field at
    fault. ``deployed``: as the deployment reads it (no ``interactions``; ``users`` and ``items`` are keys
    under ``features/`` in the data bucket). ``together``: the fields are checked together too (``check_dataset_fields_together``;
    ``merge_dataset_configs`` does it for configurations that only make sense merged)."""
    if not isinstance(doc, Mapping):
        raise DatasetConfigError(None, f"expected a JSON object of dataset fields, got {type(doc).__name__}")
    unknown = sorted(str(name) for name in doc if name not in DATASET_FIELDS)
    if unknown:
        raise DatasetConfigError(unknown[0], f"unknown field; the fields are {', '.join(DATASET_FIELDS)}")
    checked: dict[str, Any] = {}
    for name, value in doc.items():
        if value is None:
            checked[name] = None
            continue
        if deployed and name in NOT_DEPLOYED_FIELDS:
            raise DatasetConfigError(name, NOT_DEPLOYED_FIELDS[name])
        try:
            checked[name] = _DATASET_KINDS[DATASET_FIELDS[name]](value)
        except ValueError as exc:
            raise DatasetConfigError(name, f"{exc}, got {value!r}") from None
        if deployed and DATASET_FIELDS[name] == "path" and not value.startswith(FEATURES_PREFIX):
            # Prepare's role reads the bucket's input prefixes only (infra/access.py), side tables under this one.
            raise DatasetConfigError(name, f"expected a key under {FEATURES_PREFIX} in the data bucket (e.g. "
                                           f"{FEATURES_PREFIX}{name}.csv), got {value!r}")
    if together:
        check_dataset_fields_together(checked)
    return checked


def check_dataset_fields_together(config: Mapping[str, Any]) -> None:
    """What one field asks of another (null fields count as unset)."""
    if config.get("no_time_col") and config.get("time_col") is not None:
        raise DatasetConfigError("no_time_col", "contradicts time_col: leave one of them out")
    if config.get("time_col") is None and (config.get("no_time_col") or config.get("no_header")):
        for name in ("half_life_days", "since", "recency_boost"):
            if config.get(name) is not None:
                raise DatasetConfigError(name, "needs a time column (time_col)")
    columns = {name: config.get(name) for name in ("user_col", "item_col", "rating_col", "time_col")}
    named = [(name, value) for name, value in columns.items() if value is not None]
    for position, (name, value) in enumerate(named):
        for other, other_value in named[:position]:
            if other_value == value:
                raise DatasetConfigError(name, f"names column {value!r}, as {other} does")


def merge_dataset_configs(*configs: Mapping[str, Any]) -> dict[str, Any]:
    """Checked configurations, later ones overriding earlier ones field by field (a null field unsets the
    field); returns the fields set, checked together."""
    merged: dict[str, Any] = {}
    for config in configs:
        merged.update(config)
    merged = {name: value for name, value in merged.items() if value is not None}
    check_dataset_fields_together(merged)
    return merged


def is_window(since: Any) -> bool:
    """Whether ``since`` is a positive number of days (a number, or its text) or an ISO-8601 date."""
    try:
        days = float(since)
    except (TypeError, ValueError):
        days = None
    if days is not None:
        return days > 0 and math.isfinite(days) and not isinstance(since, bool)
    if not isinstance(since, str):
        return False
    try:
        datetime.fromisoformat(since.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def check_separator(sep: str) -> str:
    """A field separator as given (one character other than a quote or newline; ``\\t`` is a tab) as
    its character; ValueError otherwise."""
    if sep == "\\t":
        return "\t"
    if not isinstance(sep, str) or len(sep) != 1 or sep in "\"\r\n":
        raise ValueError("expected one character other than a quote or newline (\\t for a tab)")
    return sep


def _path(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a path, a key or an s3:// URI")
    return value


def _column(value: Any) -> str | int:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "" or (
            isinstance(value, int) and value < 0):
        raise ValueError("expected a column name, or a 0-based position")
    return value


def _objective(value: Any) -> str:
    if value not in OBJECTIVES:
        raise ValueError(f"expected one of {', '.join(OBJECTIVES)}")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError("expected a finite number")
    return float(value)


def _days(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError("expected a positive number of days")
    return float(value)


def _boost(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise ValueError("expected a number >= 0")
    return float(value)


def _window(value: Any) -> str:
    if not is_window(value):
        raise ValueError("expected an ISO-8601 date (e.g. 2024-05-01) or a positive number of days")
    return value if isinstance(value, str) else f"{value:g}"


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _bytes(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("expected a positive whole number of bytes")
    return value


_DATASET_KINDS: Mapping[str, Callable[[Any], Any]] = MappingProxyType({
    "path": _path, "column": _column, "objective": _objective, "number": _number, "days": _days, "boost": _boost,
    "window": _window, "flag": _flag, "separator": check_separator, "bytes": _bytes,
})

# --------------------------------------------------------------------------- S3 layout (one bucket)
# incoming/...                             uploads: increments adding to the history, each burst starting
#                                          one run (never two at once) on all of it
# incoming/snapshot=<label>/...            a snapshot: the one with the greatest label replaces everything
#                                          else under incoming/ (nothing is deleted); later increments go
#                                          under it
# config/dataset.json, config/filters.json how a run reads the uploads, and which items it may recommend
# features/users*, features/items*         optional side tables; the latest object of each is used, unless
#                                          the dataset configuration names others under features/
# runs/<run_id>/prepared/                  feature index + indexed interactions + hold-out mask
# runs/<run_id>/run.json                   the run's source, shards, data report and upload overrides
# runs/<run_id>/model/, vectors/           model.tar.gz (+ feature index); item vectors, and each shard's users'
# runs/<run_id>/metrics.json
# runs/<run_id>/recommendations/shard=NNNN/part-0.parquet       the default list
# runs/<run_id>/recommendations/shard=NNNN/list=<name>.parquet  each named list of the filter file
# runs/<run_id>/searched/shard=NNNN.json   the shard's users, and those left with nothing to recommend
# runs/<run_id>/loaded/shard=NNNN.json     users written to DynamoDB by that shard's load
# versions/<run_id>/shard=NNNN/            a copy of what a load wrote to DynamoDB, kept until the items it
#                                          lists expire (retired.json, once retired, says when)
# versions/<run_id>/metrics.json           the published model's metrics, for the quality gate
# versions/<run_id>/version.json           written once the pointer named the version: its shards and users
# runs/ expires by the bucket's lifecycle rule; versions/ lies outside it: retiring deletes a version's objects
# once its items have expired (topx.aws.stages.retire_versions).

INCOMING_PREFIX = "incoming/"  # uploads; the trigger's key prefix (statemachine/trigger.json)
FEATURES_PREFIX = "features/"  # side tables every run reads
RUNS_PREFIX = "runs/"  # one prefix per run, expired by lifecycle after the retention days
VERSIONS_PREFIX = "versions/"  # what live and not yet retired versions keep beyond runs/' lifecycle
# A run's mode, in its execution input's "mode" (the state machine's first Choice reads it): a full run trains;
# a refresh serves the live model again under the current filter file and responses (topx.aws.trigger).
RUN_MODE_FULL, RUN_MODE_REFRESH = "full", "refresh"
RUN_MODES = (RUN_MODE_FULL, RUN_MODE_REFRESH)
CONFIG_PREFIX = "config/"  # settings a run reads: FILTERS_KEY, DATASET_KEY
FILTERS_KEY = f"{CONFIG_PREFIX}filters.json"  # the filter file (topx.filters) every run applies
DATASET_KEY = f"{CONFIG_PREFIX}dataset.json"  # the dataset configuration, over the deployed one (ENV_DATASET)
RESPONSES_PREFIX = "responses/"  # (user_id, item_id) pairs left out of the next lists (topx.filters)
# The files of a version's shard manifest (version_shard_prefix): the recommendations and the search's counts,
# and once the manifest's items were given their expiry, the marker saying when they expire.
MANIFEST_RECOMMENDATIONS = "part-0.parquet"
MANIFEST_SEARCHED = "searched.json"
MANIFEST_RETIRED = "retired.json"
VERSION_METRICS = "metrics.json"
VERSION_RECORD = "version.json"
# A named list's name (the filter file's "lists"): it becomes part of a file name and of a DynamoDB sort key.
LIST_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
# A named list's recommendations, beside the default list's in a shard's folder and in its manifest.
LIST_FILE_RE = re.compile(rf"list=(?P<list>{LIST_NAME_RE.pattern})\.parquet")
# versions/<run_id>/{metrics.json,version.json}, or versions/<run_id>/shard=NNNN/{part-0.parquet,
# list=<name>.parquet,searched.json,retired.json}
VERSION_OBJECT_RE = re.compile(
    rf"{VERSIONS_PREFIX}(?P<version>[^/]+)/(?:{re.escape(VERSION_METRICS)}|{re.escape(VERSION_RECORD)}|"
    rf"shard=(?P<shard>\d{{4,}})/"
    rf"(?:{re.escape(MANIFEST_RECOMMENDATIONS)}|{LIST_FILE_RE.pattern}|{re.escape(MANIFEST_SEARCHED)}|"
    rf"{re.escape(MANIFEST_RETIRED)}))"
)


def list_file(name: str) -> str:
    """A named list's file in a shard's recommendations folder and in its manifest: ``list=<name>.parquet``."""
    if not LIST_NAME_RE.fullmatch(name):
        raise ValueError(f"{name!r} is not a list name (1-64 of a-z, 0-9, '-' and '_', starting with a letter "
                         "or digit)")
    return f"list={name}.parquet"


def manifest_lists(files: Iterable[str]) -> list[str]:
    """The named lists whose files are among ``files`` (a manifest's file names), sorted."""
    return sorted(match["list"] for name in files if (match := LIST_FILE_RE.fullmatch(name)))


# A folder incoming/snapshot=<label>/ holds a history that replaces the rest; labels compare as text, so
# ISO-8601 dates (snapshot=2024-06-01) or zero-padded numbers order as written.
SNAPSHOT_FOLDER = "snapshot"


def snapshot_prefix(label: str) -> str:
    """``incoming/snapshot=<label>/``; the label is one folder name."""
    if not label or "/" in label or label.strip() != label:
        raise ValueError(f"a snapshot label is one folder name without '/' or surrounding spaces, got {label!r}")
    return f"{INCOMING_PREFIX}{SNAPSHOT_FOLDER}={label}/"


def snapshot_label(key: str) -> str | None:
    """The label of the snapshot folder ``key`` lies in (``incoming/snapshot=<label>/...``); None outside one."""
    rest = key.removeprefix(INCOMING_PREFIX)
    if rest == key:
        return None
    folder, slash, _ = rest.partition("/")
    name, equals, label = folder.partition("=")
    return label if slash and equals and name == SNAPSHOT_FOLDER and label else None


def active_data_prefix(keys: Iterable[str]) -> str:
    """What a run trains on, from the keys under incoming/: ``incoming/snapshot=<greatest label>/`` when
    there is a snapshot, else ``incoming/`` (every increment)."""
    labels = {label for key in keys if (label := snapshot_label(key)) is not None}
    return snapshot_prefix(max(labels)) if labels else INCOMING_PREFIX


def incoming_key(name: str) -> str:
    """The key of an upload named ``name`` (a leading ``incoming/`` is not doubled)."""
    return INCOMING_PREFIX + name.removeprefix(INCOMING_PREFIX)


def feature_table_prefix(table: str) -> str:
    """``features/<table>`` (``users`` or ``items``): the latest object under it is that side table."""
    return f"{FEATURES_PREFIX}{table}"


def run_prefix(run_id: str) -> str:
    """``runs/<run_id>/``: everything one run writes."""
    return f"{RUNS_PREFIX}{run_id}/"


def prepared_prefix(run_id: str) -> str:
    """The run's feature index, indexed interactions and hold-out mask."""
    return f"{run_prefix(run_id)}prepared/"


def model_prefix(run_id: str) -> str:
    """The run's model artifact and the feature index beside it."""
    return f"{run_prefix(run_id)}model/"


def vectors_prefix(run_id: str) -> str:
    """The run's vectors: the items' (item_vectors.npy, item_ids.json) and, per search shard, its users'
    (``vectors_shard_prefix``), so that a search child reads its own users only."""
    return f"{run_prefix(run_id)}vectors/"


def vectors_shard_prefix(run_id: str, shard: int) -> str:
    """One search shard's user vectors: user_vectors.npy, user_constants.npy, user_ids.json."""
    return f"{vectors_prefix(run_id)}shard={shard:04d}/"


def run_record_key(run_id: str) -> str:
    """``run.json``: the run's source, shard count, data report and upload overrides."""
    return f"{run_prefix(run_id)}run.json"


def metrics_key(run_id: str) -> str:
    """The run's hold-out metrics."""
    return f"{run_prefix(run_id)}metrics.json"


def report_key(run_id: str) -> str:
    """The run report (HTML, topx.report): one self-contained page."""
    return f"{run_prefix(run_id)}report.html"


def run_filters_key(run_id: str) -> str:
    """What Prepare made of the filter file and the responses for this run (NumPy .npz): the eligible
    items, the diversity groups and cap (each named list's too, as ``eligible.<name>``, ``groups.<name>``,
    ``cap.<name>``), the (user row, item row) pairs to leave out."""
    return f"{run_prefix(run_id)}filters.npz"


def fallback_key(run_id: str, list_name: str | None = None) -> str:
    """The run's fallback list (Parquet: rank, item_id, score, source), for users the model has not seen; with
    ``list_name``, that named list's (its own items and cap, the same source)."""
    return f"{run_prefix(run_id)}fallback.parquet" if list_name is None else \
        f"{run_prefix(run_id)}fallback/{list_file(list_name)}"


def _shard(shard: int) -> str:
    return f"shard={shard:04d}"


def recommendations_key(run_id: str, shard: int, list_name: str | None = None) -> str:
    """One shard's recommendations, as the search wrote them (Parquet): the default list's, or with
    ``list_name`` that named list's."""
    folder = f"{run_prefix(run_id)}recommendations/{_shard(shard)}/"
    return folder + (MANIFEST_RECOMMENDATIONS if list_name is None else list_file(list_name))


def searched_key(run_id: str, shard: int) -> str:
    """One shard's search counts: its users, rows, and users left with nothing to recommend."""
    return f"{run_prefix(run_id)}searched/{_shard(shard)}.json"


def loaded_key(run_id: str, shard: int) -> str:
    """One shard's load marker: how many users it wrote to the table."""
    return f"{run_prefix(run_id)}loaded/{_shard(shard)}.json"


def version_prefix(run_id: str) -> str:
    """``versions/<run_id>/``: what a loaded or published version keeps until it is retired."""
    return f"{VERSIONS_PREFIX}{run_id}/"


def version_metrics_key(run_id: str) -> str:
    """The published version's metrics, kept beyond the runs/ lifecycle for the quality gate."""
    return f"{version_prefix(run_id)}{VERSION_METRICS}"


def version_record_key(run_id: str) -> str:
    """What publish records once the pointer named the version (its shards and users): a version without one
    was never live, and ``topx rollback`` does not go to it."""
    return f"{version_prefix(run_id)}{VERSION_RECORD}"


def version_shard_prefix(run_id: str, shard: int) -> str:
    """One shard's manifest under the version: MANIFEST_RECOMMENDATIONS and MANIFEST_SEARCHED, and
    MANIFEST_RETIRED once retired."""
    return f"{version_prefix(run_id)}{_shard(shard)}/"


# --------------------------------------------------------------------------- DynamoDB (one table)
# A recommendations item per (user, version): pk = "user#<user_id>", sk = "v#<version>"; a fallback item per
# version, pk = "fallback", sk = "v#<version>", the list for users it has none for. A named list is a version
# of its own for these keys, "<version>#list=<name>" (``list_version``): each user's item of it has
# sk = "v#<version>#list=<name>", and so has its fallback item. One pointer item
# pk = "pointer", sk = "active" naming the live version; one upload-starter item pk = "trigger", sk = "state".
# Retired versions' items carry expires_at (epoch seconds), the table's TTL. The functions' table permissions are limited to these partition keys.

PARTITION_KEY = "pk"
SORT_KEY = "sk"
KEY_ATTRIBUTE_TYPE = "S"  # both keys are strings (DynamoDB's type letter)
TTL_ATTRIBUTE = "expires_at"  # epoch seconds; only retired versions' items carry it
POINTER_PARTITION = "pointer"
POINTER_SORT = "active"
USER_PARTITION_PREFIX = "user#"
# The fallback list's partition: reserved, since every user's partition key starts with USER_PARTITION_PREFIX.
FALLBACK_PARTITION = "fallback"
# The upload starter's one item (topx.aws.trigger): the run in progress and the uploads waiting for the next.
TRIGGER_PARTITION = "trigger"
TRIGGER_SORT = "state"
VERSION_SORT_PREFIX = "v#"
# The key of the active-version pointer item.
POINTER_KEY: Mapping[str, str] = MappingProxyType({PARTITION_KEY: POINTER_PARTITION, SORT_KEY: POINTER_SORT})


def user_item_key(user_id: str, version: str) -> dict[str, str]:
    """The key of one user's recommendations under one version (plain strings, not DynamoDB-typed)."""
    return {PARTITION_KEY: f"{USER_PARTITION_PREFIX}{user_id}", SORT_KEY: f"{VERSION_SORT_PREFIX}{version}"}


# Between a version and a list's name in ``list_version``: run ids never hold it.
LIST_VERSION_SEPARATOR = "#list="


def list_version(version: str, list_name: str | None) -> str:
    """What a named list's items are keyed and labelled by (``user_item_key``, ``fallback_item_key``, and the
    items' ``version`` attribute): ``<version>#list=<name>``; the version itself for the default list (None)."""
    if list_name is None:
        return version
    if not LIST_NAME_RE.fullmatch(list_name):
        raise ValueError(f"{list_name!r} is not a list name (1-64 of a-z, 0-9, '-' and '_', starting with a "
                         "letter or digit)")
    return f"{version}{LIST_VERSION_SEPARATOR}{list_name}"


def fallback_item_key(version: str) -> dict[str, str]:
    """The key of one version's fallback list (plain strings)."""
    return {PARTITION_KEY: FALLBACK_PARTITION, SORT_KEY: f"{VERSION_SORT_PREFIX}{version}"}


def table_key_schema() -> list[dict[str, str]]:
    """The table's ``KeySchema``, as CreateTable takes it."""
    return [{"AttributeName": PARTITION_KEY, "KeyType": "HASH"}, {"AttributeName": SORT_KEY, "KeyType": "RANGE"}]


def table_attribute_definitions() -> list[dict[str, str]]:
    """The key attributes' ``AttributeDefinitions``, as CreateTable takes them."""
    return [{"AttributeName": name, "AttributeType": KEY_ATTRIBUTE_TYPE} for name in (PARTITION_KEY, SORT_KEY)]


# --------------------------------------------------------------------------- the stack and its entry points

STACK_NAME = "Topx"  # the stack infra/app.py deploys, and the one the client reads unless told another
# The stack's outputs, which the client reads resource names from.
OUTPUT_BUCKET = "BucketName"
OUTPUT_TABLE = "TableName"
OUTPUT_STATE_MACHINE = "StateMachineArn"
OUTPUT_TOPIC = "TopicArn"

# The execution ends the run-ended rule queues for the starter (infra/pipeline.py, topx.aws.trigger), as
# Step Functions reports them to EventBridge.
RUN_ENDED_SOURCE = "aws.states"
RUN_ENDED_DETAIL_TYPE = "Step Functions Execution Status Change"
RUN_ENDED_STATUSES = ("SUCCEEDED", "FAILED", "TIMED_OUT", "ABORTED")

# The module whose functions the Lambda image CMD names: ``functions.handlers.<name>``.
HANDLER_MODULE = "functions.handlers"
# The Batch jobs' commands. Batch fills ``Ref::<name>`` from the SubmitJob parameters the state machine
# sends; the shard index itself comes from AWS_BATCH_JOB_ARRAY_INDEX.
TRAIN_COMMAND = ("python", "-m", "batch_jobs.train.main", "--bucket", "Ref::bucket", "--run-id", "Ref::run_id")
SEARCH_COMMAND = (
    "python", "-m", "batch_jobs.search.main",
    "--bucket", "Ref::bucket", "--run-id", "Ref::run_id", "--shards", "Ref::shards",
)  # fmt: skip
# Exit status of a Batch job that failed on a TopxError (bad input, bad artifact): Batch does not retry it.
TOPX_ERROR_EXIT = 2
# What AWS Batch itself retries, per job or per array child, as the Batch API spells a job definition's
# retryStrategy: only what infrastructure broke (an image pull, an instance or a Spot task reclaimed, a
# task that could not start). The first rule that matches decides; Batch retries when none matches, hence
# the last one. Step Functions never runs a failed job again: a TopxError, a bug or a job the queue
# cancelled for want of capacity would fail the same way, after another training or another whole array.
_EXIT_ON_TOPX_ERROR = MappingProxyType({"action": "EXIT", "onExitCode": str(TOPX_ERROR_EXIT)})
_RETRY_IMAGE_PULL = MappingProxyType({"action": "RETRY", "onReason": "CannotPullContainerError:*"})
_EXIT_OTHERWISE = MappingProxyType({"action": "EXIT", "onReason": "*"})
EC2_HOST_TERMINATED = "Host EC2*"  # the status reason of a job whose instance (On-Demand or Spot) went away
FARGATE_SPOT_INTERRUPTED = "Your Spot Task was interrupted*"
FARGATE_TASK_NOT_STARTED = "ResourceInitializationError*"
BATCH_RETRY_STRATEGIES: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "train": MappingProxyType({"attempts": 2, "evaluateOnExit": (
        _EXIT_ON_TOPX_ERROR, _RETRY_IMAGE_PULL,
        MappingProxyType({"action": "RETRY", "onStatusReason": EC2_HOST_TERMINATED}),
        _EXIT_OTHERWISE,
    )}),
    "search": MappingProxyType({"attempts": 3, "evaluateOnExit": (
        _EXIT_ON_TOPX_ERROR, _RETRY_IMAGE_PULL,
        MappingProxyType({"action": "RETRY", "onStatusReason": FARGATE_SPOT_INTERRUPTED}),
        MappingProxyType({"action": "RETRY", "onStatusReason": FARGATE_TASK_NOT_STARTED}),
        _EXIT_OTHERWISE,
    )}),
})


# --------------------------------------------------------------------------- operations: logs and metrics
# The Lambda functions log structured JSON and every function and Batch job emits CloudWatch metrics in the
# embedded metric format (Powertools for AWS Lambda prints both to stdout); infra/dashboard.py charts them.
# The stack sets the service name to its own name, so two stacks in one account keep their metrics apart.
ENV_SERVICE_NAME = "POWERTOOLS_SERVICE_NAME"  # the `service` key of each log line and dimension of each metric
DEFAULT_SERVICE_NAME = "topx"  # when ENV_SERVICE_NAME is unset (offline, tests)
METRICS_NAMESPACE = "topx"
# Every topx metric has exactly these two dimensions, both of low cardinality (never a run or a user id).
SERVICE_DIMENSION = "service"  # Powertools' name for it
STAGE_DIMENSION = "stage"  # the handler's name (prepare, ..., publish) or the job's (train, search)
METRIC_STAGE_SECONDS = "StageSeconds"  # one value per successful function invocation or job (each search shard)
METRIC_STAGE_FAILURES = "StageFailures"  # one per function invocation that raised, or job that exited non-zero
METRIC_TRAIN_EPOCHS = "TrainEpochs"  # epochs the train job ran (early stopping may end it before TOPX_EPOCHS)
METRIC_SEARCHED_USERS = "SearchedUsers"  # users one search shard wrote lists for
# From Publish, once per published run: how many users got lists, and the model's hold-out quality.
METRIC_USERS_PUBLISHED = "UsersPublished"
METRIC_RECALL = "RecallAtX"  # recall@x on the hold-out (x = TOPX_TOP_X)
METRIC_LIFT = "LiftOverPopularity"  # recall@x over recommending the most popular items' recall@x (1 = no better)
# From the compute health check (a schedule, topx.aws.health): the stack's Batch compute environments that
# cannot run jobs, INVALID or gone. AWS Batch sends no event when an environment becomes INVALID.
METRIC_COMPUTE_UNHEALTHY = "ComputeEnvironmentsUnhealthy"
ENV_COMPUTE_ENVIRONMENTS = "TOPX_COMPUTE_ENVIRONMENTS"  # the stack's compute environments' ARNs, comma-separated
