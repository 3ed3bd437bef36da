"""Quality on MovieLens 100k, in one run: rating error beside myFM, ranking beside popularity and
implicit's ALS, and the exact top-x (topx's own scan, and FAISS IndexFlatIP) checked against
brute-force FM scores.

    .venv/bin/python -m benchmarks.quality_ml100k --data ../shared/data/ml-100k
    .venv/bin/python -m benchmarks.quality_ml100k --quick     # smoke run: a few epochs and iterations
    .venv/bin/python -m benchmarks.quality_ml100k --tune      # the validation grids behind the constants

Needs the packages in benchmarks/requirements.txt beside the project's. Prints one JSON line on
stdout; progress goes to stderr. The data (F. Maxwell Harper and Joseph A. Konstan, "The MovieLens
Datasets: History and Context", ACM TiiS 5(4), 2015) are read from ``--data`` and never copied.

Protocol (docs/PERFORMANCE.md, "Quality on MovieLens 100k", explains the choices):

- **Rating error**: the official ``ua.base`` / ``ua.test`` split. Every user and item of ``u.user``
  / ``u.item`` is in the feature index, so a test item without training ratings still has its id
  row (and its genres and year). The number of epochs is chosen by early stopping on a validation
  set carved from ``ua.base`` the way ``ua.test`` was carved from the whole (10 ratings per user);
  the model is then refitted on all of ``ua.base`` for that many epochs and scored once on
  ``ua.test``, through the recipe's vectors (a_u . a_i + c_u). myFM gets the same design rows.
- **Ranking**: ``u.data`` split per user 80/20 by :func:`topx.evaluate.holdout_split` (seed 42).
  Relevant = held-out items rated >= 4. Every method ranks all items the user has no training
  interaction with and is scored by the same :func:`topx.evaluate.ranking_metrics`. topx and ALS
  train on the training interactions rated >= 4 as implicit positives; popularity counts all of them.
- **Exact agreement**: for both the implicit model and the explicit model with side features, the
  top-10 of :func:`topx.search.search_top_x` (seen items excluded) against a brute-force top-10
  from :func:`topx.fm.predict` in float64 over every unseen item of every user, ties broken by item
  row. ``exact_agreement`` checks the default search, topx's bounded reduced-precision scan;
  ``exact_agreement_faiss`` the same with ``method="faiss"`` (FAISS IndexFlatIP, float32).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    DEFAULT_ML100K,
    StageTimer,
    load_items,
    load_ratings,
    load_users,
    log,
    print_json_line,
)
from topx import evaluate as ev  # noqa: E402
from topx.config import (
    HyperParameters,  # noqa: E402
    default_hyperparameters,
)
from topx.dataset import Dataset  # noqa: E402
from topx.encode import encode_features  # noqa: E402
from topx.feature_index import FeatureIndex  # noqa: E402
from topx.fm import PaddedRows, TrainingData, TrainResult, predict, train_fm  # noqa: E402
from topx.params import FMParams  # noqa: E402
from topx.search import search_top_x  # noqa: E402
from topx.steps import training_data
from topx.vectors import RecipeVectors, export_vectors  # noqa: E402

SEED = 42  # the ranking hold-out, every model's seed
VALIDATION_SEED = 7  # the validation carves used for early stopping and tuning
X = 10
RELEVANT_RATING = 4.0
RANKING_HOLDOUT = 0.2
VALIDATION_PER_USER = 10  # as ua.test holds 10 ratings of every user
TIE_RTOL = 1e-5

# Chosen with --tune on validation data only (docs/PERFORMANCE.md). Epochs are upper bounds:
# early stopping on the validation carve picks the number, then the model is refitted.
EXPLICIT_IDS: dict[str, Any] = {
    "num_factors": 64, "mini_batch_size": 1024, "bias_lr": 0.05, "linear_lr": 0.05, "factors_lr": 0.01,
    "linear_wd": 0.1, "factors_wd": 0.05, "factors_init_sigma": 0.01, "epochs": 60,
}
EXPLICIT_FEATURES: dict[str, Any] = {
    "num_factors": 64, "mini_batch_size": 1024, "bias_lr": 0.05, "linear_lr": 0.1, "factors_lr": 0.02,
    "linear_wd": 0.1, "factors_wd": 0.1, "factors_init_sigma": 0.01, "epochs": 60,
}
IMPLICIT: dict[str, Any] = {
    "num_factors": 64, "mini_batch_size": 1024, "bias_lr": 0.1, "linear_lr": 0.1, "factors_lr": 0.1,
    "linear_wd": 0.01, "factors_wd": 0.01, "factors_init_sigma": 0.01, "negative_samples": 8, "epochs": 100,
}
ALS: dict[str, Any] = {"factors": 16, "regularization": 30.0, "alpha": 5.0, "iterations": 15}
MYFM: dict[str, Any] = {"rank": 10, "n_iter": 200, "n_kept_samples": 195}
QUICK_EPOCHS, QUICK_MYFM_ITER, QUICK_ALS_ITER = 3, 20, 3

TARGETS = {"rmse_features_max": 0.92, "recall_lift_over_popularity_min": 0.30, "exact_agreement": 1.0}


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Ratings:
    """Rows of a ratings file over a feature index. users, items: (n,) int64 rows; rating: (n,) float32."""

    users: np.ndarray
    items: np.ndarray
    rating: np.ndarray


def feature_index(users: pd.DataFrame, items: pd.DataFrame, *, side_features: bool) -> FeatureIndex:
    """Every user of u.user and item of u.item; with ``side_features`` their encoded features too."""
    user_ids = [str(u) for u in users.index]
    item_ids = [str(i) for i in items.index]
    if not side_features:
        return FeatureIndex.build(user_ids, item_ids)
    user_enc = encode_features(users, user_ids, source="u.user")
    item_enc = encode_features(items, item_ids, source="u.item")
    return FeatureIndex.build(user_ids, item_ids, user_enc.matrix, user_enc.names, item_enc.matrix, item_enc.names)


def index_ratings(frame: pd.DataFrame, fi: FeatureIndex) -> Ratings:
    users = pd.Index(fi.user_ids).get_indexer(frame["user_id"].astype(str))
    items = pd.Index(fi.item_ids).get_indexer(frame["item_id"].astype(str))
    if (users < 0).any() or (items < 0).any():
        raise ValueError("a rating names a user or item that u.user / u.item does not list")
    # A copy: pandas hands out read-only views, which torch warns about when it wraps them.
    rating = frame["rating"].to_numpy(np.float32, copy=True)
    return Ratings(users.astype(np.int64), items.astype(np.int64), rating)


def subset(r: Ratings, mask: np.ndarray) -> Ratings:
    return Ratings(r.users[mask], r.items[mask], r.rating[mask])


def per_user_count_split(user_rows: np.ndarray, n_per_user: int, seed: int) -> np.ndarray:
    """(n,) bool: ``n_per_user`` random rows of every user (at most half of a user's rows), seeded.

    This is how ua.test was made from u.data, so a validation carve made this way from ua.base
    weighs light users as the test set does (a per-user fraction would favour heavy users).
    """
    n = len(user_rows)
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(n), user_rows))
    sorted_users = user_rows[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]]) if n else np.zeros(0, np.int64)
    counts = np.diff(np.r_[starts, n])
    take = np.minimum(n_per_user, counts // 2)
    rank_in_user = np.arange(n) - np.repeat(starts, counts)
    mask = np.zeros(n, dtype=bool)
    mask[order] = rank_in_user < np.repeat(take, counts)
    return mask


def interaction_matrix(r: Ratings, fi: FeatureIndex) -> sp.csr_matrix:
    """(n_users, n_items) CSR with a 1 per rated pair."""
    out = sp.csr_matrix((np.ones(len(r.users), np.float32), (r.users, r.items)), shape=(fi.n_users, fi.n_items))
    out.sum_duplicates()
    out.data[:] = 1.0
    return out


def design_rows(fi: FeatureIndex, users: np.ndarray, items: np.ndarray) -> sp.csr_matrix:
    """(n, N) CSR: x = user_x[u] + item_x[i] for each pair, the rows the FM is trained on."""
    return sp.csr_matrix(fi.user_x[users] + fi.item_x[items])


# --------------------------------------------------------------------------- topx


def explicit_data(fi: FeatureIndex, r: Ratings) -> TrainingData:
    return TrainingData(PaddedRows.from_csr(fi.user_x), PaddedRows.from_csr(fi.item_x), r.users, r.items, r.rating)


def implicit_data(fi: FeatureIndex, r: Ratings) -> TrainingData:
    """The pipeline's implicit samples for the pairs of ``r`` (each a positive, strength 1)."""
    ds = Dataset(fi, r.users, r.items, np.ones(len(r.users), np.float32), implicit=True)
    return training_data(ds)


def hyperparameters(implicit: bool, values: dict[str, Any], *, quick: bool) -> HyperParameters:
    """This benchmark measures the SGD learner (benchmarks/ranking.py measures the default, icd)."""
    hp = default_hyperparameters(implicit, seed=SEED, learner="sgd", **values)
    return replace(hp, epochs=min(hp.epochs, QUICK_EPOCHS)) if quick else hp


def fit_explicit(fi: FeatureIndex, train: Ratings, hp: HyperParameters) -> tuple[TrainResult, float, int]:
    """Early-stop on a ua-like carve of ``train``, then refit on all of it for the best epoch count.

    Returns the refitted model's result, the validation RMSE at the best epoch, and that epoch.
    """
    carve = per_user_count_split(train.users, VALIDATION_PER_USER, VALIDATION_SEED)
    held = subset(train, carve)
    probe = train_fm(explicit_data(fi, subset(train, ~carve)), fi.n_features, hp,
                     validation=explicit_data(fi, held), progress=False)
    val_rmse = ev.rmse(predict(probe.params, design_rows(fi, held.users, held.items)), held.rating)
    epochs = max(probe.best_epoch, 1)
    final = train_fm(explicit_data(fi, train), fi.n_features, replace(hp, epochs=epochs, validation_fraction=0.0),
                     progress=False)
    return final, val_rmse, epochs


def fit_implicit(fi: FeatureIndex, positives: Ratings, hp: HyperParameters) -> tuple[TrainResult, int]:
    """Early-stop on the trainer's own validation split of the positives (log loss against sampled
    negatives), then refit on all positives for the best epoch count."""
    probe = train_fm(implicit_data(fi, positives), fi.n_features, hp, progress=False)
    epochs = max(probe.best_epoch, 1)
    final = train_fm(implicit_data(fi, positives), fi.n_features,
                     replace(hp, epochs=epochs, validation_fraction=0.0), progress=False)
    return final, epochs


def vector_scores(vectors: RecipeVectors, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """(n,) FM scores of pairs from the recipe's vectors: a_u . a_i + c_u."""
    dots = np.einsum("ij,ij->i", vectors.user_vectors[users].astype(np.float64),
                     vectors.item_vectors[items].astype(np.float64))
    return dots + vectors.user_constants[users]


# --------------------------------------------------------------------------- baselines


def import_myfm() -> Any:
    """myfm 0.4.0 imports two names from pkg_resources that it never uses; setuptools >= 81 no longer
    ships pkg_resources. A stand-in module lets it import without pinning an old setuptools."""
    if "pkg_resources" not in sys.modules and importlib.util.find_spec("pkg_resources") is None:
        stand_in = types.ModuleType("pkg_resources")
        stand_in.DistributionNotFound = type("DistributionNotFound", (Exception,), {})  # type: ignore[attr-defined]

        def get_distribution(name: str) -> Any:
            raise stand_in.DistributionNotFound(name)  # type: ignore[attr-defined]

        stand_in.get_distribution = get_distribution  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = stand_in
    import myfm

    return myfm


def myfm_rmse(fi: FeatureIndex, train: Ratings, test: Ratings, *, quick: bool) -> float:
    """myFM's Gibbs-sampled Bayesian FM on the same design rows as topx."""
    myfm = import_myfm()
    n_iter = QUICK_MYFM_ITER if quick else MYFM["n_iter"]
    kept = min(MYFM["n_kept_samples"], n_iter - 5)
    model = myfm.MyFMRegressor(rank=MYFM["rank"], random_seed=SEED)
    model.fit(design_rows(fi, train.users, train.items), train.rating.astype(np.float64), n_iter=n_iter,
              n_kept_samples=kept)
    return ev.rmse(model.predict(design_rows(fi, test.users, test.items)), test.rating)


def als_top_x(positives: sp.csr_matrix, seen: sp.csr_matrix, x: int, values: dict[str, Any], *,
              quick: bool) -> np.ndarray:
    """implicit's ALS on the positives (users x items); top-x over unseen items, ties by item row."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    iterations = QUICK_ALS_ITER if quick else values["iterations"]
    # implicit's solver runs its own threads; a BLAS thread pool under them only contends.
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(factors=values["factors"], regularization=values["regularization"],
                                        alpha=values["alpha"], iterations=iterations, random_state=SEED)
        model.fit(positives.astype(np.float32), show_progress=False)
    scores = np.asarray(model.user_factors, np.float64) @ np.asarray(model.item_factors, np.float64).T
    return top_x_dense(scores, seen, x)


def top_x_dense(scores: np.ndarray, seen: sp.csr_matrix, x: int) -> np.ndarray:
    """(n_users, x) item rows by (score descending, item row ascending), seen items excluded."""
    masked = np.array(scores, dtype=np.float64, copy=True)
    rows, cols = seen.nonzero()
    masked[rows, cols] = -np.inf
    order = np.argsort(-masked, axis=1, kind="stable")[:, :x]  # stable: equal scores keep item order
    return np.where(np.isneginf(np.take_along_axis(masked, order, axis=1)), -1, order)


# --------------------------------------------------------------------------- exact agreement


@dataclass(frozen=True)
class Agreement:
    positions: int
    identical: int
    ties: int

    @property
    def rate(self) -> float:
        return (self.identical + self.ties) / max(self.positions, 1)


def brute_force_agreement(params: FMParams, fi: FeatureIndex, seen: sp.csr_matrix, top_items: np.ndarray,
                          block: int = 64) -> Agreement:
    """Score every item for every user with :func:`topx.fm.predict` (float64), take the top-x of the
    unseen ones (ties by item row) and compare position by position with ``top_items`` (n_users, x),
    a search's result.

    A position where the items differ counts as a tie when their brute-force scores are equal within
    ``TIE_RTOL`` relative: both orders are then correct.
    """
    n_users, n_items = fi.n_users, fi.n_items
    x = top_items.shape[1]
    identical = ties = 0
    for start in range(0, n_users, block):
        users = np.arange(start, min(start + block, n_users))
        pairs_u = np.repeat(users, n_items)
        pairs_i = np.tile(np.arange(n_items), len(users))
        scores = np.asarray(predict(params, design_rows(fi, pairs_u, pairs_i))).reshape(len(users), n_items)
        brute = top_x_dense(scores, seen[users], x)
        got = top_items[users]
        same = brute == got
        identical += int(same.sum())
        rows, cols = np.nonzero(~same)
        if len(rows):
            a = scores[rows, brute[rows, cols]]
            b = np.where(got[rows, cols] >= 0, scores[rows, np.maximum(got[rows, cols], 0)], -np.inf)
            ties += int((np.abs(a - b) <= TIE_RTOL * np.maximum(np.abs(a), np.abs(b))).sum())
    return Agreement(n_users * x, identical, ties)


# --------------------------------------------------------------------------- the run


def run(data_dir: Path, *, quick: bool) -> dict[str, Any]:
    timer = StageTimer()
    with timer.stage("ingest"):
        users, items = load_users(data_dir), load_items(data_dir)
        fi_ids = feature_index(users, items, side_features=False)
        fi_feat = feature_index(users, items, side_features=True)
        base = load_ratings(data_dir, "ua.base")
        test = load_ratings(data_dir, "ua.test")
        every = load_ratings(data_dir, "u.data")
        base_ids, test_ids = index_ratings(base, fi_ids), index_ratings(test, fi_ids)
        base_feat, test_feat = index_ratings(base, fi_feat), index_ratings(test, fi_feat)
        all_ids = index_ratings(every, fi_ids)
        holdout = ev.holdout_split(all_ids.users, RANKING_HOLDOUT, SEED)
        train_all = subset(all_ids, ~holdout)
        positives = subset(train_all, train_all.rating >= RELEVANT_RATING)
        seen = interaction_matrix(train_all, fi_ids)
        relevant = interaction_matrix(subset(all_ids, holdout & (all_ids.rating >= RELEVANT_RATING)), fi_ids)
        seen_base = interaction_matrix(base_feat, fi_feat)

    out: dict[str, Any] = {"benchmark": "quality_ml100k", "quick": quick}
    with timer.stage("train"):
        ids_model, val_ids, epochs_ids = fit_explicit(fi_ids, base_ids, hyperparameters(False, EXPLICIT_IDS, quick=quick))
        feat_model, val_feat, epochs_feat = fit_explicit(
            fi_feat, base_feat, hyperparameters(False, EXPLICIT_FEATURES, quick=quick))
        rank_model, epochs_rank = fit_implicit(fi_ids, positives, hyperparameters(True, IMPLICIT, quick=quick))
    with timer.stage("vectors"):
        vec_ids = export_vectors(ids_model.params, fi_ids)
        vec_feat = export_vectors(feat_model.params, fi_feat)
        vec_rank = export_vectors(rank_model.params, fi_ids)
    with timer.stage("search"):
        top_rank = search_top_x(vec_rank.user_vectors, vec_rank.item_vectors, X, seen=seen).items
        top_feat = search_top_x(vec_feat.user_vectors, vec_feat.item_vectors, X, seen=seen_base).items
    with timer.stage("search_faiss"):
        faiss_rank = search_top_x(vec_rank.user_vectors, vec_rank.item_vectors, X, seen=seen, method="faiss").items
        faiss_feat = search_top_x(vec_feat.user_vectors, vec_feat.item_vectors, X, seen=seen_base,
                                  method="faiss").items
    with timer.stage("evaluate"):
        out["rmse_ids"] = ev.rmse(vector_scores(vec_ids, test_ids.users, test_ids.items), test_ids.rating)
        out["rmse_features"] = ev.rmse(vector_scores(vec_feat, test_feat.users, test_feat.items), test_feat.rating)
        out["rmse_global_mean"] = ev.rmse(np.full(len(test_ids.rating), base_ids.rating.mean()), test_ids.rating)
        out["validation_rmse_ids"], out["validation_rmse_features"] = val_ids, val_feat
        out["epochs"] = {"ids": epochs_ids, "features": epochs_feat, "implicit": epochs_rank}
        topx_rank = ev.ranking_metrics(top_rank, relevant, fi_ids.n_items)
        pop_rank = ev.ranking_metrics(ev.popularity_top_x(seen, X), relevant, fi_ids.n_items)
        out.update(recall_at_10=topx_rank.recall, ndcg_at_10=topx_rank.ndcg,
                   popularity_recall_at_10=pop_rank.recall, popularity_ndcg_at_10=pop_rank.ndcg,
                   ranking_users=topx_rank.users, coverage_at_10=topx_rank.coverage)
        agreement = {
            "implicit_ids": brute_force_agreement(rank_model.params, fi_ids, seen, top_rank),
            "explicit_features": brute_force_agreement(feat_model.params, fi_feat, seen_base, top_feat),
        }
        out["exact_agreement"] = min(a.rate for a in agreement.values())
        out["exact_agreement_detail"] = {name: {"positions": a.positions, "identical": a.identical, "ties": a.ties}
                                         for name, a in agreement.items()}
        agreement_faiss = {
            "implicit_ids": brute_force_agreement(rank_model.params, fi_ids, seen, faiss_rank),
            "explicit_features": brute_force_agreement(feat_model.params, fi_feat, seen_base, faiss_feat),
        }
        out["exact_agreement_faiss"] = min(a.rate for a in agreement_faiss.values())
        out["exact_agreement_faiss_detail"] = {
            name: {"positions": a.positions, "identical": a.identical, "ties": a.ties}
            for name, a in agreement_faiss.items()
        }
    with timer.stage("myfm"):
        out["myfm_rmse_ids"] = myfm_rmse(fi_ids, base_ids, test_ids, quick=quick)
        out["myfm_rmse_features"] = myfm_rmse(fi_feat, base_feat, test_feat, quick=quick)
    with timer.stage("implicit"):
        als = ev.ranking_metrics(als_top_x(interaction_matrix(positives, fi_ids), seen, X, ALS, quick=quick),
                                 relevant, fi_ids.n_items)
        out.update(implicit_recall_at_10=als.recall, implicit_ndcg_at_10=als.ndcg)

    out["rmse_gap_to_myfm_features"] = out["rmse_features"] - out["myfm_rmse_features"]
    out["rmse_gap_to_myfm_ids"] = out["rmse_ids"] - out["myfm_rmse_ids"]
    out["recall_lift_over_popularity"] = out["recall_at_10"] / out["popularity_recall_at_10"] - 1.0
    out["recall_ratio_to_implicit"] = out["recall_at_10"] / out["implicit_recall_at_10"]
    out["targets_met"] = {
        "rmse_features": out["rmse_features"] <= TARGETS["rmse_features_max"],
        "recall_lift_over_popularity": out["recall_lift_over_popularity"] >= TARGETS["recall_lift_over_popularity_min"],
        "exact_agreement": out["exact_agreement"] >= TARGETS["exact_agreement"],
    }
    out["hyperparameters"] = {"explicit_ids": EXPLICIT_IDS, "explicit_features": EXPLICIT_FEATURES,
                              "implicit": IMPLICIT, "als": ALS, "myfm": MYFM}
    out["timings_s"] = timer.timings_s
    out["timings_s"]["total"] = round(sum(timer.timings_s.values()), 2)
    return out


# --------------------------------------------------------------------------- tuning


def _grid(**axes: list[Any]) -> list[dict[str, Any]]:
    configs: list[dict[str, Any]] = [{}]
    for name, values in axes.items():
        configs = [{**c, name: v} for c in configs for v in values]
    return configs


def tune(data_dir: Path, *, top: int = 5) -> dict[str, Any]:
    """The grids behind the constants, scored on validation carves only (never on ua.test or on
    the ranking hold-out): explicit on the ua-like carve of ua.base (RMSE), implicit and ALS on a
    20 % per-user carve of the ranking split's training part (recall@10 of items rated >= 4)."""
    users, items = load_users(data_dir), load_items(data_dir)
    board: dict[str, Any] = {}
    base = load_ratings(data_dir, "ua.base")
    explicit_grid = _grid(factors_lr=[0.01, 0.02, 0.03], factors_wd=[0.05, 0.1, 0.2], linear_lr=[0.05, 0.1])
    for name, side in (("explicit_ids", False), ("explicit_features", True)):
        fi = feature_index(users, items, side_features=side)
        r = index_ratings(base, fi)
        carve = per_user_count_split(r.users, VALIDATION_PER_USER, VALIDATION_SEED)
        train, held = subset(r, ~carve), subset(r, carve)
        held_x = design_rows(fi, held.users, held.items)
        scored = []
        for change in explicit_grid:
            values = {**EXPLICIT_FEATURES, **change}
            result = train_fm(explicit_data(fi, train), fi.n_features, hyperparameters(False, values, quick=False),
                              validation=explicit_data(fi, held), progress=False)
            rmse = ev.rmse(predict(result.params, held_x), held.rating)
            scored.append({"validation_rmse": rmse, "best_epoch": result.best_epoch, **change})
            log(f"{name} {change}: validation RMSE {rmse:.4f} at epoch {result.best_epoch}")
        board[name] = sorted(scored, key=lambda s: s["validation_rmse"])[:top]

    fi = feature_index(users, items, side_features=False)
    every = index_ratings(load_ratings(data_dir, "u.data"), fi)
    train_all = subset(every, ~ev.holdout_split(every.users, RANKING_HOLDOUT, SEED))
    inner = ev.holdout_split(train_all.users, RANKING_HOLDOUT, VALIDATION_SEED)
    fit_part, val_part = subset(train_all, ~inner), subset(train_all, inner)
    seen = interaction_matrix(fit_part, fi)
    relevant = interaction_matrix(subset(val_part, val_part.rating >= RELEVANT_RATING), fi)

    def recall_of(top_items: np.ndarray) -> float:
        return ev.ranking_metrics(top_items, relevant, fi.n_items).recall

    scored = []
    for change in _grid(positives=["rated >= 4", "all, weighted by log1p(rating)"], linear_wd=[0.003, 0.01, 0.02],
                        factors_lr=[0.05, 0.1], negative_samples=[4, 8]):
        change = {**change, "factors_wd": change["linear_wd"], "linear_lr": change["factors_lr"],
                  "bias_lr": change["factors_lr"]}
        values = {**IMPLICIT, **{k: v for k, v in change.items() if k != "positives"}}
        if change["positives"] == "rated >= 4":
            data = implicit_data(fi, subset(fit_part, fit_part.rating >= RELEVANT_RATING))
        else:
            data = training_data(Dataset(fi, fit_part.users, fit_part.items, fit_part.rating, implicit=True))
        result = train_fm(data, fi.n_features, hyperparameters(True, values, quick=False), progress=False)
        vectors = export_vectors(result.params, fi)
        recall = recall_of(search_top_x(vectors.user_vectors, vectors.item_vectors, X, seen=seen).items)
        scored.append({"validation_recall_at_10": recall, "best_epoch": result.best_epoch, **change})
        log(f"implicit {change}: validation recall@10 {recall:.4f} at epoch {result.best_epoch}")
    board["implicit"] = sorted(scored, key=lambda s: -s["validation_recall_at_10"])[:top]

    scored = []
    for change in _grid(positives=["rated >= 4", "all"], factors=[16, 32, 64], regularization=[1.0, 10.0, 30.0, 100.0],
                        alpha=[1.0, 5.0, 20.0]):
        chosen = fit_part if change["positives"] == "all" else subset(fit_part, fit_part.rating >= RELEVANT_RATING)
        values = {**ALS, **{k: v for k, v in change.items() if k != "positives"}}
        recall = recall_of(als_top_x(interaction_matrix(chosen, fi), seen, X, values, quick=False))
        scored.append({"validation_recall_at_10": recall, **change})
    board["als"] = sorted(scored, key=lambda s: -s["validation_recall_at_10"])[:top]
    return {"benchmark": "quality_ml100k_tuning", "leaderboards": board}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_ML100K,
                        help="the unpacked ml-100k directory (default: ../shared/data/ml-100k from the repo root)")
    parser.add_argument("--quick", action="store_true", help="a few epochs and sampler iterations: a smoke run")
    parser.add_argument("--tune", action="store_true", help="run the validation grids instead of the benchmark")
    args = parser.parse_args(argv)
    doc = tune(args.data) if args.tune else run(args.data, quick=args.quick)
    print_json_line(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
