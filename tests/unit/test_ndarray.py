"""The MXNet NDArray codec: round trips, the byte layout, and corrupt input."""

from __future__ import annotations

import contextlib
import io
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from topx.errors import ArtifactFormatError, TopxError
from topx.formats.ndarray import (
    LIST_MAGIC,
    TYPE_FLAGS,
    V1_MAGIC,
    V2_MAGIC,
    V3_MAGIC,
    dump_ndarrays,
    load_ndarrays,
    save_ndarrays,
)

# The bytes mx.nd.save({'x': mx.nd.array([[0, 1, 2], [3, 4, 5]])}) writes with MXNet 1.9.1.
MXNET_NAMED_2X3 = bytes.fromhex(
    "1201000000000000" "0000000000000000" "0100000000000000"  # list magic, reserved, 1 array
    "c9fa93f9" "00000000"  # V2 magic, dense storage
    "02000000" "0200000000000000" "0300000000000000"  # ndim 2, dims 2 and 3
    "01000000" "00000000" "00000000"  # cpu, device 0, float32
    "000000000000803f0000004000004040000080400000a040"  # 0..5 as float32
    "0100000000000000" "0100000000000000" "78"  # 1 name, 1 byte, "x"
)


def _header(count: int) -> bytes:
    return struct.pack("<QQQ", LIST_MAGIC, 0, count)


def _dense(magic: int, shape: tuple[int, ...], flag: int, payload: bytes, stype: int = 0) -> bytes:
    head = struct.pack("<Ii", magic, stype) if magic in (V2_MAGIC, V3_MAGIC) else struct.pack("<I", magic)
    return head + struct.pack(f"<i{len(shape)}q", len(shape), *shape) + struct.pack("<iii", 1, 0, flag) + payload


