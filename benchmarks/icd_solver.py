"""The icd learner's two solvers for the id features: the exact solve against conjugate gradients.

    .venv/bin/python -m benchmarks.icd_solver                    # k = 32, 64, 128; exact and 3 CG steps
    .venv/bin/python -m benchmarks.icd_solver --users 2000 --factors 32 64

Generated implicit data (``topx.synth``, ``--users`` users, ``--items`` items, a median of
``--per-user`` interactions each), a seeded 20 % of each user's rows held out. For each k, the ranking
defaults train once with the exact solve (``cg_steps`` 0) and once with ``--cg-steps`` conjugate-gradient
steps, same seed and epochs. Both are the real ``topx.icd.train_icd`` path.

Keys per k and solver (``exact`` or ``cg``): ``train_s_<solver>_k<k>`` (wall seconds of training, the
learner's own 2 threads), ``cpu_s_<solver>_k<k>`` (process CPU seconds: less sensitive to other load),
``loss_<solver>_k<k>`` (the final all-pairs training loss) and ``recall_at_10_<solver>_k<k>`` (on the
hold-out, seen items excluded); ``cg_vs_exact_cpu_k<k>`` is the ratio of the CPU seconds. Prints one
JSON line on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402

from benchmarks.common import log, print_json_line  # noqa: E402

X = 10


def top_items(scores: np.ndarray, seen: sp.csr_matrix, x: int) -> np.ndarray:
    """(n_users, x) item rows by score, seen items excluded."""
    masked = scores.astype(np.float64)
    rows, cols = seen.nonzero()
    masked[rows, cols] = -np.inf
    return np.argsort(-masked, axis=1, kind="stable")[:, :x]


def run(args: argparse.Namespace) -> dict[str, object]:
    import torch

    from topx import evaluate as ev
    from topx.config import default_hyperparameters
    from topx.feature_index import FeatureIndex
    from topx.icd import ImplicitData, train_icd
    from topx.synth import generate
    from topx.vectors import export_vectors

    frame = generate(args.users, args.items, args.per_user, implicit=True, seed=args.seed).interactions
    user_ids, users = np.unique(frame["user_id"].to_numpy(), return_inverse=True)
    item_ids, items = np.unique(frame["item_id"].to_numpy(), return_inverse=True)
    held = ev.holdout_split(users, 0.2, args.seed)
    train = ~held
    index = FeatureIndex.one_hot([str(u) for u in user_ids], [str(i) for i in item_ids])
    shape = (len(user_ids), len(item_ids))
    seen = sp.csr_matrix((np.ones(train.sum()), (users[train], items[train])), shape=shape)
    relevant = sp.csr_matrix((np.ones(held.sum()), (users[held], items[held])), shape=shape)
    data = ImplicitData(index.user_x, index.item_x, users[train].astype(np.int64), items[train].astype(np.int64))
    out: dict[str, object] = {"benchmark": "icd_solver", "n_users": shape[0], "n_items": shape[1],
                              "n_train": int(train.sum()), "epochs": args.epochs, "cg_steps": args.cg_steps,
                              "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                              "machine": platform.machine()}
    # One short training first, so that no measured one pays for torch's first calls.
    train_icd(data, index.n_features, default_hyperparameters("ranking", epochs=1), device="cpu", progress=False)
    for k in args.factors:
        for solver, steps in (("exact", 0), ("cg", args.cg_steps)):
            hp = default_hyperparameters("ranking", num_factors=k, epochs=args.epochs, cg_steps=steps, seed=args.seed)
            log(f"k={k} {solver}")
            wall, cpu = time.perf_counter(), time.process_time()
            result = train_icd(data, index.n_features, hp, device="cpu", progress=False)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            vectors = export_vectors(result.params, index)
            top = top_items(vectors.user_vectors @ vectors.item_vectors.T, seen, X)
            out[f"train_s_{solver}_k{k}"] = round(wall, 3)
            out[f"cpu_s_{solver}_k{k}"] = round(cpu, 3)
            out[f"loss_{solver}_k{k}"] = round(result.history[-1]["train_loss"], 5)
            out[f"recall_at_10_{solver}_k{k}"] = round(ev.ranking_metrics(top, relevant, shape[1]).recall, 5)
        out[f"cg_vs_exact_cpu_k{k}"] = round(out[f"cpu_s_cg_k{k}"] / out[f"cpu_s_exact_k{k}"], 3)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--items", type=int, default=3_000)
    parser.add_argument("--per-user", type=int, default=40, help="median interactions per user (default 40)")
    parser.add_argument("--factors", type=int, nargs="+", default=[32, 64, 128], metavar="K")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--cg-steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    print_json_line(run(parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
