"""The local pipeline: ingest -> train -> vectors -> recommend -> evaluate, over a run directory.

A run directory holds:

    model/            model.tar.gz (SageMaker FM layout), feature_index.json, design.npz
    data/             interactions.npz: the aggregated (user row, item row, rating) and hold-out mask
    vectors/          user_vectors.npy, item_vectors.npy, user_constants.npy, ids.json
    recommendations.parquet   user_id, rank (1..x), item_id, score
    metrics.json

``run_all`` builds everything in a temporary directory beside ``--out`` and moves it into place
only when every stage succeeded, so an existing output is never half-overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from topx import evaluate as ev
from topx.config import MODE_DEFAULTS, HyperParameters, default_hyperparameters, objective_of  # noqa: F401
from topx.contract import DEFAULT_SEARCH_METHOD
from topx.encode import encode_features
from topx.errors import ArtifactFormatError, ConfigError, InputDataError
from topx.feature_index import FeatureIndex
from topx.ingest import read_feature_table, read_interactions
from topx.params import FMParams
from topx.vectors import RecipeVectors, export_vectors

if TYPE_CHECKING:
    from topx.fm import TrainingData, TrainResult
    from topx.icd import ImplicitData

# Names from the torch- and faiss-backed modules, imported when first used: reading and preparing data
# (the Prepare function, topx --help) never loads them. ``pipeline.<name>`` resolves them too, so a test
# or benchmark can replace one (monkeypatch), and the stages below call whatever is there.
_HEAVY = {"train_fm": "topx.fm", "PaddedRows": "topx.fm", "TrainingData": "topx.fm", "TrainResult": "topx.fm",
          "train_icd": "topx.icd", "ImplicitData": "topx.icd", "iter_top_x": "topx.search"}


def _heavy(name: str) -> Any:
    """The object ``name`` of _HEAVY: a replacement set on this module if there is one, else the real one."""
    if name in globals():
        return globals()[name]
    import importlib

    return getattr(importlib.import_module(_HEAVY[name]), name)


def __getattr__(name: str) -> Any:
    if name in _HEAVY:
        return _heavy(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

MODEL_DIR = "model"
DATA_DIR = "data"
VECTORS_DIR = "vectors"
RECOMMENDATIONS = "recommendations.parquet"
METRICS = "metrics.json"
INTERACTIONS_FILE = "interactions.npz"
IDS_FILE = "ids.json"
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


@dataclass(frozen=True)
class RunOptions:
    top_x: int = 10
    holdout: float = 0.2
    include_seen: bool = False
    device: str | None = None
    relevance_threshold: float | None = None
    eval_users: int = 20000
    progress: bool | None = None
    search_method: str = DEFAULT_SEARCH_METHOD  # of the recommendations: one of topx.contract.SEARCH_METHODS
    tune: bool = False  # search the ranking learner's settings on a validation carve first (topx.tune)


@dataclass
class Dataset:
    """Interactions over integer rows. user_rows/item_rows: (n,) int64; rating: (n,) float32."""

    feature_index: FeatureIndex
    user_rows: np.ndarray
    item_rows: np.ndarray
    rating: np.ndarray
    implicit: bool
    report: dict[str, Any] = field(default_factory=dict)

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


class Reporter:
    """One line per step on stderr, with its wall time."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.timings: dict[str, float] = {}

    @contextmanager
    def step(self, name: str, message: str) -> Iterator[dict[str, str]]:
        detail: dict[str, str] = {}
        start = time.perf_counter()
        if self.enabled:
            print(f"[topx] {message} ...", file=sys.stderr, flush=True)
        yield detail
        elapsed = time.perf_counter() - start
        self.timings[name] = round(self.timings.get(name, 0.0) + elapsed, 3)
        if self.enabled:
            extra = f" {detail['result']}" if "result" in detail else ""
            print(f"[topx]   done in {elapsed:.1f} s.{extra}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- ingest


def load_dataset(opts: DataOptions) -> Dataset:
    """Read, validate and index the interactions and the optional feature tables."""
    header = opts.header
    frame = read_interactions(
        opts.interactions,
        user_col=opts.user_col,
        item_col=opts.item_col,
        rating_col=opts.rating_col,
        header=header,
        sep=opts.sep,
        # With --min-rating the column holds ratings, negative ones too, until the threshold drops them.
        implicit=opts.implicit and opts.min_rating is None,
    )
    report: dict[str, Any] = {"rows_read": int(len(frame))}
    if opts.min_rating is not None:
        low = frame["rating"].to_numpy() < opts.min_rating
        report["rows_below_min_rating_dropped"] = int(low.sum())
        frame = frame.loc[~low]
        if frame.empty:
            raise InputDataError(f"no row has a rating >= --min-rating {opts.min_rating:g}: there are no interactions",
                                 source=opts.interactions)
    if opts.implicit:
        zero = frame["rating"].to_numpy() <= 0
        report["zero_strength_rows_dropped"] = int(zero.sum())
        frame = frame.loc[~zero]
        if frame.empty:
            raise InputDataError("every row has strength 0: there are no interactions", source=opts.interactions)
    frame, duplicates = _aggregate(frame, opts.implicit)
    report["duplicate_pairs_merged"] = duplicates
    user_codes, user_ids = pd.factorize(frame["user_id"], sort=True)
    item_codes, item_ids = pd.factorize(frame["item_id"], sort=True)
    user_ids = [str(u) for u in user_ids]
    item_ids = [str(i) for i in item_ids]
    _check_enough_ids(user_ids, "user", opts.interactions, opts.user_col)
    _check_enough_ids(item_ids, "item", opts.interactions, opts.item_col)
    user_matrix, user_names = _side_features(opts.users, opts.user_key, opts.user_col, header, opts.sep, user_ids, report, "users")
    item_matrix, item_names = _side_features(opts.items, opts.item_key, opts.item_col, header, opts.sep, item_ids, report, "items")
    feature_index = FeatureIndex.build(user_ids, item_ids, user_matrix, user_names, item_matrix, item_names)
    report.update(n_users=len(user_ids), n_items=len(item_ids), n_interactions=int(len(frame)),
                  n_features=feature_index.n_features)
    return Dataset(
        feature_index=feature_index,
        user_rows=user_codes.astype(np.int64),
        item_rows=item_codes.astype(np.int64),
        rating=frame["rating"].to_numpy(dtype=np.float32),
        implicit=opts.implicit,
        report=report,
    )


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


def _aggregate(frame: pd.DataFrame, implicit: bool) -> tuple[pd.DataFrame, int]:
    """One row per (user, item): strengths add up in implicit mode; repeated ratings average."""
    grouped = frame.groupby(["user_id", "item_id"], sort=False, observed=True)["rating"]
    merged = grouped.sum() if implicit else grouped.mean()
    duplicates = int(len(frame) - len(merged))
    if duplicates == 0:
        return frame.reset_index(drop=True), 0
    out = merged.reset_index()
    out["rating"] = out["rating"].astype(np.float32)
    return out, duplicates


def _side_features(
    source: str | None,
    key: str | int | None,
    id_col: str | int,
    header: bool,
    sep: str | None,
    ids: list[str],
    report: dict[str, Any],
    name: str,
) -> tuple[sp.csr_matrix | None, tuple[str, ...]]:
    if source is None:
        return None, ()
    key_col = key if key is not None else (id_col if header else 0)
    table = read_feature_table(source, key_col=key_col, header=header, sep=sep)
    encoded = encode_features(table, ids, source=source)
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
            f"(e.g. {', '.join(encoded.unknown_examples)}); they are ignored.",
            file=sys.stderr,
        )
    return encoded.matrix, tuple(encoded.names)


