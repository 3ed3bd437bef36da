"""Encoding side-feature tables: numeric scaling, one-hot and multi-valued columns, alignment
with the ids, and errors that name the file row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from topx.encode import EncodedFeatures, encode_features
from topx.errors import ConfigError, InputDataError, TopxError
from topx.ingest import read_feature_table


def table_of(columns: dict[str, list], keys: list[str], name: str = "item_id") -> pd.DataFrame:
    return pd.DataFrame(columns, index=pd.Index(keys, name=name))


def dense(encoded: EncodedFeatures) -> np.ndarray:
    return encoded.matrix.toarray()


def column(encoded: EncodedFeatures, name: str) -> np.ndarray:
    return dense(encoded)[:, encoded.names.index(name)]


@pytest.fixture
def items_csv(tmp_path: Path) -> str:
    path = tmp_path / "items.csv"
    path.write_text(
        "item_id,year,genres,city,flag\n"
        "i1,1990,Action|Comedy,Paris,1\n"
        "i2,2000,Drama,,0\n"
        "i3,2010,,Rome,1\n"
        "i9,,Comedy| Action ,NA,0\n"
    )
    return str(path)


# --------------------------------------------------------------------------- numeric


def test_numeric_column_is_standardised():
    encoded = encode_features(table_of({"age": [1.0, 2.0, 3.0]}, ["a", "b", "c"]), ["a", "b", "c"])
    assert encoded.names == ("age",)
    expected = (np.array([1, 2, 3]) - 2) / np.sqrt(2 / 3)
    np.testing.assert_allclose(column(encoded, "age"), expected, rtol=1e-6)
    assert encoded.matrix.dtype == np.float32 and isinstance(encoded.matrix, sp.csr_matrix)


def test_missing_numeric_value_becomes_the_mean():
    table = table_of({"age": [10.0, np.nan, 30.0]}, ["a", "b", "c"])
    values = column(encode_features(table, ["a", "b", "c"]), "age")
    np.testing.assert_allclose(values, [-1.0, 0.0, 1.0], rtol=1e-6)


def test_constant_numeric_column_is_kept_as_zeros():
    table = table_of({"const": [5, 5, 5], "empty": [np.nan] * 3}, ["a", "b", "c"])
    encoded = encode_features(table, ["a", "b", "c"])
    assert encoded.names == ("const", "empty")
    assert encoded.matrix.nnz == 0 and encoded.matrix.shape == (3, 2)


def test_huge_numbers_scale_without_overflow():
    table = table_of({"big": [1e300, -1e300, 0.0]}, ["a", "b", "c"])
    values = column(encode_features(table, ["a", "b", "c"]), "big")
    np.testing.assert_allclose(values, [np.sqrt(1.5), -np.sqrt(1.5), 0.0], rtol=1e-6)


def test_bool_and_01_text_columns_are_numeric():
    table = table_of({"b": [True, False, True, False], "t": ["1", "0", "0", " 0 "]}, list("abcd"))
    encoded = encode_features(table, list("abcd"))
    assert encoded.names == ("b", "t")
    np.testing.assert_allclose(column(encoded, "b"), [1, -1, 1, -1], rtol=1e-6)
    np.testing.assert_allclose(column(encoded, "t"), [np.sqrt(3), -1 / np.sqrt(3), -1 / np.sqrt(3), -1 / np.sqrt(3)],
                               rtol=1e-6)


def test_numeric_text_with_missing_tokens():
    table = table_of({"score": ["1", "NA", "3", "", "null"]}, list("abcde"))
    np.testing.assert_allclose(column(encode_features(table, list("abcde")), "score"), [-1, 0, 1, 0, 0], rtol=1e-6)


def test_infinite_value_names_the_file_row_and_column(tmp_path):
    path = tmp_path / "users.csv"
    path.write_text("user_id,age,income\nu1,3,10\nu2,4,inf\n")
    table = read_feature_table(str(path), key_col="user_id")
    with pytest.raises(InputDataError) as info:
        encode_features(table, ["u1", "u2"])
    assert (info.value.source, info.value.row, info.value.column) == (str(path), 3, "income")


def test_without_attrs_rows_are_1_based_positions():
    table = table_of({"x": [1.0, -np.inf]}, ["a", "b"])
    with pytest.raises(InputDataError) as info:
        encode_features(table, ["a"], source="mine.csv")
    assert (info.value.source, info.value.row, info.value.column) == ("mine.csv", 2, "x")


# --------------------------------------------------------------------------- categorical


def test_one_hot_with_sorted_names():
    table = table_of({"city": ["Rome", "Paris", " Rome ", "Oslo"]}, list("abcd"))
    encoded = encode_features(table, list("abcd"))
    assert encoded.names == ("city=Oslo", "city=Paris", "city=Rome")
    np.testing.assert_array_equal(dense(encoded), [[0, 0, 1], [0, 1, 0], [0, 0, 1], [1, 0, 0]])


def test_a_text_column_keeps_none_as_a_category():
    """An occupation "none" is a value; in a numeric column the same word is missing."""
    table = table_of({"occupation": ["none", "writer", "None", "NA"], "age": ["30", "none", "None", "41"]},
                     list("abcd"))
    encoded = encode_features(table, list("abcd"))
    assert encoded.names == ("occupation=None", "occupation=none", "occupation=writer", "age")
    dense = encoded.matrix.toarray()
    assert dense[:, :3].tolist() == [[0, 1, 0], [0, 0, 1], [1, 0, 0], [0, 0, 0]]
    assert dense[1:3, 3].tolist() == [0, 0]  # the missing ages: a zero, the column's mean after scaling


def test_missing_categorical_value_is_an_all_zero_row():
    table = table_of({"city": ["Rome", None, "", "N/A", "Oslo"]}, list("abcde"))
    encoded = encode_features(table, list("abcde"))
    assert encoded.names == ("city=Oslo", "city=Rome")
    np.testing.assert_array_equal(dense(encoded).sum(axis=1), [1, 0, 0, 0, 1])


def test_multi_valued_genres_each_token_set_to_one():
    table = table_of({"genres": ["Action|Comedy", "Drama", "Comedy| Action |Action", "||", None]}, list("abcde"))
    encoded = encode_features(table, list("abcde"))
    assert encoded.names == ("genres=Action", "genres=Comedy", "genres=Drama")
    np.testing.assert_array_equal(dense(encoded), [[1, 1, 0], [0, 0, 1], [1, 1, 0], [0, 0, 0], [0, 0, 0]])


def test_custom_multi_separator():
    table = table_of({"tags": ["a;b", "c"]}, ["x", "y"])
    encoded = encode_features(table, ["x", "y"], multi_sep=";")
    assert encoded.names == ("tags=a", "tags=b", "tags=c")


def test_empty_multi_separator_is_a_config_error():
    with pytest.raises(ConfigError):
        encode_features(table_of({"tags": ["a"]}, ["x"]), ["x"], multi_sep="")


def test_pipe_is_not_special_with_another_multi_separator():
    table = table_of({"tags": ["a|b", "c"]}, ["x", "y"])
    assert encode_features(table, ["x", "y"], multi_sep=";").names == ("tags=a|b", "tags=c")


def test_categorical_dtype_and_mixed_object_columns():
    table = table_of({"cat": pd.Categorical(["x", "y", "x"]), "mix": [1, "one", None]}, ["a", "b", "c"])
    encoded = encode_features(table, ["a", "b", "c"])
    assert encoded.names == ("cat=x", "cat=y", "mix=1", "mix=one")


def test_colliding_feature_names_are_an_error():
    table = table_of({"a": ["b", "c"], "a=b": [1.0, 2.0]}, ["x", "y"])
    with pytest.raises(InputDataError, match="'a=b'"):
        encode_features(table, ["x", "y"])


def test_unsupported_column_type():
    table = table_of({"when": pd.to_datetime(["2024-01-01", "2024-01-02"])}, ["x", "y"])
    with pytest.raises(InputDataError) as info:
        encode_features(table, ["x", "y"])
    assert info.value.column == "when"


# --------------------------------------------------------------------------- alignment with ids


def test_rows_follow_ids_with_unknown_and_missing_ids(items_csv):
    table = read_feature_table(items_csv, key_col="item_id")
    encoded = encode_features(table, ["i2", "i1", "zz", "i3"])
    assert encoded.names == (
        "year", "genres=Action", "genres=Comedy", "genres=Drama", "city=Paris", "city=Rome", "flag",
    )
    assert encoded.matrix.shape == (4, 7)
    assert encoded.unknown_ids == 1 and encoded.unknown_examples == ("i9",)
    assert encoded.missing_ids == 1
    values = dense(encoded)
    np.testing.assert_array_equal(values[2], np.zeros(7))
    np.testing.assert_array_equal(values[:, 1:6], [[0, 0, 1, 0, 0], [1, 1, 0, 1, 0], [0, 0, 0, 0, 0],
                                                   [0, 0, 0, 0, 1]])
    # year over the table's rows (1990, 2000, 2010; i9 missing): i2 is the mean.
    np.testing.assert_allclose(values[:, 0], [0.0, -np.sqrt(1.5), 0.0, np.sqrt(1.5)], rtol=1e-6)
    np.testing.assert_allclose(values[:, 6], [-1.0, 1.0, 0.0, 1.0], rtol=1e-6)


def test_unknown_examples_are_capped_at_five_in_table_order():
    keys = [f"k{i}" for i in range(9)]
    encoded = encode_features(table_of({"x": list(range(9))}, keys), ["k4"])
    assert encoded.unknown_ids == 8
    assert encoded.unknown_examples == ("k0", "k1", "k2", "k3", "k5")


def test_repeated_ids_get_the_same_row():
    table = table_of({"c": ["p", "q"]}, ["a", "b"])
    np.testing.assert_array_equal(dense(encode_features(table, ["b", "a", "b"])), [[0, 1], [1, 0], [0, 1]])


def test_no_ids_and_no_columns():
    table = table_of({"c": ["p"]}, ["a"])
    assert encode_features(table, []).matrix.shape == (0, 1)
    only_keys = encode_features(pd.DataFrame(index=pd.Index(["a", "b"])), ["b", "c"])
    assert only_keys.matrix.shape == (2, 0) and only_keys.names == ()
    assert (only_keys.unknown_ids, only_keys.missing_ids) == (1, 1)


def test_integer_keys_match_string_ids():
    table = pd.DataFrame({"c": ["p", "q"]}, index=pd.Index([7, 10]))
    np.testing.assert_array_equal(dense(encode_features(table, ["10", "7"])), [[0, 1], [1, 0]])


def test_duplicate_keys_are_an_error():
    table = table_of({"c": ["p", "q", "r"]}, ["a", "b", "a"])
    with pytest.raises(InputDataError, match="duplicate key 'a' in rows 1 and 3"):
        encode_features(table, ["a"])


def test_encoding_is_deterministic_whatever_the_table_order():
    rng = np.random.default_rng(3)
    keys = [f"u{i}" for i in range(50)]
    table = table_of({
        "age": rng.integers(18, 80, 50).astype(float),
        "city": rng.choice(["Rome", "Oslo", "Lima"], 50),
        "tags": ["|".join(rng.choice(list("abcde"), 2)) for _ in range(50)],
    }, keys)
    ids = keys[::-1]
    first = encode_features(table, ids)
    again = encode_features(table, ids)
    shuffled = encode_features(table.iloc[rng.permutation(50)], ids)
    for other in (again, shuffled):
        assert other.names == first.names
        np.testing.assert_allclose(dense(other), dense(first), rtol=1e-6, atol=1e-6)


def test_large_table_stays_aligned():
    n = 20_000
    rng = np.random.default_rng(0)
    keys = np.array([f"k{i}" for i in range(n)], dtype=object)
    table = table_of({
        "x": rng.normal(size=n),
        "c": rng.choice([f"v{i}" for i in range(30)], n),
        "m": ["|".join(rng.choice(list("ABCDEF"), 2, replace=False)) for _ in range(n)],
    }, list(keys))
    order = rng.permutation(n)
    encoded = encode_features(table, list(keys[order]))
    assert encoded.matrix.shape == (n, 1 + 30 + 6)
    # Each row holds exactly one city and two tags; the numeric column matches the table.
    values = dense(encoded)
    np.testing.assert_array_equal(values[:, 1:31].sum(axis=1), np.ones(n))
    np.testing.assert_array_equal(values[:, 31:].sum(axis=1), np.full(n, 2.0))
    x = table["x"].to_numpy()
    np.testing.assert_allclose(values[:, 0], ((x - x.mean()) / x.std())[order], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- properties


CELLS = st.sampled_from(["", "1", "2.5", "-3", "a", "b", "a|b", " c ", "NA", "inf", "x|", "007"])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cells=st.lists(st.lists(CELLS, min_size=2, max_size=2), min_size=1, max_size=10),
    ids=st.lists(st.sampled_from([f"k{i}" for i in range(12)]), max_size=12),
)
def test_random_tables_encode_or_raise_topx_errors(cells, ids):
    keys = [f"k{i}" for i in range(len(cells))]
    table = table_of({"p": [row[0] for row in cells], "q": [row[1] for row in cells]}, keys)
    try:
        encoded = encode_features(table, ids)
    except TopxError:
        return
    assert encoded.matrix.shape == (len(ids), len(encoded.names))
    assert len(set(encoded.names)) == len(encoded.names)
    assert np.isfinite(encoded.matrix.data).all()
    assert encoded.missing_ids == sum(1 for i in ids if i not in keys)
    assert encoded.unknown_ids == sum(1 for k in keys if k not in ids)
