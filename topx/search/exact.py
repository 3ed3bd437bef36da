"""topx's exact top-x scan: reduced-precision candidate scores under a proven error bound, then
exact float64 rescoring (the method is described in topx.search's docstring).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from topx.errors import ConfigError
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
_RESCORE_ROWS = 128


@dataclass(frozen=True)
class _ErrorModel:
    """Bounds for a reduced score computed as [u, -t] . [v, 1] (t: a per-user shift, exact in the
    scoring precision):  |s~ - (u.v - t)| <= inputs |u||v| + shift |t| + output |s~|.

    inputs: rounding of u and v (bf16: 2u + u^2 per product) and the float32 accumulation of the
    d products (gamma, n = d + 3 leaving room for the shift term and pairwise-product
    instructions); shift: the accumulation's share on t (t x 1 is exact); output: the rounding of
    the float32 result to bf16, u / (1 - u) of the rounded value (0 in float32). One per cent on
    top covers the constants' own rounding. Shifting by t puts the output rounding, the largest
    term, on s~ near zero where a block's survivors are decided, instead of on |u.v|.
    """

    inputs: float
    shift: float
    output: float

    @classmethod
    def of(cls, precision: str, d: int) -> _ErrorModel:
        n = d + 3
        gamma = n * _F32_UNIT / (1 - n * _F32_UNIT)
        if precision == "f32":
            return cls(1.01 * gamma, 1.01 * gamma, 0.0)
        u = _BF16_UNIT
        return cls(1.01 * ((2 * u + u * u) + gamma * (1 + u) ** 2), 1.01 * gamma, 1.01 * u / (1 - u))

    @property
    def unshifted(self) -> float:
        """c with |s~ - u.v| <= c |u||v| for an unshifted score (|s~| <= (1 + inputs) |u||v|)."""
        return self.inputs + self.output * (1 + self.inputs)


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
    return error <= _ErrorModel.of("bf16", 256).unshifted * float(u.float().norm() * v.float().norm())


def _native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX tiles or AVX512-BF16)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


@dataclass(frozen=True)
class ExactIndex:
    """The item catalogue prepared for the exact scan. Build with :func:`build_index`.

    order: (n_items,) item rows sorted by norm, largest first, and position: (n_items,) its
    inverse; vectors: (n_items, d) float32 in that sorted order; scoring: (n_items, d + 1) torch
    tensor of the same in the scoring precision with a last column of ones (the shift's partner);
    norms: (n_items,) float64 norms in sorted order; block_max: (n_blocks,) each block's largest
    norm; errors: the bounds on a reduced score.
    """

    order: np.ndarray
    position: np.ndarray
    vectors: np.ndarray
    scoring: torch.Tensor
    norms: np.ndarray
    block_max: np.ndarray
    precision: str
    errors: _ErrorModel
    block_items: int

    @property
    def n_items(self) -> int:
        return self.vectors.shape[0]


def build_exact_index(item_vectors: np.ndarray, *, precision: str = "auto",
                      block_items: int = BLOCK_ITEMS) -> ExactIndex:
    """The item vectors (n_items, d) prepared for the exact scan: ``precision`` of the candidate
    scores, "auto" (bf16 where the CPU has bf16 matrix units, else f32), "bf16" or "f32". Results do
    not depend on it, only speed."""
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
    scoring = torch.ones((len(order), vectors.shape[1] + 1), dtype=dtype)
    scoring[:, :-1] = torch.from_numpy(sorted_vectors)
    block_max = sorted_norms[::block_items].copy()  # sorted descending: each block's first is its largest
    return ExactIndex(order, position, sorted_vectors, scoring, sorted_norms, block_max, precision,
                      _ErrorModel.of(precision, vectors.shape[1]), block_items)


def iter_exact(index: ExactIndex, user_vectors: np.ndarray, x: int, seen: sp.csr_matrix | None,
               batch_size: int, threads: int | None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The exact scan batch by batch, one block of users per worker thread (checked arguments: see
    topx.search.iter_top_x)."""
    n_users = user_vectors.shape[0]
    workers = max(1, threads or torch.get_num_threads())
    seen = None if seen is None else sp.csr_matrix(seen)

    def scan(block: range) -> tuple[np.ndarray, np.ndarray]:
        users = np.array(user_vectors[block.start:block.stop], dtype=np.float32)  # a copy: maps are read-only
        return _scan(index, users, x, None if seen is None else seen[block.start:block.stop])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, n_users, batch_size):
            stop = min(start + batch_size, n_users)
            blocks = [range(b, min(b + BLOCK_USERS, stop)) for b in range(start, stop, BLOCK_USERS)]
            # One torch thread per worker while the batch runs; the caller's setting between batches.
            with intra_op_threads(1):
                items, scores = zip(*pool.map(scan, blocks), strict=True)
            yield np.arange(start, stop), np.concatenate(items), np.concatenate(scores)