# --------------------------------------------------------------------------- train


def training_data(ds: Dataset, mask: np.ndarray | None = None) -> TrainingData:
    """The FM's samples for the rows selected by ``mask`` (all when None).

    Implicit strengths become positive weights log1p(s), normalised to mean 1, so heavier
    interactions count more without a few huge counts dominating.
    """
    sel = slice(None) if mask is None else mask
    label = ds.rating[sel]
    weight = None
    if ds.implicit:
        weight = training_data_weight(label)
        label = np.ones(len(label), dtype=np.float32)
    else:
        label = np.array(label, dtype=np.float32)  # a private, writable copy for the trainer
    padded = _heavy("PaddedRows")
    return _heavy("TrainingData")(
        user_table=padded.from_csr(ds.feature_index.user_x),
        item_table=padded.from_csr(ds.feature_index.item_x),
        user_rows=ds.user_rows[sel],
        item_rows=ds.item_rows[sel],
        label=label,
        weight=weight,
    )


def training_data_weight(strength: np.ndarray) -> np.ndarray | None:
    """(n,) positive weights log1p(strength), normalised to mean 1; None when all are equal."""
    logs = np.log1p(np.maximum(strength, 0).astype(np.float64))
    mean = logs.mean() if len(logs) else 1.0
    return None if np.allclose(logs, mean) else (logs / mean).astype(np.float32)


