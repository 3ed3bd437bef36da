"""Reading and validating interaction files and side-feature tables.

Accepted formats: delimited text (CSV, TSV or any other one-character separator, sniffed when not
given; optionally gzipped) and Parquet (recognised by its ``PAR1`` magic). Files are read from a
local path or ``s3://bucket/key`` through :func:`topx.io.read_bytes`.

Ids are strings end to end: id columns are read as text and never pass through a float, so
``"007"`` stays ``"007"``; integer id columns in Parquet become their decimal text.

Every validation error is an :class:`~topx.errors.InputDataError` naming the file, the row as a
spreadsheet shows it and the column. For delimited text the header is row 1, so the first data
row is row 2 (row 1 when ``header=False``); a record whose quoted value spans several lines still
counts as one row. For Parquet, rows are the 1-based data row numbers.
"""

from __future__ import annotations

import codecs
import csv
import inspect
import io
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from topx.contract import check_separator
from topx.errors import ConfigError, InputDataError
from topx.io import S3_SCHEME, Part, dataset_parts, default_s3_client, read_bytes

USER_ID = "user_id"
ITEM_ID = "item_id"
RATING = "rating"
TIME = "time"
INTERACTION_COLUMNS = (USER_ID, ITEM_ID, RATING)

# Separators tried when none is given, in order of preference when several fit equally well:
# tabs rarely occur inside values; ';' and '|' do (lists of genres), and a space most of all.
CANDIDATE_SEPARATORS = ("\t", ",", ";", "|", " ")
SNIFF_BYTES = 64 * 1024
SNIFF_RECORDS = 50
# Feature-table cells that mean "no value" (compared case-insensitively, after stripping).
MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none"})
# In a text column "none" is often a value (an occupation "none", a plan "None"), and exports write a
# missing value as an empty cell, NA (R), NaN (pandas' str), null or N/A, never as "none".
TEXT_MISSING_TOKENS = MISSING_TOKENS - {"none"}

UTF8_BOM = b"\xef\xbb\xbf"
# Files people export by mistake, named by their first bytes, so the error can say what to do instead.
NOT_TEXT_MAGIC = {
    b"\xff\xfe": "UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8",
    b"\xfe\xff": "UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8",
    b"PK\x03\x04": "a ZIP archive, not delimited text (an Excel workbook?); export the sheet as CSV",
    b"\xd0\xcf\x11\xe0": "an Office document, not delimited text (an .xls workbook?); export the sheet as CSV",
}
PARQUET_MAGIC = b"PAR1"
FLOAT32_MAX = float(np.finfo(np.float32).max)
# A quoted value may hold newlines, so a record can be long; one record must fit in one block.
CSV_BLOCK_BYTES = 16 * 1024 * 1024
# Ids become DynamoDB keys (``user#<id>``, at most 2048 bytes) and entries of a user's item (at most
# 400 KB for x recommendations): a longer id is a broken export, refused where it is read.
MAX_ID_BYTES = 1024
# The largest epoch a time column may hold in seconds (year 5138): a larger number is milliseconds.
MAX_EPOCH_SECONDS = 1e11
_DATE_START = re.compile(r"\d{4}-\d{2}-\d{2}")
# In a Lambda function (the deployed Prepare), its memory in MB. One text part is parsed whole, and Prepare's
# peak measured about 6.9 x the part's bytes (a 408 MB CSV object: 2,802 MB); a text part over the
# function's memory / TEXT_MEMORY_FACTOR is refused by name once read, before its parse would run the
# function out of memory, which Lambda reports without naming the object.
LAMBDA_MEMORY_ENV = "AWS_LAMBDA_FUNCTION_MEMORY_SIZE"
TEXT_MEMORY_FACTOR = 6


@dataclass(frozen=True)
class _Table:
    """A file's data rows. ``data`` columns are strings for delimited text, as stored for Parquet.

    Data position ``p`` (0-based) is row ``p + row_offset`` as a user sees it. ``positional`` is
    true when the columns are named by their 0-based positions (delimited text without a header);
    ``delimited`` is false for Parquet.
    """

    data: pa.Table
    source: str
    row_offset: int
    positional: bool
    delimited: bool

    def row(self, position: int) -> int:
        return position + self.row_offset

    @property
    def columns(self) -> list[str]:
        return list(self.data.column_names)


# --------------------------------------------------------------------------- public API


def read_interactions(
    source: str,
    *,
    user_col: str | int = USER_ID,
    item_col: str | int = ITEM_ID,
    rating_col: str | int | None = RATING,
    header: bool = True,
    sep: str | None = None,
    implicit: bool = False,
    time_col: str | int | None = None,
    time_optional: bool = False,
    max_bytes: int | None = None,
    s3_client: Any = None,
) -> pd.DataFrame:
    """Read (user, item, rating) rows from ``source`` (a path or ``s3://`` URI; CSV/TSV/Parquet).

    Returns a DataFrame with exactly the columns ``user_id`` (str), ``item_id`` (str) and
    ``rating`` (float32), one row per file row in file order, with ``attrs["source"]`` and
    ``attrs["row_offset"]`` (add it to a 0-based position to get the file row). Ids are stripped of
    surrounding whitespace. Duplicate (user, item) pairs are kept as they are: aggregating them is
    the caller's choice.

    Columns are named, or given as 0-based positions (ints). With ``header=False`` the columns are
    positional and the default names mean positions 0, 1 and 2; digit strings are positions too.

    ``implicit=False``: ``rating_col`` must exist and hold finite numbers. ``implicit=True``: the
    rating column is an interaction strength (finite, >= 0); with ``rating_col=None``, or with the
    default rating column absent from the file, every row gets strength 1.0. An explicitly named
    rating column that is absent is an error in both modes, so a typo is not silently ignored.

    ``sep``: a one-character separator (``"\\t"`` may be written as a backslash and ``t``); sniffed
    among tab, comma, semicolon, pipe and space when ``None``. Ignored for Parquet.

    ``time_col``: when given, the frame has a ``time`` column too, int64 seconds since the epoch (UTC),
    read from epoch seconds or milliseconds (numbers; milliseconds when they exceed ``MAX_EPOCH_SECONDS``),
    ISO-8601 text (a value without an offset is UTC) or a Parquet timestamp or date. ``time_optional``: a
    ``time_col`` the file does not have (or that names the user, item or rating column) means no time column,
    as for the default time column ``timestamp``; a name the caller chose must exist.

    ``source`` may be a folder or an S3 prefix of part files (``topx.io.dataset_parts``): every part must
    have the same columns, of the same kinds (``_schema_difference``). ``max_bytes``: the parts' sizes as
    stored, summed from the listing, may not exceed it; a larger dataset is refused before any is read.
    """
    parts = _interaction_parts(source, user_col=user_col, item_col=item_col, rating_col=rating_col, header=header,
                               sep=sep, implicit=implicit, time_col=time_col, time_optional=time_optional,
                               max_bytes=max_bytes, s3_client=s3_client)
    frames, sources, row_offset = [], [], 0
    for part in parts:
        frame = pd.DataFrame({USER_ID: pd.Series(part.users.to_pandas(), dtype="str"),
                              ITEM_ID: pd.Series(part.items.to_pandas(), dtype="str"), RATING: part.rating})
        if part.time is not None:
            frame[TIME] = part.time
        frames.append(frame)
        sources.append(part.source)
        row_offset = part.row_offset
    frame = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    frame.attrs["source"] = source
    frame.attrs["row_offset"] = row_offset if len(frames) == 1 else 0
    frame.attrs["parts"] = sources
    return frame


