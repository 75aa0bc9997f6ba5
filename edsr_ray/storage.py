"""Object storage and local files behind one set of functions that take ``s3://bucket/key`` URIs or paths.

Everything that reads or writes data (ingest, the patch stream, checkpoints, batch jobs) goes through this module, so
endpoint, region, credentials, retries and timeouts are decided in one place and both clients agree: the boto3 client
used for single objects and the ``pyarrow.fs.S3FileSystem`` handed to Ray Data and Ray Train.

Settings come from :class:`StorageConfig` (the ``storage`` section of every config) where it sets them and otherwise
from the standard AWS environment and config files (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_PROFILE``).
``cfg=None`` means environment only. Local paths may be plain (``~`` is expanded) or ``file://`` URIs;
:func:`location_kind` is the one place that decides what a location string means, and refuses any other scheme
(``gs://``, ``S3://``, ``gs:bucket``) instead of taking it for a local folder.

Reads of user input are bounded: local files are checked to be regular files before they are opened (a FIFO, socket,
device or directory named like an image fails at once instead of blocking), every read stops at
``StorageConfig.max_read_bytes``, and an object read from S3 must finish within ``StorageConfig.read_budget_s``.

Failures are raised as :class:`~edsr_ray.errors.StorageError` (missing objects as :class:`NotFoundError`) with a
message that names the URI and the endpoint and never a secret.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import hashlib
import io
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar
from urllib.parse import unquote, urlsplit

from edsr_ray.errors import LocationError, StorageError, require

if TYPE_CHECKING:
    import pyarrow.fs

log = logging.getLogger(__name__)

S3_PREFIX = "s3://"
FILE_PREFIX = "file://"
MLFLOW_PREFIXES = ("models:/", "runs:/")
# Kinds of location (:func:`location_kind`); each place that takes a location says which kinds it supports.
LOCAL, S3, MLFLOW = "local", "s3", "mlflow"
DATA_LOCATIONS = (LOCAL, S3)
MODEL_LOCATIONS = (LOCAL, S3, MLFLOW)
_KIND_NAMES = {
    LOCAL: "a local path (or file:// URI)",
    S3: "s3://bucket/key",
    MLFLOW: "an MLflow models:/ or runs:/ URI",
}
# Near misses of the supported schemes (S3://, s3a://, s3:bucket, models:x): their kind and exact spelling, for a hint.
_NEAR_MISSES = {
    "s3": (S3, S3_PREFIX),
    "s3a": (S3, S3_PREFIX),
    "s3n": (S3, S3_PREFIX),
    "file": (LOCAL, FILE_PREFIX),
    "models": (MLFLOW, "models:/"),
    "runs": (MLFLOW, "runs:/"),
}
# Local files are read in chunks of this size once the expected size is exceeded (a growing file, /proc).
READ_CHUNK = 1 << 20
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
# A URI scheme and its colon at the start of a location: "gs://b/x", "S3://b", and the short forms "gs:b/x", "s3:b".
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")

T = TypeVar("T")


@dataclass(frozen=True)
class StorageConfig:
    """Object-storage settings; unset fields fall back to the standard AWS environment and config files.

    Credentials are never part of the config: they come from the environment or the named profile, so they are
    never logged with the config.
    """

    endpoint_url: str | None = None  # S3-compatible endpoint (default: AWS_ENDPOINT_URL, else AWS S3)
    region: str | None = None  # default: AWS_REGION / AWS_DEFAULT_REGION / the profile's region
    profile: str | None = None  # named AWS profile for credentials (default: AWS_PROFILE)
    max_attempts: int = 5  # attempts per request, retrying 5xx, throttling and dropped connections with backoff
    connect_timeout_s: float = 5.0  # a down endpoint fails after max_attempts of this
    read_timeout_s: float = 60.0  # per request read timeout
    # Largest file or object one read takes in (an image, a list file, a manifest, model weights); larger ones fail
    # by name, before their content is read where the size is known up front.
    max_read_bytes: int = 512 << 20
    # Wall time one object read may take, all attempts included: a server that sends too slowly fails by name.
    read_budget_s: float = 300.0

    def __post_init__(self) -> None:
        require(self.max_attempts >= 1, "max_attempts", f"must be >= 1, got {self.max_attempts}")
        require(self.connect_timeout_s > 0, "connect_timeout_s", f"must be > 0, got {self.connect_timeout_s}")
        require(self.read_timeout_s > 0, "read_timeout_s", f"must be > 0, got {self.read_timeout_s}")
        require(self.max_read_bytes >= 1, "max_read_bytes", f"must be >= 1, got {self.max_read_bytes}")
        require(self.read_budget_s > 0, "read_budget_s", f"must be > 0, got {self.read_budget_s}")
        if self.endpoint_url is not None:
            require(
                self.endpoint_url.startswith(("http://", "https://")),
                "endpoint_url",
                f"must start with http:// or https://, got {self.endpoint_url!r}",
            )


_DEFAULT_SETTINGS = StorageConfig()  # what cfg=None means


class NotFoundError(StorageError, FileNotFoundError):
    """The object, file or bucket does not exist; the message names the URI."""


class NotRegularFileError(StorageError):
    """A local path to be read is not a regular file (a FIFO, socket, device, directory, or a broken or looping
    symbolic link); the message names the path and what it is."""


# --------------------------------------------------------------------------------------------------------------------
# URIs


def location_kind(location: str | os.PathLike[str], allowed: Iterable[str] = DATA_LOCATIONS, *, what: str = "") -> str:
    """The kind of ``location``: :data:`LOCAL`, :data:`S3` or :data:`MLFLOW`, which must be one of ``allowed``.

    ``s3://bucket/key`` is S3; ``models:/...`` and ``runs:/...`` are MLflow; ``file://`` URIs, plain paths and
    ``os.PathLike`` objects are local. Anything else that starts like a URI scheme (``gs://``, ``S3://``, ``s3a://``,
    ``http://``, and the colon forms ``gs:bucket/x`` or ``s3:bucket``) raises :class:`~edsr_ray.errors.LocationError`
    naming the supported kinds, so such a location is never taken for a local folder called ``gs:``. ``what`` (e.g.
    ``"--output"``) starts the message.
    """
    allowed = tuple(allowed)
    text = os.fspath(location)
    if isinstance(location, os.PathLike) or text.startswith(FILE_PREFIX):
        kind = LOCAL
    elif text.startswith(S3_PREFIX):
        kind = S3
    elif text.startswith(MLFLOW_PREFIXES):
        kind = MLFLOW
    elif match := _SCHEME.match(text):
        raise LocationError(_foreign_scheme(text, match.group(1), allowed, what))
    else:
        kind = LOCAL
    if kind not in allowed:
        shown = f"{what} {text}" if what else text
        raise LocationError(f"{shown}: {_KIND_NAMES[kind]} is not supported here; use {_supported(allowed)}")
    return kind


def _supported(allowed: tuple[str, ...]) -> str:
    names = [_KIND_NAMES[k] for k in allowed]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _foreign_scheme(text: str, scheme: str, allowed: tuple[str, ...], what: str) -> str:
    written = f"{scheme}://" if text[len(scheme) + 1 :].startswith("//") else f"{scheme}:"
    shown = f"{what} {text}" if what else text
    message = f"{shown}: unsupported scheme {written!r}; supported here: {_supported(allowed)}"
    kind, spelling = _NEAR_MISSES.get(scheme.lower(), (None, ""))
    if kind in allowed:
        message += f"; did you mean {spelling}? (only that exact spelling is understood)"
    if LOCAL in allowed and not written.endswith("//"):
        message += f"; for a local name that contains a colon, write ./{text}"
    return message


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


def local_path(uri: str | os.PathLike[str]) -> Path:
    """The local path a plain path or ``file://`` URI names (``~`` expanded); other schemes are refused."""
    text = os.fspath(uri)
    if not text:
        raise StorageError("empty path: expected a local path or an s3://bucket/key URI")
    if location_kind(uri, DATA_LOCATIONS) != LOCAL:
        raise LocationError(f"{text}: expected a local path or file:// URI here")
    if text.startswith(FILE_PREFIX):
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"{text!r}: file:// URIs on another host ({parts.netloc}) are not supported")
        text = unquote(parts.path)
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
    return pafs.LocalFileSystem(), str(local_path(uri).absolute())


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


