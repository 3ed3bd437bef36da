"""SageMaker's training data format: RecordIO-wrapped protobuf ``aialgs.data.Record`` messages.

SageMaker's built-in factorization machines train on this (``application/x-recordio-protobuf``),
as written by ``sagemaker.amazon.common.write_spmatrix_to_sparse_tensor``. topx reads and writes it
without ``protobuf``: the wire format of the one message schema involved is decoded here.

RecordIO framing (dmlc-core): each record is a uint32 magic ``0xCED7230A``, a uint32 ``lrec``
whose low 29 bits are the payload length and whose high 3 bits are a continuation flag, the
payload, and zero padding to a multiple of 4 bytes. Flag 0 is a whole record; a payload that
contains the magic at a 4-byte aligned offset may be split there by dmlc's writer into parts
flagged 1 (first), 2 (middle), 3 (last), the magic itself removed and put back on reading.

The schema (``record.proto``, package ``aialgs.data``), the fields read here::

    Record        { map<string, Value> features = 1; map<string, Value> label = 2; ... }
    Value         { oneof { Float32Tensor float32_tensor = 2; Float64Tensor float64_tensor = 3;
                            Int32Tensor int32_tensor = 7; Bytes bytes = 9; } }
    Float32Tensor { repeated float values = 1 [packed]; repeated uint64 keys = 2 [packed];
                    repeated uint64 shape = 3 [packed]; }

``features["values"]`` is one row: sparse when ``keys`` are given (``shape`` then holds the
number of columns N), dense otherwise. ``label["values"]`` holds the row's label. docs/FORMATS.md
has the details.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import scipy.sparse as sp

from topx.errors import InputDataError

RECORDIO_MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", RECORDIO_MAGIC)
_LENGTH_BITS = 29
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1

# Protobuf wire types.
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5

# Field numbers of aialgs.data.Record and its parts.
_RECORD_FEATURES, _RECORD_LABEL = 1, 2
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_VALUE_FLOAT32, _VALUE_FLOAT64, _VALUE_INT32, _VALUE_BYTES = 2, 3, 7, 9
_TENSOR_VALUES, _TENSOR_KEYS, _TENSOR_SHAPE = 1, 2, 3

_TENSOR_KINDS = {_VALUE_FLOAT32: "float32", _VALUE_FLOAT64: "float64", _VALUE_INT32: "int32"}
_VALUES_KEY = "values"
_SHORT_PACKED_BYTES = 32


class _DecodeError(Exception):
    """A protobuf decoding problem at ``position`` within one record's payload."""

    def __init__(self, message: str, position: int | None) -> None:
        super().__init__(message)
        self.position = position


@dataclass(frozen=True)
class _Tensor:
    """One decoded tensor: values (float64 before the final cast), keys (uint64) and shape."""

    values: np.ndarray
    keys: np.ndarray
    shape: np.ndarray


@dataclass(frozen=True)
class _Row:
    values: np.ndarray  # (nnz,) float32
    columns: np.ndarray  # (nnz,) int64
    n_columns: int
    label: float