@dataclass(frozen=True)
class InteractionCodes:
    """Interactions as integer codes, every row in file order (parts in path order; nothing merged or dropped).

    user_codes, item_codes: (n,) int32 positions in ``user_ids`` / ``item_ids``, which hold each distinct id
    (stripped text) once, in the order of its first row; rating: (n,) float32; time: (n,) int64 seconds since
    the epoch, or None without a time column; parts: the files read, in order.
    """

    user_codes: np.ndarray
    item_codes: np.ndarray
    rating: np.ndarray
    time: np.ndarray | None
    user_ids: pa.Array
    item_ids: pa.Array
    parts: list[str]
    # The first part's columns of numbers, times or dates that no column option reads.
    unused_columns: tuple[str, ...] = ()


def read_interaction_codes(source: str, **options: Any) -> InteractionCodes:
    """The rows :func:`read_interactions` reads (the same keyword arguments, defaults, checks and errors), kept
    as integer codes.

    Each part is read, checked and turned into codes before the next is read, and only its codes stay: memory
    holds one part's table at a time beside about 12 bytes a row (20 with a time column) and the distinct ids,
    where a frame of string ids takes over a hundred bytes a row.
    """
    arguments = inspect.signature(read_interactions).bind(source, **options)
    arguments.apply_defaults()
    users, items = _Vocabulary(), _Vocabulary()
    user_codes, item_codes, ratings, times, sources = [], [], [], [], []
    unused: tuple[str, ...] = ()
    for part in _interaction_parts(**arguments.arguments):
        unused = unused if sources else part.unused
        user_codes.append(users.encode(part.users))
        item_codes.append(items.encode(part.items))
        ratings.append(part.rating)
        if part.time is not None:
            times.append(part.time)
        sources.append(part.source)
        del part  # the part's table goes before the next is read
    user_ids, item_ids = users.ids(), items.ids()  # the codes handed out are final only now
    return InteractionCodes(
        user_codes=_concatenate(user_codes, np.int32), item_codes=_concatenate(item_codes, np.int32),
        rating=_concatenate(ratings, np.float32),
        time=_concatenate(times, np.int64) if times or (arguments.arguments["time_col"] is not None
                                                        and not arguments.arguments["time_optional"]) else None,
        user_ids=user_ids, item_ids=item_ids, parts=sources, unused_columns=unused)


def _concatenate(arrays: list[np.ndarray], dtype: type) -> np.ndarray:
    """One array of ``arrays`` in order, the list emptied as it goes so that each piece is freed once copied."""
    out = np.empty(sum(len(a) for a in arrays), dtype=dtype)
    position = 0
    while arrays:
        piece = arrays.pop(0)
        out[position:position + len(piece)] = piece
        position += len(piece)
    return out


class _Vocabulary:
    """Distinct ids in the order they are first met; an id's code is its position.

    Each part is encoded against its own ids first (one hash of the part), and those parts are merged into
    the vocabulary in batches, once they hold as many ids as it does: one hash of the vocabulary per batch,
    not per part, so that a dataset of many parts costs about what one part of its size would (a hash of
    every id met, per part, took 18 s for 200 parts of 20,000 rows). The codes ``encode`` returns are the
    part's own until then, and are renumbered in place when their batch is merged; ``ids`` merges what is
    left, after which every code handed out is final.
    """

    # Parts are merged once they hold this many ids, or as many as the vocabulary, whichever is more.
    MIN_BATCH = 1 << 16

    def __init__(self) -> None:
        self._ids: pa.Array = pa.array([], pa.large_string())
        self._pending: list[tuple[pa.Array, np.ndarray]] = []  # each part's distinct ids, and its codes into them
        self._pending_ids = 0

    def encode(self, ids: pa.ChunkedArray) -> np.ndarray:
        """(n,) int32 codes of ``ids`` (no nulls), final once ``ids()`` has been called."""
        encoded = pc.dictionary_encode(ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids)
        distinct = encoded.dictionary.cast(pa.large_string())  # this part's ids, in the order of their first row
        codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int32)
        self._pending.append((distinct, codes))
        self._pending_ids += len(distinct)
        if self._pending_ids >= max(len(self._ids), self.MIN_BATCH):
            self._merge()
        return codes

    def _merge(self) -> None:
        """Add the pending parts' ids not met before, in order, and renumber their codes in place."""
        if not self._pending:
            return
        met = pa.concat_arrays([distinct for distinct, _ in self._pending])
        known = pc.index_in(met, value_set=self._ids)
        new = known.is_null().to_numpy(zero_copy_only=False)
        code = known.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int32)
        if new.any():
            # An id new to the vocabulary may be in several pending parts: one code, by its first.
            fresh = pc.dictionary_encode(met.filter(pa.array(new)))
            code[new] = len(self._ids) + fresh.indices.to_numpy(zero_copy_only=False).astype(np.int32)
            self._ids = pa.concat_arrays([self._ids, fresh.dictionary.cast(pa.large_string())])
        start = 0
        for distinct, codes in self._pending:
            codes[:] = code[start:start + len(distinct)][codes]
            start += len(distinct)
        self._pending, self._pending_ids = [], 0

    def ids(self) -> pa.Array:
        """(n_ids,) large_string: every id met, by code; the codes ``encode`` returned are final from now on."""
        self._merge()
        return self._ids


