"""The bad-input catalogue: what a data warehouse may export, uploaded to the offline pipeline.

Every case is an object put under ``incoming/`` of the deployed stack (the real state machine under
moto, see docs/LOCAL.md), sometimes with a side table under ``features/`` or upload metadata. A bad one
must fail in Prepare, the first state that can tell, with one attempt (data errors are not retried),
an error that names the file, the row and the column where there are ones to name, a notification
carrying that error, and nothing changed for readers: the version live before is still served, item
for item, and no run wrote anything. A valid one, however unusual, must publish, and the case says
what must be true of what it published.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from reliability_stack import TOP_X, Run, Stack, base_ratings, csv_bytes, deployed

from topx.aws import store

BASE = base_ratings()
BASE_CSV = csv_bytes(BASE)
USERS = sorted(BASE["user_id"].unique())
ITEMS = sorted(BASE["item_id"].unique())
READER_SAMPLE = USERS[:20]
HEADER = b"user_id,item_id,rating\n"


def with_cell(column: str, value: str, position: int = 10) -> bytes:
    """The base ratings with one cell replaced; data position 10 is file row 12 (the header is row 1)."""
    frame = BASE.astype(str)
    frame.loc[position, column] = value
    return csv_bytes(frame)


def with_line(text: str, position: int = 10) -> bytes:
    """The base ratings with data line ``position`` (file row ``position + 2``) replaced as written."""
    lines = BASE_CSV.decode().split("\n")
    lines[position + 1] = text
    return "\n".join(lines).encode()


def parquet(frame: pd.DataFrame, *, page_checksums: bool = False) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), sink, write_page_checksum=page_checksums)
    return sink.getvalue()


def corrupt_middle(blob: bytes) -> bytes:
    middle = len(blob) // 2
    return blob[:middle - 40] + bytes(80) + blob[middle + 40:]


def rows_for(users: list[str], items: list[str], rating: int = 4) -> bytes:
    return HEADER + b"".join(f"{u},{i},{rating}\n".encode() for u in users for i in items)


@dataclass(frozen=True)
class Case:
    """One upload. ``expect`` holds error substrings (the file, row and column among them); none means
    the upload is valid, and ``check`` says what must hold of the version it published."""

    id: str
    key: str
    body: Callable[[], bytes]
    expect: tuple[str, ...] = ()
    error: str = "InputDataError"
    metadata: dict[str, str] | None = None
    # Objects put before the upload: side tables under features/, or config/dataset.json.
    features: dict[str, bytes] = field(default_factory=dict)
    check: Callable[[Stack, Run], None] | None = None


IMPLICIT = {"topx-mode": "implicit"}


# --------------------------------------------------------------------------- checks of valid cases


def every_user_served(stack: Stack, run: Run, users: list[str] | None = None) -> None:
    prepared = run.output["prepare"]
    assert stack.versions()[run.run_id] == prepared["n_users"]
    for user in (users or USERS)[:40]:
        rec = store.get_recommendations(stack.pipeline.table, user, client=stack.ddb)
        assert rec is not None and 1 <= len(rec.items) <= TOP_X and len(set(rec.items)) == len(rec.items), user


def report_of(stack: Stack, run: Run) -> dict:
    return stack.run_json(run.run_id, "run.json")["report"]


def check_duplicates_merged(stack: Stack, run: Run) -> None:
    every_user_served(stack, run)
    assert report_of(stack, run)["duplicate_pairs_merged"] == 25


HEAVY_SEEN = ITEMS[:-2]


def check_heavy_users(stack: Stack, run: Run) -> None:
    """A user who has seen all but two items gets exactly those two; one who has seen everything gets an
    empty list (and the run still publishes: every user is counted)."""
    every_user_served(stack, run)
    heavy = store.get_recommendations(stack.pipeline.table, "heavy", client=stack.ddb)
    assert heavy is not None and sorted(heavy.items) == ITEMS[-2:]
    omni = store.get_recommendations(stack.pipeline.table, "omni", client=stack.ddb)
    assert omni is not None and omni.items == [] and omni.scores == []
    assert run.output["prepare"]["n_users"] == len(USERS) + 2


STRANGE_USERS = ["a,b", 'say "hi"', "José Ñúñez", "日本語", "007"]
STRANGE_ITEM = '15" screen, matte'


def strange_ids_upload() -> bytes:
    frame = BASE.copy()
    extra = pd.DataFrame({"user_id": [u for u in STRANGE_USERS for _ in range(6)],
                          "item_id": [*ITEMS[:5], STRANGE_ITEM] * len(STRANGE_USERS),
                          "rating": [4, 5, 3, 2, 4, 5] * len(STRANGE_USERS)})
    more = pd.DataFrame({"user_id": USERS[:8], "item_id": [STRANGE_ITEM] * 8, "rating": [4] * 8})
    return csv_bytes(pd.concat([frame, extra, more], ignore_index=True))


def check_strange_ids(stack: Stack, run: Run) -> None:
    every_user_served(stack, run, USERS[:10] + STRANGE_USERS)
    assert run.output["prepare"]["n_items"] == len(ITEMS) + 1
    served = {i for u in USERS for i in store.get_recommendations(stack.pipeline.table, u, client=stack.ddb).items}
    assert served <= set(ITEMS) | {STRANGE_ITEM}
    ids = stack.s3.get_object(Bucket=stack.pipeline.bucket, Key=f"runs/{run.run_id}/vectors/item_ids.json")["Body"]
    assert STRANGE_ITEM in json.loads(ids.read())


def check_feature_report(name: str, **expected: int) -> Callable[[Stack, Run], None]:
    def check(stack: Stack, run: Run) -> None:
        every_user_served(stack, run)
        report = report_of(stack, run)[f"{name}_features"]
        assert {k: report[k] for k in expected} == expected, report

    return check


def check_cold_items(count: int) -> Callable[[Stack, Run], None]:
    def check(stack: Stack, run: Run) -> None:
        every_user_served(stack, run)
        report = report_of(stack, run)
        assert report["cold_items"] == count and report["items_features"]["rows_for_unknown_ids"] == 0, report

    return check


BIG = base_ratings(n_users=1200, n_items=60, seed=4)


def check_ten_times_larger(stack: Stack, run: Run) -> None:
    assert run.output["prepare"]["n_users"] == 1200 == 10 * len(USERS)
    every_user_served(stack, run, sorted(BIG["user_id"].unique())[::30])


# --------------------------------------------------------------------------- the catalogue

X = "incoming/"
CASES = [
    # -- the file as a whole
    Case("empty_file", X + "empty.csv", lambda: b"", ("incoming/ holds no data to train on: incoming/empty.csv is empty",)),
    Case("blank_lines_only", X + "blank.csv", lambda: b"\n\r\n\n", ("incoming/blank.csv: file is empty",)),
    Case("header_only", X + "header.csv", lambda: HEADER, ("incoming/header.csv: has a header but no data rows",)),
    Case("no_header", X + "no_header.csv", lambda: BASE_CSV.split(b"\n", 1)[1],
         ("incoming/no_header.csv, column 'user_id': no column 'user_id' for the user id", "header row missing")),
    Case("wrong_separator", X + "mixed_sep.csv", lambda: HEADER + b"u1;i1;5\nu2;i2;4\n",
         ("incoming/mixed_sep.csv, row 2:", "has 3 field(s) but the first row has 1", "different separators")),
    Case("ragged_row", X + "ragged.csv", lambda: with_line("u00001,i00002,4,extra"),
         ("incoming/ragged.csv, row 12: has 4 field(s) but the first row has 3",)),
    Case("unbalanced_quote", X + "quote.csv", lambda: with_line('u00001,"i00002,4'),
         ("incoming/quote.csv, row 12: has 2 field(s)", "check for an unbalanced quote")),
    Case("duplicate_header", X + "dup_header.csv", lambda: b"user_id,item_id,rating,rating\nu1,i1,5,4\n",
         ("incoming/dup_header.csv, row 1, column 'rating': column name 'rating' appears twice",)),
    Case("missing_id_column", X + "no_item.csv", lambda: BASE_CSV.replace(b"item_id", b"product", 1),
         ("incoming/no_item.csv, column 'item_id': no column 'item_id'", "columns found: 'user_id', 'product', 'rating'")),
    Case("giant_line", X + "giant.csv", lambda: with_cell("item_id", "x" * (17 * 1024 * 1024)),
         ("incoming/giant.csv, row 12, column 'item_id': item id is 17,825,792 bytes long",)),
    # -- encodings and containers
    Case("invalid_utf8", X + "latin1.csv", lambda: with_cell("user_id", "José").replace("José".encode(), "José".encode("latin-1")),
         ("incoming/latin1.csv, row 12, column 'user_id': not valid UTF-8 (byte 0xe9",)),
    Case("utf16", X + "utf16.csv", lambda: BASE_CSV.decode().encode("utf-16"), ("incoming/utf16.csv: is UTF-16 text",)),
    Case("excel_workbook", X + "ratings.csv", lambda: b"PK\x03\x04" + bytes(200),
         ("incoming/ratings.csv: is a ZIP archive", "export the sheet as CSV")),
    Case("truncated_gzip", X + "trunc.csv.gz", lambda: gzip.compress(BASE_CSV)[:-30],
         ("incoming/trunc.csv.gz: gzip stream is truncated or corrupt",)),
    Case("gz_name_not_gzip", X + "plain.csv.gz", lambda: BASE_CSV, ("incoming/plain.csv.gz: named .gz but is not gzip",)),
    Case("parquet_that_is_not_parquet", X + "fake.parquet", lambda: BASE_CSV,
         ("incoming/fake.parquet: is named .parquet but is not a Parquet file",)),
    Case("parquet_truncated", X + "cut.parquet", lambda: parquet(BASE)[:-100],
         ("incoming/cut.parquet: is named .parquet but is not a Parquet file",)),
    Case("parquet_with_a_damaged_page", X + "damaged.parquet", lambda: corrupt_middle(parquet(BASE, page_checksums=True)),
         ("incoming/damaged.parquet: not a readable Parquet file", "CRC checksum verification failed")),
    Case("parquet_float_ids", X + "float_ids.parquet",
         lambda: parquet(BASE.assign(user_id=BASE["user_id"].str[1:].astype(float))),
         ("incoming/float_ids.parquet, column 'user_id': user id column has type double",)),
    # -- cells
    Case("empty_user_id", X + "no_user.csv", lambda: with_cell("user_id", " "),
         ("incoming/no_user.csv, row 12, column 'user_id': user id is empty",)),
    Case("rating_as_text", X + "text.csv", lambda: with_cell("rating", "five"),
         ("incoming/text.csv, row 12, column 'rating': rating 'five' is not a number",)),
    Case("rating_nan", X + "nan.csv", lambda: with_cell("rating", "NaN"),
         ("incoming/nan.csv, row 12, column 'rating': rating 'NaN' is not a number",)),
    Case("rating_inf", X + "inf.csv", lambda: with_cell("rating", "-inf"),
         ("incoming/inf.csv, row 12, column 'rating': rating '-inf' is not finite",)),
    Case("rating_empty", X + "blank_rating.csv", lambda: with_cell("rating", ""),
         ("incoming/blank_rating.csv, row 12, column 'rating': rating is empty",)),
    Case("rating_beyond_float32", X + "huge.csv", lambda: with_cell("rating", "1e39"),
         ("incoming/huge.csv, row 12, column 'rating': rating 1e+39 is too large",)),
    Case("negative_count_implicit", X + "plays.csv", lambda: with_cell("rating", "-2"),
         ("incoming/plays.csv, row 12, column 'rating': rating -2.0 is negative; for ranking",), metadata=IMPLICIT),
    Case("all_zero_counts_implicit", X + "zeros.csv", lambda: csv_bytes(BASE.assign(rating=0)),
         ("incoming/: every row has strength 0",), metadata=IMPLICIT),
    # -- too little to learn from
    Case("one_user", X + "one_user.csv", lambda: rows_for(["u1"], ITEMS[:12]),
         ("incoming/, column 'user_id': only 1 distinct user id ('u1')",)),
    Case("one_item", X + "one_item.csv", lambda: rows_for(USERS[:12], ["i1"]),
         ("incoming/, column 'item_id': only 1 distinct item id ('i1')",)),
    # -- side tables under features/
    Case("duplicate_feature_rows", X + "r.csv", lambda: BASE_CSV,
         ("features/users.csv, row 4, column 'user_id': duplicate key 'u00001' in rows 3 and 4",),
         features={"features/users.csv": b"user_id,country\nu00000,de\nu00001,fr\nu00001,it\n"}),
    Case("feature_table_without_key", X + "r.csv", lambda: BASE_CSV,
         ("features/items.csv, column 'item_id': no column 'item_id' for the key", "columns found: 'sku', 'color'"),
         features={"features/items.csv": b"sku,color\ni00001,red\n"}),
    Case("feature_table_not_utf8", X + "r.csv", lambda: BASE_CSV,
         ("features/items.csv, row 3, column 'color': not valid UTF-8",),
         features={"features/items.csv": "item_id,color\ni00001,red\ni00002,crème\n".encode("latin-1")}),
    Case("feature_infinite_value", X + "r.csv", lambda: BASE_CSV,
         ("features/items.csv, row 3, column 'price': value inf is not finite",),
         features={"features/items.csv": b"item_id,price\ni00001,9.5\ni00002,inf\n"}),
    # -- settings carried by the upload
    Case("unknown_hyperparameter", X + "r.csv", lambda: BASE_CSV,
         ("incoming/r.csv metadata topx-hyperparameters: unknown hyperparameter(s): factor_lr",), error="ConfigError",
         metadata={"topx-hyperparameters": '{"factor_lr": 0.1}'}),
    # -- the dataset configuration (config/dataset.json, put beside the upload)
    Case("dataset_configuration_with_a_bad_field", X + "r.csv", lambda: BASE_CSV,
         ("config/dataset.json: user_col: expected a column name, or a 0-based position, got True",),
         error="ConfigError", features={"config/dataset.json": b'{"user_col": true}'}),
    Case("dataset_configuration_with_an_unknown_field", X + "r.csv", lambda: BASE_CSV,
         ("config/dataset.json: usercol: unknown field",), error="ConfigError",
         features={"config/dataset.json": b'{"usercol": "customer"}'}),
    Case("dataset_over_max_bytes", X + "r.csv", lambda: BASE_CSV,
         (f"incoming/: the dataset holds {len(BASE_CSV):,} bytes in 1 part(s), over max_bytes 1,000",),
         features={"config/dataset.json": b'{"max_bytes": 1000}'}),
    Case("mode_metadata_against_the_configured_objective", X + "r.csv", lambda: BASE_CSV,
         ("metadata topx-mode: 'rating' trains for rating, but the dataset configuration's objective is 'ranking'",),
         error="ConfigError", metadata={"topx-mode": "rating"},
         features={"config/dataset.json": b'{"objective": "ranking"}'}),
    # -- valid, however unusual
    Case("other_column_names_by_the_dataset_configuration", X + "orders.csv",
         lambda: csv_bytes(BASE.rename(columns={"user_id": "Customer", "item_id": "SKU", "rating": "Qty"})),
         features={"config/dataset.json": b'{"user_col": "Customer", "item_col": "SKU", "rating_col": "Qty"}'},
         check=every_user_served),
    Case("semicolon_separated", X + "semi.csv", lambda: BASE_CSV.replace(b",", b";"), check=every_user_served),
    Case("crlf_and_bom", X + "windows.csv", lambda: b"\xef\xbb\xbf" + BASE_CSV.replace(b"\n", b"\r\n"),
         check=every_user_served),
    Case("gzipped_csv", X + "ratings.csv.gz", lambda: gzip.compress(BASE_CSV), check=every_user_served),
    Case("parquet", X + "ratings.parquet", lambda: parquet(BASE), check=every_user_served),
    Case("extra_columns", X + "extra.csv", lambda: csv_bytes(BASE.assign(ts=1700000000, note="x")),
         check=every_user_served),
    Case("duplicate_pairs", X + "dups.csv", lambda: csv_bytes(pd.concat([BASE, BASE.iloc[:25]])),
         check=check_duplicates_merged),
    Case("more_than_x_seen", X + "heavy.csv",
         lambda: BASE_CSV + rows_for(["heavy"], HEAVY_SEEN)[len(HEADER):] + rows_for(["omni"], ITEMS)[len(HEADER):],
         check=check_heavy_users),
    Case("ids_with_commas_quotes_non_ascii", X + "strange.csv", strange_ids_upload, check=check_strange_ids),
    Case("feature_with_a_single_value", X + "r.csv", lambda: BASE_CSV,
         features={"features/users.csv": ("user_id,plan\n" + "".join(f"{u},basic\n" for u in USERS)).encode()},
         check=check_feature_report("users", columns=1)),
    # Rows for items with no interactions are new products: cold items, scored from their features.
    Case("features_for_unknown_ids", X + "r.csv", lambda: BASE_CSV,
         features={"features/items.csv": b"item_id,color\ni00001,red\nnope-1,blue\nnope-2,red\nnope-3,green\n"},
         check=check_cold_items(3)),
    Case("feature_with_missing_values", X + "r.csv", lambda: BASE_CSV,
         features={"features/users.csv": b"user_id,age,country\nu00000,NA,de\nu00001,,\nu00002,33,fr\n"},
         check=check_feature_report("users", columns=3)),
    Case("ten_times_larger_than_the_last", X + "big.csv", lambda: csv_bytes(BIG), check=check_ten_times_larger),
]
ERRORS = [c for c in CASES if c.expect]
VALID = [c for c in CASES if not c.expect]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with deployed() as deployed_stack:
        yield deployed_stack


def test_the_catalogue_is_broad() -> None:
    assert len(ERRORS) >= 20 and len(VALID) >= 10
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_an_upload_is_refused_in_prepare_or_published_whole(stack: Stack, case: Case) -> None:
    stack.reset()
    live = stack.seed_live_version(READER_SAMPLE)
    before = stack.view(READER_SAMPLE)
    for key, body in case.features.items():
        stack.s3.put_object(Bucket=stack.pipeline.bucket, Key=key, Body=body)

    run = stack.upload(case.key, case.body(), case.metadata)

    if not case.expect:
        assert run.status == "SUCCEEDED", (run.error, [n.message[:400] for n in run.notes])
        assert stack.pointer() == run.run_id != live
        case.check(stack, run)
        return
    assert run.status == "FAILED" and run.error == "PipelineFailed"
    assert [(e.state, e.error) for e in run.failures()] == [("Prepare", case.error)]
    assert run.attempts("Prepare") == 1, "a data error must not be retried"
    assert run.exited_states() == ["Defaults", "Mode", "Prepare", "NotifyFailure"]
    (note,) = run.notes
    assert note.subject == "topx: pipeline run failed"
    for expected in case.expect:
        assert expected in note.message, (expected, note.message[:600])
    # Nothing changed for readers, and the failed run wrote nothing anywhere.
    assert stack.view(READER_SAMPLE) == before
    assert stack.versions() == {live: len(READER_SAMPLE)}
    assert stack.run_prefixes() == set()