def test_reads_the_bytes_mxnet_writes() -> None:
    loaded = load_ndarrays(MXNET_NAMED_2X3)
    assert isinstance(loaded, dict)
    np.testing.assert_array_equal(loaded["x"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert loaded["x"].dtype == np.float32


def test_writes_the_bytes_mxnet_writes() -> None:
    assert dump_ndarrays({"x": np.arange(6, dtype=np.float32).reshape(2, 3)}) == MXNET_NAMED_2X3


def test_list_without_names_reads_as_a_list(tmp_path) -> None:
    arrays = [np.float64([1.5, -2.0]), np.int64([[1], [2]])]
    save_ndarrays(tmp_path / "a.params", arrays)
    loaded = load_ndarrays(tmp_path / "a.params")
    assert isinstance(loaded, list)
    for got, want in zip(loaded, arrays, strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_file_objects_and_paths_both_work(tmp_path) -> None:
    buffer = io.BytesIO()
    save_ndarrays(buffer, {"a": np.ones(3, np.float32)})
    buffer.seek(0)
    assert load_ndarrays(buffer)["a"].tolist() == [1, 1, 1]
    save_ndarrays(str(tmp_path / "b"), {"a": np.ones(3, np.float32)})
    assert load_ndarrays(str(tmp_path / "b"))["a"].shape == (3,)


def test_v2_by_default_v3_for_scalars_and_empty_arrays() -> None:
    assert struct.unpack_from("<I", dump_ndarrays([np.ones(2, np.float32)]), 24)[0] == V2_MAGIC
    assert struct.unpack_from("<I", dump_ndarrays([np.float32(1).reshape(())]), 24)[0] == V3_MAGIC
    assert struct.unpack_from("<I", dump_ndarrays([np.zeros((0, 2))]), 24)[0] == V3_MAGIC
    assert struct.unpack_from("<I", dump_ndarrays([np.ones(2)], np_shape=True), 24)[0] == V3_MAGIC
    with pytest.raises(ArtifactFormatError, match="np_shape=True"):
        dump_ndarrays([np.float32(1).reshape(())], np_shape=False)


def test_scalar_keeps_its_shape() -> None:
    loaded = load_ndarrays(dump_ndarrays({"s": np.array(2.5, np.float64)}))
    assert loaded["s"].shape == ()
    assert loaded["s"] == 2.5


def test_big_endian_and_strided_input_is_stored_little_endian() -> None:
    value = np.arange(12, dtype=">f8").reshape(3, 4)[:, ::2]
    loaded = load_ndarrays(dump_ndarrays([value]))[0]
    assert loaded.dtype == np.float64
    np.testing.assert_array_equal(loaded, value)


def test_unsupported_dtype_is_named() -> None:
    with pytest.raises(ArtifactFormatError, match="'c'.*complex128"):
        dump_ndarrays({"c": np.ones(2, np.complex128)})


def test_reads_v1_arrays() -> None:
    data = _header(1) + _dense(V1_MAGIC, (2,), 1, np.float64([1, 2]).tobytes()) + struct.pack("<Q", 0)
    np.testing.assert_array_equal(load_ndarrays(data)[0], [1.0, 2.0])


def test_reads_pre_v1_arrays_whose_magic_is_their_ndim() -> None:
    body = struct.pack("<I2I", 2, 2, 1) + struct.pack("<iii", 1, 0, 0) + np.float32([3, 4]).tobytes()
    np.testing.assert_array_equal(load_ndarrays(_header(1) + body + struct.pack("<Q", 0))[0], [[3], [4]])


def test_uninitialised_v2_array_reads_as_empty() -> None:
    data = _header(1) + struct.pack("<Iii", V2_MAGIC, 0, 0) + struct.pack("<Q", 0)
    assert load_ndarrays(data)[0].shape == (0,)


def test_sparse_storage_is_refused_with_array_and_offset() -> None:
    data = _header(1) + struct.pack("<Ii", V2_MAGIC, 2) + b"\0" * 64
    with pytest.raises(ArtifactFormatError, match=r"array #0 has storage type 2 \(csr\).*byte offset 28"):
        load_ndarrays(data)


def test_unknown_type_flag_is_refused_with_offset() -> None:
    data = _header(1) + _dense(V2_MAGIC, (1,), 12, b"\0\0")
    with pytest.raises(ArtifactFormatError, match=r"type flag 12 \(MXNet's bfloat16.*byte offset 52"):
        load_ndarrays(data)
    data = _header(1) + _dense(V2_MAGIC, (1,), 99, b"\0" * 8)
    with pytest.raises(ArtifactFormatError, match=r"type flag 99 \(an unknown type flag\)"):
        load_ndarrays(data)


def test_unknown_magics_are_refused() -> None:
    with pytest.raises(ArtifactFormatError, match="list magic is 0x113"):
        load_ndarrays(struct.pack("<QQQ", 0x113, 0, 0))
    with pytest.raises(ArtifactFormatError, match=r"array #0 starts with unknown magic 0x12345678.*offset 24"):
        load_ndarrays(_header(1) + struct.pack("<I", 0x12345678) + b"\0" * 16)


def test_truncation_names_the_offset() -> None:
    for cut in (4, 20, 30, 50, 60, len(MXNET_NAMED_2X3) - 1):
        with pytest.raises(ArtifactFormatError, match=r"truncated.*byte offset \d+"):
            load_ndarrays(MXNET_NAMED_2X3[:cut])


def test_name_count_must_match_array_count() -> None:
    data = MXNET_NAMED_2X3[:-17] + struct.pack("<Q", 2) + struct.pack("<Q", 1) + b"x" + struct.pack("<Q", 1) + b"y"
    with pytest.raises(ArtifactFormatError, match="2 names for 1 arrays"):
        load_ndarrays(data)


def test_huge_counts_in_a_corrupt_header_do_not_allocate() -> None:
    with pytest.raises(ArtifactFormatError, match="arrays need at least"):
        load_ndarrays(struct.pack("<QQQ", LIST_MAGIC, 0, 2**60))
    shape = (2**40, 2**20)
    with pytest.raises(ArtifactFormatError, match="truncated: data of array #0"):
        load_ndarrays(_header(1) + _dense(V2_MAGIC, shape, 0, b""))


def test_unreadable_path_is_an_artifact_error(tmp_path) -> None:
    with pytest.raises(ArtifactFormatError, match="cannot read"):
        load_ndarrays(tmp_path / "missing.params")


_DTYPES = st.sampled_from([dtype.newbyteorder("=") for dtype in TYPE_FLAGS.values()])
_ARRAYS = _DTYPES.flatmap(lambda dtype: hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrays=st.lists(_ARRAYS, max_size=4), named=st.booleans(), data=st.data())
def test_random_arrays_round_trip_bit_for_bit(arrays: list[np.ndarray], named: bool, data: st.DataObject) -> None:
    if named and arrays:
        # With no arrays there are no names, and MXNet's format reads back as an (empty) list.
        names = data.draw(st.lists(st.text(max_size=8), min_size=len(arrays), max_size=len(arrays), unique=True))
        stored = dict(zip(names, arrays, strict=True))
        loaded = load_ndarrays(dump_ndarrays(stored))
        assert isinstance(loaded, dict) and list(loaded) == names
        pairs = [(loaded[n], stored[n]) for n in names]
    else:
        loaded = load_ndarrays(dump_ndarrays(arrays))
        assert isinstance(loaded, list)
        pairs = list(zip(loaded, arrays, strict=True))
    for got, want in pairs:
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()


@settings(max_examples=300, deadline=None)
@given(blob=st.binary(max_size=200))
def test_random_bytes_raise_only_topx_errors(blob: bytes) -> None:
    for candidate in (blob, _header(1) + blob, MXNET_NAMED_2X3[:24] + blob):
        with contextlib.suppress(TopxError):
            load_ndarrays(candidate)


@settings(max_examples=300, deadline=None)
@given(position=st.integers(0, len(MXNET_NAMED_2X3) - 1), value=st.integers(0, 255), cut=st.integers(0, 100))
def test_corrupted_mxnet_bytes_raise_only_topx_errors(position: int, value: int, cut: int) -> None:
    corrupted = bytearray(MXNET_NAMED_2X3)
    corrupted[position] = value
    with contextlib.suppress(TopxError):
        load_ndarrays(bytes(corrupted[: len(corrupted) - cut]))