@dataclass(frozen=True)
class _InteractionPart:
    """One part's checked rows: ids as stripped text, rating (n,) float32, time (n,) int64 or None."""

    source: str
    row_offset: int
    users: pa.ChunkedArray
    items: pa.ChunkedArray
    rating: np.ndarray
    time: np.ndarray | None
    # Columns of numbers, times or dates that none of the column options reads (a strength or a time the
    # caller may have meant to name).
    unused: tuple[str, ...] = ()


def _interaction_parts(
    source: str, *, user_col: str | int, item_col: str | int, rating_col: str | int | None, header: bool,
    sep: str | None, implicit: bool, time_col: str | int | None, time_optional: bool, max_bytes: int | None,
    s3_client: Any,
) -> Iterator[_InteractionPart]:
    """The parts of ``source``, read and checked one at a time (``read_interactions`` says how): each part's
    table is dropped once its columns are taken, before the next part is read."""
    if rating_col is None and not implicit:
        raise ConfigError("explicit ratings need a rating column; pass rating_col or implicit=True")
    # Only the default rating column may be absent (implicit mode): a name the caller chose must exist.
    rating_optional = implicit and rating_col == RATING
    if not header:
        user_col, item_col = _positional_default(user_col, USER_ID, 0), _positional_default(item_col, ITEM_ID, 1)
        rating_col = _positional_default(rating_col, RATING, 2)
    if s3_client is None and source.startswith(S3_SCHEME):
        s3_client = default_s3_client()  # one client for listing and reading every part
    parts = dataset_parts(source, s3_client=s3_client)
    _check_size(parts, source, max_bytes)
    shapes: list[_Table] = []
    for part in parts:
        yield from _interaction_part(part, shapes, header=header, sep=sep, s3_client=s3_client, user_col=user_col,
                                     item_col=item_col, rating_col=rating_col, time_col=time_col, implicit=implicit,
                                     rating_optional=rating_optional, time_optional=time_optional)


def _interaction_part(part: Part, shapes: list[_Table], *, header: bool, sep: str | None, s3_client: Any,
                      user_col: str | int, item_col: str | int, rating_col: str | int | None,
                      time_col: str | int | None, implicit: bool, rating_optional: bool,
                      time_optional: bool) -> Iterator[_InteractionPart]:
    """One part read and checked against the first part's columns and schema (``shapes``: empty, or the first
    part's table without its rows, which this call puts there when it reads the first part); a Parquet file a
    row group at a time (``_load_tables``). Nothing here holds one piece's table while the next is read."""
    for loaded in _load_tables(part.source, header=header, sep=sep, s3_client=s3_client):
        checked = _checked_part(_with_partitions(loaded, part), shapes, part)
        del loaded
        yield _interaction_columns(checked, user_col, item_col, rating_col, time_col, implicit=implicit,
                                   rating_optional=rating_optional, time_optional=time_optional)
        del checked


def _checked_part(table: _Table, shapes: list[_Table], part: Part) -> _Table:
    if not shapes:
        shapes.append(replace(table, data=table.data.schema.empty_table()))
    first = shapes[0]
    if table.columns != first.columns:
        raise InputDataError(
            f"its columns {table.columns} differ from those of {first.source} ({first.columns}); the parts "
            "of one dataset must have the same columns", source=part.source)
    difference = _schema_difference(table, first)  # None for the first part, compared with its own schema
    if difference is not None:
        raise InputDataError(f"{difference}; the parts of one dataset must have the same schema", source=part.source)
    return table


def _check_size(parts: list[Part], source: str, max_bytes: int | None) -> None:
    """Refuse a dataset whose parts hold more than ``max_bytes`` together, before any is read."""
    total = sum(part.size or 0 for part in parts)
    if max_bytes is not None and total > max_bytes:
        raise InputDataError(
            f"the dataset holds {total:,} bytes in {len(parts):,} part(s), over max_bytes {max_bytes:,}; nothing "
            "was read. Is it the export you meant? Raise max_bytes in the dataset configuration if it is",
            source=source)


def _type_kind(data_type: pa.DataType) -> str:
    """What a column's type means to the readers: widths and encodings aside (int32 and int64 are both
    integers, a dictionary of strings is text), a part whose column differs in kind is another schema."""
    if pa.types.is_dictionary(data_type):
        data_type = data_type.value_type
    for kind, test in (("integer", pa.types.is_integer), ("floating point", pa.types.is_floating),
                       ("decimal", pa.types.is_decimal), ("text", _is_text), ("timestamp", pa.types.is_timestamp),
                       ("date", pa.types.is_date), ("boolean", pa.types.is_boolean), ("null", pa.types.is_null)):
        if test(data_type):
            return kind
    return str(data_type)


def _schema_difference(table: _Table, first: _Table) -> str | None:
    """How ``table``'s schema differs from ``first``'s (same column names): one delimited and one Parquet,
    or a column of another kind; None when they agree. A column that is null throughout one part (a Parquet
    writer types it ``null``) agrees with any kind."""
    if table.delimited != first.delimited:
        formats = {True: "delimited text", False: "Parquet"}
        return f"it is {formats[table.delimited]} but {first.source} is {formats[first.delimited]}"
    if table.delimited:
        return None  # every column of delimited text is read as text
    for name in table.columns:
        kind, first_kind = _type_kind(table.data.schema.field(name).type), _type_kind(first.data.schema.field(name).type)
        if kind != first_kind and "null" not in (kind, first_kind):
            return (f"its column {name!r} is {kind} ({table.data.schema.field(name).type}) but in {first.source} it "
                    f"is {first_kind} ({first.data.schema.field(name).type})")
    return None


def _with_partitions(table: _Table, part: Part) -> _Table:
    """The part's rows with its ``key=value`` partition folders as columns (text), unless the file has
    a column of that name already."""
    added = {name: value for name, value in part.partitions.items() if name not in table.columns}
    if not added:
        return table
    data = table.data
    for name, value in added.items():
        data = data.append_column(name, pa.array([value] * data.num_rows, pa.string()))
    return replace(table, data=data)


