"""Local paths and s3:// URLs through one fsspec interface, with errors a user can act on.

S3 goes through s3fs; endpoint, region and credentials come from the standard AWS environment
and config files (AWS_ENDPOINT_URL, AWS_PROFILE, instance profiles, ...), never from our code,
and no message here ever contains a credential.

Errors come in two kinds. Configuration a user fixes (a missing bucket, access denied, no credentials)
is an InputError. Storage that did not answer (connection refused or reset, a timeout, throttling, a
5xx) is transient: `with_retries` tries again with backoff, and what still fails is StorageUnavailable,
never "bad input", so nothing is discarded because of it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TypeVar

import fsspec
import pyarrow as pa
import pyarrow.dataset as pads
from fsspec.implementations.local import LocalFileSystem

from vae.errors import InputError, StorageRefused, StorageUnavailable, first_line

log = logging.getLogger("vae.storage")
T = TypeVar("T")
# What an S3 endpoint, its proxy or the network says when it is down or overloaded, not misconfigured.
TRANSIENT = (
    "EndpointConnectionError",
    "Could not connect",
    "ConnectTimeout",
    "ReadTimeout",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "Connection refused",
    "Connection reset",
    "Connection aborted",
    "Connection was closed",
    "ConnectionClosedError",
    "Name or service not known",
    "SlowDown",
    "ServiceUnavailable",
    "Service Unavailable",
    "InternalError",
    "RequestTimeout",
    "Reduce your request rate",
)


def is_transient(error: BaseException) -> bool:
    if isinstance(error, StorageUnavailable | TimeoutError | ConnectionError):
        return True
    text = f"{type(error).__name__}: {error}"
    return any(word in text for word in TRANSIENT)


def with_retries(call: Callable[[], T], what: str) -> T:
    """call(), tried again with backoff (0.5 s, doubling) while storage is unavailable; VAE_STORAGE_RETRIES
    attempts in all (default 6: about 15 s of waiting). Other errors pass at once."""
    attempts = max(1, int(os.environ.get("VAE_STORAGE_RETRIES", "6")))
    started = time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as error:
            if not is_transient(error):
                raise
            if attempt == attempts:
                raise StorageUnavailable(
                    f"{_unavailable(what, error)}, after {attempts} attempts over "
                    f"{time.monotonic() - started:.0f} s; nothing was discarded: run the same command again"
                ) from None
            log.warning("%s: %s; trying again (%d/%d)", what, first_line(error), attempt, attempts - 1)
            time.sleep(0.5 * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def _unavailable(url: str, error: BaseException) -> str:
    if isinstance(error, StorageUnavailable):
        return str(error)
    endpoint = (
        os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or "the AWS default endpoint"
    )
    return (
        f"{url}: cannot reach the S3 endpoint ({endpoint}): {type(error).__name__}; check AWS_ENDPOINT_URL "
        "and the network"
    )


def filesystem(url: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or a URL such as s3://bucket/prefix."""
    url = str(url)
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as error:
        raise InputError(f"{url}: {error}; install the s3 extra (pip install 'vae-feast[s3]')") from None
    if is_local(fs):
        path = os.path.abspath(path)
    return fs, path.rstrip("/")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def url_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The path as a user would write it: plain for local files, with the protocol otherwise."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def write_bytes_atomically(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a whole file so that it is either absent or complete, never partial.

    Local: a temporary name then a rename. Object stores: one upload, which S3 makes visible
    only once complete.
    """
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(temporary, "wb") as f:
            f.write(data)
        os.replace(temporary, path)
    else:
        fs.pipe_file(path, data)


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Turn the storage layer's exceptions into one InputError that names the location and the fix."""
    try:
        yield
    except (InputError, StorageUnavailable):
        raise
    except Exception as error:  # s3fs, botocore and aiohttp raise many types; classify by what they say
        if is_transient(error):
            raise StorageUnavailable(_unavailable(url, error)) from None
        problem = describe_storage_error(url, error)
        if problem is None:
            raise
        raise StorageRefused(problem) from None


def describe_storage_error(url: str, error: BaseException) -> str | None:
    text = f"{type(error).__name__}: {error}"
    bucket = url.split("://", 1)[1].split("/", 1)[0] if "://" in url else ""
    if "NoSuchBucket" in text or "bucket does not exist" in text:
        return f"{url}: bucket '{bucket}' does not exist; check the URL and the region (AWS_DEFAULT_REGION)"
    if isinstance(error, PermissionError) or any(
        code in text for code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden")
    ):
        return (
            f"{url}: access denied; check the AWS credentials this process uses (AWS_PROFILE, "
            "AWS_ACCESS_KEY_ID, instance profile) and that they may read/write this location"
        )
    if "NoCredentials" in text or "Unable to locate credentials" in text:
        return (
            f"{url}: no AWS credentials found; set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "or use an instance profile"
        )
    return None  # a plain FileNotFoundError stays one: callers know what was missing


def open_parquet_dataset(url: str, what: str = "check the path") -> pads.Dataset:
    """A Parquet file or directory (local or s3://) as a pyarrow dataset, with one clear error if it
    is missing, unreadable or holds no Parquet files (`what` says what to do then)."""
    fs, root = filesystem(url)
    try:
        with storage_errors(url):
            dataset = pads.dataset(root, format="parquet", filesystem=fs)
    except FileNotFoundError:
        raise InputError(f"{url}: no such file or directory") from None
    except (pa.ArrowInvalid, OSError) as error:
        raise InputError(f"{url}: not readable as Parquet ({first_line(error)})") from None
    if not dataset.files:
        raise InputError(f"{url}: no Parquet files found; {what}")
    return dataset


def parquet_schema(url: str) -> pa.Schema:
    """The Arrow schema of a Parquet file or directory, with a clear error if it can't be read."""
    return open_parquet_dataset(url).schema
