"""Top-10 ranking quality of topx beside popularity, implicit's ALS and BPR, EASE and LightFM (WARP),
on one protocol and one scoring code, for a seeded random and a temporal per-user split.

    .venv/bin/python -m benchmarks.ranking --data ../shared/data/ml-100k
    .venv/bin/python -m benchmarks.ranking --data ../shared/data/ml-100k --quick --skip-missing  # smoke run
    .venv/bin/python -m benchmarks.ranking --interactions plays.csv --rating-col plays --time-col ts
    .venv/bin/python -m benchmarks.ranking --topx-args="--implicit"   # another topx mode (note the =)

The baselines need benchmarks/requirements-baselines.txt (its comments say how to install lightfm).
Prints one JSON line on stdout; progress goes to stderr. The data are read where they lie, never
copied (MovieLens: F. Maxwell Harper and Joseph A. Konstan, ACM TiiS 5(4), 2015).

Protocol, the same for every method:

- Users and items are indexed once over the whole file; duplicate (user, item) rows are dropped,
  keeping the latest, so a pair is never both a training and a held-out interaction.
- Splits, per user 80/20: ``random`` by :func:`topx.evaluate.holdout_split` (``--seed``), and
  ``temporal`` (each user's latest rows held out, :func:`topx.evaluate.temporal_split`; skipped without a time
  column). Relevant = the user's held-out items.
- Every method ranks every item the user has no training interaction with; the top 10 are scored
  by :func:`topx.evaluate.ranking_metrics`. An item without training interactions can be relevant
  (and counts against every method) but only a model that gives it a score can recommend it.
- topx runs as a user runs it: its CLI on a CSV of the training part (``user_id``, ``item_id``, ``rating``
  and, with a time column, ``timestamp``, which topx reads as the time by default), no mode flags
  (``--topx-args`` appends some). Popularity counts the training interactions.
- The baselines train on the binary user x item matrix of training interactions. With a time column,
  ``als_recency`` is ALS again on the weights topx's default recency boost gives the same rows (each
  user's latest rows weighing more, ``topx.dataset.user_recency``), as its confidences: what the boost
  brings to another learner. Each is tuned on
  a validation carve of the training part only (random: a further seeded 20 % per user; temporal:
  each user's latest 20 % of the training rows), choosing by recall@10 there, then refitted on the
  whole training part with the chosen values (that fit is timed) and scored once on the test part.
- Timing, the same for every method: ``train_s`` (``<key>_train_s``) is the final fit alone; the search
  before it is ``<key>_tune_s`` for a baseline's grid and ``topx_tune_s`` for topx's own (``topx run``
  searches its settings on a carve of its training rows by default at this size, ``topx.tune``; ``topx_tuned``
  says whether the search changed them, to what, and its gain on the carve). ``topx_wall_s`` is topx's whole
  run: reading, searching, training, recommending, writing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import DEFAULT_ML100K, load_ratings, log, print_json_line  # noqa: E402
from benchmarks.quality_ml100k import top_x_dense  # noqa: E402
from topx import evaluate as ev  # noqa: E402

SEED = 42
X = 10
HOLDOUT = 0.2
INSTALL = "pip install -r benchmarks/requirements-baselines.txt (lightfm first: see that file's comments)"
SCORE_BLOCK = 1 << 24  # dense scores per block of users: at most this many (user, item) cells (128 MiB)
EASE_MAX_ITEMS = 20_000  # EASE inverts a dense items x items matrix: 3.2 GB at this size
QUICK_TOPX_ARGS = ["--epochs", "2"]
THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

# A scorer maps (b,) user rows to their (b, n_items) float64 scores; a fit function builds one from
# the binary (n_users, n_items) training CSR, a grid point and a seed.
Scorer = Callable[[np.ndarray], np.ndarray]
FitFn = Callable[[sp.csr_matrix, dict[str, Any], int], Scorer]


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Interactions:
    """One row per (user, item) pair, indexed over the whole file.

    users, items: (n,) int64 rows into user_ids (n_users,) and item_ids (n_items,), str;
    rating: (n,) float32; time: (n,) int64, or None when the file has no time column.
    """

    users: np.ndarray
    items: np.ndarray
    rating: np.ndarray
    time: np.ndarray | None
    user_ids: np.ndarray
    item_ids: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.user_ids), len(self.item_ids)


def read_csv_interactions(path: Path, args: argparse.Namespace) -> pd.DataFrame:
    """A CSV as user_id, item_id (str), rating (float32, 1 without a rating column) and timestamp
    (int64, absent without a time column; dates become integers in the same order)."""
    frame = pd.read_csv(path, sep=args.sep, dtype={args.user_col: str, args.item_col: str})
    out = pd.DataFrame({"user_id": frame[args.user_col], "item_id": frame[args.item_col]})
    if args.rating_col in frame.columns:
        out["rating"] = frame[args.rating_col].to_numpy(np.float32)
    else:
        log(f"{path}: no column {args.rating_col!r}; every row counts as rating 1")
        out["rating"] = np.float32(1.0)
    if args.time_col and args.time_col in frame.columns:
        column = frame[args.time_col]
        numeric = pd.api.types.is_numeric_dtype(column)
        out["timestamp"] = column.to_numpy(np.int64) if numeric else pd.to_datetime(column).astype("int64")
    elif args.time_col:
        log(f"{path}: no column {args.time_col!r}; the temporal split is skipped")
    return out


def index_interactions(frame: pd.DataFrame) -> Interactions:
    """Rows of a user_id, item_id, rating[, timestamp] frame over sorted id indexes, duplicates dropped."""
    has_time = "timestamp" in frame.columns
    if has_time:
        # Stable, so among equal times the later file row stays later; it is the one kept.
        frame = frame.sort_values("timestamp", kind="stable")
    deduped = frame.drop_duplicates(["user_id", "item_id"], keep="last").sort_index()
    if len(deduped) < len(frame):
        log(f"dropped {len(frame) - len(deduped):,} repeated (user, item) rows, keeping each pair's latest")
    user_ids, users = np.unique(deduped["user_id"].astype(str).to_numpy(), return_inverse=True)
    item_ids, items = np.unique(deduped["item_id"].astype(str).to_numpy(), return_inverse=True)
    return Interactions(
        users=users.astype(np.int64), items=items.astype(np.int64),
        rating=deduped["rating"].to_numpy(np.float32, copy=True),
        time=deduped["timestamp"].to_numpy(np.int64, copy=True) if has_time else None,
        user_ids=user_ids, item_ids=item_ids,
    )


def held_out(data: Interactions, within: np.ndarray, kind: str, seed: int) -> np.ndarray:
    """(n,) bool: the rows of ``within`` ((n,) bool) that a ``kind`` ("random" or "temporal") per-user
    split of those rows alone holds out. The same rule makes the test part and the validation carve."""
    rows = np.flatnonzero(within)
    if kind == "random":
        chosen = ev.holdout_split(data.users[rows], HOLDOUT, seed)
    else:
        assert data.time is not None
        chosen = ev.temporal_split(data.users[rows], data.time[rows], HOLDOUT)
    out = np.zeros(len(data.users), dtype=bool)
    out[rows[chosen]] = True
    return out


def binary_matrix(data: Interactions, mask: np.ndarray) -> sp.csr_matrix:
    """(n_users, n_items) float32 CSR with a 1 for every pair of the rows in ``mask`` ((n,) bool)."""
    ones = np.ones(int(mask.sum()), np.float32)
    return sp.csr_matrix((ones, (data.users[mask], data.items[mask])), shape=data.shape)


# --------------------------------------------------------------------------- topx


def topx_top_items(data: Interactions, train: np.ndarray, extra_args: list[str]) -> tuple[np.ndarray, float]:
    """Run ``topx run`` in-process on the training rows ((n,) bool) written as a CSV.

    Returns the (n_users, X) item rows of recommendations.parquet (-1 for none) and the training
    seconds from metrics.json.
    """
    from topx.cli import main as topx_main

    with tempfile.TemporaryDirectory(prefix="topx-ranking-") as tmp:
        csv, out = Path(tmp) / "train.csv", Path(tmp) / "run"
        columns = {"user_id": data.user_ids[data.users[train]], "item_id": data.item_ids[data.items[train]],
                   "rating": data.rating[train]}
        if data.time is not None:
            columns["timestamp"] = data.time[train]
        pd.DataFrame(columns).to_csv(csv, index=False)
        argv = ["run", "--interactions", str(csv), "--holdout", "0", "--top-x", str(X), "--out", str(out),
                *extra_args]
        log(f"topx {shlex.join(argv[1:])}")
        # The CLI prints its summary on stdout, which must carry only this benchmark's JSON line.
        with redirect_stdout(sys.stderr):
            code = topx_main(argv)
        if code != 0:
            raise RuntimeError(f"topx run exited with status {code} (its error is on stderr above)")
        recs = pd.read_parquet(out / "recommendations.parquet")
        metrics = json.loads((out / "metrics.json").read_text())
    tuning = metrics.get("tuning")
    run = {"train_s": float(metrics["timings_s"]["train"]), "tune_s": float(metrics["timings_s"].get("tune", 0.0)),
           "tuned": None if tuning is None else {"changed": tuning["changed"], "chosen": tuning["chosen"],
                                                 "gain": round(tuning["gain"], 4)}}
    return recommendations_array(data, recs), run


def recommendations_array(data: Interactions, recs: pd.DataFrame) -> np.ndarray:
    """recommendations.parquet rows (user_id, rank 1..X, item_id, score) -> (n_users, X) item rows,
    -1 for none."""
    users = pd.Index(data.user_ids).get_indexer(recs["user_id"].astype(str))
    items = pd.Index(data.item_ids).get_indexer(recs["item_id"].astype(str))
    if (users < 0).any() or (items < 0).any():
        raise ValueError("topx recommended for a user or an item that the interactions file does not hold")
    top = np.full((data.shape[0], X), -1, dtype=np.int64)
    top[users, recs["rank"].to_numpy(np.int64) - 1] = items
    return top


# --------------------------------------------------------------------------- baselines


def fit_als(train: sp.csr_matrix, params: dict[str, Any], seed: int) -> Scorer:
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    # implicit runs its own threads; a BLAS pool under each would only contend for the cores.
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(factors=params["factors"], regularization=params["regularization"],
                                        alpha=params["alpha"], iterations=params["iterations"],
                                        random_state=seed)
        model.fit(train, show_progress=False)  # implicit >= 0.5: users x items
    return factor_scorer(model.user_factors, model.item_factors)


def fit_bpr(train: sp.csr_matrix, params: dict[str, Any], seed: int) -> Scorer:
    from implicit.cpu.bpr import BayesianPersonalizedRanking
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):
        model = BayesianPersonalizedRanking(factors=params["factors"], learning_rate=params["learning_rate"],
                                            regularization=params["regularization"],
                                            iterations=params["iterations"], random_state=seed)
        model.fit(train, show_progress=False)
    # implicit keeps an item bias as the last item factor, against a constant 1 in the user's.
    return factor_scorer(model.user_factors, model.item_factors)


def fit_ease(train: sp.csr_matrix, params: dict[str, Any], seed: int) -> Scorer:
    """EASE (Steck 2019): B = -P / diag(P) with P = (X^T X + lambda I)^-1 and diag(B) = 0; scores X B.

    Closed form, so ``seed`` is unused.
    """
    x = train.astype(np.float64)
    gram = (x.T @ x).toarray()
    gram[np.diag_indices_from(gram)] += params["lambda"]
    p = np.linalg.inv(gram)
    b = -p / np.diag(p)  # column j divided by P_jj
    np.fill_diagonal(b, 0.0)
    return lambda rows: np.asarray(x[rows] @ b)


def fit_lightfm(train: sp.csr_matrix, params: dict[str, Any], seed: int) -> Scorer:
    from lightfm import LightFM

    model = LightFM(loss="warp", no_components=params["no_components"], random_state=seed)
    model.fit(train.tocoo(), epochs=params["epochs"], num_threads=THREADS)
    user_vectors, item_vectors = model.user_embeddings, model.item_embeddings
    # LightFM's prediction adds both biases; the user's one cannot change that user's ranking.
    item_biases = np.asarray(model.item_biases, np.float64)
    return lambda rows: factor_scorer(user_vectors, item_vectors)(rows) + item_biases


def factor_scorer(user_factors: np.ndarray, item_factors: np.ndarray) -> Scorer:
    """Scores as inner products of (n_users, k) user and (n_items, k) item factors, in float64."""
    users = np.asarray(user_factors, np.float64)
    items_t = np.asarray(item_factors, np.float64).T
    return lambda rows: users[rows] @ items_t


def grid(**axes: list[Any]) -> list[dict[str, Any]]:
    """Every combination of the axes' values, the first axis varying slowest."""
    points: list[dict[str, Any]] = [{}]
    for name, values in axes.items():
        points = [{**p, name: v} for p in points for v in values]
    return points


