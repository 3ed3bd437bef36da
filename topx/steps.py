"""The steps of a run: train, vectors, recommend, evaluate.

``topx run`` (topx.run) calls them in order over one run directory (topx.rundir); the deployed stages
(topx.aws.stages) call the same functions one at a time. The torch- and faiss-backed learners and the
search are imported when first used, so reading data never loads them.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from topx import evaluate as ev
from topx.coldstart import map_cold_parameters
from topx.config import HyperParameters
from topx.contract import DEFAULT_SEARCH_METHOD
from topx.dataset import Dataset, with_history
from topx.errors import ConfigError, InputDataError
from topx.feature_index import FeatureIndex
from topx.params import FMParams
from topx.rundir import DATA_DIR, IDS_FILE, MODEL_DIR, save_interactions, write_model
from topx.vectors import RecipeVectors, export_vectors

if TYPE_CHECKING:
    from topx.fm import TrainingData, TrainResult
    from topx.icd import ImplicitData


# Names from the torch- and faiss-backed modules, imported when first used: reading and preparing data
# (the Prepare function, topx --help) never loads them. ``steps.<name>`` resolves them too, so a test
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


# Users whose hold-out recall each icd epoch records (holdout_per_epoch): enough for a steady curve, few
# enough that it costs little beside an epoch.
EPOCH_EVAL_USERS = 2000


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
    filters: str | None = None  # a filter file (topx.filters): which items may be recommended
    responses: str | None = None  # (user_id, item_id) pairs left out of the lists as seen items are
    # Search the ranking learner's settings on a validation carve first (topx.tune): "on", "off", or "auto"
    # (when the data's size makes it pay: topx.tune.auto_tunes).
    tune: str = "auto"


class Reporter:
    """One line per step on stderr, with its wall time."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.timings: dict[str, float] = {}

    @contextmanager
    def step(self, name: str, message: str) -> Iterator[dict[str, Any]]:
        detail: dict[str, Any] = {}
        start = time.perf_counter()
        if self.enabled:
            print(f"[topx] {message} ...", file=sys.stderr, flush=True)
        yield detail
        elapsed = time.perf_counter() - start
        # Work a step did on the side (detail "aside": {name: seconds}) is timed under its own name.
        for other, seconds in detail.pop("aside", {}).items():
            self.timings[other] = round(self.timings.get(other, 0.0) + seconds, 3)
            elapsed -= seconds
        self.timings[name] = round(self.timings.get(name, 0.0) + elapsed, 3)
        if self.enabled:
            extra = f" {detail['result']}" if "result" in detail else ""
            print(f"[topx]   done in {elapsed:.1f} s.{extra}", file=sys.stderr, flush=True)


