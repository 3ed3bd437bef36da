"""The blockwise exact scan returns exactly the brute-force top-x on every path it can take."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import topx.search.exact as search
from topx.errors import ConfigError, InputDataError
from topx.search import build_index, iter_top_x, search_top_x


def brute_force(users: np.ndarray, items: np.ndarray, x: int, seen: sp.csr_matrix | None) -> np.ndarray:
    """Top-x by float64 scores, each pair summed the same way, ties by item row; -1 past the end."""
    scores = (users[:, None, :].astype(np.float64) * items[None, :, :].astype(np.float64)).sum(-1)
    if seen is not None:
        scores[seen.toarray() != 0] = -np.inf
    out = np.full((len(users), x), -1)
    for u in range(len(users)):
        order = np.lexsort((np.arange(len(items)), -scores[u]))
        order = order[np.isfinite(scores[u][order])][:x]
        out[u, :len(order)] = order
    return out


def fm_like(rng: np.random.Generator, n_users: int, n_items: int, d: int = 9):
    """Vectors with a popularity-like item term, a shared taste and item norms spread ~2x."""
    users = rng.normal(0.2, 1.0, (n_users, d)).astype(np.float32)
    users[:, -1] = 1.0
    scale = np.exp(0.3 * rng.standard_normal(n_items))[:, None]
    items = (rng.normal(0.1, 1.0, (n_items, d)) * scale).astype(np.float32)
    return users, items


@pytest.fixture
def small_user_blocks(monkeypatch):
    monkeypatch.setattr(search, "BLOCK_USERS", 16)


@pytest.mark.parametrize("precision", ["bf16", "f32"])
@pytest.mark.parametrize("block_items", [7, 64, 1024])
def test_scan_equals_brute_force_with_and_without_seen(small_user_blocks, precision, block_items):
    rng = np.random.default_rng(block_items)
    users, items = fm_like(rng, 70, 400)
    seen = sp.random(70, 400, density=0.2, random_state=1, format="csr", dtype=np.float32)
    index = build_index(items, precision=precision, block_items=block_items)
    for s in (None, seen):
        got = search_top_x(users, items, 12, seen=s, index=index, batch_size=33)
        np.testing.assert_array_equal(got.items, brute_force(users, items, 12, s))


@pytest.mark.parametrize("precision", ["bf16", "f32"])
def test_ties_duplicates_and_negative_scores_keep_the_item_order(small_user_blocks, precision):
    rng = np.random.default_rng(5)
    users, items = fm_like(rng, 40, 300)
    items[rng.integers(0, 300, 100)] = items[3]  # a hundred copies of item 3: exact ties
    users[:10] = -np.abs(users[:10])  # every score negative for these users...
    items[:150] = np.abs(items[:150])  # ...on half the catalogue
    index = build_index(items, precision=precision, block_items=32)
    got = search_top_x(users, items, 25, index=index)
    np.testing.assert_array_equal(got.items, brute_force(users, items, 25, None))
    exact = (users[:, None, :].astype(np.float64) * items[None].astype(np.float64)).sum(-1)
    np.testing.assert_allclose(got.scores, np.take_along_axis(exact, got.items, 1), rtol=1e-6)


def test_users_who_have_seen_almost_everything_and_x_beyond_the_catalogue(small_user_blocks):
    rng = np.random.default_rng(6)
    users, items = fm_like(rng, 20, 50)
    seen = (rng.random((20, 50)) < 0.5).astype(np.float32)
    seen[0] = 1.0
    seen[1] = 1.0
    seen[1, [7, 44]] = 0.0
    seen = sp.csr_matrix(seen)
    got = search_top_x(users, items, 60, seen=seen, index=build_index(items, block_items=8))
    np.testing.assert_array_equal(got.items, brute_force(users, items, 60, seen))
    assert (got.items[0] == -1).all() and np.isneginf(got.scores[0]).all()
    assert list(got.items[1, :2]) in ([7, 44], [44, 7]) and (got.items[1, 2:] == -1).all()


def test_memory_mapped_users_in_batches_that_split_user_blocks(tmp_path, small_user_blocks):
    rng = np.random.default_rng(7)
    users, items = fm_like(rng, 101, 200)
    np.save(tmp_path / "users.npy", users)
    mapped = np.load(tmp_path / "users.npy", mmap_mode="r")
    index = build_index(items, block_items=50)
    seen = sp.random(101, 200, density=0.1, random_state=2, format="csr")
    batches = list(iter_top_x(mapped, items, 5, seen=seen, index=index, batch_size=37, threads=3))
    assert [len(rows) for rows, _, _ in batches] == [37, 37, 27]
    got = np.concatenate([b for _, b, _ in batches])
    np.testing.assert_array_equal(got, brute_force(users, items, 5, seen))
    one_thread = search_top_x(users, items, 5, seen=seen, index=index)
    np.testing.assert_array_equal(one_thread.items, got)


def test_the_bf16_error_bound_holds_on_real_gemm_output():
    rng = np.random.default_rng(8)
    users, items = fm_like(rng, 256, 2048, d=65)
    reduced = torch.mm(torch.from_numpy(users).bfloat16(), torch.from_numpy(items).bfloat16().T).double().numpy()
    exact = users.astype(np.float64) @ items.astype(np.float64).T
    bound = search._ErrorModel.of("bf16", 65).unshifted * np.outer(np.linalg.norm(users, axis=1),
                                                                    np.linalg.norm(items, axis=1))
    assert (np.abs(reduced - exact) <= bound).all()
    # The bound is not vacuous: the worst error uses a fair share of it.
    assert (np.abs(reduced - exact) / bound).max() > 0.01
    # Shifted as the scan shifts it: [u, -t] . [v, 1], t exact in bf16, near each user's scores.
    errors = search._ErrorModel.of("bf16", 65)
    t = torch.from_numpy(np.quantile(exact, 0.99, axis=1)).bfloat16()
    queries = torch.cat([torch.from_numpy(users).bfloat16(), -t[:, None]], dim=1)
    keys = torch.cat([torch.from_numpy(items).bfloat16(), torch.ones(len(items), 1, dtype=torch.bfloat16)], dim=1)
    shifted = torch.mm(queries, keys.T).double().numpy()
    t64 = t.double().numpy()[:, None]
    allowed = (errors.inputs * np.outer(np.linalg.norm(users, axis=1), np.linalg.norm(items, axis=1))
               + errors.shift * np.abs(t64) + errors.output * np.abs(shifted))
    assert (np.abs(shifted - (exact - t64)) <= allowed).all()


def test_the_probe_catches_a_bf16_accumulator(monkeypatch):
    search._bf16_gemm_keeps_the_bound.cache_clear()
    real_mm = torch.mm

    def bf16_accumulating_mm(a, b, **kwargs):
        out = torch.zeros(a.shape[0], b.shape[1], dtype=a.dtype)
        for j in range(a.shape[1]):
            out = (out + a[:, j:j + 1] * b[j:j + 1, :]).to(a.dtype)
        return out

    monkeypatch.setattr(torch, "mm", bf16_accumulating_mm)
    try:
        assert not search._bf16_gemm_keeps_the_bound()
        with pytest.raises(ConfigError, match="bf16"):
            build_index(np.ones((4, 3), np.float32), precision="bf16")
        assert build_index(np.ones((4, 3), np.float32)).precision == "f32"
    finally:
        monkeypatch.setattr(torch, "mm", real_mm)
        search._bf16_gemm_keeps_the_bound.cache_clear()


def test_index_options_are_checked():
    items = np.ones((5, 3), np.float32)
    with pytest.raises(ConfigError, match="precision"):
        build_index(items, precision="fp8")
    with pytest.raises(ConfigError, match="approximate"):
        build_index(items, m=16)
    with pytest.raises(InputDataError, match="index holds"):
        search_top_x(np.ones((2, 3), np.float32), np.ones((6, 3), np.float32), 2, index=build_index(items))
    with pytest.raises(ConfigError, match="batch_size"):
        search_top_x(np.ones((2, 3), np.float32), items, 2, batch_size=0)


@pytest.mark.parametrize("method", ["hnsw", "ivf"])
def test_approximate_search_excludes_seen_items_and_ranks_what_it_finds_exactly(method):
    rng = np.random.default_rng(9)
    users, items = fm_like(rng, 60, 1500, d=16)
    seen = sp.random(60, 1500, density=0.05, random_state=3, format="csr")
    heavy = np.argsort(-(users[0].astype(np.float64) @ items.T.astype(np.float64)))[:300]
    seen = sp.lil_matrix(seen)
    seen[0, heavy] = 1.0  # user 0 has seen their 300 best items: found only by fetching deeper
    seen = seen.tocsr()
    index = build_index(items, method=method, breadth=64 if method == "ivf" else 256)
    got = search_top_x(users, items, 10, seen=seen, index=index)
    exact = search_top_x(users, items, 10, seen=seen)
    assert (got.items >= 0).all()
    assert not any(seen[u, got.items[u]].toarray().any() for u in range(60))
    recall = np.mean([len(set(got.items[u]) & set(exact.items[u])) / 10 for u in range(60)])
    assert recall > (0.9 if method == "hnsw" else 0.5)
    scores = (users[:, None, :].astype(np.float64) * items[got.items].astype(np.float64)).sum(-1)
    np.testing.assert_allclose(got.scores, scores, rtol=1e-6)
    assert (np.diff(got.scores, axis=1) <= 0).all()


def test_unknown_search_method_is_refused():
    with pytest.raises(ConfigError, match="method"):
        build_index(np.ones((5, 3), np.float32), method="lsh")
    with pytest.raises(ConfigError, match="method"):
        search_top_x(np.ones((2, 3), np.float32), np.ones((5, 3), np.float32), 2, method="annoy")


def test_torch_threads_are_the_callers_between_batches():
    rng = np.random.default_rng(10)
    users, items = fm_like(rng, 30, 50)
    before = torch.get_num_threads()
    batches = iter_top_x(users, items, 3, batch_size=10)
    next(batches)
    assert torch.get_num_threads() == before
    list(batches)
    assert torch.get_num_threads() == before
