"""Top-x by inner product, in user batches, with seen items excluded exactly.

Inner product only: L2 on these vectors ranks by |a_i|, not by the FM score, and cosine drops
the item term's scale.

**Exact search** (the default) returns the exact top-x of the float32 vectors: ranked by their
inner product computed in float64 (each pair summed the same way, so duplicated items tie exactly
and no float32 GEMM's rounding decides an order), ties broken by item row. It costs about one
float32 GEMM of the same shapes, less on large catalogues:

1. Items are sorted by norm, largest first, and scored block by block against a block of users
   in reduced precision: bfloat16 on CPUs with bf16 matrix units (AMX, AVX512-BF16), where that
   GEMM is several times faster than float32, else float32. A reduced score's error obeys a
   proven bound (``_ErrorModel``).
2. Each user keeps a lower bound ``L`` on their x-th best exact score among unseen items. The
   query carries a shift, ``[u, -t] . [v, 1]`` with ``t`` = L less the largest error an item of the
   block can carry, so an item can reach the top x only if its shifted score is >= 0: one sign
   test per block entry, skipped for rows whose maximum is negative. Seen items are set to -inf
   inside the block first, so nothing is over-fetched.
3. The survivors (about 1.5x per user) carry [low, high] brackets on their exact scores; ``L``
   rises to the x-th best low, those whose high falls below it are dropped, and the rest are
   scored exactly and ranked.

The blocks are spread over threads, one user block per thread, each thread single-threaded in
torch: a block's work is a small GEMM plus numpy passes that release the GIL.

**FAISS exact search** (``method="faiss"``): FAISS's ``IndexFlatIP``, every item scored in
float32 by inner product. Its candidates are rescored in float64 and ranked like the exact scan's
(ties by item row); it is exact up to float32 rounding, so it can differ from the exact scan only
where two items' scores are that close at the x-th place.

**Approximate search** (``method="hnsw"`` or ``"ivf"``, FAISS inner-product indexes) is an option
for large catalogues. FAISS methods all exclude seen items exactly: fetched past, then rescored.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from topx.errors import ConfigError, InputDataError
from topx.search.exact import (
    BLOCK_ITEMS,
    BLOCK_USERS,
    DEFAULT_BATCH_SIZE,
    PRECISIONS,
    ExactIndex,
    build_exact_index,
    iter_exact,
)
from topx.search.faiss_index import (
    APPROXIMATE_METHODS,
    FAISS_METHODS,
    FaissIndex,
    _iter_approximate,
    build_approximate_index,
)

__all__ = ["APPROXIMATE_METHODS", "BLOCK_ITEMS", "BLOCK_USERS", "DEFAULT_BATCH_SIZE", "FAISS_METHODS", "PRECISIONS",
           "ExactIndex", "FaissIndex", "TopX", "build_approximate_index", "build_exact_index", "build_index",
           "iter_top_x", "search_top_x"]


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


def build_index(
    item_vectors: np.ndarray,
    *,
    method: str = "exact",
    precision: str = "auto",
    block_items: int = BLOCK_ITEMS,
    **approximate_options: int,
) -> ExactIndex | FaissIndex:
    """Prepare the item vectors (n_items, d) for :func:`iter_top_x`, once per catalogue.

    ``method="exact"`` (default): ``precision`` of the candidate scores, "auto" (bf16 where the
    CPU has bf16 matrix units, else f32), "bf16" or "f32". Results do not depend on it, only speed.
    ``method="faiss"`` (FAISS IndexFlatIP, exact in float32), ``"hnsw"`` or ``"ivf"`` (approximate):
    a FAISS inner-product index; see :func:`build_approximate_index`.
    """
    if method != "exact":
        return build_approximate_index(item_vectors, method=method, **approximate_options)
    if approximate_options:
        raise ConfigError(f"options {sorted(approximate_options)} apply to approximate methods only")
    return build_exact_index(item_vectors, precision=precision, block_items=block_items)


def search_top_x(
    user_vectors: np.ndarray,
    item_vectors: np.ndarray,
    x: int,
    *,
    seen: sp.csr_matrix | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    index: ExactIndex | FaissIndex | None = None,
    method: str = "exact",
) -> TopX:
    """Top-x items for every user by inner product. ``seen``: (n_users, n_items) CSR of items to
    exclude (None keeps everything). Ties are ordered by item row, so results are deterministic."""
    items = np.full((user_vectors.shape[0], x), -1, dtype=np.int64)
    scores = np.full((user_vectors.shape[0], x), -np.inf, dtype=np.float32)
    for rows, batch_items, batch_scores in iter_top_x(
        user_vectors, item_vectors, x, seen=seen, batch_size=batch_size, index=index, method=method
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
    index: ExactIndex | FaissIndex | None = None,
    method: str = "exact",
    threads: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (user rows, items (b, x), scores (b, x)) batch by batch: memory stays bounded by a batch.

    ``method`` (used when ``index`` is None): "exact" (default, topx's scan), "faiss" (FAISS
    IndexFlatIP, exact in float32), "hnsw" or "ivf" (approximate FAISS indexes).
    ``threads``: worker threads (default: torch's intra-op thread count, one per core).
    ``user_vectors`` may be a memory map: only one batch of it is read at a time.
    """
    _check(user_vectors, item_vectors, x)
    n_users, n_items = user_vectors.shape[0], item_vectors.shape[0]
    if seen is not None and seen.shape != (n_users, n_items):
        raise InputDataError(f"seen matrix has shape {seen.shape}, expected ({n_users}, {n_items})")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    index = build_index(item_vectors, method=method) if index is None else index
    if index.n_items != n_items:
        raise InputDataError(f"the index holds {index.n_items} items, the catalogue {n_items}")
    if isinstance(index, FaissIndex):
        yield from _iter_approximate(index, user_vectors, x, seen, batch_size)
        return
    yield from iter_exact(index, user_vectors, x, seen, batch_size, threads)


