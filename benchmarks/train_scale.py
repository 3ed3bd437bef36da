"""Training alone at scale, on one device: each learner's seconds per epoch and peak memory.

    .venv/bin/python -m benchmarks.train_scale --interactions 1000000 --users 200000 --items 20000
    python3 -m benchmarks.train_scale --interactions 100000000 --users 5000000 --items 200000 --device cuda

Generated implicit data as ``benchmarks.scale`` makes it (uniform users, item popularity ~ 1/rank^0.9,
1 + Poisson(1) plays), repeated pairs merged with their plays summed, as Prepare merges them, and ids
only (one-hot users and items). A seeded 20 % of each user's rows is held out, as a run holds it out.
Each learner named by ``--learners`` then trains through ``topx.steps.fit``, the call the Train job
makes, with the objective's defaults and ``--epochs`` epochs: ``icd`` (ranking, the default) and
``sgd`` (``--objective rating``: the regressor, the fused engine, on the plays capped at 5 as ratings).

Keys per learner: ``<learner>_epoch_s`` (each epoch's wall seconds; the first one's includes the learner's
own preparation of the data), ``<learner>_s`` (the whole call), ``<learner>_train_loss`` (the last
epoch's), ``<learner>_rows_per_s`` (training rows over the fastest epoch after the first, or the first
when only one ran) and, on CUDA, ``<learner>_gpu_peak_mb`` (torch's peak allocation). Also ``device``,
``gpu`` (its name), the data's sizes and the process's ``peak_rss_mb``. Prints one JSON line on stdout;
progress on stderr.

``--recency-boost B`` gives every interaction a time (seeded, uniform over a year) and the boost B, as a
run with a time column weighs its rows (``topx.dataset.user_recency``): the learners' first epochs then
include the weighing, and ``weights_s`` times it alone on the training rows. The hold-out stays the seeded
draw, so the training rows are the same with and without. Run each setting in its own process to compare
``peak_rss_mb``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import log, peak_rss_mb, power_law_chunks, print_json_line  # noqa: E402

LEARNERS = ("icd", "sgd")


def interactions(n: int, users: int, items: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user rows, item rows, plays) with no pair twice, ordered by user then item."""
    keys = np.empty(n, dtype=np.int64)
    plays = np.empty(n, dtype=np.float32)
    start = 0
    for user, item, count in power_law_chunks(n, users, items, seed):
        keys[start:start + len(user)] = user * items + item
        plays[start:start + len(user)] = count
        start += len(user)
    order = np.argsort(keys, kind="stable")
    keys, plays = keys[order], plays[order]
    first = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    summed = np.add.reduceat(plays, first).astype(np.float32)
    keys = keys[first]
    return keys // items, keys % items, summed


def dataset(n: int, users: int, items: int, seed: int):
    from topx.dataset import Dataset
    from topx.feature_index import FeatureIndex

    user_rows, item_rows, plays = interactions(n, users, items, seed)
    seen_users = np.unique(user_rows)
    seen_items = np.unique(item_rows)
    # Rows renumbered over the ids that occur, as Prepare's vocabulary holds only those.
    user_rows = np.searchsorted(seen_users, user_rows)
    item_rows = np.searchsorted(seen_items, item_rows)
    fi = FeatureIndex.one_hot([f"u{u}" for u in seen_users], [f"i{i}" for i in seen_items])
    return Dataset(fi, user_rows.astype(np.int64), item_rows.astype(np.int64), plays, implicit=True)


def train(ds, train_rows: np.ndarray, learner: str, epochs: int, device: str) -> dict:
    from topx.config import default_hyperparameters
    from topx.steps import RunOptions, fit

    objective = "ranking" if learner == "icd" else "rating"
    hp = replace(default_hyperparameters(objective), epochs=epochs)
    if learner == "sgd":  # ratings 1..5; every epoch runs: the figures are throughput, not a model
        hp = replace(hp, validation_fraction=0.0)
        ds = replace(ds, rating=np.minimum(ds.rating, 5.0).astype(np.float32), implicit=False)
    stamps: list[float] = []
    on_cuda = device.startswith("cuda")
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()

    def epoch_done(_record: dict) -> None:
        if on_cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    result = fit(ds, train_rows, hp, RunOptions(device=device, progress=False), on_epoch=epoch_done)
    total = time.perf_counter() - started
    epoch_s = np.diff([started, *stamps])
    n_train = int(train_rows.sum())
    out = {f"{learner}_s": round(total, 3), f"{learner}_epoch_s": epoch_s.round(3).tolist(),
           f"{learner}_train_loss": float(result.history[-1]["train_loss"]),
           f"{learner}_rows_per_s": round(n_train / float(epoch_s[1:].min() if len(epoch_s) > 1 else epoch_s[0]))}
    if on_cuda:
        out[f"{learner}_gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    log(f"{learner}: {total:.1f} s, epochs {out[f'{learner}_epoch_s']} s, loss {out[f'{learner}_train_loss']:.5g}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--interactions", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--learners", nargs="+", choices=LEARNERS, default=list(LEARNERS))
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--recency-boost", type=float, default=0.0, metavar="B",
                        help="give the rows times and weigh each user's recent ones more by B (default 0: no times)")
    args = parser.parse_args(argv)

    from topx.fm import pick_device

    device = str(pick_device(args.device))
    log(f"generating {args.interactions:,} interactions over {args.users:,} users x {args.items:,} items")
    start = time.perf_counter()
    ds = dataset(args.interactions, args.users, args.items, args.seed)
    train_rows = ~ds.holdout(0.2, args.seed)
    if args.recency_boost:
        year = np.random.default_rng(args.seed + 1).integers(0, 365 * 86400, len(ds.user_rows))
        ds = replace(ds, time=1_700_000_000 + year, recency_boost=args.recency_boost)
    doc: dict = {"benchmark": "train_scale", "device": device,
                 "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
                 "torch": torch.__version__, "generated": args.interactions, "pairs": len(ds.user_rows),
                 "train_pairs": int(train_rows.sum()), "users": ds.feature_index.n_users,
                 "items": ds.feature_index.n_items, "epochs": args.epochs,
                 "data_s": round(time.perf_counter() - start, 3)}
    log(f"{doc['pairs']:,} distinct pairs in {doc['data_s']:.1f} s")
    if args.recency_boost:
        start = time.perf_counter()
        ds.recency(train_rows)
        doc.update(recency_boost=args.recency_boost, weights_s=round(time.perf_counter() - start, 3))
        log(f"weighing the training rows: {doc['weights_s']:.1f} s")
    for learner in args.learners:
        doc.update(train(ds, train_rows, learner, args.epochs, device))
    doc["peak_rss_mb"] = peak_rss_mb()
    print_json_line(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
