"""The run report: one self-contained HTML page that shows a run's data, training, hold-out metrics beside
popularity, what the lists hold, and a few users with their history and their list.

``topx run`` writes it as ``report.html`` beside metrics.json (``write_run_report``; ``topx report RUN_DIR``
writes it again); the deployed pipeline's Report stage writes it under the run's prefix
(topx.aws.stages.report_run). Both build it with ``build_report`` from streams of the interactions and of
the recommendations, so its size and memory follow neither the users nor the items. No torch or faiss
here: the Lambda that builds it neither trains nor searches.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from topx.errors import ArtifactFormatError
from topx.feature_index import FeatureIndex
from topx.report.html import render_report
from topx.report.summary import (
    InteractionTally,
    RecommendationTally,
    choose_sample_users,
    sample_users,
    titles_of,
)

RECOMMENDATION_COLUMNS = ["user_id", "rank", "item_id", "score", "cold_user"]
BATCH_ROWS = 1 << 16

__all__ = ["build_report", "recommendation_frames", "write_run_report"]


def build_report(
    metrics: dict[str, Any],
    feature_index: FeatureIndex,
    interactions: Iterable[tuple[np.ndarray, np.ndarray]] | None,
    recommendations: Iterable[pd.DataFrame] | None,
    *,
    title: str,
    expected_rows: int = 0,
    items_table: pd.DataFrame | None = None,
    gate: dict[str, Any] | None = None,
    live: dict[str, Any] | None = None,
    recommendations_absent: str = "No recommendations were written.",
) -> str:
    """The page's HTML.

    ``interactions``: (user rows, item rows) batches of the run's interactions (None: not available);
    ``recommendations``: frames of the recommendations table (RECOMMENDATION_COLUMNS), ``expected_rows``
    of them in all; ``items_table``: the items table indexed by item id, for titles; ``gate`` and
    ``live``: the deployed quality gate's reply and the live model it compared with.
    """
    fi = feature_index
    seed = int((metrics.get("hyperparameters") or {}).get("seed", 0))
    rows = choose_sample_users(fi.n_warm_users, fi.n_users, seed)
    tally = InteractionTally(fi.n_users, fi.n_items, rows)
    data = None
    if interactions is not None:
        for user_rows, item_rows in interactions:
            tally.add(np.asarray(user_rows, np.int64), np.asarray(item_rows, np.int64))
        data = tally.summary(fi.n_warm_users, fi.n_warm_items)
    recs, lists = None, {}
    if recommendations is not None:
        rec_tally = RecommendationTally(fi.item_ids, fi.n_warm_items, tuple(fi.user_ids[r] for r in rows),
                                        expected_rows=expected_rows, seed=seed)
        for frame in recommendations:
            rec_tally.add(frame)
        recs, lists = rec_tally.summary(tally.item_counts), rec_tally.lists
    shown = {fi.item_ids[i] for r in rows for i in tally.histories.get(r, [])}
    shown |= {item for entries in lists.values() for _, item, _ in entries}
    samples = sample_users(rows, fi.user_ids, fi.item_ids, tally, lists, fi.n_warm_users, fi.n_warm_items,
                           titles_of(items_table, shown)) if recs is not None or data is not None else []
    return render_report(metrics, title=title, data=data, recommendations=recs, samples=samples, gate=gate,
                         live=live, recommendations_absent=recommendations_absent)


def recommendation_frames(paths: Iterable[Path]) -> Iterable[pd.DataFrame]:
    """The recommendations of Parquet files, in batches of BATCH_ROWS rows."""
    import pyarrow.parquet as pq

    for path in paths:
        parquet = pq.ParquetFile(path)
        columns = [c for c in RECOMMENDATION_COLUMNS if c in parquet.schema_arrow.names]
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns):
            yield batch.to_pandas()


def parquet_rows(paths: Iterable[Path]) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(path).metadata.num_rows for path in paths)


def write_run_report(run_dir: str | Path, *, items_table: pd.DataFrame | None = None, name: str | None = None) -> Path:
    """Write ``report.html`` into a run directory of ``topx run`` from what it holds, and return its path.

    ``items_table``: the items table indexed by item id, for titles (None: none shown); ``name``: the
    run's name in the title (default: the directory's).
    """
    from topx.rundir import (
        DATA_DIR,
        INTERACTIONS_FILE,
        METRICS,
        MODEL_DIR,
        RECOMMENDATIONS,
        REPORT,
        iter_interaction_rows,
    )

    run = Path(run_dir)
    try:
        metrics = json.loads((run / METRICS).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactFormatError(f"{run / METRICS}: cannot read the run's metrics ({exc}); is {run} a run "
                                  "directory of `topx run`?") from exc
    feature_index = FeatureIndex.load(run / MODEL_DIR)
    interactions = (iter_interaction_rows(run, DATA_DIR) if (run / DATA_DIR / INTERACTIONS_FILE).exists() else None)
    rec_paths = [run / RECOMMENDATIONS] if (run / RECOMMENDATIONS).exists() else []
    page = build_report(
        metrics, feature_index, interactions, recommendation_frames(rec_paths) if rec_paths else None,
        title=f"topx run {name or run.resolve().name}", expected_rows=parquet_rows(rec_paths), items_table=items_table,
        recommendations_absent=f"No {RECOMMENDATIONS} in {run}: run `topx recommend --run {run}` first.")
    out = run / REPORT
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out
