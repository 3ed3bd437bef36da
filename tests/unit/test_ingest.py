"""Reading interaction files and feature tables: formats, ids as text, and errors that name the
file, row and column."""

from __future__ import annotations

import gzip
from pathlib import Path

import boto3
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from moto import mock_aws

from topx import io as topx_io
from topx.errors import ConfigError, InputDataError, TopxError
from topx.ingest import read_feature_table, read_interactions, sniff_separator
from topx.io import read_bytes

# --------------------------------------------------------------------------- helpers


def write(tmp_path: Path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return str(path)


def write_parquet(tmp_path: Path, name: str, columns: dict[str, pa.Array]) -> str:
    path = tmp_path / name
    pq.write_table(pa.table(columns), path)
    return str(path)


def rows(frame: pd.DataFrame) -> list[tuple[str, str, float]]:
    return [(u, i, float(r)) for u, i, r in frame.itertuples(index=False)]


def error_of(call, *args, **kwargs) -> InputDataError:
    with pytest.raises(InputDataError) as info:
        call(*args, **kwargs)
    return info.value


SIMPLE = "user_id,item_id,rating\nu1,i1,5\nu2,i2,3.5\n"


# --------------------------------------------------------------------------- formats and separators


def test_csv_gives_exact_columns_types_values_and_source(tmp_path):
    source = write(tmp_path, "r.csv", SIMPLE)
    frame = read_interactions(source)
    assert list(frame.columns) == ["user_id", "item_id", "rating"]
    assert frame["user_id"].dtype == "str" and frame["item_id"].dtype == "str"
    assert frame["rating"].dtype == np.float32
    assert rows(frame) == [("u1", "i1", 5.0), ("u2", "i2", 3.5)]
    assert frame.attrs["source"] == source
    assert frame.attrs["row_offset"] == 2


@pytest.mark.parametrize("sep", [",", "\t", "|", ";"])
@pytest.mark.parametrize("given_sep", [True, False], ids=["given", "sniffed"])
def test_separators_sniffed_or_given(tmp_path, sep, given_sep):
    text = f"user_id{sep}item_id{sep}rating\nu1{sep}i1{sep}4\nu2{sep}i9{sep}2.5\n"
    source = write(tmp_path, "r.txt", text)
    frame = read_interactions(source, sep=sep if given_sep else None)
    assert rows(frame) == [("u1", "i1", 4.0), ("u2", "i9", 2.5)]


def test_sniffing_prefers_the_separator_that_splits_every_line_alike():
    # Commas inside values, tabs between them: only the tab splits every line into 3 fields.
    assert sniff_separator("u\tgenres\tr\n1\tAction, Drama\t5\n2\tComedy\t4\n") == "\t"
    # Pipes inside a column of a comma file: the header has no pipe, so comma wins.
    assert sniff_separator("user_id,genres,rating\n1,A|B,5\n2,C|D,4\n") == ","
    assert sniff_separator("u1 i1 5\nu2 i2 4\n") == " "
    assert sniff_separator("only\none\ncolumn\n") == ","


def test_tab_given_as_backslash_t_text(tmp_path):
    source = write(tmp_path, "r.tsv", "user_id\titem_id\trating\nu1\ti1\t1\n")
    assert rows(read_interactions(source, sep="\\t")) == [("u1", "i1", 1.0)]


@pytest.mark.parametrize("sep", ["::", "", '"', "\n"])
def test_separator_must_be_one_plain_character(tmp_path, sep):
    source = write(tmp_path, "r.csv", SIMPLE)
    with pytest.raises(ConfigError, match="sep"):
        read_interactions(source, sep=sep)


def test_crlf_line_endings_and_utf8_bom(tmp_path):
    source = write(tmp_path, "r.csv", b"\xef\xbb\xbfuser_id,item_id,rating\r\nu1,i1,2\r\nu2,i2,3\r\n")
    assert rows(read_interactions(source)) == [("u1", "i1", 2.0), ("u2", "i2", 3.0)]


def test_headerless_file_uses_positions_0_1_2_by_default(tmp_path):
    source = write(tmp_path, "r.csv", "u1,i1,5\nu2,i2,4\n")
    frame = read_interactions(source, header=False)
    assert rows(frame) == [("u1", "i1", 5.0), ("u2", "i2", 4.0)]
    assert frame.attrs["row_offset"] == 1


@pytest.mark.parametrize("cols", [(2, 0, 1), ("2", "0", "1")], ids=["ints", "digit-strings"])
def test_headerless_file_with_positions_given(tmp_path, cols):
    source = write(tmp_path, "r.tsv", "i1\t4\tu1\ni2\t3\tu2\n")
    user_col, item_col, rating_col = cols
    frame = read_interactions(source, header=False, user_col=user_col, item_col=item_col, rating_col=rating_col)
    assert rows(frame) == [("u1", "i1", 4.0), ("u2", "i2", 3.0)]


def test_other_column_names_and_extra_columns(tmp_path):
    source = write(tmp_path, "r.csv", "ts,movie,who,stars\n1,m1,alice,4\n2,m2,bob,1\n")
    frame = read_interactions(source, user_col="who", item_col="movie", rating_col="stars")
    assert rows(frame) == [("alice", "m1", 4.0), ("bob", "m2", 1.0)]


def test_integer_positions_also_work_with_a_header(tmp_path):
    source = write(tmp_path, "r.csv", "a,b,c\nu1,i1,3\n")
    assert rows(read_interactions(source, user_col=0, item_col=1, rating_col=2)) == [("u1", "i1", 3.0)]


def test_same_column_for_user_and_item_is_a_config_error(tmp_path):
    source = write(tmp_path, "r.csv", SIMPLE)
    with pytest.raises(ConfigError):
        read_interactions(source, item_col="user_id")


# --------------------------------------------------------------------------- ids are text


def test_ids_stay_text_exactly(tmp_path):
    text = (
        "user_id,item_id,rating\n"
        "007,1,1\n"
        '"a,b",é,2\n'
        '"say ""hi""", 0042 ,3\n'
        "1e3,NaN,4\n"
    )
    frame = read_interactions(write(tmp_path, "r.csv", text))
    assert frame["user_id"].tolist() == ["007", "a,b", 'say "hi"', "1e3"]
    assert frame["item_id"].tolist() == ["1", "é", "0042", "NaN"]


def test_duplicate_pairs_are_kept_for_the_caller_to_aggregate(tmp_path):
    source = write(tmp_path, "r.csv", "user_id,item_id,rating\nu,i,1\nu,i,3\n")
    assert rows(read_interactions(source)) == [("u", "i", 1.0), ("u", "i", 3.0)]


def test_quoted_value_with_newline_counts_as_one_row(tmp_path):
    text = 'user_id,item_id,rating\n"multi\nline",i1,1\nu2,i2,oops\n'
    err = error_of(read_interactions, write(tmp_path, "r.csv", text))
    assert err.row == 3 and err.column == "rating"


@pytest.mark.parametrize("bad_id", ["", "   ", '""'])
def test_empty_id_names_row_and_column(tmp_path, bad_id):
    source = write(tmp_path, "r.csv", f"user_id,item_id,rating\nu1,i1,1\nu2,{bad_id},2\n")
    err = error_of(read_interactions, source)
    assert (err.source, err.row, err.column) == (source, 3, "item_id")
    assert "item id is empty" in str(err)
    assert f"{source}, row 3, column 'item_id'" in str(err)


# --------------------------------------------------------------------------- ratings


def test_float_int_and_exponent_ratings(tmp_path):
    source = write(tmp_path, "r.csv", "user_id,item_id,rating\na,x,1\nb,y,2.25\nc,z,-1e2\nd,w, 3 \ne,v,1e7\n")
    assert read_interactions(source)["rating"].tolist() == [1.0, 2.25, -100.0, 3.0, 1e7]


@pytest.mark.parametrize("value", ["abc", "", "nan", "NaN", "inf", "-inf", "1e400", "4,5", "0x10"])
def test_bad_rating_names_row_and_column(tmp_path, value):
    quoted = f'"{value}"' if "," in value else value
    source = write(tmp_path, "r.csv", f"user_id,item_id,rating\nu1,i1,1\nu2,i2,{quoted}\nu3,i3,2\n")
    err = error_of(read_interactions, source)
    assert (err.row, err.column) == (3, "rating")
    assert "row 3" in str(err) and "'rating'" in str(err) and source in str(err)


def test_rating_beyond_float32_is_an_error(tmp_path):
    source = write(tmp_path, "r.csv", "user_id,item_id,rating\nu1,i1,1e39\n")
    err = error_of(read_interactions, source)
    assert err.row == 2 and "too large" in str(err)


def test_bad_rating_in_headerless_file_counts_from_row_1(tmp_path):
    source = write(tmp_path, "r.csv", "u1,i1,1\nu2,i2,x\n")
    err = error_of(read_interactions, source, header=False)
    assert (err.row, err.column) == (2, "2")


def test_error_row_is_right_deep_in_a_large_file(tmp_path):
    n = 200_000
    body = "".join(f"u{k},i{k % 97},{k % 5 + 1}\n" for k in range(n))
    source = write(tmp_path, "big.csv", "user_id,item_id,rating\n" + body + "u,i,bad\n")
    err = error_of(read_interactions, source)
    assert err.row == n + 2
    good = read_interactions(write(tmp_path, "good.csv", "user_id,item_id,rating\n" + body))
    assert len(good) == n and good["user_id"].iloc[-1] == f"u{n - 1}"


def test_explicit_mode_needs_the_rating_column(tmp_path):
    source = write(tmp_path, "r.csv", "user_id,item_id\nu1,i1\n")
    err = error_of(read_interactions, source)
    assert err.column == "rating"
    assert "columns found: 'user_id', 'item_id'" in str(err)
    with pytest.raises(ConfigError):
        read_interactions(source, rating_col=None)


# --------------------------------------------------------------------------- implicit mode


def test_implicit_with_strength_column(tmp_path):
    source = write(tmp_path, "r.csv", "user_id,item_id,plays\nu1,i1,3\nu1,i2,0\n")
    frame = read_interactions(source, rating_col="plays", implicit=True)
    assert rows(frame) == [("u1", "i1", 3.0), ("u1", "i2", 0.0)]


@pytest.mark.parametrize("text,kwargs", [
    ("user_id,item_id\nu1,i1\nu2,i2\n", {}),
    ("user_id,item_id,rating\nu1,i1,9\nu2,i2,9\n", {"rating_col": None}),
    ("u1,i1\nu2,i2\n", {"header": False}),
], ids=["no-rating-column", "rating-col-none", "headerless-two-columns"])
def test_implicit_without_strength_gives_one(tmp_path, text, kwargs):
    frame = read_interactions(write(tmp_path, "r.csv", text), implicit=True, **kwargs)
    assert rows(frame) == [("u1", "i1", 1.0), ("u2", "i2", 1.0)]
    assert frame["rating"].dtype == np.float32


def test_implicit_negative_strength_is_an_error(tmp_path):
    source = write(tmp_path, "r.csv", "user_id,item_id,rating\nu1,i1,1\nu1,i2,-2\n")
    err = error_of(read_interactions, source, implicit=True)
    assert (err.row, err.column) == (3, "rating")
    assert "negative" in str(err)


def test_implicit_with_a_named_strength_column_that_is_absent_is_an_error(tmp_path):
    source = write(tmp_path, "r.csv", "user_id,item_id,rating\nu1,i1,1\n")
    err = error_of(read_interactions, source, rating_col="plays", implicit=True)
    assert err.column == "plays" and "'user_id', 'item_id', 'rating'" in str(err)


# --------------------------------------------------------------------------- structural errors


def test_missing_column_lists_the_columns_found(tmp_path):
    source = write(tmp_path, "r.csv", "user,movie,rating\nu1,i1,1\n")
    err = error_of(read_interactions, source)
    assert err.column == "user_id"
    assert "columns found: 'user', 'movie', 'rating'" in str(err)


def test_missing_position_in_headerless_file(tmp_path):
    source = write(tmp_path, "r.csv", "u1,i1\n")
    err = error_of(read_interactions, source, header=False)
    assert err.column == "2" and "2 column(s)" in str(err)


def test_empty_file(tmp_path):
    err = error_of(read_interactions, write(tmp_path, "r.csv", b""))
    assert "file is empty" in str(err)
    assert "file is empty" in str(error_of(read_interactions, write(tmp_path, "n.csv", "\n\r\n\n")))


def test_header_without_rows(tmp_path):
    for text in ("user_id,item_id,rating\n", "user_id,item_id,rating"):
        err = error_of(read_interactions, write(tmp_path, "r.csv", text))
        assert "has a header but no data rows" in str(err)


@pytest.mark.parametrize("bad_row", ["u2,i2", "u2,i2,3,extra"], ids=["too-few", "too-many"])
def test_ragged_row_is_named(tmp_path, bad_row):
    source = write(tmp_path, "r.csv", f"user_id,item_id,rating\nu1,i1,1\n{bad_row}\nu3,i3,3\n")
    err = error_of(read_interactions, source)
    assert err.row == 3
    assert "row 3" in str(err) and "field" in str(err)


def test_unbalanced_quote_is_reported(tmp_path):
    source = write(tmp_path, "r.csv", 'user_id,item_id,rating\nu1,"i1,1\nu2,i2,2\n')
    err = error_of(read_interactions, source)
    assert err.row == 2 and "quote" in str(err)


def test_blank_line_inside_the_data_keeps_row_numbers_true(tmp_path):
    source = write(tmp_path, "r.csv", "user_id,item_id,rating\nu1,i1,1\n\nu2,i2,2\n")
    err = error_of(read_interactions, source)
    assert err.row == 3


def test_trailing_blank_lines_are_ignored(tmp_path):
    source = write(tmp_path, "r.csv", SIMPLE + "\n\n")
    assert len(read_interactions(source)) == 2


def test_invalid_utf8_names_the_line(tmp_path):
    source = write(tmp_path, "r.csv", b"user_id,item_id,rating\nu1,i1,1\nu2,caf\xe9,2\n")
    err = error_of(read_interactions, source)
    assert err.row == 3 and "not valid UTF-8" in str(err)


def test_duplicate_header_names_are_an_error(tmp_path):
    source = write(tmp_path, "r.csv", "user_id,item_id,user_id,rating\nu,i,v,1\n")
    err = error_of(read_interactions, source)
    assert (err.row, err.column) == (1, "user_id") and "twice" in str(err)


def test_unnamed_header_columns_get_placeholders(tmp_path):
    source = write(tmp_path, "r.csv", "user_id,item_id,rating,,\nu,i,1,,\n")
    assert rows(read_interactions(source)) == [("u", "i", 1.0)]
    table = read_feature_table(source, key_col="user_id")
    assert list(table.columns) == ["item_id", "rating", "unnamed_3", "unnamed_4"]


def test_missing_file(tmp_path):
    source = str(tmp_path / "nope.csv")
    err = error_of(read_interactions, source)
    assert err.source == source and "not found" in str(err)


def test_directory_is_not_a_file(tmp_path):
    assert "directory" in str(error_of(read_bytes, str(tmp_path)))


# --------------------------------------------------------------------------- Parquet


def test_parquet_with_integer_and_string_ids(tmp_path):
    source = write_parquet(tmp_path, "r.parquet", {
        "user_id": pa.array([7, 10, 123456789012], pa.int64()),
        "item_id": pa.array(["007", " x ", "é"]),
        "rating": pa.array([1, 2, 3], pa.int32()),
    })
    frame = read_interactions(source)
    assert rows(frame) == [("7", "007", 1.0), ("10", "x", 2.0), ("123456789012", "é", 3.0)]
    assert frame["user_id"].dtype == "str"


def test_parquet_detected_by_magic_without_extension(tmp_path):
    source = write_parquet(tmp_path, "data.bin", {
        "user_id": pa.array(["u"]), "item_id": pa.array(["i"]), "rating": pa.array([2.5]),
    })
    assert rows(read_interactions(source)) == [("u", "i", 2.5)]


def test_parquet_dictionary_ids_and_string_ratings(tmp_path):
    source = write_parquet(tmp_path, "r.parquet", {
        "user_id": pa.array(["a", "b", "a"]).dictionary_encode(),
        "item_id": pa.array([1, 2, 1]).dictionary_encode(),
        "rating": pa.array(["1.5", "2", "3"]),
    })
    assert rows(read_interactions(source)) == [("a", "1", 1.5), ("b", "2", 2.0), ("a", "1", 3.0)]


def test_parquet_errors_use_1_based_data_rows(tmp_path):
    source = write_parquet(tmp_path, "r.parquet", {
        "user_id": pa.array(["u1", "u2", "u3"]),
        "item_id": pa.array(["i1", "i2", "i3"]),
        "rating": pa.array([1.0, None, float("inf")]),
    })
    err = error_of(read_interactions, source)
    assert (err.row, err.column) == (2, "rating") and "empty" in str(err)


def test_parquet_float_id_column_is_refused(tmp_path):
    source = write_parquet(tmp_path, "r.parquet", {
        "user_id": pa.array([1.0]), "item_id": pa.array(["i"]), "rating": pa.array([1.0]),
    })
    err = error_of(read_interactions, source)
    assert err.column == "user_id" and "double" in str(err)


def test_parquet_null_id_is_an_empty_id(tmp_path):
    source = write_parquet(tmp_path, "r.parquet", {
        "user_id": pa.array(["u1", None]), "item_id": pa.array(["i", "i"]), "rating": pa.array([1.0, 2.0]),
    })
    err = error_of(read_interactions, source)
    assert (err.row, err.column) == (2, "user_id")


def test_fake_parquet_is_a_clear_error(tmp_path):
    source = write(tmp_path, "r.parquet", SIMPLE)
    err = error_of(read_interactions, source)
    assert "not a Parquet file" in str(err) and err.source == source


def test_truncated_parquet_is_a_clear_error(tmp_path):
    good = write_parquet(tmp_path, "g.parquet", {
        "user_id": pa.array(["u"]), "item_id": pa.array(["i"]), "rating": pa.array([1.0]),
    })
    data = Path(good).read_bytes()
    source = write(tmp_path, "t.parquet", data[: len(data) // 2] + b"PAR1")
    assert "Parquet" in str(error_of(read_interactions, source))


def test_empty_parquet_has_no_data_rows(tmp_path):
    source = write_parquet(tmp_path, "r.parquet", {
        "user_id": pa.array([], pa.string()), "item_id": pa.array([], pa.string()),
        "rating": pa.array([], pa.float64()),
    })
    assert "no data rows" in str(error_of(read_interactions, source))


# --------------------------------------------------------------------------- gzip


def test_gzip_by_extension_and_by_magic(tmp_path):
    packed = gzip.compress(SIMPLE.encode())
    for name in ("r.csv.gz", "r.csv"):
        frame = read_interactions(write(tmp_path, name, packed))
        assert rows(frame) == [("u1", "i1", 5.0), ("u2", "i2", 3.5)]


def test_truncated_gzip_names_the_file(tmp_path):
    packed = gzip.compress((SIMPLE * 50).encode())
    source = write(tmp_path, "r.csv.gz", packed[: len(packed) - 12])
    err = error_of(read_interactions, source)
    assert err.source == source and "gzip stream is truncated or corrupt" in str(err)


def test_gz_name_without_gzip_data(tmp_path):
    source = write(tmp_path, "r.csv.gz", SIMPLE)
    assert "not gzip" in str(error_of(read_bytes, source))


def test_gzipped_parquet(tmp_path):
    plain = write_parquet(tmp_path, "r.parquet", {
        "user_id": pa.array(["u"]), "item_id": pa.array(["i"]), "rating": pa.array([4.0]),
    })
    source = write(tmp_path, "r.parquet.gz", gzip.compress(Path(plain).read_bytes()))
    assert rows(read_interactions(source)) == [("u", "i", 4.0)]


# --------------------------------------------------------------------------- S3


@pytest.fixture
def s3(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("TOPX_ENDPOINT_URL", raising=False)
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="bkt")
        yield client


def test_s3_object_with_injected_client(s3):
    s3.put_object(Bucket="bkt", Key="incoming/r.csv", Body=SIMPLE.encode())
    frame = read_interactions("s3://bkt/incoming/r.csv", s3_client=s3)
    assert rows(frame) == [("u1", "i1", 5.0), ("u2", "i2", 3.5)]
    assert frame.attrs["source"] == "s3://bkt/incoming/r.csv"


def test_s3_client_is_created_lazily_when_not_given(s3, monkeypatch):
    s3.put_object(Bucket="bkt", Key="r.csv.gz", Body=gzip.compress(SIMPLE.encode()))
    created: list[tuple] = []
    real_client = boto3.client

    def counting_client(*args, **kwargs):
        created.append((args, kwargs))
        return real_client(*args, **kwargs)

    monkeypatch.setattr(boto3, "client", counting_client)
    read_bytes(__file__)  # a local read creates no client
    assert created == []
    assert len(read_interactions("s3://bkt/r.csv.gz")) == 2
    assert created == [(("s3",), {"endpoint_url": None})]


def test_s3_missing_object_and_bucket(s3):
    err = error_of(read_interactions, "s3://bkt/nope.csv", s3_client=s3)
    assert err.source == "s3://bkt/nope.csv" and "not found" in str(err)
    err = error_of(read_bytes, "s3://no-such-bucket/x.csv", s3_client=s3)
    assert "bucket not found" in str(err)


def test_s3_uri_without_key(s3):
    assert "s3://bucket/key" in str(error_of(read_bytes, "s3://bkt", s3_client=s3))


def test_s3_transient_errors_are_not_turned_into_input_errors():
    from botocore.exceptions import ClientError

    class Throttled:
        def get_object(self, **_: object) -> None:
            raise ClientError({"Error": {"Code": "SlowDown", "Message": "slow"}}, "GetObject")

    with pytest.raises(ClientError):
        topx_io.read_bytes("s3://b/k", s3_client=Throttled())


# --------------------------------------------------------------------------- feature tables


def test_feature_table_types_index_and_attrs(tmp_path):
    text = (
        "item_id,year,score,genres,city,flag\n"
        "007,1990, 1.5 ,Action|Comedy, Paris ,1\n"
        "i2,2000,,Drama,NA,0\n"
        "i3,2010,2,Comedy,null,1\n"
    )
    source = write(tmp_path, "items.csv", text)
    table = read_feature_table(source, key_col="item_id")
    assert table.index.tolist() == ["007", "i2", "i3"] and table.index.name == "item_id"
    assert list(table.columns) == ["year", "score", "genres", "city", "flag"]
    assert table["year"].dtype == np.int64 and table["year"].tolist() == [1990, 2000, 2010]
    assert table["score"].dtype == np.float64
    assert table["score"].tolist()[0] == 1.5 and np.isnan(table["score"].tolist()[1])
    assert table["genres"].tolist() == ["Action|Comedy", "Drama", "Comedy"]
    assert table["city"].iloc[0] == "Paris" and table["city"].iloc[1:].isna().all()
    assert table.attrs == {"source": source, "row_offset": 2}


def test_feature_table_duplicate_key_names_both_rows(tmp_path):
    body = "".join(f"u{k},{k}\n" for k in range(1, 8))
    source = write(tmp_path, "users.csv", "user_id,age\nu0,1\n" + body.replace("u6,", "u7,", 1))
    err = error_of(read_feature_table, source, key_col="user_id")
    assert "duplicate key 'u7' in rows 8 and 9" in str(err)
    assert err.column == "user_id"


def test_feature_table_empty_and_missing_key(tmp_path):
    source = write(tmp_path, "u.csv", "user_id,age\nu1,3\n ,4\n")
    err = error_of(read_feature_table, source, key_col="user_id")
    assert (err.row, err.column) == (3, "user_id") and "empty" in str(err)
    err = error_of(read_feature_table, source, key_col="uid")
    assert "columns found: 'user_id', 'age'" in str(err)


def test_feature_table_with_only_the_key(tmp_path):
    table = read_feature_table(write(tmp_path, "u.csv", "user_id\nu1\nu2\n"), key_col="user_id")
    assert table.index.tolist() == ["u1", "u2"] and table.shape == (2, 0)


def test_headerless_feature_table(tmp_path):
    table = read_feature_table(write(tmp_path, "u.tsv", "u1\t30\tx\nu2\t40\ty\n"), key_col=0, header=False)
    assert table.index.tolist() == ["u1", "u2"] and table.index.name == 0
    assert list(table.columns) == ["1", "2"] and table["1"].tolist() == [30, 40]
    assert table.attrs["row_offset"] == 1


def test_parquet_feature_table(tmp_path):
    source = write_parquet(tmp_path, "i.parquet", {
        "item_id": pa.array([1, 2]), "price": pa.array([9.5, 3.0]), "brand": pa.array(["a", None]),
    })
    table = read_feature_table(source, key_col="item_id")
    assert table.index.tolist() == ["1", "2"]
    assert table["price"].tolist() == [9.5, 3.0] and table["brand"].iloc[0] == "a"
    assert table.attrs["row_offset"] == 1


# --------------------------------------------------------------------------- properties


FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(
    data=st.binary(max_size=300),
    # Prefixes that steer the reader into its gzip, Parquet and BOM paths.
    wrap=st.sampled_from([(b"", b""), (b"PAR1", b"PAR1"), (b"\x1f\x8b\x08\x00", b""), (b"\xef\xbb\xbf", b"")]),
    implicit=st.booleans(),
    header=st.booleans(),
)
def test_random_bytes_raise_only_topx_errors(tmp_path, data, wrap, implicit, header):
    source = write(tmp_path, "fuzz.csv", wrap[0] + data + wrap[1])
    try:
        frame = read_interactions(source, implicit=implicit, header=header)
    except TopxError:
        return
    assert list(frame.columns) == ["user_id", "item_id", "rating"]
    assert np.isfinite(frame["rating"].to_numpy()).all()


CSV_CHARS = st.sampled_from(list("ab01.-e,;|\t \"\n\r") + ["é", "inf", "nan", "\x00"])


@FUZZ
@given(text=st.lists(CSV_CHARS, max_size=80).map("".join), implicit=st.booleans(), header=st.booleans())
def test_random_delimited_text_raises_only_topx_errors(tmp_path, text, implicit, header):
    source = write(tmp_path, "fuzz.csv", text)
    try:
        frame = read_interactions(source, implicit=implicit, header=header)
    except TopxError:
        return
    assert (frame["user_id"].str.strip() == frame["user_id"]).all()
    assert (frame["user_id"] != "").all() and (frame["item_id"] != "").all()


@FUZZ
@given(
    cells=st.lists(st.lists(st.sampled_from(["u1", "u2", "007", "", "1.5", "x|y", "NA", "inf", '"q"']),
                            min_size=3, max_size=3), min_size=1, max_size=8),
)
def test_well_formed_tables_read_back_their_values(tmp_path, cells):
    text = "user_id,item_id,rating\n" + "".join(",".join(row) + "\n" for row in cells)
    source = write(tmp_path, "t.csv", text)
    try:
        frame = read_interactions(source, sep=",")
    except InputDataError as err:
        assert err.row is not None and 2 <= err.row <= len(cells) + 1
        return
    expected_users = [row[0].strip('"') for row in cells]
    assert frame["user_id"].tolist() == expected_users


# --------------------------------------------------------------------------- time column


def write_times(tmp_path: Path, values: list[str]) -> Path:
    path = tmp_path / "timed.csv"
    rows = [f"u{i % 3},i{i},4,{value}" for i, value in enumerate(values)]
    path.write_text("user,item,stars,when\n" + "\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize(("values", "expected"), [
    (["1700000000", "1700000100.9"], [1700000000, 1700000100]),                  # epoch seconds
    (["1700000000000", "1700000100999"], [1700000000, 1700000100]),              # epoch milliseconds
    (["2024-05-01", "2024-05-01T12:30:00Z"], [1714521600, 1714566600]),          # ISO-8601, UTC
    (["2024-05-01T12:30:00+02:00", "2024-05-01 12:30:00"], [1714559400, 1714566600]),  # offsets; naive is UTC
])
def test_a_time_column_reads_epoch_seconds_milliseconds_and_iso_8601(tmp_path, values, expected):
    frame = read_interactions(str(write_times(tmp_path, values)), user_col="user", item_col="item",
                              rating_col="stars", time_col="when")
    assert frame["time"].tolist() == expected and frame["time"].dtype == np.int64


def test_parquet_timestamps_and_dates_are_read_as_typed(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"user_id": ["a", "b"], "item_id": ["x", "y"],
                             "at": pa.array([1714521600_000, 1714566600_000], pa.timestamp("ms", tz="Europe/Paris")),
                             "day": pa.array([19844, 19845], pa.date32())}), path)
    assert read_interactions(str(path), rating_col=None, implicit=True, time_col="at")["time"].tolist() == [
        1714521600, 1714566600]
    assert read_interactions(str(path), rating_col=None, implicit=True, time_col="day")["time"].tolist() == [
        1714521600, 1714608000]