# ----------------------------------------------------------------------------- the exact scan


def _scan(index: ExactIndex, users: np.ndarray, x: int, seen: sp.csr_matrix | None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-x of one block of users (b, d) float32; ``seen``: their (b, n_items) CSR rows or None."""
    (b, d), n, width = users.shape, index.n_items, index.block_items
    dtype, errors = index.scoring.dtype, index.errors
    user_norms = np.linalg.norm(users.astype(np.float64), axis=1)
    queries = torch.zeros((b, d + 1), dtype=dtype)  # [u, -t]
    queries[:, :d] = torch.from_numpy(users)
    masks = _SeenBlocks(index, seen)
    cands = _Candidates(b, x)
    buffer = torch.empty((b, width), dtype=dtype)
    for j, start in enumerate(range(0, n, width)):
        stop = min(start + width, n)
        block = buffer if stop - start == width else torch.empty((b, stop - start), dtype=dtype)
        if j == 0:
            # The largest-norm items hold most users' best: x of them score at least their x-th
            # best plain reduced score less its error, which starts the lower bound.
            torch.mm(queries, index.scoring[start:stop].T, out=block)
            masks.apply(block, j)
            cands.raise_lower(_kth_largest_rows(block, x) - errors.unshifted * user_norms * index.block_max[0])
        if cands.changed:
            # Shift each user's scores by t, the bound less the largest error an item of a block
            # can carry: an item can reach the bound only if its shifted reduced score is >= 0.
            # One t per remaining block, recomputed only when the bound moves.
            margin = np.outer(index.block_max[j:], errors.inputs * user_norms)
            shifts = _round_down(cands.lower - margin - errors.shift * np.abs(cands.lower) - _FLUSH_SLACK, dtype)
            shifts[:, ~np.isfinite(cands.lower)] = 0.0  # rows without x unseen items yet: everything survives
            unbounded, first = ~np.isfinite(cands.lower), j
            cands.changed = False
        shift = shifts[j - first]
        queries[:, d] = torch.from_numpy(-shift).to(dtype)
        torch.mm(queries, index.scoring[start:stop].T, out=block)
        masks.apply(block, j)
        rows, cols, shifted = _survivors(block, unbounded)
        if len(rows):
            pos = cols + start
            value = shifted + shift[rows]
            error = (errors.inputs * user_norms[rows] * index.norms[pos] + errors.shift * np.abs(shift[rows])
                     + errors.output * np.abs(shifted) + _FLUSH_SLACK)
            cands.add(rows, pos, value - error, value + error)
        if j == 0 or cands.pending > 4 * x * b:
            cands.tighten()
    cands.tighten()
    rows, pos, _, _ = cands.arrays()
    dense, = _by_row(rows, b, (pos, -1))
    return _rescore_top(index, users, dense, x)


def _round_down(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """float64 values rounded down to ``dtype`` (bf16 or float32), returned as float64."""
    f32 = values.astype(np.float32)
    f32 = np.where(f32 > values, np.nextafter(f32, np.float32(-np.inf)), f32)
    if dtype == torch.float32:
        return f32.astype(np.float64)
    # bf16 is the top half of a float32: dropping the low half rounds toward zero, which is down
    # for positives; negatives with a non-zero low half go one bf16 step further from zero.
    bits = f32.view(np.int32)
    top = bits & np.int32(-65536)
    top = np.where((bits < 0) & ((bits & 0xFFFF) != 0), top + 65536, top).astype(np.int32)
    return top.view(np.float32).astype(np.float64)


class _SeenBlocks:
    """The seen (user, item) pairs of a user block, as flat offsets into each item block's scores."""

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
        last = index.n_items - (n_blocks - 1) * width  # the last block may be narrower
        stride = np.where(block[order] == n_blocks - 1, last, width)
        self.flat = rows[order] * stride + (pos - block * width)[order]

    def apply(self, block: torch.Tensor, j: int) -> None:
        """Set the seen entries of item block j to -inf (in bf16, the bit pattern 0xFF80)."""
        if self.bounds is None or self.bounds[j] == self.bounds[j + 1]:
            return
        flat = self.flat[self.bounds[j]:self.bounds[j + 1]]
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


def _survivors(block: torch.Tensor, everything: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, values) of the entries of the shifted ``block`` (b, w) that are >= 0, row by
    row, plus every entry above -inf in the rows flagged ``everything`` (b,).

    In bf16 the test reads the raw 16-bit patterns as int16: +0 and positives are >= 0; -0,
    negatives and -inf (seen items) are < 0. Past the first blocks few rows have any survivor, so
    a row maximum (one fast reduction) picks the rows worth searching.
    """
    b, w = block.shape
    keys = block.view(torch.int16) if block.dtype == torch.bfloat16 else block
    hit = (torch.amax(keys, dim=1) >= 0).numpy() | everything
    if not hit.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    if hit.sum() > b // 4:
        flat = np.flatnonzero(keys.numpy() >= 0)
    else:
        rows = np.flatnonzero(hit)
        r, c = np.nonzero(keys.numpy()[rows] >= 0)
        flat = rows[r] * w + c
    if everything.any():
        flat = flat[~everything[flat // w]]
        rows = np.flatnonzero(everything)
        r, c = np.nonzero(block[torch.from_numpy(rows)].float().numpy() > -np.inf)
        flat = np.sort(np.concatenate([flat, rows[r] * w + c]))
    values = block.view(-1)[torch.from_numpy(flat)].double().numpy() if len(flat) else np.zeros(0)
    return flat // w, flat % w, values


class _Candidates:
    """Candidate (user row, sorted item position, low, high) of one block of users, [low, high]
    bracketing the exact score; and ``lower``: (b,) a lower bound on each user's x-th best exact
    score among unseen items. A candidate whose high is below ``lower`` cannot be in the top x.
    """

    def __init__(self, b: int, x: int) -> None:
        self.b, self.x = b, x
        self.lower = np.full(b, -np.inf)
        self.changed = True  # whether ``lower`` moved since the shifts were computed
        self.parts: list[tuple[np.ndarray, ...]] = []
        self.pending = 0  # candidates added since the last tightening

    def raise_lower(self, bound: np.ndarray) -> None:
        raised = np.maximum(self.lower, bound)
        self.changed = self.changed or not np.array_equal(raised, self.lower)
        self.lower = raised

    def add(self, rows: np.ndarray, pos: np.ndarray, low: np.ndarray, high: np.ndarray) -> None:
        self.parts.append((rows, pos, low, high))
        self.pending += len(rows)

    def arrays(self) -> tuple[np.ndarray, ...]:
        if not self.parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
        if len(self.parts) > 1:
            self.parts = [tuple(np.concatenate(a) for a in zip(*self.parts, strict=True))]
        return self.parts[0]

    def tighten(self) -> None:
        """Raise ``lower`` to each row's x-th best low, and drop the candidates whose high is below it."""
        rows, pos, low, high = self.arrays()
        if len(rows) == 0:
            return
        dense, = _by_row(rows, self.b, (low, -np.inf))
        m = dense.shape[1]
        if m >= self.x:
            self.raise_lower(np.partition(dense, m - self.x, axis=1)[:, m - self.x])
        keep = high >= self.lower[rows]
        self.parts = [(rows[keep], pos[keep], low[keep], high[keep])]
        self.pending = 0


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
    """Score each row's candidates (sorted positions (b, m), -1 padding) exactly; keep the x best."""
    positions = -np.sort(-positions, axis=1)  # candidates first, padding last
    counts = (positions >= 0).sum(axis=1)
    items, scores = [], []
    # Row chunks, each as wide as its own fullest row, so padding costs little.
    for r0 in range(0, len(positions), _RESCORE_ROWS):
        chunk = positions[r0:r0 + _RESCORE_ROWS, : int(counts[r0:r0 + _RESCORE_ROWS].max(initial=0))]
        ids = np.where(chunk < 0, -1, index.order[np.maximum(chunk, 0)])
        top = _rescore(index.vectors, users[r0:r0 + _RESCORE_ROWS], chunk, ids, x)
        items.append(top[0])
        scores.append(top[1])
    return np.concatenate(items), np.concatenate(scores)


def _rescore(
    vectors: np.ndarray, users: np.ndarray, candidates: np.ndarray, items: np.ndarray, x: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-x among each row's candidates.

    vectors: (n, d) float32; users: (b, d) float32; candidates: (b, m) rows of ``vectors`` (-1
    padding) whose item rows are ``items`` (b, m). Exact: float64 dot products of the float32
    vectors, ranked by (score descending, item row ascending). Returns items (b, x) int64 (-1 where
    a row has fewer) and scores (b, x) float32.
    """
    b = users.shape[0]
    out_items = np.full((b, x), -1, dtype=np.int64)
    out_scores = np.full((b, x), -np.inf, dtype=np.float32)
    if candidates.shape[1] == 0:
        return out_items, out_scores
    users64 = users.astype(np.float64)
    # Row chunks keep the gathered (rows, m, d) vectors to a few tens of MB.
    step = max(1, _RESCORE_SLOTS // candidates.shape[1])
    for r0 in range(0, b, step):
        chunk = candidates[r0:r0 + step]
        missing = chunk < 0
        # Mixed float64 x float32 operands: einsum widens the gathered vectors chunk by chunk.
        exact = np.einsum("rd,rmd->rm", users64[r0:r0 + step], vectors.take(np.where(missing, 0, chunk), axis=0))
        exact[missing] = -np.inf
        ids = np.where(missing, np.iinfo(np.int64).max, items[r0:r0 + step])
        best = _order_rows(exact, ids, x)
        top_items = np.take_along_axis(ids, best, axis=1)
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

