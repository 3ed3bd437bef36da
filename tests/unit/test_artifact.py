"""The model artifact: SageMaker's layout written and read, both namings, and what is refused."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topx.errors import ArtifactFormatError, TopxError
from topx.feature_index import FeatureIndex
from topx.formats.artifact import (
    fm_arrays,
    model_algo_bytes,
    model_tar_bytes,
    params_from_arrays,
    read_model_artifact,
    write_model_artifact,
)
from topx.formats.ndarray import dump_ndarrays, load_ndarrays
from topx.params import FMParams


def _params(n: int = 5, k: int = 3, predictor_type: str = "regressor", seed: int = 0) -> FMParams:
    rng = np.random.default_rng(seed)
    return FMParams(0.5, rng.standard_normal(n), rng.standard_normal((n, k)), predictor_type)


def _assert_same(actual: FMParams, expected: FMParams) -> None:
    assert actual.bias == pytest.approx(expected.bias, abs=0, rel=1e-7)
    np.testing.assert_array_equal(actual.linear, expected.linear)
    np.testing.assert_array_equal(actual.factors, expected.factors)
    assert actual.predictor_type == expected.predictor_type


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
    return buffer.getvalue()


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def test_layout_is_sagemakers(tmp_path: Path) -> None:
    params = _params(predictor_type="binary_classifier")
    tar_path = write_model_artifact(tmp_path, params)
    assert tar_path == tmp_path / "model.tar.gz"
    with tarfile.open(tar_path, "r:gz") as archive:
        assert archive.getnames() == ["model_algo-1"]
        algo = archive.extractfile("model_algo-1").read()
    with zipfile.ZipFile(io.BytesIO(algo)) as archive:
        assert sorted(archive.namelist()) == ["meta.json", "params", "symbol.json"]
        stored = load_ndarrays(archive.read("params"))
        meta = json.loads(archive.read("meta.json"))
        symbol = json.loads(archive.read("symbol.json"))
    assert {name: (a.shape, a.dtype) for name, a in stored.items()} == {
        "arg:w0_weight": ((1,), np.float32), "arg:w1_weight": ((5, 1), np.float32), "arg:v": ((5, 3), np.float32),
    }
    assert meta["feature_dim"] == 5 and meta["num_factors"] == 3 and meta["predictor_type"] == "binary_classifier"
    assert meta["training_parameters"] == {"feature_dim": "5", "num_factors": "3", "predictor_type": "binary_classifier"}
    variables = {node["name"] for node in symbol["nodes"] if node["op"] == "null"}
    assert variables == {"data", "w0_weight", "w1_weight", "v", "out_label"}
    assert symbol["nodes"][symbol["heads"][0][0]]["op"] == "LogisticRegressionOutput"


@pytest.mark.parametrize("predictor_type", ["regressor", "binary_classifier"])
def test_round_trip_from_tar_directory_zip_and_params(tmp_path: Path, predictor_type: str) -> None:
    params = _params(predictor_type=predictor_type)
    tar_path = write_model_artifact(tmp_path, params)
    _assert_same(read_model_artifact(tar_path), params)
    _assert_same(read_model_artifact(tmp_path), params)
    (tmp_path / "model_algo-1").write_bytes(model_algo_bytes(params))
    _assert_same(read_model_artifact(tmp_path / "model_algo-1"), params)
    bare = tmp_path / "params"
    bare.write_bytes(dump_ndarrays(fm_arrays(params)))
    # A bare params file has no meta.json: the predictor type comes from the caller.
    _assert_same(read_model_artifact(bare, predictor_type=predictor_type), params)


def test_feature_index_is_written_beside_the_tar(tmp_path: Path) -> None:
    index = FeatureIndex.one_hot(["u1", "u2"], ["i1", "i2", "i3"])
    write_model_artifact(tmp_path, _params(n=5), index)
    assert FeatureIndex.load(tmp_path).names == index.names
    with pytest.raises(ArtifactFormatError, match="feature index has 5 features but the model has 4"):
        write_model_artifact(tmp_path / "other", _params(n=4), index)


def test_same_model_same_bytes(tmp_path: Path) -> None:
    first = write_model_artifact(tmp_path / "a", _params(seed=3)).read_bytes()
    second = write_model_artifact(tmp_path / "b", _params(seed=3)).read_bytes()
    assert first == second == model_tar_bytes(_params(seed=3))
    assert model_tar_bytes(_params(seed=4)) != first
    assert not list((tmp_path / "a").glob(".*.tmp")), "no temporary file is left behind"


def test_linear_plus_bias_naming_with_transposed_v() -> None:
    params = _params(n=6, k=2)
    arrays = {
        "arg:Linear_Plus_Bias_bias": np.float32([params.bias]),
        "arg:Linear_Plus_Bias_weight": params.linear.reshape(1, 6),
        "arg:v": params.factors.T.copy(),
    }
    _assert_same(params_from_arrays(arrays), params)


def test_v_orientation_follows_the_linear_length_not_the_naming() -> None:
    params = _params(n=6, k=2)
    # w0/w1 naming but v stored (k, N): the axis of length N decides.
    arrays = {"w0_weight": np.float32([params.bias]), "w1_weight": params.linear.reshape(6, 1), "v": params.factors.T}
    _assert_same(params_from_arrays(arrays), params)


def test_square_v_follows_each_namings_convention() -> None:
    params = _params(n=3, k=3)
    w0 = {"w0_weight": np.float32([params.bias]), "w1_weight": params.linear.reshape(3, 1), "v": params.factors}
    lpb = {"Linear_Plus_Bias_bias": np.float32([params.bias]), "Linear_Plus_Bias_weight": params.linear.reshape(1, 3),
           "v": params.factors.T}
    _assert_same(params_from_arrays(w0), params)
    _assert_same(params_from_arrays(lpb), params)


def test_float64_parameters_are_read_as_float32() -> None:
    params = params_from_arrays({"w0_weight": np.float64([1.0]), "w1_weight": np.ones((2, 1)), "v": np.ones((2, 4))})
    assert params.factors.dtype == np.float32 and params.factors.shape == (2, 4)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.ones(2, np.float32)}, r"neither of the FM layouts.*the file holds x \(2,\) float32"),
        (
            {"w0_weight": np.ones(1), "w1_weight": np.ones((2, 1)), "v": np.ones((2, 2)),
             "Linear_Plus_Bias_bias": np.ones(1), "Linear_Plus_Bias_weight": np.ones((1, 2))},
            "both of the FM layouts",
        ),
        ({"w0_weight": np.ones(1), "w1_weight": np.ones((4, 1)), "v": np.ones((3, 5))},
         r"neither axis of v \(3, 5\) matches the 4 linear weights.*w1_weight \(4, 1\)"),
        ({"w0_weight": np.ones(2), "w1_weight": np.ones((4, 1)), "v": np.ones((4, 5))}, "w0_weight must hold one value"),
        ({"w0_weight": np.ones(1), "w1_weight": np.ones((4, 2)), "v": np.ones((4, 5))}, "w1_weight must be a vector"),
        ({"w0_weight": np.ones(1), "w1_weight": np.ones((4, 1)), "v": np.ones(4)}, "v must be 2-D"),
        ({"w0_weight": np.ones(1), "w1_weight": np.ones((4, 1), np.int32), "v": np.ones((4, 2))},
         "w1_weight has dtype int32"),
    ],
)
def test_unrecognised_parameters_are_refused_naming_what_was_found(arrays: dict, message: str) -> None:
    with pytest.raises(ArtifactFormatError, match=message):
        params_from_arrays(arrays, source="f.params")


def test_unnamed_parameter_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "params"
    path.write_bytes(dump_ndarrays([np.ones(3, np.float32)]))
    with pytest.raises(ArtifactFormatError, match="stores no names"):
        read_model_artifact(path)


def test_meta_json_sets_predictor_type_and_is_checked() -> None:
    params = _params(n=4, k=2)
    stored = dump_ndarrays({f"arg:{k}": v for k, v in fm_arrays(params).items()})
    meta = {"training_parameters": {"feature_dim": "4", "num_factors": "2", "predictor_type": "binary_classifier"}}
    blob = _tar_gz({"./model_algo-1": _zip({"params": stored, "meta.json": json.dumps(meta).encode()})})
    assert params_from_bytes(blob).predictor_type == "binary_classifier"
    meta["training_parameters"]["feature_dim"] = "7"
    blob = _tar_gz({"model_algo-1": _zip({"params": stored, "meta.json": json.dumps(meta).encode()})})
    with pytest.raises(ArtifactFormatError, match="feature_dim is 7 but the parameters have 4"):
        params_from_bytes(blob)
    blob = _tar_gz({"model_algo-1": _zip({"params": stored, "meta.json": b"{not json"})})
    with pytest.raises(ArtifactFormatError, match=r"meta.json: not valid JSON"):
        params_from_bytes(blob)


def params_from_bytes(blob: bytes) -> FMParams:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "model.tar.gz"
        path.write_bytes(blob)
        return read_model_artifact(path)


def test_missing_members_are_named(tmp_path: Path) -> None:
    path = tmp_path / "model.tar.gz"
    path.write_bytes(_tar_gz({"other": b"x"}))
    with pytest.raises(ArtifactFormatError, match=r"expected one 'model_algo-1' in the tar, found members \['other'\]"):
        read_model_artifact(path)
    path.write_bytes(_tar_gz({"model_algo-1": _zip({"symbol.json": b"{}"})}))
    with pytest.raises(ArtifactFormatError, match=r"no 'params' in the zip; it holds \['symbol.json'\]"):
        read_model_artifact(path)
    with pytest.raises(ArtifactFormatError, match="cannot read the model artifact"):
        read_model_artifact(tmp_path / "empty-dir-has-no-model")


def test_corrupt_and_truncated_files_name_the_file(tmp_path: Path) -> None:
    good = model_tar_bytes(_params())
    path = tmp_path / "model.tar.gz"
    for broken in (good[: len(good) // 2], good[:-9] + b"\0" * 9, b"\x1f\x8b" + b"\0" * 30, b"hello"):
        path.write_bytes(broken)
        with pytest.raises(ArtifactFormatError, match=str(path)):
            read_model_artifact(path)
    algo = model_algo_bytes(_params())
    path.write_bytes(algo[: len(algo) - 40])
    with pytest.raises(ArtifactFormatError, match="corrupt or truncated zip"):
        read_model_artifact(path)
    inner = gzip.decompress(good)
    path.write_bytes(gzip.compress(inner[:700]))
    with pytest.raises(ArtifactFormatError, match=str(path)):
        read_model_artifact(path)


_GOOD_TAR = model_tar_bytes(_params(n=3, k=2))
_GOOD_ZIP = model_algo_bytes(_params(n=3, k=2))


def _read_blob_from(tmp_dir: Path, blob: bytes) -> None:
    path = tmp_dir / "model.tar.gz"
    path.write_bytes(blob)
    with contextlib.suppress(TopxError):
        read_model_artifact(path)


@settings(max_examples=200, deadline=None)
@given(which=st.sampled_from(["tar", "zip", "inner"]), position=st.integers(0, 10**6), value=st.integers(0, 255),
       cut=st.integers(0, 3000))
def test_corrupted_artifacts_raise_only_topx_errors(
    tmp_path_factory: pytest.TempPathFactory, which: str, position: int, value: int, cut: int
) -> None:
    base = {"tar": _GOOD_TAR, "zip": _GOOD_ZIP, "inner": gzip.decompress(_GOOD_TAR)}[which]
    corrupted = bytearray(base)
    corrupted[position % len(corrupted)] = value
    blob = bytes(corrupted[: max(0, len(corrupted) - cut)])
    if which == "inner":
        blob = gzip.compress(blob, mtime=0)
    _read_blob_from(tmp_path_factory.getbasetemp(), blob)


@settings(max_examples=100, deadline=None)
@given(blob=st.binary(max_size=300))
def test_random_bytes_raise_only_topx_errors(tmp_path_factory: pytest.TempPathFactory, blob: bytes) -> None:
    _read_blob_from(tmp_path_factory.getbasetemp(), blob)
    _read_blob_from(tmp_path_factory.getbasetemp(), b"PK\x03\x04" + blob)
    _read_blob_from(tmp_path_factory.getbasetemp(), gzip.compress(blob, mtime=0))