def implicit_data(ds: Dataset, mask: np.ndarray | None = None) -> ImplicitData:
    """The icd learner's observed pairs for the rows selected by ``mask`` (all when None), weighted as
    ``training_data`` weighs the positives."""
    sel = slice(None) if mask is None else mask
    weight = training_data_weight(ds.rating[sel]) if ds.implicit else None
    return _heavy("ImplicitData")(ds.feature_index.user_x, ds.feature_index.item_x, ds.user_rows[sel], ds.item_rows[sel],
                        weight)


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


def fit(ds: Dataset, mask: np.ndarray | None, hp: HyperParameters, run: RunOptions,
        on_epoch: Any = None) -> TrainResult:
    """Train the model ``hp`` names on the rows ``mask`` selects, with the learner it names."""
    if hp.learner == "icd":
        return _heavy("train_icd")(implicit_data(ds, mask), ds.feature_index.n_features, hp, device=run.device,
                         progress=run.progress, on_epoch=on_epoch)
    return _heavy("train_fm")(training_data(ds, mask), ds.feature_index.n_features, hp, device=run.device,
                    progress=run.progress, on_epoch=on_epoch)


def tuned_hyperparameters(ds: Dataset, hp: HyperParameters, run: RunOptions,
                          reporter: Reporter) -> tuple[HyperParameters, dict[str, Any] | None]:
    """With ``run.tune``, the settings topx.tune finds on a carve of the rows training will see (the
    hold-out stays unseen) and its report; else ``hp`` as given and None."""
    if not run.tune:
        return hp, None
    from topx.tune import tune_hyperparameters

    train_rows = ~ev.holdout_split(ds.user_rows, run.holdout, hp.seed)
    with reporter.step("tune", "tuning on a validation carve of the training rows") as d:
        result = tune_hyperparameters(ds, train_rows, hp, run)
        chosen = ", ".join(f"{k}={v:g}" for k, v in result.chosen.items())
        d["result"] = f"chose {chosen}: {result.metric} {result.best:.4f} on the carve ({result.gain:+.1%})."
    return replace(hp, **result.chosen), result.as_dict()


def train_stage(
    ds: Dataset, hp: HyperParameters, run: RunOptions, out: Path, reporter: Reporter
) -> tuple[FMParams, np.ndarray, TrainResult, Dataset]:
    """Split, train, and write model/ and data/ into ``out``. Returns params, hold-out mask, result, and
    the dataset the model was trained over (``ds`` with history features when ``hp`` asks for them:
    its feature index is the model's)."""
    holdout = ev.holdout_split(ds.user_rows, run.holdout, hp.seed)
    ds = with_history(ds, ~holdout, hp)
    what = "ranking, every unobserved pair" if hp.learner == "icd" else hp.predictor_type
    with reporter.step("train", f"training the FM ({what}, k={hp.num_factors}, up to {hp.epochs} epochs)") as d:
        result = fit(ds, ~holdout, hp, run)
        d["result"] = f"best epoch {result.best_epoch} of {len(result.history)} on {result.device}."
    write_model(out / MODEL_DIR, result.params, ds.feature_index)
    save_interactions(out / DATA_DIR, ds, holdout)
    return result.params, holdout, result, ds


