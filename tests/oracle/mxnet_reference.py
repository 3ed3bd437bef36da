"""Runs inside the isolated oracle environment (real MXNet 1.9.1 and the sagemaker package).

    python mxnet_reference.py write DIR   # files written by MXNet / SageMaker, plus what they hold
    python mxnet_reference.py check DIR   # read what topx wrote into DIR (DIR/manifest.json)

``write`` leaves ``DIR/manifest.json`` describing each file and ``.npz`` files with the arrays the
files must hold. ``check`` writes ``DIR/report.json``: check name -> list of problems (empty: passed).
Nothing here imports topx: the two sides only share files.
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import tarfile
import tempfile
import traceback
import zipfile
from pathlib import Path

import mxnet as mx
import numpy as np
import scipy.sparse as sp
from sagemaker.amazon.common import (
    read_records,
    write_numpy_to_dense_tensor,
    write_spmatrix_to_sparse_tensor,
)
from sagemaker.amazon.record_pb2 import Record

RECORDIO_MAGIC = 0xCED7230A


def main(argv: list[str]) -> int:
    command, directory = argv[1], Path(argv[2])
    if command == "write":
        write_references(directory)
        return 0
    if command == "check":
        report = check_topx_files(directory)
        # A file, not stdout: MXNet and the sagemaker package print their own lines there.
        (directory / "report.json").write_text(json.dumps(report, indent=2))
        return 0 if not any(report.values()) else 1
    raise SystemExit(f"unknown command {command!r}")


# --- write: files made by MXNet and SageMaker --------------------------------------------------


def special_values(dtype: str) -> np.ndarray:
    info = np.finfo(dtype)
    return np.array([0.0, -0.0, np.inf, -np.inf, np.nan, info.tiny, info.max, -info.max, info.eps], dtype=dtype)


def reference_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    shapes = {"vector": (7,), "one": (1,), "matrix": (3, 4), "column": (5, 1), "cube": (2, 3, 4)}
    arrays: dict[str, np.ndarray] = {}
    for dtype in ("float32", "float64"):
        for label, shape in shapes.items():
            arrays[f"{dtype}_{label}"] = rng.standard_normal(shape).astype(dtype)
        arrays[f"{dtype}_special"] = special_values(dtype)
    return arrays


def write_references(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20240601)
    manifest: dict[str, dict] = {}

    named = reference_arrays(rng)
    mx.nd.save(str(out / "nd_named.params"), {k: mx.nd.array(v, dtype=v.dtype) for k, v in named.items()})
    np.savez(out / "nd_named.npz", **named)
    manifest["nd_named"] = {"file": "nd_named.params", "expected": "nd_named.npz", "named": True}

    unnamed = [rng.standard_normal((4, 2)).astype("float32"), rng.standard_normal(3).astype("float64"),
               np.array([1, 0, 255], dtype="uint8"), np.array([-2**31, 7], dtype="int32"),
               np.array([-128, 5], dtype="int8"), np.array([-2**63, 2**62], dtype="int64"),
               np.array([1.5, -65504, np.inf], dtype="float16"), np.array([True, False], dtype="bool")]
    mx.nd.save(str(out / "nd_list.params"), [mx.nd.array(v, dtype=v.dtype) for v in unnamed])
    np.savez(out / "nd_list.npz", *unnamed)
    manifest["nd_list"] = {"file": "nd_list.params", "expected": "nd_list.npz", "named": False}

    np_shape = {"scalar32": np.array(2.5, dtype="float32"), "scalar64": np.array(-1e300, dtype="float64"),
                "empty": np.zeros((0, 3), dtype="float32"), "cube": rng.standard_normal((2, 1, 3)).astype("float64")}
    with mx.util.np_shape(True):
        mx.nd.save(str(out / "nd_np_shape.params"), {k: mx.nd.array(v, dtype=v.dtype) for k, v in np_shape.items()})
    np.savez(out / "nd_np_shape.npz", **np_shape)
    manifest["nd_np_shape"] = {"file": "nd_np_shape.params", "expected": "nd_np_shape.npz", "named": True}

    manifest.update(write_sagemaker_models(out, rng))
    manifest.update(write_sagemaker_records(out, rng))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))


def fm_symbol() -> mx.sym.Symbol:
    data, w0, w1, v = (mx.sym.var(n) for n in ("data", "w0_weight", "w1_weight", "v"))
    linear = mx.sym.broadcast_add(mx.sym.dot(data, w1), w0)
    pair = 0.5 * (mx.sym.sum(mx.sym.square(mx.sym.dot(data, v)), axis=1, keepdims=True)
                  - mx.sym.sum(mx.sym.dot(mx.sym.square(data), mx.sym.square(v)), axis=1, keepdims=True))
    return mx.sym.LinearRegressionOutput(linear + pair, label=mx.sym.var("out_label"))


def sagemaker_tar(path: Path, params: dict[str, np.ndarray], meta: dict | None) -> None:
    """model.tar.gz > model_algo-1 (zip) > params (mx.nd.save, arg: names), symbol.json, meta.json."""
    with tempfile.TemporaryDirectory() as tmp:
        params_path = os.path.join(tmp, "params")
        mx.nd.save(params_path, {f"arg:{k}": mx.nd.array(v, dtype=v.dtype) for k, v in params.items()})
        zipped = io.BytesIO()
        with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.write(params_path, "params")
            archive.writestr("symbol.json", fm_symbol().tojson())
            if meta is not None:
                archive.writestr("meta.json", json.dumps(meta))
        algo_path = os.path.join(tmp, "model_algo-1")
        Path(algo_path).write_bytes(zipped.getvalue())
        with tarfile.open(path, "w:gz") as tar:
            tar.add(algo_path, arcname="model_algo-1")


def write_sagemaker_models(out: Path, rng: np.random.Generator) -> dict[str, dict]:
    n, k = 9, 4
    bias = np.float32(0.25)
    linear = rng.standard_normal(n).astype("float32")
    factors = rng.standard_normal((n, k)).astype("float32")
    np.savez(out / "fm_expected.npz", bias=np.array([bias]), linear=linear, factors=factors)
    sagemaker_tar(
        out / "sm_w0.tar.gz",
        {"w0_weight": np.array([bias]), "w1_weight": linear.reshape(n, 1), "v": factors},
        {"training_parameters": {"feature_dim": str(n), "num_factors": str(k),
                                 "predictor_type": "binary_classifier"}},
    )
    sagemaker_tar(
        out / "sm_linear_plus_bias.tar.gz",
        {"Linear_Plus_Bias_bias": np.array([bias]), "Linear_Plus_Bias_weight": linear.reshape(1, n),
         "v": np.ascontiguousarray(factors.T)},
        None,
    )
    return {
        "sm_w0": {"file": "sm_w0.tar.gz", "expected": "fm_expected.npz", "predictor_type": "binary_classifier"},
        "sm_linear_plus_bias": {"file": "sm_linear_plus_bias.tar.gz", "expected": "fm_expected.npz",
                                "predictor_type": "regressor"},
    }


def write_sagemaker_records(out: Path, rng: np.random.Generator) -> dict[str, dict]:
    sparse = sp.random(40, 30, density=0.15, format="lil", dtype=np.float32, random_state=7)
    sparse[3, :] = 0  # an all-zero row: values and keys empty, only the shape is written
    sparse = sparse.tocsr()
    sparse.eliminate_zeros()
    labels = rng.standard_normal(40).astype("float32")
    with open(out / "sm_sparse.rec", "wb") as fh:
        write_spmatrix_to_sparse_tensor(fh, sparse, labels)
    dense = rng.standard_normal((12, 6)).astype("float32")
    with open(out / "sm_dense.rec", "wb") as fh:
        write_numpy_to_dense_tensor(fh, dense, labels[:12])
    with open(out / "sm_dense_nolabel.rec", "wb") as fh:
        write_numpy_to_dense_tensor(fh, dense)
    np.savez(out / "sm_sparse.npz", x=sparse.toarray(), y=labels)
    np.savez(out / "sm_dense.npz", x=dense, y=labels[:12])
    np.savez(out / "sm_dense_nolabel.npz", x=dense, y=np.full(12, np.nan, dtype="float32"))
    x_split, parts = write_split_records(out / "mx_split.rec")
    np.savez(out / "mx_split.npz", x=x_split, y=np.arange(x_split.shape[0], dtype="float32"))
    return {
        "sm_sparse": {"file": "sm_sparse.rec", "expected": "sm_sparse.npz"},
        "sm_dense": {"file": "sm_dense.rec", "expected": "sm_dense.npz"},
        "sm_dense_nolabel": {"file": "sm_dense_nolabel.rec", "expected": "sm_dense_nolabel.npz"},
        "mx_split": {"file": "mx_split.rec", "expected": "mx_split.npz", "record_parts": parts},
    }


def write_split_records(path: Path) -> tuple[np.ndarray, int]:
    """Records whose payload holds the RecordIO magic, written by dmlc's writer (through MXNet),
    which splits a record at each 4-byte aligned copy of the magic. Returns the matrix and the
    number of record parts written (more parts than records proves the split happened)."""
    magic_float = struct.unpack("<f", struct.pack("<I", RECORDIO_MAGIC))[0]
    n_rows, n_columns = 24, 400
    x = np.zeros((n_rows, n_columns), dtype="float32")
    writer = mx.recordio.MXRecordIO(str(path), "w")
    for i in range(n_rows):
        columns = np.arange(1 + 3 * i) * 7 % n_columns  # different lengths shift the alignment
        columns = np.unique(columns)
        x[i, columns] = magic_float
        record = Record()
        record.features["values"].float32_tensor.values.extend(x[i, columns].tolist())
        record.features["values"].float32_tensor.keys.extend(columns.tolist())
        record.features["values"].float32_tensor.shape.extend([n_columns])
        record.label["values"].float32_tensor.values.extend([float(i)])
        writer.write(record.SerializeToString())
    writer.close()
    return x, count_record_parts(path.read_bytes())


def count_record_parts(data: bytes) -> int:
    offset, parts = 0, 0
    while offset < len(data):
        _, lrec = struct.unpack_from("<II", data, offset)
        length = lrec & ((1 << 29) - 1)
        offset += 8 + (length + 3) // 4 * 4
        parts += 1
    return parts


# --- check: files made by topx ------------------------------------------------------------------


def check_topx_files(directory: Path) -> dict[str, list[str]]:
    manifest = json.loads((directory / "manifest.json").read_text())
    report: dict[str, list[str]] = {}
    for name, entry in manifest.items():
        try:
            report[name] = CHECKS[entry["kind"]](directory, entry)
        except Exception:  # the oracle reports every failure as data, then the test fails on it
            report[name] = [traceback.format_exc()]
    return report


def same_array(label: str, actual: np.ndarray, expected: np.ndarray) -> list[str]:
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        return [f"{label}: {actual.dtype} {actual.shape}, expected {expected.dtype} {expected.shape}"]
    if actual.tobytes() != expected.tobytes():
        return [f"{label}: values differ: {actual!r} vs {expected!r}"]
    return []


def check_ndarray_file(directory: Path, entry: dict) -> list[str]:
    path = str(directory / entry["file"])
    if entry.get("np_shape"):
        with mx.util.np_shape(True):
            loaded = mx.nd.load(path)
            loaded = as_numpy(loaded)
    else:
        loaded = as_numpy(mx.nd.load(path))
    with np.load(directory / entry["expected"]) as expected_file:
        if entry["named"]:
            expected = {k: expected_file[k] for k in entry["names"]}
            if not isinstance(loaded, dict) or list(loaded) != list(expected):
                return [f"names: {list(loaded) if isinstance(loaded, dict) else 'unnamed'}, expected {list(expected)}"]
            return [p for k in expected for p in same_array(k, loaded[k], expected[k])]
        expected_list = [expected_file[f"arr_{i}"] for i in range(entry["count"])]
        if not isinstance(loaded, list) or len(loaded) != len(expected_list):
            return [f"loaded {type(loaded).__name__} of {len(loaded)}, expected a list of {len(expected_list)}"]
        return [p for i, (a, e) in enumerate(zip(loaded, expected_list, strict=True)) for p in same_array(f"#{i}", a, e)]


def as_numpy(loaded):
    if isinstance(loaded, dict):
        return {k: v.asnumpy() for k, v in loaded.items()}
    return [v.asnumpy() for v in loaded]


def check_model_artifact(directory: Path, entry: dict) -> list[str]:
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(directory / entry["file"], "r:gz") as tar:
            names = tar.getnames()
            if names != ["model_algo-1"]:
                problems.append(f"tar members {names}, expected ['model_algo-1']")
            tar.extractall(tmp)
        with zipfile.ZipFile(os.path.join(tmp, "model_algo-1")) as archive:
            members = sorted(archive.namelist())
            if members != ["meta.json", "params", "symbol.json"]:
                problems.append(f"zip members {members}")
            archive.extractall(tmp)
        meta = json.loads(Path(tmp, "meta.json").read_text())
        with np.load(directory / entry["expected"]) as expected:
            n, k = expected["factors"].shape
            want_meta = {"feature_dim": n, "num_factors": k, "predictor_type": entry["predictor_type"]}
            for key, value in want_meta.items():
                if meta.get(key) != value or str(meta["training_parameters"].get(key)) != str(value):
                    problems.append(f"meta.json {key}: {meta.get(key)!r}, expected {value!r}")
            params = as_numpy(mx.nd.load(os.path.join(tmp, "params")))
            want = {"arg:w0_weight": expected["bias"].astype("float32"),
                    "arg:w1_weight": expected["linear"].reshape(n, 1), "arg:v": expected["factors"]}
            if sorted(params) != sorted(want):
                problems.append(f"params names {sorted(params)}, expected {sorted(want)}")
            else:
                problems += [p for key in want for p in same_array(key, params[key], want[key])]
            problems += check_module_forward(tmp, expected["x"], expected["scores"])
    return problems


def check_module_forward(tmp: str, x: np.ndarray, scores: np.ndarray) -> list[str]:
    """Load the extracted zip as the recipe does (Module.load) and compare its forward pass."""
    os.rename(os.path.join(tmp, "symbol.json"), os.path.join(tmp, "model-symbol.json"))
    os.rename(os.path.join(tmp, "params"), os.path.join(tmp, "model-0000.params"))
    module = mx.module.Module.load(os.path.join(tmp, "model"), 0, False, label_names=["out_label"])
    module.bind(data_shapes=[("data", x.shape)], for_training=False)
    module.forward(mx.io.DataBatch([mx.nd.array(x)]), is_train=False)
    out = module.get_outputs()[0].asnumpy().reshape(-1)
    if not np.allclose(out, scores, rtol=1e-4, atol=1e-5):
        return [f"Module forward {out!r}, expected {scores!r}"]
    return []


def check_recordio(directory: Path, entry: dict) -> list[str]:
    problems: list[str] = []
    with np.load(directory / entry["expected"]) as expected:
        x, y = expected["x"], expected["y"]
    with open(directory / entry["file"], "rb") as fh:
        records = read_records(fh)
    if len(records) != x.shape[0]:
        return [f"{len(records)} records, expected {x.shape[0]}"]
    for i, record in enumerate(records):
        tensor = record.features["values"].float32_tensor
        row = np.zeros(x.shape[1], dtype="float32")
        values = np.array(tensor.values, dtype="float32")
        if entry["sparse"]:
            row[np.array(tensor.keys, dtype=np.int64)] = values
            if list(tensor.shape) != [x.shape[1]]:
                problems.append(f"record {i}: shape {list(tensor.shape)}")
        else:
            row = values
        if row.tobytes() != x[i].tobytes():
            problems.append(f"record {i}: features {row!r}, expected {x[i]!r}")
        label = list(record.label["values"].float32_tensor.values)
        if label != [float(y[i])]:
            problems.append(f"record {i}: label {label}, expected {float(y[i])}")
    reference = io.BytesIO()
    if entry["sparse"]:
        write_spmatrix_to_sparse_tensor(reference, sp.csr_matrix(x), y)
    else:
        write_numpy_to_dense_tensor(reference, x, y)
    if reference.getvalue() != (directory / entry["file"]).read_bytes():
        problems.append("bytes differ from SageMaker's writer for the same matrix and labels")
    return problems


CHECKS = {"ndarray": check_ndarray_file, "model": check_model_artifact, "recordio": check_recordio}


if __name__ == "__main__":
    sys.exit(main(sys.argv))
