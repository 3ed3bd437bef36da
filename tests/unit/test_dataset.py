"""load_dataset's lean path (part by part, integer codes, numpy merging) gives exactly the Dataset that reading
every row into a frame of string ids and merging with pandas gave: same ids in the same order, same rows in the
same order, same ratings, times and report, so that seeded hold-outs and every figure stay as they were."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import topx.dataset as dataset_module
from topx.dataset import DataOptions, _window_start, load_dataset
from topx.errors import InputDataError
from topx.ingest import read_interaction_codes, read_interactions

# --------------------------------------------------------------------------- the former path, as the reference


def reference(opts: DataOptions) -> dict[str, Any]:
    """What load_dataset computed before it read part by part: a frame of string ids, filtered with pandas,
    merged with groupby(sort=False) and numbered with factorize(sort=True)."""
    frame = read_interactions(opts.interactions, user_col=opts.user_col, item_col=opts.item_col,
                              rating_col=opts.rating_col, header=opts.header, sep=opts.sep,
                              implicit=opts.implicit and opts.min_rating is None, time_col=opts.time_col)
    report: dict[str, Any] = {"rows_read": int(len(frame))}
    if opts.since is not None:
        start = _window_start(opts.since, int(frame["time"].max()))
        old = frame["time"].to_numpy() < start
        report["window_start"] = datetime.fromtimestamp(start, UTC).isoformat()
        report["rows_before_window_dropped"] = int(old.sum())
        frame = frame.loc[~old]
    if opts.min_rating is not None:
        low = frame["rating"].to_numpy() < opts.min_rating
        report["rows_below_min_rating_dropped"] = int(low.sum())
        frame = frame.loc[~low]
    if opts.implicit:
        zero = frame["rating"].to_numpy() <= 0
        report["zero_strength_rows_dropped"] = int(zero.sum())
        frame = frame.loc[~zero]
    grouped = frame.groupby(["user_id", "item_id"], sort=False, observed=True)
    merged = grouped["rating"].sum() if opts.implicit else grouped["rating"].mean()
    report["duplicate_pairs_merged"] = int(len(frame) - len(merged))
    if report["duplicate_pairs_merged"]:
        out = merged.reset_index()
        out["rating"] = out["rating"].astype(np.float32)
        if "time" in frame.columns:
            out["time"] = grouped["time"].max().to_numpy()
        frame = out
    else:
        frame = frame.reset_index(drop=True)
    user_rows, user_ids = pd.factorize(frame["user_id"], sort=True)
    item_rows, item_ids = pd.factorize(frame["item_id"], sort=True)
    if opts.time_col is not None:
        report["time_first"] = datetime.fromtimestamp(int(frame["time"].min()), UTC).isoformat().replace("+00:00", "Z")
        report["time_last"] = datetime.fromtimestamp(int(frame["time"].max()), UTC).isoformat().replace("+00:00", "Z")
    return {"user_ids": tuple(str(u) for u in user_ids), "item_ids": tuple(str(i) for i in item_ids),
            "user_rows": user_rows.astype(np.int64), "item_rows": item_rows.astype(np.int64),
            "rating": frame["rating"].to_numpy(dtype=np.float32),
            "time": None if opts.time_col is None else frame["time"].to_numpy(dtype=np.int64), "report": report}


def assert_same_as_reference(opts: DataOptions) -> None:
    expected = reference(opts)
    ds = load_dataset(opts)
    assert ds.user_ids == expected["user_ids"]
    assert ds.item_ids == expected["item_ids"]
    for name in ("user_rows", "item_rows", "rating", "time"):
        got, want = getattr(ds, name), expected[name]
        if want is None:
            assert got is None
        else:
            assert got.dtype == want.dtype, name
            np.testing.assert_array_equal(got, want, err_msg=name)
    assert {k: v for k, v in ds.report.items() if k in expected["report"]} == expected["report"]
    assert ds.report["n_interactions"] == len(expected["rating"])


# --------------------------------------------------------------------------- data


# Text ids that sort differently as text and as numbers, with leading zeros, spaces to strip and non-ASCII.
USERS = ["u10", "u9", "007", "7", " u2 ", "zoë", "Zoe", "émile", "u1", "日本"]
ITEMS = ["i1", "i10", "i2", "0042", "42", "ä", "b", "B"]


def interactions(seed: int, n: int) -> pd.DataFrame:
    """(n,) rows with many repeated (user, item) pairs, ratings in quarters (their sums and means are exact in
    float32, as with any counts or star ratings), times a few days apart."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "user": rng.choice(USERS, n), "item": rng.choice(ITEMS, n),
        "stars": rng.integers(-4, 21, n) / 4.0,
        "when": 1_700_000_000 + rng.integers(0, 40 * 86400, n),
    })