def _interaction_columns(table: _Table, user_col: str | int, item_col: str | int, rating_col: str | int | None,
                         time_col: str | int | None, *, implicit: bool, rating_optional: bool,
                         time_optional: bool = False) -> _InteractionPart:
    """One file's (user, item, rating[, time]) columns, checked (``read_interactions``)."""
    user_name = _resolve_column(table, user_col, "user id")
    item_name = _resolve_column(table, item_col, "item id")
    if user_name == item_name:
        raise ConfigError(f"user_col and item_col both name column {user_name!r}")
    rating_name = _resolve_rating_column(table, rating_col, implicit=implicit, optional=rating_optional)
    if rating_name is not None and rating_name in (user_name, item_name):
        raise ConfigError(f"rating_col names column {rating_name!r}, which is also an id column")
    time_name = None if time_col is None or (time_optional and not _has_column(table, time_col)) else (
        _resolve_column(table, time_col, "time"))
    if time_optional and time_name in (user_name, item_name, rating_name):
        time_name = None
    if time_name is not None and time_name in (user_name, item_name, rating_name):
        raise ConfigError(f"time_col names column {time_name!r}, which is also the user, item or rating column")

    users = _id_column(table, user_name, "user id")
    items = _id_column(table, item_name, "item id")
    if rating_name is None:
        ratings = np.ones(table.data.num_rows, dtype=np.float32)
    else:
        # A column named rating is called a rating, whatever the objective reads it as.
        what = "interaction strength" if implicit and "rating" not in str(rating_name).lower() else "rating"
        ratings = _rating_column(table, rating_name, what, allow_negative=not implicit)
    times = None if time_name is None else _time_column(table, time_name, default=time_optional)
    read = {user_name, item_name, rating_name, time_name}
    unused = tuple(str(name) for name in table.data.column_names
                   if name not in read and _numeric_or_time(table.data.column(name)))
    return _InteractionPart(source=table.source, row_offset=table.row_offset, users=users, items=items,
                            rating=ratings, time=times, unused=unused)


def _numeric_or_time(column: pa.ChunkedArray) -> bool:
    """Whether a column holds numbers, times or dates: by its type, or for text (delimited files are read as
    text) by its first values, each a number or a date written as YYYY-MM-DD..."""
    data_type = column.type
    if any(test(data_type) for test in (pa.types.is_integer, pa.types.is_floating, pa.types.is_decimal,
                                        pa.types.is_timestamp, pa.types.is_date)):
        return True
    if not _is_text(data_type):
        return False
    head = [value.strip() for value in pc.drop_null(column.slice(0, 50)).to_pylist() if value.strip()]
    return bool(head) and all(_is_number(value) or _DATE_START.match(value) for value in head)


def read_feature_table(
    source: str,
    *,
    key_col: str | int,
    header: bool = True,
    sep: str | None = None,
    s3_client: Any = None,
) -> pd.DataFrame:
    """Read a side-feature table (one row per user or per item) from ``source``.

    Returns a DataFrame indexed by the key (str, stripped; the index is named ``key_col`` as given)
    whose columns are the file's other columns in file order. For delimited text a column whose
    present values all parse as numbers becomes numeric (int64, or float64 when some are missing);
    any other column stays text (str, stripped). Empty cells and ``NA``/``N/A``/``NaN``/``null`` (any
    case) are missing (NaN); in a column that is otherwise numeric, so is ``None``, which in a text
    column is a value like any other (an occupation ``none``). Parquet columns are kept as stored. A table holding only the key
    column is valid and has no features.

    ``attrs``: ``source``, and ``row_offset`` (data position + row_offset = file row), which
    :func:`topx.encode.encode_features` uses to name rows in its errors. Key, format and
    separator handling are as for :func:`read_interactions`; a duplicate or empty key is an error.
    """
    table = _load_table(source, header=header, sep=sep, s3_client=s3_client)
    key_name = _resolve_column(table, key_col, "key")
    keys = _id_column(table, key_name, "key")
    _check_unique_keys(table, keys, key_name)

    index = pd.Index(pd.Series(keys.to_pandas(), dtype="str"), name=key_col)
    columns: dict[str, pd.Series] = {}
    for name in table.columns:
        if name == key_name:
            continue
        column = table.data.column(name)
        series = _typed_text_column(column) if table.delimited else column.to_pandas()
        columns[name] = series.set_axis(index)
    frame = pd.DataFrame(columns, index=index)
    frame.attrs["source"] = source
    frame.attrs["row_offset"] = table.row_offset
    return frame


# --------------------------------------------------------------------------- loading


def _load_table(source: str, *, header: bool, sep: str | None, s3_client: Any) -> _Table:
    separator = _check_separator(sep)
    return _table_of(read_bytes(source, s3_client=s3_client), source, header=header, sep=separator)


def _load_tables(source: str, *, header: bool, sep: str | None, s3_client: Any) -> Iterator[_Table]:
    """``_load_table``'s rows, a Parquet file's a row group at a time (its rows numbered through the file), so
    that a large single file is held as its bytes and one row group's table, not as one table."""
    separator = _check_separator(sep)
    raw = read_bytes(source, s3_client=s3_client)
    if _looks_like_parquet(raw):
        yield from _parquet_row_groups(raw, source)
    else:
        yield _table_of(raw, source, header=header, sep=separator)


def text_part_limit() -> int | None:
    """The largest text part this process may parse: inside a Lambda function its memory divided by
    TEXT_MEMORY_FACTOR, in bytes; None elsewhere (a machine's memory is the user's to judge)."""
    memory_mb = os.environ.get(LAMBDA_MEMORY_ENV, "").strip()
    if not memory_mb.isdigit() or int(memory_mb) == 0:
        return None
    return int(memory_mb) * 2**20 // TEXT_MEMORY_FACTOR


def _check_text_size(size: int, source: str) -> None:
    limit = text_part_limit()
    if limit is not None and size > limit:
        raise InputDataError(
            f"a text part of {size / 2**20:,.0f} MB is more than this function's memory can parse "
            f"({limit / 2**20:,.0f} MB: parsing one takes about {TEXT_MEMORY_FACTOR} x its size, and it has "
            f"{int(limit * TEXT_MEMORY_FACTOR / 2**20):,} MB); nothing was stored. Export it as Parquet or as "
            "several smaller parts (docs/FORMATS.md), or deploy with a larger data_function_memory_mb "
            "(docs/DEPLOY.md)", source=source)


