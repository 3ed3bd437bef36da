"""Reading input bytes from a local path or ``s3://bucket/key``, gunzipping transparently.

This is the only place ingest touches S3. The boto3 client is passed in, or created on the first
S3 read (never at import time) with the endpoint from ``TOPX_ENDPOINT_URL`` when that is set.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from topx.contract import ENV_ENDPOINT_URL
from topx.errors import InputDataError

GZIP_MAGIC = b"\x1f\x8b"
S3_SCHEME = "s3://"

# S3 error codes that mean "this object cannot be read by us", as opposed to a transient failure
# (throttling, 5xx) that a retry may fix; the latter propagate as botocore's own exceptions.
_S3_NOT_READABLE = {
    "NoSuchKey": "object not found",
    "404": "object not found",
    "NotFound": "object not found",
    "NoSuchBucket": "bucket not found",
    "AccessDenied": "access denied",
    "403": "access denied",
    "Forbidden": "access denied",
    "InvalidObjectState": "object is archived and cannot be read",
}


def read_bytes(source: str, *, s3_client: Any = None) -> bytes:
    """Return the content of ``source`` (a local path or ``s3://bucket/key``), gunzipped if gzip.

    The content is gunzipped when the name ends with ``.gz`` or the bytes start with the gzip
    magic number. ``s3_client`` is a boto3 S3 client; one is created only when an S3 source is read
    and none is given. Raises ``InputDataError`` naming ``source`` when the file or object is
    missing or unreadable, or when a gzip stream is truncated or corrupt.
    """
    raw = _read_s3(source, s3_client) if source.startswith(S3_SCHEME) else _read_local(source)
    if source.endswith(".gz") or raw.startswith(GZIP_MAGIC):
        raw = _gunzip(raw, source)
    return raw


@dataclass(frozen=True)
class Part:
    """One data file of a dataset: its path or ``s3://`` URI, and the ``key=value`` partition folders
    between the dataset's root and it, as Spark, Hive and Athena write them (``{"dt": "2024-05-01"}``)."""

    source: str
    partitions: dict[str, str]
    # Bytes as stored (compressed), from the listing; None when it could not be known before reading.
    size: int | None = None


def dataset_parts(source: str, *, s3_client: Any = None) -> list[Part]:
    """The data files of ``source``: itself when it is a file (or an S3 object), else every file under
    it (a local folder, or an S3 prefix: a URI ending in ``/``, or one with no object of its own), in
    path order, skipping what exports write beside the data: names starting with ``_`` or ``.``
    anywhere below the root (``_SUCCESS``, ``_committed_*``, ``_started_*``, ``_temporary/``, ``.crc``
    files), ``*.crc``, and empty files and "folder" objects. A folder with no data file is an error."""
    if source.startswith(S3_SCHEME):
        return _s3_parts(source, s3_client)
    root = Path(source)
    if not root.is_dir():
        return [Part(source, {}, root.stat().st_size if root.is_file() else None)]
    parts = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root)
        size = path.stat().st_size
        if _is_data(relative.parts, size):
            parts.append(Part(str(path), _partitions(relative.parts[:-1]), size))
    if not parts:
        raise InputDataError("the folder holds no data file (only markers or empty files)", source=source)
    return parts


def is_data_object(relative_key: str, size: int) -> bool:
    """Whether an object ``relative_key`` (its key below a dataset's root) of ``size`` bytes is data, as
    ``dataset_parts`` reads it: not a marker, checksum, hidden or temporary file, nor empty."""
    return not relative_key.endswith("/") and _is_data(relative_key.split("/"), size)


def _is_data(segments: tuple[str, ...] | list[str], size: int) -> bool:
    return size > 0 and not segments[-1].endswith(".crc") and not any(s.startswith(("_", ".")) for s in segments)


def _partitions(folders: tuple[str, ...] | list[str]) -> dict[str, str]:
    found = {}
    for folder in folders:
        name, sep, value = folder.partition("=")
        if sep and name:
            found[unquote(name)] = unquote(value)
    return found


