"""Helpers shared by the benchmarks: MovieLens 100k parsing, stage timing, one-line JSON output, moto's
server for stages run in child processes, and a process's peak memory.

The MovieLens data may not be redistributed, so nothing here ships any of it: every reader takes
the directory of an unpacked ``ml-100k`` download (F. Maxwell Harper and Joseph A. Konstan,
"The MovieLens Datasets: History and Context", ACM TiiS 5(4), 2015).

Files read (all described in the download's README):

- ``u.data``, ``ua.base``, ``ua.test``: tab-separated ``user id, item id, rating, timestamp``.
- ``u.user``: ``|``-separated ``user id|age|gender|occupation|zip code``.
- ``u.item``: ``|``-separated, latin-1 encoded ``item id|title|release date|video release date|
  IMDb URL|`` then 19 genre flags (0/1), in the order that ``u.genre`` lists them.
- ``u.genre``: ``|``-separated ``genre|flag position``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ML100K = REPO_ROOT.parent / "shared" / "data" / "ml-100k"

RATING_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]
N_GENRES = 19
# The age bands MovieLens 1M publishes, so a banded age means the same thing across datasets.
AGE_BANDS = ((0, "under 18"), (18, "18-24"), (25, "25-34"), (35, "35-44"), (45, "45-49"), (50, "50-55"),
             (56, "56+"))


class DataMissingError(FileNotFoundError):
    """The MovieLens directory, or a file in it, is not where it was looked for."""


def _file(data_dir: str | Path, name: str) -> Path:
    path = Path(data_dir) / name
    if not path.is_file():
        raise DataMissingError(
            f"{path}: not found. Download and unpack MovieLens 100k (ml-100k) and pass its directory as --data"
        )
    return path


def load_ratings(data_dir: str | Path, name: str = "u.data") -> pd.DataFrame:
    """One ratings file as user_id (str), item_id (str), rating (float32), timestamp (int64)."""
    frame = pd.read_csv(
        _file(data_dir, name), sep="\t", header=None, names=RATING_COLUMNS,
        dtype={"user_id": str, "item_id": str, "rating": np.float32, "timestamp": np.int64},
    )
    return frame


def load_users(data_dir: str | Path, *, age: str = "numeric") -> pd.DataFrame:
    """User features indexed by user_id: age, gender, occupation.

    ``age="numeric"`` keeps the age in years (the encoder standardises it); ``age="banded"``
    turns it into one of :data:`AGE_BANDS` (one-hot once encoded).
    """
    if age not in ("numeric", "banded"):
        raise ValueError(f"age must be 'numeric' or 'banded', got {age!r}")
    frame = pd.read_csv(
        _file(data_dir, "u.user"), sep="|", header=None,
        names=["user_id", "age", "gender", "occupation", "zip_code"],
        dtype={"user_id": str, "age": np.int64, "gender": str, "occupation": str, "zip_code": str},
    )
    frame = frame.set_index("user_id")[["age", "gender", "occupation"]]
    if age == "banded":
        frame["age"] = age_band(frame["age"].to_numpy())
    return frame


def age_band(years: np.ndarray) -> np.ndarray:
    """(n,) ages in years -> (n,) object array of band labels from :data:`AGE_BANDS`."""
    lows = np.array([low for low, _ in AGE_BANDS])
    labels = np.array([label for _, label in AGE_BANDS], dtype=object)
    return labels[np.searchsorted(lows, np.asarray(years), side="right") - 1]


def genre_names(data_dir: str | Path) -> list[str]:
    """The 19 genre names in flag order."""
    frame = pd.read_csv(_file(data_dir, "u.genre"), sep="|", header=None, names=["genre", "position"],
                        dtype={"genre": str, "position": np.int64}).dropna()
    names = frame.sort_values("position")["genre"].tolist()
    if len(names) != N_GENRES:
        raise ValueError(f"{Path(data_dir) / 'u.genre'}: expected {N_GENRES} genres, found {len(names)}")
    return names


def load_items(data_dir: str | Path) -> pd.DataFrame:
    """Item features indexed by item_id: genre (the film's genres joined by ``|``, a multi-valued
    categorical) and year (the release year as a float, NaN where the date is missing)."""
    genres = genre_names(data_dir)
    names = ["item_id", "title", "release_date", "video_release_date", "url", *genres]
    frame = pd.read_csv(
        _file(data_dir, "u.item"), sep="|", header=None, names=names, encoding="latin-1",
        dtype={"item_id": str, "title": str, "release_date": str, "video_release_date": str, "url": str},
    ).set_index("item_id")
    flags = frame[genres].to_numpy(dtype=np.int64)
    genre_array = np.asarray(genres, dtype=object)
    joined = ["|".join(genre_array[row.astype(bool)]) for row in flags]
    year = pd.to_datetime(frame["release_date"], format="%d-%b-%Y", errors="coerce").dt.year
    return pd.DataFrame(
        {"genre": pd.Series(joined, index=frame.index, dtype=object).replace("", None),
         "year": year.astype(np.float64)},
        index=frame.index,
    )


# --------------------------------------------------------------------------- output


def power_law_chunks(interactions: int, users: int, items: int, seed: int,
                     chunk: int = 5_000_000) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Generated implicit interactions, ``chunk`` rows at a time: (user, item, plays) int64 arrays, users
    uniform, item popularity ~ 1/rank^0.9, plays 1 + Poisson(1). Every id below the counts is likely to occur."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, items + 1) ** 0.9
    cdf = np.cumsum(weights / weights.sum())
    for start in range(0, interactions, chunk):
        n = min(chunk, interactions - start)
        user = rng.integers(0, users, n)
        item = np.minimum(np.searchsorted(cdf, rng.random(n)), items - 1)
        yield user, item, 1 + rng.poisson(1.0, n)


def log(message: str) -> None:
    """Progress goes to stderr; stdout carries only the result line."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


