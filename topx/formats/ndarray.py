"""Reader and writer of MXNet's binary NDArray list format (what ``mx.nd.save`` / ``mx.nd.load`` use).

MXNet is not a dependency: its parameter files are read and written here, byte for byte as MXNet
1.x lays them out (``NDArray::Save`` / ``NDArray::Load`` in ``src/ndarray/ndarray.cc``). The layout,
with offsets, is in docs/FORMATS.md. Everything is little-endian.

File = list header (``0x112`` as uint64, a reserved uint64), uint64 array count, the arrays, uint64
name count, the names (uint64 length + UTF-8 bytes). Each array starts with a uint32 magic:

- V2 ``0xF993FAC9``: int32 storage type, shape, context, int32 type flag, raw data.
- V3 ``0xF993FACA``: as V2, written under MXNet's NumPy shape semantics, where a 0-d shape is a
  scalar and zero-size dimensions are allowed. MXNet loads V3 arrays only under those semantics.
- V1 ``0xF993FAC8`` (read only): shape, context, type flag, data; no storage type.
- older files (read only): the first uint32 is ndim, then ndim uint32 dims, context, type flag, data.

A shape is an int32 ndim followed by ndim int64 dims; a context is int32 device type and int32
device id. Only dense storage is supported; sparse arrays are reported, not guessed at.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from topx.errors import ArtifactFormatError

LIST_MAGIC = 0x112
V1_MAGIC = 0xF993FAC8
V2_MAGIC = 0xF993FAC9
V3_MAGIC = 0xF993FACA

DEFAULT_STORAGE = 0
STORAGE_NAMES = {-1: "undefined", 0: "default (dense)", 1: "row_sparse", 2: "csr"}

CPU_DEVICE_TYPE = 1

# mshadow type flags (mshadow/base.h) and the NumPy dtype each one holds.
TYPE_FLAGS: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("<f8"),
    2: np.dtype("<f2"),
    3: np.dtype("u1"),
    4: np.dtype("<i4"),
    5: np.dtype("i1"),
    6: np.dtype("<i8"),
    7: np.dtype("?"),
}
_FLAG_OF_DTYPE = {dtype: flag for flag, dtype in TYPE_FLAGS.items()}
# Type flags MXNet defines but this codec does not hold (bfloat16 has no NumPy dtype).
_KNOWN_UNSUPPORTED_FLAGS = {8: "int16", 9: "uint16", 10: "uint32", 11: "uint64", 12: "bfloat16"}

# Before V1, the first uint32 of an array was its ndim; anything this small is read that way.
_MAX_LEGACY_NDIM = 32
_MAX_NDIM = 64

NDArrays = dict[str, np.ndarray] | list[np.ndarray]


class _Reader:
    """A cursor over the bytes of one file; every read names the offset when the bytes run out."""

    def __init__(self, data: bytes, source: str) -> None:
        self.data = memoryview(data)
        self.offset = 0
        self.source = source

    @property
    def remaining(self) -> int:
        return len(self.data) - self.offset

    def error(self, message: str, offset: int | None = None) -> ArtifactFormatError:
        at = self.offset if offset is None else offset
        return ArtifactFormatError(f"{self.source}: {message} (at byte offset {at})")

    def take(self, size: int, what: str) -> memoryview:
        if size > self.remaining:
            raise self.error(f"truncated: {what} needs {size} bytes, only {self.remaining} left")
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def unpack(self, fmt: str, what: str) -> tuple[int, ...]:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def uint32(self, what: str) -> int:
        return self.unpack("<I", what)[0]

    def int32(self, what: str) -> int:
        return self.unpack("<i", what)[0]

    def uint64(self, what: str) -> int:
        return self.unpack("<Q", what)[0]


def load_ndarrays(
    source: str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO, *, label: str | None = None
) -> NDArrays:
    """Read an MXNet NDArray list file: a dict name -> array when names are stored, else a list.

    ``source`` is a path, the file's bytes, or a binary file object. Arrays come back in their
    stored dtype and shape, native byte order. Raises ``ArtifactFormatError`` naming the file
    (``label`` when given, e.g. a member of an archive), the array and the byte offset for
    anything that is not a dense MXNet NDArray list.
    """
    data, name = _read_source(source)
    reader = _Reader(data, label or name)
    list_magic = reader.uint64("list magic")
    if list_magic != LIST_MAGIC:
        raise reader.error(
            f"not an MXNet NDArray file: list magic is {list_magic:#x}, expected {LIST_MAGIC:#x}", 0
        )
    reader.uint64("reserved header field")
    count = reader.uint64("array count")
    # Every array takes at least 8 bytes (magic + ndim), so a larger count is a corrupt header.
    if count > reader.remaining // 8:
        raise reader.error(
            f"truncated or corrupt: {count} arrays need at least {8 * count} bytes, only {reader.remaining} left", 16
        )
    arrays = [_read_array(reader, index) for index in range(count)]
    names = _read_names(reader)
    if not names:
        return arrays
    if len(names) != len(arrays):
        raise reader.error(f"{len(names)} names for {len(arrays)} arrays: counts must match")
    if len(set(names)) != len(names):
        duplicated = sorted({n for n in names if names.count(n) > 1})
        raise reader.error(f"duplicated array names {duplicated}")
    return dict(zip(names, arrays, strict=True))


def save_ndarrays(
    target: str | os.PathLike[str] | BinaryIO,
    arrays: Mapping[str, np.ndarray] | Sequence[np.ndarray],
    *,
    np_shape: bool | None = None,
) -> None:
    """Write arrays as ``mx.nd.save`` does: named when ``arrays`` is a mapping, unnamed for a sequence.

    ``np_shape``: write V3 arrays (MXNet's NumPy shape semantics) when True, V2 when False. The
    default writes V2, which every MXNet 1.x loads as is, unless an array is 0-d or has a
    zero-size dimension: V2 cannot hold those, so then the whole file is V3 (MXNet loads it under
    ``mx.util.np_shape(True)``).
    """
    payload = dump_ndarrays(arrays, np_shape=np_shape)
    if isinstance(target, str | os.PathLike):
        Path(target).write_bytes(payload)
    else:
        target.write(payload)


def dump_ndarrays(
    arrays: Mapping[str, np.ndarray] | Sequence[np.ndarray], *, np_shape: bool | None = None
) -> bytes:
    """The bytes ``save_ndarrays`` writes."""
    if isinstance(arrays, Mapping):
        names = [str(name) for name in arrays]
        values = [_as_storable(arrays[name], repr(name)) for name in arrays]
    else:
        names = []
        values = [_as_storable(array, f"#{i}") for i, array in enumerate(arrays)]
    needs_v3 = any(v.ndim == 0 or v.size == 0 for v in values)
    if np_shape is None:
        np_shape = needs_v3
    elif not np_shape and needs_v3:
        raise ArtifactFormatError(
            "0-d and zero-size arrays can only be stored with np_shape=True (NDArray V3)"
        )
    out = io.BytesIO()
    out.write(struct.pack("<QQQ", LIST_MAGIC, 0, len(values)))
    magic = V3_MAGIC if np_shape else V2_MAGIC
    for value in values:
        _write_array(out, value, magic)
    out.write(struct.pack("<Q", len(names)))
    for name in names:
        encoded = name.encode("utf-8")
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
    return out.getvalue()


def _read_source(
    source: str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO,
) -> tuple[bytes, str]:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source), "NDArray bytes"
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        try:
            return path.read_bytes(), str(path)
        except OSError as exc:
            raise ArtifactFormatError(f"{path}: cannot read the NDArray file: {exc}") from exc
    return source.read(), str(getattr(source, "name", "NDArray stream"))


def _read_array(reader: _Reader, index: int) -> np.ndarray:
    start = reader.offset
    magic = reader.uint32(f"magic of array #{index}")
    if magic in (V2_MAGIC, V3_MAGIC):
        stype = reader.int32(f"storage type of array #{index}")
        if stype != DEFAULT_STORAGE:
            kind = STORAGE_NAMES.get(stype, "unknown")
            raise reader.error(
                f"array #{index} has storage type {stype} ({kind}); only dense arrays (0) are supported",
                start + 4,
            )
        shape = _read_shape(reader, index)
        none_shape = shape is None or (magic == V2_MAGIC and len(shape) == 0)
    elif magic == V1_MAGIC:
        shape = _read_shape(reader, index)
        none_shape = shape is None or len(shape) == 0
    elif magic <= _MAX_LEGACY_NDIM:
        dims = reader.unpack(f"<{magic}I", f"shape of array #{index}")
        shape = tuple(dims)
        none_shape = len(shape) == 0
    else:
        raise reader.error(
            f"array #{index} starts with unknown magic {magic:#010x} "
            f"(expected {V2_MAGIC:#010x} V2, {V3_MAGIC:#010x} V3 or {V1_MAGIC:#010x} V1)",
            start,
        )
    if none_shape:
        # MXNet's uninitialised ("none") array: nothing follows its shape. It has no data or dtype.
        return np.zeros((0,), dtype=np.float32)
    assert shape is not None
    return _read_dense_body(reader, index, shape)


def _read_shape(reader: _Reader, index: int) -> tuple[int, ...] | None:
    """An int32 ndim and ndim int64 dims; None for MXNet's 'unknown' shape (ndim -1)."""
    at = reader.offset
    ndim = reader.int32(f"ndim of array #{index}")
    if ndim == -1:
        return None
    if not 0 <= ndim <= _MAX_NDIM:
        raise reader.error(f"array #{index} has ndim {ndim}; expected 0..{_MAX_NDIM}", at)
    dims = reader.unpack(f"<{ndim}q", f"shape of array #{index}")
    if any(d < 0 for d in dims):
        raise reader.error(f"array #{index} has negative dimensions {dims}", at)
    return tuple(dims)


def _read_dense_body(reader: _Reader, index: int, shape: tuple[int, ...]) -> np.ndarray:
    reader.unpack("<ii", f"context of array #{index}")
    at = reader.offset
    flag = reader.int32(f"type flag of array #{index}")
    dtype = TYPE_FLAGS.get(flag)
    if dtype is None:
        known = _KNOWN_UNSUPPORTED_FLAGS.get(flag)
        what = f"MXNet's {known}, which topx does not read" if known else "an unknown type flag"
        raise reader.error(f"array #{index} has type flag {flag} ({what})", at)
    count = 1
    for dim in shape:
        count *= dim
    nbytes = count * dtype.itemsize
    if nbytes > reader.remaining:
        raise reader.error(
            f"truncated: data of array #{index} (shape {shape}, {dtype.name}) needs {nbytes} bytes, "
            f"only {reader.remaining} left"
        )
    raw = reader.take(nbytes, f"data of array #{index}")
    return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def _read_names(reader: _Reader) -> list[str]:
    count = reader.uint64("name count")
    if count > reader.remaining // 8:
        raise reader.error(
            f"truncated or corrupt: {count} names need at least {8 * count} bytes, only {reader.remaining} left"
        )
    names = []
    for index in range(count):
        length = reader.uint64(f"length of name #{index}")
        at = reader.offset
        raw = reader.take(length, f"name #{index}")
        try:
            names.append(bytes(raw).decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise reader.error(f"name #{index} is not UTF-8: {exc}", at) from exc
    return names


def _as_storable(array: np.ndarray, label: str) -> np.ndarray:
    """Contiguous little-endian copy of ``array``; its dtype must have an MXNet type flag."""
    value = np.asarray(array)
    flag = _FLAG_OF_DTYPE.get(value.dtype.newbyteorder("<"))
    if flag is None:
        supported = ", ".join(dtype.name for dtype in TYPE_FLAGS.values())
        raise ArtifactFormatError(
            f"array {label} has dtype {value.dtype}, which an MXNet NDArray file cannot hold (supported: {supported})"
        )
    # astype, not ascontiguousarray: the latter turns a 0-d array into a 1-d one.
    return value.astype(TYPE_FLAGS[flag], order="C", copy=False)


def _write_array(out: BinaryIO, value: np.ndarray, magic: int) -> None:
    flag = _FLAG_OF_DTYPE[value.dtype]
    out.write(struct.pack("<Ii", magic, DEFAULT_STORAGE))
    out.write(struct.pack(f"<i{value.ndim}q", value.ndim, *value.shape))
    out.write(struct.pack("<iii", CPU_DEVICE_TYPE, 0, flag))
    out.write(value.tobytes(order="C"))