@dataclass(frozen=True)
class Baseline:
    """A tuned baseline: its JSON key prefix, the module it needs (None: numpy only), its fit, and
    the grids searched in a full and a ``--quick`` run."""

    key: str
    module: str | None
    fit: FitFn
    full_grid: list[dict[str, Any]]
    quick_grid: list[dict[str, Any]]


BASELINES = (
    Baseline("als", "implicit", fit_als,
             grid(factors=[16, 32, 64, 128], regularization=[1.0, 10.0, 30.0, 100.0], alpha=[1.0, 5.0, 20.0],
                  iterations=[15]),
             grid(factors=[16], regularization=[10.0, 30.0], alpha=[5.0], iterations=[3])),
    Baseline("bpr", "implicit", fit_bpr,
             grid(factors=[32, 64, 128], learning_rate=[0.003, 0.01, 0.03], regularization=[0.001, 0.01],
                  iterations=[100]),
             grid(factors=[16], learning_rate=[0.05, 0.1], regularization=[0.01], iterations=[5])),
    Baseline("ease", None, fit_ease,
             grid(**{"lambda": [50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0]}),
             grid(**{"lambda": [100.0, 500.0]})),
    Baseline("lightfm", "lightfm", fit_lightfm,
             grid(no_components=[32, 64, 128], epochs=[5, 10, 30, 60]),
             grid(no_components=[16], epochs=[1, 2])),
)