@pytest.mark.parametrize(("values", "message"), [
    (["2024-05-01", "yesterday"], "row 3, column 'when': time 'yesterday' is not ISO-8601"),
    (["2024-05-01", ""], "row 3, column 'when': time is empty"),
    (["1700000000000", "1700000000"], "row 3, column 'when': time 1.7e+09 looks like epoch seconds in a column of "
                                      "milliseconds"),
    (["1700000000", "1e30"], "row 3, column 'when': time 1e+30 is not epoch seconds or milliseconds"),
])
def test_a_bad_time_names_file_row_and_column(tmp_path, values, message):
    path = write_times(tmp_path, values)
    with pytest.raises(InputDataError) as caught:
        read_interactions(str(path), user_col="user", item_col="item", rating_col="stars", time_col="when")
    assert str(caught.value).startswith(str(path)) and message in str(caught.value)


def test_a_time_column_that_is_another_role_or_absent_is_refused(tmp_path):
    path = write_times(tmp_path, ["1700000000"])
    with pytest.raises(ConfigError, match="time_col names column 'stars'"):
        read_interactions(str(path), user_col="user", item_col="item", rating_col="stars", time_col="stars")
    with pytest.raises(InputDataError, match="time"):
        read_interactions(str(path), user_col="user", item_col="item", rating_col="stars", time_col="timestamp")


