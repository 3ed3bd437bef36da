"""Top-x by inner product, in user batches, with seen items excluded exactly.

Inner product only: L2 on these vectors ranks by |a_i|, not by the FM score, and cosine drops
the item term's scale.

**Exact search** (the default) returns the exact top-x of the float32 vectors: ranked by their
inner product (computed in float64, so no two implementations of a float32 GEMM can disagree
about it), ties broken by item row. It costs less than one float32 GEMM of the same shapes:

1. Items are sorted by norm, largest first, and scored block by block against a block of users
   in reduced precision: bfloat16 on CPUs with bf16 matrix units (AMX, AVX512-BF16), where that
   GEMM is several times faster than float32, else float32. The error of a reduced score obeys a
   proven bound, ``|s~ - s| <= c * |u| * |v|`` (see ``_error_coefficient``).
2. A running lower bound ``L`` on each user's x-th best reduced score among unseen items (taken
   from the candidates kept so far) rules out, with one vectorised compare per block, every item
   whose reduced score is below ``L - c |u| (max|v| + |v_i|)``: such an item's exact score is
   below that of x unseen items. Seen items are set to -inf inside the block before the compare.
3. The few survivors per user (typically x to 2x) are rescored exactly, and the top x taken.

The blocks are spread over threads, one user block per thread, each thread single-threaded in
torch: a block's work is a small GEMM plus numpy passes that release the GIL.

**Approximate search** (``method="hnsw"`` or ``"ivf"``, FAISS inner-product indexes) is an option
for large catalogues; seen items are still excluded exactly by over-fetching.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from topx.errors import ConfigError, InputDataError
from topx.fm import intra_op_threads

DEFAULT_BATCH_SIZE = 16384
BLOCK_USERS = 1024  # users scored together: one GEMM operand, and the unit of work of a thread
BLOCK_ITEMS = 1024  # items per block: a (1024, 1024) bf16 score block is 2 MB, one core's L2
PRECISIONS = ("auto", "bf16", "f32")

_BF16_UNIT = 2.0**-8  # unit roundoff of bfloat16: 8 significant bits, round to nearest even
_F32_UNIT = 2.0**-24
# Products below float32's normal range may be flushed to zero by bf16 matrix units.
_FLUSH_SLACK = 1e-35
_RESCORE_SLOTS = 1 << 16  # candidate slots rescored at once


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


def _error_coefficient(precision: str, d: int) -> float:
    """c such that |reduced score - exact score| <= c * sum_j |u_j v_j| <= c * |u| * |v|.

    The GEMM accumulates d products in float32 (gamma = n u / (1 - n u), n = d + 2 leaving room
    for pairwise-product instructions). In float32 the inputs and the output are exact, so gamma
    is all. In bf16 each input is rounded (relative error u each, so 2u + u^2 per product) and the
    float32 result is rounded to bf16 once more (u of its magnitude, itself at most
    (1 + gamma)(1 + u)^2 sum |u_j v_j|). One per cent on top covers the constants' own rounding.
    """
    n = d + 2
    gamma = n * _F32_UNIT / (1 - n * _F32_UNIT)
    if precision == "f32":
        return 1.01 * gamma
    u = _BF16_UNIT
    return 1.01 * ((2 * u + u * u) + gamma * (1 + u) ** 2 + u * (1 + gamma) * (1 + u) ** 2)


@functools.cache
def _bf16_gemm_keeps_the_bound() -> bool:
    """Whether torch's bf16 GEMM accumulates in float32, as the bound assumes.

    The probe: 1 + 255 terms of 2^-9 sums to ~1.498 in float32; a bf16 accumulator would stay at
    1 (1 + 2^-9 rounds back to 1), far outside the bound. Checked once per process, because the
    backend (oneDNN, MKL) picks its kernel at run time.
    """
    u = torch.ones(1, 256, dtype=torch.bfloat16)
    v = torch.full((256, 1), 2.0**-9, dtype=torch.bfloat16)
    v[0, 0] = 1.0
    exact = 1.0 + 255 * 2.0**-9
    error = abs(float(torch.mm(u, v)[0, 0]) - exact)
    return error <= _error_coefficient("bf16", 256) * float(u.float().norm() * v.float().norm())


def _native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX tiles or AVX512-BF16)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


@dataclass(frozen=True)
class ExactIndex:
    """The item catalogue prepared for the exact scan. Build with :func:`build_index`.

    order: (n_items,) item rows sorted by norm, largest first, and position: (n_items,) its
    inverse; vectors: (n_items, d) float32 and scoring: the same in the scoring precision (a torch
    tensor), both in that sorted order; norms: (n_items,) float64 norms in sorted order; block_max:
    (n_blocks,) each block's largest norm.
    """

    order: np.ndarray
    position: np.ndarray
    vectors: np.ndarray
    scoring: torch.Tensor
    norms: np.ndarray
    block_max: np.ndarray
    precision: str
    coefficient: float
    block_items: int

    @property
    def n_items(self) -> int:
        return self.vectors.shape[0]


def build_index(
    item_vectors: np.ndarray,
    *,
    method: str = "exact",
    precision: str = "auto",
    block_items: int = BLOCK_ITEMS,
    **approximate_options: int,
) -> ExactIndex | ApproximateIndex:
    """Prepare the item vectors (n_items, d) for :func:`iter_top_x`, once per catalogue.

    ``method="exact"`` (default): ``precision`` of the candidate scores, "auto" (bf16 where the
    CPU has bf16 matrix units, else f32), "bf16" or "f32". Results do not depend on it, only speed.
    ``method="hnsw"`` / ``"ivf"``: an approximate FAISS index; see :func:`build_approximate_index`.
    """
    if method != "exact":
        return build_approximate_index(item_vectors, method=method, **approximate_options)
    if approximate_options:
        raise ConfigError(f"options {sorted(approximate_options)} apply to approximate methods only")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        precision = "bf16" if _native_bf16() and _bf16_gemm_keeps_the_bound() else "f32"
    elif precision == "bf16" and not _bf16_gemm_keeps_the_bound():
        raise ConfigError("this torch build's bf16 GEMM does not accumulate in float32: use precision='f32'")
    vectors = np.ascontiguousarray(item_vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    order = np.argsort(-norms, kind="stable")
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    sorted_norms = norms[order]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    sorted_vectors = vectors[order]
    scoring = torch.from_numpy(sorted_vectors).to(dtype).contiguous()
    block_max = sorted_norms[::block_items].copy()  # sorted descending: each block's first is its largest
    return ExactIndex(order, position, sorted_vectors, scoring, sorted_norms, block_max, precision,
                      _error_coefficient(precision, vectors.shape[1]), block_items)


def search_top_x(
    user_vectors: np.ndarray,
    item_vectors: np.ndarray,
    x: int,
    *,
    seen: sp.csr_matrix | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    index: ExactIndex | ApproximateIndex | None = None,
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
    index: ExactIndex | ApproximateIndex | None = None,
    method: str = "exact",
    threads: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (user rows, items (b, x), scores (b, x)) batch by batch: memory stays bounded by a batch.

    ``method``: "exact" (default), "hnsw" or "ivf" (approximate; used when ``index`` is None).
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
    if isinstance(index, ApproximateIndex):
        yield from _iter_approximate(index, user_vectors, x, seen, batch_size)
        return
    workers = max(1, threads or torch.get_num_threads())
    seen = None if seen is None else sp.csr_matrix(seen)

    def scan(block: range) -> tuple[np.ndarray, np.ndarray]:
        users = np.array(user_vectors[block.start:block.stop], dtype=np.float32)  # a copy: maps are read-only
        return _scan(index, users, x, None if seen is None else seen[block.start:block.stop])

    with intra_op_threads(1), ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, n_users, batch_size):
            stop = min(start + batch_size, n_users)
            blocks = [range(b, min(b + BLOCK_USERS, stop)) for b in range(start, stop, BLOCK_USERS)]
            items, scores = zip(*pool.map(scan, blocks), strict=True)
            yield np.arange(start, stop), np.concatenate(items), np.concatenate(scores)


# ----------------------------------------------------------------------------- the exact scan


def _scan(index: ExactIndex, users: np.ndarray, x: int, seen: sp.csr_matrix | None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-x of one block of users (b, d) float32; ``seen``: their (b, n_items) CSR rows or None."""
    b, n, width = users.shape[0], index.n_items, index.block_items
    dtype = index.scoring.dtype
    slack = index.coefficient * np.linalg.norm(users.astype(np.float64), axis=1)  # error per unit item norm
    vmax = float(index.block_max[0])
    queries = torch.from_numpy(users).to(dtype)
    masks = _SeenBlocks(index, seen)
    cands = _Candidates(b, x, slack, vmax, index.norms)
    buffer = torch.empty((b, width), dtype=dtype)
    for j, start in enumerate(range(0, n, width)):
        stop = min(start + width, n)
        block = buffer if stop - start == width else torch.empty((b, stop - start), dtype=dtype)
        torch.mm(queries, index.scoring[start:stop].T, out=block)
        masks.apply(block, j)
        if j == 0:
            # The largest-norm items hold most users' best: their x-th best starts the bound.
            cands.raise_lower(_kth_largest_rows(block, x))
        threshold = cands.lower - slack * (vmax + index.block_max[j]) - _FLUSH_SLACK
        rows, cols, values = _survivors(block, threshold)
        cands.add(rows, cols + start, values)
        if cands.pending > 4 * x * b:
            cands.tighten()
    return _rescore_top(index, users, cands.final_positions(), x)


