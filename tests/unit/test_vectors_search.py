"""The recipe's identity and the exactness of the search, checked against brute-force FM scoring."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from topx.errors import ArtifactFormatError, ConfigError, InputDataError
from topx.feature_index import FeatureIndex
from topx.fm import predict
from topx.params import FMParams
from topx.search import search_top_x
from topx.vectors import RecipeVectors, export_vectors


def random_model(seed: int = 0, n_users: int = 120, n_items: int = 300, k: int = 6):
    rng = np.random.default_rng(seed)
    uf = sp.random(n_users, 4, density=0.5, random_state=seed, format="csr", dtype=np.float32)
    itf = sp.random(n_items, 5, density=0.4, random_state=seed + 1, format="csr", dtype=np.float32)
    fi = FeatureIndex.build([f"u{i}" for i in range(n_users)], [f"i{i}" for i in range(n_items)],
                            uf, [f"uf{j}" for j in range(4)], itf, [f"if{j}" for j in range(5)])
    params = FMParams(rng.normal(), rng.normal(0, 0.5, fi.n_features), rng.normal(0, 0.5, (fi.n_features, k)))
    return fi, params


def brute_force_scores(fi: FeatureIndex, params: FMParams, users: np.ndarray) -> np.ndarray:
    """(len(users), n_items) FM scores of x_u + x_i, computed pair by pair from the definition."""
    rows = [predict(params, fi.user_x[[u] * fi.n_items] + fi.item_x) for u in users]
    return np.vstack(rows)


def test_inner_product_plus_user_constant_is_the_fm_score():
    fi, params = random_model()
    vec = export_vectors(params, fi)
    assert vec.user_vectors.shape == (fi.n_users, params.num_factors + 1)
    assert vec.item_vectors.shape == (fi.n_items, params.num_factors + 1)
    np.testing.assert_array_equal(vec.user_vectors[:, -1], 1.0)
    rng = np.random.default_rng(1)
    users, items = rng.integers(0, fi.n_users, 500), rng.integers(0, fi.n_items, 500)
    lhs = (vec.user_vectors[users].astype(np.float64) * vec.item_vectors[items]).sum(axis=1) + vec.user_constants[users]
    rhs = predict(params, fi.user_x[users] + fi.item_x[items])
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5, atol=1e-5)


def test_one_hot_items_give_exactly_the_recipe_vectors():
    rng = np.random.default_rng(2)
    fi = FeatureIndex.one_hot(["a", "b"], ["x", "y", "z"])
    params = FMParams(0.1, rng.normal(size=5), rng.normal(size=(5, 3)))
    vec = export_vectors(params, fi)
    # a_i = concat(V^T x_i, w^T x_i) with x_i the id one-hot.
    np.testing.assert_allclose(vec.item_vectors[:, :3], params.factors[2:5], rtol=1e-6)
    np.testing.assert_allclose(vec.item_vectors[:, 3], params.linear[2:5], rtol=1e-6)
    np.testing.assert_allclose(vec.user_vectors[:, :3], params.factors[0:2], rtol=1e-6)


def test_top_x_by_inner_product_equals_brute_force_fm_ranking():
    fi, params = random_model(seed=3)
    vec = export_vectors(params, fi)
    x = 15
    top = search_top_x(vec.user_vectors, vec.item_vectors, x, batch_size=32)
    users = np.arange(0, fi.n_users, 7)
    scores = brute_force_scores(fi, params, users)
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :x]
    np.testing.assert_array_equal(top.items[users], expected)
    got = top.scores[users] + vec.user_constants[users][:, None]
    np.testing.assert_allclose(got, np.take_along_axis(scores, expected, axis=1), rtol=1e-4, atol=1e-4)


def test_seen_items_are_excluded_without_losing_exactness():
    fi, params = random_model(seed=4)
    vec = export_vectors(params, fi)
    rng = np.random.default_rng(5)
    # Some users have seen most of their best items, one has seen nearly everything.
    seen = sp.lil_matrix((fi.n_users, fi.n_items), dtype=np.float32)
    scores_all = brute_force_scores(fi, params, np.arange(fi.n_users))
    for u in range(fi.n_users):
        best = np.argsort(-scores_all[u])[: rng.integers(0, 40)]
        seen[u, best] = 1
    seen[0, :] = 1
    seen[0, [5, 9]] = 0
    seen = seen.tocsr()
    seen.eliminate_zeros()
    x = 10
    top = search_top_x(vec.user_vectors, vec.item_vectors, x, seen=seen, batch_size=16)
    for u in range(1, fi.n_users):
        masked = np.where(seen[u].toarray().ravel() > 0, -np.inf, scores_all[u])
        np.testing.assert_array_equal(top.items[u], np.argsort(-masked, kind="stable")[:x])
    # The user who has seen all but two items gets those two, then nothing.
    assert sorted(top.items[0, :2]) == [5, 9]
    assert (top.items[0, 2:] == -1).all()
    assert np.isneginf(top.scores[0, 2:]).all()


@pytest.mark.parametrize("method", ["exact", "faiss"])
def test_every_user_gets_x_items_and_ties_are_ordered_by_item(method):
    user_vectors = np.ones((3, 2), np.float32)
    item_vectors = np.array([[1, 0], [0, 1], [1, 0], [0.5, 0.5], [0, 1]], np.float32)  # every score 1
    top = search_top_x(user_vectors, item_vectors, 4, method=method)
    np.testing.assert_array_equal(top.items, np.tile([0, 1, 2, 3], (3, 1)))
    again = search_top_x(user_vectors, item_vectors, 4, batch_size=1, method=method)
    np.testing.assert_array_equal(again.items, top.items)


def faiss_case(seed: int = 7):
    """FM vectors, float64 scores, and seen items: most users have seen some of their best items,
    user 0 their 350 best (found only by fetching deeper), user 1 all but three."""
    fi, params = random_model(seed=seed, n_users=150, n_items=400)
    vec = export_vectors(params, fi)
    scores = vec.user_vectors.astype(np.float64) @ vec.item_vectors.astype(np.float64).T
    rng = np.random.default_rng(seed + 1)
    seen = sp.lil_matrix(scores.shape, dtype=np.float32)
    for u in range(fi.n_users):
        best = np.argsort(-scores[u])
        seen[u, best[: rng.integers(0, 30)]] = 1
        seen[u, rng.choice(fi.n_items, 10, replace=False)] = 1
    seen[0, np.argsort(-scores[0])[:350]] = 1
    seen[1, :] = 1
    seen[1, [17, 230, 399]] = 0
    seen = seen.tocsr()
    seen.eliminate_zeros()
    return vec, scores, seen


def assert_no_float32_ties(vec: RecipeVectors, scores: np.ndarray, x: int) -> int:
    """Check that each user's x-th and (x + 1)-th best scores are further apart than float32 scoring
    could misorder them (with room to spare), so the top-x set has one answer in float32 as in
    float64; the order inside it is decided in float64 by every method. Returns the users checked."""
    d = vec.user_vectors.shape[1]
    ranked = -np.sort(-scores, axis=1)[:, : x + 1]
    reach = np.linalg.norm(vec.user_vectors, axis=1) * np.linalg.norm(vec.item_vectors, axis=1).max()
    error = 4 * d * 2.0**-24 * reach  # well above float32 GEMM rounding
    checked = np.isfinite(ranked[:, x])
    gaps = ranked[checked, x - 1] - ranked[checked, x]
    assert (gaps > 2 * error[checked]).all(), f"near ties at the x-th place: {np.flatnonzero(checked)[gaps <= 2 * error[checked]]}"
    return int(checked.sum())


def test_faiss_flat_index_gives_the_exact_top_x_with_seen_items_excluded():
    vec, scores, seen = faiss_case()
    x = 10
    masked = np.where(seen.toarray() > 0, -np.inf, scores)
    assert assert_no_float32_ties(vec, masked, x) == 149  # every user but user 1: not vacuous
    exact = search_top_x(vec.user_vectors, vec.item_vectors, x, seen=seen)
    got = search_top_x(vec.user_vectors, vec.item_vectors, x, seen=seen, batch_size=32, method="faiss")
    np.testing.assert_array_equal(got.items, exact.items)
    np.testing.assert_allclose(got.scores, exact.scores, rtol=1e-6)
    assert got.items.dtype == np.int64 and got.scores.dtype == np.float32
    # Every user gets x items where the catalogue allows; user 1 has only three unseen ones.
    others = np.arange(len(got.items)) != 1
    assert (got.items[others] >= 0).all()
    np.testing.assert_array_equal(got.items[1, :3], np.argsort(-masked[1], kind="stable")[:3])
    assert sorted(got.items[1, :3]) == [17, 230, 399]
    assert (got.items[1, 3:] == -1).all() and np.isneginf(got.scores[1, 3:]).all()
    assert not any(seen[u, got.items[u][got.items[u] >= 0]].toarray().any() for u in range(len(got.items)))
    # User 0's best unseen items lie past the 350 seen ones.
    assert (masked[0, got.items[0]] < np.sort(scores[0])[-350]).all()


def test_faiss_flat_index_with_seen_items_included():
    vec, scores, seen = faiss_case()
    x = 10
    assert assert_no_float32_ties(vec, scores, x) == 150
    exact = search_top_x(vec.user_vectors, vec.item_vectors, x)
    got = search_top_x(vec.user_vectors, vec.item_vectors, x, method="faiss")
    np.testing.assert_array_equal(got.items, exact.items)
    np.testing.assert_array_equal(got.items, np.argsort(-scores, axis=1, kind="stable")[:, :x])
    # Seen items are recommended again: user 0's whole top-x is among the items they have seen.
    assert seen[0, got.items[0]].toarray().all()
    assert (got.items >= 0).all()


def test_catalogue_smaller_than_x_fills_what_it_can():
    top = search_top_x(np.ones((2, 3), np.float32), np.eye(3, dtype=np.float32), 5)
    assert (top.items[:, :3] >= 0).all() and (top.items[:, 3:] == -1).all()


def test_inner_product_not_l2_decides_the_ranking():
    # A long item vector with a poor direction would win under L2 of the raw vectors' norms.
    user = np.array([[1.0, 0.0]], np.float32)
    items = np.array([[0.9, 0.0], [-5.0, 5.0]], np.float32)
    assert search_top_x(user, items, 1).items[0, 0] == 0


def test_bad_arguments_are_refused():
    with pytest.raises(ConfigError):
        search_top_x(np.ones((1, 2), np.float32), np.ones((1, 2), np.float32), 0)
    with pytest.raises(InputDataError):
        search_top_x(np.ones((1, 2), np.float32), np.ones((1, 3), np.float32), 1)
    with pytest.raises(InputDataError, match="empty"):
        search_top_x(np.ones((1, 2), np.float32), np.ones((0, 2), np.float32), 1)
    fi, params = random_model()
    other = FeatureIndex.one_hot(["a"], ["b"])
    with pytest.raises(ArtifactFormatError, match="do not belong together"):
        export_vectors(params, other)


def test_vectors_round_trip_on_disk(tmp_path):
    fi, params = random_model(seed=6)
    vec = export_vectors(params, fi)
    vec.save(tmp_path)
    back = RecipeVectors.load(tmp_path)
    np.testing.assert_array_equal(back.item_vectors, vec.item_vectors)
    np.testing.assert_array_equal(back.user_constants, vec.user_constants)
    (tmp_path / "item_vectors.npy").write_bytes(b"junk")
    with pytest.raises(ArtifactFormatError):
        RecipeVectors.load(tmp_path)


def test_faiss_orders_duplicated_items_like_the_exact_scan():
    # Three distinct item vectors, thirty copies of each: ties far wider than any over-fetch.
    rng = np.random.default_rng(11)
    items = np.repeat(rng.normal(size=(3, 5)).astype(np.float32), 30, axis=0)[rng.permutation(90)]
    users = rng.normal(size=(40, 5)).astype(np.float32)
    seen = sp.random(40, 90, density=0.2, random_state=12, format="csr")
    for s in (None, seen):
        exact = search_top_x(users, items, 12, seen=s)
        got = search_top_x(users, items, 12, seen=s, method="faiss")
        np.testing.assert_array_equal(got.items, exact.items)
        np.testing.assert_allclose(got.scores, exact.scores, rtol=1e-6)
