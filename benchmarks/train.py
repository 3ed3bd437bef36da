"""Training throughput of the FM on MovieLens-1M-shaped generated data, fused engine vs autograd.

    .venv/bin/python -m benchmarks.train                 # 1M ratings, 6k users, 4k items, k = 64
    .venv/bin/python -m benchmarks.train --epochs 5 --reference-epochs 2

Both engines train the same regressor (same batches, seed, initial weights, epochs, no early
stopping) on 90 % of the ratings; each is scored by RMSE on the other 10 %. ``samples_per_s`` is
training rows per second of an epoch (the best epoch; every epoch's time is printed too), so the
figure compares with the memory-traffic floor of one pass over the data.

Prints one JSON line on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import log, print_json_line  # noqa: E402
from topx.config import HyperParameters  # noqa: E402
from topx.dataset import DataOptions, Dataset, load_dataset  # noqa: E402
from topx.fm import predict, train_fm  # noqa: E402
from topx.steps import training_data
from topx.synth import generate  # noqa: E402

# synth draws each user's count from a log-normal with sigma 0.6, whose mean is exp(0.18) times
# the median it is given.
_LOGNORMAL_MEAN = float(np.exp(0.6**2 / 2))


def ml1m_like_files(directory: str | Path, users: int, items: int, interactions: int, seed: int) -> dict[str, Path]:
    """Write explicit 1-5 ratings (interactions.csv) with user (age band, country: users.csv) and
    item (category, tags, price: items.csv) features; returns their paths."""
    data = generate(users, items, interactions / users / _LOGNORMAL_MEAN, implicit=False, seed=seed)
    return data.write(directory)


def ml1m_like(users: int, items: int, interactions: int, seed: int) -> Dataset:
    """The same, read back as ``topx run`` reads it."""
    with tempfile.TemporaryDirectory(prefix="topx-bench-") as tmp:
        paths = ml1m_like_files(tmp, users, items, interactions, seed)
        return load_dataset(DataOptions(str(paths["interactions"]), str(paths["users"]), str(paths["items"])))


def train_and_score(ds: Dataset, train_mask: np.ndarray, hp: HyperParameters, engine: str) -> dict:
    data = training_data(ds, train_mask)
    stamps = [time.perf_counter()]
    result = train_fm(data, ds.feature_index.n_features, hp, progress=False, engine=engine,
                      on_epoch=lambda _: stamps.append(time.perf_counter()))
    epoch_s = np.diff(stamps)
    test = ~train_mask
    fi = ds.feature_index
    x = fi.user_x[ds.user_rows[test]] + fi.item_x[ds.item_rows[test]]
    rmse = float(np.sqrt(np.mean((predict(result.params, x) - ds.rating[test]) ** 2)))
    n = int(train_mask.sum())
    log(f"{engine}: epochs {np.round(epoch_s, 2).tolist()} s, test RMSE {rmse:.4f}")
    return {"samples_per_s": n / epoch_s.min(), "median_samples_per_s": n / float(np.median(epoch_s)),
            "epoch_s": epoch_s.round(3).tolist(), "rmse": rmse,
            "train_loss": [round(h["train_loss"], 5) for h in result.history]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=6000)
    parser.add_argument("--items", type=int, default=4000)
    parser.add_argument("--interactions", type=int, default=1_000_000)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the fused engine (and of both RMSEs)")
    parser.add_argument("--reference-epochs", type=int, default=None,
                        help="epochs of the autograd engine (default: --epochs; 0 skips it)")
    parser.add_argument("--reference-threads", type=int, default=1,
                        help="torch intra-op threads for the autograd engine (the fused one always uses 1 "
                             "plus a planning thread); 0 keeps torch's default")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)
    reference_epochs = args.epochs if args.reference_epochs is None else args.reference_epochs

    log(f"generating {args.interactions:,} ratings for {args.users:,} users x {args.items:,} items")
    ds = ml1m_like(args.users, args.items, args.interactions, args.seed)
    train_mask = np.random.default_rng(args.seed).random(len(ds.rating)) >= 0.1
    doc: dict = {"benchmark": "train", "n_interactions": int(len(ds.rating)), "n_train": int(train_mask.sum()),
                 "n_features": int(ds.feature_index.n_features), "k": args.k, "batch": args.batch,
                 "epochs": args.epochs, "threads": "1 intra-op + 1 planning"}

    def hp(epochs: int) -> HyperParameters:
        return HyperParameters(num_factors=args.k, epochs=epochs, mini_batch_size=args.batch,
                               validation_fraction=0.0, seed=args.seed)

    fused = train_and_score(ds, train_mask, hp(args.epochs), "fused")
    doc.update(samples_per_s=round(fused["samples_per_s"]), median_samples_per_s=round(fused["median_samples_per_s"]),
               epoch_s=fused["epoch_s"], rmse=fused["rmse"])
    if reference_epochs:
        default_threads = torch.get_num_threads()
        torch.set_num_threads(args.reference_threads or default_threads)
        doc["reference_threads"] = torch.get_num_threads()
        reference = train_and_score(ds, train_mask, hp(reference_epochs), "autograd")
        torch.set_num_threads(default_threads)
        doc.update(reference_samples_per_s=round(reference["samples_per_s"]),
                   reference_epoch_s=reference["epoch_s"],
                   speedup=fused["samples_per_s"] / reference["samples_per_s"])
        if reference_epochs == args.epochs:
            doc.update(reference_rmse=reference["rmse"], rmse_difference=fused["rmse"] - reference["rmse"])
    print_json_line(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
