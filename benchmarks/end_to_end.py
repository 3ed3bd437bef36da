"""Wall time of ``topx run`` (``topx.run.run_all``), stage by stage, on MovieLens 100k and on the
1M-rating generated set.

    .venv/bin/python -m benchmarks.end_to_end --data ../shared/data/ml-100k
    .venv/bin/python -m benchmarks.end_to_end --data ../shared/data/ml-100k --skip-generated
    .venv/bin/python -m benchmarks.end_to_end --skip-ml100k --reference   # + the autograd trainer

MovieLens 100k is read from its own ``u.data`` (the licence forbids copying it into the repository);
the generated set is ``topx.synth`` at the MovieLens-1M shape (6,000 users, 4,000 items, ~1M
ratings, user and item side features), as ``benchmarks/train.py`` uses. Both run with the CLI's
defaults (explicit ratings: regressor, k = 64, up to 30 epochs with early stopping, top-10 with
seen items excluded, 20 % per-user hold-out). ``timings_s`` is run_all's own record of each stage.
``--reference`` repeats the generated run with the autograd training engine, for the train stage's
before/after. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import DEFAULT_ML100K, log, print_json_line  # noqa: E402
from benchmarks.train import ml1m_like_files  # noqa: E402
from topx import steps  # noqa: E402
from topx.config import default_hyperparameters
from topx.dataset import DataOptions  # noqa: E402
from topx.fm import train_fm  # noqa: E402
from topx.run import run_all
from topx.steps import Reporter, RunOptions


def timed_run(data: DataOptions, engine: str = "fused") -> dict:
    hp = default_hyperparameters(data.implicit)
    original = steps.train_fm
    steps.train_fm = functools.partial(train_fm, engine=engine)
    try:
        with tempfile.TemporaryDirectory(prefix="topx-e2e-") as tmp:
            start = time.perf_counter()
            metrics = run_all(data, hp, RunOptions(progress=False), Path(tmp) / "run", reporter=Reporter(False))
            wall = time.perf_counter() - start
    finally:
        steps.train_fm = original
    training = metrics.get("training", {})
    summary = {"wall_s": wall, "timings_s": metrics["timings_s"], "epochs_run": training.get("epochs_run"),
               "best_epoch": training.get("best_epoch"), "n_users": metrics["data"]["n_users"],
               "n_items": metrics["data"]["n_items"], "n_interactions": metrics["data"]["n_interactions"]}
    for key in ("rmse", "recall_at_10", "popularity_recall_at_10"):
        if key in metrics:
            summary[key] = metrics[key]
    log(f"{engine}: {summary}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_ML100K), help="directory of the unpacked ml-100k download")
    parser.add_argument("--skip-ml100k", action="store_true")
    parser.add_argument("--skip-generated", action="store_true")
    parser.add_argument("--reference", action="store_true", help="also run the generated set with engine='autograd'")
    args = parser.parse_args(argv)

    doc: dict = {"benchmark": "end_to_end"}
    if not args.skip_ml100k:
        u_data = Path(args.data) / "u.data"
        if not u_data.is_file():
            raise SystemExit(f"{u_data}: not found. Download and unpack MovieLens 100k and pass its directory as --data")
        log(f"topx run on {u_data}")
        doc["ml100k"] = timed_run(DataOptions(str(u_data), user_col=0, item_col=1, rating_col=2, header=False, sep="\t"))
    if not args.skip_generated:
        with tempfile.TemporaryDirectory(prefix="topx-e2e-data-") as tmp:
            paths = ml1m_like_files(tmp, 6000, 4000, 1_000_000, seed=11)
            data = DataOptions(str(paths["interactions"]), str(paths["users"]), str(paths["items"]))
            log("topx run on the generated 1M-rating set")
            doc["generated_1m"] = timed_run(data)
            if args.reference:
                doc["generated_1m_autograd"] = timed_run(data, engine="autograd")
    print_json_line(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