# --------------------------------------------------------------------------- a dataset is a folder or a prefix


def spark_export(root: Path) -> pd.DataFrame:
    """A Spark/Glue-style export: Parquet parts under dt=... partition folders, with the markers and
    checksums Spark writes beside them. Returns every row written."""
    rows = []
    for day, users in (("2024-05-01", ["u1", "u2"]), ("2024-05-02", ["u2", "u3"])):
        folder = root / f"dt={day}"
        folder.mkdir(parents=True)
        part = pd.DataFrame({"customer": users, "sku": ["a", "b"], "qty": [1, 3]})
        part.to_parquet(folder / "part-00000-1f2e.c000.snappy.parquet")
        (folder / ".part-00000-1f2e.c000.snappy.parquet.crc").write_bytes(b"crc")
        rows.append(part.assign(dt=day))
    (root / "_SUCCESS").write_bytes(b"")
    (root / "_committed_8812").write_text("{}")
    (root / "_started_8812").write_text("")
    (root / "_temporary" / "0").mkdir(parents=True)
    (root / "_temporary" / "0" / "part-9.parquet").write_bytes(b"half written")
    (root / "empty.csv").write_bytes(b"")
    return pd.concat(rows, ignore_index=True)


def test_a_folder_export_is_read_whole_with_its_partition_columns_and_without_its_markers(tmp_path):
    written = spark_export(tmp_path / "export")
    frame = read_interactions(str(tmp_path / "export"), user_col="customer", item_col="sku", rating_col="qty",
                              implicit=True, time_col="dt")
    assert frame[["user_id", "item_id", "rating"]].values.tolist() == written[["customer", "sku", "qty"]].values.tolist()
    # The partition folder is a column like any other: here, the time of each row.
    assert frame["time"].tolist() == [1714521600] * 2 + [1714608000] * 2
    assert len(frame.attrs["parts"]) == 2