def read_bytes(uri: str | os.PathLike[str], cfg: StorageConfig | None = None, *, max_bytes: int | None = None) -> bytes:
    """The whole content of a file or object, at most ``max_bytes`` (default: ``cfg.max_read_bytes``).

    Local: only a regular file is read (a FIFO, socket, device or directory fails at once, by name, without being
    opened for reading). S3: an object that declares more than the limit is refused before its body is read, a body
    that runs past it is cut off, and the whole read must finish within ``cfg.read_budget_s``.
    """
    limit = (cfg or _DEFAULT_SETTINGS).max_read_bytes if max_bytes is None else max_bytes
    if not is_s3(uri):
        with _open_regular(uri) as (fd, size):
            if size > limit:
                raise _too_large(uri, f"{size:,} bytes", limit)
            return _read_fd(fd, size, limit, os.fspath(uri))
    bucket, key = _object(uri)
    backend = _backend(cfg)
    return _get_object(backend, uri, {"Bucket": bucket, "Key": key}, limit)[0]


def read_head(uri: str | os.PathLike[str], size: int, cfg: StorageConfig | None = None) -> tuple[bytes, int]:
    """(the first ``size`` bytes, the whole size) of a file or object: a ranged read, for content sniffing.

    The same checks as :func:`read_bytes` apply: special files fail by name, and an S3 read is time-bounded.
    """
    if not is_s3(uri):
        with _open_regular(uri) as (fd, total):
            return _read_fd(fd, size, size, os.fspath(uri), cut=True), total
    bucket, key = _object(uri)
    backend = _backend(cfg)
    request = {"Bucket": bucket, "Key": key, "Range": f"bytes=0-{max(size, 1) - 1}"}
    try:
        head, response = _get_object(backend, uri, request, size, cut=True)
    except StorageError as exc:
        if isinstance(exc.__cause__, Exception) and _error_code(exc.__cause__) == "InvalidRange":
            return b"", 0  # an empty object has no byte 0
        raise
    # "bytes 0-511/12345": the whole size follows the slash; without a range, the length is the whole size.
    whole = str(response.get("ContentRange", "")).rpartition("/")[2]
    return head, int(whole) if whole.isdigit() else int(response.get("ContentLength") or len(head))


