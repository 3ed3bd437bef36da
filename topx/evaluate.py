"""Honest evaluation: a seeded per-user hold-out, rating/classification error, ranking at x,
and a popularity baseline computed by the same code in the same run."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.stats import rankdata

from topx.errors import ConfigError


def holdout_split(user_rows: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Per user, a random ``fraction`` of that user's rows goes to the hold-out (seeded).

    Returns a boolean mask (n,) of held-out rows. Every user keeps at least one training row, so
    a user with a single interaction is never held out entirely.
    """
    n = _checked(user_rows, fraction)
    if fraction == 0.0 or n == 0:
        return np.zeros(n, dtype=bool)
    keys = np.random.default_rng(seed).random(n)
    order = np.lexsort((keys, user_rows))  # random order per user
    del keys
    return _first_of_each_user(user_rows, order, fraction)


def temporal_split(user_rows: np.ndarray, times: np.ndarray, fraction: float) -> np.ndarray:
    """Per user, the latest ``fraction`` of that user's rows (by time; among equal times a later
    position counts as later) goes to the hold-out, with holdout_split's count rule: floor(fraction n +
    0.5) rows, at most n - 1, so every user keeps a training row. Returns a boolean mask (n,)."""
    n = _checked(user_rows, fraction)
    if fraction == 0.0 or n == 0:
        return np.zeros(n, dtype=bool)
    latest_first = np.lexsort((-np.arange(n), -np.asarray(times, dtype=np.int64), user_rows))
    return _first_of_each_user(user_rows, latest_first, fraction)


def _checked(user_rows: np.ndarray, fraction: float) -> int:
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"hold-out fraction must be in [0, 1), got {fraction!r}")
    return len(user_rows)


def _first_of_each_user(user_rows: np.ndarray, order: np.ndarray, fraction: float) -> np.ndarray:
    """(n,) bool: of each user's rows, taken in ``order`` (rows grouped by user), the first
    floor(fraction count + 0.5), at most count - 1."""
    n = len(user_rows)
    sorted_users = user_rows[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
    del sorted_users
    counts = np.diff(np.r_[starts, n])
    n_held = np.minimum(np.floor(fraction * counts + 0.5).astype(np.int64), counts - 1)
    # Held out, in ``order``: each user's first n_held positions, the ranges [start, start + n_held), marked by
    # +1 and -1 at their ends and summed (a byte per row, not an index per row: the data may be large).
    edges = np.zeros(n + 1, dtype=np.int8)
    edges[starts] += 1
    np.subtract.at(edges, starts + n_held, 1)
    mask = np.zeros(n, dtype=bool)
    mask[order] = np.cumsum(edges[:n], dtype=np.int8) > 0
    return mask


def rmse(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred, np.float64) - np.asarray(truth, np.float64)) ** 2)))


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney), ties counted half."""
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def log_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    z = np.asarray(logits, np.float64)
    y = np.asarray(labels, np.float64)
    # log(1 + e^z) - y z, computed stably.
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


@dataclass(frozen=True)
class RankingMetrics:
    recall: float
    ndcg: float
    map: float
    coverage: float
    users: int

    def as_dict(self, prefix: str, x: int) -> dict[str, float]:
        return {
            f"{prefix}recall_at_{x}": self.recall,
            f"{prefix}ndcg_at_{x}": self.ndcg,
            f"{prefix}map_at_{x}": self.map,
            f"{prefix}coverage_at_{x}": self.coverage,
        }


def ranking_metrics(top_items: np.ndarray, relevant: sp.csr_matrix, n_items: int) -> RankingMetrics:
    """Recall, NDCG and MAP at x over users with at least one relevant item, and catalogue coverage.

    top_items: (n_users, x) item rows, -1 for none; relevant: (n_users, n_items) CSR, nonzero = relevant.
    recall = hits / |relevant|; NDCG with binary gains and the ideal over min(|relevant|, x);
    AP normalised by min(|relevant|, x).
    """
    n_users, x = top_items.shape
    rel = sp.csr_matrix(relevant)
    n_rel = np.diff(rel.indptr)
    hits = _hits(top_items, rel)
    users = n_rel > 0
    discounts = 1.0 / np.log2(np.arange(2, x + 2))
    dcg = (hits * discounts).sum(axis=1)
    ideal_len = np.minimum(n_rel, x)
    ideal = np.concatenate([[0.0], np.cumsum(discounts)])[ideal_len]
    precision_at = np.cumsum(hits, axis=1) / np.arange(1, x + 1)
    ap = (precision_at * hits).sum(axis=1) / np.maximum(ideal_len, 1)
    recommended = np.unique(top_items[top_items >= 0])
    if not users.any():
        return RankingMetrics(float("nan"), float("nan"), float("nan"), len(recommended) / n_items, 0)
    return RankingMetrics(
        recall=float((hits.sum(axis=1)[users] / n_rel[users]).mean()),
        ndcg=float((dcg[users] / ideal[users]).mean()),
        map=float(ap[users].mean()),
        coverage=float(len(recommended) / max(n_items, 1)),
        users=int(users.sum()),
    )


def _hits(top_items: np.ndarray, rel: sp.csr_matrix) -> np.ndarray:
    """(n_users, x) float: 1 where the recommended item is relevant to that user."""
    n_users, x = top_items.shape
    n_items = rel.shape[1]
    rel_keys = np.repeat(np.arange(n_users, dtype=np.int64), np.diff(rel.indptr)) * n_items + rel.indices
    rel_keys.sort()
    keys = np.arange(n_users, dtype=np.int64)[:, None] * n_items + np.where(top_items < 0, 0, top_items)
    if len(rel_keys) == 0:
        return np.zeros((n_users, x))
    pos = np.minimum(np.searchsorted(rel_keys, keys), len(rel_keys) - 1)
    return ((rel_keys[pos] == keys) & (top_items >= 0)).astype(np.float64)


def popularity_top_x(train: sp.csr_matrix, x: int, *, exclude_seen: bool = True) -> np.ndarray:
    """The popularity baseline: most-interacted items first (ties by item row), seen items skipped."""
    n_users, n_items = train.shape
    popularity = np.asarray((train != 0).sum(axis=0)).reshape(-1)
    ranked = np.lexsort((np.arange(n_items), -popularity))
    out = np.full((n_users, x), -1, dtype=np.int64)
    seen_counts = np.diff(train.indptr) if exclude_seen else np.zeros(n_users, np.int64)
    fetch = min(n_items, x + int(seen_counts.max()) if n_users else x)
    cand = np.broadcast_to(ranked[:fetch], (n_users, fetch))
    if exclude_seen:
        seen_hit = _hits(cand, sp.csr_matrix(train)).astype(bool)
    else:
        seen_hit = np.zeros(cand.shape, dtype=bool)
    # A stable sort on the "seen" flag moves unseen candidates first, keeping popularity order.
    first_unseen = np.argsort(seen_hit, axis=1, kind="stable")[:, :x]
    picks = np.take_along_axis(cand, first_unseen, axis=1)
    valid = ~np.take_along_axis(seen_hit, first_unseen, axis=1)
    out[:, : picks.shape[1]] = np.where(valid, picks, -1)
    return out