def _parquet_row_groups(raw: bytes, source: str) -> Iterator[_Table]:
    try:
        parquet = pq.ParquetFile(pa.BufferReader(raw), page_checksum_verification=True)
        groups = parquet.num_row_groups
    except (pa.ArrowException, OSError) as exc:
        raise InputDataError(f"not a readable Parquet file ({exc})", source=source) from exc
    if groups <= 1:
        yield _parquet_table(raw, source)
        return
    try:
        parquet.schema_arrow.names  # noqa: B018 (as _parquet_table: a name that is not UTF-8 is this file's error)
    except UnicodeDecodeError as exc:
        raise InputDataError(f"not a readable Parquet file (a column name is not UTF-8 text: {exc})",
                             source=source) from exc
    row_offset = 1
    for group in range(groups):
        try:
            data = parquet.read_row_group(group)
        except (pa.ArrowException, OSError) as exc:
            raise InputDataError(f"not a readable Parquet file (row group {group}: {exc})", source=source) from exc
        if data.num_rows:
            yield _Table(data=data, source=source, row_offset=row_offset, positional=False, delimited=False)
        row_offset += data.num_rows
    if row_offset == 1:
        raise InputDataError("Parquet file has no data rows", source=source)


def _table_of(raw: bytes, source: str, *, header: bool, sep: str | None) -> _Table:
    if not raw:
        raise InputDataError("file is empty", source=source)
    if _looks_like_parquet(raw):
        return _parquet_table(raw, source)
    if _named_parquet(source):
        raise InputDataError("is named .parquet but is not a Parquet file (no PAR1 magic at both ends)",
                             source=source)
    _check_text_size(len(raw), source)
    return _text_table(raw, source, header=header, sep=sep)


def _check_separator(sep: str | None) -> str | None:
    if sep is None:
        return None
    try:
        return check_separator(sep)
    except ValueError as exc:
        raise ConfigError(f"sep: {exc}, got {sep!r}") from None


def _looks_like_parquet(raw: bytes) -> bool:
    # A Parquet file starts and ends with PAR1; checking both keeps a text file whose first value
    # happens to start with "PAR1" from being taken for Parquet.
    return len(raw) >= 12 and raw.startswith(PARQUET_MAGIC) and raw.endswith(PARQUET_MAGIC)


def _named_parquet(source: str) -> bool:
    name = source.lower().removesuffix(".gz")
    return name.endswith(".parquet") or name.endswith(".pq")


def _parquet_table(raw: bytes, source: str) -> _Table:
    try:
        # Pages whose writer stored a CRC are checked: a flipped byte in the data is then an error
        # instead of a silently different value. (Pages written without one cannot be checked.)
        data = pq.read_table(pa.BufferReader(raw), page_checksum_verification=True)
    except (pa.ArrowException, OSError) as exc:
        raise InputDataError(f"not a readable Parquet file ({exc})", source=source) from exc
    try:
        # The schema's names are decoded only when asked for: a damaged footer can hold bytes that are
        # not UTF-8, which must be this file's error here, not a decoding error deep in a later stage.
        data.column_names  # noqa: B018
    except UnicodeDecodeError as exc:
        raise InputDataError(f"not a readable Parquet file (a column name is not UTF-8 text: {exc})",
                             source=source) from exc
    if data.num_rows == 0:
        raise InputDataError("Parquet file has no data rows", source=source)
    return _Table(data=data, source=source, row_offset=1, positional=False, delimited=False)


def _text_table(raw: bytes, source: str, *, header: bool, sep: str | None) -> _Table:
    _check_utf8(raw, source, header=header, sep=sep)
    start = len(UTF8_BOM) if raw.startswith(UTF8_BOM) else 0
    end = len(raw)
    # Trailing blank lines are dropped; blank lines elsewhere stay rows so row numbers stay true.
    while end > start and raw[end - 1] in b"\r\n":
        end -= 1
    if end == start:
        raise InputDataError("file is empty", source=source)
    head = _head_text(raw, start, end)
    # The parser needs the last record to end in a newline; keep the file's own when it has one.
    if end < len(raw):
        body = pa.py_buffer(raw).slice(start, end + 1 - start)
    else:
        body = pa.py_buffer(raw[start:] + b"\n")
    separator = sep if sep is not None else sniff_separator(head)

    data = _read_delimited(body, separator, _first_record_width(head, separator), source)
    if header:
        names = _header_names(data, source)
        data = data.slice(1).rename_columns(names)
        if data.num_rows == 0:
            raise InputDataError("has a header but no data rows", source=source)
        return _Table(data=data, source=source, row_offset=2, positional=False, delimited=True)
    data = data.rename_columns([str(i) for i in range(data.num_columns)])
    return _Table(data=data, source=source, row_offset=1, positional=True, delimited=True)


def _check_utf8(raw: bytes, source: str, *, header: bool, sep: str | None) -> None:
    for magic, what in NOT_TEXT_MAGIC.items():
        if raw.startswith(magic):
            raise InputDataError(f"is {what}", source=source)
    offset = _first_invalid_utf8(raw)
    if offset is not None:
        line = raw.count(b"\n", 0, offset) + 1
        line_start = raw.rfind(b"\n", 0, offset) + 1
        bad = raw[offset:offset + 1].hex()
        raise InputDataError(
            f"not valid UTF-8 (byte 0x{bad} at line {line}, character {offset - line_start + 1}); "
            f"save the file as UTF-8",
            source=source,
            row=line,
            column=None if header and line == 1 else _column_at(raw, line_start, offset, header=header, sep=sep),
        )


# Bytes checked as UTF-8 at a time: the check holds this much text, not the whole file's.
UTF8_CHECK_BYTES = 16 * 1024 * 1024


