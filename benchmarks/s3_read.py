"""Reading an S3 dataset: topx's own reader beside awswrangler, each in a fresh process: seconds, peak memory,
rows, the partition column and the error for a bad part.

    .venv/bin/python -m benchmarks.s3_read --rows 1000000 --wrangler-python .bench-wrangler/bin/python
    .venv/bin/python -m benchmarks.s3_read --rows 10000000 --formats parquet csv \\
        --wrangler-python .bench-wrangler/bin/python

awswrangler (3.17) requires pyarrow < 26 and topx pins pyarrow 26.0.1, so awswrangler runs in a virtual
environment of its own, made once (git-ignored)::

    python3 -m venv .bench-wrangler && .bench-wrangler/bin/pip install awswrangler

Without ``--wrangler-python`` its figures are null, with a note saying so.

moto's server (its Flask is pinned in requirements.txt) runs in this process. Into one of its buckets
goes a generated dataset written as Spark writes one: ``--parts`` part files under ``--days`` partition
folders (``day=2024-06-01/`` ...), a ``_SUCCESS`` marker (non-empty, the JSON the S3A committers write) and
a ``.part-*.crc`` checksum file beside the first part; columns user_id (int64, or text ``u<n>`` with
``--string-ids``), item_id (int64) and plays (int64, 1 + Poisson(1)), the partition column only in the
folder names. Each format in ``--formats`` (Parquet, CSV) gets its own prefix. Then, for each format, one
fresh child process per reader reads the whole prefix and reports ``s`` (wall seconds of the read call
alone), ``peak_rss_mb`` (the child's VmHWM: interpreter and imports included), ``rows`` and whether it read
exactly the rows written (``rows_right``: the count, the sum of plays and the number of distinct users
agree), and ``columns`` (what the frame holds; ``partition_column`` says what became of ``day``):

- topx: ``topx.ingest.read_interactions("s3://bucket/prefix/", user_col="user_id", item_col="item_id",
  rating_col="plays", implicit=True)`` with ``TOPX_ENDPOINT_URL`` at the server (topx's pandas and pyarrow).
- awswrangler: ``wr.s3.read_parquet(path=prefix, dataset=True)`` / ``wr.s3.read_csv(path=prefix,
  dataset=True)`` with ``wr.config.s3_endpoint_url`` at the server, as called by default. Where that call
  fails or reads the markers as rows, ``default_call`` says what happened and the timed read is the one
  with ``path_ignore_suffix=["_SUCCESS", ".crc"]``, which does not.

``bad_part``: a small dataset of the same layout whose last part holds ``x`` as plays in data row 1234;
each reader's error message (``error``, shortened to 400 characters), or null where it read the part
without one. For CSV awswrangler is asked a second time with ``dtype={"plays": "int64"}``, as a caller who
wants numbers would (``error_with_dtype``). ``partition_probe``: topx reading a small clean dataset of the
same layout with ``time_col="day"``. Versions of every reader's pandas and pyarrow are in ``versions``.
One JSON line on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    REPO_ROOT,
    aws_client,
    log,
    main_with_children,
    moto_server,
    peak_rss_mb,
)

BUCKET, REGION = "topx-s3-read", "us-east-1"
BAD_ROW = 1234  # 1-based data row of the last part that holds a non-numeric plays value in ``bad_part``
SMALL_PARTS, SMALL_ROWS = 3, 3 * 5_000  # the small datasets (bad part, partition probe)
MARKER_SUFFIXES = ["_SUCCESS", ".crc"]
BAD_KINDS = ("text", "negative")
EXPECTED_COLUMNS = {"user_id", "item_id", "plays", "day"}
ERROR_CHARS = 400

# The awswrangler child: runs under the other environment's python, so it imports nothing of topx.
WRANGLER_CHILD = r'''
import json, sys, time
from pathlib import Path
spec = json.loads(sys.argv[1])
def peak_rss_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
import awswrangler as wr, pandas as pd, pyarrow as pa
wr.config.s3_endpoint_url = spec["endpoint"]
read = wr.s3.read_parquet if spec["format"] == "parquet" else wr.s3.read_csv
out = {"versions": {"awswrangler": wr.__version__, "pandas": pd.__version__, "pyarrow": pa.__version__}}
start = time.perf_counter()
try:
    frame = read(path=spec["uri"], dataset=True, **spec["kwargs"])
except Exception as exc:
    out.update(s=round(time.perf_counter() - start, 3), error=f"{type(exc).__name__}: {exc}")
else:
    out["s"] = round(time.perf_counter() - start, 3)
    plays = pd.to_numeric(frame["plays"], errors="coerce") if "plays" in frame else None
    out.update(rows=len(frame), columns={c: str(t) for c, t in frame.dtypes.items()},
               plays_sum=None if plays is None or plays.isna().any() else int(plays.sum()),
               n_users=int(frame["user_id"].nunique()) if "user_id" in frame else None,
               day_values=sorted(str(v) for v in frame["day"].dropna().unique()) if "day" in frame else None)
out["peak_rss_mb"] = round(peak_rss_mb(), 1)
print(json.dumps(out))
'''


# ----------------------------------------------------------------------------- the topx child


def child(spec: dict[str, Any]) -> None:
    """Read ``spec["uri"]`` with topx's reader and print what it read, its wall seconds and peak memory."""
    import pandas as pd
    import pyarrow as pa

    from topx.errors import TopxError
    from topx.ingest import read_interactions

    out: dict[str, Any] = {"versions": {"pandas": pd.__version__, "pyarrow": pa.__version__}}
    start = time.perf_counter()
    try:
        frame = read_interactions(spec["uri"], user_col="user_id", item_col="item_id", rating_col="plays",
                                  implicit=True, time_col=spec.get("time_col"))
    except TopxError as exc:
        out.update(s=round(time.perf_counter() - start, 3), error=f"{type(exc).__name__}: {exc}")
    else:
        out["s"] = round(time.perf_counter() - start, 3)
        out.update(rows=len(frame), columns={c: str(t) for c, t in frame.dtypes.items()},
                   plays_sum=int(frame["rating"].astype("float64").sum()), n_users=int(frame["user_id"].nunique()))
        if "time" in frame:
            out["time_values"] = sorted(int(v) for v in frame["time"].unique())
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(out))


