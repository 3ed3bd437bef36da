"""New products: how well topx recommends items nobody has interacted with yet, from their features.

    .venv/bin/python -m benchmarks.cold_items --data ../shared/data/ml-100k

On MovieLens 100k, a seeded 10 % of the items become cold: every interaction with them is held out
of training, while the items table (``u.item``: genres, release year) still lists them. topx runs as a
user runs it (``topx run --interactions train.csv --items items.csv --holdout 0 --top-x 10``), so the
cold items get vectors from their features alone and compete with the others in every list.

Reported, over the users who interacted with at least one cold item (their held-out interactions are
the relevant set):

* ``cold_share``: the share of list entries that are cold items, for all users;
* ``cold_recall_at_10``: recall@10 of the held-out cold-item interactions, topx's lists as they are;
* ``random_cold_recall_at_10``: the baseline, random placement: each user's list keeps as many cold
  slots as topx gave it, filled with cold items drawn at random (seeded, the user's own draw), the
  other entries unchanged; the mean over ``--random-draws`` draws;
* ``cold_vs_random``: the ratio; above 1 means the features place the right new items, not just some;
* ``warm_recall_at_10``: for reference, recall@10 of a per-user 20 % random hold-out of the warm
  items' interactions (held out of training too), from the same lists.

Prints one JSON line on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pandas as pd

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import DEFAULT_ML100K, load_items, load_ratings, log, print_json_line  # noqa: E402
from topx import evaluate as ev  # noqa: E402

COLD_FRACTION = 0.1
X = 10


def recall(lists: dict[str, list[str]], relevant: dict[str, set[str]]) -> float:
    """Mean over users with relevant items of |top-X ∩ relevant| / min(X, |relevant|) (topx.evaluate's rule)."""
    values = [len(set(lists.get(user, [])[:X]) & items) / min(X, len(items)) for user, items in relevant.items()]
    return float(np.mean(values)) if values else float("nan")


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_ML100K, help="the unpacked ml-100k directory")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--random-draws", type=int, default=20)
    parser.add_argument("--topx-args", default="", help="extra arguments for topx run")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    ratings, items = load_ratings(args.data), load_items(args.data)
    rng = np.random.default_rng(args.seed)
    all_items = np.sort(ratings["item_id"].unique())
    cold = set(rng.choice(all_items, size=int(round(COLD_FRACTION * len(all_items))), replace=False).tolist())
    is_cold = ratings["item_id"].isin(cold).to_numpy()
    warm = ratings.loc[~is_cold].reset_index(drop=True)
    user_codes = pd.factorize(warm["user_id"])[0]
    warm_test = ev.holdout_split(user_codes, 0.2, args.seed)
    train = warm.loc[~warm_test]
    log(f"{len(cold)} cold items ({is_cold.sum():,} interactions held out), {len(train):,} training interactions")

    from topx.cli import main as topx_main

    with tempfile.TemporaryDirectory(prefix="topx-cold-") as tmp:
        train_csv, items_csv, out = Path(tmp) / "train.csv", Path(tmp) / "items.csv", Path(tmp) / "run"
        train[["user_id", "item_id", "rating"]].to_csv(train_csv, index=False)
        items.reset_index().to_csv(items_csv, index=False)
        argv_topx = ["run", "--interactions", str(train_csv), "--items", str(items_csv), "--holdout", "0",
                     "--top-x", str(X), "--out", str(out), "--quiet", *args.topx_args.split()]
        with redirect_stdout(sys.stderr):
            if topx_main(argv_topx) != 0:
                raise RuntimeError("topx run failed (its error is on stderr above)")
        recs = pd.read_parquet(out / "recommendations.parquet")
        metrics = json.loads((out / "metrics.json").read_text())

    recs = recs.sort_values(["user_id", "rank"])
    lists = {user: group["item_id"].tolist() for user, group in recs.groupby("user_id", sort=False)}
    held = ratings.loc[is_cold]
    relevant = {user: set(group["item_id"]) for user, group in held.groupby("user_id")}
    warm_relevant = {user: set(group["item_id"]) for user, group in warm.loc[warm_test].groupby("user_id")}
    cold_recall = recall(lists, relevant)

    cold_pool = np.array(sorted(cold), dtype=object)
    draws = []
    for draw in range(args.random_draws):
        draw_rng = np.random.default_rng(args.seed + 1 + draw)
        placed = {}
        for user, row in lists.items():
            slots = [k for k, item in enumerate(row) if item in cold]
            randomised = list(row)
            for k, item in zip(slots, draw_rng.choice(cold_pool, size=len(slots), replace=False), strict=True):
                randomised[k] = item
            placed[user] = randomised
        draws.append(recall(placed, relevant))
    random_recall = float(np.mean(draws))
    share = float(recs["item_id"].isin(cold).mean())
    doc = {
        "benchmark": "cold_items", "dataset": Path(args.data).resolve().name, "seed": args.seed,
        "cold_items": len(cold), "cold_interactions_held_out": int(is_cold.sum()),
        "users_with_cold_interactions": len(relevant), "topx_args": args.topx_args,
        "cold_share": share, "cold_recall_at_10": cold_recall, "random_cold_recall_at_10": random_recall,
        "random_draws": args.random_draws,
        "cold_vs_random": cold_recall / random_recall if random_recall > 0 else None,
        "warm_recall_at_10": recall(lists, warm_relevant),
        "topx_cold_items_reported": metrics["cold"]["items"], "train_s": metrics["timings_s"]["train"],
        "wall_s": time.perf_counter() - start,
    }
    print_json_line(doc)
    return doc


if __name__ == "__main__":
    main()
