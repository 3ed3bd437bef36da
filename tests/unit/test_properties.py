"""Property tests: whatever bytes arrive, ingest and the artifact codec answer with a topx error or a
correct result, never with another exception.

Random inputs, and valid files corrupted the ways storage and transfers corrupt them (truncation, one
flipped byte), go through every reader a pipeline stage calls: interactions and feature tables (CSV,
gzip, Parquet), feature encoding, the whole ingest, the feature index and the run's interactions the
later stages read back, and the model artifact. Settings keep each test to about a second.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from topx.dataset import DataOptions, load_dataset
from topx.encode import encode_features
from topx.errors import InputDataError, TopxError
from topx.feature_index import FeatureIndex
from topx.ingest import read_feature_table, read_interactions
from topx.rundir import load_interactions, save_interactions

FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

CSV_TEXT = "user_id,item_id,rating\nu1,i1,5\nu1,i2,3\nu2,i1,4\nu2,i3,1.5\nu3,i2,2\n"
USERS_TEXT = "user_id,age,country,tags\nu1,31,de,a|b\nu2,NA,fr,b\nu3,45,de,\n"


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), sink)
    return sink.getvalue()


GOOD_PARQUET = _parquet_bytes(pd.read_csv(io.StringIO(CSV_TEXT), dtype={"user_id": str, "item_id": str}))
GOOD_USERS_PARQUET = _parquet_bytes(pd.read_csv(io.StringIO(USERS_TEXT), dtype=str))
GOOD_GZIP = gzip.compress(CSV_TEXT.encode(), mtime=0)


def _corrupt(blob: bytes, position: int, value: int, cut: int) -> bytes:
    data = bytearray(blob)
    data[position % len(data)] = value
    return bytes(data[: max(0, len(data) - cut)])


def _write(directory: Path, name: str, blob: bytes) -> str:
    path = directory / name
    path.write_bytes(blob)
    return str(path)


def _only_topx_errors(call, *args, **kwargs):
    """The call's result, or None when it raised a TopxError; anything else fails the test."""
    try:
        return call(*args, **kwargs)
    except TopxError:
        return None


# --------------------------------------------------------------------------- interactions and tables


@FAST
@given(which=st.sampled_from(["parquet", "gzip", "users-parquet"]), position=st.integers(0, 10**5),
       value=st.integers(0, 255), cut=st.integers(0, 400))
# A byte in the footer's schema that made a column name invalid UTF-8 (found by a random draw).
@example(which="users-parquet", position=13155, value=128, cut=0)
def test_corrupted_parquet_and_gzip_raise_only_topx_errors(tmp_path: Path, which: str, position: int, value: int,
                                                           cut: int) -> None:
    if which == "users-parquet":
        source = _write(tmp_path, "users.parquet", _corrupt(GOOD_USERS_PARQUET, position, value, cut))
        table = _only_topx_errors(read_feature_table, source, key_col="user_id")
        if table is not None:
            assert table.index.is_unique and (table.index != "").all()
        return
    blob, name = (GOOD_PARQUET, "r.parquet") if which == "parquet" else (GOOD_GZIP, "r.csv.gz")
    frame = _only_topx_errors(read_interactions, _write(tmp_path, name, _corrupt(blob, position, value, cut)))
    if frame is not None:
        assert list(frame.columns) == ["user_id", "item_id", "rating"]
        assert np.isfinite(frame["rating"].to_numpy()).all()


@FAST
@given(data=st.binary(max_size=300), header=st.booleans(),
       wrap=st.sampled_from([(b"", b""), (b"PAR1", b"PAR1"), (b"\x1f\x8b\x08\x00", b""), (b"user_id,x\n", b"")]))
def test_random_bytes_as_a_feature_table_raise_only_topx_errors(tmp_path: Path, data: bytes, header: bool,
                                                               wrap: tuple[bytes, bytes]) -> None:
    source = _write(tmp_path, "users.csv", wrap[0] + data + wrap[1])
    table = _only_topx_errors(read_feature_table, source, key_col="user_id" if header else 0, header=header)
    if table is not None:
        assert table.index.is_unique
        assert all(key and key == key.strip() for key in table.index)


CELLS = st.sampled_from(["u1", "u2", "u3", "", " ", "NA", "7", "-1.5", "1e400", "inf", "nan", "a|b", "|", "x",
                         '"q,r"', "é", "true"])


@FAST
@given(rows=st.lists(st.lists(CELLS, min_size=3, max_size=3), min_size=1, max_size=8),
       ids=st.lists(st.sampled_from(["u1", "u2", "u3", "u4"]), max_size=4, unique=True))
