"""The whole run, as ``topx run`` does it: ingest -> (tune) -> train -> vectors -> recommend -> evaluate,
into a run directory (topx.rundir) that appears only when every step succeeded.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq

from topx.config import HyperParameters
from topx.dataset import DataOptions, Dataset, items_table, load_dataset
from topx.filters import ResolvedList, exclude_also, load_filters, read_responses, resolve_lists
from topx.report import write_run_report
from topx.rundir import (
    FALLBACK,
    METRICS,
    RECOMMENDATIONS,
    VECTORS_DIR,
    atomic_output_dir,
    list_fallback,
    list_recommendations,
    write_json,
)
from topx.steps import (
    Reporter,
    RunOptions,
    evaluate_model,
    fallback_list,
    train_stage,
    training_summary,
    tuned_hyperparameters,
    vectors_stage,
    write_recommendations_parquet,
)

if TYPE_CHECKING:
    from topx.fm import TrainResult


def unused_columns_note(report: dict[str, Any]) -> str:
    """A sentence naming the interactions' columns of numbers or times that nothing read, or ""."""
    unused = report.get("unused_columns")
    if not unused:
        return ""
    return (f" Not read: column{'s' if len(unused) > 1 else ''} {', '.join(unused)} (--rating-col NAME weighs "
            "the interactions by a rating or count, --time-col NAME gives them times).")


def time_note(data: DataOptions, ds: Dataset, holdout: float) -> str:
    """A sentence saying which column gave the rows their times and what follows from it, or ""."""
    if ds.time is None:
        return ""
    how = " (read by default: --no-time-col leaves it unread)" if data.time_optional else ""
    follows = ["the hold-out is each user's latest rows"] if holdout > 0 else []
    if ds.recency_boost:
        follows.append(f"each user's recent interactions weigh more, the latest {1 + ds.recency_boost:g} x the "
                       "earliest (--recency-boost)")
    return (f" Time: column {data.time_col}{how}, {ds.report['time_first']} to {ds.report['time_last']}"
            + "".join(f"; {part}" for part in follows) + ".")


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
            # The filters are checked against the items table now, before any training.
            eligible = diversity = None
            named: list[ResolvedList] = []
            if run.filters is not None:
                default, *named = resolve_lists(load_filters(run.filters), ds.item_ids, items_table(data))
                eligible, diversity = default.eligible, default.diversity
            d["result"] = (f"{ds.report['n_interactions']:,} interactions, {ds.report['n_users']:,} users, "
                           f"{ds.report['n_items']:,} items, {ds.feature_index.n_features:,} features."
                           + time_note(data, ds, run.holdout) + unused_columns_note(ds.report))
        hp, tuning = tuned_hyperparameters(ds, hp, run, reporter)
        params, holdout, result, ds = train_stage(ds, hp, run, tmp, reporter)
        with reporter.step("vectors", "building the recipe's user and item vectors"):
            vectors = vectors_stage(params, ds.feature_index, tmp / VECTORS_DIR)
        with reporter.step("recommend", f"top-{run.top_x} for {ds.feature_index.n_users:,} users "
                                        f"({run.search_method} search)") as d:
            seen = None if run.include_seen else ds.matrix()
            if run.responses is not None:
                dismissed = read_responses(run.responses, ds.user_ids, ds.item_ids)
                seen = exclude_also(seen, dismissed)
            user_ids, item_ids = np.asarray(ds.user_ids, dtype=object), np.asarray(ds.item_ids, dtype=object)
            fi, counts = ds.feature_index, {}
            n_rows = write_recommendations_parquet(tmp / RECOMMENDATIONS, vectors, user_ids, item_ids, run.top_x, seen,
                                                   method=run.search_method, cold_users_from=fi.n_warm_users,
                                                   cold_items_from=fi.n_warm_items, counts=counts,
                                                   eligible=eligible, diversity=diversity)
            lists = {}
            for chosen in named:
                path = list_recommendations(tmp, chosen.name)
                path.parent.mkdir(exist_ok=True)
                rows = write_recommendations_parquet(path, vectors, user_ids, item_ids, run.top_x, seen,
                                                     method=run.search_method, cold_users_from=fi.n_warm_users,
                                                     cold_items_from=fi.n_warm_items, eligible=chosen.eligible,
                                                     diversity=chosen.diversity)
                lists[chosen.name] = {"eligible_items": int(chosen.eligible.sum()), "rows": rows,
                                      "file": str(path.relative_to(tmp))}
            d["result"] = f"{n_rows:,} rows" + (f", and {len(lists)} named list(s)." if lists else ".")
        with reporter.step("evaluate", "evaluating on the hold-out against popularity"):
            metrics = evaluate_model(params, vectors, ds, holdout, run, hp.seed, hp.learner)
        with reporter.step("fallback", "choosing the list for users the model has not seen") as d:
            fallback, metrics["fallback"] = fallback_list(ds, vectors, holdout, run.top_x, eligible, diversity)
            pq.write_table(fallback, tmp / FALLBACK)
            # Each named list's own, from its items and cap, by the source the default list's validation chose.
            for chosen in named:
                own, _ = fallback_list(ds, vectors, holdout, run.top_x, chosen.eligible, chosen.diversity,
                                       source=metrics["fallback"]["source"])
                pq.write_table(own, list_fallback(tmp, chosen.name))
                lists[chosen.name]["fallback_file"] = str(list_fallback(tmp, chosen.name).relative_to(tmp))
            d["result"] = f"{metrics['fallback']['source']}."
        metrics.update(_run_summary(ds, hp, run, result))
        if eligible is not None:
            metrics["filters"] = {"file": run.filters, "eligible_items": int(eligible.sum()),
                                  "note": "the hold-out metrics rank every item; the recommendations only eligible ones"}
            if lists:
                metrics["filters"]["lists"] = lists
        metrics["cold"] = {"items": fi.cold_items, "users": fi.cold_users,
                           "cold_item_rows": counts.get("cold_item_rows", 0),
                           "cold_item_share": counts.get("cold_item_rows", 0) / max(counts.get("rows", 0), 1)}
        if tuning is not None:
            metrics["tuning"] = tuning
        metrics["timings_s"] = dict(reporter.timings)
        metrics["timings_s"]["total"] = round(time.perf_counter() - start, 3)
        write_json(tmp / METRICS, metrics)
        with reporter.step("report", "writing the run report"):
            write_run_report(tmp, items_table=items_table(data), name=Path(out).resolve().name)
    return metrics


def _run_summary(ds: Dataset, hp: HyperParameters, run: RunOptions, result: TrainResult) -> dict[str, Any]:
    return {
        **training_summary(hp, result, ds.report),
        "top_x": run.top_x,
        "holdout_fraction": run.holdout,
        # "temporal": each user's latest rows were held out (a time column); "random": a seeded draw.
        "holdout_split": ds.split,
        "half_life_days": ds.half_life_days,
        "recency_boost": ds.recency_boost,
        "include_seen": run.include_seen,
    }
