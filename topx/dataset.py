"""The interactions a run trains on: reading them (and the optional feature tables) into a Dataset.

``load_dataset`` reads, validates, aggregates and indexes the interactions file as ``topx run`` and the
Prepare stage read it; ``with_history`` adds the history features a model may ask for.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from topx import evaluate as ev
from topx.config import HyperParameters
from topx.contract import (
    DATASET_FIELDS,
    DEFAULT_MAX_BYTES,
    DEFAULT_OBJECTIVE,
    DEFAULT_RECENCY_BOOST,
    DEFAULT_TIME_COL,
    DatasetConfigError,
    check_dataset_config,
)
from topx.encode import encode_features
from topx.errors import ConfigError, InputDataError
from topx.feature_index import FeatureIndex
from topx.ingest import InteractionCodes, read_feature_table, read_interaction_codes

MIN_DISTINCT_IDS = 2  # users and items an interactions file must name


@dataclass(frozen=True)
class DataOptions:
    """Where the data are and how to read them (the CLI's data options)."""

    interactions: str
    users: str | None = None
    items: str | None = None
    user_col: str | int = "user_id"
    item_col: str | int = "item_id"
    rating_col: str | int | None = "rating"
    user_key: str | int | None = None
    item_key: str | int | None = None
    header: bool = True
    sep: str | None = None
    # The rating column is interaction strength (absent: 1 per row), as the ranking objective reads it.
    implicit: bool = False
    # Rows rated below this are dropped before anything else (ranking: only liked items are positives).
    min_rating: float | None = None
    # The time of each row (topx.ingest reads epoch seconds or milliseconds and ISO-8601): with it the
    # hold-out is each user's latest rows, and the options below apply. time_optional: the column is the
    # default one (DEFAULT_TIME_COL), read when the file has it.
    time_col: str | int | None = None
    time_optional: bool = False
    # Weigh each row by 0.5 ** (its age / this many days), its age counted from the latest row.
    half_life_days: float | None = None
    # Within each user's rows in time order, the latest weighs 1 + this times what the earliest weighs
    # (linearly between; each user's rows keep their mean weight). None: DEFAULT_RECENCY_BOOST for ranking,
    # 0 for the rating objective.
    recency_boost: float | None = None
    # Drop rows older than this: an ISO-8601 date, or a number of days before the latest row.
    since: str | None = None
    # Ids of the --items (--users) table with no interactions become cold items (users): recommended
    # (given recommendations) from their features alone. False leaves them out.
    cold_items: bool = True
    cold_users: bool = True
    # The most bytes the interactions' parts may hold together, as stored; None: no limit.
    max_bytes: int | None = DEFAULT_MAX_BYTES

    def __post_init__(self) -> None:
        if self.time_col is None and (self.half_life_days is not None or self.since is not None
                                      or self.recency_boost is not None):
            raise ConfigError("a half-life, a window and a recency boost (--half-life-days, --since, --recency-boost) "
                              "need a time column (--time-col)")
        if self.half_life_days is not None and not (self.half_life_days > 0 and math.isfinite(self.half_life_days)):
            raise ConfigError(f"the half-life must be a positive number of days, got {self.half_life_days!r}")
        if self.recency_boost is not None and not (self.recency_boost >= 0 and math.isfinite(self.recency_boost)):
            raise ConfigError(f"the recency boost must be a number >= 0, got {self.recency_boost!r}")


@dataclass
class Dataset:
    """Interactions over integer rows. user_rows/item_rows: (n,) int64; rating: (n,) float32."""

    feature_index: FeatureIndex
    user_rows: np.ndarray
    item_rows: np.ndarray
    rating: np.ndarray
    implicit: bool
    report: dict[str, Any] = field(default_factory=dict)
    # (n,) int64 seconds since the epoch of each row, when the data have a time column.
    time: np.ndarray | None = None
    # Recency weighting: each row weighs 0.5 ** (age in days / this), age counted from the latest row.
    half_life_days: float | None = None
    # Within each user's rows, the latest weighs 1 + this times the earliest (DataOptions.recency_boost).
    recency_boost: float = 0.0

    @property
    def split(self) -> str:
        """How the hold-out is drawn: "temporal" (each user's latest rows) with a time column, else "random"."""
        return "random" if self.time is None else "temporal"

    def holdout(self, fraction: float, seed: int, within: np.ndarray | None = None) -> np.ndarray:
        """(n,) bool: per user, ``fraction`` of the rows ``within`` selects (all when None) held out, the
        latest ones with a time column, a seeded random draw without (``self.split``)."""
        if within is None:  # every row: no index of them, and no copies (the data may be large)
            return (ev.holdout_split(self.user_rows, fraction, seed) if self.time is None
                    else ev.temporal_split(self.user_rows, self.time, fraction))
        rows = np.flatnonzero(within)
        if self.time is None:
            chosen = ev.holdout_split(self.user_rows[rows], fraction, seed)
        else:
            chosen = ev.temporal_split(self.user_rows[rows], self.time[rows], fraction)
        mask = np.zeros(len(self.user_rows), dtype=bool)
        mask[rows[chosen]] = True
        return mask

    def recency(self, mask: np.ndarray | slice) -> np.ndarray | None:
        """(n_selected,) float32 weights from the time of the rows ``mask`` selects: the half-life's decay
        times the recency boost's (``user_recency``); None without a time column or when neither is set."""
        if self.time is None or (self.half_life_days is None and not self.recency_boost):
            return None
        time = self.time[mask]
        out = np.ones(len(time), dtype=np.float64)
        if self.half_life_days is not None:
            out *= np.power(0.5, (self.time.max() - time) / 86400.0 / self.half_life_days)
        if self.recency_boost:
            out *= user_recency(self.user_rows[mask], time, self.recency_boost)
        return out.astype(np.float32)

    def rows(self, mask: np.ndarray) -> Dataset:
        """The same dataset over the rows ``mask`` selects (the feature index is shared)."""
        return replace(self, user_rows=self.user_rows[mask], item_rows=self.item_rows[mask],
                       rating=self.rating[mask], time=None if self.time is None else self.time[mask])

    @property
    def user_ids(self) -> tuple[str, ...]:
        return self.feature_index.user_ids

    @property
    def item_ids(self) -> tuple[str, ...]:
        return self.feature_index.item_ids

    def matrix(self, mask: np.ndarray | None = None) -> sp.csr_matrix:
        """(n_users, n_items) CSR of the interactions (optionally a subset)."""
        rows = self.user_rows if mask is None else self.user_rows[mask]
        cols = self.item_rows if mask is None else self.item_rows[mask]
        data = np.ones(len(rows), dtype=np.float32)
        shape = (self.feature_index.n_users, self.feature_index.n_items)
        out = sp.csr_matrix((data, (rows, cols)), shape=shape)
        out.sum_duplicates()
        return out


def user_recency(users: np.ndarray, time: np.ndarray, boost: float) -> np.ndarray:
    """(n,) float32 weights that rise linearly through each user's rows in time order, the latest weighing
    ``1 + boost`` times the earliest, each user's weights averaging 1 (so users keep their weight against one
    another). A row's place is its rank among the user's rows, as a quantile (rank + 1/2) / count, rows of one
    time sharing their mean rank: a user's one row sits in the middle and weighs 1.

    One sort of a combined (user, time) key, and about 33 bytes a row at the peak (330 MB at 10M rows,
    docs/PERFORMANCE.md)."""
    n = len(users)
    if n == 0:
        return np.ones(0, dtype=np.float32)
    t_min = int(time.min())
    span = int(time.max()) - t_min + 1
    if (int(users.max()) + 1) * span < 2**62:
        key = users.astype(np.int64) * np.int64(span) + (time - t_min)
        order = np.argsort(key)  # rows of one user and one time share a key: their order does not matter
        key = key[order]
        user_start = np.empty(n, dtype=bool)
        user_start[0] = True
        user_start[1:] = (key[1:] // span) != (key[:-1] // span)
        tie_start = np.empty(n, dtype=bool)
        tie_start[0] = True
        tie_start[1:] = key[1:] != key[:-1]
        del key
    else:  # a span of times too wide to combine with the users: sort on both
        order = np.lexsort((time, users))
        u, t = users[order], time[order]
        user_start = np.r_[True, u[1:] != u[:-1]]
        tie_start = user_start | np.r_[True, t[1:] != t[:-1]]
        del u, t
    starts = np.flatnonzero(user_start)
    count = np.diff(np.append(starts, n))
    del user_start
    rank = np.arange(n, dtype=np.int64)
    rank -= np.repeat(starts, count)                       # 0-based rank within the user
    tie = np.cumsum(tie_start, dtype=np.int64) - 1         # tie group of each row
    del tie_start
    tie_rank = np.bincount(tie, weights=rank) / np.bincount(tie)
    del rank
    quantile = tie_rank[tie]
    del tie, tie_rank
    quantile += 0.5
    quantile /= np.repeat(count, count)
    out = np.empty(n, dtype=np.float32)
    out[order] = (1.0 + boost * quantile) / (1.0 + 0.5 * boost)
    return out


def data_options(config: Mapping[str, Any]) -> DataOptions:
    """DataOptions from a checked dataset configuration (``topx.contract.check_dataset_config``: fields named
    as the CLI's options); a field absent or null takes the option's default. Without a header the id and
    rating columns default to positions 0, 1 and 2; with one, a column named ``timestamp`` is the time column
    unless ``time_col`` names another or ``no_time_col`` is set."""
    values = {name: value for name, value in config.items() if value is not None}
    if values.get("interactions") is None:
        raise ConfigError("no interactions: give --interactions, or interactions in the dataset configuration")
    header = not values.get("no_header", False)
    time_col = values.get("time_col")
    time_optional = time_col is None and header and not values.get("no_time_col", False)
    return DataOptions(
        interactions=values["interactions"], users=values.get("users"), items=values.get("items"),
        user_col=values.get("user_col", "user_id" if header else 0),
        item_col=values.get("item_col", "item_id" if header else 1),
        rating_col=values.get("rating_col", "rating" if header else 2),
        user_key=values.get("user_key"), item_key=values.get("item_key"), header=header, sep=values.get("sep"),
        implicit=values.get("objective", DEFAULT_OBJECTIVE) == "ranking", min_rating=values.get("min_rating"),
        time_col=DEFAULT_TIME_COL if time_optional else time_col, time_optional=time_optional,
        half_life_days=values.get("half_life_days"),
        recency_boost=values.get("recency_boost"), since=values.get("since"),
        cold_items=not values.get("no_cold_items", False), cold_users=not values.get("no_cold_users", False),
        max_bytes=values.get("max_bytes", DEFAULT_MAX_BYTES),
    )


def read_dataset_config(path: str) -> dict[str, Any]:
    """A dataset configuration file (JSON; a local path or an ``s3://`` URI), checked: errors name the file
    and the field. Relative ``interactions``, ``users`` and ``items`` paths of a local file are taken from
    the file's folder, so that the file may sit beside its data."""
    from topx.io import S3_SCHEME, read_bytes

    raw = read_bytes(path)
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: the dataset configuration is not valid JSON: {exc}") from exc
    try:
        config = check_dataset_config(doc)
    except DatasetConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    if not path.startswith(S3_SCHEME):
        folder = Path(path).parent
        for name in (n for n, kind in DATASET_FIELDS.items() if kind == "path"):
            value = config.get(name)
            if value is not None and not value.startswith(S3_SCHEME) and not Path(value).is_absolute():
                config[name] = str(folder / value)
    return config


def load_dataset(opts: DataOptions) -> Dataset:
    """Read, validate and index the interactions and the optional feature tables.

    The interactions are read part by part into integer codes (``topx.ingest.read_interaction_codes``); the
    window, the thresholds and the merging of repeated pairs work on those arrays. Ids are numbered in sorted
    order (of their text), and rows keep file order, a merged pair standing where it first occurs.
    """
    header = opts.header
    codes = read_interaction_codes(
        opts.interactions,
        user_col=opts.user_col,
        item_col=opts.item_col,
        rating_col=opts.rating_col,
        header=header,
        sep=opts.sep,
        # With --min-rating the column holds ratings, negative ones too, until the threshold drops them.
        implicit=opts.implicit and opts.min_rating is None,
        time_col=opts.time_col,
        time_optional=opts.time_optional,
        max_bytes=opts.max_bytes,
    )
    if codes.time is None and opts.time_col is not None:  # the default time column, absent
        needing = [f"{name} (--{name.replace('_', '-')})" for name, value in (
            ("half_life_days", opts.half_life_days), ("since", opts.since), ("recency_boost", opts.recency_boost))
            if value is not None]
        if needing:
            raise ConfigError(f"{', '.join(needing)} {'needs' if len(needing) == 1 else 'need'} a time column, and "
                              f"{opts.interactions} has no column {opts.time_col!r}: name the time column with "
                              "time_col (--time-col)")
    report: dict[str, Any] = {"rows_read": len(codes.rating)}
    if codes.unused_columns:
        report["unused_columns"] = list(codes.unused_columns)
    keep = _kept_rows(codes, opts, report)
    user, item, rating, time = codes.user_codes, codes.item_codes, codes.rating, codes.time
    if not keep.all():
        user, item, rating = user[keep], item[keep], rating[keep]
        time = None if time is None else time[keep]
    del keep
    user, item, rating, time, duplicates = _merge_pairs(user, item, rating, time, len(codes.item_ids), opts.implicit)
    report["duplicate_pairs_merged"] = duplicates
    user_rows, user_ids = _sorted_codes(user, codes.user_ids)
    del user
    item_rows, item_ids = _sorted_codes(item, codes.item_ids)
    del item
    _check_enough_ids(user_ids, "user", opts.interactions, opts.user_col)
    _check_enough_ids(item_ids, "item", opts.interactions, opts.item_col)
    user_matrix, user_names, cold_users = _side_features(opts.users, opts.user_key, opts.user_col, header, opts.sep,
                                                         user_ids, report, "users", opts.cold_users)
    item_matrix, item_names, cold_items = _side_features(opts.items, opts.item_key, opts.item_col, header, opts.sep,
                                                         item_ids, report, "items", opts.cold_items)
    feature_index = FeatureIndex.build(user_ids + cold_users, item_ids + cold_items, user_matrix, user_names,
                                       item_matrix, item_names, cold_users=len(cold_users), cold_items=len(cold_items))
    report.update(n_users=feature_index.n_users, n_items=feature_index.n_items, n_interactions=len(rating),
                  n_features=feature_index.n_features, cold_users=len(cold_users), cold_items=len(cold_items))
    if time is not None:
        report.update(time_first=_iso(int(time.min())), time_last=_iso(int(time.max())))
    return Dataset(
        feature_index=feature_index,
        user_rows=user_rows,
        item_rows=item_rows,
        rating=rating,
        implicit=opts.implicit,
        report=report,
        time=time,
        half_life_days=opts.half_life_days,
        # By default for ranking only: the boost was chosen on ranking's validation carves.
        recency_boost=0.0 if time is None else (opts.recency_boost if opts.recency_boost is not None
                                               else DEFAULT_RECENCY_BOOST if opts.implicit else 0.0),
    )


def _kept_rows(codes: InteractionCodes, opts: DataOptions, report: dict[str, Any]) -> np.ndarray:
    """(n,) bool: the rows the window (``since``), ``min_rating`` and, for implicit data, a strength above 0 keep,
    applied in that order; ``report`` gets how many each dropped of the rows the one before kept. Refuses data
    that one of them leaves empty."""
    keep = np.ones(len(codes.rating), dtype=bool)
    if opts.since is not None:
        assert codes.time is not None  # DataOptions refuses --since without a time column
        start = _window_start(opts.since, int(codes.time.max()))
        old = codes.time < start
        report["window_start"] = datetime.fromtimestamp(start, UTC).isoformat()
        report["rows_before_window_dropped"] = int(old.sum())
        keep &= ~old
        if not keep.any():
            raise InputDataError(f"no row is at or after --since {opts.since}: there are no interactions",
                                 source=opts.interactions)
    if opts.min_rating is not None:
        low = codes.rating < opts.min_rating
        report["rows_below_min_rating_dropped"] = int(np.count_nonzero(low & keep))
        keep &= ~low
        if not keep.any():
            raise InputDataError(f"no row has a rating >= --min-rating {opts.min_rating:g}: there are no interactions",
                                 source=opts.interactions)
    if opts.implicit:
        zero = codes.rating <= 0
        report["zero_strength_rows_dropped"] = int(np.count_nonzero(zero & keep))
        keep &= ~zero
        if not keep.any():
            raise InputDataError("every row has strength 0: there are no interactions", source=opts.interactions)
    return keep


# Rows sorted at a time when merging repeated pairs: the sort's index and keys follow a block of users of
# about this many rows, not the whole dataset.
MERGE_BLOCK_ROWS = 8_000_000


def _merge_pairs(
    user: np.ndarray, item: np.ndarray, rating: np.ndarray, time: np.ndarray | None, n_item_codes: int, implicit: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, int]:
    """One row per (user, item) code pair: strengths add up in implicit mode; repeated ratings average; the time of
    a repeated pair is its latest. A merged pair stands where it first occurs; with no repeats the arrays are
    returned as they are. Sums are taken in float64 and rounded to float32 once. Also returns how many rows
    merged away.

    A pair repeats only within its user, so the rows are merged a block of users at a time (users by code modulo
    the number of blocks, ``MERGE_BLOCK_ROWS`` rows a block on average): the sort's keys and index are a block's,
    and what is kept whole is one flag and one total per row.

    user, item: (n,) int32 codes (item codes < ``n_item_codes``); rating: (n,) float32; time: (n,) int64 or None.
    """
    n = len(rating)
    blocks = max(1, -(-n // MERGE_BLOCK_ROWS))
    first = np.zeros(n, dtype=bool)  # the row where each pair first occurs
    total = np.empty(n, dtype=np.float32)  # at those rows: the pair's merged rating
    latest = None if time is None else np.empty(n, dtype=np.int64)
    for block in range(blocks):
        rows = np.flatnonzero(user % blocks == block) if blocks > 1 else np.arange(n)
        if not len(rows):
            continue
        key = user[rows].astype(np.int64) * n_item_codes + item[rows]
        order = np.argsort(key, kind="stable")  # stable: the first row of each pair comes first among its rows
        key = key[order]
        starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
        del key
        sums = np.add.reduceat(rating[rows[order]].astype(np.float64), starts)
        if not implicit:
            sums /= np.diff(np.append(starts, len(rows)))
        at = rows[order[starts]]
        first[at] = True
        total[at] = sums
        if latest is not None:
            latest[at] = np.maximum.reduceat(time[rows[order]], starts)
        del rows, order, starts, sums, at
    duplicates = n - int(np.count_nonzero(first))
    if duplicates == 0:
        return user, item, rating, time, 0
    return user[first], item[first], total[first], None if latest is None else latest[first], duplicates


def _sorted_codes(codes: np.ndarray, ids: pa.Array) -> tuple[np.ndarray, list[str]]:
    """The ids that ``codes`` (n,) uses, in sorted order of their text, and (n,) int64 positions in that list.

    Arrow orders text by its UTF-8 bytes, which is the order of code points, as Python's ``sorted`` is."""
    used = np.flatnonzero(np.bincount(codes, minlength=len(ids)))
    order = pc.sort_indices(ids.take(pa.array(used))).to_numpy()
    position = np.empty(len(ids), dtype=np.int64)
    position[used[order]] = np.arange(len(used), dtype=np.int64)
    return position[codes], ids.take(pa.array(used[order])).to_pylist()


def _iso(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def _window_start(since: str, latest: int) -> int:
    """The first second kept by ``since``: a number of days before ``latest``, or an ISO-8601 date."""
    try:
        days = float(since)
    except ValueError:
        days = None
    if days is not None:
        if not (days > 0 and math.isfinite(days)):
            raise ConfigError(f"--since as a number of days must be positive, got {since!r}")
        return latest - int(days * 86400)
    try:
        start = datetime.fromisoformat(since.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(f"--since must be an ISO-8601 date (e.g. 2024-05-01) or a number of days, got {since!r}") from exc
    if start.tzinfo is None:
        start = start.replace(tzinfo=UTC)
    return int(start.timestamp())


def _check_enough_ids(ids: list[str], role: str, source: str, column: str | int) -> None:
    """One item leaves nothing to recommend (every user has it); one user leaves nothing to learn
    from other users. Either is an incomplete export, refused before any training."""
    if len(ids) < MIN_DISTINCT_IDS:
        raise InputDataError(
            f"only {len(ids)} distinct {role} id ({ids[0]!r}); a recommender needs at least "
            f"{MIN_DISTINCT_IDS} users and {MIN_DISTINCT_IDS} items",
            source=source,
            column=str(column),
        )


def items_table(opts: DataOptions) -> pd.DataFrame | None:
    """The items table as read (not encoded), indexed by item id; None without one."""
    if opts.items is None:
        return None
    key_col = key_column(opts.item_key, opts.item_col, opts.header)
    return read_feature_table(opts.items, key_col=key_col, header=opts.header, sep=opts.sep)


def key_column(key: str | int | None, id_col: str | int, header: bool) -> str | int:
    """A side table's key column: as given, else the interactions' id column name (0 without a header)."""
    return key if key is not None else (id_col if header else 0)


def _side_features(
    source: str | None,
    key: str | int | None,
    id_col: str | int,
    header: bool,
    sep: str | None,
    ids: list[str],
    report: dict[str, Any],
    name: str,
    cold: bool,
) -> tuple[sp.csr_matrix | None, tuple[str, ...], list[str]]:
    """The table's encoded features for ``ids`` and, when ``cold``, for the table's other ids (its rows
    for entities with no interactions, in table order), and those other ids."""
    if source is None:
        return None, (), []
    key_col = key_column(key, id_col, header)
    table = read_feature_table(source, key_col=key_col, header=header, sep=sep)
    keys = pd.Index(table.index.astype("str").to_numpy(dtype=object), dtype=object)
    cold_ids = [str(k) for k in keys[~keys.isin(ids)]] if cold else []
    encoded = encode_features(table, [*ids, *cold_ids], source=source)
    report[f"{name}_features"] = {
        "source": source,
        "columns": len(encoded.names),
        "rows_for_unknown_ids": encoded.unknown_ids,
        "unknown_id_examples": list(encoded.unknown_examples),
        "ids_without_features": encoded.missing_ids,
    }
    if encoded.unknown_ids:
        print(
            f"[topx] note: {source}: {encoded.unknown_ids} row(s) describe {name} with no interactions "
            f"(e.g. {', '.join(encoded.unknown_examples)}); they are ignored (--no-cold-{name}).",
            file=sys.stderr,
        )
    return encoded.matrix, tuple(encoded.names), cold_ids


def with_history(ds: Dataset, mask: np.ndarray | None, hp: HyperParameters) -> Dataset:
    """``ds`` with the history features ``hp.history_features`` names, built from the rows ``mask``
    selects (the rows training sees: a hold-out never leaks into a user's history); ``ds`` itself when
    it names none."""
    if hp.history_features == "none":
        return ds
    sel = slice(None) if mask is None else mask
    index = ds.feature_index.with_history(ds.user_rows[sel], ds.item_rows[sel],
                                          users=hp.history_features in ("user", "both"),
                                          items=hp.history_features in ("item", "both"))
    report = {**ds.report, "n_features": index.n_features, "history_features": hp.history_features}
    return replace(ds, feature_index=index, report=report)