def is_recordio_protobuf(raw: bytes) -> bool:
    from topx.recordio import RECORDIO_MAGIC

    return len(raw) >= 4 and int.from_bytes(raw[:4], "little") == RECORDIO_MAGIC


def train_rows_stage(
    x: sp.csr_matrix,
    y: np.ndarray,
    hp: HyperParameters,
    run: RunOptions,
    out: Path,
    reporter: Reporter,
    *,
    source: str,
    feature_index: FeatureIndex | None = None,
) -> TrainResult:
    """Train on design rows given whole, as SageMaker's recordIO-protobuf data carry them.

    x: (n, N) CSR; y: (n,) labels (ratings for a regressor, 0/1 for a classifier). Each row is its
    own sample, so the FM sees exactly the x it would see from the equivalent interactions file.
    """
    if hp.learner != "sgd":
        raise ConfigError("design rows given whole train with learner sgd: the icd learner needs the user and "
                          "item tables apart")
    if hp.history_features != "none":
        raise ConfigError("design rows given whole carry their own features: history features are built from "
                          "an interactions table; leave history_features at none")
    if not np.all(np.isfinite(y)):
        row = int(np.flatnonzero(~np.isfinite(y))[0]) + 1
        raise InputDataError("label is missing or not finite", source=source, row=row, column="label")
    if hp.predictor_type == "binary_classifier" and not np.isin(y, (0.0, 1.0)).all():
        row = int(np.flatnonzero(~np.isin(y, (0.0, 1.0)))[0]) + 1
        raise InputDataError("a binary_classifier needs labels 0 or 1", source=source, row=row, column="label")
    if feature_index is not None and feature_index.n_features != x.shape[1]:
        raise InputDataError(f"rows have {x.shape[1]} features but the feature index names {feature_index.n_features}",
                             source=source)
    padded = _heavy("PaddedRows")
    empty_item = padded(np.zeros((1, 1), np.int64), np.zeros((1, 1), np.float32))
    data = _heavy("TrainingData")(padded.from_csr(x), empty_item, np.arange(x.shape[0], dtype=np.int64),
                        np.zeros(x.shape[0], dtype=np.int64), np.asarray(y, np.float32), sample_negatives=False)
    with reporter.step("train", f"training the FM on {x.shape[0]:,} rows x {x.shape[1]:,} features ({hp.predictor_type})") as d:
        result = _heavy("train_fm")(data, x.shape[1], hp, device=run.device, progress=run.progress)
        d["result"] = f"best epoch {result.best_epoch} of {len(result.history)} on {result.device}."
    write_model(out / MODEL_DIR, result.params, feature_index)
    return result


def write_model(directory: Path, params: FMParams, feature_index: FeatureIndex | None) -> None:
    from topx.artifact import write_model_artifact

    write_model_artifact(directory, params, feature_index)


def read_model(directory: Path) -> tuple[FMParams, FeatureIndex]:
    from topx.artifact import read_model_artifact

    return read_model_artifact(directory), FeatureIndex.load(directory)


def save_interactions(directory: Path, ds: Dataset, holdout: np.ndarray) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / INTERACTIONS_FILE, "wb") as fh:
        np.savez_compressed(fh, user_rows=ds.user_rows, item_rows=ds.item_rows, rating=ds.rating,
                            holdout=holdout, implicit=np.array(ds.implicit))


def load_interactions(
    run_dir: Path, feature_index: FeatureIndex, data_dir: str = DATA_DIR
) -> tuple[Dataset, np.ndarray]:
    path = run_dir / data_dir / INTERACTIONS_FILE
    try:
        with np.load(path) as z:
            ds = Dataset(feature_index, z["user_rows"], z["item_rows"], z["rating"], bool(z["implicit"]))
            return ds, z["holdout"]
    # A damaged .npz fails inside zipfile and zlib, with their own exceptions (as in topx.artifact).
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError,
            RuntimeError) as exc:
        raise ArtifactFormatError(f"{path}: cannot read the run's interactions ({exc}); run `topx train` first") from exc


