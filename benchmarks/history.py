"""What history features cost the ranking learner as users grow: training time and peak memory.

    .venv/bin/python -m benchmarks.history                       # 1k, 4k and 16k users
    .venv/bin/python -m benchmarks.history --users 1000 4000

For each user count, generated implicit data (``topx.synth``, 2,000 items, a median of 20 interactions
per user) is trained by the icd learner with the ranking defaults, once per ``history_features`` setting
("none", "user", "item"), each in its own process so that its peak resident memory is its own. The
data, the split and everything else stay the same between settings; only the features differ.

Keys: ``train_s_<setting>_<users>`` (seconds of training), ``peak_rss_mb_<setting>_<users>`` (the
process's peak resident set, loading included), ``n_features_<setting>_<users>``, and
``history_nnz_<users>`` (the nonzeros one side's history adds: one per training interaction).
Prints one JSON line on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO_ROOT, log, print_json_line  # noqa: E402

SETTINGS = ("none", "user", "item")
ITEMS = 2000
MEDIAN_INTERACTIONS = 20


def measure(users: int, setting: str, seed: int) -> dict[str, float]:
    """Train once in this process and report its figures (run by ``main`` in a child process)."""
    import numpy as np

    from topx import evaluate as ev
    from topx.config import default_hyperparameters
    from topx.dataset import Dataset, with_history
    from topx.feature_index import FeatureIndex
    from topx.steps import RunOptions, fit
    from topx.synth import generate

    frame = generate(users, ITEMS, MEDIAN_INTERACTIONS, implicit=True, seed=seed).interactions
    user_ids, user_rows = np.unique(frame["user_id"].to_numpy(), return_inverse=True)
    item_ids, item_rows = np.unique(frame["item_id"].to_numpy(), return_inverse=True)
    index = FeatureIndex.one_hot([str(u) for u in user_ids], [str(i) for i in item_ids])
    ds = Dataset(index, user_rows.astype(np.int64), item_rows.astype(np.int64),
                 frame.iloc[:, 2].to_numpy(np.float32), implicit=True)
    hp = default_hyperparameters("ranking", history_features=setting, seed=seed)
    train = ~ev.holdout_split(ds.user_rows, 0.2, hp.seed)
    start = time.perf_counter()
    trained = with_history(ds, train, hp)
    fit(trained, train, hp, RunOptions(progress=False, device="cpu"))
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"train_s": round(seconds, 3), "peak_rss_mb": round(peak_mb, 1),
            "n_features": trained.feature_index.n_features, "history_nnz": int(train.sum())}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--one", nargs=2, metavar=("USERS", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(int(args.one[0]), args.one[1], args.seed)))
        return {}
    doc: dict[str, float] = {}
    for users in args.users:
        for setting in SETTINGS:
            log(f"{users:,} users, history_features={setting}")
            child = subprocess.run([sys.executable, "-m", "benchmarks.history", "--seed", str(args.seed),
                                    "--one", str(users), setting], cwd=REPO_ROOT, check=True,
                                   capture_output=True, text=True)
            figures = json.loads(child.stdout.strip().splitlines()[-1])
            doc[f"train_s_{setting}_{users}"] = figures["train_s"]
            doc[f"peak_rss_mb_{setting}_{users}"] = figures["peak_rss_mb"]
            doc[f"n_features_{setting}_{users}"] = figures["n_features"]
            doc[f"history_nnz_{users}"] = figures["history_nnz"]
    print_json_line(doc)
    return doc


if __name__ == "__main__":
    main()
