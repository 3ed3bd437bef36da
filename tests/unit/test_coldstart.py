"""Cold users and items: id parameters mapped from side features, and the recipe still exact."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from topx.coldstart import map_cold_parameters
from topx.feature_index import FeatureIndex
from topx.fm import predict
from topx.params import FMParams
from topx.vectors import export_vectors


def index() -> FeatureIndex:
    """4 users (the last cold) and 30 items (the last 3 cold), items with a categorical and a numeric
    feature, users with one categorical feature."""
    rng = np.random.default_rng(0)
    category = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 30)]
    size = rng.normal(size=(30, 1)).astype(np.float32)
    users = np.eye(2, dtype=np.float32)[[0, 1, 0, 1]]
    return FeatureIndex.build([f"u{j}" for j in range(4)], [f"i{j}" for j in range(30)],
                              sp.csr_matrix(users), ("g=a", "g=b"),
                              sp.csr_matrix(np.hstack([category, size])), ("c=x", "c=y", "c=z", "size"),
                              cold_users=1, cold_items=3)


def test_cold_id_parameters_follow_the_warm_ones_with_the_same_features() -> None:
    fi = index()
    k = 4
    rng = np.random.default_rng(1)
    factors = rng.normal(size=(fi.n_features, k)).astype(np.float32)
    linear = rng.normal(size=fi.n_features).astype(np.float32)
    # Warm items' id parameters are an exact linear function of [features, 1]; the cold ones are noise.
    item_features, _ = fi.side_features("item")
    design = np.hstack([item_features.toarray(), np.ones((30, 1))])
    truth = rng.normal(size=(design.shape[1], k + 1))
    ids = fi.n_users + np.arange(30)
    factors[ids[:27]], linear[ids[:27]] = (design[:27] @ truth)[:, :k], (design[:27] @ truth)[:, k]
    params = FMParams(0.1, linear, factors, "binary_classifier")

    mapped = map_cold_parameters(params, fi)
    expected = design[27:] @ truth
    np.testing.assert_allclose(mapped.factors[ids[27:]], expected[:, :k], atol=0.05)
    np.testing.assert_allclose(mapped.linear[ids[27:]], expected[:, k], atol=0.05)
    # Nothing else moves, except the cold user's id parameters (mapped from the users' feature).
    moved = np.flatnonzero(np.any(mapped.factors != factors, axis=1))
    assert set(moved) <= {3, *ids[27:].tolist()}
    # The recipe stays exact for cold rows: a_u . a_i + c_u is the FM's score.
    vectors = export_vectors(mapped, fi)
    users, items = np.repeat(np.arange(4), 30), np.tile(np.arange(30), 4)
    fm = predict(mapped, fi.user_x[users] + fi.item_x[items])
    recipe = (vectors.user_vectors[users] * vectors.item_vectors[items]).sum(1) + vectors.user_constants[users]
    np.testing.assert_allclose(recipe, fm, rtol=1e-4, atol=1e-4)


def test_without_cold_entities_the_parameters_are_returned_as_they_are() -> None:
    fi = FeatureIndex.one_hot(["a", "b"], ["x", "y"])
    params = FMParams(0.0, np.ones(4, np.float32), np.ones((4, 2), np.float32), "binary_classifier")
    mapped = map_cold_parameters(params, fi)
    np.testing.assert_array_equal(mapped.factors, params.factors)
    np.testing.assert_array_equal(mapped.linear, params.linear)
