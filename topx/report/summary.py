"""What the run report shows, reduced to summaries whose size follows neither the users nor the items.

The tallies take interactions and recommendations in batches (a run directory's files, or the deployed
run's shards one at a time), keep one count per user and per item while they run, and give back
histograms, a thinned rank-frequency curve, a bounded sample of scores and a handful of sample users:
what a page of a few hundred kilobytes can carry for a million users.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

SAMPLE_USERS = 5  # users shown with their history and their list
HISTORY_SHOWN = 10  # items of a sample user's history shown
SCORE_SAMPLE = 200_000  # scores kept for the score histogram, a uniform seeded sample beyond that
CURVE_POINTS = 200  # points of the rank-frequency curve, log-spaced over the items
TITLE_COLUMNS = ("title", "name", "item_name", "product_name", "display_name", "label", "product", "headline")


def log_bins(max_value: float, per_decade: int = 8) -> np.ndarray:
    """Bin edges 1, ..., >= max_value + 1 spaced evenly on a log axis (counts of 0 are left out)."""
    top = max(float(max_value), 1.0) + 1.0
    n = max(int(np.ceil(np.log10(top) * per_decade)), 1)
    return np.unique(np.round(np.logspace(0, np.log10(top), n + 1), 6))


@dataclass
class Histogram:
    """Counts over ``edges`` (len(edges) - 1 bins), with what the values were."""

    edges: list[float]
    counts: list[float]

    @classmethod
    def of(cls, values: np.ndarray, edges: np.ndarray, weights: np.ndarray | None = None) -> Histogram:
        counts, _ = np.histogram(values, bins=edges, weights=weights)
        return cls([float(e) for e in edges], [float(c) for c in counts])


def title_column(table: pd.DataFrame | None) -> str | None:
    """The items table's column that reads as a title (``title``, ``name``, ...), or None."""
    if table is None:
        return None
    by_name = {str(c).strip().lower(): c for c in table.columns}
    for name in TITLE_COLUMNS:
        column = by_name.get(name)
        if column is not None and not pd.api.types.is_numeric_dtype(table[column]):
            return column
    return None


@dataclass
class InteractionTally:
    """Interactions per user and per item, and the items of a few chosen users, batch by batch.

    ``sample_rows``: the user rows whose items are kept (the sample users).
    """

    n_users: int
    n_items: int
    sample_rows: tuple[int, ...] = ()
    user_counts: np.ndarray = field(init=False)
    item_counts: np.ndarray = field(init=False)
    histories: dict[int, list[int]] = field(init=False)

    def __post_init__(self) -> None:
        self.user_counts = np.zeros(self.n_users, dtype=np.int64)
        self.item_counts = np.zeros(self.n_items, dtype=np.int64)
        self.histories = {row: [] for row in self.sample_rows}

    def add(self, user_rows: np.ndarray, item_rows: np.ndarray) -> None:
        """One batch of (user row, item row) pairs, (n,) each."""
        self.user_counts += np.bincount(user_rows, minlength=self.n_users)[: self.n_users]
        self.item_counts += np.bincount(item_rows, minlength=self.n_items)[: self.n_items]
        if self.histories:
            chosen = np.isin(user_rows, np.fromiter(self.histories, dtype=np.int64))
            for user, item in zip(user_rows[chosen].tolist(), item_rows[chosen].tolist(), strict=True):
                self.histories[user].append(item)

    def summary(self, n_warm_users: int, n_warm_items: int) -> dict[str, Any]:
        """The data section: sizes, density, the long tails (log-binned), the cold users and items."""
        n_interactions = int(self.item_counts.sum())
        user_edges = log_bins(self.user_counts.max(initial=0))
        item_edges = log_bins(self.item_counts.max(initial=0))
        ordered = np.sort(self.item_counts)[::-1]
        top = max(int(np.ceil(0.1 * len(ordered))), 1) if len(ordered) else 0
        return {
            "n_users": self.n_users, "n_items": self.n_items, "n_interactions": n_interactions,
            "density": n_interactions / max(self.n_users * self.n_items, 1),
            "cold_users": self.n_users - n_warm_users, "cold_items": self.n_items - n_warm_items,
            "median_per_user": float(np.median(self.user_counts[:n_warm_users])) if n_warm_users else 0.0,
            "median_per_item": float(np.median(self.item_counts[:n_warm_items])) if n_warm_items else 0.0,
            "top_10pct_items_share": float(ordered[:top].sum() / n_interactions) if n_interactions else 0.0,
            "per_user": Histogram.of(self.user_counts[self.user_counts > 0], user_edges),
            "per_item": Histogram.of(self.item_counts[self.item_counts > 0], item_edges),
        }