def missing_modules(baselines: tuple[Baseline, ...]) -> list[str]:
    return sorted({b.module for b in baselines if b.module and importlib.util.find_spec(b.module) is None})


# --------------------------------------------------------------------------- scoring


def top_items(scorer: Scorer, seen: sp.csr_matrix) -> np.ndarray:
    """(n_users, X) item rows by score (ties by item row), items of ``seen`` ((n_users, n_items) CSR)
    excluded, -1 for none; scored in blocks of users so a large catalogue needs no full dense matrix."""
    n_users, n_items = seen.shape
    block = max(1, SCORE_BLOCK // max(n_items, 1))
    parts = [top_x_dense(scorer(np.arange(s, min(s + block, n_users))), seen[s:s + block], X)
             for s in range(0, n_users, block)]
    return np.concatenate(parts) if parts else np.zeros((0, X), np.int64)


def recommends_seen(top: np.ndarray, seen: sp.csr_matrix) -> int:
    """How many entries of ``top`` ((n_users, X) item rows) are items the user has in ``seen``."""
    users, slots = np.nonzero(top >= 0)
    return int(np.asarray(seen[users, top[users, slots]]).sum()) if len(users) else 0


@dataclass(frozen=True)
class SplitData:
    """One split's matrices, each (n_users, n_items) binary CSR: train / test, and the train part's
    fit / validation carve."""

    train: sp.csr_matrix
    test: sp.csr_matrix
    fit: sp.csr_matrix
    validation: sp.csr_matrix


def split_matrices(data: Interactions, kind: str, seed: int) -> tuple[SplitData, np.ndarray, np.ndarray]:
    """The ``kind`` split's matrices and its (n,) bool training-row and validation-row masks."""
    test = held_out(data, np.ones(len(data.users), dtype=bool), kind, seed)
    train = ~test
    validation = held_out(data, train, kind, seed + 1)  # another seed: the carve is not the test draw
    matrices = SplitData(binary_matrix(data, train), binary_matrix(data, test),
                         binary_matrix(data, train & ~validation), binary_matrix(data, validation))
    return matrices, train, validation


def recency_matrix(data: Interactions, mask: np.ndarray) -> sp.csr_matrix:
    """The rows ``mask`` selects as a users x items matrix of the weights topx's default recency boost gives
    them (``topx.dataset.user_recency`` over those rows: each user's mean 1, their latest rows more)."""
    from topx.contract import DEFAULT_RECENCY_BOOST
    from topx.dataset import user_recency

    assert data.time is not None
    weight = user_recency(data.users[mask], data.time[mask], DEFAULT_RECENCY_BOOST)
    return sp.csr_matrix((weight, (data.users[mask], data.items[mask])), shape=data.shape)


def tune_and_score(baseline: Baseline, split: SplitData, seed: int, *, quick: bool,
                   label: str) -> dict[str, Any]:
    """Pick the grid point with the best validation recall@10 (the first among equals), refit it on
    the whole training part (timed) and score it on the test part."""
    n_items = split.train.shape[1]
    best: tuple[float, dict[str, Any]] | None = None
    tune_start = time.perf_counter()
    for params in baseline.quick_grid if quick else baseline.full_grid:
        top = top_items(baseline.fit(split.fit, params, seed), split.fit)
        recall = ev.ranking_metrics(top, split.validation, n_items).recall
        log(f"{label} {baseline.key} {params}: validation recall@10 {recall:.4f}")
        if best is None or recall > best[0]:
            best = (recall, params)
    assert best is not None
    tune_s = time.perf_counter() - tune_start
    start = time.perf_counter()
    scorer = baseline.fit(split.train, best[1], seed)
    train_s = time.perf_counter() - start
    top = top_items(scorer, split.train)
    check_unseen(top, split.train, baseline.key)
    metrics = ev.ranking_metrics(top, split.test, n_items)
    log(f"{label} {baseline.key} {best[1]}: test recall@10 {metrics.recall:.4f}, fit {train_s:.1f} s")
    return {"recall_at_10": metrics.recall, "ndcg_at_10": metrics.ndcg, "train_s": train_s, "tune_s": tune_s,
            "validation_recall_at_10": best[0], "params": best[1]}


def check_unseen(top: np.ndarray, seen: sp.csr_matrix, method: str) -> None:
    if (count := recommends_seen(top, seen)) > 0:
        raise RuntimeError(f"{method} recommended {count} training items; the protocol excludes them")


def baseline_keys(key: str, result: dict[str, Any] | None) -> dict[str, Any]:
    """A baseline's JSON keys (all null when it was skipped): ``ease`` reports its one value as
    ``ease_lambda``, the others their chosen grid point as ``<key>_params``."""
    result = result or {}
    out = {f"{key}_{name}": result.get(name)
           for name in ("recall_at_10", "ndcg_at_10", "train_s", "tune_s", "validation_recall_at_10")}
    params = result.get("params")
    if key == "ease":
        out["ease_lambda"] = None if params is None else params["lambda"]
    else:
        out[f"{key}_params"] = params
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def evaluate_split(data: Interactions, kind: str, args: argparse.Namespace, skip: set[str]) -> dict[str, Any]:
    """Every method on the ``kind`` split; keys without the split's suffix."""
    split, train_rows, validation_rows = split_matrices(data, kind, args.seed)
    n_items = data.shape[1]
    cold = int((np.diff(split.train.tocsc().indptr) == 0).sum())
    log(f"{kind} split: {split.train.nnz:,} training, {split.test.nnz:,} held-out interactions, "
        f"{cold:,} items without training interactions")
    out: dict[str, Any] = {"test_interactions": split.test.nnz, "items_without_training": cold}

    topx_args = (QUICK_TOPX_ARGS if args.quick else []) + shlex.split(args.topx_args)
    start = time.perf_counter()
    top, run = topx_top_items(data, train_rows, topx_args)
    train_s = run["train_s"]
    wall_s = time.perf_counter() - start
    check_unseen(top, split.train, "topx")
    topx = ev.ranking_metrics(top, split.test, n_items)
    log(f"{kind} topx: test recall@10 {topx.recall:.4f}, train {train_s:.1f} s")
    out.update(recall_at_10=topx.recall, ndcg_at_10=topx.ndcg, train_s=train_s, topx_wall_s=wall_s,
               topx_tune_s=run["tune_s"], topx_tuned=run["tuned"], ranking_users=topx.users)

    if kind == "temporal":
        # Recency weighting on (each half-life) beside off (above): topx as a user runs it with --time-col.
        for half_life in args.half_lives:
            weighted, _ = topx_top_items(data, train_rows, [*topx_args, "--time-col", "timestamp",
                                                            "--half-life-days", f"{half_life:g}"])
            out[f"recall_at_10_half_life_{half_life:g}d"] = ev.ranking_metrics(weighted, split.test, n_items).recall

    popularity = ev.ranking_metrics(ev.popularity_top_x(split.train, X), split.test, n_items)
    out.update(popularity_recall_at_10=popularity.recall, popularity_ndcg_at_10=popularity.ndcg)

    for baseline in BASELINES:
        result = None
        if baseline.module in skip:
            log(f"{kind} {baseline.key}: skipped, {baseline.module} is not installed")
        elif baseline.key == "ease" and n_items > EASE_MAX_ITEMS:
            log(f"{kind} ease: skipped, {n_items:,} items is more than a dense inverse should hold")
        else:
            result = tune_and_score(baseline, split, args.seed, quick=args.quick, label=kind)
        out.update(baseline_keys(baseline.key, result))

    # ALS given the weights topx's recency boost gives the rows (as its confidences), tuned and scored as ALS
    # is: what the boost brings to another learner, beside what it brings topx.
    result = None
    if data.time is not None and "implicit" not in skip:
        weighted = replace(split, train=recency_matrix(data, train_rows),
                           fit=recency_matrix(data, train_rows & ~validation_rows))
        als = next(baseline for baseline in BASELINES if baseline.key == "als")
        result = tune_and_score(replace(als, key="als_recency"), weighted, args.seed, quick=args.quick, label=kind)
    out.update(baseline_keys("als_recency", result))

    out["topx_vs_als_recall"] = ratio(out["recall_at_10"], out["als_recall_at_10"])
    out["topx_vs_popularity_recall"] = ratio(out["recall_at_10"], out["popularity_recall_at_10"])
    out["topx_train_vs_als"] = ratio(out["train_s"], out["als_train_s"])
    return out


# --------------------------------------------------------------------------- the run


def load(args: argparse.Namespace) -> tuple[Interactions, str]:
    """The interactions and the dataset's name."""
    if args.interactions is not None:
        return index_interactions(read_csv_interactions(args.interactions, args)), args.interactions.name
    return index_interactions(load_ratings(args.data)), Path(args.data).resolve().name


def run(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    missing = missing_modules(BASELINES)
    if missing and not args.skip_missing:
        raise SystemExit(f"ranking: {', '.join(missing)} not installed. Install the baselines with\n"
                         f"    {INSTALL}\nor pass --skip-missing to report their keys as null.")
    data, name = load(args)
    log(f"{name}: {data.shape[0]:,} users, {data.shape[1]:,} items, {len(data.users):,} interactions")
    out: dict[str, Any] = {
        "benchmark": "ranking", "quick": args.quick, "dataset": name, "n_users": data.shape[0],
        "n_items": data.shape[1], "n_interactions": len(data.users), "split_seed": args.seed,
        "validation_seed": args.seed + 1, "holdout_fraction": HOLDOUT, "x": X, "topx_args": args.topx_args,
        "baselines_missing": missing,
    }
    random = evaluate_split(data, "random", args, set(missing))
    # Without a time column the temporal keys are still there, null, so every run has the same keys.
    if data.time is None:
        temporal = dict.fromkeys([*random, *(f"recall_at_10_half_life_{h:g}d" for h in args.half_lives)])
    else:
        temporal = evaluate_split(data, "temporal", args, set(missing))
    out.update(random)
    out.update({f"{k}_temporal": v for k, v in temporal.items()})
    out["wall_s"] = time.perf_counter() - start
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_ML100K,
                        help="the unpacked ml-100k directory (its u.data; default ../shared/data/ml-100k)")
    parser.add_argument("--interactions", type=Path, help="a CSV to use instead of --data")
    parser.add_argument("--half-lives", type=float, nargs="*", default=[30.0, 90.0, 180.0], metavar="DAYS",
                        help="temporal split: also run topx with --half-life-days DAYS for each (default 30 90 180)")
    parser.add_argument("--user-col", default="user_id", help="--interactions user id column")
    parser.add_argument("--item-col", default="item_id", help="--interactions item id column")
    parser.add_argument("--rating-col", default="rating",
                        help="--interactions rating or play-count column; without it every row counts 1")
    parser.add_argument("--time-col", default="timestamp",
                        help="--interactions time column (numbers or dates); without it, or with '', "
                             "no temporal split")
    parser.add_argument("--sep", default=",", help="--interactions field separator (default ,)")
    parser.add_argument("--seed", type=int, default=SEED, help=f"the random split's seed (default {SEED})")
    parser.add_argument("--topx-args", default="",
                        help='extra `topx run` arguments, shell-quoted, after =: --topx-args="--implicit"')
    parser.add_argument("--quick", action="store_true", help="tiny grids and iterations: a smoke run")
    parser.add_argument("--skip-missing", action="store_true",
                        help="report a baseline whose library is not installed as null instead of failing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    print_json_line(run(parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