def check_regular_file(uri: str | os.PathLike[str]) -> os.stat_result:
    """``os.stat`` of a local regular file, found without opening it: anything else raises the error :func:`read_bytes`
    would, naming the path and what it is (:class:`NotFoundError`, or :class:`NotRegularFileError` for ``not a regular
    file: a FIFO (named pipe)``, a dangling symbolic link, a loop of links, ...)."""
    return _stat_regular(local_path(uri), os.fspath(uri))


def _stat_regular(path: Path, text: str) -> os.stat_result:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise NotRegularFileError(
                f"{text}: not a regular file: a dangling symbolic link (its target does not exist)"
            ) from None
        raise NotFoundError(f"{text}: no such file or directory") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegularFileError(f"{text}: not a regular file: a loop of symbolic links") from None
        raise _local_error(exc, "read", text) from exc
    _require_regular(info.st_mode, path, text)
    return info


def _require_regular(mode: int, path: Path, text: str) -> None:
    if stat.S_ISREG(mode):
        return
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    what = next((name for test, name in kinds if test(mode)), "a special file")
    via = " reached through a symbolic link" if os.path.islink(path) else ""
    raise NotRegularFileError(f"{text}: not a regular file: {what}{via}")


@contextlib.contextmanager
def _open_regular(uri: str | os.PathLike[str]) -> Iterator[tuple[int, int]]:
    """(descriptor, size) of a local regular file, opened for reading only after ``stat`` said it is one.

    Opening a FIFO for reading blocks until a writer appears and opening a device can have side effects, so those are
    refused from ``stat`` alone. ``O_NONBLOCK`` and the ``fstat`` of the open descriptor cover a file replaced by one
    of them in between.
    """
    path, text = local_path(uri), os.fspath(uri)
    _stat_regular(path, text)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise _local_error(exc, "read", text) from exc
    try:
        info = os.fstat(fd)
        _require_regular(info.st_mode, path, text)
        yield fd, info.st_size
    except OSError as exc:
        if isinstance(exc, StorageError):
            raise
        raise _local_error(exc, "read", text) from exc
    finally:
        os.close(fd)


def _read_fd(fd: int, expected: int, limit: int, text: str, *, cut: bool = False) -> bytes:
    """Read a descriptor to its end: the first read asks for one byte more than ``expected`` (the file's size), so a
    whole file usually takes one read and its end one more; a file that grows meanwhile, or reports no size
    (``/proc``), goes on in chunks up to the limit."""
    return _collect(lambda n: os.read(fd, n), min(expected, limit) + 1, limit, text, cut=cut)


def _collect(
    read: Callable[[int], bytes],
    first: int,
    limit: int,
    text: str,
    *,
    cut: bool,
    before_each: Callable[[int], None] | None = None,
) -> bytes:
    """Chunks from ``read(n)`` until it returns nothing: at most ``limit`` bytes, more is an error (or, with ``cut``,
    the first ``limit`` bytes are returned). ``before_each(bytes so far)`` runs before every read (a deadline)."""
    parts: list[bytes] = []
    total, want = 0, first
    while True:
        if before_each is not None:
            before_each(total)
        chunk = read(min(want, limit + 1 - total))
        if not chunk:
            break
        parts.append(chunk)
        total += len(chunk)
        if total > limit:
            if cut:
                return b"".join(parts)[:limit]
            raise _too_large(text, f"more than {limit:,} bytes", limit)
        want = READ_CHUNK
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _too_large(uri: str | os.PathLike[str], size: str, limit: int) -> StorageError:
    return StorageError(
        f"{os.fspath(uri)}: {size} is more than the {limit:,} bytes one read may take (the max_read_bytes limit)"
    )


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _get_object(
    backend: _Backend, uri: str, request: dict[str, Any], limit: int, *, cut: bool = False
) -> tuple[bytes, dict[str, Any]]:
    """(body, response) of a GET, the body bounded by ``limit`` bytes and by the settings' read budget (all attempts
    together); ``cut`` returns the first ``limit`` bytes of a longer body instead of refusing it."""
    from botocore.exceptions import IncompleteReadError, ResponseStreamingError

    budget = backend.cfg.read_budget_s
    deadline = time.monotonic() + budget
    # botocore retries the request, not the body download: a connection dropped mid-body is retried here.
    for attempt in range(1, backend.cfg.max_attempts + 1):
        response = _s3_call("read", uri, backend, lambda: backend.client.get_object(**request))
        body = response["Body"]
        declared = response.get("ContentLength")
        try:
            if declared is not None and declared > limit and not cut:
                raise _too_large(uri, f"{int(declared):,} bytes", limit)
            return _read_body(body, uri, limit, declared, deadline, budget, cut=cut), response
        except (ResponseStreamingError, IncompleteReadError) as exc:
            if attempt == backend.cfg.max_attempts or time.monotonic() > deadline:
                raise _s3_error(exc, "read", uri, backend) from exc
            log.warning("reading %s was interrupted (%s); retrying", uri, type(exc).__name__)
            time.sleep(0.1 * 2**attempt)
        finally:
            body.close()  # after a complete read the connection is back in the pool already; else it is dropped
    raise AssertionError("unreachable")


