"""RecordIO-protobuf: SageMaker's training data read and written without protobuf."""

from __future__ import annotations

import contextlib
import io
import struct

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from topx.errors import InputDataError, TopxError
from topx.formats.recordio import (
    RECORDIO_MAGIC,
    iter_recordio,
    read_recordio_protobuf,
    recordio_protobuf_bytes,
    write_recordio_protobuf,
)

# One record as SageMaker's write_spmatrix_to_sparse_tensor writes it (protobuf 5, sagemaker 2.243):
# row [0, 2.0, 0, 0.5] of a 4-column matrix, label 1.0.
SAGEMAKER_SPARSE_ROW = bytes.fromhex(
    "0a23d7ce" "33000000"  # magic 0xced7230a, length 51 (flag 0)
    "0a1d" "0a0676616c756573" "1213" "1211"  # features entry: key "values", Value{float32_tensor}
    "0a08" "000000400000003f" "12020103" "1a0104"  # values [2.0, 0.5], keys [1, 3], shape [4]
    "1212" "0a0676616c756573" "1208" "1206" "0a040000803f"  # label entry: values [1.0]
    "00"  # padding to a multiple of 4
)
PAYLOAD = SAGEMAKER_SPARSE_ROW[8:59]


def _record(payload: bytes, flag: int = 0) -> bytes:
    return struct.pack("<II", RECORDIO_MAGIC, flag << 29 | len(payload)) + payload + b"\0" * (-len(payload) % 4)


def test_reads_sagemakers_bytes() -> None:
    x, y = read_recordio_protobuf(SAGEMAKER_SPARSE_ROW)
    assert x.shape == (1, 4) and x.dtype == np.float32
    np.testing.assert_array_equal(x.toarray(), [[0, 2.0, 0, 0.5]])
    np.testing.assert_array_equal(y, [1.0])


def test_writes_sagemakers_bytes() -> None:
    row = sp.csr_matrix(np.float32([[0, 2.0, 0, 0.5]]))
    assert recordio_protobuf_bytes(row, np.float32([1.0])) == SAGEMAKER_SPARSE_ROW


def test_sparse_round_trip_with_empty_rows(tmp_path) -> None:
    matrix = sp.random(30, 17, density=0.2, format="lil", dtype=np.float32, random_state=1)
    matrix[4, :] = 0
    matrix = matrix.tocsr()
    labels = np.arange(30, dtype=np.float32)
    write_recordio_protobuf(tmp_path / "train.rec", matrix, labels)
    x, y = read_recordio_protobuf(tmp_path / "train.rec")
    assert x.shape == (30, 17)
    assert (x != matrix).nnz == 0
    np.testing.assert_array_equal(y, labels)


def test_long_rows_decode_their_packed_keys_vectorised() -> None:
    # Hundreds of multi-byte varint keys per row take the vectorised path, a few take the loop.
    matrix = sp.random(6, 70000, density=0.004, format="csr", dtype=np.float32, random_state=2)
    x, _ = read_recordio_protobuf(recordio_protobuf_bytes(matrix))
    assert matrix.getnnz(axis=1).min() > 100
    assert (x != matrix).nnz == 0


def test_dense_rows_and_missing_labels() -> None:
    dense = np.float32([[1, 0, 3], [0, 0, 0], [4, 5, 6]])
    buffer = io.BytesIO()
    write_recordio_protobuf(buffer, dense)
    x, y = read_recordio_protobuf(buffer.getvalue())
    np.testing.assert_array_equal(x.toarray(), dense)
    assert np.isnan(y).all() and y.shape == (3,)


def test_empty_input_is_an_empty_matrix() -> None:
    x, y = read_recordio_protobuf(b"")
    assert x.shape == (0, 0) and y.shape == (0,)


def test_continued_records_are_joined_with_the_magic_put_back() -> None:
    payload = PAYLOAD
    # Split as dmlc's writer does at an aligned magic: here, pretend one sits at offset 8.
    magic = struct.pack("<I", RECORDIO_MAGIC)
    fake = payload[:8] + magic + payload[8:]
    parts = _record(fake[:8], flag=1) + _record(fake[12:], flag=3)
    [(offset, joined)] = list(iter_recordio(parts))
    assert offset == 0 and joined == fake


def test_float64_and_int32_tensors_are_read_as_float32() -> None:
    def entry(tensor_field: int, tensor: bytes) -> bytes:
        value = bytes([tensor_field << 3 | 2, len(tensor)]) + tensor
        return b"\x0a\x06values" + bytes([0x12, len(value)]) + value

    f64_values = np.float64([1.5, -2.0]).tobytes()
    f64 = entry(3, b"\x0a" + bytes([len(f64_values)]) + f64_values)
    i32 = entry(7, b"\x0a\x0b" + b"\x07" + b"\xfe\xff\xff\xff\xff\xff\xff\xff\xff\x01")  # [7, -2]
    label = entry(2, b"\x0d" + np.float32(3).tobytes())  # one unpacked float
    data = _record(b"\x0a" + bytes([len(f64)]) + f64 + b"\x12" + bytes([len(label)]) + label)
    data += _record(b"\x0a" + bytes([len(i32)]) + i32)
    x, y = read_recordio_protobuf(data)
    np.testing.assert_array_equal(x.toarray(), [[1.5, -2.0], [7.0, -2.0]])
    np.testing.assert_array_equal(y[:1], [3.0])