def test_an_s3_prefix_is_read_whole(s3, tmp_path):
    written = spark_export(tmp_path / "export")
    for path in sorted(p for p in (tmp_path / "export").rglob("*") if p.is_file()):
        s3.upload_file(str(path), "bkt", "incoming/" + path.relative_to(tmp_path / "export").as_posix())
    s3.put_object(Bucket="bkt", Key="incoming/folder/", Body=b"")  # a console-made "folder"
    for uri in ("s3://bkt/incoming/", "s3://bkt/incoming"):
        frame = read_interactions(uri, user_col="customer", item_col="sku", rating_col="qty", implicit=True,
                                  s3_client=s3)
        assert frame["user_id"].tolist() == written["customer"].tolist()


def test_parts_that_disagree_or_cannot_be_read_are_named(tmp_path):
    root = tmp_path / "athena"
    root.mkdir()
    (root / "20240501_0001.csv").write_text("user_id,item_id,rating\nu1,a,4\n")
    (root / "20240501_0002.csv").write_text("user_id,item_id,stars\nu2,b,5\n")
    with pytest.raises(InputDataError) as caught:
        read_interactions(str(root))
    message = str(caught.value)
    assert message.startswith(str(root / "20240501_0002.csv")) and str(root / "20240501_0001.csv") in message
    (root / "20240501_0002.csv").write_text("user_id,item_id,rating\nu2,b,5\nu3,c,high\n")
    with pytest.raises(InputDataError, match=r"20240501_0002\.csv, row 3, column 'rating': rating 'high'"):
        read_interactions(str(root))
    for name in ("20240501_0001.csv", "20240501_0002.csv"):
        (root / name).unlink()
    (root / "_SUCCESS").write_bytes(b"")
    with pytest.raises(InputDataError, match="holds no data file"):
        read_interactions(str(root))