def write_parts(root: Path, frame: pd.DataFrame, cuts: list[int]) -> str:
    """``frame`` cut at ``cuts`` into CSV parts under ``root`` (in path order)."""
    root.mkdir()
    for number, (start, stop) in enumerate(zip([0, *cuts], [*cuts, len(frame)], strict=True)):
        frame.iloc[start:stop].to_csv(root / f"part-{number:03d}.csv", index=False)
    return str(root)


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize("since,min_rating", [(None, None), ("20", None), (None, 2.0), ("2023-11-25", 1.5)])
def test_parts_with_repeats_a_window_and_a_threshold_give_the_former_dataset(tmp_path, implicit, since, min_rating):
    frame = interactions(seed=7, n=400)
    if implicit and min_rating is None:
        frame["stars"] = frame["stars"].abs()  # strengths may not be negative unless a threshold drops them
    source = write_parts(tmp_path / "export", frame, [1, 150, 151, 330])
    opts = DataOptions(source, user_col="user", item_col="item", rating_col="stars", time_col="when",
                       implicit=implicit, since=since, min_rating=min_rating)
    ds = load_dataset(opts)
    assert ds.report["duplicate_pairs_merged"] > 0
    assert_same_as_reference(opts)


@pytest.mark.parametrize("implicit", [False, True])
def test_repeats_merged_a_block_of_users_at_a_time_give_the_former_dataset(tmp_path, monkeypatch, implicit):
    """Blocks of about 7 rows: users spread over dozens of blocks, each merged on its own."""
    monkeypatch.setattr(dataset_module, "MERGE_BLOCK_ROWS", 7)
    frame = interactions(seed=9, n=400)
    frame["stars"] = frame["stars"].abs()
    opts = DataOptions(write_parts(tmp_path / "export", frame, [200]), user_col="user", item_col="item",
                       rating_col="stars", time_col="when", implicit=implicit)
    assert load_dataset(opts).report["duplicate_pairs_merged"] > 0
    assert_same_as_reference(opts)


def test_without_repeats_or_a_time_column_rows_keep_file_order(tmp_path):
    pairs = [(u, i) for u in USERS for i in ITEMS]
    order = np.random.default_rng(3).permutation(len(pairs))
    frame = pd.DataFrame({"user": [pairs[k][0] for k in order], "item": [pairs[k][1] for k in order],
                          "stars": np.arange(len(pairs)) % 5 + 1.0})
    opts = DataOptions(write_parts(tmp_path / "export", frame, [17, 40]), user_col="user", item_col="item",
                       rating_col="stars")
    assert_same_as_reference(opts)
    assert load_dataset(opts).report["duplicate_pairs_merged"] == 0


def test_parquet_parts_with_integer_ids_sort_their_ids_as_text(tmp_path):
    rng = np.random.default_rng(11)
    root = tmp_path / "export"
    root.mkdir()
    for number in range(3):
        pq.write_table(pa.table({"user_id": rng.integers(0, 30, 200), "item_id": rng.integers(0, 120, 200),
                                 "plays": rng.integers(0, 4, 200)}), root / f"part-{number}.parquet")
    opts = DataOptions(str(root), rating_col="plays", implicit=True)
    assert_same_as_reference(opts)
    # "10" sorts before "9": ids are text, numbered in text order.
    assert list(load_dataset(opts).user_ids) == sorted(load_dataset(opts).user_ids)


def test_one_parquet_file_is_read_a_row_group_at_a_time_with_its_rows_numbered_through_the_file(tmp_path):
    rng = np.random.default_rng(12)
    table = pa.table({"user_id": rng.integers(0, 30, 300), "item_id": rng.integers(0, 120, 300),
                      "plays": rng.integers(1, 4, 300)})
    pq.write_table(table, tmp_path / "one-group.parquet")
    pq.write_table(table, tmp_path / "groups.parquet", row_group_size=7)
    assert pq.ParquetFile(tmp_path / "groups.parquet").num_row_groups == 43
    whole, grouped = (load_dataset(DataOptions(str(tmp_path / name), rating_col="plays", implicit=True))
                      for name in ("one-group.parquet", "groups.parquet"))
    assert whole.user_ids == grouped.user_ids and whole.item_ids == grouped.item_ids
    for name in ("user_rows", "item_rows", "rating"):
        np.testing.assert_array_equal(getattr(whole, name), getattr(grouped, name))
    assert whole.report == grouped.report
    # A bad value in the sixth row group is named by its row in the file (row 40 is position 39).
    plays = table["plays"].to_numpy().copy()
    plays[39] = -2
    pq.write_table(table.set_column(2, "plays", pa.array(plays)), tmp_path / "bad.parquet", row_group_size=7)
    with pytest.raises(InputDataError) as caught:
        load_dataset(DataOptions(str(tmp_path / "bad.parquet"), rating_col="plays", implicit=True))
    assert caught.value.row == 40 and "bad.parquet" in str(caught.value) and "-2" in str(caught.value)