@dataclass
class RecommendationTally:
    """What the lists hold, from batches of the recommendations table (user_id, rank, item_id, score,
    cold_user), however many files they come in.

    ``item_ids``: the catalogue, in item-row order; ``n_warm_items``: the rows before the cold items;
    ``sample_users``: the user ids whose lists are kept; ``expected_rows``: how many rows will come
    (for the score sample's rate).
    """

    item_ids: tuple[str, ...]
    n_warm_items: int
    sample_users: tuple[str, ...] = ()
    expected_rows: int = 0
    seed: int = 0
    times_recommended: np.ndarray = field(init=False)
    lists: dict[str, list[tuple[int, str, float]]] = field(init=False)
    rows: int = field(init=False, default=0)
    users: int = field(init=False, default=0)
    cold_user_rows: int = field(init=False, default=0)
    _index: pd.Index = field(init=False)
    _scores: list[np.ndarray] = field(init=False)
    _cold: list[np.ndarray] = field(init=False)
    _rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self._index = pd.Index(self.item_ids)
        self.times_recommended = np.zeros(len(self.item_ids), dtype=np.int64)
        self.lists = {user: [] for user in self.sample_users}
        self._scores, self._cold = [], []
        self._rng = np.random.default_rng(self.seed)

    def add(self, frame: pd.DataFrame) -> None:
        rows = self._index.get_indexer(frame["item_id"].astype(str))
        known = rows >= 0  # every recommended item is in the catalogue; this keeps a stray one from counting
        self.times_recommended += np.bincount(rows[known], minlength=len(self.item_ids))
        self.rows += len(frame)
        starts = frame["rank"].to_numpy() == 1
        self.users += int(starts.sum())
        cold = frame["cold_user"].to_numpy(bool) if "cold_user" in frame.columns else np.zeros(len(frame), bool)
        self.cold_user_rows += int(cold.sum())
        rate = 1.0 if self.expected_rows <= SCORE_SAMPLE else SCORE_SAMPLE / self.expected_rows
        keep = self._rng.random(len(frame)) < rate if rate < 1.0 else np.ones(len(frame), bool)
        self._scores.append(frame["score"].to_numpy(np.float64)[keep])
        self._cold.append(cold[keep])
        if self.lists:
            chosen = frame[frame["user_id"].astype(str).isin(self.lists)]
            for user, rank, item, score in zip(chosen["user_id"].astype(str), chosen["rank"], chosen["item_id"],
                                               chosen["score"], strict=True):
                self.lists[user].append((int(rank), str(item), float(score)))

    def summary(self, item_counts: np.ndarray) -> dict[str, Any]:
        """The recommendations section. ``item_counts``: (n_items,) interactions per item in the data,
        the popularity the recommended items are set against."""
        n_items = len(self.item_ids)
        recommended = int((self.times_recommended > 0).sum())
        cold_item_rows = int(self.times_recommended[self.n_warm_items:].sum())
        edges = log_bins(item_counts.max(initial=0))
        popularity = item_counts + 1  # so that items without interactions (cold ones) fall in the first bin
        order = np.argsort(-item_counts, kind="stable")
        top = max(int(np.ceil(0.1 * n_items)), 1) if n_items else 0
        scores = np.concatenate(self._scores) if self._scores else np.zeros(0)
        cold = np.concatenate(self._cold) if self._cold else np.zeros(0, bool)
        finite = np.isfinite(scores)
        score_edges = (np.linspace(scores[finite].min(), scores[finite].max() + 1e-9, 41) if finite.any()
                       else np.linspace(0.0, 1.0, 41))
        return {
            "rows": self.rows, "users": self.users, "items_recommended": recommended,
            "coverage": recommended / max(n_items, 1),
            "cold_item_rows": cold_item_rows, "cold_item_share": cold_item_rows / max(self.rows, 1),
            "cold_user_rows": self.cold_user_rows,
            "top_10pct_items_rec_share": (float(self.times_recommended[order[:top]].sum() / self.rows)
                                          if self.rows else 0.0),
            "popularity_catalogue": Histogram.of(popularity, edges + 1),
            "popularity_recommended": Histogram.of(popularity, edges + 1, weights=self.times_recommended),
            "frequency_curve": _rank_frequency(self.times_recommended),
            "scores": Histogram.of(scores[finite & ~cold], score_edges),
            "scores_cold_users": Histogram.of(scores[finite & cold], score_edges),
            "scores_sampled": int(len(scores)), "scores_of": self.rows,
        }


