"""Deploy-time settings: CDK context parameters, their defaults, and the environment variable names.

Context values arrive as strings from ``cdk deploy -c name=value`` and as JSON values from
``cdk.json``; both are accepted. Every parameter and its default is documented in docs/DEPLOY.md.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# infra/ must not import topx (it would drag torch and faiss into `cdk synth`), so the environment
# variable names the functions and jobs read are repeated here. They are defined in topx/config.py;
# tests/infra/test_infra.py checks that both modules agree.
ENV_BUCKET = "TOPX_BUCKET"
ENV_TABLE = "TOPX_TABLE"
ENV_TOPIC_ARN = "TOPX_TOPIC_ARN"
ENV_TOP_X = "TOPX_TOP_X"
ENV_NUM_FACTORS = "TOPX_NUM_FACTORS"
ENV_EPOCHS = "TOPX_EPOCHS"
ENV_SHARDS = "TOPX_SHARDS"
ENV_RETENTION_DAYS = "TOPX_RETENTION_DAYS"
ENV_HYPERPARAMETERS = "TOPX_HYPERPARAMETERS"
ENV_MAX_RMSE = "TOPX_MAX_RMSE"
ENV_MIN_AUC = "TOPX_MIN_AUC"
ENV_MIN_RECALL = "TOPX_MIN_RECALL"
ENV_SEARCH_METHOD = "TOPX_SEARCH_METHOD"

REPO_ROOT = Path(__file__).resolve().parent.parent
ASL_PATH = REPO_ROOT / "statemachine" / "pipeline.asl.json"
TRIGGER_PATH = REPO_ROOT / "statemachine" / "trigger.json"

# AWS Batch rejects array jobs with fewer than 2 children, and caps them at 10,000.
MIN_SHARDS = 2
MAX_SHARDS = 10_000
# The train job asks for 4 vCPUs (see infra/compute.py); a smaller ceiling would leave it RUNNABLE forever.
MIN_MAX_VCPUS = 4

_SCHEDULE_RE = re.compile(r"^(cron|rate)\(.+\)$")
_INSTANCE_TYPE_RE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9]+$")

# The searches topx.search.SEARCH_METHODS names, repeated for the reason the variable names are;
# tests/infra/test_infra.py checks that both agree.
SEARCH_METHODS = ("exact", "faiss", "hnsw", "ivf")


class SettingsError(ValueError):
    """A context parameter has a value the stack cannot be built with."""


@dataclass(frozen=True)
class DeploySettings:
    """Deploy-time choices. ``hyperparameters`` is the JSON object text the train job reads as
    ``TOPX_HYPERPARAMETERS``; it, the quality-gate thresholds and ``search_method`` are unset (no
    variable, so topx's own default holds: no threshold, the exact search) by default."""

    top_x: int = 10
    num_factors: int = 64
    epochs: int = 30
    shards: int = 4
    gpu_instance_types: tuple[str, ...] = ("g5.xlarge", "g6.xlarge")
    spot: bool = False
    max_vcpus: int = 16
    schedule: str | None = None
    notification_email: str | None = None
    retention_days: int = 30
    max_rmse: float | None = None
    min_auc: float | None = None
    min_recall: float | None = None
    hyperparameters: str | None = None
    search_method: str | None = None

    def __post_init__(self) -> None:
        for name in ("top_x", "num_factors", "epochs", "retention_days"):
            if getattr(self, name) < 1:
                raise SettingsError(f"context {name} must be at least 1, got {getattr(self, name)}")
        if not MIN_SHARDS <= self.shards <= MAX_SHARDS:
            raise SettingsError(
                f"context shards must be in [{MIN_SHARDS}, {MAX_SHARDS}] (AWS Batch array size), got {self.shards}"
            )
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
        return cls(**{**_as_kwargs(defaults), **values})

    def job_environment(self, *, bucket: str, table: str, topic_arn: str) -> dict[str, str]:
        """Environment every function and job gets: resource names and the deploy-time knobs."""
        return {
            ENV_BUCKET: bucket,
            ENV_TABLE: table,
            ENV_TOPIC_ARN: topic_arn,
            ENV_TOP_X: str(self.top_x),
            ENV_NUM_FACTORS: str(self.num_factors),
            ENV_EPOCHS: str(self.epochs),
            ENV_SHARDS: str(self.shards),
            ENV_RETENTION_DAYS: str(self.retention_days),
            **self._optional_environment(),
        }

    def _optional_environment(self) -> dict[str, str]:
        """The variables of the options that are set; an unset option emits none, so topx's own default holds."""
        thresholds = {ENV_MAX_RMSE: self.max_rmse, ENV_MIN_AUC: self.min_auc, ENV_MIN_RECALL: self.min_recall}
        environment = {name: str(float(value)) for name, value in thresholds.items() if value is not None}
        if self.hyperparameters is not None:
            environment[ENV_HYPERPARAMETERS] = self.hyperparameters
        if self.search_method is not None:
            environment[ENV_SEARCH_METHOD] = self.search_method
        return environment


def _as_kwargs(settings: DeploySettings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in _PARSERS}


def _parse_int(raw: Any) -> int:
    if isinstance(raw, bool):
        raise ValueError("expected an integer, got a boolean")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str) and re.fullmatch(r"\s*-?\d+\s*", raw):
        return int(raw)
    raise ValueError("expected an integer")


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
    """Refuse what topx.stages.parse_hyperparameters would refuse when the train job reads the value."""
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


_PARSERS: Mapping[str, Callable[[Any], Any]] = {
    "top_x": _parse_int,
    "num_factors": _parse_int,
    "epochs": _parse_int,
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
}

# The HyperParameters fields (topx/config.py) that TOPX_HYPERPARAMETERS may set: each one's type and the
# values topx accepts, low <= value < high. predictor_type follows each upload's topx-mode metadata
# (topx/stages.py NOT_OVERRIDABLE). Repeated here for the reason the variable names are; tests/infra/test_infra.py
# checks that topx accepts and refuses the same.
FIXED_HYPERPARAMETERS = frozenset({"predictor_type"})
HYPERPARAMETER_RANGES: Mapping[str, tuple[type, float, float]] = {
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
    "validation_fraction": (float, 0, 0.5),
    "early_stopping_patience": (int, 1, math.inf),
    "seed": (int, -math.inf, math.inf),
}
# The settable HyperParameters fields that take one of a few names.
HYPERPARAMETER_CHOICES: Mapping[str, tuple[str, ...]] = {
    "learner": ("sgd", "icd"),
}
