"""The run directory: its layout, and reading and writing what the steps leave in it.

A run directory holds:

    model/            model.tar.gz (SageMaker FM layout), feature_index.json, design.npz
    data/             interactions.npz: the aggregated (user row, item row, rating) and hold-out mask
    vectors/          user_vectors.npy, item_vectors.npy, user_constants.npy, ids.json
    recommendations.parquet   user_id, rank (1..x), item_id, score
    fallback.parquet          rank (1..x), item_id, score, source: the list for users the model has not seen
    lists/            <name>.parquet and <name>.fallback.parquet: a named list's (filter file's "lists")
    metrics.json
    report.html               the run report: one self-contained page (topx.report)

``atomic_output_dir`` builds one in a temporary directory beside its destination and moves it into
place only when every step succeeded, so an existing output is never half-overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from topx.dataset import Dataset
from topx.errors import ArtifactFormatError, ConfigError
from topx.feature_index import FeatureIndex
from topx.params import FMParams

MODEL_DIR = "model"


DATA_DIR = "data"


VECTORS_DIR = "vectors"


RECOMMENDATIONS = "recommendations.parquet"


METRICS = "metrics.json"
REPORT = "report.html"  # the run report (topx.report), beside metrics.json
FALLBACK = "fallback.parquet"  # the list for users the model has not seen (steps.fallback_list)
LISTS_DIR = "lists"  # a named list's recommendations and fallback: lists/<name>[.fallback].parquet


def list_recommendations(run_dir: Path, name: str) -> Path:
    """Where a named list's recommendations lie in a run directory (the same columns as RECOMMENDATIONS)."""
    return Path(run_dir) / LISTS_DIR / f"{name}.parquet"


def list_fallback(run_dir: Path, name: str) -> Path:
    """Where a named list's fallback list lies in a run directory (the same columns as FALLBACK)."""
    return Path(run_dir) / LISTS_DIR / f"{name}.fallback.parquet"


INTERACTIONS_FILE = "interactions.npz"


IDS_FILE = "ids.json"


def write_model(directory: Path, params: FMParams, feature_index: FeatureIndex | None) -> None:
    from topx.formats.artifact import write_model_artifact

    write_model_artifact(directory, params, feature_index)


def read_model(directory: Path) -> tuple[FMParams, FeatureIndex]:
    from topx.formats.artifact import read_model_artifact

    return read_model_artifact(directory), FeatureIndex.load(directory)


def save_interactions(directory: Path, ds: Dataset, holdout: np.ndarray) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / INTERACTIONS_FILE, "wb") as fh:
        extra = {} if ds.time is None else {"time": ds.time}
        if ds.half_life_days is not None:
            extra["half_life_days"] = np.array(ds.half_life_days)
        if ds.recency_boost:
            extra["recency_boost"] = np.array(ds.recency_boost)
        np.savez_compressed(fh, user_rows=ds.user_rows, item_rows=ds.item_rows, rating=ds.rating,
                            holdout=holdout, implicit=np.array(ds.implicit), **extra)


def load_interactions(
    run_dir: Path, feature_index: FeatureIndex, data_dir: str = DATA_DIR
) -> tuple[Dataset, np.ndarray]:
    path = run_dir / data_dir / INTERACTIONS_FILE
    try:
        with np.load(path) as z:
            ds = Dataset(feature_index, z["user_rows"], z["item_rows"], z["rating"], bool(z["implicit"]),
                         time=z["time"] if "time" in z.files else None,
                         half_life_days=float(z["half_life_days"]) if "half_life_days" in z.files else None,
                         recency_boost=float(z["recency_boost"]) if "recency_boost" in z.files else 0.0)
            return ds, z["holdout"]
    # A damaged .npz fails inside zipfile and zlib, with their own exceptions (as in topx.formats.artifact).
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError,
            RuntimeError) as exc:
        raise ArtifactFormatError(f"{path}: cannot read the run's interactions ({exc}); run `topx train` first") from exc


def user_range_interactions(
    run_dir: Path, start: int, stop: int, n_items: int, data_dir: str = DATA_DIR, chunk: int = 1 << 22
) -> sp.csr_matrix:
    """(stop - start, n_items) CSR of the saved interactions of user rows start..stop-1 (a search
    shard's seen items; ``Dataset.matrix()[start:stop]``), read from interactions.npz ``chunk`` rows at a
    time: memory follows the range's interactions, not the whole run's."""
    users: list[np.ndarray] = []
    items: list[np.ndarray] = []
    for user_part, item_part in iter_interaction_rows(run_dir, data_dir, chunk):
        keep = (user_part >= start) & (user_part < stop)
        users.append(user_part[keep].astype(np.int64) - start)
        items.append(item_part[keep].astype(np.int64))
    rows = np.concatenate(users) if users else np.zeros(0, np.int64)
    cols = np.concatenate(items) if items else np.zeros(0, np.int64)
    out = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(max(stop - start, 0), n_items))
    out.sum_duplicates()
    return out


def iter_interaction_rows(
    run_dir: Path, data_dir: str = DATA_DIR, chunk: int = 1 << 22
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The saved interactions' (user row, item row) pairs, ``chunk`` at a time, as two (n,) arrays read
    straight from interactions.npz: memory follows the chunk, not the run."""
    path = run_dir / data_dir / INTERACTIONS_FILE
    try:
        with zipfile.ZipFile(path) as archive, archive.open("user_rows.npy") as u, archive.open("item_rows.npy") as i:
            (u_dtype, length), (i_dtype, i_length) = _npy_vector_header(u), _npy_vector_header(i)
            if length != i_length:
                raise ValueError(f"user_rows has {length} rows and item_rows {i_length}")
            for offset in range(0, length, chunk):
                count = min(chunk, length - offset)
                yield _read_items(u, count, u_dtype), _read_items(i, count, i_dtype)
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise ArtifactFormatError(f"{path}: cannot read the run's interactions ({exc})") from exc


def _npy_vector_header(fh: Any) -> tuple[np.dtype, int]:
    """The dtype and length of the one-dimensional .npy array ``fh`` is positioned at the start of."""
    version = np.lib.format.read_magic(fh)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _fortran, dtype = read_header(fh)
    if len(shape) != 1 or dtype.hasobject:
        raise ValueError(f"expected a 1-d numeric array, found shape {shape} of {dtype}")
    return dtype, int(shape[0])


def _read_items(fh: Any, count: int, dtype: np.dtype) -> np.ndarray:
    """The next ``count`` items of the array ``fh`` reads; a file that ends before them is an error."""
    data = fh.read(count * dtype.itemsize)
    if len(data) != count * dtype.itemsize:
        raise EOFError(f"the array ends after {len(data) // dtype.itemsize} of the {count} items expected")
    return np.frombuffer(data, dtype=dtype)


def load_ids(vectors_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    path = vectors_dir / IDS_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return np.asarray(doc["user_ids"], dtype=object), np.asarray(doc["item_ids"], dtype=object)
    except (OSError, KeyError, ValueError) as exc:
        raise ArtifactFormatError(f"{path}: cannot read the ids beside the vectors ({exc})") from exc


@contextmanager
def atomic_output_dir(out: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out``; on success it replaces ``out`` whole.

    On any error the temporary directory is removed and ``out`` is left exactly as it was.
    """
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rmdir(old)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True, default=_json_default) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