def read_recordio_protobuf(
    source: str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO,
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Read RecordIO-protobuf training data: ``(x: (n, N) float32 CSR, y: (n,) float32)``.

    ``source`` is a path, the file's bytes, or a binary file object. Rows without a label get NaN.
    Every row must have the same N. Raises ``InputDataError`` naming the record (``row``, 1-based)
    and the byte offset for anything malformed.
    """
    data, name = _read_source(source)
    rows: list[_Row] = []
    for number, (offset, payload) in enumerate(iter_recordio(data, name), start=1):
        row = _decode_row(payload, name, number, offset)
        if rows and row.n_columns != rows[0].n_columns:
            raise InputDataError(
                f"record at byte offset {offset} has {row.n_columns} columns, the first record has "
                f"{rows[0].n_columns}",
                source=name, row=number, column="features",
            )
        rows.append(row)
    return _assemble(rows)


def iter_recordio(data: bytes, source: str = "<bytes>") -> Iterator[tuple[int, bytes]]:
    """Yield ``(byte offset, payload)`` of each RecordIO record, joining continued parts."""
    offset, number = 0, 0
    while offset < len(data):
        number += 1
        start = offset
        parts: list[bytes] = []
        while True:
            flag, length, offset = _read_part_header(data, offset, source, number)
            expected = (0, 1) if not parts else (2, 3)
            if flag not in expected:
                raise InputDataError(
                    f"RecordIO continuation flag {flag} at byte offset {offset - 8}, expected one of {expected}",
                    source=source, row=number,
                )
            padded = (length + 3) & ~3
            if offset + padded > len(data):
                raise InputDataError(
                    f"truncated record: payload of {length} bytes (padded to {padded}) at byte offset {offset} "
                    f"runs past the end of the data ({len(data)} bytes)",
                    source=source, row=number,
                )
            parts.append(data[offset : offset + length])
            offset += padded
            if flag in (0, 3):
                break
            # dmlc's writer cut the payload at a copy of the magic and dropped it: put it back.
            parts.append(_MAGIC_BYTES)
        yield start, b"".join(parts)


def write_recordio_protobuf(
    target: str | os.PathLike[str] | BinaryIO,
    matrix: sp.spmatrix | sp.sparray | np.ndarray,
    labels: np.ndarray | None = None,
) -> None:
    """Write rows as SageMaker's writers do (``write_spmatrix_to_sparse_tensor`` for a sparse matrix,
    ``write_numpy_to_dense_tensor`` for a dense one), Float32 tensors, one record per row."""
    payload = recordio_protobuf_bytes(matrix, labels)
    if isinstance(target, str | os.PathLike):
        Path(target).write_bytes(payload)
    else:
        target.write(payload)


def recordio_protobuf_bytes(
    matrix: sp.spmatrix | sp.sparray | np.ndarray, labels: np.ndarray | None = None
) -> bytes:
    """The bytes ``write_recordio_protobuf`` writes. ``matrix``: (n, N); ``labels``: (n,)."""
    sparse = sp.issparse(matrix)
    rows = sp.csr_matrix(matrix) if sparse else np.asarray(matrix)
    if rows.ndim != 2:
        raise InputDataError(f"expected a 2-D matrix, got shape {rows.shape}")
    n_rows, n_columns = rows.shape
    label_values = None if labels is None else np.asarray(labels, dtype=np.float32).reshape(-1)
    if label_values is not None and label_values.shape[0] != n_rows:
        raise InputDataError(f"{label_values.shape[0]} labels for {n_rows} rows")
    out = bytearray()
    for i in range(n_rows):
        if sparse:
            lo, hi = rows.indptr[i], rows.indptr[i + 1]
            tensor = _encode_tensor(rows.data[lo:hi], rows.indices[lo:hi], [n_columns])
        else:
            tensor = _encode_tensor(rows[i], None, None)
        record = _length_delimited(_RECORD_FEATURES, _map_entry(tensor))
        if label_values is not None:
            record += _length_delimited(_RECORD_LABEL, _map_entry(_encode_tensor(label_values[i : i + 1], None, None)))
        out += _frame(record)
    return bytes(out)


# --- reading -----------------------------------------------------------------------------------


def _read_source(
    source: str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO,
) -> tuple[bytes, str]:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source), "<bytes>"
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        try:
            return path.read_bytes(), str(path)
        except OSError as exc:
            raise InputDataError(f"cannot read RecordIO data: {exc}", source=str(path)) from exc
    return source.read(), str(getattr(source, "name", "<stream>"))


def _read_part_header(data: bytes, offset: int, source: str, number: int) -> tuple[int, int, int]:
    """(flag, payload length, payload offset) of the record part whose header is at ``offset``."""
    if len(data) - offset < 8:
        raise InputDataError(
            f"truncated record header at byte offset {offset}: {len(data) - offset} bytes left, 8 needed",
            source=source, row=number,
        )
    magic, lrec = struct.unpack_from("<II", data, offset)
    if magic != RECORDIO_MAGIC:
        raise InputDataError(
            f"bad RecordIO magic {magic:#010x} at byte offset {offset}, expected {RECORDIO_MAGIC:#010x}",
            source=source, row=number,
        )
    return lrec >> _LENGTH_BITS, lrec & _LENGTH_MASK, offset + 8


def _decode_row(payload: bytes, source: str, number: int, offset: int) -> _Row:
    try:
        features, label = _decode_record(payload)
        return _make_row(payload, features, label)
    except _DecodeError as exc:
        where = "" if exc.position is None else f" (payload byte {exc.position})"
        raise InputDataError(f"record at byte offset {offset}: {exc}{where}", source=source, row=number) from exc


def _decode_record(payload: bytes) -> tuple[dict[str, tuple[int, int, int] | None], dict[str, tuple[int, int, int] | None]]:
    """The features and label maps: key -> (Value kind, start, end) of the chosen tensor, or None."""
    features: dict[str, tuple[int, int, int] | None] = {}
    label: dict[str, tuple[int, int, int] | None] = {}
    for field, wire, start, end in _fields(payload, 0, len(payload)):
        if field in (_RECORD_FEATURES, _RECORD_LABEL):
            _expect_wire(wire, _LENGTH_DELIMITED, field, start)
            key, value = _decode_map_entry(payload, start, end)
            (features if field == _RECORD_FEATURES else label)[key] = value
    return features, label


def _decode_map_entry(payload: bytes, start: int, end: int) -> tuple[str, tuple[int, int, int] | None]:
    key, value = "", None
    for field, wire, lo, hi in _fields(payload, start, end):
        if field == _ENTRY_KEY:
            _expect_wire(wire, _LENGTH_DELIMITED, field, lo)
            try:
                key = payload[lo:hi].decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _DecodeError(f"map key is not UTF-8: {exc}", lo) from exc
        elif field == _ENTRY_VALUE:
            _expect_wire(wire, _LENGTH_DELIMITED, field, lo)
            value = _decode_value(payload, lo, hi)
    return key, value


def _decode_value(payload: bytes, start: int, end: int) -> tuple[int, int, int] | None:
    """The ``Value`` oneof: (field number of the tensor kind, start, end); the last one set wins."""
    chosen = None
    for field, wire, lo, hi in _fields(payload, start, end):
        if field in (_VALUE_FLOAT32, _VALUE_FLOAT64, _VALUE_INT32, _VALUE_BYTES):
            _expect_wire(wire, _LENGTH_DELIMITED, field, lo)
            chosen = (field, lo, hi)
    return chosen


def _decode_tensor(payload: bytes, kind: int, start: int, end: int) -> _Tensor:
    values: list[np.ndarray] = []
    keys: list[np.ndarray] = []
    shape: list[np.ndarray] = []
    for field, wire, lo, hi in _fields(payload, start, end):
        if field == _TENSOR_VALUES:
            values.append(_tensor_values(payload, kind, wire, lo, hi))
        elif field in (_TENSOR_KEYS, _TENSOR_SHAPE):
            target = keys if field == _TENSOR_KEYS else shape
            target.append(_uint64s(payload, wire, lo, hi))
    return _Tensor(_concat(values, np.float64), _concat(keys, np.uint64), _concat(shape, np.uint64))


def _tensor_values(payload: bytes, kind: int, wire: int, lo: int, hi: int) -> np.ndarray:
    """Packed (length-delimited) or single values of a Float32/Float64/Int32 tensor, as float64."""
    if kind == _VALUE_INT32:
        ints = _varints(payload, wire, lo, hi).astype(np.int64)  # two's complement, 64 bits
        return ints.astype(np.int32).astype(np.float64)
    dtype, single_wire = (np.dtype("<f4"), _FIXED32) if kind == _VALUE_FLOAT32 else (np.dtype("<f8"), _FIXED64)
    if wire == _LENGTH_DELIMITED:
        if (hi - lo) % dtype.itemsize:
            raise _DecodeError(f"packed {dtype.name} values of {hi - lo} bytes: not a multiple of {dtype.itemsize}", lo)
    else:
        _expect_wire(wire, single_wire, _TENSOR_VALUES, lo)
    return np.frombuffer(payload, dtype=dtype, count=(hi - lo) // dtype.itemsize, offset=lo).astype(np.float64)


def _uint64s(payload: bytes, wire: int, lo: int, hi: int) -> np.ndarray:
    return _varints(payload, wire, lo, hi)


def _varints(payload: bytes, wire: int, lo: int, hi: int) -> np.ndarray:
    """Packed varints (length-delimited) or one varint, as uint64."""
    if wire == _VARINT:
        return np.array([_read_varint(payload, lo, hi)[0]], dtype=np.uint64)
    if wire != _LENGTH_DELIMITED:
        raise _DecodeError(f"wire type {wire} for a repeated integer field", lo)
    return _decode_packed_varints(payload, lo, hi)


def _decode_packed_varints(payload: bytes, lo: int, hi: int) -> np.ndarray:
    """Each varint ends at a byte below 0x80; 7 bits per byte, least significant first.

    Vectorised for long runs; a plain loop for the few keys of a typical row, where NumPy's
    per-call overhead would dominate.
    """
    if hi - lo <= _SHORT_PACKED_BYTES:
        values, position = [], lo
        while position < hi:
            value, position = _read_varint(payload, position, hi)
            values.append(value)
        return np.array(values, dtype=np.uint64)
    raw = np.frombuffer(payload, dtype=np.uint8, count=hi - lo, offset=lo)
    if raw.size == 0:
        return np.zeros(0, dtype=np.uint64)
    if raw[-1] & 0x80:
        raise _DecodeError("packed varints end in the middle of a varint", hi - 1)
    ends = np.flatnonzero(raw < 0x80)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > 10:
        raise _DecodeError("varint longer than 10 bytes", lo + int(starts[np.argmax(lengths > 10)]))
    position = np.arange(raw.size) - np.repeat(starts, lengths)
    parts = (raw & 0x7F).astype(np.uint64) << (7 * position).astype(np.uint64)
    return np.add.reduceat(parts, starts)


def _concat(chunks: list[np.ndarray], dtype: type) -> np.ndarray:
    if len(chunks) == 1:
        return chunks[0].astype(dtype, copy=False)
    return np.concatenate(chunks).astype(dtype) if chunks else np.zeros(0, dtype=dtype)


def _fields(payload: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield (field number, wire type, lo, hi) for each field of the message in payload[start:end].

    [lo, hi) is the field's content for a length-delimited field, its bytes for a fixed-size one,
    and the varint's bytes for a varint.
    """
    position = start
    while position < end:
        tag_at = position
        tag, position = _read_varint(payload, position, end)
        field, wire = tag >> 3, tag & 7
        if field == 0:
            raise _DecodeError("field number 0 is invalid", tag_at)
        if wire == _VARINT:
            lo = position
            _, position = _read_varint(payload, position, end)
            yield field, wire, lo, position
            continue
        if wire == _LENGTH_DELIMITED:
            size, position = _read_varint(payload, position, end)
        elif wire == _FIXED64:
            size = 8
        elif wire == _FIXED32:
            size = 4
        else:
            raise _DecodeError(f"unsupported wire type {wire} (field {field})", tag_at)
        if size > end - position:
            raise _DecodeError(f"field {field} needs {size} bytes, only {end - position} left", position)
        yield field, wire, position, position + size
        position += size


