"""Deploy-time settings: CDK context parameters, their defaults, and the environment they set.

Context values arrive as strings from ``cdk deploy -c name=value`` and as JSON values from
``cdk.json``; both are accepted. Every parameter and its default is documented in docs/DEPLOY.md.
The environment variable names, defaults and bounds shared with topx, and the hyperparameters topx
accepts, are the deploy contract's (topx/contract.py, standard library only).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Of topx, infra/ imports the contract only: the rest would drag numpy, torch and faiss into `cdk synth`.
from topx.contract import (
    DEFAULT_RETENTION_DAYS,
    DEFAULT_SHARDS,
    DEFAULT_TOP_X,
    ENV_BUCKET,
    ENV_DATASET,
    ENV_EPOCHS,
    ENV_HYPERPARAMETERS,
    ENV_MAX_RMSE,
    ENV_MIN_AUC,
    ENV_MIN_RECALL,
    ENV_NUM_FACTORS,
    ENV_RETENTION_DAYS,
    ENV_SEARCH_METHOD,
    ENV_SHARDS,
    ENV_TABLE,
    ENV_TOP_X,
    ENV_TOPIC_ARN,
    FIXED_HYPERPARAMETERS,
    HYPERPARAMETER_CHOICES,
    HYPERPARAMETER_RANGES,
    MAX_SHARDS,
    MIN_SHARDS,
    SEARCH_METHODS,
    DatasetConfigError,
    check_dataset_config,
    merge_dataset_configs,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
ASL_PATH = REPO_ROOT / "statemachine" / "pipeline.asl.json"
TRIGGER_PATH = REPO_ROOT / "statemachine" / "trigger.json"

# The train job asks for 4 vCPUs (see infra/compute.py); a smaller ceiling would leave it RUNNABLE forever.
MIN_MAX_VCPUS = 4
# Lambda's memory bounds (MB); 3008 is the most a new account's default quota allows, 10,240 Lambda's most.
DEFAULT_DATA_FUNCTION_MEMORY_MB, MAX_FUNCTION_MEMORY_MB = 3008, 10240
# The functions whose memory follows the data (its interactions, its users): data_function_memory_mb sizes them.
DATA_FUNCTIONS = ("prepare", "report")

_SCHEDULE_RE = re.compile(r"^(cron|rate)\(.+\)$")
_INSTANCE_TYPE_RE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9]+$")
# The images whose base a digest may pin (context base_image_digests), and what a digest looks like.
BASE_IMAGES = ("functions", "train", "search")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
# Context parameters that set one field of the dataset configuration each, from before there was one;
# still read, and folded into it.
DATASET_SHORTHANDS = ("time_col", "half_life_days", "since")


class SettingsError(ValueError):
    """A context parameter has a value the stack cannot be built with."""


@dataclass(frozen=True)
class DeploySettings:
    """Deploy-time choices. ``hyperparameters`` is the JSON object text the train job reads as
    ``TOPX_HYPERPARAMETERS``; it, the quality-gate thresholds and ``search_method`` are unset (no
    variable, so topx's own default holds: no threshold, the exact search) by default."""

    top_x: int = DEFAULT_TOP_X
    # Unset (no variable): the train job takes the objective's own defaults, as `topx run` does.
    num_factors: int | None = None
    epochs: int | None = None
    shards: int = DEFAULT_SHARDS
    gpu_instance_types: tuple[str, ...] = ("g5.xlarge", "g6.xlarge")
    spot: bool = False
    max_vcpus: int = 16
    schedule: str | None = None
    notification_email: str | None = None
    retention_days: int = DEFAULT_RETENTION_DAYS
    max_rmse: float | None = None
    min_auc: float | None = None
    min_recall: float | None = None
    hyperparameters: str | None = None
    search_method: str | None = None
    # The dataset configuration (topx.contract.DATASET_FIELDS) as JSON object text: TOPX_DATASET.
    dataset: str | None = None
    # (image, "sha256:...") pairs: each image's base tag (its Dockerfile's BASE_IMAGE) pinned to that digest.
    base_image_digests: tuple[tuple[str, str], ...] = ()
    # Memory (MB) of the DATA_FUNCTIONS: Prepare holds about 40 bytes per interaction, Report about
    # 470 per user (docs/PERFORMANCE.md).
    data_function_memory_mb: int = DEFAULT_DATA_FUNCTION_MEMORY_MB

    def __post_init__(self) -> None:
        for name in ("top_x", "num_factors", "epochs", "retention_days"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SettingsError(f"context {name} must be at least 1, got {getattr(self, name)}")
        if not MIN_SHARDS <= self.shards <= MAX_SHARDS:
            raise SettingsError(
                f"context shards must be in [{MIN_SHARDS}, {MAX_SHARDS}] (AWS Batch array size), got {self.shards}"
            )
        if not DEFAULT_DATA_FUNCTION_MEMORY_MB <= self.data_function_memory_mb <= MAX_FUNCTION_MEMORY_MB:
            raise SettingsError(f"context data_function_memory_mb must be in [{DEFAULT_DATA_FUNCTION_MEMORY_MB}, "
                                f"{MAX_FUNCTION_MEMORY_MB}] (Lambda's memory), got {self.data_function_memory_mb}")
        if self.max_vcpus < MIN_MAX_VCPUS:
            raise SettingsError(f"context max_vcpus must be at least {MIN_MAX_VCPUS}, got {self.max_vcpus}")
        if not self.gpu_instance_types:
            raise SettingsError("context gpu_instance_types must name at least one instance type")
        for instance_type in self.gpu_instance_types:
            if not _INSTANCE_TYPE_RE.match(instance_type):
                raise SettingsError(f"context gpu_instance_types: {instance_type!r} is not an instance type")
        if self.schedule is not None and not _SCHEDULE_RE.match(self.schedule):
            raise SettingsError(
                f"context schedule must be an EventBridge cron(...) or rate(...) expression, got {self.schedule!r}"
            )
        if self.notification_email is not None and "@" not in self.notification_email:
            raise SettingsError(
                f"context notification_email is not an e-mail address: {self.notification_email!r}"
            )
        if self.max_rmse is not None and not (math.isfinite(self.max_rmse) and self.max_rmse > 0):
            raise SettingsError(f"context max_rmse must be a finite number above 0, got {self.max_rmse}")
        for name in ("min_auc", "min_recall"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise SettingsError(f"context {name} must be a number in [0, 1], got {value}")
        if self.hyperparameters is not None:
            _check_hyperparameters(self.hyperparameters)
        if self.search_method is not None and self.search_method not in SEARCH_METHODS:
            raise SettingsError(
                f"context search_method must be one of {', '.join(SEARCH_METHODS)}, got {self.search_method!r}"
            )
        for image, digest in self.base_image_digests:
            if image not in BASE_IMAGES:
                raise SettingsError(f"context base_image_digests: unknown image {image!r}; one of {', '.join(BASE_IMAGES)}")
            if not _DIGEST_RE.match(digest):
                raise SettingsError(f"context base_image_digests: {image}: {digest!r} is not a digest (sha256: and 64 "
                                    f"lowercase hex digits)")
        if self.dataset is not None:
            try:
                checked = merge_dataset_configs(check_dataset_config(json.loads(self.dataset), deployed=True))
            except (ValueError, DatasetConfigError) as exc:
                raise SettingsError(f"context dataset: {exc}") from exc
            # One spelling of one configuration: what Prepare and the offline layer read, field by field.
            object.__setattr__(self, "dataset", json.dumps(checked, sort_keys=True) if checked else None)

    @classmethod
    def from_context(cls, get: Callable[[str], Any]) -> DeploySettings:
        """Read every parameter with ``get(name)`` (e.g. ``node.try_get_context``); absent means default."""
        defaults = cls()
        values: dict[str, Any] = {}
        for name, parse in _PARSERS.items():
            raw = get(name)
            if raw is None:
                continue
            try:
                values[name] = parse(raw)
            except (TypeError, ValueError) as exc:
                raise SettingsError(f"context {name}: cannot read {raw!r}: {exc}") from exc
        dataset = _dataset_from_context(get)
        if dataset:
            values["dataset"] = json.dumps(dataset, sort_keys=True)
        return cls(**{**_as_kwargs(defaults), **values})

    def base_image_digest(self, image: str) -> str | None:
        """The digest that pins ``image``'s base (one of BASE_IMAGES); None builds from its tag."""
        return dict(self.base_image_digests).get(image)

    def job_environment(self, *, bucket: str, table: str, topic_arn: str) -> dict[str, str]:
        """Environment every function and job gets: resource names and the deploy-time knobs."""
        return {
            ENV_BUCKET: bucket,
            ENV_TABLE: table,
            ENV_TOPIC_ARN: topic_arn,
            ENV_TOP_X: str(self.top_x),
            ENV_SHARDS: str(self.shards),
            ENV_RETENTION_DAYS: str(self.retention_days),
            **self._optional_environment(),
        }

    def _optional_environment(self) -> dict[str, str]:
        """The variables of the options that are set; an unset option emits none, so topx's own default holds."""
        thresholds = {ENV_MAX_RMSE: self.max_rmse, ENV_MIN_AUC: self.min_auc, ENV_MIN_RECALL: self.min_recall}
        environment = {name: str(float(value)) for name, value in thresholds.items() if value is not None}
        sizes = {ENV_NUM_FACTORS: self.num_factors, ENV_EPOCHS: self.epochs}
        environment.update({name: str(value) for name, value in sizes.items() if value is not None})
        if self.hyperparameters is not None:
            environment[ENV_HYPERPARAMETERS] = self.hyperparameters
        if self.search_method is not None:
            environment[ENV_SEARCH_METHOD] = self.search_method
        if self.dataset is not None:
            environment[ENV_DATASET] = self.dataset
        return environment


def _dataset_from_context(get: Callable[[str], Any]) -> dict[str, Any]:
    """Context ``dataset`` (a JSON object in cdk.json, its text, or the path of a JSON file), with the
    shorthands ``time_col``, ``half_life_days`` and ``since`` folded in; checked as Prepare checks it, each
    error naming the context parameter, the file and the field."""
    shorthands: dict[str, Any] = {}
    for name in DATASET_SHORTHANDS:
        raw = get(name)
        if isinstance(raw, str) and not raw.strip():
            continue  # `-c since=` (empty) sets none, like leaving it unset
        if raw is not None:
            shorthands[name] = _number_or_text(raw) if name == "half_life_days" else raw
    try:
        shorthand = check_dataset_config(shorthands, deployed=True, together=False)
    except DatasetConfigError as exc:
        raise SettingsError(f"context {exc.field}: {exc.reason}") from exc
    raw, where = get("dataset"), "context dataset"
    if isinstance(raw, str):
        text = raw.strip()
        if not text:
            raw = None
        elif text.startswith("{"):
            raw = _json_object(text, where)
        else:
            where = f"context dataset ({text})"
            try:
                raw = _json_object(Path(text).read_text(encoding="utf-8"), where)
            except OSError as exc:
                raise SettingsError(f"{where}: cannot read the file: {exc.strerror or exc}") from exc
    try:
        dataset = {} if raw is None else check_dataset_config(raw, deployed=True)
    except DatasetConfigError as exc:
        raise SettingsError(f"{where}: {exc}") from exc
    for name, value in shorthand.items():
        if name in dataset and dataset[name] != value:
            raise SettingsError(f"context {name} is {value!r} but {where} sets {name} {dataset[name]!r}; set it in "
                                "one place")
    try:
        return merge_dataset_configs(shorthand, dataset)
    except DatasetConfigError as exc:  # the dataset passed alone: a shorthand asks what neither sets
        if raw is None:
            raise SettingsError(f"context {exc.field}: {exc.reason}") from exc
        raise SettingsError(f"{where} with context {', '.join(shorthand)}: {exc}") from exc


def _json_object(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise SettingsError(f"{where}: not valid JSON: {exc}") from exc


def _number_or_text(raw: Any) -> Any:
    """`-c half_life_days=45` arrives as text: its number, so that the contract's check reads it as one."""
    try:
        return float(raw) if isinstance(raw, str) else raw
    except ValueError:
        return raw


def _as_kwargs(settings: DeploySettings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in (*_PARSERS, "dataset")}


def _parse_int(raw: Any) -> int:
    if isinstance(raw, bool):
        raise ValueError("expected an integer, got a boolean")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str) and re.fullmatch(r"\s*-?\d+\s*", raw):
        return int(raw)
    raise ValueError("expected an integer")


def _parse_optional_int(raw: Any) -> int | None:
    # `-c epochs=` (empty) leaves it unset: the objective's default.
    if isinstance(raw, str) and not raw.strip():
        return None
    return _parse_int(raw)


def _parse_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in {"true", "false"}:
        return raw.strip().lower() == "true"
    raise ValueError("expected true or false")


def _parse_optional_str(raw: Any) -> str | None:
    if not isinstance(raw, str):
        raise ValueError("expected a string")
    # `-c schedule=` (empty) turns the feature off, like leaving it unset.
    return raw.strip() or None


def _parse_number(raw: Any) -> float:
    if isinstance(raw, bool):
        raise ValueError("expected a number, got a boolean")
    if isinstance(raw, int | float):
        return float(raw)
    if isinstance(raw, str):
        try:
            return float(raw)
        except ValueError:
            raise ValueError("expected a number") from None
    raise ValueError("expected a number")


def _parse_optional_number(raw: Any) -> float | None:
    # `-c max_rmse=` (empty) leaves the threshold off, like leaving it unset.
    if isinstance(raw, str) and not raw.strip():
        return None
    return _parse_number(raw)


def _parse_hyperparameters(raw: Any) -> str | None:
    """A JSON object, from cdk.json or as text (`-c 'hyperparameters={"epochs": 40}'`), as JSON text."""
    if isinstance(raw, str):
        if not raw.strip():
            return None  # `-c hyperparameters=` sets none, like leaving it unset
        raw = json.loads(raw)
    if not isinstance(raw, dict):
        raise ValueError("expected a JSON object of hyperparameters")
    return json.dumps(raw)


def _check_hyperparameters(text: str) -> None:
    """Refuse what topx.aws.stages.parse_hyperparameters would refuse when the train job reads the value: a
    name the contract does not list as settable, or a value outside its range or choices."""
    try:
        values = json.loads(text)
    except ValueError as exc:
        raise SettingsError(f"context hyperparameters is not JSON ({exc}): {text!r}") from exc
    if not isinstance(values, dict):
        raise SettingsError(f"context hyperparameters must be a JSON object, got {text!r}")
    for name, value in values.items():
        if name in FIXED_HYPERPARAMETERS:
            raise SettingsError(
                f"context hyperparameters: {name} follows each upload's topx-mode metadata and cannot be set"
            )
        if name in HYPERPARAMETER_CHOICES:
            if value not in HYPERPARAMETER_CHOICES[name]:
                raise SettingsError(f"context hyperparameters: {name} must be one of "
                                    f"{', '.join(HYPERPARAMETER_CHOICES[name])}, got {value!r}")
            continue
        if name not in HYPERPARAMETER_RANGES:
            known = ", ".join([*HYPERPARAMETER_RANGES, *HYPERPARAMETER_CHOICES])
            raise SettingsError(f"context hyperparameters: unknown hyperparameter {name!r}; known: {known}")
        kind, low, high = HYPERPARAMETER_RANGES[name]
        try:
            number = _parse_int(value) if kind is int else _parse_number(value)
        except ValueError as exc:
            raise SettingsError(f"context hyperparameters: {name}: cannot read {value!r}: {exc}") from exc
        if not low <= number < high:
            bound = f"at least {low}" if high == math.inf else f"in [{low}, {high})"
            raise SettingsError(f"context hyperparameters: {name} must be {bound}, got {value!r}")


def _parse_instance_types(raw: Any) -> tuple[str, ...]:
    """A JSON list (cdk.json, or `-c 'gpu_instance_types=["g5.xlarge"]'`) or a comma-separated string."""
    if isinstance(raw, str):
        text = raw.strip()
        raw = json.loads(text) if text.startswith("[") else [part for part in text.split(",")]
    if not isinstance(raw, list | tuple) or not all(isinstance(item, str) for item in raw):
        raise ValueError("expected a list of instance type names")
    return tuple(item.strip() for item in raw if item.strip())


def _parse_digests(raw: Any) -> tuple[tuple[str, str], ...]:
    """A JSON object of image name to digest (cdk.json, or its text with -c), sorted by image."""
    if isinstance(raw, str):
        raw = json.loads(raw) if raw.strip() else {}
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise ValueError('expected a JSON object such as {"train": "sha256:..."}')
    return tuple(sorted((str(image), digest.strip()) for image, digest in raw.items()))


_PARSERS: Mapping[str, Callable[[Any], Any]] = {
    "top_x": _parse_int,
    "num_factors": _parse_optional_int,
    "epochs": _parse_optional_int,
    "shards": _parse_int,
    "gpu_instance_types": _parse_instance_types,
    "spot": _parse_bool,
    "max_vcpus": _parse_int,
    "schedule": _parse_optional_str,
    "notification_email": _parse_optional_str,
    "retention_days": _parse_int,
    "max_rmse": _parse_optional_number,
    "min_auc": _parse_optional_number,
    "min_recall": _parse_optional_number,
    "hyperparameters": _parse_hyperparameters,
    "search_method": _parse_optional_str,
    "base_image_digests": _parse_digests,
    "data_function_memory_mb": _parse_int,
}