def _s3_parts(uri: str, s3_client: Any) -> list[Part]:
    bucket, _, key = uri[len(S3_SCHEME):].partition("/")
    if not bucket:
        raise InputDataError("not an S3 URI; expected s3://bucket/key or s3://bucket/prefix/", source=uri)
    client = s3_client if s3_client is not None else default_s3_client()
    prefix = key if key.endswith("/") or not key else key + "/"
    if key and not key.endswith("/"):
        size = _s3_object_size(client, bucket, key, uri)
        if size is not None:
            return [Part(uri, {}, size)]
    from botocore.exceptions import ClientError

    parts = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                segments = obj["Key"][len(prefix):].split("/")
                if obj["Key"].endswith("/") or not _is_data(segments, int(obj.get("Size", 0))):
                    continue
                parts.append(Part(f"{S3_SCHEME}{bucket}/{obj['Key']}", _partitions(segments[:-1]), int(obj["Size"])))
    except ClientError as exc:
        _raise_if_not_readable(exc, uri)
        raise
    if not parts:
        what = ("object not found, and no data object under it as a prefix" if key and not key.endswith("/")
                else "no data object under this prefix (only markers, empty objects, or nothing)")
        raise InputDataError(what, source=uri)
    return sorted(parts, key=lambda part: part.source)


def _s3_object_size(client: Any, bucket: str, key: str, uri: str) -> int | None:
    """The object's size in bytes; None when there is no object of that key."""
    from botocore.exceptions import ClientError

    try:
        return int(client.head_object(Bucket=bucket, Key=key).get("ContentLength", 0))
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound"):
            return None
        _raise_if_not_readable(exc, uri)
        raise


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``; a URI without a key is an error."""
    bucket, _, key = uri[len(S3_SCHEME):].partition("/")
    if not bucket or not key:
        raise InputDataError("not an S3 object URI; expected s3://bucket/key", source=uri)
    return bucket, key


def _read_local(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise InputDataError("file not found", source=path) from exc
    except IsADirectoryError as exc:
        raise InputDataError("is a directory, not a file", source=path) from exc
    except PermissionError as exc:
        raise InputDataError("permission denied", source=path) from exc
    except OSError as exc:
        raise InputDataError(f"cannot read file: {exc.strerror or exc}", source=path) from exc


def _read_s3(uri: str, s3_client: Any) -> bytes:
    # botocore is imported here, not at module level, so importing topx stays cheap.
    from botocore.exceptions import ClientError

    bucket, key = split_s3_uri(uri)
    client = s3_client if s3_client is not None else default_s3_client()
    try:
        response = client.get_object(Bucket=bucket, Key=key)
        return response["Body"].read()
    except ClientError as exc:
        _raise_if_not_readable(exc, uri)
        raise


def _raise_if_not_readable(exc: Exception, uri: str) -> None:
    """Raise an InputDataError naming ``uri`` when an S3 error means "we cannot read this" (missing,
    denied, archived); return for the others (throttling, 5xx: a retry may fix those)."""
    code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
    reason = _S3_NOT_READABLE.get(code)
    if reason is not None:
        raise InputDataError(f"{reason} ({code})", source=uri) from exc


def default_s3_client() -> Any:
    """A boto3 S3 client, for ``TOPX_ENDPOINT_URL`` when that is set."""
    import boto3

    return boto3.client("s3", endpoint_url=os.environ.get(ENV_ENDPOINT_URL) or None)


def _gunzip(raw: bytes, source: str) -> bytes:
    if not raw:
        return raw
    if not raw.startswith(GZIP_MAGIC):
        raise InputDataError("named .gz but is not gzip data", source=source)
    try:
        return gzip.decompress(raw)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise InputDataError(f"gzip stream is truncated or corrupt ({exc})", source=source) from exc