def _read_varint(payload: bytes, position: int, end: int) -> tuple[int, int]:
    value, shift, at = 0, 0, position
    while True:
        if position >= end:
            raise _DecodeError("truncated varint", at)
        byte = payload[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & 0xFFFFFFFFFFFFFFFF, position
        shift += 7
        if shift >= 70:
            raise _DecodeError("varint longer than 10 bytes", at)


def _expect_wire(wire: int, expected: int, field: int, position: int) -> None:
    if wire != expected:
        raise _DecodeError(f"field {field} has wire type {wire}, expected {expected}", position)


def _make_row(
    payload: bytes,
    features: dict[str, tuple[int, int, int] | None],
    label: dict[str, tuple[int, int, int] | None],
) -> _Row:
    if _VALUES_KEY not in features:
        raise _DecodeError(f"no features['values'] (feature keys: {sorted(features)})", None)
    tensor = _tensor_of(payload, features[_VALUES_KEY], "features")
    n_values = tensor.values.shape[0]
    declared = _shape_size(tensor.shape)
    if tensor.keys.size or (n_values == 0 and declared):
        columns, n_columns = _sparse_columns(tensor, declared)
    else:
        if declared is not None and declared != n_values:
            raise _DecodeError(f"dense features: shape {tensor.shape.tolist()} but {n_values} values", None)
        columns, n_columns = np.arange(n_values, dtype=np.int64), n_values
    return _Row(tensor.values.astype(np.float32), columns, n_columns, _label_value(payload, label))


def _sparse_columns(tensor: _Tensor, declared: int | None) -> tuple[np.ndarray, int]:
    if declared is None:
        raise _DecodeError("sparse features (keys given) without a shape: the number of columns is unknown", None)
    if tensor.keys.shape[0] != tensor.values.shape[0]:
        raise _DecodeError(f"sparse features: {tensor.keys.shape[0]} keys for {tensor.values.shape[0]} values", None)
    if tensor.keys.size and int(tensor.keys.max()) >= declared:
        raise _DecodeError(f"sparse features: key {int(tensor.keys.max())} is outside the shape {declared}", None)
    return tensor.keys.astype(np.int64), declared


def _shape_size(shape: np.ndarray) -> int | None:
    """The number of elements a tensor's shape declares (None when it has none)."""
    if shape.size == 0:
        return None
    size = 1
    for dim in shape.tolist():
        size *= int(dim)
    if size >= 2**62:
        raise _DecodeError(f"shape {shape.tolist()} is too large", None)
    return size


def _label_value(payload: bytes, label: dict[str, tuple[int, int, int] | None]) -> float:
    if _VALUES_KEY not in label:
        return float("nan")
    tensor = _tensor_of(payload, label[_VALUES_KEY], "label")
    if tensor.values.shape[0] != 1:
        raise _DecodeError(f"label['values'] holds {tensor.values.shape[0]} values, expected 1", None)
    return float(tensor.values[0])


def _tensor_of(payload: bytes, value: tuple[int, int, int] | None, what: str) -> _Tensor:
    if value is None:
        raise _DecodeError(f"{what}['values'] holds no tensor", None)
    kind, lo, hi = value
    if kind not in _TENSOR_KINDS:
        raise _DecodeError(f"{what}['values'] holds Bytes, expected a Float32, Float64 or Int32 tensor", lo)
    return _decode_tensor(payload, kind, lo, hi)


def _assemble(rows: list[_Row]) -> tuple[sp.csr_matrix, np.ndarray]:
    """Stack rows into (n, N) float32 CSR (duplicates summed, zeros dropped) and (n,) float32 labels."""
    n_columns = rows[0].n_columns if rows else 0
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([row.columns.shape[0] for row in rows], out=indptr[1:])
    data = np.concatenate([row.values for row in rows]) if rows else np.zeros(0, np.float32)
    indices = np.concatenate([row.columns for row in rows]) if rows else np.zeros(0, np.int64)
    matrix = sp.csr_matrix((data, indices, indptr), shape=(len(rows), n_columns), dtype=np.float32)
    matrix.sum_duplicates()
    matrix.eliminate_zeros()
    labels = np.array([row.label for row in rows], dtype=np.float32)
    return matrix, labels


# --- writing -----------------------------------------------------------------------------------


def _frame(payload: bytes) -> bytes:
    """One whole RecordIO record (flag 0), as SageMaker's writer frames it: never split."""
    if len(payload) > _LENGTH_MASK:
        raise InputDataError(f"a record of {len(payload)} bytes is larger than RecordIO allows ({_LENGTH_MASK})")
    padding = b"\0" * (-len(payload) % 4)
    return struct.pack("<II", RECORDIO_MAGIC, len(payload)) + payload + padding


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(field: int, content: bytes) -> bytes:
    return _encode_varint(field << 3 | _LENGTH_DELIMITED) + _encode_varint(len(content)) + content


def _encode_tensor(values: np.ndarray, keys: np.ndarray | None, shape: list[int] | None) -> bytes:
    """A Float32Tensor with packed values, keys and shape (empty repeated fields are left out)."""
    out = b""
    if len(values):
        out += _length_delimited(_TENSOR_VALUES, np.asarray(values, dtype="<f4").tobytes())
    if keys is not None and len(keys):
        out += _length_delimited(_TENSOR_KEYS, b"".join(_encode_varint(int(k)) for k in keys))
    if shape:
        out += _length_delimited(_TENSOR_SHAPE, b"".join(_encode_varint(int(d)) for d in shape))
    return out


def _map_entry(tensor: bytes) -> bytes:
    """A map entry ``"values" -> Value{float32_tensor: tensor}``."""
    value = _length_delimited(_VALUE_FLOAT32, tensor)
    return _length_delimited(_ENTRY_KEY, _VALUES_KEY.encode()) + _length_delimited(_ENTRY_VALUE, value)


def is_recordio_protobuf(raw: bytes) -> bool:
    return len(raw) >= 4 and int.from_bytes(raw[:4], "little") == RECORDIO_MAGIC