def iter_top_x_capped(
    user_vectors: np.ndarray,
    item_vectors: np.ndarray,
    x: int,
    groups: np.ndarray,
    cap: int,
    *,
    seen: sp.csr_matrix | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    method: str = "exact",
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """As :func:`iter_top_x`, with at most ``cap`` items of each group in a list (diversity).

    ``groups``: (n_items,) int, each item's group (for example its category's code); -1 for an item in
    no group, which no cap limits. The capped top-x takes at most ``cap`` items of a group, and those are
    the group's best, so it lies within the union of every group's own top-min(cap, x) (and the
    ungrouped items' top-x): each is searched exactly over its items alone, and the union is ranked by
    score (ties by item row). So the result is exact, not a greedy pass over one over-fetched list.
    """
    _check(user_vectors, item_vectors, x)
    if not isinstance(cap, int | np.integer) or cap < 1:
        raise ConfigError(f"the cap per group must be a positive integer, got {cap!r}")
    groups = np.asarray(groups)
    if groups.shape != (item_vectors.shape[0],):
        raise InputDataError(f"groups has shape {groups.shape}, expected ({item_vectors.shape[0]},)")
    seen = None if seen is None else sp.csr_matrix(seen)
    parts = []
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        depth = min(x if group < 0 else min(cap, x), len(members))
        index = build_index(np.ascontiguousarray(item_vectors[members]), method=method)
        parts.append((members, depth, index))
    n_users = user_vectors.shape[0]
    for start in range(0, n_users, batch_size):
        stop = min(start + batch_size, n_users)
        users = user_vectors[start:stop]
        found_items = []
        for members, depth, index in parts:
            part_seen = None if seen is None else seen[start:stop][:, members]
            top = search_top_x(users, item_vectors[members], depth, seen=part_seen, index=index)
            found_items.append(np.where(top.items >= 0, members[np.maximum(top.items, 0)], -1))
        items = np.hstack(found_items)
        # Ranked in float64 as the exact scan ranks, so that groups' float32 scores decide no order.
        exact = np.einsum("bd,bkd->bk", np.asarray(users, dtype=np.float64),
                          item_vectors[np.maximum(items, 0)].astype(np.float64))
        scores = np.where(items >= 0, exact, -np.inf)
        # Best score first, ties by item row; empty slots (-1, -inf) last.
        order = np.lexsort((np.where(items >= 0, items, np.iinfo(np.int64).max), -scores), axis=1)[:, :x]
        items, scores = np.take_along_axis(items, order, 1), np.take_along_axis(scores, order, 1)
        if items.shape[1] < x:
            pad = x - items.shape[1]
            items = np.pad(items, ((0, 0), (0, pad)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        yield np.arange(start, stop), items, scores.astype(np.float32)
