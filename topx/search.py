"""Exact top-x by inner product (FAISS), in user batches, with seen items excluded exactly.

Inner product only: L2 on these vectors ranks by |a_i|, not by the FM score, and cosine drops
the item term's scale.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import faiss
import numpy as np
import scipy.sparse as sp

from topx.errors import ConfigError, InputDataError

DEFAULT_BATCH_SIZE = 4096


@dataclass(frozen=True)
class TopX:
    """items: (n_users, x) int64 item rows, -1 where the catalogue ran out; scores: (n_users, x) float32."""

    items: np.ndarray
    scores: np.ndarray


def _check(user_vectors: np.ndarray, item_vectors: np.ndarray, x: int) -> None:
    if not isinstance(x, (int, np.integer)) or x < 1:
        raise ConfigError(f"top-x must be a positive integer, got {x!r}")
    if user_vectors.ndim != 2 or item_vectors.ndim != 2 or user_vectors.shape[1] != item_vectors.shape[1]:
        raise InputDataError(
            f"user vectors {user_vectors.shape} and item vectors {item_vectors.shape} must be 2-D with the same width"
        )
    if item_vectors.shape[0] == 0:
        raise InputDataError("the item catalogue is empty: there is nothing to recommend")


def build_index(item_vectors: np.ndarray) -> faiss.Index:
    """An exact inner-product index over the item vectors (n_items, d) float32."""
    index = faiss.IndexFlatIP(item_vectors.shape[1])
    index.add(np.ascontiguousarray(item_vectors, dtype=np.float32))
    return index


def search_top_x(
    user_vectors: np.ndarray,
    item_vectors: np.ndarray,
    x: int,
    *,
    seen: sp.csr_matrix | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    index: faiss.Index | None = None,
) -> TopX:
    """Top-x items for every user by inner product. ``seen``: (n_users, n_items) CSR of items to
    exclude (None keeps everything). Ties are ordered by item row, so results are deterministic."""
    items = np.full((user_vectors.shape[0], x), -1, dtype=np.int64)
    scores = np.full((user_vectors.shape[0], x), -np.inf, dtype=np.float32)
    for rows, batch_items, batch_scores in iter_top_x(
        user_vectors, item_vectors, x, seen=seen, batch_size=batch_size, index=index
    ):
        items[rows] = batch_items
        scores[rows] = batch_scores
    return TopX(items, scores)


def iter_top_x(
    user_vectors: np.ndarray,
    item_vectors: np.ndarray,
    x: int,
    *,
    seen: sp.csr_matrix | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    index: faiss.Index | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (user rows, items (b, x), scores (b, x)) batch by batch: memory stays bounded by a batch.

    Users are grouped by how many items they have seen, so each batch over-fetches only as many
    candidates as its heaviest user needs: x + |seen(u)| candidates always leave x unseen ones.
    """
    _check(user_vectors, item_vectors, x)
    n_users, n_items = user_vectors.shape[0], item_vectors.shape[0]
    if seen is not None and seen.shape != (n_users, n_items):
        raise InputDataError(f"seen matrix has shape {seen.shape}, expected ({n_users}, {n_items})")
    index = build_index(item_vectors) if index is None else index
    seen_counts = np.zeros(n_users, np.int64) if seen is None else np.diff(seen.indptr)
    order = np.argsort(seen_counts, kind="stable")
    for start in range(0, n_users, batch_size):
        rows = np.sort(order[start:start + batch_size])
        queries = np.ascontiguousarray(user_vectors[rows], dtype=np.float32)
        # Fetch one extra candidate so ties at the boundary can be ordered by item row.
        fetch = min(n_items, x + int(seen_counts[rows].max()) + 1)
        cand_scores, cand_items = index.search(queries, fetch)
        if seen is not None:
            cand_scores = _mask_seen(seen, rows, cand_items, cand_scores)
        yield rows, *_take_top(cand_items, cand_scores, x)


def _mask_seen(seen: sp.csr_matrix, rows: np.ndarray, cand_items: np.ndarray, cand_scores: np.ndarray) -> np.ndarray:
    """Set the score of every (user, seen item) candidate to -inf, vectorised over the batch."""
    sub = seen[rows]
    n_items = seen.shape[1]
    seen_keys = np.repeat(np.arange(len(rows), dtype=np.int64), np.diff(sub.indptr)) * n_items + sub.indices
    seen_keys.sort()
    cand_keys = np.arange(len(rows), dtype=np.int64)[:, None] * n_items + cand_items
    pos = np.searchsorted(seen_keys, cand_keys)
    pos = np.minimum(pos, max(len(seen_keys) - 1, 0))
    hit = seen_keys[pos] == cand_keys if len(seen_keys) else np.zeros_like(cand_keys, dtype=bool)
    out = cand_scores.copy()
    out[hit | (cand_items < 0)] = -np.inf
    return out


def _take_top(cand_items: np.ndarray, cand_scores: np.ndarray, x: int) -> tuple[np.ndarray, np.ndarray]:
    """Order candidates by (score descending, item row ascending) and keep x; -1 where none left."""
    keyed_items = np.where(cand_items < 0, np.iinfo(np.int64).max, cand_items)
    order = np.lexsort((keyed_items, -cand_scores.astype(np.float64)), axis=-1)[:, :x]
    items = np.take_along_axis(cand_items, order, axis=1)
    scores = np.take_along_axis(cand_scores, order, axis=1)
    items = np.where(np.isneginf(scores), -1, items)
    if items.shape[1] < x:
        pad = x - items.shape[1]
        items = np.pad(items, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return items, scores.astype(np.float32)
