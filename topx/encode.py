"""Encoding a side-feature table into sparse model features aligned with a list of ids.

Each column of the table becomes one or more features, decided per column:

- **numeric** (a numeric or boolean dtype, or text whose present values all parse as numbers, so
  0/1 flags count): one feature named ``<column>``, standardised over the table's rows with the
  population standard deviation. A missing value becomes 0 (the mean). A column with standard
  deviation 0 (constant, or entirely missing) is *kept* as an all-zero feature: every numeric
  column then yields exactly one feature, so the layout is predictable from the table alone, and
  an all-zero column costs nothing in a sparse matrix. Infinite values are an error.
- **categorical** (any other text): one-hot, one feature per distinct value, named
  ``<column>=<value>``, values sorted for determinism. A missing value is an all-zero row.
- **multi-valued categorical**: a text column where some value contains ``multi_sep``
  (``"Action|Comedy"``): one feature per distinct token, and each of a row's tokens is set to
  1.0 (not ``1/sqrt(n_tokens)``: a film that is both Action and Comedy is fully each, and the FM
  learns its own scale). Tokens are stripped, empty tokens ignored, repeats counted once.

A missing value is an empty cell or ``NA``/``N/A``/``NaN``/``null`` (any case); in a column that
is otherwise numeric, ``None`` is missing too, while in a text column it is a category like any
other (an occupation ``none``). Text such as ``true``/``false`` is categorical; store flags as 0/1
to get a numeric feature.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from topx.errors import ConfigError, InputDataError
from topx.ingest import missing_to_null, numbers_or_none, text_missing_to_null

UNKNOWN_EXAMPLES = 5


@dataclass(frozen=True)
class EncodedFeatures:
    """matrix: (len(ids), len(names)) float32 CSR, row r for ids[r]; names: one per matrix column.

    unknown_ids: table rows whose key is not among the ids (reported, not fatal), with up to
    five ``unknown_examples`` in table order; missing_ids: ids without a table row (all-zero rows).
    """

    matrix: sp.csr_matrix
    names: tuple[str, ...]
    unknown_ids: int
    unknown_examples: tuple[str, ...]
    missing_ids: int


@dataclass(frozen=True)
class _Block:
    """One column's features over the table's rows, in COO form: entry k is (rows[k], cols[k])."""

    column: str
    names: list[str]
    rows: np.ndarray  # (nnz,) int64 table positions
    cols: np.ndarray  # (nnz,) int64, 0..len(names)-1
    values: np.ndarray  # (nnz,) float32


@dataclass(frozen=True)
class _Context:
    source: str | None
    row_offset: int

    def error(self, message: str, position: int | None, column: str) -> InputDataError:
        row = None if position is None else position + self.row_offset
        return InputDataError(message, source=self.source, row=row, column=column)


def encode_features(
    table: pd.DataFrame,
    ids: Sequence[str],
    *,
    source: str | None = None,
    multi_sep: str = "|",
) -> EncodedFeatures:
    """Encode ``table`` (indexed by key, e.g. from :func:`topx.ingest.read_feature_table`) for ``ids``.

    Row r of the matrix holds the features of ``ids[r]``. Errors name ``source`` (default
    ``table.attrs["source"]``) and the file row: table position + ``table.attrs["row_offset"]``
    (1 when absent, i.e. the 1-based table position).
    """
    if not multi_sep:
        raise ConfigError("multi_sep must be a non-empty string")
    context = _Context(
        source=source if source is not None else table.attrs.get("source"),
        row_offset=int(table.attrs.get("row_offset", 1)),
    )
    # Object-dtype indexes: hashing Python strings is far faster here than Arrow-backed lookups.
    keys = pd.Index(table.index.astype("str").to_numpy(dtype=object), dtype=object)
    _check_unique_keys(keys, context, str(table.index.name) if table.index.name is not None else None)
    wanted = pd.Index(np.asarray([str(i) for i in ids], dtype=object), dtype=object)

    blocks = [
        _encode_column(table.iloc[:, j], str(table.columns[j]), multi_sep, context)
        for j in range(table.shape[1])
    ]
    names = _unique_names(blocks, context)
    by_table_row = _assemble(blocks, n_rows=len(keys), n_features=len(names))

    positions = keys.get_indexer(wanted)
    unknown = keys[~keys.isin(wanted)]
    return EncodedFeatures(
        matrix=_select_rows(by_table_row, positions),
        names=tuple(names),
        unknown_ids=len(unknown),
        unknown_examples=tuple(str(key) for key in unknown[:UNKNOWN_EXAMPLES]),
        missing_ids=int((positions < 0).sum()),
    )


def _check_unique_keys(keys: pd.Index, context: _Context, key_name: str | None) -> None:
    duplicated = keys.duplicated(keep="first")
    if not duplicated.any():
        return
    second = int(np.argmax(duplicated))
    first = int(np.argmax(keys == keys[second]))
    raise context.error(
        f"duplicate key {keys[second]!r} in rows {first + context.row_offset} and {second + context.row_offset}",
        second,
        key_name,
    )


def _encode_column(values: pd.Series, column: str, multi_sep: str, context: _Context) -> _Block:
    dtype = values.dtype
    if pd.api.types.is_bool_dtype(dtype) or (
        pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_complex_dtype(dtype)
    ):
        return _numeric_block(values.to_numpy(dtype=np.float64, na_value=np.nan), column, context)
    if not (pd.api.types.is_object_dtype(dtype) or pd.api.types.is_string_dtype(dtype)
            or isinstance(dtype, pd.CategoricalDtype)):
        raise context.error(f"column has type {dtype}; features must be numbers or text", None, column)
    text = _clean_text(values)
    numbers = numbers_or_none(missing_to_null(text))
    if numbers is not None:
        return _numeric_block(numbers, column, context)
    if pc.any(pc.match_substring(text, multi_sep)).as_py():
        return _multi_valued_block(text, column, multi_sep)
    present = pc.is_valid(text).to_numpy(zero_copy_only=False)
    return _one_hot(np.flatnonzero(present), text.drop_null(), column)


def _clean_text(values: pd.Series) -> pa.Array:
    """(n,) stripped text, missing cells (``TEXT_MISSING_TOKENS``) null."""
    as_text = pd.Series(values.to_numpy(dtype=object), dtype="str")
    return text_missing_to_null(pa.array(as_text, type=pa.string()))


def _numeric_block(x: np.ndarray, column: str, context: _Context) -> _Block:
    infinite = np.isinf(x)
    if infinite.any():
        position = int(np.argmax(infinite))
        raise context.error(f"value {x[position]} is not finite", position, column)
    present = ~np.isnan(x)
    scaled = np.zeros_like(x)
    if present.any():
        # Divide by the largest magnitude first so squaring inside std cannot overflow.
        magnitude = float(np.max(np.abs(x[present])))
        if magnitude > 0:
            y = x[present] / magnitude
            std = float(y.std())
            if std > 0:
                scaled[present] = (y - y.mean()) / std
    rows = np.flatnonzero(scaled)
    return _Block(
        column=column,
        names=[column],
        rows=rows.astype(np.int64),
        cols=np.zeros(len(rows), dtype=np.int64),
        values=scaled[rows].astype(np.float32),
    )


def _multi_valued_block(text: pa.Array, column: str, multi_sep: str) -> _Block:
    lists = pc.split_pattern(text, pattern=multi_sep)
    rows = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    tokens = pc.utf8_trim_whitespace(pc.list_flatten(lists))
    keep = pc.not_equal(tokens, "")
    block = _one_hot(rows[keep.to_numpy(zero_copy_only=False)], tokens.filter(keep), column)
    # A token repeated within a row ("A|A") is set once, not summed.
    width = max(len(block.names), 1)
    pairs = np.unique(block.rows * width + block.cols)
    return _Block(column=column, names=block.names, rows=pairs // width, cols=pairs % width,
                  values=np.ones(len(pairs), dtype=np.float32))


def _one_hot(rows: np.ndarray, tokens: pa.Array, column: str) -> _Block:
    """rows: (n,) table positions; tokens: (n,) non-null text; each pair sets ``column=token`` to 1.0."""
    vocabulary = sorted(pc.unique(tokens).to_pylist())
    cols = pc.index_in(tokens, value_set=pa.array(vocabulary, pa.string()))
    return _Block(
        column=column,
        names=[f"{column}={value}" for value in vocabulary],
        rows=rows.astype(np.int64),
        cols=cols.to_numpy(zero_copy_only=False).astype(np.int64),
        values=np.ones(len(rows), dtype=np.float32),
    )


def _unique_names(blocks: list[_Block], context: _Context) -> list[str]:
    names: list[str] = []
    origin: dict[str, str] = {}
    for block in blocks:
        for name in block.names:
            if name in origin:
                raise context.error(
                    f"feature name {name!r} is produced by both column {origin[name]!r} and this one; "
                    "rename one of them",
                    None,
                    block.column,
                )
            origin[name] = block.column
            names.append(name)
    return names


def _assemble(blocks: list[_Block], *, n_rows: int, n_features: int) -> sp.csr_matrix:
    """All blocks side by side: (n_rows, n_features) float32 CSR over the table's rows."""
    offsets = np.cumsum([0] + [len(block.names) for block in blocks])
    rows = np.concatenate([block.rows for block in blocks] + [np.zeros(0, dtype=np.int64)])
    cols = np.concatenate(
        [block.cols + offset for block, offset in zip(blocks, offsets, strict=False)]
        + [np.zeros(0, dtype=np.int64)]
    )
    values = np.concatenate([block.values for block in blocks] + [np.zeros(0, dtype=np.float32)])
    return sp.csr_matrix((values, (rows, cols)), shape=(n_rows, n_features), dtype=np.float32)


def _select_rows(by_table_row: sp.csr_matrix, positions: np.ndarray) -> sp.csr_matrix:
    """Rows ``positions`` of the table matrix; position -1 gives an all-zero row."""
    n_rows, n_features = by_table_row.shape
    padded = sp.vstack([by_table_row, sp.csr_matrix((1, n_features), dtype=np.float32)], format="csr")
    selected = padded[np.where(positions < 0, n_rows, positions)]
    selected = sp.csr_matrix(selected, dtype=np.float32)
    selected.sort_indices()
    return selected