def run_child(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed:\n{done.stderr[-6000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def topx_read(uri: str, env: dict[str, str], time_col: str | None = None) -> dict[str, Any]:
    spec = json.dumps({"uri": uri, "time_col": time_col})
    return run_child([sys.executable, "-m", "benchmarks.s3_read", "--child", spec], env)


def wrangler_read(python: str, fmt: str, uri: str, endpoint: str, env: dict[str, str],
                  kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = json.dumps({"format": fmt, "uri": uri, "endpoint": endpoint, "kwargs": kwargs or {}})
    return run_child([python, "-c", WRANGLER_CHILD, spec], env)


# ----------------------------------------------------------------------------- data


def part_tables(rows: int, parts: int, users: int, items: int, seed: int, string_ids: bool) -> Any:
    """Yield ``parts`` pyarrow tables of about rows / parts rows each, and the totals written."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, items + 1) ** 0.9
    cdf = np.cumsum(weights / weights.sum())
    bounds = np.linspace(0, rows, parts + 1).astype(np.int64)
    for i in range(parts):
        n = int(bounds[i + 1] - bounds[i])
        user = rng.integers(0, users, n)
        item = np.minimum(np.searchsorted(cdf, rng.random(n)), items - 1)
        plays = 1 + rng.poisson(1.0, n)
        user_col = pa.array(np.char.add("u", user.astype(str))) if string_ids else pa.array(user)
        yield pa.table({"user_id": user_col, "item_id": pa.array(item), "plays": pa.array(plays)}), user, plays


def encode(table: Any, fmt: str) -> bytes:
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    if fmt == "parquet":
        pq.write_table(table, sink, compression="snappy")
    else:
        pcsv.write_csv(table, sink, pcsv.WriteOptions(quoting_style="none"))
    return sink.getvalue().to_pybytes()


def spoil(table: Any, kind: str) -> Any:
    """The table with a bad plays value in data row ``BAD_ROW``: ``text`` makes the column text and the value
    ``x``; ``negative`` keeps the column's type and makes the value -1."""
    import pyarrow as pa

    plays = table["plays"].to_pylist()
    if kind == "text":
        plays = [str(v) for v in plays]
        plays[BAD_ROW - 1] = "x"
        column = pa.array(plays, pa.string())
    else:
        plays[BAD_ROW - 1] = -1
        column = pa.array(plays, pa.int64())
    return table.set_column(table.schema.get_field_index("plays"), "plays", column)


def write_dataset(s3: Any, prefix: str, fmt: str, args: argparse.Namespace, rows: int, parts: int, *,
                  bad_last: str | None = None) -> dict[str, Any]:
    """Write a Spark-style export under ``prefix``; return what was written (rows, plays sum, users)."""
    import numpy as np

    ext = "snappy.parquet" if fmt == "parquet" else "csv"
    total_rows, plays_sum, seen_users = 0, 0, []
    size = 0
    for i, (table, user, plays) in enumerate(part_tables(rows, parts, args.users, args.items,
                                                         args.seed, args.string_ids)):
        if bad_last and i == parts - 1:
            table = spoil(table, bad_last)
        day = f"day=2024-06-{i % args.days + 1:02d}"
        name = f"part-{i:05d}-6a1f0c2e.c000.{ext}"
        body = encode(table, fmt)
        s3.put_object(Bucket=BUCKET, Key=f"{prefix}{day}/{name}", Body=body)
        size += len(body)
        if i == 0:  # a Hadoop checksum file, as a local write copied up leaves beside each part
            s3.put_object(Bucket=BUCKET, Key=f"{prefix}{day}/.{name}.crc", Body=b"crc\x00\x00\x00\x02\x00" + body[:8])
        total_rows += len(plays)
        plays_sum += int(plays.sum())
        seen_users.append(np.unique(user))
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}_SUCCESS",
                  Body=json.dumps({"name": "s3a", "committer": "magic", "filenames": parts}).encode())
    return {"rows": total_rows, "plays_sum": plays_sum, "n_users": int(np.unique(np.concatenate(seen_users)).size),
            "bytes": size}


def rows_right(got: dict[str, Any], written: dict[str, Any]) -> bool:
    return all(got.get(key) == written[key] for key in ("rows", "plays_sum", "n_users"))


def short(message: str | None) -> str | None:
    if message is None:
        return None
    message = " ".join(message.split())
    return message if len(message) <= ERROR_CHARS else message[: ERROR_CHARS - 3] + "..."


# ----------------------------------------------------------------------------- the comparison


def compare(fmt: str, s3: Any, endpoint: str, env: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    prefix = f"{fmt}/export/"
    log(f"{fmt}: writing {args.rows:,} rows in {args.parts} parts")
    written = write_dataset(s3, prefix, fmt, args, args.rows, args.parts)
    for kind in BAD_KINDS:
        write_dataset(s3, f"{fmt}/bad-{kind}/", fmt, args, SMALL_ROWS, SMALL_PARTS, bad_last=kind)
    write_dataset(s3, f"{fmt}/probe/", fmt, args, SMALL_ROWS, SMALL_PARTS)
    uri = f"s3://{BUCKET}/{prefix}"
    result: dict[str, Any] = {"written": written}

    log(f"{fmt}: topx reading")
    got = topx_read(uri, env)
    log(f"{fmt}: topx {got.get('s')} s, peak {got['peak_rss_mb']} MB")
    bad = {kind: topx_read(f"s3://{BUCKET}/{fmt}/bad-{kind}/", env) for kind in BAD_KINDS}
    probe = topx_read(f"s3://{BUCKET}/{fmt}/probe/", env, time_col="day")
    result["topx"] = {
        "s": got.get("s"), "peak_rss_mb": got["peak_rss_mb"], "rows": got.get("rows"),
        "rows_right": rows_right(got, written), "columns": got.get("columns"),
        "partition_column": "not in the frame; a text column of every row, usable as time_col",
        "partition_probe": {"time_values": probe.get("time_values"), "error": short(probe.get("error"))},
        "bad_part": {kind: {"error": short(b.get("error")), "rows": b.get("rows")} for kind, b in bad.items()},
        "versions": got["versions"]}

    if not args.wrangler_python:
        result["awswrangler"] = {"s": None, "peak_rss_mb": None, "rows_right": None,
                                 "note": "not measured: pass --wrangler-python (see the module docstring)"}
        return result
    log(f"{fmt}: awswrangler reading (default call)")
    default = wrangler_read(args.wrangler_python, fmt, uri, endpoint, env)
    timed, call = default, "default"
    if "error" in default or not rows_right(default, written) or set(default["columns"]) != EXPECTED_COLUMNS:
        log(f"{fmt}: awswrangler default call: {short(default.get('error')) or 'markers read as rows or columns'}; "
            "again with path_ignore_suffix")
        timed = wrangler_read(args.wrangler_python, fmt, uri, endpoint, env, {"path_ignore_suffix": MARKER_SUFFIXES})
        call = f"path_ignore_suffix={MARKER_SUFFIXES}"
    log(f"{fmt}: awswrangler {timed.get('s')} s, peak {timed['peak_rss_mb']} MB")
    ignore = {"path_ignore_suffix": MARKER_SUFFIXES}
    bad = {kind: wrangler_read(args.wrangler_python, fmt, f"s3://{BUCKET}/{fmt}/bad-{kind}/", endpoint, env, ignore)
           for kind in BAD_KINDS}
    entry = {
        "timed_call": call, "s": timed.get("s"), "peak_rss_mb": timed["peak_rss_mb"], "rows": timed.get("rows"),
        "rows_right": rows_right(timed, written), "columns": timed.get("columns"),
        "partition_column": (f"day as {timed['columns']['day']}, values {timed.get('day_values')}"
                             if "day" in (timed.get("columns") or {}) else "absent"),
        "default_call": {"rows": default.get("rows"), "rows_right": rows_right(default, written),
                         "columns": default.get("columns"), "error": short(default.get("error"))},
        "bad_part": {kind: {"error": short(b.get("error")), "rows": b.get("rows"),
                            "plays_column": (b.get("columns") or {}).get("plays")} for kind, b in bad.items()},
        "versions": timed["versions"]}
    if fmt == "csv":
        typed = wrangler_read(args.wrangler_python, fmt, f"s3://{BUCKET}/{fmt}/bad-text/", endpoint, env,
                              {**ignore, "dtype": {"plays": "int64"}})
        entry["bad_part"]["text"]["error_with_dtype"] = short(typed.get("error"))
    result["awswrangler"] = entry
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    with moto_server(REGION) as (endpoint, env):
        s3 = aws_client("s3", endpoint, REGION)
        s3.create_bucket(Bucket=BUCKET)
        results = {fmt: compare(fmt, s3, endpoint, env, args) for fmt in args.formats}
    return {"benchmark": "s3_read", "rows": args.rows, "parts": args.parts, "days": args.days,
            "string_ids": args.string_ids, "bad_row": BAD_ROW, "cpus": os.cpu_count(), "results": results}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in all (default 1,000,000)")
    parser.add_argument("--parts", type=int, default=8, help="part files (default 8)")
    parser.add_argument("--days", type=int, default=2, help="day=... partition folders (default 2)")
    parser.add_argument("--formats", nargs="+", choices=["parquet", "csv"], default=["parquet", "csv"])
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--string-ids", action="store_true", help="user ids as text (u<n>) instead of integers")
    parser.add_argument("--wrangler-python", help="the python of a virtual environment with awswrangler")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    if args.parts < 1 or args.days < 1:
        parser.error("--parts and --days must be at least 1")
    if args.rows < args.parts:
        parser.error("--rows must be at least --parts")
    return args


def main(argv: list[str] | None = None) -> int:
    return main_with_children(parse_args(argv), run, child)


if __name__ == "__main__":
    raise SystemExit(main())