def _read_body(
    body: Any, uri: str, limit: int, declared: int | None, deadline: float, budget: float, *, cut: bool
) -> bytes:
    """Read a streaming body chunk by chunk, checking the size limit and the deadline between chunks.

    Each chunk is what one socket read delivers (urllib3's ``read1``), so a server that drips a byte at a time is
    noticed at the deadline instead of holding a read that waits for a whole buffer; a silent one is cut by the
    client's read timeout.
    """
    from botocore.exceptions import IncompleteReadError, ResponseStreamingError
    from urllib3.exceptions import ProtocolError, ReadTimeoutError

    raw = getattr(body, "_raw_stream", None)
    read1 = getattr(raw, "read1", None) or body.read

    def read(n: int) -> bytes:
        try:
            return read1(n)
        except (ProtocolError, ReadTimeoutError) as exc:  # a dropped or stalled connection: retried by the caller
            raise ResponseStreamingError(error=exc) from exc

    def in_time(done: int) -> None:
        if time.monotonic() > deadline:
            raise StorageError(
                f"cannot read {uri}: not finished within {budget:g} s after {done:,} bytes (the read_budget_s "
                "limit); the server sends too slowly"
            )

    data = _collect(read, READ_CHUNK, limit, uri, cut=cut, before_each=in_time)
    if not cut and declared is not None and len(data) != declared:
        raise IncompleteReadError(actual_bytes=len(data), expected_bytes=declared)
    return data


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
    _publish_local(uri, lambda f: f.write(data))


def _publish_local(uri: str | os.PathLike[str], fill: Callable[[BinaryIO], object]) -> None:
    """Write a local file atomically: ``fill`` writes the content into a temporary file in the same folder, which
    is flushed to disk and renamed over ``uri`` (parent folders are created)."""
    path = local_path(uri)
    if os.fspath(uri).endswith("/"):
        raise StorageError(f"cannot write {os.fspath(uri)}: the path ends with '/'")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
        with os.fdopen(fd, "wb") as f:
            fill(f)
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