def parquet_part(path: Path, frame: pd.DataFrame) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)
    return path


def test_parts_whose_column_types_disagree_are_refused_naming_both(tmp_path):
    root = tmp_path / "glue"
    frame = pd.DataFrame({"user_id": ["u1", "u2"], "item_id": ["a", "b"], "qty": [1, 2], "note": ["x", None]})
    first = parquet_part(root / "part-00000.parquet", frame)
    # A later job wrote the ids as integers: the same names, another schema.
    second = parquet_part(root / "part-00001.parquet", frame.assign(user_id=[3, 4]))
    with pytest.raises(InputDataError) as caught:
        read_interactions(str(root), rating_col="qty", implicit=True)
    message = str(caught.value)
    assert message.startswith(f"{second}: its column 'user_id' is integer (int64) but in {first} it is text")
    assert message.endswith("the parts of one dataset must have the same schema")
    # Widths may differ (int32 beside int64), and a column null throughout one part agrees with any kind.
    narrow = pa.table({"user_id": ["u3", "u4"], "item_id": ["c", "d"], "qty": pa.array([3, 4], pa.int32()),
                       "note": pa.array([None, None], pa.null())})
    pq.write_table(narrow, second)
    assert read_interactions(str(root), rating_col="qty", implicit=True)["rating"].tolist() == [1, 2, 3, 4]
    # Text beside Parquet is another export altogether.
    (root / "part-00003.csv").write_text("user_id,item_id,qty,note\nu9,z,1,\n")
    with pytest.raises(InputDataError, match=r"part-00003\.csv: it is delimited text but .*part-00000\.parquet is "
                                             r"Parquet"):
        read_interactions(str(root), rating_col="qty", implicit=True)