def _rank_frequency(times: np.ndarray) -> dict[str, list[float]]:
    """Times each item is recommended, items sorted most recommended first, at CURVE_POINTS log-spaced ranks."""
    ordered = np.sort(times)[::-1]
    if len(ordered) == 0:
        return {"rank": [], "times": []}
    ranks = np.unique(np.round(np.logspace(0, np.log10(len(ordered)), CURVE_POINTS)).astype(np.int64))
    return {"rank": [float(r) for r in ranks], "times": [float(ordered[r - 1]) for r in ranks]}


def choose_sample_users(n_warm_users: int, n_users: int, seed: int, k: int = SAMPLE_USERS) -> tuple[int, ...]:
    """User rows to show: a seeded draw of warm users, and one cold user (the first) when there are any."""
    rng = np.random.default_rng(seed)
    n_warm = min(k - 1 if n_users > n_warm_users else k, n_warm_users)
    warm = sorted(rng.choice(n_warm_users, size=n_warm, replace=False).tolist()) if n_warm else []
    return tuple(warm + ([n_warm_users] if n_users > n_warm_users else []))


def sample_users(
    rows: tuple[int, ...],
    user_ids: tuple[str, ...],
    item_ids: tuple[str, ...],
    tally: InteractionTally,
    lists: dict[str, list[tuple[int, str, float]]],
    n_warm_users: int,
    n_warm_items: int,
    titles: dict[str, str] | None,
) -> list[dict[str, Any]]:
    """Each sample user's history (their most frequent items first, at most HISTORY_SHOWN) and list."""
    titles = titles or {}
    warm_items = set(item_ids[:n_warm_items])
    out = []
    for row in rows:
        user = user_ids[row]
        items, counts = np.unique(np.asarray(tally.histories.get(row, []), dtype=np.int64), return_counts=True)
        order = np.lexsort((items, -counts))[:HISTORY_SHOWN]
        history = [{"item_id": item_ids[items[i]], "title": titles.get(item_ids[items[i]]),
                    "times": int(counts[i])} for i in order]
        ranked = sorted(lists.get(user, []))
        out.append({
            "user_id": user, "cold": row >= n_warm_users,
            "history_size": int(tally.user_counts[row]), "history": history,
            "list": [{"rank": rank, "item_id": item, "score": score, "title": titles.get(item),
                      "cold_item": item not in warm_items} for rank, item, score in ranked],
        })
    return out


def titles_of(table: pd.DataFrame | None, item_ids: set[str]) -> dict[str, str]:
    """Titles of ``item_ids`` from the items table's title-like column (empty without one)."""
    column = title_column(table)
    if column is None or table is None:
        return {}
    present = table.index.astype(str).isin(item_ids)
    values = table.loc[present, column]
    return {str(k): str(v) for k, v in zip(values.index, values, strict=True) if not pd.isna(v)}
