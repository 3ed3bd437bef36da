"""Configuration: hyperparameters and how a setting is resolved.

One precedence everywhere: explicit argument > environment variable > default. Environment variable
names, the search methods and which hyperparameters a deployment may set, with their ranges, are the
deploy contract's (topx/contract.py), which infra/ reads too; HyperParameters' own checks accept exactly
those ranges (tests/unit/test_contract.py).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from topx.contract import (
    DEFAULT_OBJECTIVE,
    DEFAULT_SEARCH_METHOD,
    ENV_SEARCH_METHOD,
    HISTORY_FEATURES,
    LEARNERS,
    OBJECTIVES,
    SEARCH_METHODS,
)
from topx.errors import ConfigError
from topx.params import PREDICTOR_TYPES

# What the model is trained for (OBJECTIVES, the contract's, as the dataset configuration names them):
# "ranking" (interactions are positives, every other pair a negative; the default) or "rating" (a regressor
# of the rating column, SageMaker's predictor_type "regressor").


@dataclass(frozen=True)
class HyperParameters:
    """Factorization machine hyperparameters, named as SageMaker's FM names them."""

    num_factors: int = 64
    predictor_type: str = "regressor"
    epochs: int = 30
    mini_batch_size: int = 1024
    bias_lr: float = 0.05
    linear_lr: float = 0.05
    factors_lr: float = 0.05
    bias_wd: float = 0.0
    linear_wd: float = 1e-4
    factors_wd: float = 1e-4
    bias_init_sigma: float = 0.0
    linear_init_sigma: float = 0.0
    factors_init_sigma: float = 0.01
    # Negatives sampled per positive for binary_classifier on implicit data.
    negative_samples: int = 4
    # The learner: "sgd" (mini-batch Adagrad; sampled negatives for a classifier) or "icd" (implicit
    # coordinate descent over every unobserved pair, for ranking; topx.icd).
    learner: str = "sgd"
    # icd: what all unobserved pairs weigh together relative to the observed ones (each unobserved pair
    # weighs this times the interactions' density), and the exponent of the frequency scaling of the
    # weight decay (0: plain weight decay). The ranking defaults are MODE_DEFAULTS' below.
    unobserved_weight: float = 0.1
    regularization_exponent: float = 1.0
    # icd: steps of conjugate gradients per update of id features (0: the exact solve of each feature's
    # system). Fewer flops per observed pair (k, not k^2) and no factorisation make large k affordable.
    cg_steps: int = 0
    # History features (topx.feature_index.FeatureIndex.with_history): "user" adds each user's training
    # items as user features, "item" each item's users as item features, "both" both; "none" neither.
    history_features: str = "none"
    # Early stopping: fraction of the training rows held for validation, and epochs without gain.
    validation_fraction: float = 0.1
    early_stopping_patience: int = 3
    seed: int = 42

    def __post_init__(self) -> None:
        positive_ints = ("num_factors", "epochs", "mini_batch_size")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.predictor_type not in PREDICTOR_TYPES:
            raise ConfigError(f"predictor_type must be one of {PREDICTOR_TYPES}, got {self.predictor_type!r}")
        for name in ("bias_lr", "linear_lr", "factors_lr", "bias_wd", "linear_wd", "factors_wd",
                     "bias_init_sigma", "linear_init_sigma", "factors_init_sigma", "unobserved_weight",
                     "regularization_exponent"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0.0 <= value < 1e6):
                raise ConfigError(f"{name} must be a non-negative number, got {value!r}")
        if self.learner not in LEARNERS:
            raise ConfigError(f"learner must be one of {LEARNERS}, got {self.learner!r}")
        if self.history_features not in HISTORY_FEATURES:
            raise ConfigError(f"history_features must be one of {HISTORY_FEATURES}, got {self.history_features!r}")
        if self.learner == "icd" and self.unobserved_weight <= 0:
            raise ConfigError("unobserved_weight must be > 0 for the icd learner")
        if not isinstance(self.cg_steps, int) or isinstance(self.cg_steps, bool) or self.cg_steps < 0:
            raise ConfigError(f"cg_steps must be a non-negative integer, got {self.cg_steps!r}")
        if not isinstance(self.negative_samples, int) or self.negative_samples < 1:
            raise ConfigError(f"negative_samples must be a positive integer, got {self.negative_samples!r}")
        if not (0.0 <= self.validation_fraction < 0.5):
            raise ConfigError(f"validation_fraction must be in [0, 0.5), got {self.validation_fraction!r}")
        if not isinstance(self.early_stopping_patience, int) or self.early_stopping_patience < 1:
            raise ConfigError(
                f"early_stopping_patience must be a positive integer, got {self.early_stopping_patience!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> HyperParameters:
        """Build from a mapping (e.g. SageMaker-style hyperparameters, values possibly strings)."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown hyperparameter(s): {', '.join(unknown)}")
        base = cls()
        coerced: dict[str, Any] = {}
        for name, value in values.items():
            default = getattr(base, name)
            try:
                coerced[name] = type(default)(value)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"hyperparameter {name}: cannot read {value!r} as {type(default).__name__}") from exc
        return replace(base, **coerced)


def env_or(name: str, explicit: Any, default: Any, cast: type = str) -> Any:
    """Resolve one setting: explicit argument > environment variable ``name`` > default."""
    if explicit is not None:
        return explicit
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return cast(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"environment variable {name}={raw!r} is not a valid {cast.__name__}") from exc


def search_method(explicit: str | None = None) -> str:
    """The search to recommend with: explicit argument > ``TOPX_SEARCH_METHOD`` > "exact".

    A name topx.search does not know is refused here, before any data is read.
    """
    method = env_or(ENV_SEARCH_METHOD, explicit, DEFAULT_SEARCH_METHOD)
    if method not in SEARCH_METHODS:
        raise ConfigError(f"{ENV_SEARCH_METHOD}: unknown search method {method!r}; expected one of "
                          f"{', '.join(SEARCH_METHODS)}")
    return method


# Defaults per (predictor type, learner), over HyperParameters' own. The SGD ones were chosen on
# validation carves of MovieLens 100k's training data (benchmarks/quality_ml100k.py --tune): the
# regressor wants far stronger weight decay than 1e-4, the classifier higher learning rates, more
# negatives and more epochs; early stopping ends both sooner. The icd ones on validation carves of
# MovieLens 100k and of generated data of other shapes (benchmarks/ranking.py; docs/PERFORMANCE.md).
MODE_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("regressor", "sgd"): {"epochs": 60, "linear_lr": 0.1, "factors_lr": 0.02, "linear_wd": 0.1, "factors_wd": 0.1},
    ("binary_classifier", "sgd"): {"epochs": 100, "bias_lr": 0.1, "linear_lr": 0.1, "factors_lr": 0.1,
                                   "linear_wd": 0.01, "factors_wd": 0.01, "negative_samples": 8},
    ("binary_classifier", "icd"): {"num_factors": 32, "epochs": 10, "cg_steps": 3, "unobserved_weight": 5.0,
                                   "factors_wd": 0.3, "linear_wd": 10.0, "regularization_exponent": 0.5,
                                   "factors_init_sigma": 0.01},
}


def objective_of(value: str | bool) -> str:
    """An objective name; True / False are the former ``implicit`` flag (ranking / rating)."""
    if isinstance(value, bool):
        return "ranking" if value else "rating"
    if value not in OBJECTIVES:
        raise ConfigError(f"unknown objective {value!r}: use one of {', '.join(OBJECTIVES)}")
    return value


def default_hyperparameters(objective: str | bool = DEFAULT_OBJECTIVE, **overrides: Any) -> HyperParameters:
    """The objective's defaults (``MODE_DEFAULTS``); ``overrides`` (None values ignored) win.

    "ranking" trains a binary classifier of interaction by implicit coordinate descent over every pair
    (``learner="icd"``; ``learner="sgd"`` samples negatives instead); "rating" a regressor of the rating.
    """
    ranking = objective_of(objective) == "ranking"
    chosen = {k: v for k, v in overrides.items() if v is not None}
    predictor_type = chosen.get("predictor_type", "binary_classifier" if ranking else "regressor")
    learner = chosen.get("learner", "icd" if predictor_type == "binary_classifier" and ranking else "sgd")
    if learner == "icd" and predictor_type != "binary_classifier":
        raise ConfigError("the icd learner trains for ranking (predictor_type binary_classifier); "
                          "predicting ratings takes learner sgd")
    values = {**MODE_DEFAULTS.get((predictor_type, learner), {}), "predictor_type": predictor_type,
              "learner": learner, **chosen}
    try:
        return replace(HyperParameters(), **values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc
