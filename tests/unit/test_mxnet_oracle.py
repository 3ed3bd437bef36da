"""Real MXNet and SageMaker's writers as the oracle for topx's file formats, in both directions.

MXNet 1.9.1 needs numpy < 1.24, so it runs in its own environment (``<repo>/.venv-mxnet``, built
on first use by tests/oracle/oracle_env.py, about half a minute, reused after) and the two sides
share only files: tests/oracle/mxnet_reference.py writes files with MXNet / SageMaker and checks
files topx wrote. If that environment cannot be built, these tests fail: they never skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from topx.formats.artifact import read_model_artifact, write_model_artifact
from topx.formats.ndarray import load_ndarrays, save_ndarrays
from topx.formats.recordio import read_recordio_protobuf, write_recordio_protobuf
from topx.params import FMParams

ORACLE_DIR = Path(__file__).resolve().parents[1] / "oracle"
SCRIPT = ORACLE_DIR / "mxnet_reference.py"
SCRIPT_TIMEOUT_S = 300

pytestmark = pytest.mark.slow


def _load_env_builder():
    spec = importlib.util.spec_from_file_location("topx_oracle_env", ORACLE_DIR / "oracle_env.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def oracle_python() -> Path:
    builder = _load_env_builder()
    try:
        return builder.ensure_oracle_python()
    except builder.OracleEnvError as exc:
        pytest.fail(f"the MXNet oracle environment could not be built: {exc}")


def _run_oracle(python: Path, command: str, directory: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    return subprocess.run(
        [str(python), str(SCRIPT), command, str(directory)],
        capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S, env=env,
    )


@pytest.fixture(scope="module")
def references(oracle_python: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Files written by MXNet and SageMaker, and the manifest saying what each must hold."""
    directory = tmp_path_factory.mktemp("mxnet-written")
    done = _run_oracle(oracle_python, "write", directory)
    assert done.returncode == 0, f"oracle 'write' failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    return directory, json.loads((directory / "manifest.json").read_text())


def _assert_bitwise_equal(label: str, actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == expected.dtype, f"{label}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{label}: shape {actual.shape} != {expected.shape}"
    assert actual.tobytes() == expected.tobytes(), f"{label}: {actual!r} != {expected!r}"


# --- MXNet / SageMaker wrote, topx reads ---------------------------------------------------------


@pytest.mark.parametrize("name", ["nd_named", "nd_list", "nd_np_shape"])
def test_topx_reads_mx_nd_save_bit_for_bit(references: tuple[Path, dict], name: str) -> None:
    directory, manifest = references
    entry = manifest[name]
    loaded = load_ndarrays(directory / entry["file"])
    with np.load(directory / entry["expected"]) as expected:
        if entry["named"]:
            assert isinstance(loaded, dict)
            assert list(loaded) == list(expected.files)
            for key in expected.files:
                _assert_bitwise_equal(key, loaded[key], expected[key])
        else:
            assert isinstance(loaded, list)
            assert len(loaded) == len(expected.files)
            for i, array in enumerate(loaded):
                _assert_bitwise_equal(f"#{i}", array, expected[f"arr_{i}"])


@pytest.mark.parametrize("name", ["sm_w0", "sm_linear_plus_bias"])
def test_topx_reads_sagemaker_layout_models(references: tuple[Path, dict], name: str) -> None:
    directory, manifest = references
    entry = manifest[name]
    params = read_model_artifact(directory / entry["file"])
    with np.load(directory / entry["expected"]) as expected:
        assert params.bias == float(expected["bias"][0])
        _assert_bitwise_equal("linear", params.linear, expected["linear"])
        _assert_bitwise_equal("factors", params.factors, expected["factors"])
    assert params.predictor_type == entry["predictor_type"]


@pytest.mark.parametrize("name", ["sm_sparse", "sm_dense", "sm_dense_nolabel", "mx_split"])
def test_topx_reads_sagemaker_recordio(references: tuple[Path, dict], name: str) -> None:
    directory, manifest = references
    entry = manifest[name]
    x, y = read_recordio_protobuf(directory / entry["file"])
    with np.load(directory / entry["expected"]) as expected:
        _assert_bitwise_equal("features", x.toarray(), expected["x"])
        _assert_bitwise_equal("labels", y, expected["y"])
    if name == "mx_split":
        # dmlc's writer really did cut records at the magic, or this test proves nothing.
        assert entry["record_parts"] > x.shape[0]


# --- topx wrote, MXNet / SageMaker read ----------------------------------------------------------


def _fm_scores(params: FMParams, x: np.ndarray) -> np.ndarray:
    """The FM by its definition, in float64: bias + x.w + sum_{j<l} <v_j, v_l> x_j x_l."""
    v = params.factors.astype(np.float64)
    xv = x @ v
    pairwise = 0.5 * ((xv**2).sum(axis=1) - ((x**2) @ (v**2)).sum(axis=1))
    score = params.bias + x @ params.linear.astype(np.float64) + pairwise
    return 1.0 / (1.0 + np.exp(-score)) if params.predictor_type == "binary_classifier" else score


def _write_topx_files(directory: Path) -> dict[str, dict]:
    rng = np.random.default_rng(7)
    manifest: dict[str, dict] = {}

    named = {"w": rng.standard_normal((6, 3)).astype(np.float32), "b": np.float64([1e-300, -0.0, np.nan]),
             "cube": rng.standard_normal((2, 3, 4)).astype(np.float32), "h": np.float16([1, -2.5]),
             "u8": np.uint8([0, 255]), "i32": np.int32([-(2**31), 5]), "i8": np.int8([-128, 3]),
             "i64": np.int64([2**62, -1]), "flag": np.array([True, False])}
    save_ndarrays(directory / "topx_named.params", named)
    np.savez(directory / "topx_named.npz", **named)
    manifest["topx_named"] = {"kind": "ndarray", "file": "topx_named.params", "expected": "topx_named.npz",
                              "named": True, "names": list(named)}

    unnamed = [rng.standard_normal(5).astype(np.float64), rng.standard_normal((1, 1)).astype(np.float32)]
    save_ndarrays(directory / "topx_list.params", unnamed)
    np.savez(directory / "topx_list.npz", *unnamed)
    manifest["topx_list"] = {"kind": "ndarray", "file": "topx_list.params", "expected": "topx_list.npz",
                             "named": False, "count": len(unnamed)}

    np_shape = {"scalar": np.float32(3.25).reshape(()), "empty": np.zeros((0, 4), np.float64),
                "matrix": rng.standard_normal((2, 2)).astype(np.float32)}
    save_ndarrays(directory / "topx_np_shape.params", np_shape)
    np.savez(directory / "topx_np_shape.npz", **np_shape)
    manifest["topx_np_shape"] = {"kind": "ndarray", "file": "topx_np_shape.params", "expected": "topx_np_shape.npz",
                                 "named": True, "names": list(np_shape), "np_shape": True}

    for predictor_type in ("regressor", "binary_classifier"):
        n, k = 11, 5
        params = FMParams(-0.75, rng.standard_normal(n) * 0.3, rng.standard_normal((n, k)) * 0.3, predictor_type)
        model_dir = directory / f"model_{predictor_type}"
        tar = write_model_artifact(model_dir, params)
        x = (rng.random((8, n)) < 0.3).astype(np.float32)
        np.savez(model_dir / "expected.npz", bias=np.float32([params.bias]), linear=params.linear,
                 factors=params.factors, x=x, scores=_fm_scores(params, x.astype(np.float64)).astype(np.float32))
        manifest[f"topx_model_{predictor_type}"] = {
            "kind": "model", "file": str(tar.relative_to(directory)),
            "expected": str((model_dir / "expected.npz").relative_to(directory)), "predictor_type": predictor_type,
        }

    sparse = sp.random(25, 40, density=0.1, format="csr", dtype=np.float32, random_state=3)
    labels = rng.standard_normal(25).astype(np.float32)
    write_recordio_protobuf(directory / "topx_sparse.rec", sparse, labels)
    np.savez(directory / "topx_sparse.npz", x=sparse.toarray(), y=labels)
    manifest["topx_sparse"] = {"kind": "recordio", "file": "topx_sparse.rec", "expected": "topx_sparse.npz",
                               "sparse": True}
    dense = rng.standard_normal((9, 4)).astype(np.float32)
    write_recordio_protobuf(directory / "topx_dense.rec", dense, labels[:9])
    np.savez(directory / "topx_dense.npz", x=dense, y=labels[:9])
    manifest["topx_dense"] = {"kind": "recordio", "file": "topx_dense.rec", "expected": "topx_dense.npz",
                              "sparse": False}

    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


@pytest.fixture(scope="module")
def oracle_report(oracle_python: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    directory = tmp_path_factory.mktemp("topx-written")
    manifest = _write_topx_files(directory)
    done = _run_oracle(oracle_python, "check", directory)
    try:
        report = json.loads((directory / "report.json").read_text())
    except (OSError, json.JSONDecodeError):
        pytest.fail(f"oracle 'check' gave no report (exit {done.returncode}):\n{done.stdout}\n{done.stderr[-4000:]}")
    assert set(report) == set(manifest)
    return report


@pytest.mark.parametrize(
    "name",
    ["topx_named", "topx_list", "topx_np_shape", "topx_model_regressor", "topx_model_binary_classifier",
     "topx_sparse", "topx_dense"],
)
def test_mxnet_and_sagemaker_read_what_topx_wrote(oracle_report: dict[str, list[str]], name: str) -> None:
    assert oracle_report[name] == [], "\n".join(oracle_report[name])


def test_oracle_runs_on_old_numpy(oracle_python: Path) -> None:
    """The oracle really is MXNet 1.9.1 on numpy < 1.24, and the main environment is not."""
    done = subprocess.run(
        [str(oracle_python), "-c", "import mxnet, numpy; print(mxnet.__version__, numpy.__version__)"],
        capture_output=True, text=True, timeout=120,
    )
    mxnet_version, numpy_version = done.stdout.split()
    assert mxnet_version == "1.9.1"
    assert tuple(int(p) for p in numpy_version.split(".")[:2]) < (1, 24)
    assert importlib.util.find_spec("mxnet") is None, f"mxnet must not be importable from {sys.executable}"
