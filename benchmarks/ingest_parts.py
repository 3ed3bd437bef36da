"""Reading a dataset of many parts, as warehouses export one: seconds per row as the number of parts grows.

    .venv/bin/python -m benchmarks.ingest_parts --parts 200 --rows-per-part 20000 --users 1000000

Writes ``--parts`` CSV parts (user_id ``u<n>`` text, item_id ``i<n>`` text, plays) to a temporary folder,
users uniform over ``--users``, items uniform over ``--items``, then times ``topx.ingest.read_interaction_codes``
on the folder, the call Prepare and ``topx run`` read with: ``read_s``, ``rows_per_s`` and the ids it found.
Writing the parts is not timed. Prints one JSON line on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from benchmarks.common import log, peak_rss_mb, print_json_line  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", type=int, default=200)
    parser.add_argument("--rows-per-part", type=int, default=20_000)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from topx.ingest import read_interaction_codes

    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="topx-parts-") as tmp:
        root = Path(tmp)
        log(f"writing {args.parts} parts of {args.rows_per_part:,} rows")
        for part in range(args.parts):
            n = args.rows_per_part
            pd.DataFrame({"user_id": np.char.add("u", rng.integers(0, args.users, n).astype(str)),
                          "item_id": np.char.add("i", rng.integers(0, args.items, n).astype(str)),
                          "plays": 1 + rng.poisson(1.0, n)}).to_csv(root / f"part-{part:05d}.csv", index=False)
        log("reading")
        start = time.perf_counter()
        codes = read_interaction_codes(str(root), rating_col="plays", implicit=True)
        read_s = time.perf_counter() - start
    rows = args.parts * args.rows_per_part
    print_json_line({"benchmark": "ingest_parts", "parts": args.parts, "rows_per_part": args.rows_per_part,
                     "rows": rows, "read_s": round(read_s, 3), "rows_per_s": round(rows / read_s),
                     "users_found": len(codes.user_ids), "items_found": len(codes.item_ids),
                     "rows_read": len(codes.user_codes), "peak_rss_mb": peak_rss_mb()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
