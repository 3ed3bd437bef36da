"""The trained factorization machine's parameters, as plain arrays.

This is the common currency between the trainer, the model artifact codec and the recipe's
vectors: nothing here depends on PyTorch or on a file format.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from topx.errors import ArtifactFormatError

PREDICTOR_TYPES = ("regressor", "binary_classifier")


@dataclass(frozen=True)
class FMParams:
    """y(x) = bias + linear . x + sum_{j<l} <factors_j, factors_l> x_j x_l.

    bias: float; linear: (n_features,) float32; factors: (n_features, k) float32.
    For ``binary_classifier`` the FM output is a logit.
    """

    bias: float
    linear: np.ndarray
    factors: np.ndarray
    predictor_type: str = "regressor"

    def __post_init__(self) -> None:
        linear = np.asarray(self.linear, dtype=np.float32).reshape(-1)
        factors = np.asarray(self.factors, dtype=np.float32)
        if factors.ndim != 2:
            raise ArtifactFormatError(f"factors must be 2-D (n_features, k), got shape {factors.shape}")
        if factors.shape[0] != linear.shape[0]:
            raise ArtifactFormatError(
                f"linear has {linear.shape[0]} rows but factors has {factors.shape[0]}: they must match"
            )
        if self.predictor_type not in PREDICTOR_TYPES:
            raise ArtifactFormatError(
                f"predictor_type must be one of {PREDICTOR_TYPES}, got {self.predictor_type!r}"
            )
        object.__setattr__(self, "linear", linear)
        object.__setattr__(self, "factors", factors)
        object.__setattr__(self, "bias", float(self.bias))

    @property
    def n_features(self) -> int:
        return int(self.linear.shape[0])

    @property
    def num_factors(self) -> int:
        return int(self.factors.shape[1])