def test_codes_keep_every_row_in_file_order_with_ids_in_order_of_first_row(tmp_path):
    root = tmp_path / "export"
    root.mkdir()
    (root / "a.csv").write_text("user_id,item_id,rating\nb,x,1\na,y,2\nb,x,3\n", encoding="utf-8")
    (root / "b.csv").write_text("user_id,item_id,rating\nc,y,4\na,z,5\n", encoding="utf-8")
    codes = read_interaction_codes(str(root))
    assert codes.user_ids.to_pylist() == ["b", "a", "c"] and codes.item_ids.to_pylist() == ["x", "y", "z"]
    assert codes.user_codes.tolist() == [0, 1, 0, 2, 1] and codes.item_codes.tolist() == [0, 1, 0, 1, 2]
    assert codes.rating.tolist() == [1, 2, 3, 4, 5] and codes.time is None
    assert (codes.user_codes.dtype, codes.rating.dtype) == (np.int32, np.float32)
    assert codes.parts == [str(root / "a.csv"), str(root / "b.csv")]


def test_a_bad_row_in_a_later_part_is_named_by_its_part_and_row(tmp_path):
    root = tmp_path / "export"
    root.mkdir()
    (root / "a.csv").write_text("user_id,item_id,rating\nb,x,1\n", encoding="utf-8")
    (root / "b.csv").write_text("user_id,item_id,rating\nc,y,4\na,z,lots\n", encoding="utf-8")
    with pytest.raises(InputDataError) as info:
        load_dataset(DataOptions(str(root)))
    assert str(root / "b.csv") in str(info.value) and "row 3" in str(info.value) and "rating" in str(info.value)


def test_the_recency_boost_rises_through_each_users_rows_in_time_order_and_keeps_their_mean():
    from topx.dataset import user_recency

    users = np.array([0, 1, 0, 0, 1, 2, 0, 3, 3])
    time = np.array([40, 5, 10, 30, 9, 7, 20, 1, 1])   # user 3's two rows are at one time
    weight = user_recency(users, time, 2.0)
    # User 0 in time order: rows 2, 6, 3, 0 at quantiles 1/8, 3/8, 5/8, 7/8 of 1 + 2 q, over 1 + 2/2.
    np.testing.assert_allclose(weight[[2, 6, 3, 0]], (1 + 2 * np.array([1, 3, 5, 7]) / 8) / 2, rtol=1e-6)
    np.testing.assert_allclose(weight[[1, 4]], (1 + 2 * np.array([1, 3]) / 4) / 2, rtol=1e-6)
    assert weight[5] == 1.0                                  # one row: the middle
    np.testing.assert_allclose(weight[[7, 8]], [1.0, 1.0])   # rows of one time share their place
    for user in range(4):
        assert np.mean(weight[users == user]) == pytest.approx(1.0)
    # The rows' order in the file does not matter; no boost weighs every row 1.
    shuffle = np.random.default_rng(0).permutation(len(users))
    np.testing.assert_allclose(user_recency(users[shuffle], time[shuffle], 2.0), weight[shuffle], rtol=1e-6)
    np.testing.assert_allclose(user_recency(users, time, 0.0), np.ones(len(users)))
    # Times too far apart to combine with the user in one sort key are sorted on both: the same weights.
    wide = time * np.int64(2**56)
    np.testing.assert_allclose(user_recency(users, wide, 2.0), weight, rtol=1e-6)


def test_many_parts_merged_in_batches_code_ids_as_one_pass_over_every_row_would(tmp_path, monkeypatch):
    """Parts are merged into the vocabulary a batch at a time (here every few ids, so that every kind of
    batch occurs: ids new to it, met in an earlier batch, repeated across one batch's parts)."""
    from topx.ingest import _Vocabulary

    monkeypatch.setattr(_Vocabulary, "MIN_BATCH", 3)
    root = tmp_path / "export"
    root.mkdir()
    rng = np.random.default_rng(3)
    users = [f"u{x}" for x in rng.integers(0, 40, 600)]
    items = [f"i{x}" for x in rng.zipf(1.5, 600) % 90]
    for part in range(30):
        rows = slice(part * 20, part * 20 + 20)
        pd.DataFrame({"user_id": users[rows], "item_id": items[rows], "rating": 1}).to_csv(
            root / f"part-{part:03d}.csv", index=False)
    codes = read_interaction_codes(str(root))
    for got, ids, wanted in ((codes.user_codes, codes.user_ids, users), (codes.item_codes, codes.item_ids, items)):
        expected_codes, expected_ids = pd.factorize(pd.Series(wanted))
        assert got.tolist() == expected_codes.tolist() and ids.to_pylist() == list(expected_ids)