def _first_invalid_utf8(raw: bytes) -> int | None:
    """The offset of the first byte of ``raw`` that is not valid UTF-8 (a sequence cut off at the end
    included), or None; decoded ``UTF8_CHECK_BYTES`` at a time."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(raw)
    for start in range(0, len(raw), UTF8_CHECK_BYTES):
        pending = len(decoder.getstate()[0])  # the bytes of a sequence the last block cut
        chunk = view[start:start + UTF8_CHECK_BYTES]
        try:
            decoder.decode(chunk, final=start + UTF8_CHECK_BYTES >= len(raw))
        except UnicodeDecodeError as exc:
            return start - pending + exc.start
    return None


def _column_at(raw: bytes, line_start: int, offset: int, *, header: bool, sep: str | None) -> str | None:
    """Best effort: the column holding byte ``offset`` of the line starting at ``line_start`` (its
    header name, or its 0-based position without a header). Only for naming it in an error."""
    first_line = raw[: raw.find(b"\n") if b"\n" in raw else len(raw)].decode("utf-8", "replace").lstrip("\ufeff")
    separator = sep or sniff_separator(raw[:SNIFF_BYTES].decode("utf-8", "replace"))
    prefix = raw[line_start:offset].decode("utf-8", "replace")
    try:
        position = len(next(csv.reader([prefix], delimiter=separator), [""])) - 1
        names = next(csv.reader([first_line], delimiter=separator), []) if header else []
    except csv.Error:
        return None
    if not header:
        return str(max(position, 0))
    return names[position].strip() if 0 <= position < len(names) else None


def _head_text(raw: bytes, start: int, end: int) -> str:
    """The first complete lines of the file (at most SNIFF_BYTES), for sniffing."""
    stop = min(end, start + SNIFF_BYTES)
    head = raw[start:stop]
    if stop < end:
        head = head[: head.rfind(b"\n") + 1] or head
    return head.decode("utf-8", errors="ignore")


def sniff_separator(text: str) -> str:
    """Pick the separator that splits the first records of ``text`` into the same number (> 1) of
    fields most consistently; ties go to the earlier of ``CANDIDATE_SEPARATORS``. Text no candidate
    splits (a single column) gets ``","``."""
    best: tuple[float, int] | None = None
    chosen = ","
    for rank, candidate in enumerate(CANDIDATE_SEPARATORS):
        counts = _field_counts(text, candidate)
        if not counts:
            continue
        width, hits = Counter(counts).most_common(1)[0]
        if width < 2:
            continue
        score = (hits / len(counts), -rank)
        if best is None or score > best:
            best, chosen = score, candidate
    return chosen


def _field_counts(text: str, separator: str) -> list[int]:
    counts: list[int] = []
    try:
        for record in csv.reader(io.StringIO(text), delimiter=separator):
            if record:
                counts.append(len(record))
            if len(counts) >= SNIFF_RECORDS:
                break
    except csv.Error:
        return []
    return counts


def _first_record_width(head: str, separator: str) -> int:
    try:
        record = next(csv.reader(io.StringIO(head), delimiter=separator), [])
    except csv.Error:
        record = []
    return max(len(record), 1)


def _read_delimited(body: pa.Buffer, separator: str, width_hint: int, source: str) -> pa.Table:
    """Parse delimited text into string columns ``f0..``; the header, if any, is row 0."""
    data = _read_delimited_once(body, separator, width_hint, source)
    if any(not pa.types.is_string(t) for t in data.schema.types):
        # The quick look at the first record under-counted its fields: read again, all as text.
        data = _read_delimited_once(body, separator, data.num_columns, source)
    return data


def _read_delimited_once(body: pa.Buffer, separator: str, width: int, source: str) -> pa.Table:
    first_bad: list[Any] = []

    def stop_at_invalid_row(row: Any) -> str:
        first_bad.append(row)
        return "error"

    read_options = pa_csv.ReadOptions(
        autogenerate_column_names=True, use_threads=False, block_size=CSV_BLOCK_BYTES
    )
    parse_options = pa_csv.ParseOptions(
        delimiter=separator,
        newlines_in_values=True,
        ignore_empty_lines=False,
        invalid_row_handler=stop_at_invalid_row,
    )
    # Every column is read as text: nothing is inferred, so ids keep their leading zeros.
    convert_options = pa_csv.ConvertOptions(
        column_types={f"f{i}": pa.string() for i in range(width)},
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    try:
        return pa_csv.read_csv(
            pa.BufferReader(body),
            read_options=read_options,
            parse_options=parse_options,
            convert_options=convert_options,
        )
    except (pa.ArrowException, OSError) as exc:
        if first_bad:
            first_line = body.slice(0, min(4096, body.size)).to_pybytes().split(b"\n", 1)[0].decode("utf-8", "ignore")
            raise _ragged_row_error(first_bad[0], separator, source, first_line) from exc
        hint = ""
        if body.to_pybytes().count(b'"') % 2:
            hint = "; an unbalanced quote makes a value run to the end of the file"
        raise InputDataError(f"cannot be parsed as delimited text ({exc}){hint}", source=source) from exc


def _ragged_row_error(row: Any, separator: str, source: str, first_line: str) -> InputDataError:
    number = row.number if row.number is not None and row.number > 0 else None
    text = row.text if len(row.text) <= 80 else row.text[:77] + "..."
    hint = "; check for an unbalanced quote" if row.text.count('"') % 2 else ""
    if not hint and row.expected_columns == 1:
        other = _splitting_separator(first_line, exclude=separator)
        if other is not None:
            hint = (f"; the first row has no {separator!r} but has {other!r}: do the header and the rows "
                    f"use different separators?")
    return InputDataError(
        f"has {row.actual_columns} field(s) but the first row has {row.expected_columns} "
        f"(separator {separator!r}): {text!r}{hint}",
        source=source,
        row=number,
    )


def _splitting_separator(text: str, *, exclude: str) -> str | None:
    """The first of ``CANDIDATE_SEPARATORS`` other than ``exclude`` that occurs in ``text``."""
    return next((c for c in CANDIDATE_SEPARATORS if c != exclude and c in text), None)


def _header_names(data: pa.Table, source: str) -> list[str]:
    # Spreadsheet exports often end lines with empty cells; such columns get a placeholder name.
    names = [str(data.column(i)[0].as_py()).strip() or f"unnamed_{i}" for i in range(data.num_columns)]
    seen: dict[str, int] = {}
    for position, name in enumerate(names):
        if name in seen:
            raise InputDataError(
                f"column name {name!r} appears twice in the header (columns {seen[name] + 1} and {position + 1})",
                source=source,
                row=1,
                column=name,
            )
        seen[name] = position
    return names


# --------------------------------------------------------------------------- columns


def _positional_default(spec: str | int | None, default: str, position: int) -> str | int | None:
    return position if spec == default else spec


def _resolve_column(table: _Table, spec: str | int, role: str) -> str:
    """The name of the column ``spec`` means: a name, or a 0-based position (an int, or a digit
    string when the file has no header)."""
    columns = table.columns
    if isinstance(spec, bool) or not isinstance(spec, (int, str)):
        raise ConfigError(f"{role} column must be a name or a 0-based position, got {spec!r}")
    if isinstance(spec, str) and table.positional and spec.strip().isdigit():
        spec = int(spec)
    if isinstance(spec, int):
        if spec < 0:
            raise ConfigError(f"{role} column position must be >= 0, got {spec}")
        if spec >= len(columns):
            raise InputDataError(
                f"no column at position {spec} for the {role}; the file has {len(columns)} column(s)",
                source=table.source,
                column=str(spec),
            )
        return columns[spec]
    if spec not in columns:
        raise InputDataError(_missing_column_message(table, spec, role), source=table.source, column=spec)
    return spec


def _missing_column_message(table: _Table, name: str, role: str) -> str:
    found = ", ".join(repr(c) for c in table.columns)
    if table.positional:
        return (f"no column {name!r} for the {role}: the file has no header, so columns are 0-based "
                f"positions ({found})")
    hint = ""
    if any(_is_number(column) for column in table.columns):
        hint = " (a column named by a number: is the header row missing?)"
    return f"no column {name!r} for the {role}; columns found: {found}{hint}"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _resolve_rating_column(
    table: _Table, spec: str | int | None, *, implicit: bool, optional: bool
) -> str | None:
    if spec is None or (optional and not _has_column(table, spec)):
        return None
    return _resolve_column(table, spec, "interaction strength" if implicit else "rating")


def _has_column(table: _Table, spec: str | int) -> bool:
    if isinstance(spec, int):
        return 0 <= spec < table.data.num_columns
    return spec in table.columns


def _is_text(data_type: pa.DataType) -> bool:
    return pa.types.is_string(data_type) or pa.types.is_large_string(data_type)


def _first_true(mask: pa.ChunkedArray | pa.Array) -> int | None:
    position = pc.index(mask, True).as_py()
    return None if position < 0 else position


def _id_column(table: _Table, name: str, what: str) -> pa.ChunkedArray:
    """Column ``name`` as stripped, non-empty strings; integer ids become their decimal text."""
    column = table.data.column(name)
    data_type = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
    if not (pa.types.is_integer(data_type) or _is_text(data_type)):
        raise InputDataError(
            f"{what} column has type {data_type}; ids must be text or integers",
            source=table.source,
            column=name,
        )
    if not _is_text(column.type):
        column = column.cast(pa.string())
    column = pc.utf8_trim_whitespace(column)
    empty = pc.fill_null(pc.equal(column, ""), True)
    position = _first_true(empty)
    if position is not None:
        raise InputDataError(f"{what} is empty", source=table.source, row=table.row(position), column=name)
    position = _first_true(pc.greater(pc.binary_length(column), MAX_ID_BYTES))
    if position is not None:
        length = len(column[position].as_py().encode("utf-8"))
        raise InputDataError(
            f"{what} is {length:,} bytes long; ids may be at most {MAX_ID_BYTES:,} bytes (UTF-8)",
            source=table.source,
            row=table.row(position),
            column=name,
        )
    return column


def _number_column(table: _Table, name: str, what: str) -> np.ndarray:
    """Column ``name`` as finite float64 values: (n_rows,). Text must parse as numbers."""
    column = table.data.column(name)
    if _is_text(column.type):
        values = _parse_numbers(pc.utf8_trim_whitespace(column))
    elif pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_decimal(
        column.type
    ) or pa.types.is_boolean(column.type):
        values = column.cast(pa.float64()).to_numpy()
    else:
        raise InputDataError(
            f"{what} column has type {column.type}; expected numbers", source=table.source, column=name
        )
    bad = ~np.isfinite(values)
    if bad.any():
        position = int(np.argmax(bad))
        raise InputDataError(
            _bad_number_reason(column[position].as_py(), values[position], what),
            source=table.source,
            row=table.row(position),
            column=name,
        )
    return values


def _parse_numbers(text: pa.ChunkedArray) -> np.ndarray:
    """Text to float64; a value that is not a number becomes NaN. (n,) float64."""
    try:
        return pc.cast(text, pa.float64()).to_numpy()
    except pa.ArrowInvalid:
        # Some value does not parse; pandas marks each such value NaN so the first can be found.
        return pd.to_numeric(text.to_pandas(), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def _bad_number_reason(original: Any, value: float, what: str) -> str:
    if original is None or (isinstance(original, str) and not original.strip()):
        return f"{what} is empty"
    if np.isinf(value):
        return f"{what} {original!r} is not finite"
    return f"{what} {original!r} is not a number"


def _time_column(table: _Table, name: str, *, default: bool = False) -> np.ndarray:
    """Column ``name`` as int64 seconds since the epoch (UTC): (n_rows,). ``default``: the column is read
    because of its name, not because the caller named it; an error then says how to leave it unread.
    """
    try:
        return _time_values(table, name)
    except InputDataError as exc:
        if not default:
            raise
        raise InputDataError(f"{exc.reason} (a column named {name} is read as the time of each row by default; "
                             "--no-time-col, or no_time_col in a dataset configuration, leaves it unread)",
                             source=exc.source, row=exc.row, column=exc.column) from None


def _time_values(table: _Table, name: str) -> np.ndarray:
    """Column ``name`` as int64 seconds since the epoch (UTC): (n_rows,).

    Numbers are epoch seconds, or milliseconds when the largest exceeds ``MAX_EPOCH_SECONDS`` (one
    unit for the whole column: a file mixing them is refused where a value is out of range); text is
    ISO-8601 (``2024-05-01``, ``2024-05-01T12:30:00Z``, ``2024-05-01 12:30:00+02:00``; no offset means
    UTC); Parquet timestamps and dates are read as they are typed.
    """
    column = table.data.column(name)
    data_type = column.type
    if pa.types.is_timestamp(data_type) or pa.types.is_date(data_type):
        missing = _first_true(pc.is_null(column))
        if missing is not None:
            raise InputDataError("time is empty", source=table.source, row=table.row(missing), column=name)
        seconds = column.cast(pa.timestamp("s", tz="UTC") if pa.types.is_timestamp(data_type) else pa.date64())
        values = seconds.cast(pa.int64()).to_numpy()
        return values // 1000 if pa.types.is_date(data_type) else values
    if _is_text(data_type):
        text = pc.utf8_trim_whitespace(column)
        numeric = _parse_numbers(text)
        finite = np.isfinite(numeric)
        if finite.all():
            return _epoch_seconds(table, name, numeric)
        if finite[0]:  # a column of epoch numbers, with a value that is not one
            position = int(np.argmin(finite))
            value = text[position].as_py()
            reason = "time is empty" if not value else (
                f"time {value!r} is not epoch seconds or milliseconds, as the column's first values are")
            raise InputDataError(reason, source=table.source, row=table.row(position), column=name)
        return _iso_seconds(table, name, text)
    if pa.types.is_integer(data_type) or pa.types.is_floating(data_type) or pa.types.is_decimal(data_type):
        return _epoch_seconds(table, name, _number_column(table, name, "time"))
    raise InputDataError(f"time column has type {data_type}; expected epoch seconds or milliseconds, ISO-8601 "
                         "text, or a timestamp", source=table.source, column=name)


def _epoch_seconds(table: _Table, name: str, values: np.ndarray) -> np.ndarray:
    """Epoch numbers (n,) float64 as int64 seconds: milliseconds when any exceeds MAX_EPOCH_SECONDS."""
    millis = bool(len(values)) and float(np.nanmax(np.abs(values))) > MAX_EPOCH_SECONDS
    seconds = values / 1000.0 if millis else values
    unit = "milliseconds" if millis else "seconds"
    _raise_at_first(table, name, ~np.isfinite(seconds) | (np.abs(seconds) > MAX_EPOCH_SECONDS),
                    lambda v: f"time {v:g} is not epoch seconds or milliseconds (read as {unit})", values)
    if millis:
        # Milliseconds before 1973 beside later ones are seconds in a column of milliseconds.
        _raise_at_first(table, name, np.abs(values) < MAX_EPOCH_SECONDS,
                        lambda v: f"time {v:g} looks like epoch seconds in a column of milliseconds", values)
    return np.floor(seconds).astype(np.int64)


def _iso_seconds(table: _Table, name: str, text: pa.ChunkedArray) -> np.ndarray:
    """ISO-8601 text (n,) as int64 seconds (UTC); the first value that does not parse is an error."""
    series = pd.Series(text.to_pandas(), dtype="object")
    parsed = pd.to_datetime(series, format="ISO8601", utc=True, errors="coerce")
    bad = parsed.isna().to_numpy()
    if bad.any():
        position = int(np.argmax(bad))
        value = series.iloc[position]
        reason = "time is empty" if value is None or value == "" else (
            f"time {value!r} is not ISO-8601 (e.g. 2024-05-01 or 2024-05-01T12:30:00Z) nor epoch seconds")
        raise InputDataError(reason, source=table.source, row=table.row(position), column=name)
    return (parsed.astype("datetime64[ns, UTC]").to_numpy(dtype="datetime64[s]").astype(np.int64))


def _rating_column(table: _Table, name: str, what: str, *, allow_negative: bool) -> np.ndarray:
    """Finite ratings or strengths that fit float32: (n_rows,) float32."""
    values = _number_column(table, name, what)
    _raise_at_first(table, name, np.abs(values) > FLOAT32_MAX,
                    lambda v: f"{what} {v!r} is too large (beyond float32)", values)
    if not allow_negative:
        _raise_at_first(table, name, values < 0,
                        lambda v: f"{what} {v!r} is negative; for ranking, ratings and strengths must be >= 0 "
                                  f"(drop the low ones with --min-rating, or predict them with --objective rating)",
                        values)
    return values.astype(np.float32)


def _raise_at_first(
    table: _Table, name: str, mask: np.ndarray, reason: Callable[[float], str], values: np.ndarray
) -> None:
    if mask.any():
        position = int(np.argmax(mask))
        raise InputDataError(
            reason(float(values[position])), source=table.source, row=table.row(position), column=name
        )


def _check_unique_keys(table: _Table, keys: pa.ChunkedArray, name: str) -> None:
    series = pd.Series(keys.to_pandas(), dtype="str")
    duplicated = series.duplicated(keep="first").to_numpy()
    if not duplicated.any():
        return
    second = int(np.argmax(duplicated))
    key = series.iloc[second]
    first = int(np.argmax((series == key).to_numpy()))
    raise InputDataError(
        f"duplicate key {key!r} in rows {table.row(first)} and {table.row(second)}",
        source=table.source,
        row=table.row(second),
        column=name,
    )


def _typed_text_column(column: pa.ChunkedArray) -> pd.Series:
    """A text feature column: numeric when every present value parses as a number (``MISSING_TOKENS``
    cells counting as missing, NaN), else stripped text with ``TEXT_MISSING_TOKENS`` cells NaN."""
    text = missing_to_null(column)
    if text.null_count == 0 and _casts(text, pa.int64()):
        return pd.Series(pc.cast(text, pa.int64()).to_numpy(), dtype=np.int64)
    numbers = numbers_or_none(text)
    if numbers is not None:
        return pd.Series(numbers, dtype=np.float64)
    return pd.Series(text_missing_to_null(column).to_pandas(), dtype="str")


def missing_to_null(text: pa.Array | pa.ChunkedArray,
                    tokens: frozenset[str] = MISSING_TOKENS) -> pa.Array | pa.ChunkedArray:
    """Text cells stripped of surrounding whitespace, with ``tokens`` cells (any case) made null;
    ``MISSING_TOKENS`` is how a column is read when deciding whether it is numeric."""
    stripped = pc.utf8_trim_whitespace(text)
    missing = pc.is_in(pc.utf8_lower(stripped), value_set=pa.array(sorted(tokens), pa.string()))
    return pc.if_else(missing, pa.scalar(None, stripped.type), stripped)


def text_missing_to_null(text: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Text cells stripped of surrounding whitespace, with ``TEXT_MISSING_TOKENS`` cells made null: a
    text column's values, where ``none`` may be a category."""
    return missing_to_null(text, TEXT_MISSING_TOKENS)


def numbers_or_none(text: pa.Array | pa.ChunkedArray) -> np.ndarray | None:
    """(n,) float64 when every non-null cell parses as a number (nulls become NaN), else None."""
    if not _casts(text, pa.float64()):
        return None
    return pc.cast(text, pa.float64()).to_numpy(zero_copy_only=False)


def _casts(text: pa.Array | pa.ChunkedArray, target: pa.DataType) -> bool:
    # A failing cast of a whole column is slow (tens of ms per 100k cells), and text columns
    # usually fail on their first values, so a short head is tried first.
    for candidate in (text.drop_null().slice(0, 64), text):
        try:
            pc.cast(candidate, target)
        except pa.ArrowInvalid:
            return False
    return True