def test_an_unreadable_part_among_many_is_named(tmp_path):
    root = tmp_path / "spark"
    for n in range(4):
        parquet_part(root / f"dt=2024-05-0{n + 1}" / "part-0.parquet",
                     pd.DataFrame({"user_id": [f"u{n}", f"v{n}"], "item_id": ["a", "b"], "rating": [1.0, 2.0]}))
    damaged = root / "dt=2024-05-03" / "part-0.parquet"
    damaged.write_bytes(damaged.read_bytes()[:-20])
    with pytest.raises(InputDataError, match=rf"^{damaged}: is named \.parquet but is not a Parquet file"):
        read_interactions(str(root))
    parquet_part(damaged, pd.DataFrame({"user_id": ["u2", "v2"], "item_id": ["a", "b"], "rating": [1.0, float("nan")]}))
    with pytest.raises(InputDataError, match=rf"^{damaged}, row 2, column 'rating': rating is empty"):
        read_interactions(str(root))


def test_a_dataset_over_max_bytes_is_refused_before_any_part_is_read(tmp_path, monkeypatch):
    root = tmp_path / "athena"
    root.mkdir()
    sizes = []
    for n in range(3):
        path = root / f"2024_{n}.csv"
        path.write_text("user_id,item_id,rating\n" + "".join(f"u{n}{i},i{i},4\n" for i in range(20)))
        sizes.append(path.stat().st_size)
    (root / "_SUCCESS").write_bytes(b"x" * 10_000)  # markers are not data and do not count
    read = []
    monkeypatch.setattr("topx.ingest.read_bytes", lambda source, **_: read.append(source))
    with pytest.raises(InputDataError, match=rf"^{root}: the dataset holds {sum(sizes):,} bytes in 3 part\(s\), over "
                                             rf"max_bytes {sum(sizes) - 1:,}; nothing was read"):
        read_interactions(str(root), max_bytes=sum(sizes) - 1)
    assert read == []
    monkeypatch.undo()
    assert len(read_interactions(str(root), max_bytes=sum(sizes))) == 60
    single = root / "2024_0.csv"
    with pytest.raises(InputDataError, match="over max_bytes 10"):
        read_interactions(str(single), max_bytes=10)


