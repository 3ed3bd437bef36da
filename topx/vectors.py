"""The recipe's vectors: an FM repackaged so that ranking by inner product is ranking by score.

With user and item features in disjoint rows of the model, for s_u = V^T x_u and s_i = V^T x_i:

    FM(x_u + x_i) = [b + w.x_u + 0.5(|s_u|^2 - sum_j v_j^2 x_uj^2)]       (c_u: one number per user)
                  + [w.x_i + 0.5(|s_i|^2 - sum_j v_j^2 x_ij^2)]           (the item's own term)
                  + s_u . s_i

so with a_u = concat(s_u, 1) and a_i = concat(s_i, item term), a_u . a_i + c_u = FM(x_u + x_i).
When x_i is an id one-hot the item's pairwise part is zero and the item term is w^T x_i, exactly
the recipe's a_i = concat(V^T x_i, w^T x_i); with item side features the pairs inside the item
are kept, so the identity stays exact.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from topx.errors import ArtifactFormatError
from topx.feature_index import FeatureIndex
from topx.params import FMParams

USER_VECTORS = "user_vectors.npy"
ITEM_VECTORS = "item_vectors.npy"
USER_CONSTANTS = "user_constants.npy"


@dataclass(frozen=True)
class RecipeVectors:
    """user_vectors: (n_users, k+1) float32; item_vectors: (n_items, k+1) float32;
    user_constants: (n_users,) float64, the c_u of the identity."""

    user_vectors: np.ndarray
    item_vectors: np.ndarray
    user_constants: np.ndarray

    def save(self, directory: str | os.PathLike[str]) -> None:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / USER_VECTORS, self.user_vectors)
        np.save(out / ITEM_VECTORS, self.item_vectors)
        np.save(out / USER_CONSTANTS, self.user_constants)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, mmap: bool = False) -> RecipeVectors:
        path = Path(directory)
        mode = "r" if mmap else None
        try:
            user = np.load(path / USER_VECTORS, mmap_mode=mode)
            item = np.load(path / ITEM_VECTORS, mmap_mode=mode)
            const = np.load(path / USER_CONSTANTS, mmap_mode=mode)
        except (OSError, ValueError) as exc:
            raise ArtifactFormatError(f"{path}: cannot read the vectors: {exc}") from exc
        if user.ndim != 2 or item.ndim != 2 or user.shape[1] != item.shape[1] or const.shape != (user.shape[0],):
            raise ArtifactFormatError(
                f"{path}: inconsistent vector shapes user {user.shape}, item {item.shape}, constants {const.shape}"
            )
        return cls(user, item, const)


def _self_terms(x: sp.csr_matrix, params: FMParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For rows of x (n, N): s = x V (n, k), linear = x w (n,), and the pairwise part inside x (n,)."""
    v = params.factors.astype(np.float64)
    xd = sp.csr_matrix(x, dtype=np.float64)
    s = np.asarray(xd @ v)
    linear = np.asarray(xd @ params.linear.astype(np.float64)).reshape(-1)
    squares = np.asarray(xd.multiply(xd) @ (v * v).sum(axis=1)).reshape(-1)
    pairwise = 0.5 * ((s * s).sum(axis=1) - squares)
    return s, linear, pairwise


def export_vectors(params: FMParams, feature_index: FeatureIndex, users: np.ndarray | None = None) -> RecipeVectors:
    """Build a_u, a_i and c_u for every user (or the user rows ``users``) and item of the feature index."""
    if params.n_features != feature_index.n_features:
        raise ArtifactFormatError(
            f"the model has {params.n_features} feature rows but the feature index names "
            f"{feature_index.n_features}: they do not belong together"
        )
    s_u, lin_u, pair_u = _self_terms(feature_index.user_x if users is None else feature_index.user_x[users], params)
    s_i, lin_i, pair_i = _self_terms(feature_index.item_x, params)
    user_vectors = np.hstack([s_u, np.ones((s_u.shape[0], 1))]).astype(np.float32)
    item_vectors = np.hstack([s_i, (lin_i + pair_i)[:, None]]).astype(np.float32)
    user_constants = params.bias + lin_u + pair_u
    return RecipeVectors(
        np.ascontiguousarray(user_vectors), np.ascontiguousarray(item_vectors), user_constants.astype(np.float64)
    )
