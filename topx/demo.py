"""``topx demo``: the whole pipeline on a catalogue the project generates itself."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

from topx.pipeline import DataOptions, Reporter, RunOptions, default_hyperparameters, run_all
from topx.synth import generate


def run_demo(
    *,
    out: str | None = None,
    n_users: int = 3000,
    n_items: int = 1500,
    implicit: bool = True,
    top_x: int = 10,
    seed: int = 7,
    quiet: bool = False,
) -> int:
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="topx-demo-"))
    try:
        data = generate(n_users, n_items, implicit=implicit, seed=seed)
        paths = data.write(work / "input")
        print(f"generated {len(data.interactions):,} interactions from {n_users:,} users on {n_items:,} items "
              f"(with user and item features) in {paths['interactions'].parent}")
        options = DataOptions(
            interactions=str(paths["interactions"]), users=str(paths["users"]), items=str(paths["items"]),
            rating_col="plays" if implicit else "rating", implicit=implicit,
        )
        hp = default_hyperparameters(implicit, num_factors=32, epochs=12)
        result_dir = Path(out) if out else work / "out"
        metrics = run_all(options, hp, RunOptions(top_x=top_x, progress=False if quiet else None), result_dir,
                          reporter=Reporter(not quiet))
        _show(result_dir, metrics, top_x, data.items)
        print(f"\ndemo finished in {time.perf_counter() - start:.1f} s; outputs in {result_dir.resolve()}"
              + ("" if out else " (temporary; pass --out DIR to keep them)"))
        return 0
    finally:
        if not out:
            shutil.rmtree(work, ignore_errors=True)


def _show(result_dir: Path, metrics: dict, top_x: int, items: pd.DataFrame) -> None:
    recs = pd.read_parquet(result_dir / "recommendations.parquet")
    catalogue = items.set_index("item_id")
    print(f"\nrecommendations for three users (of {recs['user_id'].nunique():,}):")
    for user in recs["user_id"].drop_duplicates().head(3):
        print(f"  {user}:")
        for row in recs[recs["user_id"] == user].head(5).itertuples():
            info = catalogue.loc[row.item_id]
            print(f"    {row.rank:>2}. {row.item_id}  {info['category']:<8} {info['tags']:<24} score {row.score:+.3f}")
    x = top_x
    print("\nhold-out metrics (topx vs popularity baseline):")
    for name in ("recall", "ndcg", "map", "coverage"):
        key = f"{name}_at_{x}"
        if key in metrics:
            print(f"  {key:<14} topx {metrics[key]:.4f}   popularity {metrics['popularity_' + key]:.4f}")
    for key in ("rmse", "auc", "log_loss"):
        if key in metrics:
            print(f"  {key:<14} {metrics[key]:.4f}")
