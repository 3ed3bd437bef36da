"""FAISS indexes for topx.search: exact IndexFlatIP, approximate HNSW and IVF, seen items excluded
exactly and candidates rescored as the exact scan rescores them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from topx.errors import ConfigError
from topx.search.exact import _rescore


@dataclass(frozen=True)
class FaissIndex:
    """A FAISS inner-product index over the items, and the search-time breadth it is queried with.

    method: "faiss" (IndexFlatIP: every item scored, exact in float32; ``breadth`` unused), "hnsw"
    (graph; ``breadth`` is efSearch) or "ivf" (inverted lists; ``breadth`` is nprobe).
    vectors: (n_items, d) float32, for rescoring what the index returns.
    """

    index: object
    method: str
    breadth: int
    vectors: np.ndarray

    @property
    def n_items(self) -> int:
        return self.vectors.shape[0]


# With "exact" (topx's bounded scan, topx.search.exact), these are the methods topx.contract.SEARCH_METHODS names.
APPROXIMATE_METHODS = ("hnsw", "ivf")
FAISS_METHODS = ("faiss", *APPROXIMATE_METHODS)
HNSW_M = 32  # graph degree
HNSW_EF_CONSTRUCTION = 128
HNSW_EF_SEARCH = 128
IVF_LISTS_PER_SQRT_N = 4  # nlist = 4 sqrt(n_items)
IVF_NPROBE = 32


def build_approximate_index(
    item_vectors: np.ndarray,
    *,
    method: str,
    breadth: int | None = None,
    m: int = HNSW_M,
    ef_construction: int = HNSW_EF_CONSTRUCTION,
    nlist: int | None = None,
    seed: int = 0,
) -> FaissIndex:
    """A FAISS maximum-inner-product index (METRIC_INNER_PRODUCT) over (n_items, d).

    ``faiss``: IndexFlatIP, exact (every item scored in float32); ``breadth`` and the build options
    do not apply. ``hnsw``: IndexHNSWFlat with ``m`` links per node, built with ``ef_construction``;
    searched with efSearch = ``breadth`` (default 128). ``ivf``: IndexIVFFlat over ``nlist`` lists
    (default 4 sqrt(n)) of a k-means on inner product; searched with nprobe = ``breadth`` (default 32).
    Inner product throughout: the MIPS-to-L2 transform measured far worse with HNSW.
    """
    import faiss

    if method not in FAISS_METHODS:
        raise ConfigError(
            f"unknown search method {method!r}: use 'exact' (topx's scan, the default), 'faiss' (FAISS "
            "IndexFlatIP, exact in float32), 'hnsw' or 'ivf' (approximate FAISS indexes)"
        )
    vectors = np.ascontiguousarray(item_vectors, dtype=np.float32)
    n, d = vectors.shape
    if method == "faiss":
        index = faiss.IndexFlatIP(d)
        index.add(vectors)
        return FaissIndex(index, method, 0, vectors)
    if method == "hnsw":
        index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.add(vectors)
        return FaissIndex(index, method, breadth or HNSW_EF_SEARCH, vectors)
    lists = max(1, min(n, nlist or int(IVF_LISTS_PER_SQRT_N * np.sqrt(n))))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, lists, faiss.METRIC_INNER_PRODUCT)
    sample = vectors[np.random.default_rng(seed).permutation(n)[: min(n, 64 * lists)]]
    index.cp.seed = seed
    index.train(sample)
    index.add(vectors)
    return FaissIndex(index, method, min(lists, breadth or IVF_NPROBE), vectors)


def _iter_approximate(
    index: FaissIndex, user_vectors: np.ndarray, x: int, seen: sp.csr_matrix | None, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Top-x from a FAISS index per batch, seen items excluded: fetch 2x from the index, drop seen
    items, and fetch again, x + |seen| deep, only for the users left with fewer than x; then rescore
    what was found exactly and keep the x best (ties by item row).

    ``faiss`` (IndexFlatIP) keeps x more unseen candidates than that (fetching 2x also without
    seen items, refetching for users left with fewer than 2x, 2x + |seen| deep), so that items whose
    float32 scores tie or nearly tie at the x-th place are all rescored and ranked in float64.
    """
    n_users = user_vectors.shape[0]
    seen = None if seen is None else sp.csr_matrix(seen)
    slack = x if index.method == "faiss" else 0
    for start in range(0, n_users, batch_size):
        rows = np.arange(start, min(start + batch_size, n_users))
        users = np.ascontiguousarray(user_vectors[start:rows[-1] + 1], dtype=np.float32)
        batch_seen = None if seen is None else seen[start:rows[-1] + 1]
        first = 2 * x if batch_seen is not None or slack else x
        found = _fetch(index, users, min(index.n_items, first), batch_seen)
        if batch_seen is not None:
            counts = np.diff(batch_seen.indptr)
            short = np.flatnonzero(((found >= 0).sum(axis=1) < x + slack) & (counts > 0))
            if len(short):
                depth = x + slack + int(counts[short].max())
                deep = _fetch(index, users[short], min(index.n_items, depth), batch_seen[short])
                found = np.pad(found, ((0, 0), (0, max(0, deep.shape[1] - found.shape[1]))), constant_values=-1)
                found[short, :deep.shape[1]] = deep
                found[short, deep.shape[1]:] = -1
        yield rows, *_rescore(index.vectors, users, found, found, x)


def _fetch(index: FaissIndex, users: np.ndarray, k: int, seen: sp.csr_matrix | None) -> np.ndarray:
    """(b, k) item rows the index returns for the users, seen ones replaced by -1."""
    _set_breadth(index, k)
    _, found = index.index.search(users, k)
    return found if seen is None else _drop_seen(seen, found)


def _set_breadth(index: FaissIndex, fetch: int) -> None:
    if index.method == "hnsw":
        index.index.hnsw.efSearch = max(index.breadth, fetch)  # HNSW returns at most efSearch results
    elif index.method == "ivf":
        index.index.nprobe = index.breadth


def _drop_seen(seen_rows: sp.csr_matrix, found: np.ndarray) -> np.ndarray:
    """found (b, k) item rows (-1 = none) with every seen (user, item) pair replaced by -1."""
    n_items = seen_rows.shape[1]
    b = found.shape[0]
    seen_keys = np.repeat(np.arange(b, dtype=np.int64), np.diff(seen_rows.indptr)) * n_items + seen_rows.indices
    seen_keys.sort()
    keys = np.arange(b, dtype=np.int64)[:, None] * n_items + found
    if len(seen_keys) == 0:
        return found
    pos = np.minimum(np.searchsorted(seen_keys, keys), len(seen_keys) - 1)
    return np.where((seen_keys[pos] == keys) | (found < 0), -1, found)