class StageTimer:
    """Wall time per named stage, added up when a stage runs more than once."""

    def __init__(self) -> None:
        self.timings_s: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        log(f"{name} ...")
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.timings_s[name] = round(self.timings_s.get(name, 0.0) + elapsed, 2)
            log(f"{name} done in {elapsed:.1f} s")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return None if not math.isfinite(value) else round(value, 5)
    return value


def json_line(doc: dict[str, Any]) -> str:
    """``doc`` as one compact JSON line: numpy scalars made plain, floats to 5 decimals, NaN as null."""
    return json.dumps(_plain(doc), separators=(", ", ": "))


def print_json_line(doc: dict[str, Any]) -> None:
    print(json_line(doc), flush=True)


def main_with_children(args: Any, run: Callable[[Any], dict[str, Any]], child: Callable[[Any], None]) -> int:
    """A benchmark whose measured steps run in processes of their own: the parsed ``args`` with ``--child``
    set (a JSON spec) run that one step (``child``); otherwise ``run`` prints the benchmark's JSON line."""
    if args.child:
        child(json.loads(args.child))
        return 0
    print_json_line(run(args))
    return 0


# ----------------------------------------------------------------------------- stages in child processes


@contextmanager
def moto_server(region: str) -> Iterator[tuple[str, dict[str, str]]]:
    """moto's server in this process on a free local port (its Flask is pinned in requirements.txt). Yields
    its endpoint and the environment a child process needs to reach it: ``TOPX_ENDPOINT_URL``, stand-in
    credentials, the region and the repository on the import path."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's one line per request
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, "TOPX_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": region, "AWS_REGION": region, "PYTHONPATH": str(REPO_ROOT)}
    try:
        yield endpoint, env
    finally:
        server.stop()


def aws_client(service: str, endpoint: str, region: str) -> Any:
    """A boto3 client of ``moto_server``'s endpoint."""
    import boto3

    return boto3.client(service, endpoint_url=endpoint, region_name=region, aws_access_key_id="bench",
                        aws_secret_access_key="bench")


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started its program: VmHWM, which exec starts afresh
    (getrusage's ru_maxrss keeps the forking parent's, here the moto server's, across the exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