def training_data(ds: Dataset, mask: np.ndarray | None = None) -> TrainingData:
    """The FM's samples for the rows selected by ``mask`` (all when None).

    Implicit strengths become positive weights log1p(s), normalised to mean 1, so heavier
    interactions count more without a few huge counts dominating; a half-life weighs recent rows more.
    """
    sel = slice(None) if mask is None else mask
    label = ds.rating[sel]
    weight = _with_recency(training_data_weight(label) if ds.implicit else None, ds.recency(sel))
    # Positives are 1 for ranking; ratings get a private, writable copy for the trainer.
    label = np.ones(len(label), dtype=np.float32) if ds.implicit else np.array(label, dtype=np.float32)
    padded = _heavy("PaddedRows")
    user_x, item_x = _warm_design(ds)
    return _heavy("TrainingData")(
        user_table=padded.from_csr(user_x),
        item_table=padded.from_csr(item_x),
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


def _warm_design(ds: Dataset) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """The design rows training sees: users and items with interactions. Cold ones (FeatureIndex's last
    rows) are left out, so that no learner treats an item nobody could see yet as one everybody passed
    over (or samples it as a negative); they are scored from their features once trained."""
    fi = ds.feature_index
    return fi.user_x[:fi.n_warm_users], fi.item_x[:fi.n_warm_items]


def _with_recency(weight: np.ndarray | None, recency: np.ndarray | None) -> np.ndarray | None:
    """The rows' weights times their recency weights (either may be None: ones), normalised to mean 1."""
    if recency is None:
        return weight
    both = recency.astype(np.float64) if weight is None else weight * recency.astype(np.float64)
    return (both / both.mean()).astype(np.float32)


def implicit_data(ds: Dataset, mask: np.ndarray | None = None) -> ImplicitData:
    """The icd learner's observed pairs for the rows selected by ``mask`` (all when None), weighted as
    ``training_data`` weighs the positives."""
    sel = slice(None) if mask is None else mask
    weight = _with_recency(training_data_weight(ds.rating[sel]) if ds.implicit else None, ds.recency(sel))
    user_x, item_x = _warm_design(ds)
    return _heavy("ImplicitData")(user_x, item_x, ds.user_rows[sel], ds.item_rows[sel],
                        weight)


def fit(ds: Dataset, mask: np.ndarray | None, hp: HyperParameters, run: RunOptions,
        on_epoch: Any = None, validate: Any = None) -> TrainResult:
    """Train the model ``hp`` names on the rows ``mask`` selects, with the learner it names. ``validate``
    (icd): a function of the parameters whose figures join each epoch's record."""
    if hp.learner == "icd":
        return _heavy("train_icd")(implicit_data(ds, mask), ds.feature_index.n_features, hp, device=run.device,
                         progress=run.progress, on_epoch=on_epoch, validate=validate)
    return _heavy("train_fm")(training_data(ds, mask), ds.feature_index.n_features, hp, device=run.device,
                    progress=run.progress, on_epoch=on_epoch)


def tuned_hyperparameters(ds: Dataset, hp: HyperParameters, run: RunOptions,
                          reporter: Reporter) -> tuple[HyperParameters, dict[str, Any] | None]:
    """With ``run.tune`` "on" (or "auto" where topx.tune.auto_tunes says so), the settings topx.tune finds on
    a carve of the rows training will see (the hold-out stays unseen) and its report, which says which mode
    ran; else ``hp`` as given and None."""
    from topx.tune import AUTO_GRID, NothingToTune, auto_tunes, tune_hyperparameters, tune_mode

    mode = tune_mode(run.tune, ())
    if mode == "off":
        return hp, None
    train_rows = ~ds.holdout(run.holdout, hp.seed)
    if mode == "auto" and not auto_tunes(int(train_rows.sum()), hp):
        return hp, None
    with reporter.step("tune", "tuning on a validation carve of the training rows"
                               + (" (auto: --no-tune skips it)" if mode == "auto" else "")) as d:
        try:
            result = tune_hyperparameters(ds, train_rows, hp, run, grid=AUTO_GRID if mode == "auto" else None)
        except NothingToTune as exc:
            if mode != "auto":
                raise
            d["result"] = f"skipped: {exc}; training with the settings given."
            return hp, None
        d["result"] = result.summary()
    return replace(hp, **result.chosen), {**result.as_dict(), "mode": mode}


def train_stage(
    ds: Dataset, hp: HyperParameters, run: RunOptions, out: Path, reporter: Reporter
) -> tuple[FMParams, np.ndarray, TrainResult, Dataset]:
    """Split, train, and write model/ and data/ into ``out``. Returns params, hold-out mask, result, and
    the dataset the model was trained over (``ds`` with history features when ``hp`` asks for them:
    its feature index is the model's)."""
    holdout = ds.holdout(run.holdout, hp.seed)
    ds = with_history(ds, ~holdout, hp)
    what = "ranking, every unobserved pair" if hp.learner == "icd" else hp.predictor_type
    with reporter.step("train", f"training the FM ({what}, k={hp.num_factors}, up to {hp.epochs} epochs)") as d:
        seconds, clock, checking, checked = [], [time.perf_counter()], [0.0], [0.0]
        check = holdout_per_epoch(ds, holdout, run, hp.seed) if hp.learner == "icd" else None

        def validate(params: FMParams) -> dict[str, float]:  # timed apart: what it costs is not training
            start = time.perf_counter()
            figures = check(params)
            checking[0] += time.perf_counter() - start
            checked[0] += time.perf_counter() - start
            return figures

        def timed(_record: dict[str, float]) -> None:  # each epoch's wall time, for the report
            now = time.perf_counter()
            seconds.append(round(now - clock[0] - checking[0], 3))
            clock[0], checking[0] = now, 0.0

        result = fit(ds, ~holdout, hp, run, on_epoch=timed, validate=None if check is None else validate)
        history = [{**record, "seconds": s} for record, s in zip(result.history, seconds, strict=False)]
        result = replace(result, params=map_cold_parameters(result.params, ds.feature_index),
                         history=history if len(seconds) == len(result.history) else result.history)
        d["result"] = f"best epoch {result.best_epoch} of {len(result.history)} on {result.device}."
        if check is not None:
            d["aside"] = {"holdout_per_epoch": checked[0]}
    write_model(out / MODEL_DIR, result.params, ds.feature_index)
    save_interactions(out / DATA_DIR, ds, holdout)
    return result.params, holdout, result, ds


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


def vectors_stage(params: FMParams, feature_index: FeatureIndex, out: Path) -> RecipeVectors:
    vectors = export_vectors(params, feature_index)
    vectors.save(out)
    (out / IDS_FILE).write_text(
        json.dumps({"user_ids": list(feature_index.user_ids), "item_ids": list(feature_index.item_ids)},
                   ensure_ascii=False),
        encoding="utf-8",
    )
    return vectors


# cold_user: the user has no interactions, and the list comes from their features alone.
RECOMMENDATION_SCHEMA = pa.schema(
    [("user_id", pa.string()), ("rank", pa.int32()), ("item_id", pa.string()), ("score", pa.float32()),
     ("cold_user", pa.bool_())]
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
    cold_users_from: int | None = None,
    cold_items_from: int | None = None,
    counts: dict[str, int] | None = None,
    eligible: np.ndarray | None = None,
    diversity: tuple[np.ndarray, int] | None = None,
) -> int:
    """Stream the top-x of every user to Parquet, one batch at a time. Returns rows written.

    ``method``: the search, as :func:`topx.search.iter_top_x` takes it (default "exact").
    ``cold_users_from``: the first user row that is a cold user (rows are of ``vectors``; None: none),
    marked in the ``cold_user`` column. ``cold_items_from``: the first cold item row; with ``counts``,
    ``counts["cold_item_rows"]`` and ``counts["rows"]`` add up the lists' cold items and all rows.
    ``eligible``: (n_items,) bool, the items that may be recommended (topx.filters); the search runs
    over those alone, so each list is the exact top-x of the eligible unseen items. ``diversity``: each
    item's group (n_items,) and the most items of one group a list may hold (topx.filters.item_groups).

    The score written is the FM's prediction for the pair (a_u . a_i + c_u): a rating for a
    regressor, a logit for a classifier.
    """
    rows_written = 0
    catalogue = np.arange(len(item_ids))
    if eligible is not None:
        from topx.filters import restrict

        catalogue, item_vectors, seen = restrict(vectors.item_vectors, seen, eligible)
        vectors = RecipeVectors(vectors.user_vectors, item_vectors, vectors.user_constants)
        item_ids = np.asarray(item_ids, dtype=object)[catalogue]
    if diversity is None:
        batches = _heavy("iter_top_x")(vectors.user_vectors, vectors.item_vectors, top_x, seen=seen, method=method)
    else:
        from topx.search import iter_top_x_capped

        batches = iter_top_x_capped(vectors.user_vectors, vectors.item_vectors, top_x, diversity[0][catalogue],
                                    diversity[1], seen=seen, method=method)
    with pq.ParquetWriter(path, RECOMMENDATION_SCHEMA) as writer:
        for rows, items, scores in batches:
            valid = items >= 0
            n_valid = valid.sum(axis=1)
            user_col = np.repeat(user_ids[rows], n_valid)
            rank_col = np.concatenate([np.arange(1, k + 1, dtype=np.int32) for k in n_valid]) if len(rows) else []
            item_col = item_ids[items[valid]]
            score_col = (scores + vectors.user_constants[rows][:, None].astype(np.float32))[valid]
            cold_col = np.repeat(rows >= cold_users_from if cold_users_from is not None
                                 else np.zeros(len(rows), bool), n_valid)
            table = pa.table(
                {"user_id": pa.array(user_col, pa.string()), "rank": pa.array(rank_col, pa.int32()),
                 "item_id": pa.array(item_col, pa.string()), "score": pa.array(score_col, pa.float32()),
                 "cold_user": pa.array(cold_col, pa.bool_())},
                schema=RECOMMENDATION_SCHEMA,
            )
            writer.write_table(table)
            rows_written += table.num_rows
            if counts is not None:
                counts["rows"] = counts.get("rows", 0) + table.num_rows
                cold_rows = (int((catalogue[items[valid]] >= cold_items_from).sum())
                             if cold_items_from is not None else 0)
                counts["cold_item_rows"] = counts.get("cold_item_rows", 0) + cold_rows
    return rows_written


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
    model_rank = _ranked(sub_vectors, train[eval_users], relevant[eval_users], x, run.search_method)
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


def _ranked(vectors: RecipeVectors, seen: sp.csr_matrix, relevant: sp.csr_matrix, x: int,
            method: str) -> ev.RankingMetrics:
    """Ranking metrics at x of ``vectors``' users (rows of ``seen`` and ``relevant``), ranked by the search
    that writes the recommendations, so that the metrics describe what is served."""
    top = np.full((len(vectors.user_vectors), x), -1, dtype=np.int64)
    for rows, batch_items, _ in _heavy("iter_top_x")(vectors.user_vectors, vectors.item_vectors, x, seen=seen,
                                                     method=method):
        top[rows] = batch_items
    return ev.ranking_metrics(top, relevant, vectors.item_vectors.shape[0])


def holdout_per_epoch(ds: Dataset, holdout: np.ndarray, run: RunOptions, seed: int) -> Any:
    """For the icd learner, which has no validation loss: a function of the parameters that gives
    recall@x on the hold-out of a seeded sample of at most EPOCH_EVAL_USERS users, ranked as
    ``evaluate_model`` ranks, so that each epoch's record shows how ranking moves. Shown, never used to
    choose anything (the hold-out stays the test). None without a hold-out."""
    if not holdout.any():
        return None
    train, relevant = ds.matrix(~holdout), ds.matrix(holdout)
    users = _sample_users(relevant, min(run.eval_users, EPOCH_EVAL_USERS), seed)
    seen, relevant = train[users], relevant[users]

    def validate(params: FMParams) -> dict[str, float]:
        vectors = export_vectors(params, ds.feature_index, users)
        return {f"holdout_recall_at_{run.top_x}": _ranked(vectors, seen, relevant, run.top_x, run.search_method).recall}

    return validate


def _sample_users(relevant: sp.csr_matrix, limit: int, seed: int) -> np.ndarray:
    """Users with at least one relevant item; a seeded sample of ``limit`` of them when there are more."""
    candidates = np.flatnonzero(np.diff(relevant.indptr) > 0)
    if len(candidates) > limit:
        candidates = np.sort(np.random.default_rng(seed + 2).choice(candidates, size=limit, replace=False))
    return candidates


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


# --------------------------------------------------------------------------- the fallback list

FALLBACK_SOURCES = ("popularity", "model")
FALLBACK_SCHEMA = pa.schema(
    [("rank", pa.int32()), ("item_id", pa.string()), ("score", pa.float32()), ("source", pa.string())]
)


def fallback_list(ds: Dataset, vectors: RecipeVectors, holdout: np.ndarray, x: int,
                  eligible: np.ndarray | None = None, diversity: tuple[np.ndarray, int] | None = None,
                  source: str | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """The best x items for a user the model has not seen, and how they were chosen; with ``eligible``
    ((n_items,) bool, the filters' items: topx.filters), the best x of those only; with ``diversity`` (each
    item's group and the cap: topx.filters.item_groups), at most the cap of one group, as the users' lists.
    ``source`` ("popularity" or "model") takes that candidate without scoring the two (a named list takes
    the default list's choice).

    Two candidates: popularity (the items most users interacted with in training, ties by item row) and
    the model's list for an empty user (no features: the FM scores an item by its own term, the last
    entry of its recipe vector). Each is given, unchanged, to every user with held-out rows, as if
    that user were unknown, and scored by recall@x on the hold-out; the better one wins, popularity on
    a tie or without a hold-out. Returns the list (rank, item_id, score, source) and a report.
    """
    train = ds.matrix(~holdout)
    counts = np.asarray((train != 0).sum(axis=0)).reshape(-1).astype(np.float64)
    own_term = vectors.item_vectors[:, -1].astype(np.float64)
    n_items = ds.feature_index.n_items
    allowed = np.arange(n_items) if eligible is None else np.flatnonzero(eligible)
    lists = {
        "popularity": (_capped(allowed[np.lexsort((allowed, -counts[allowed]))], diversity, x), counts),
        "model": (_capped(allowed[np.lexsort((allowed, -own_term[allowed]))], diversity, x), own_term),
    }
    report: dict[str, Any] = {"x": x}
    if diversity is not None:
        report["max_per_group"] = int(diversity[1])
    chosen = "popularity"
    relevant = ds.matrix(holdout)
    users = np.flatnonzero(np.diff(relevant.indptr) > 0)
    if source is not None:
        if source not in FALLBACK_SOURCES:
            raise ConfigError(f"fallback source must be one of {', '.join(FALLBACK_SOURCES)}, got {source!r}")
        chosen = source
        report["validated_on"] = "nothing: the source the default list's validation chose"
    elif len(users):
        recall = {name: ev.ranking_metrics(np.broadcast_to(items, (len(users), len(items))), relevant[users],
                                           n_items).recall for name, (items, _) in lists.items()}
        report.update({f"{name}_recall_at_{x}": value for name, value in recall.items()})
        chosen = "model" if recall["model"] > recall["popularity"] else "popularity"
        report["validated_on"] = f"the hold-out of {len(users):,} users, each given the same list"
    else:
        report["validated_on"] = "nothing: no hold-out, so popularity"
    report["source"] = chosen
    items, scores = lists[chosen]
    table = pa.table({
        "rank": pa.array(np.arange(1, len(items) + 1, dtype=np.int32)),
        "item_id": pa.array([ds.item_ids[i] for i in items], pa.string()),
        "score": pa.array(scores[items].astype(np.float32)),
        "source": pa.array([chosen] * len(items), pa.string()),
    }, schema=FALLBACK_SCHEMA)
    return table, report


def _capped(ordered: np.ndarray, diversity: tuple[np.ndarray, int] | None, x: int) -> np.ndarray:
    """The first x of ``ordered`` (item rows, best first) that keep at most the cap of each group; an item of
    no group (-1) is never held back."""
    if diversity is None:
        return ordered[:x]
    groups, cap = diversity
    group = groups[ordered]
    by_group = np.argsort(group, kind="stable")
    sorted_group = group[by_group]
    starts = np.flatnonzero(np.r_[True, sorted_group[1:] != sorted_group[:-1]])
    first_of_run = np.repeat(starts, np.diff(np.r_[starts, len(sorted_group)]))
    occurrence = np.empty(len(ordered), dtype=np.int64)
    occurrence[by_group] = np.arange(len(ordered)) - first_of_run
    return ordered[(group < 0) | (occurrence < cap)][:x]
