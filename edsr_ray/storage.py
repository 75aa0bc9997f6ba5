"""Object storage and local files behind one set of functions that take ``s3://bucket/key`` URIs or paths.

Everything that reads or writes data (ingest, the patch stream, checkpoints, batch jobs) goes through this module, so
endpoint, region, credentials, retries and timeouts are decided in one place and both clients agree: the boto3 client
used for single objects and the ``pyarrow.fs.S3FileSystem`` handed to Ray Data and Ray Train.

Settings come from :class:`~edsr_ray.config.StorageConfig` where it sets them and otherwise from the standard AWS
environment and config files (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_PROFILE``). ``cfg=None`` means environment
only. Local paths may be plain (``~`` is expanded) or ``file://`` URIs.

Failures are raised as :class:`~edsr_ray.errors.StorageError` (missing objects as :class:`NotFoundError`) with a
message that names the URI and the endpoint and never a secret.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlsplit

from edsr_ray.config import StorageConfig
from edsr_ray.errors import StorageError

if TYPE_CHECKING:
    import pyarrow.fs

log = logging.getLogger(__name__)

S3_PREFIX = "s3://"
FILE_PREFIX = "file://"
# Objects at least this large go up as a multipart upload: S3 only makes the object visible when the upload is
# completed, so readers never see a partial object either way, and a lost connection costs one part, not the whole.
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNK = 16 * 1024 * 1024
# Temporary files of atomic local writes end with this; listings skip them so a concurrent reader never picks one up.
TMP_SUFFIX = ".edsr-tmp"

# Environment variables that change which endpoint, identity or region a client uses: part of the client cache key.
_ENV_KEYS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)
_AUTH_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "InvalidToken",
        "ExpiredToken",
        "AuthorizationHeaderMalformed",
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

T = TypeVar("T")


class NotFoundError(StorageError, FileNotFoundError):
    """The object, file or bucket does not exist; the message names the URI."""


# --------------------------------------------------------------------------------------------------------------------
# URIs


def is_s3(uri: str | os.PathLike[str]) -> bool:
    """True for ``s3://bucket/key`` URIs, False for local paths and ``file://`` URIs."""
    return isinstance(uri, str) and uri.startswith(S3_PREFIX)


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``; the key may be empty (``s3://bucket``)."""
    if not is_s3(uri):
        raise StorageError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[len(S3_PREFIX) :].partition("/")
    if not bucket or any(c.isspace() for c in bucket):
        raise StorageError(f"{uri!r} has no valid bucket name; expected s3://bucket/key")
    return bucket, key


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """Join URI or path parts with ``/``; refuses ``..`` so a joined key can never climb out of ``base``."""
    out = os.fspath(base)
    for part in parts:
        part = os.fspath(part)
        if not part:
            continue
        if ".." in part.split("/"):
            raise StorageError(f"refusing to join {part!r} to {out!r}: '..' would leave the base location")
        out = out.rstrip("/") + "/" + part.lstrip("/") if out else part
    return out


def _local_path(uri: str | os.PathLike[str]) -> Path:
    text = os.fspath(uri)
    if not text:
        raise StorageError("empty path: expected a local path or an s3://bucket/key URI")
    if text.startswith(FILE_PREFIX):
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"{text!r}: file:// URIs on another host ({parts.netloc}) are not supported")
        text = unquote(parts.path)
    elif _SCHEME.match(text):
        scheme = text.split("://", 1)[0]
        raise StorageError(f"{text!r}: unsupported scheme {scheme!r}; use s3://bucket/key or a local path")
    return Path(os.path.expanduser(text))


def _suffix_filter(suffixes: str | Iterable[str] | None) -> Callable[[str], bool]:
    if suffixes is None:
        return lambda name: True
    wanted = (suffixes,) if isinstance(suffixes, str) else tuple(suffixes)
    wanted = tuple(s.lower() for s in wanted)
    return lambda name: name.lower().endswith(wanted)


# --------------------------------------------------------------------------------------------------------------------
# Clients: one boto3 client and one pyarrow filesystem per (settings, environment, process)


@dataclass
class _Backend:
    """A boto3 session and client built from one set of settings, with what error messages may show about them."""

    cfg: StorageConfig
    session: Any  # boto3.Session
    client: Any  # botocore S3 client
    endpoint: str  # the URL the client talks to (shown in messages)
    custom_endpoint: str | None  # a non-AWS endpoint, passed on to pyarrow as well
    region: str
    credential_source: str  # where the credentials came from ("env", "shared-credentials-file", ...), never the keys
    _pyarrow: Any = field(default=None, repr=False)


_cache: dict[tuple[Any, ...], _Backend] = {}
_cache_lock = threading.Lock()


def _cache_key(cfg: StorageConfig) -> tuple[Any, ...]:
    # A digest of the environment, so changed credentials get a new client without secrets sitting in the key.
    digest = hashlib.sha256("\0".join(f"{k}={os.environ.get(k, '')}" for k in _ENV_KEYS).encode()).hexdigest()
    # The pid: boto3 clients hold connection pools that must not be shared across fork().
    return (cfg, digest, os.getpid())


def _backend(cfg: StorageConfig | None) -> _Backend:
    cfg = cfg or StorageConfig()
    key = _cache_key(cfg)
    with _cache_lock:
        backend = _cache.get(key)
        if backend is None:
            backend = _cache[key] = _build_backend(cfg)
        return backend


def _env_endpoint() -> str | None:
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        value = os.environ.get(name, "").strip()
        if value:
            if not value.startswith(("http://", "https://")):
                raise StorageError(f"{name}={value!r} must start with http:// or https://")
            return value
    return None


def _is_aws_host(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn"))


def _client_config(cfg: StorageConfig, region: str, custom_endpoint: bool) -> Any:
    from botocore.config import Config

    options: dict[str, Any] = {}
    if custom_endpoint:
        # S3-compatible servers expect path-style addressing and often reject the newer flexible checksums.
        options = {
            "s3": {"addressing_style": "path"},
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
        }
    return Config(
        region_name=region,
        # total_max_attempts counts the first try too (botocore's max_attempts counts only the retries).
        retries={"total_max_attempts": cfg.max_attempts, "mode": "standard"},
        connect_timeout=cfg.connect_timeout_s,
        read_timeout=cfg.read_timeout_s,
        **options,
    )


def _build_backend(cfg: StorageConfig) -> _Backend:
    import boto3
    from botocore.exceptions import BotoCoreError, ProfileNotFound

    endpoint = cfg.endpoint_url or _env_endpoint()
    profile = cfg.profile or os.environ.get("AWS_PROFILE")
    try:
        session = boto3.Session(profile_name=cfg.profile)
        region = cfg.region or os.environ.get("AWS_REGION") or session.region_name or "us-east-1"
        client = session.client("s3", endpoint_url=endpoint, config=_client_config(cfg, region, endpoint is not None))
        if endpoint is None and not _is_aws_host(client.meta.endpoint_url):
            # An endpoint_url from the AWS config file: an S3-compatible server after all.
            endpoint = client.meta.endpoint_url
            client = session.client("s3", endpoint_url=endpoint, config=_client_config(cfg, region, True))
        credentials = session.get_credentials()
    except ProfileNotFound:
        raise StorageError(f"AWS profile {profile!r} is not defined in the AWS config files") from None
    except BotoCoreError as exc:
        raise StorageError(f"cannot set up the S3 client for {endpoint or 'AWS'}: {exc}") from exc
    source = getattr(credentials, "method", "unknown") if credentials is not None else "none"
    if profile:
        source += f", profile {profile!r}"
    shown = client.meta.endpoint_url
    log.debug("S3 client for %s (region %s, credentials from %s)", shown, region, source)
    return _Backend(cfg, session, client, shown, endpoint, region, source)


def s3_client(cfg: StorageConfig | None = None) -> Any:
    """The boto3 S3 client for these settings (cached per process; safe to share between threads)."""
    return _backend(cfg).client


def pyarrow_filesystem(cfg: StorageConfig | None = None) -> pyarrow.fs.S3FileSystem:
    """A ``pyarrow.fs.S3FileSystem`` with the same endpoint, region, credentials, retries and timeouts as the client.

    Credentials are the ones boto3 resolved (so profiles and config files work) and travel with the filesystem when
    Ray pickles it to workers. Temporary credentials are frozen at creation; call again after they are renewed.
    """
    backend = _backend(cfg)
    with _cache_lock:
        if backend._pyarrow is None:
            backend._pyarrow = _build_pyarrow(backend)
        return backend._pyarrow


def _build_pyarrow(backend: _Backend) -> pyarrow.fs.S3FileSystem:
    import pyarrow.fs as pafs

    cfg = backend.cfg
    kwargs: dict[str, Any] = {
        "region": backend.region,
        "connect_timeout": cfg.connect_timeout_s,
        "request_timeout": cfg.read_timeout_s,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=cfg.max_attempts),
    }
    if backend.custom_endpoint:
        parts = urlsplit(backend.custom_endpoint)
        kwargs["endpoint_override"] = parts.netloc
        kwargs["scheme"] = parts.scheme
    credentials = backend.session.get_credentials()
    if credentials is None:
        # Without this pyarrow would run its own credential chain, which may differ from boto3's.
        kwargs["anonymous"] = True
    else:
        frozen = credentials.get_frozen_credentials()
        kwargs.update(access_key=frozen.access_key, secret_key=frozen.secret_key, session_token=frozen.token)
    return pafs.S3FileSystem(**kwargs)


def resolve_pyarrow(uri: str | os.PathLike[str], cfg: StorageConfig | None = None) -> tuple[pyarrow.fs.FileSystem, str]:
    """The pyarrow filesystem and path for a URI: ``(S3FileSystem, "bucket/key")`` or ``(LocalFileSystem, "/abs")``."""
    import pyarrow.fs as pafs

    if is_s3(uri):
        bucket, key = split_s3(uri)
        return pyarrow_filesystem(cfg), f"{bucket}/{key}".rstrip("/")
    return pafs.LocalFileSystem(), str(_local_path(uri).absolute())


# --------------------------------------------------------------------------------------------------------------------
# Error translation


def _s3_error(exc: Exception, op: str, uri: str, backend: _Backend) -> StorageError:
    """A StorageError for a botocore failure, naming the operation, URI and endpoint (botocore never shows secrets)."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        HTTPClientError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    where = f"{uri} at {backend.endpoint}"
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            bucket = split_s3(uri)[0] if is_s3(uri) else uri
            return NotFoundError(f"{uri}: bucket {bucket!r} does not exist at {backend.endpoint}")
        if code in _NOT_FOUND_CODES or status == 404:
            return NotFoundError(f"{uri}: no such object at {backend.endpoint}")
        if code in _AUTH_CODES or status == 403:
            return StorageError(
                f"cannot {op} {where}: access refused ({code or status}); check the access key, secret and permissions "
                f"(credentials from {backend.credential_source})"
            )
        return StorageError(f"cannot {op} {where}: {code or status}: {error.get('Message', '')}".rstrip(": "))
    if isinstance(exc, NoCredentialsError):
        return StorageError(
            f"cannot {op} {where}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or "
            "AWS_PROFILE"
        )
    if isinstance(exc, ReadTimeoutError):
        return StorageError(
            f"cannot {op} {where}: no answer within {backend.cfg.read_timeout_s:g} s after "
            f"{backend.cfg.max_attempts} attempt(s)"
        )
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
        return StorageError(
            f"cannot {op} {uri}: the S3 endpoint {backend.endpoint} is unreachable after "
            f"{backend.cfg.max_attempts} attempt(s) ({type(exc).__name__}); is the server running?"
        )
    if isinstance(exc, HTTPClientError):
        return StorageError(f"cannot {op} {where}: the connection failed ({type(exc).__name__}: {exc})")
    return StorageError(f"cannot {op} {where}: {exc}")


def _s3_call(op: str, uri: str, backend: _Backend, fn: Callable[[], T]) -> T:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn()
    except (BotoCoreError, ClientError) as exc:
        raise _s3_error(exc, op, uri, backend) from exc


def _local_error(exc: OSError, op: str, uri: str | os.PathLike[str]) -> StorageError:
    uri = os.fspath(uri)
    if isinstance(exc, FileNotFoundError):
        return NotFoundError(f"{uri}: no such file or directory")
    return StorageError(f"cannot {op} {uri}: {exc.strerror or exc}")


# --------------------------------------------------------------------------------------------------------------------
# Operations


def read_bytes(uri: str | os.PathLike[str], cfg: StorageConfig | None = None) -> bytes:
    """The whole content of a file or object."""
    if not is_s3(uri):
        try:
            return _local_path(uri).read_bytes()
        except OSError as exc:
            raise _local_error(exc, "read", uri) from exc
    bucket, key = _object(uri)
    backend = _backend(cfg)
    from botocore.exceptions import ResponseStreamingError

    # botocore retries the request, not the body download: a connection dropped mid-body is retried here.
    for attempt in range(1, backend.cfg.max_attempts + 1):
        response = _s3_call("read", uri, backend, lambda: backend.client.get_object(Bucket=bucket, Key=key))
        try:
            return response["Body"].read()
        except ResponseStreamingError as exc:
            if attempt == backend.cfg.max_attempts:
                raise _s3_error(exc, "read", uri, backend) from exc
            log.warning("reading %s was interrupted (%s); retrying", uri, type(exc).__name__)
            time.sleep(0.1 * 2**attempt)
    raise AssertionError("unreachable")


def write_bytes(
    uri: str | os.PathLike[str], data: bytes | bytearray | memoryview, cfg: StorageConfig | None = None
) -> None:
    """Write ``data`` so that readers see either the old content or all of the new one, never a partial file.

    Local: a temporary file in the same folder, then ``os.replace`` (parent folders are created). S3: one PUT, or a
    multipart upload for large objects, which S3 only publishes once it is complete.
    """
    data = bytes(data) if not isinstance(data, bytes) else data
    if is_s3(uri):
        bucket, key = _object(uri)
        if key.endswith("/"):
            raise StorageError(f"cannot write {uri}: the key ends with '/'")
        backend = _backend(cfg)
        if len(data) < MULTIPART_THRESHOLD:
            _s3_call("write", uri, backend, lambda: backend.client.put_object(Bucket=bucket, Key=key, Body=data))
        else:
            _multipart_upload(backend, uri, bucket, key, data)
        return
    path = _local_path(uri)
    if os.fspath(uri).endswith("/"):
        raise StorageError(f"cannot write {os.fspath(uri)}: the path ends with '/'")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            # On disk before the rename: after a crash the name must never point at an empty file that a resumed
            # job would take for finished work.
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise _local_error(exc, "write", uri) from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _multipart_upload(backend: _Backend, uri: str, bucket: str, key: str, data: bytes) -> None:
    client = backend.client
    upload = _s3_call("write", uri, backend, lambda: client.create_multipart_upload(Bucket=bucket, Key=key))
    upload_id = upload["UploadId"]
    try:
        parts = []
        view = memoryview(data)
        for number, start in enumerate(range(0, len(data), MULTIPART_CHUNK), start=1):
            chunk = view[start : start + MULTIPART_CHUNK].tobytes()
            part = _s3_call(
                "write",
                uri,
                backend,
                lambda: client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=chunk),  # noqa: B023
            )
            parts.append({"PartNumber": number, "ETag": part["ETag"]})
        _s3_call(
            "write",
            uri,
            backend,
            lambda: client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            ),
        )
    except BaseException:
        # Leave no billable orphan parts behind; the object itself was never visible.
        with contextlib.suppress(Exception):
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        raise


def exists(uri: str | os.PathLike[str], cfg: StorageConfig | None = None) -> bool:
    """True if the file/object exists, or if the URI is a folder / a prefix holding at least one object."""
    if not is_s3(uri):
        return _local_path(uri).exists()
    bucket, key = split_s3(uri)
    backend = _backend(cfg)
    try:
        if not key:
            _s3_call("check", uri, backend, lambda: backend.client.head_bucket(Bucket=bucket))
            return True
        _s3_call("check", uri, backend, lambda: backend.client.head_object(Bucket=bucket, Key=key))
        return True
    except NotFoundError:
        pass
    prefix = key.rstrip("/") + "/"
    try:
        page = _s3_call(
            "check", uri, backend, lambda: backend.client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
        )
    except NotFoundError:  # the bucket itself is missing
        return False
    return bool(page.get("KeyCount", len(page.get("Contents", []))))


def delete(uri: str | os.PathLike[str], cfg: StorageConfig | None = None) -> None:
    """Delete one file or object; deleting something that does not exist is not an error (as in S3)."""
    if is_s3(uri):
        bucket, key = _object(uri)
        backend = _backend(cfg)
        _s3_call("delete", uri, backend, lambda: backend.client.delete_object(Bucket=bucket, Key=key))
        return
    path = _local_path(uri)
    if path.is_dir():
        raise StorageError(f"cannot delete {os.fspath(uri)}: it is a directory (delete removes single files)")
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise _local_error(exc, "delete", uri) from exc


def stat_size(uri: str | os.PathLike[str], cfg: StorageConfig | None = None) -> int:
    """Size in bytes of a file or object."""
    if is_s3(uri):
        bucket, key = _object(uri)
        backend = _backend(cfg)
        head = _s3_call("stat", uri, backend, lambda: backend.client.head_object(Bucket=bucket, Key=key))
        return int(head["ContentLength"])
    try:
        return _local_path(uri).stat().st_size
    except OSError as exc:
        raise _local_error(exc, "stat", uri) from exc


def list_files(
    uri: str | os.PathLike[str],
    cfg: StorageConfig | None = None,
    *,
    suffixes: str | Iterable[str] | None = None,
    page_size: int = 1000,
) -> list[str]:
    """Every file below a folder or prefix, recursively, as sorted full URIs (in the same form as ``uri``).

    ``suffixes`` keeps names ending with any of them, case-insensitively (``(".png", ".jpg")``). A URI naming a single
    file or object lists just that one. A missing local folder or bucket is a :class:`NotFoundError`; an empty or
    missing prefix inside an existing bucket lists nothing. ``page_size`` is the S3 listing page (at most 1000).
    """
    keep = _suffix_filter(suffixes)
    if is_s3(uri):
        return sorted(_list_s3(uri, cfg, keep, page_size))
    text = os.fspath(uri)
    root = _local_path(text)
    if root.is_file():
        return [text] if keep(root.name) else []
    if not root.is_dir():
        raise NotFoundError(f"{text}: no such directory")
    base = text.rstrip("/") or "/"
    out = []
    try:
        for dirpath, _dirs, files in os.walk(root, onerror=_raise):
            rel_dir = os.path.relpath(dirpath, root)
            for name in files:
                if name.endswith(TMP_SUFFIX) or not keep(name):
                    continue
                rel = name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/")
                out.append(join(base, rel))
    except OSError as exc:
        raise _local_error(exc, "list", exc.filename or text) from exc
    return sorted(out)


def _raise(exc: OSError) -> None:
    raise exc


def _list_s3(uri: str, cfg: StorageConfig | None, keep: Callable[[str], bool], page_size: int) -> list[str]:
    if not 1 <= page_size <= 1000:
        raise StorageError(f"page_size must be in [1, 1000], got {page_size}")
    bucket, key = split_s3(uri)
    backend = _backend(cfg)
    prefix = key.rstrip("/") + "/" if key else ""

    def collect() -> list[str]:
        found = []
        paginator = backend.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}):
            for obj in page.get("Contents", []):
                name = obj["Key"]
                if not name.endswith("/") and keep(name.rsplit("/", 1)[-1]):  # "dir/" keys are folder markers
                    found.append(f"{S3_PREFIX}{bucket}/{name}")
        return found

    found = _s3_call("list", uri, backend, collect)
    if not found and key and not key.endswith("/"):
        # The URI may name a single object rather than a prefix.
        with contextlib.suppress(NotFoundError):
            _s3_call("list", uri, backend, lambda: backend.client.head_object(Bucket=bucket, Key=key))
            return [uri] if keep(key.rsplit("/", 1)[-1]) else []
    return found


def check_bucket_name(name: str) -> str:
    """Return ``name`` if it is a valid name for a new bucket, else raise a StorageError explaining the rules."""
    if not isinstance(name, str) or not _BUCKET_NAME.match(name) or ".." in name:
        raise StorageError(
            f"invalid bucket name {name!r}: use 3-63 lowercase letters, digits, '.' or '-', starting and ending with a "
            "letter or digit"
        )
    return name


def ensure_bucket(name: str, cfg: StorageConfig | None = None) -> None:
    """Create the bucket unless it already exists (and is ours)."""
    check_bucket_name(name)
    uri = f"{S3_PREFIX}{name}"
    backend = _backend(cfg)
    try:
        _s3_call("check", uri, backend, lambda: backend.client.head_bucket(Bucket=name))
        return
    except NotFoundError:
        pass
    kwargs: dict[str, Any] = {"Bucket": name}
    if backend.region != "us-east-1" and backend.custom_endpoint is None:
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": backend.region}
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        backend.client.create_bucket(**kwargs)
        log.info("created bucket %s at %s", name, backend.endpoint)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":  # created concurrently: fine
            raise _s3_error(exc, "create bucket", uri, backend) from exc
    except BotoCoreError as exc:
        raise _s3_error(exc, "create bucket", uri, backend) from exc


def _object(uri: str) -> tuple[str, str]:
    bucket, key = split_s3(uri)
    if not key:
        raise StorageError(f"{uri!r} names a bucket, not an object; expected s3://bucket/key")
    return bucket, key


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    # Read without changing it where possible: os.umask() sets the mask process-wide, racing with other threads.
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