def _multipart_upload(backend: _Backend, uri: str, bucket: str, key: str, data: bytes | Iterator[bytes]) -> None:
    """Upload ``data`` (the whole content, or its parts in order: each at least S3's 5 MiB but the last) in parts."""
    if isinstance(data, bytes):
        view = memoryview(data)
        data = (view[start : start + MULTIPART_CHUNK].tobytes() for start in range(0, len(view), MULTIPART_CHUNK))
    client = backend.client
    upload = _s3_call("write", uri, backend, lambda: client.create_multipart_upload(Bucket=bucket, Key=key))
    upload_id = upload["UploadId"]
    try:
        parts = []
        for number, chunk in enumerate(data, start=1):
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
        return local_path(uri).exists()
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
    path = local_path(uri)
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
        return local_path(uri).stat().st_size
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

    Locally, every entry that is not a folder walked into is listed: special files (FIFOs, sockets, devices) and
    symbolic links to folders (never followed, so a link loop cannot trap the walk) too, so that a reader fails on
    each of them by name instead of it vanishing from the listing.
    """
    keep = _suffix_filter(suffixes)
    if is_s3(uri):
        return sorted(_list_s3(uri, cfg, keep, page_size))
    text = os.fspath(uri)
    root = local_path(text)
    if not root.is_dir():
        if os.path.lexists(root):  # a file, a special file or a broken link: listed, to fail by name when read
            return [text] if keep(root.name) else []
        raise NotFoundError(f"{text}: no such file or directory")
    base = text.rstrip("/") or "/"
    out = []
    try:
        for dirpath, dirs, files in os.walk(root, onerror=_raise):
            rel_dir = os.path.relpath(dirpath, root)
            linked = [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]
            for name in (*files, *linked):
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


# --------------------------------------------------------------------------------------------------------------------
# Large files: reading in ranges, publishing from a local file

RANGE_BLOCK = 8 << 20  # bytes of one ranged GET: few requests for a video's scattered reads, bounded memory


def open_reader(
    uri: str | os.PathLike[str],
    cfg: StorageConfig | None = None,
    *,
    block_size: int = RANGE_BLOCK,
    cache_blocks: int = 4,
) -> io.RawIOBase:
    """A seekable, read-only binary file object over a file or object, for files read in pieces rather than whole (a
    video's index at its end, then one segment's bytes). Close it after use.

    Local: opened after the same regular-file checks as :func:`read_bytes`. S3: read in aligned blocks of
    ``block_size`` bytes by ranged GETs, each retried and time-bounded like :func:`read_bytes`, the last
    ``cache_blocks`` blocks kept; an object replaced while it is read fails by name (its ETag changes) instead of
    mixing two versions. Not bounded by ``max_read_bytes``: this is for files too large to read whole, and memory
    stays at ``block_size * cache_blocks``.
    """
    if block_size < 1 or cache_blocks < 1:
        raise StorageError(f"open_reader needs block_size and cache_blocks >= 1, got {block_size}, {cache_blocks}")
    if not is_s3(uri):
        with _open_regular(uri) as (fd, _):
            return os.fdopen(os.dup(fd), "rb", buffering=0)  # the checked descriptor, open beyond this block
    bucket, key = _object(uri)
    return _RangeReader(os.fspath(uri), bucket, key, _backend(cfg), block_size, cache_blocks)


class _RangeReader(io.RawIOBase):
    """One S3 object as a seekable raw stream of cached, block-aligned ranged GETs."""

    def __init__(self, uri: str, bucket: str, key: str, backend: _Backend, block_size: int, cache_blocks: int):
        super().__init__()
        head = _s3_call("read", uri, backend, lambda: backend.client.head_object(Bucket=bucket, Key=key))
        self.name, self.size, self.etag = uri, int(head["ContentLength"]), head.get("ETag")
        self.requests = 0  # ranged GETs made so far
        self._request = {"Bucket": bucket, "Key": key}
        self._backend, self._block_size, self._cache_blocks = backend, block_size, cache_blocks
        self._blocks: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise StorageError(f"cannot seek {self.name} to a negative position ({base + offset})")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self._pos < self.size:
            number, offset = divmod(self._pos, self._block_size)
            block = self._block(number)
            n = min(len(view) - done, len(block) - offset)
            view[done : done + n] = block[offset : offset + n]
            done += n
            self._pos += n
        return done

    def _block(self, number: int) -> bytes:
        if number in self._blocks:
            self._blocks.move_to_end(number)
            return self._blocks[number]
        start = number * self._block_size
        end = min(self.size, start + self._block_size)
        request = {**self._request, "Range": f"bytes={start}-{end - 1}"}
        data, response = _get_object(self._backend, self.name, request, end - start)
        self.requests += 1
        if response.get("ETag") != self.etag or len(data) != end - start:
            raise StorageError(f"cannot read {self.name}: the object changed while it was being read")
        self._blocks[number] = data
        if len(self._blocks) > self._cache_blocks:
            self._blocks.popitem(last=False)
        return data


def write_file(uri: str | os.PathLike[str], source: str | os.PathLike[str], cfg: StorageConfig | None = None) -> None:
    """Publish the local file ``source`` at ``uri`` so that readers see the old content or all of the new, never a
    partial file (as :func:`write_bytes`, for files too large to hold in memory).

    Local: copied into a temporary file in the destination's folder, flushed to disk, renamed over the destination.
    S3: one PUT below the multipart threshold, else a multipart upload read from the file one part at a time, which
    S3 publishes only when complete (and which is aborted on failure). ``source`` is left in place.
    """
    src = local_path(source)
    size = _stat_regular(src, os.fspath(source)).st_size
    if is_s3(uri):
        bucket, key = _object(uri)
        if key.endswith("/"):
            raise StorageError(f"cannot write {uri}: the key ends with '/'")
        backend = _backend(cfg)
        with open(src, "rb") as f:
            if size < MULTIPART_THRESHOLD:
                data = f.read()
                _s3_call("write", uri, backend, lambda: backend.client.put_object(Bucket=bucket, Key=key, Body=data))
            else:
                _multipart_upload(backend, uri, bucket, key, iter(lambda: f.read(MULTIPART_CHUNK), b""))
        return
    with open(src, "rb") as f:
        _publish_local(uri, lambda out: shutil.copyfileobj(f, out, READ_CHUNK))