def test_feature_tables_encode_or_fail_with_a_named_row(tmp_path: Path, rows: list[list[str]], ids: list[str]) -> None:
    text = "user_id,a,b\n" + "".join(",".join(row) + "\n" for row in rows)
    source = _write(tmp_path, "users.csv", text.encode())
    table = _only_topx_errors(read_feature_table, source, key_col="user_id", sep=",")
    if table is None:
        return
    try:
        encoded = encode_features(table, ids)
    except InputDataError as err:
        assert err.source == source and err.row is not None and 2 <= err.row <= len(rows) + 1
        return
    assert encoded.matrix.shape == (len(ids), len(encoded.names))
    assert np.isfinite(encoded.matrix.data).all()
    assert encoded.missing_ids == sum(1 for i in ids if i not in set(table.index))


INTERACTION_CELLS = st.sampled_from(["u1", "u2", "i1", "i2", "i3", "", "0", "1", "5", "-2", "2.5", "nan", "x"])


@FAST
@given(rows=st.lists(st.lists(INTERACTION_CELLS, min_size=3, max_size=3), min_size=1, max_size=10),
       implicit=st.booleans(), with_users=st.booleans())
def test_whole_ingest_gives_a_consistent_dataset_or_a_topx_error(tmp_path: Path, rows: list[list[str]],
                                                                 implicit: bool, with_users: bool) -> None:
    text = "user_id,item_id,rating\n" + "".join(",".join(row) + "\n" for row in rows)
    users = _write(tmp_path, "users.csv", USERS_TEXT.encode()) if with_users else None
    options = DataOptions(_write(tmp_path, "r.csv", text.encode()), users=users, implicit=implicit)
    ds = _only_topx_errors(load_dataset, options)
    if ds is None:
        return
    index = ds.feature_index
    assert index.n_users >= 2 and index.n_items >= 2
    assert len(ds.user_rows) == len(ds.item_rows) == len(ds.rating) == ds.report["n_interactions"]
    assert ds.user_rows.max() < index.n_users and ds.item_rows.max() < index.n_items
    assert np.isfinite(ds.rating).all() and (not implicit or (ds.rating > 0).all())
    pairs = set(zip(ds.user_rows.tolist(), ds.item_rows.tolist(), strict=True))
    assert len(pairs) == len(ds.rating)  # repeated pairs were merged


# --------------------------------------------------------------------------- what the later stages read back


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared run directory, as Prepare writes it: feature index, design rows, interactions."""
    root = tmp_path_factory.mktemp("prepared")
    source = _write(root, "r.csv", CSV_TEXT.encode())
    users = _write(root, "users.csv", USERS_TEXT.encode())
    ds = load_dataset(DataOptions(source, users=users))
    ds.feature_index.save(root / "prepared")
    save_interactions(root / "prepared", ds, np.zeros(len(ds.rating), dtype=bool))
    return root / "prepared"


@FAST
@given(name=st.sampled_from(["feature_index.json", "interactions.npz"]),
       position=st.integers(0, 10**5), value=st.integers(0, 255), cut=st.integers(0, 200))
def test_corrupted_prepared_files_raise_only_topx_errors(tmp_path: Path, prepared: Path, name: str, position: int,
                                                         value: int, cut: int) -> None:
    copy = tmp_path / "prepared"
    copy.mkdir(exist_ok=True)
    for path in prepared.iterdir():
        blob = path.read_bytes()
        (copy / path.name).write_bytes(_corrupt(blob, position, value, cut) if path.name == name else blob)
    index = _only_topx_errors(FeatureIndex.load, copy)
    if index is None:
        return
    loaded = _only_topx_errors(load_interactions, copy, index, data_dir="")
    if loaded is not None:
        ds, holdout = loaded
        assert len(holdout) == len(ds.rating)


@FAST
@given(doc=st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                    max_size=4),
                        max_leaves=12),
       keep=st.sampled_from(["format", "version", "features", "user_ids", "item_ids"]))
def test_feature_index_json_with_wrong_shapes_raises_only_topx_errors(tmp_path: Path, prepared: Path, doc: object,
                                                                      keep: str) -> None:
    good = json.loads((prepared / "feature_index.json").read_text(encoding="utf-8"))
    good[keep] = doc
    (tmp_path / "feature_index.json").write_text(json.dumps(good), encoding="utf-8")
    with contextlib.suppress(TopxError):
        FeatureIndex.load(tmp_path)


def test_a_corrupted_design_file_is_an_artifact_error(tmp_path: Path, prepared: Path) -> None:
    for path in prepared.iterdir():
        blob = path.read_bytes()
        (tmp_path / path.name).write_bytes(blob[: len(blob) // 2] if path.name == "design.npz" else blob)
    with pytest.raises(TopxError, match="design.npz"):
        FeatureIndex.load(tmp_path)