def user_range_interactions(
    run_dir: Path, start: int, stop: int, n_items: int, data_dir: str = DATA_DIR, chunk: int = 1 << 22
) -> sp.csr_matrix:
    """(stop - start, n_items) CSR of the saved interactions of user rows start..stop-1 (a search
    shard's seen items; ``Dataset.matrix()[start:stop]``), read from interactions.npz ``chunk`` rows at a
    time: memory follows the range's interactions, not the whole run's."""
    path = run_dir / data_dir / INTERACTIONS_FILE
    users: list[np.ndarray] = []
    items: list[np.ndarray] = []
    try:
        with zipfile.ZipFile(path) as archive, archive.open("user_rows.npy") as u, archive.open("item_rows.npy") as i:
            (u_dtype, length), (i_dtype, i_length) = _npy_vector_header(u), _npy_vector_header(i)
            if length != i_length:
                raise ValueError(f"user_rows has {length} rows and item_rows {i_length}")
            for offset in range(0, length, chunk):
                count = min(chunk, length - offset)
                user_part, item_part = _read_items(u, count, u_dtype), _read_items(i, count, i_dtype)
                keep = (user_part >= start) & (user_part < stop)
                users.append(user_part[keep].astype(np.int64) - start)
                items.append(item_part[keep].astype(np.int64))
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise ArtifactFormatError(f"{path}: cannot read the run's interactions ({exc})") from exc
    rows = np.concatenate(users) if users else np.zeros(0, np.int64)
    cols = np.concatenate(items) if items else np.zeros(0, np.int64)
    out = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(max(stop - start, 0), n_items))
    out.sum_duplicates()
    return out


def _npy_vector_header(fh: Any) -> tuple[np.dtype, int]:
    """The dtype and length of the one-dimensional .npy array ``fh`` is positioned at the start of."""
    version = np.lib.format.read_magic(fh)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _fortran, dtype = read_header(fh)
    if len(shape) != 1 or dtype.hasobject:
        raise ValueError(f"expected a 1-d numeric array, found shape {shape} of {dtype}")
    return dtype, int(shape[0])


def _read_items(fh: Any, count: int, dtype: np.dtype) -> np.ndarray:
    """The next ``count`` items of the array ``fh`` reads; a file that ends before them is an error."""
    data = fh.read(count * dtype.itemsize)
    if len(data) != count * dtype.itemsize:
        raise EOFError(f"the array ends after {len(data) // dtype.itemsize} of the {count} items expected")
    return np.frombuffer(data, dtype=dtype)


# --------------------------------------------------------------------------- vectors and recommendations


def vectors_stage(params: FMParams, feature_index: FeatureIndex, out: Path) -> RecipeVectors:
    vectors = export_vectors(params, feature_index)
    vectors.save(out)
    (out / IDS_FILE).write_text(
        json.dumps({"user_ids": list(feature_index.user_ids), "item_ids": list(feature_index.item_ids)},
                   ensure_ascii=False),
        encoding="utf-8",
    )
    return vectors