def test_an_s3_prefix_over_max_bytes_is_refused_from_its_listing(s3, tmp_path):
    body = b"user_id,item_id,rating\n" + b"".join(f"u{i},i{i % 7},4\n".encode() for i in range(50))
    for n in range(3):
        s3.put_object(Bucket="bkt", Key=f"incoming/export/part-{n}.csv", Body=body)
    with pytest.raises(InputDataError, match=rf"s3://bkt/incoming/export/: the dataset holds {3 * len(body):,} bytes"):
        read_interactions("s3://bkt/incoming/export/", max_bytes=2 * len(body), s3_client=s3)
    with pytest.raises(InputDataError, match=rf"s3://bkt/incoming/export/part-0.csv: the dataset holds {len(body):,} "):
        read_interactions("s3://bkt/incoming/export/part-0.csv", max_bytes=len(body) - 1, s3_client=s3)


@pytest.mark.parametrize("block", [1, 2, 3, 7, 64])
def test_the_utf8_check_a_block_at_a_time_finds_the_byte_a_whole_decode_finds(monkeypatch, block):
    """Blocks that cut multi-byte sequences anywhere: the first bad byte is where decoding it whole says."""
    from topx import ingest

    monkeypatch.setattr(ingest, "UTF8_CHECK_BYTES", block)
    rng = np.random.default_rng(block)
    texts = ["plain ascii,1\n", "café,2\n", "日本語,3\n", "emoji 🎧,4\n"]
    for trial in range(200):
        raw = "".join(rng.choice(texts, 5)).encode()
        if trial % 3:  # a stray byte, a cut sequence or a bad continuation, somewhere
            at = int(rng.integers(0, len(raw)))
            raw = raw[:at] + bytes([int(rng.choice([0xE9, 0xE6, 0x80, 0xF0]))]) + raw[at + int(trial % 2):]
        try:
            raw.decode("utf-8")
            expected = None
        except UnicodeDecodeError as exc:
            expected = exc.start
        assert ingest._first_invalid_utf8(raw) == expected, raw


