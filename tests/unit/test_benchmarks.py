"""The quality benchmark's MovieLens 100k readers against the real files (skipped where the data are
absent), and its small helpers on cases worked out by hand. Neither myfm nor implicit is needed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp

from benchmarks.common import (
    DEFAULT_ML100K,
    N_GENRES,
    age_band,
    genre_names,
    json_line,
    load_items,
    load_ratings,
    load_users,
)
from benchmarks.quality_ml100k import feature_index, per_user_count_split, top_x_dense

needs_data = pytest.mark.skipif(not DEFAULT_ML100K.is_dir(), reason=f"MovieLens 100k not found at {DEFAULT_ML100K}")


@needs_data
def test_ratings_files_parse_whole_and_ua_splits_u_data():
    every = load_ratings(DEFAULT_ML100K)
    assert len(every) == 100_000
    assert every["user_id"].nunique() == 943 and every["item_id"].nunique() == 1682
    assert set(np.unique(every["rating"])) == {1.0, 2.0, 3.0, 4.0, 5.0}
    base, test = load_ratings(DEFAULT_ML100K, "ua.base"), load_ratings(DEFAULT_ML100K, "ua.test")
    assert (len(base), len(test)) == (90_570, 9_430)
    assert (test.groupby("user_id").size() == 10).all()  # ua.test: exactly 10 ratings of every user
    pairs = lambda f: set(zip(f["user_id"], f["item_id"], strict=True))  # noqa: E731
    assert pairs(base).isdisjoint(pairs(test))
    assert pairs(base) | pairs(test) == pairs(every)


@needs_data
def test_users_parse_with_numeric_or_banded_age():
    users = load_users(DEFAULT_ML100K)
    assert len(users) == 943 and list(users.columns) == ["age", "gender", "occupation"]
    assert users.loc["1"].tolist() == [24, "M", "technician"]
    assert users["age"].between(7, 73).all()
    assert set(users["gender"]) == {"M", "F"}
    assert users["occupation"].nunique() == 21
    banded = load_users(DEFAULT_ML100K, age="banded")
    assert banded.loc["1", "age"] == "18-24" and banded.loc["2", "age"] == "50-55"


@needs_data
def test_items_parse_latin1_genres_and_release_year():
    items = load_items(DEFAULT_ML100K)
    assert len(items) == 1682 and list(items.columns) == ["genre", "year"]
    assert items.loc["1", "genre"] == "Animation|Children's|Comedy" and items.loc["1", "year"] == 1995
    assert items.loc["267", "genre"] == "unknown" and np.isnan(items.loc["267", "year"])  # no release date
    assert items["year"].dropna().between(1922, 1998).all()
    names = set(genre_names(DEFAULT_ML100K))
    assert len(names) == N_GENRES
    assert all(set(g.split("|")) <= names for g in items["genre"])


@needs_data
def test_side_features_encode_into_the_feature_index():
    users, items = load_users(DEFAULT_ML100K), load_items(DEFAULT_ML100K)
    fi = feature_index(users, items, side_features=True)
    assert (fi.n_users, fi.n_items) == (943, 1682)
    side = [n for n in fi.names if not n.startswith(("user_id=", "item_id="))]
    assert "age" in side and "year" in side and "gender=F" in side and "genre=Film-Noir" in side
    assert sum(n.startswith("genre=") for n in side) == N_GENRES
    toy_story = fi.item_x[fi.item_ids.index("1")].toarray().ravel()
    genres_set = {fi.names[j] for j in np.flatnonzero(toy_story) if fi.names[j].startswith("genre=")}
    assert genres_set == {"genre=Animation", "genre=Children's", "genre=Comedy"}
    ids_only = feature_index(users, items, side_features=False)
    assert ids_only.n_features == 943 + 1682


def test_age_bands_follow_movielens_1m():
    assert age_band(np.array([7, 17, 18, 24, 25, 49, 50, 55, 56, 73])).tolist() == [
        "under 18", "under 18", "18-24", "18-24", "25-34", "45-49", "50-55", "50-55", "56+", "56+"]


def test_per_user_count_split_takes_n_per_user_and_keeps_half():
    users = np.repeat(np.arange(3), [30, 12, 4])
    mask = per_user_count_split(users, 10, seed=1)
    assert [int(mask[users == u].sum()) for u in range(3)] == [10, 6, 2]
    assert np.array_equal(mask, per_user_count_split(users, 10, seed=1))
    assert not np.array_equal(mask, per_user_count_split(users, 10, seed=2))


def test_top_x_dense_skips_seen_and_breaks_ties_by_item_row():
    scores = np.array([[1.0, 3.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    seen = sp.csr_matrix(np.array([[0, 1, 0, 0], [1, 1, 1, 0]], dtype=np.float32))
    assert top_x_dense(scores, seen, 3).tolist() == [[2, 3, 0], [3, -1, -1]]


def test_json_line_is_one_plain_line():
    line = json_line({"a": np.float32(0.1234567), "b": float("nan"), "c": {"n": np.int64(3)}, "d": [np.bool_(True)]})
    assert "\n" not in line
    assert json.loads(line) == {"a": 0.12346, "b": None, "c": {"n": 3}, "d": [True]}


def test_ranking_ease_scores_planted_co_occurrence_first():
    from benchmarks.ranking import fit_ease

    # Items 0 and 1 always go together, as do 2 and 3: a user with item 0 should get item 1 first.
    x = sp.csr_matrix(np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1], [1, 0, 0, 0]], np.float32))
    scores = fit_ease(x, {"lambda": 0.5}, 0)(np.array([4]))
    assert int(np.argmax(np.where(x[4].toarray() > 0, -np.inf, scores))) == 1


@needs_data
@pytest.mark.slow
def test_ranking_benchmark_prints_one_line_with_every_key(capsys):
    from benchmarks.ranking import main as ranking_main

    assert ranking_main(["--data", str(DEFAULT_ML100K), "--quick", "--skip-missing"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    doc = json.loads(line)
    for suffix in ("", "_temporal"):
        for key in ("recall_at_10", "ndcg_at_10", "train_s", "popularity_recall_at_10"):
            assert isinstance(doc[key + suffix], float), key + suffix
        for method in ("als", "bpr", "ease", "lightfm", "als_recency"):
            assert f"{method}_recall_at_10{suffix}" in doc and f"{method}_ndcg_at_10{suffix}" in doc
    for half_life in ("30", "90", "180"):
        assert isinstance(doc[f"recall_at_10_half_life_{half_life}d_temporal"], float)
    # ML-100k's 80,000 training rows are a size topx searches its settings at by default: timed apart.
    for suffix in ("", "_temporal"):
        tuned = doc["topx_tuned" + suffix]
        assert set(tuned) == {"changed", "chosen", "gain"} and doc["topx_tune_s" + suffix] > 0
        assert tuned["changed"] == (tuned["gain"] >= 0.03)
        assert isinstance(doc["ease_tune_s" + suffix], float) or doc["ease_recall_at_10" + suffix] is None
    # topx ranks well above popularity even in the quick run (2 epochs).
    assert doc["recall_at_10"] > 1.5 * doc["popularity_recall_at_10"]


def test_s3_read_spoils_exactly_row_1234_of_a_part():
    import pyarrow as pa

    from benchmarks.s3_read import BAD_ROW, spoil

    table = pa.table({"user_id": pa.array(range(2000)), "plays": pa.array([1] * 2000)})
    text = spoil(table, "text")["plays"].to_pylist()
    assert text[BAD_ROW - 1] == "x" and text[:BAD_ROW - 1] == ["1"] * (BAD_ROW - 1) and text[BAD_ROW:] == ["1"] * 766
    negative = spoil(table, "negative")
    assert negative["plays"].type == pa.int64() and negative["plays"].to_pylist().count(-1) == 1
    assert negative["plays"][BAD_ROW - 1].as_py() == -1


@pytest.mark.slow
def test_s3_read_benchmark_reads_the_rows_written_and_names_the_bad_row(capsys):
    from benchmarks.s3_read import main as s3_read_main

    assert s3_read_main(["--rows", "6000", "--parts", "3", "--formats", "csv", "parquet"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    doc = json.loads(line)
    for fmt in ("csv", "parquet"):
        result = doc["results"][fmt]
        assert result["written"]["rows"] == 6000
        topx = result["topx"]
        assert topx["rows"] == 6000 and topx["rows_right"] is True, fmt  # _SUCCESS and the .crc skipped
        assert topx["s"] > 0 and topx["peak_rss_mb"] > 0
        assert topx["partition_probe"] == {"time_values": [1717200000, 1717286400], "error": None}
        negative = topx["bad_part"]["negative"]["error"]
        assert "part-00002" in negative and "column 'plays'" in negative and "is negative" in negative
        assert result["awswrangler"]["s"] is None and "--wrangler-python" in result["awswrangler"]["note"]
    # the CSV file row counts the header line; Parquet rows are data rows
    assert "row 1235, column 'plays'" in doc["results"]["csv"]["topx"]["bad_part"]["text"]["error"]
    assert "row 1234, column 'plays'" in doc["results"]["parquet"]["topx"]["bad_part"]["negative"]["error"]
    assert "is text" in doc["results"]["parquet"]["topx"]["bad_part"]["text"]["error"]
