"""The model artifact, in the layout of SageMaker's built-in factorization machines.

``model.tar.gz`` holds one member, ``model_algo-1``: a zip with

- ``params``: an MXNet NDArray file (``topx.formats.ndarray``) holding ``arg:w0_weight`` (bias, (1,)),
  ``arg:w1_weight`` (linear, (N, 1)) and ``arg:v`` (factors, (N, k)), float32. The ``arg:``
  prefix is MXNet's checkpoint convention, so ``mx.module.Module.load`` reads the file.
- ``symbol.json``: the FM as an MXNet symbol (data -> score, label ``out_label``), so the zip
  extracts to an MXNet checkpoint as SageMaker's does.
- ``meta.json``: ``feature_dim``, ``num_factors``, ``predictor_type`` (also under
  ``training_parameters``, as strings, where SageMaker keeps its hyperparameters).

The feature index (``topx.feature_index``) is written beside ``model.tar.gz``. Reading accepts the
other naming found in SageMaker models (``Linear_Plus_Bias_bias`` / ``Linear_Plus_Bias_weight``,
``v`` stored (k, N)). The whole layout is in docs/FORMATS.md.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from topx.errors import ArtifactFormatError
from topx.feature_index import FeatureIndex
from topx.formats.ndarray import LIST_MAGIC, NDArrays, dump_ndarrays, load_ndarrays
from topx.params import FMParams

MODEL_TAR = "model.tar.gz"
ALGO_MEMBER = "model_algo-1"
PARAMS_MEMBER = "params"
SYMBOL_MEMBER = "symbol.json"
META_MEMBER = "meta.json"

# Parameter names of the two layouts SageMaker's FM has written.
W0_NAMES = ("w0_weight", "w1_weight", "v")
LINEAR_PLUS_BIAS_NAMES = ("Linear_Plus_Bias_bias", "Linear_Plus_Bias_weight", "v")

# Fixed timestamps make the artifact's bytes a function of the model alone.
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
_TAR_MTIME = 315532800  # 1980-01-01T00:00:00Z; GNU tar warns about a zero mtime.
_MXNET_VERSION = 10901  # the symbol format of MXNet 1.9.1


def write_model_artifact(
    directory: str | os.PathLike[str],
    params: FMParams,
    feature_index: FeatureIndex | None = None,
) -> Path:
    """Write ``directory/model.tar.gz`` (and the feature index beside it when given); return the tar path.

    The same ``params`` always give the same bytes.
    """
    out = Path(directory)
    if feature_index is not None and feature_index.n_features != params.n_features:
        raise ArtifactFormatError(
            f"feature index has {feature_index.n_features} features but the model has {params.n_features}"
        )
    out.mkdir(parents=True, exist_ok=True)
    target = out / MODEL_TAR
    _write_atomically(target, model_tar_bytes(params))
    if feature_index is not None:
        feature_index.save(out)
    return target


def model_tar_bytes(params: FMParams) -> bytes:
    """``model.tar.gz`` as bytes: a gzip'd tar holding ``model_algo-1``."""
    return _gzip(_tar_with_one_member(ALGO_MEMBER, model_algo_bytes(params)))


def model_algo_bytes(params: FMParams) -> bytes:
    """The ``model_algo-1`` zip: ``meta.json``, ``params`` and ``symbol.json``."""
    members = {
        META_MEMBER: _meta_json(params).encode("utf-8"),
        PARAMS_MEMBER: dump_ndarrays({f"arg:{name}": array for name, array in fm_arrays(params).items()}),
        SYMBOL_MEMBER: fm_symbol_json(params.predictor_type, params.n_features, params.num_factors).encode("utf-8"),
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, payload in members.items():
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE_TIME)
            info.compress_type = zipfile.ZIP_STORED
            info.create_system = 3  # unix, whatever the platform, for identical bytes everywhere
            info.external_attr = 0o100644 << 16
            archive.writestr(info, payload)
    return buffer.getvalue()


def fm_arrays(params: FMParams) -> dict[str, np.ndarray]:
    """The FM as SageMaker names it: w0_weight (1,), w1_weight (N, 1), v (N, k), all float32."""
    return {
        "w0_weight": np.array([params.bias], dtype=np.float32),
        "w1_weight": params.linear.astype(np.float32).reshape(-1, 1),
        "v": params.factors.astype(np.float32),
    }


def read_model_artifact(path: str | os.PathLike[str], predictor_type: str = "regressor") -> FMParams:
    """Read an FM from ``model.tar.gz``, a bare ``model_algo-1`` zip, a bare params file, or a
    directory holding ``model.tar.gz``.

    ``predictor_type`` is used when the artifact has no ``meta.json`` saying it. Raises
    ``ArtifactFormatError`` naming the file for anything unreadable or ambiguous.
    """
    source = Path(path)
    if source.is_dir():
        source = source / MODEL_TAR
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise ArtifactFormatError(f"{source}: cannot read the model artifact: {exc}") from exc
    return _params_from_bytes(data, str(source), predictor_type)


def params_from_arrays(
    arrays: NDArrays, predictor_type: str = "regressor", source: str = "parameters"
) -> FMParams:
    """Recognise an FM's arrays in either SageMaker naming; ``arg:`` prefixes are dropped, ``aux:`` ignored.

    - ``w0_weight`` (1,), ``w1_weight`` (N, 1), ``v`` (N, k);
    - ``Linear_Plus_Bias_bias`` (1,), ``Linear_Plus_Bias_weight`` (1, N), ``v`` (k, N).

    N comes from the linear weights; v is read as (N, k) or transposed according to which of its
    axes has length N (the layout's own convention decides only when both do).
    """
    if not isinstance(arrays, Mapping):
        raise ArtifactFormatError(f"{source}: the parameter file stores no names ({len(arrays)} unnamed arrays)")
    named = _strip_prefixes(arrays)
    found = _describe(arrays)
    has_w0 = all(name in named for name in W0_NAMES)
    has_lpb = all(name in named for name in LINEAR_PLUS_BIAS_NAMES)
    if has_w0 == has_lpb:
        which = "both" if has_w0 else "neither"
        raise ArtifactFormatError(
            f"{source}: {which} of the FM layouts {list(W0_NAMES)} / {list(LINEAR_PLUS_BIAS_NAMES)} "
            f"found; the file holds {found}"
        )
    bias_name, linear_name, _ = W0_NAMES if has_w0 else LINEAR_PLUS_BIAS_NAMES
    bias = _float_array(named[bias_name], bias_name, source, found)
    if bias.size != 1:
        raise ArtifactFormatError(f"{source}: {bias_name} must hold one value; the file holds {found}")
    linear = _linear_vector(_float_array(named[linear_name], linear_name, source, found), linear_name, source, found)
    factors = _factors_matrix(
        _float_array(named["v"], "v", source, found), linear.shape[0], stored_transposed=not has_w0,
        source=source, found=found,
    )
    return FMParams(float(bias.reshape(-1)[0]), linear, factors, predictor_type)


def fm_symbol_json(predictor_type: str, n_features: int, num_factors: int) -> str:
    """The FM as an MXNet symbol graph: score = w0 + x.w1 + 0.5 * sum((x v)^2 - x^2 v^2).

    The parameters carry their shapes (``__shape__``), so binding needs only the data shape. The head is ``LinearRegressionOutput`` for a regressor (forward gives the score) and
    ``LogisticRegressionOutput`` for a binary classifier (forward gives sigmoid(score)); its label
    is ``out_label``, the name SageMaker's FM uses.
    """
    graph = _SymbolGraph()
    data = graph.variable("data")
    w1 = graph.variable("w1_weight", (n_features, 1))
    linear = graph.op("dot", "linear", [data, w1])
    w0 = graph.variable("w0_weight", (1,))
    linear = graph.op("broadcast_add", "linear_plus_bias", [linear, w0])
    v = graph.variable("v", (n_features, num_factors))
    xv = graph.op("dot", "xv", [data, v])
    sum_sq = graph.op("sum", "sum_xv_squared", [graph.op("square", "xv_squared", [xv])], axis="1", keepdims="True")
    x_sq = graph.op("square", "x_squared", [data])
    v_sq = graph.op("square", "v_squared", [v])
    sq_sum = graph.op("sum", "sum_x2v2", [graph.op("dot", "x2v2", [x_sq, v_sq])], axis="1", keepdims="True")
    pairwise = graph.op("_mul_scalar", "pairwise", [graph.op("elemwise_sub", "pairwise_2x", [sum_sq, sq_sum])],
                        scalar="0.5")
    score = graph.op("elemwise_add", "score", [linear, pairwise])
    label = graph.variable("out_label")
    head_op = "LogisticRegressionOutput" if predictor_type == "binary_classifier" else "LinearRegressionOutput"
    head = graph.op(head_op, "out", [score, label])
    return graph.to_json(head)


class _SymbolGraph:
    """Just enough of MXNet's symbol JSON (nnvm graph) to write a fixed forward graph."""

    def __init__(self) -> None:
        self.nodes: list[dict[str, Any]] = []

    def variable(self, name: str, shape: tuple[int, ...] | None = None) -> int:
        node: dict[str, Any] = {"op": "null", "name": name, "inputs": []}
        if shape is not None:
            # MXNet's own spelling of a declared float32 parameter: type flag 0 and a tuple string.
            node["attrs"] = {"__dtype__": "0", "__shape__": str(shape)}
        self.nodes.append(node)
        return len(self.nodes) - 1

    def op(self, op: str, name: str, inputs: list[int], **attrs: str) -> int:
        node: dict[str, Any] = {"op": op, "name": name, "inputs": [[i, 0, 0] for i in inputs]}
        if attrs:
            node["attrs"] = attrs
        self.nodes.append(node)
        return len(self.nodes) - 1

    def to_json(self, head: int) -> str:
        doc = {
            "nodes": self.nodes,
            "arg_nodes": [i for i, node in enumerate(self.nodes) if node["op"] == "null"],
            "node_row_ptr": list(range(len(self.nodes) + 1)),
            "heads": [[head, 0, 0]],
            "attrs": {"mxnet_version": ["int", _MXNET_VERSION]},
        }
        return json.dumps(doc, indent=2)


def _meta_json(params: FMParams) -> str:
    doc = {
        "feature_dim": params.n_features,
        "num_factors": params.num_factors,
        "predictor_type": params.predictor_type,
        "training_parameters": {
            "feature_dim": str(params.n_features),
            "num_factors": str(params.num_factors),
            "predictor_type": params.predictor_type,
        },
    }
    return json.dumps(doc, indent=2, sort_keys=True)


def _tar_with_one_member(name: str, payload: bytes) -> bytes:
    buffer = io.BytesIO()
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = _TAR_MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        archive.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def _gzip(payload: bytes) -> bytes:
    buffer = io.BytesIO()
    # mtime=0 and no file name in the header: the gzip bytes depend on the payload only.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=6) as stream:
        stream.write(payload)
    return buffer.getvalue()


def _write_atomically(target: Path, payload: bytes) -> None:
    """Readers never see a half-written artifact: write a temporary file, then rename it."""
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(payload)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def _params_from_bytes(data: bytes, label: str, predictor_type: str) -> FMParams:
    kind = _sniff(data)
    if kind == "gzip":
        data = _gunzip(data, label)
        kind = _sniff(data)
    if kind == "tar":
        member_label = f"{label}:{ALGO_MEMBER}"
        data = _tar_member(data, label)
        kind = _sniff(data)
        label = member_label
    if kind == "zip":
        params_bytes, meta = _read_algo_zip(data, label)
        params_label = f"{label}:{PARAMS_MEMBER}"
        arrays = load_ndarrays(params_bytes, label=params_label)
        return _apply_meta(params_from_arrays(arrays, _meta_predictor_type(meta, predictor_type, label), params_label),
                           meta, label)
    if kind == "ndarray":
        return params_from_arrays(load_ndarrays(data, label=label), predictor_type, label)
    raise ArtifactFormatError(
        f"{label}: not a model artifact: expected a gzip'd tar, a zip or an MXNet NDArray file, "
        f"found {len(data)} bytes starting {data[:8].hex() or '(empty)'}"
    )


def _sniff(data: bytes) -> str:
    if data[:2] == b"\x1f\x8b":
        return "gzip"
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if len(data) >= 262 and data[257:262] == b"ustar":
        return "tar"
    if len(data) >= 8 and int.from_bytes(data[:8], "little") == LIST_MAGIC:
        return "ndarray"
    return "unknown"


def _gunzip(data: bytes, label: str) -> bytes:
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise ArtifactFormatError(f"{label}: corrupt or truncated gzip data: {exc}") from exc


def _tar_member(data: bytes, label: str) -> bytes:
    """The bytes of the tar's ``model_algo-1`` (found by base name, so ``./model_algo-1`` counts)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
            members = archive.getmembers()
            wanted = [m for m in members if m.isfile() and m.name.rsplit("/", 1)[-1] == ALGO_MEMBER]
            if len(wanted) != 1:
                names = [m.name for m in members]
                raise ArtifactFormatError(f"{label}: expected one {ALGO_MEMBER!r} in the tar, found members {names}")
            stream = archive.extractfile(wanted[0])
            if stream is None:
                raise ArtifactFormatError(f"{label}: {wanted[0].name!r} in the tar cannot be read")
            payload = stream.read()
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise ArtifactFormatError(f"{label}: corrupt or truncated tar: {exc}") from exc
    if len(payload) != wanted[0].size:
        raise ArtifactFormatError(f"{label}: {wanted[0].name!r} is truncated in the tar")
    return payload


def _read_algo_zip(data: bytes, label: str) -> tuple[bytes, dict[str, Any] | None]:
    """``params`` (required) and the parsed ``meta.json`` (when present) from a ``model_algo-1`` zip."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            by_base = {info.filename.rsplit("/", 1)[-1]: info for info in archive.infolist() if not info.is_dir()}
            params_info = by_base.get(PARAMS_MEMBER)
            if params_info is None:
                raise ArtifactFormatError(
                    f"{label}: no {PARAMS_MEMBER!r} in the zip; it holds {sorted(archive.namelist())}"
                )
            params_bytes = archive.read(params_info)
            meta_info = by_base.get(META_MEMBER)
            meta_bytes = archive.read(meta_info) if meta_info is not None else None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError, RuntimeError) as exc:
        raise ArtifactFormatError(f"{label}: corrupt or truncated zip: {exc}") from exc
    return params_bytes, (None if meta_bytes is None else _parse_meta(meta_bytes, f"{label}:{META_MEMBER}"))


def _parse_meta(raw: bytes, label: str) -> dict[str, Any]:
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactFormatError(f"{label}: not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise ArtifactFormatError(f"{label}: expected a JSON object, found {type(meta).__name__}")
    return meta


def _meta_value(meta: Mapping[str, Any], key: str) -> Any:
    """A value from meta.json, top level first, then SageMaker's ``training_parameters``."""
    if key in meta:
        return meta[key]
    training = meta.get("training_parameters")
    return training.get(key) if isinstance(training, dict) else None


def _meta_predictor_type(meta: Mapping[str, Any] | None, default: str, label: str) -> str:
    value = None if meta is None else _meta_value(meta, "predictor_type")
    if value is None:
        return default
    if not isinstance(value, str):
        raise ArtifactFormatError(f"{label}:{META_MEMBER}: predictor_type is {value!r}, not a string")
    return value


def _apply_meta(params: FMParams, meta: Mapping[str, Any] | None, label: str) -> FMParams:
    """Check the parameters against meta.json's feature_dim and num_factors, when it states them."""
    if meta is None:
        return params
    for key, actual in (("feature_dim", params.n_features), ("num_factors", params.num_factors)):
        stated = _meta_value(meta, key)
        if stated is None:
            continue
        try:
            expected = int(stated)
        except (TypeError, ValueError) as exc:
            raise ArtifactFormatError(f"{label}:{META_MEMBER}: {key} is {stated!r}, not an integer") from exc
        if expected != actual:
            raise ArtifactFormatError(
                f"{label}:{META_MEMBER}: {key} is {expected} but the parameters have {actual}"
            )
    return params


def _strip_prefixes(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    named: dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        if name.startswith("aux:"):
            continue
        named[name.removeprefix("arg:")] = array
    return named


def _describe(arrays: Mapping[str, np.ndarray]) -> str:
    if not arrays:
        return "no arrays"
    return ", ".join(f"{name} {tuple(a.shape)} {a.dtype}" for name, a in arrays.items())


def _float_array(array: np.ndarray, name: str, source: str, found: str) -> np.ndarray:
    if array.dtype.kind != "f":
        raise ArtifactFormatError(f"{source}: {name} has dtype {array.dtype}, expected floats; the file holds {found}")
    return array.astype(np.float32)


def _linear_vector(linear: np.ndarray, name: str, source: str, found: str) -> np.ndarray:
    """(N,), (N, 1) or (1, N) -> (N,)."""
    if linear.ndim == 1 or (linear.ndim == 2 and 1 in linear.shape):
        return linear.reshape(-1)
    raise ArtifactFormatError(f"{source}: {name} must be a vector, (N, 1) or (1, N); the file holds {found}")


def _factors_matrix(
    v: np.ndarray, n_features: int, *, stored_transposed: bool, source: str, found: str
) -> np.ndarray:
    """v as (N, k), whichever way it is stored."""
    if v.ndim != 2:
        raise ArtifactFormatError(f"{source}: v must be 2-D; the file holds {found}")
    rows_match, cols_match = v.shape[0] == n_features, v.shape[1] == n_features
    if rows_match and cols_match:
        return v.T.copy() if stored_transposed else v
    if rows_match:
        return v
    if cols_match:
        return v.T.copy()
    raise ArtifactFormatError(
        f"{source}: neither axis of v {tuple(v.shape)} matches the {n_features} linear weights; the file holds {found}"
    )