def test_in_a_lambda_function_a_text_part_too_large_for_its_memory_is_refused_by_name(tmp_path, monkeypatch):
    """Parsing a text part takes several times its size: inside a function of 1 MB (the environment
    variable Lambda sets), a 300 KB CSV is refused naming the file and the ways out, before its parse; the same
    rows as Parquet, and the CSV outside a function, are read."""
    from topx.ingest import TEXT_MEMORY_FACTOR, read_interaction_codes

    n = 30_000
    users = [f"u{j % 997}" for j in range(n)]
    items = [f"i{j % 211}" for j in range(n)]
    csv = write(tmp_path, "big.csv", "user_id,item_id,rating\n" + "".join(
        f"{u},{i},{1 + j % 5}\n" for j, (u, i) in enumerate(zip(users, items, strict=True))))
    parquet = write_parquet(tmp_path, "big.parquet", {"user_id": pa.array(users), "item_id": pa.array(items),
                                                      "rating": pa.array([1.0 + j % 5 for j in range(n)])})
    assert Path(csv).stat().st_size > 2**20 // TEXT_MEMORY_FACTOR
    assert len(read_interaction_codes(csv).rating) == n  # no function: no limit
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1")
    err = error_of(read_interaction_codes, csv)
    assert err.source == csv and "more than this function's memory can parse" in str(err)
    assert "Parquet" in str(err) and "data_function_memory_mb" in str(err)
    assert len(read_interaction_codes(parquet).rating) == n
    small = write(tmp_path, "small.csv", "user_id,item_id,rating\nu1,i1,5\n")
    assert len(read_interaction_codes(small).rating) == 1
    with pytest.raises(InputDataError, match="more than this function's memory"):
        read_feature_table(csv, key_col="user_id")


def test_columns_of_numbers_or_times_that_no_option_reads_are_named(tmp_path):
    """A play count or a timestamp the caller did not name is reported, so a run can say so; the id, rating
    and time columns that are read, and text columns, are not."""
    from topx.ingest import read_interaction_codes

    path = write(tmp_path, "plays.csv", "user_id,item_id,plays,ts,title\nu1,i1,3,1700000000,a\nu2,i1,1,1700000500,b\n")
    assert read_interaction_codes(path, implicit=True).unused_columns == ("plays", "ts")
    named = read_interaction_codes(path, implicit=True, rating_col="plays", time_col="ts")
    assert named.unused_columns == () and named.rating.tolist() == [3.0, 1.0]
