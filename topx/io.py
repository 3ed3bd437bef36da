"""Reading input bytes from a local path or ``s3://bucket/key``, gunzipping transparently.

This is the only place ingest touches S3. The boto3 client is passed in, or created on the first
S3 read (never at import time) with the endpoint from ``TOPX_ENDPOINT_URL`` when that is set.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Any

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
    client = s3_client if s3_client is not None else _default_s3_client()
    try:
        response = client.get_object(Bucket=bucket, Key=key)
        return response["Body"].read()
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        reason = _S3_NOT_READABLE.get(code)
        if reason is None:
            raise
        raise InputDataError(f"{reason} ({code})", source=uri) from exc


def _default_s3_client() -> Any:
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
