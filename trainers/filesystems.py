"""Where data and artifacts live: a local folder or an S3(-compatible) bucket.

Everything that reads or writes storage goes through `resolve_filesystem`, so a
path works the same whether it names a local folder, `file://...` or
`s3://bucket/prefix`. S3 settings come from the standard AWS variables, which
makes a MinIO or moto endpoint a matter of environment, not of code:

* endpoint: `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL` (none: AWS itself);
  an `http://` endpoint is spoken to over plain HTTP;
* region: `AWS_REGION`, else `AWS_DEFAULT_REGION`, else us-east-1;
* credentials: the AWS default chain (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/
  `AWS_SESSION_TOKEN`, then ~/.aws, then instance metadata).
"""
from __future__ import annotations

import os
import uuid
from urllib.parse import urlparse

import pyarrow.fs as pafs

OBJECT_STORES = {"s3", "gcs"}  # objects appear whole when the single upload completes


def s3_endpoint() -> str | None:
    """The S3 endpoint URL set in the environment, or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem configured from the standard AWS variables (see module doc)."""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    # Delayed open lets pyarrow write a small object with one PUT rather than a
    # three-request multipart upload (moto 5.2.1 also fails to complete those).
    # A storage blip (a stalled or refused connection) is retried for about a
    # minute rather than failing a checkpoint upload after pyarrow's 3 attempts.
    options = {"region": region, "allow_delayed_open": True, "connect_timeout": 5,
               "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=10)}
    endpoint = s3_endpoint()
    if endpoint is None:
        return pafs.S3FileSystem(**options)
    url = urlparse(endpoint)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise ValueError(f"S3 endpoint {endpoint!r} is not an http:// or https:// URL")
    # pyarrow wants host:port and the scheme apart; custom endpoints get path-style
    # addressing (pyarrow's default), which MinIO and moto need.
    return pafs.S3FileSystem(endpoint_override=url.netloc, scheme=url.scheme, **options)


def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding `uri` and the path inside it, pyarrow style.

    `s3://bucket/prefix` -> (S3 filesystem, "bucket/prefix"); a local path or
    `file:///abs/path` -> (local filesystem, absolute path); any other scheme
    pyarrow knows (gs://, hdfs://, ...) is passed to pyarrow as is.
    """
    url = urlparse(uri)
    if url.scheme == "s3":
        if not url.netloc:
            raise ValueError(f"S3 URI {uri!r} names no bucket (expected s3://bucket/prefix)")
        return s3_filesystem(), (url.netloc + url.path).rstrip("/")
    if url.scheme == "":
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    return pafs.FileSystem.from_uri(uri)


def join(base: str, *parts: str) -> str:
    """`base` with `parts` appended by "/", keeping a URI's scheme:
    join("s3://b/p", "x") == "s3://b/p/x"."""
    pieces = [base.rstrip("/")] + [p.strip("/") for p in parts if p.strip("/")]
    return "/".join(pieces)


def write_atomic(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write `data` to `path` so readers never see a partial file.

    On object stores one upload is already atomic; elsewhere write a
    temporary sibling and move it into place.
    """
    if filesystem.type_name in OBJECT_STORES:
        with filesystem.open_output_stream(path) as out:
            out.write(data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with filesystem.open_output_stream(tmp) as out:
        out.write(data)
    filesystem.move(tmp, path)