class _SeenBlocks:
    """The seen (user, item) pairs of a user block, grouped by the item block they fall in."""

    def __init__(self, index: ExactIndex, seen: sp.csr_matrix | None) -> None:
        self.bounds: np.ndarray | None = None
        if seen is None or seen.nnz == 0:
            return
        width = index.block_items
        rows = np.repeat(np.arange(seen.shape[0], dtype=np.int64), np.diff(seen.indptr))
        pos = index.position[seen.indices]
        block = pos // width
        n_blocks = -(-index.n_items // width)
        # A stable sort of small integers is a radix sort in numpy.
        order = np.argsort(block.astype(np.int16 if n_blocks <= np.iinfo(np.int16).max else np.int32), kind="stable")
        self.bounds = np.concatenate([[0], np.cumsum(np.bincount(block, minlength=n_blocks))])
        self.rows, self.cols = rows[order], (pos - block * width)[order]

    def apply(self, block: torch.Tensor, j: int) -> None:
        """Set the seen entries of item block j to -inf (in bf16, the bit pattern 0xFF80)."""
        if self.bounds is None:
            return
        lo, hi = self.bounds[j], self.bounds[j + 1]
        if lo == hi:
            return
        flat = self.rows[lo:hi] * block.shape[1] + self.cols[lo:hi]
        if block.dtype == torch.bfloat16:
            block.view(torch.int16).numpy().reshape(-1)[flat] = np.int16(-128)
        else:
            block.numpy().reshape(-1)[flat] = -np.inf


def _kth_largest_rows(block: torch.Tensor, k: int) -> np.ndarray:
    """(b,) the k-th largest value of each row (-inf when a row has fewer than k)."""
    w = block.shape[1]
    if w < k:
        return np.full(block.shape[0], -np.inf)
    if block.dtype == torch.bfloat16:
        # Select on 16-bit keys that order like the values: flip the magnitude bits of negatives.
        bits = block.view(torch.int16).numpy()
        keys = bits ^ ((bits >> 15) & np.int16(0x7FFF))
        kth = np.partition(keys, w - k, axis=1)[:, w - k]
        kth = kth ^ ((kth >> 15) & np.int16(0x7FFF))
        return torch.from_numpy(np.ascontiguousarray(kth)).view(torch.bfloat16).double().numpy()
    return np.partition(block.numpy(), w - k, axis=1)[:, w - k].astype(np.float64)


def _survivors(block: torch.Tensor, threshold: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, values) of the entries of ``block`` (b, w) at or above ``threshold`` (b,).

    Each threshold is first rounded down to the block's precision, so no qualifying entry is lost.
    In bf16, when every threshold is positive, the compare runs on the raw 16-bit patterns: for
    bf16 values those order like int16 among positives, and every negative value, -0 and -inf
    included, has a negative pattern.
    """
    w = block.shape[1]
    if block.dtype == torch.bfloat16 and bool((threshold > 0).all()):
        shrunk = (threshold * (1 - 2.0**-7)).astype(np.float32)  # bf16 rounding moves it up by < 2^-8
        keys = block.view(torch.int16).numpy()
        bound = torch.from_numpy(shrunk).to(torch.bfloat16).view(torch.int16).numpy()
        flat = np.flatnonzero(keys >= bound[:, None])
        values = block.view(-1)[torch.from_numpy(flat)].double().numpy() if len(flat) else np.zeros(0)
    else:
        scores = block.float().numpy()
        bound = np.nextafter(threshold.astype(np.float32), np.float32(-np.inf))
        bound = np.maximum(bound, np.finfo(np.float32).min)  # so that -inf (seen) never qualifies
        flat = np.flatnonzero(scores >= bound[:, None])
        values = scores.reshape(-1)[flat].astype(np.float64)
    return flat // w, flat % w, values


class _Candidates:
    """Candidate (user row, sorted item position, reduced score) triples of one block of users, and
    ``lower``: (b,) a lower bound on each user's x-th best reduced score among unseen items.

    A candidate can be in its user's exact top x only if its reduced score is at least
    ``lower - slack * (vmax + |v_i|)``: x unseen items score at least ``lower - slack * vmax``
    exactly, and its own reduced score is at most ``slack * |v_i|`` below its exact one.
    """

    def __init__(self, b: int, x: int, slack: np.ndarray, vmax: float, norms: np.ndarray) -> None:
        self.b, self.x, self.slack, self.vmax, self.norms = b, x, slack, vmax, norms
        self.lower = np.full(b, -np.inf)
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.pending = 0  # candidates added since the last tightening

    def raise_lower(self, bound: np.ndarray) -> None:
        self.lower = np.maximum(self.lower, bound)

    def add(self, rows: np.ndarray, pos: np.ndarray, values: np.ndarray) -> None:
        if len(rows):
            self.parts.append((rows, pos, values))
            self.pending += len(rows)

    def _dense(self) -> tuple[np.ndarray, np.ndarray]:
        """The candidates by row: values (b, m) (-inf padding) and positions (b, m) (-1 padding)."""
        if not self.parts:
            return np.full((self.b, 0), -np.inf), np.full((self.b, 0), -1, dtype=np.int64)
        rows, pos, values = (np.concatenate(a) for a in zip(*self.parts, strict=True))
        return _by_row(rows, self.b, (values, -np.inf), (pos, -1))

    def _filter(self, values: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Raise ``lower`` to each row's x-th best candidate; return which candidates may still win."""
        m = values.shape[1]
        if m >= self.x:
            self.raise_lower(np.partition(values, m - self.x, axis=1)[:, m - self.x])
        floor = self.lower[:, None] - self.slack[:, None] * (self.vmax + self.norms[np.maximum(pos, 0)])
        return (pos >= 0) & (values >= floor - _FLUSH_SLACK)

    def tighten(self) -> None:
        """Raise ``lower`` from the candidates so far and drop those that can no longer win."""
        values, pos = self._dense()
        keep = self._filter(values, pos)
        rows = np.nonzero(keep)[0]
        self.parts = [(rows, pos[keep], values[keep])]
        self.pending = 0

    def final_positions(self) -> np.ndarray:
        """(b, m) the sorted positions of the candidates that may be in each row's top x, -1 padding."""
        values, pos = self._dense()
        return np.where(self._filter(values, pos), pos, -1)


def _by_row(rows: np.ndarray, b: int, *columns: tuple[np.ndarray, float | int]) -> tuple[np.ndarray, ...]:
    """Scatter each (values (n,), fill) column into a dense (b, max count per row) array by row, in
    input order within a row, ``fill`` elsewhere."""
    # A stable sort of small integers is a radix sort in numpy: linear, unlike a lexsort.
    order = np.argsort(rows.astype(np.int16 if b <= np.iinfo(np.int16).max else np.int32), kind="stable")
    grouped = rows[order]
    counts = np.bincount(grouped, minlength=b)
    rank = np.arange(len(order)) - (np.cumsum(counts) - counts)[grouped]
    width = int(counts.max()) if len(rows) else 0
    out = []
    for values, fill in columns:
        dense = np.full((b, width), fill, dtype=values.dtype)
        dense[grouped, rank] = values[order]
        out.append(dense)
    return tuple(out)


def _rescore_top(index: ExactIndex, users: np.ndarray, positions: np.ndarray, x: int) -> tuple[np.ndarray, np.ndarray]:
    """Score each row's candidates (sorted positions (b, m), -1 padding) exactly; keep the x best.

    Exact: float64 dot products of the float32 vectors, ranked by (score descending, item row
    ascending). Returns items (b, x) int64 (-1 where a row has fewer) and scores (b, x) float32.
    """
    b = users.shape[0]
    out_items = np.full((b, x), -1, dtype=np.int64)
    out_scores = np.full((b, x), -np.inf, dtype=np.float32)
    # Drop the all-padding columns (rows' candidate counts differ), then rescore in row chunks
    # that keep the gathered (rows, m, d) vectors to a few tens of MB.
    width = int((positions >= 0).sum(axis=1).max(initial=0))
    if width == 0:
        return out_items, out_scores
    positions = -np.sort(-positions, axis=1)[:, :width]  # candidates first, padding last
    users64 = users.astype(np.float64)
    step = max(1, _RESCORE_SLOTS // width)
    for r0 in range(0, b, step):
        chunk = positions[r0:r0 + step]
        missing = chunk < 0
        safe = np.where(missing, 0, chunk)
        # Mixed float64 x float32 operands: einsum widens the gathered vectors chunk by chunk.
        exact = np.einsum("rd,rmd->rm", users64[r0:r0 + step], index.vectors.take(safe, axis=0))
        exact[missing] = -np.inf
        items = np.where(missing, np.iinfo(np.int64).max, index.order[safe])
        best = _order_rows(exact, items, x)
        top_items = np.take_along_axis(items, best, axis=1)
        top_scores = np.take_along_axis(exact, best, axis=1)
        found = np.isfinite(top_scores)
        out_items[r0:r0 + step, :best.shape[1]] = np.where(found, top_items, -1)
        out_scores[r0:r0 + step, :best.shape[1]] = np.where(found, top_scores, -np.inf)
    return out_items, out_scores


def _order_rows(scores: np.ndarray, items: np.ndarray, x: int) -> np.ndarray:
    """(rows, min(x, m)) column indices of each row's x best by (score descending, item ascending).

    One quicksort by score; only rows with an exact tie among their first x + 1 get the two-key sort.
    """
    order = np.argsort(-scores, axis=1)
    ranked = np.take_along_axis(scores, order[:, : x + 1], axis=1)
    ties = ((ranked[:, 1:] == ranked[:, :-1]) & np.isfinite(ranked[:, 1:])).any(axis=1)
    if ties.any():
        order[ties] = np.lexsort((items[ties], -scores[ties]), axis=1)
    return order[:, :x]


# ----------------------------------------------------------------------------- approximate search


@dataclass(frozen=True)
class ApproximateIndex:
    """A FAISS inner-product index over the items (HNSW or IVF), with its search-time setting."""

    index: object
    method: str
    n_items: int


def build_approximate_index(item_vectors: np.ndarray, *, method: str, **options: int) -> ApproximateIndex:
    raise ConfigError(f"unknown search method {method!r}: use 'exact'")


def _iter_approximate(
    index: ApproximateIndex, user_vectors: np.ndarray, x: int, seen: sp.csr_matrix | None, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    raise NotImplementedError