def test_unknown_fields_are_skipped() -> None:
    payload = PAYLOAD + b"\x1a\x03uid" + b"\x30\x96\x01" + b"\x39" + b"\0" * 8
    x, _ = read_recordio_protobuf(_record(payload))
    np.testing.assert_array_equal(x.toarray(), [[0, 2.0, 0, 0.5]])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00\x00\x00\x00" + SAGEMAKER_SPARSE_ROW[4:], "bad RecordIO magic 0x00000000 at byte offset 0"),
        (SAGEMAKER_SPARSE_ROW + b"\x0a\xd7", "truncated record header at byte offset 60"),
        (SAGEMAKER_SPARSE_ROW[:40], r"truncated record: payload of 51 bytes .* at byte offset 8"),
        (SAGEMAKER_SPARSE_ROW + SAGEMAKER_SPARSE_ROW[:30], "row 2: truncated record"),
        (_record(b"\x0a\x80"), r"truncated varint \(payload byte 1\)"),
        (_record(b"\x0a" + b"\xff" * 11), "varint longer than 10 bytes"),
        (_record(b"\x0b"), "unsupported wire type 3"),
        (_record(b"\x0a\x05abc"), "field 1 needs 5 bytes, only 3 left"),
        (_record(b""), r"no features\['values'\]"),
        (_record(b"", flag=2), "RecordIO continuation flag 2 at byte offset 0"),
    ],
)
def test_corrupt_records_name_the_offset(data: bytes, message: str) -> None:
    with pytest.raises(InputDataError, match=message):
        read_recordio_protobuf(data)


def test_rows_of_different_widths_are_refused() -> None:
    data = recordio_protobuf_bytes(np.ones((1, 3), np.float32)) + recordio_protobuf_bytes(np.ones((1, 4), np.float32))
    with pytest.raises(InputDataError, match="row 2.*has 4 columns, the first record has 3"):
        read_recordio_protobuf(data)


def test_sparse_keys_outside_the_shape_are_refused() -> None:
    data = bytearray(SAGEMAKER_SPARSE_ROW)
    data[8 + 30] = 2  # shape [4] -> [2]: key 3 is outside
    with pytest.raises(InputDataError, match="key 3 is outside the shape 2"):
        read_recordio_protobuf(bytes(data))


def test_errors_carry_the_source_path(tmp_path) -> None:
    path = tmp_path / "bad.rec"
    path.write_bytes(b"\x01\x02\x03\x04\x05\x06\x07\x08")
    with pytest.raises(InputDataError) as info:
        read_recordio_protobuf(path)
    assert info.value.source == str(path) and info.value.row == 1
    with pytest.raises(InputDataError, match="cannot read RecordIO data"):
        read_recordio_protobuf(tmp_path / "missing.rec")


@settings(max_examples=100, deadline=None)
@given(
    shape=st.tuples(st.integers(0, 12), st.integers(1, 12)),
    density=st.floats(0, 1),
    seed=st.integers(0, 2**16),
    labelled=st.booleans(),
    sparse=st.booleans(),
)
def test_random_matrices_round_trip(shape: tuple[int, int], density: float, seed: int, labelled: bool,
                                    sparse: bool) -> None:
    rng = np.random.default_rng(seed)
    dense = (rng.standard_normal(shape) * (rng.random(shape) < density)).astype(np.float32)
    labels = rng.standard_normal(shape[0]).astype(np.float32) if labelled else None
    x, y = read_recordio_protobuf(recordio_protobuf_bytes(sp.csr_matrix(dense) if sparse else dense, labels))
    if shape[0]:
        np.testing.assert_array_equal(x.toarray(), dense)
    if labels is not None:
        np.testing.assert_array_equal(y, labels)


@settings(max_examples=300, deadline=None)
@given(position=st.integers(0, 10**4), value=st.integers(0, 255), cut=st.integers(0, 80))
def test_corrupted_records_raise_only_topx_errors(position: int, value: int, cut: int) -> None:
    good = SAGEMAKER_SPARSE_ROW * 2
    corrupted = bytearray(good)
    corrupted[position % len(corrupted)] = value
    with contextlib.suppress(TopxError):
        read_recordio_protobuf(bytes(corrupted[: len(corrupted) - cut]))


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=120))
def test_random_payloads_raise_only_topx_errors(payload: bytes) -> None:
    for data in (payload, _record(payload), _record(SAGEMAKER_SPARSE_ROW[8:20] + payload)):
        with contextlib.suppress(TopxError):
            read_recordio_protobuf(data)