def load_ids(vectors_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    path = vectors_dir / IDS_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return np.asarray(doc["user_ids"], dtype=object), np.asarray(doc["item_ids"], dtype=object)
    except (OSError, KeyError, ValueError) as exc:
        raise ArtifactFormatError(f"{path}: cannot read the ids beside the vectors ({exc})") from exc


RECOMMENDATION_SCHEMA = pa.schema(
    [("user_id", pa.string()), ("rank", pa.int32()), ("item_id", pa.string()), ("score", pa.float32())]
)


def write_recommendations_parquet(
    path: Path,
    vectors: RecipeVectors,
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    top_x: int,
    seen: sp.csr_matrix | None,
    *,
    method: str = "exact",
) -> int:
    """Stream the top-x of every user to Parquet, one batch at a time. Returns rows written.

    ``method``: the search, as :func:`topx.search.iter_top_x` takes it (default "exact").

    The score written is the FM's prediction for the pair (a_u . a_i + c_u): a rating for a
    regressor, a logit for a classifier.
    """
    rows_written = 0
    with pq.ParquetWriter(path, RECOMMENDATION_SCHEMA) as writer:
        for rows, items, scores in _heavy("iter_top_x")(vectors.user_vectors, vectors.item_vectors, top_x, seen=seen,
                                              method=method):
            valid = items >= 0
            n_valid = valid.sum(axis=1)
            user_col = np.repeat(user_ids[rows], n_valid)
            rank_col = np.concatenate([np.arange(1, k + 1, dtype=np.int32) for k in n_valid]) if len(rows) else []
            item_col = item_ids[items[valid]]
            score_col = (scores + vectors.user_constants[rows][:, None].astype(np.float32))[valid]
            table = pa.table(
                {"user_id": pa.array(user_col, pa.string()), "rank": pa.array(rank_col, pa.int32()),
                 "item_id": pa.array(item_col, pa.string()), "score": pa.array(score_col, pa.float32())},
                schema=RECOMMENDATION_SCHEMA,
            )
            writer.write_table(table)
            rows_written += table.num_rows
    return rows_written


# --------------------------------------------------------------------------- evaluation


def evaluate_model(
    params: FMParams,
    vectors: RecipeVectors,
    ds: Dataset,
    holdout: np.ndarray,
    run: RunOptions,
    seed: int,
    learner: str = "sgd",
) -> dict[str, Any]:
    """Hold-out error and ranking at x, beside the popularity baseline, by the same code."""
    metrics: dict[str, Any] = {"n_train": int((~holdout).sum()), "n_holdout": int(holdout.sum())}
    if not holdout.any():
        metrics["note"] = "no hold-out (holdout fraction 0 or too little data): nothing to evaluate"
        return metrics
    users, items = ds.user_rows[holdout], ds.item_rows[holdout]
    pair_scores = (vectors.user_vectors[users] * vectors.item_vectors[items]).sum(axis=1) + vectors.user_constants[users]
    if params.predictor_type == "regressor":
        metrics["rmse"] = ev.rmse(pair_scores, ds.rating[holdout])
        metrics["rmse_global_mean"] = ev.rmse(np.full(len(users), ds.rating[~holdout].mean()), ds.rating[holdout])
    else:
        rng = np.random.default_rng(seed + 1)
        neg_items = rng.integers(0, ds.feature_index.n_items, size=len(users))
        neg_scores = (vectors.user_vectors[users] * vectors.item_vectors[neg_items]).sum(axis=1) + vectors.user_constants[users]
        logits = np.concatenate([pair_scores, neg_scores])
        labels = np.concatenate([np.ones(len(users)), np.zeros(len(users))])
        metrics["auc"] = ev.auc(logits, labels)
        if learner == "sgd":  # icd's scores rank, but are not logits: a log loss of them would mislead
            metrics["log_loss"] = ev.log_loss(logits, labels)

    relevant_mask = holdout.copy()
    if run.relevance_threshold is not None:
        relevant_mask &= ds.rating >= run.relevance_threshold
    train = ds.matrix(~holdout)
    relevant = ds.matrix(relevant_mask)
    eval_users = _sample_users(relevant, run.eval_users, seed)
    x = run.top_x
    sub_vectors = RecipeVectors(vectors.user_vectors[eval_users], vectors.item_vectors, vectors.user_constants[eval_users])
    top = np.full((len(eval_users), x), -1, dtype=np.int64)
    # Ranked by the search that writes the recommendations, so the metrics describe what is served.
    for rows, batch_items, _ in _heavy("iter_top_x")(sub_vectors.user_vectors, sub_vectors.item_vectors, x, seen=train[eval_users],
                                           method=run.search_method):
        top[rows] = batch_items
    model_rank = ev.ranking_metrics(top, relevant[eval_users], ds.feature_index.n_items)
    popular = ev.popularity_top_x(train, x)[eval_users]
    pop_rank = ev.ranking_metrics(popular, relevant[eval_users], ds.feature_index.n_items)
    metrics.update(model_rank.as_dict("", x))
    metrics.update(pop_rank.as_dict("popularity_", x))
    if pop_rank.recall > 0:
        metrics[f"lift_over_popularity_recall_at_{x}"] = model_rank.recall / pop_rank.recall
    metrics["ranking_users"] = model_rank.users
    metrics["search_method"] = run.search_method
    metrics["relevance"] = ("held-out items" if run.relevance_threshold is None
                            else f"held-out items rated >= {run.relevance_threshold}")
    return metrics


def _sample_users(relevant: sp.csr_matrix, limit: int, seed: int) -> np.ndarray:
    """Users with at least one relevant item; a seeded sample of ``limit`` of them when there are more."""
    candidates = np.flatnonzero(np.diff(relevant.indptr) > 0)
    if len(candidates) > limit:
        candidates = np.sort(np.random.default_rng(seed + 2).choice(candidates, size=limit, replace=False))
    return candidates


# --------------------------------------------------------------------------- whole run


@contextmanager
def atomic_output_dir(out: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out``; on success it replaces ``out`` whole.

    On any error the temporary directory is removed and ``out`` is left exactly as it was.
    """
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rmdir(old)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True, default=_json_default) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def run_all(
    data: DataOptions,
    hp: HyperParameters,
    run: RunOptions,
    out: str | os.PathLike[str],
    *,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Every stage, into ``out`` atomically. Returns the metrics written to metrics.json."""
    reporter = reporter or Reporter()
    start = time.perf_counter()
    with atomic_output_dir(Path(out)) as tmp:
        with reporter.step("ingest", f"reading {data.interactions}") as d:
            ds = load_dataset(data)
            d["result"] = (f"{ds.report['n_interactions']:,} interactions, {ds.report['n_users']:,} users, "
                           f"{ds.report['n_items']:,} items, {ds.feature_index.n_features:,} features.")
        hp, tuning = tuned_hyperparameters(ds, hp, run, reporter)
        params, holdout, result, ds = train_stage(ds, hp, run, tmp, reporter)
        with reporter.step("vectors", "building the recipe's user and item vectors"):
            vectors = vectors_stage(params, ds.feature_index, tmp / VECTORS_DIR)
        with reporter.step("recommend", f"top-{run.top_x} for {ds.feature_index.n_users:,} users "
                                        f"({run.search_method} search)") as d:
            seen = None if run.include_seen else ds.matrix()
            user_ids, item_ids = np.asarray(ds.user_ids, dtype=object), np.asarray(ds.item_ids, dtype=object)
            n_rows = write_recommendations_parquet(tmp / RECOMMENDATIONS, vectors, user_ids, item_ids, run.top_x, seen,
                                           method=run.search_method)
            d["result"] = f"{n_rows:,} rows."
        with reporter.step("evaluate", "evaluating on the hold-out against popularity"):
            metrics = evaluate_model(params, vectors, ds, holdout, run, hp.seed, hp.learner)
        metrics.update(_run_summary(ds, hp, run, result))
        if tuning is not None:
            metrics["tuning"] = tuning
        metrics["timings_s"] = dict(reporter.timings)
        metrics["timings_s"]["total"] = round(time.perf_counter() - start, 3)
        write_json(tmp / METRICS, metrics)
    return metrics


def training_summary(hp: HyperParameters, result: TrainResult, data: dict[str, Any]) -> dict[str, Any]:
    """What metrics.json records of a training: the data report, the settings and the history."""
    return {
        "objective": "ranking" if hp.predictor_type == "binary_classifier" else "rating",
        "predictor_type": hp.predictor_type,
        "learner": hp.learner,
        "data": data,
        "hyperparameters": hp.to_dict(),
        "training": {"device": result.device, "best_epoch": result.best_epoch,
                     "epochs_run": len(result.history), "history": result.history},
    }


def _run_summary(ds: Dataset, hp: HyperParameters, run: RunOptions, result: TrainResult) -> dict[str, Any]:
    return {
        **training_summary(hp, result, ds.report),
        "top_x": run.top_x,
        "holdout_fraction": run.holdout,
        "include_seen": run.include_seen,
    }
