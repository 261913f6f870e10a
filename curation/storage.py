"""Every file the project reads or writes goes through here: local paths and `s3://` URIs alike.

One module builds filesystems so that credentials, endpoints, timeouts and retries are decided in
one place, and local runs, S3 runs and tests share one code path. A URI is a local path
(relative, absolute or `file://`) or `s3://bucket/key`; `storage_options` holds the S3 settings
(endpoint, credentials) and is ignored for local paths, so one options dict can serve a run whose
input is local and output is on S3. s3fs and pyarrow are imported inside the functions that need them.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import fsspec
    import pyarrow.fs

LOCAL_SCHEMES = ("", "file")
S3_SCHEMES = ("s3", "s3a")
SUPPORTED_SCHEMES = ("local path", "file://", "s3://")
S3_OPTIONS = ("endpoint_url", "key", "secret", "token", "anon", "client_kwargs", "config_kwargs",
              "use_ssl", "requester_pays", "s3_additional_kwargs", "default_block_size",
              "use_listings_cache")
# Bounded retries: an unreachable endpoint fails in seconds instead of retrying for minutes.
DEFAULT_S3_CONFIG = {"connect_timeout": 5, "read_timeout": 30, "retries": {"max_attempts": 2}}
PROBE_TIMEOUT_S = 15.0
REDACTED = "***"
_SECRET_WORDS = ("secret", "token", "password", "key", "credential")
_NOT_SECRET = ("endpoint_url",)


def cache_home() -> Path:
    """Root of this machine's local caches (text embeddings, fitted detectors, generated model
    configs): `$CURATION_CACHE`, else ~/.cache/curation."""
    return Path(os.environ.get("CURATION_CACHE") or Path.home() / ".cache" / "curation")


class StorageUnreachableError(RuntimeError):
    """The storage endpoint of a URI does not answer (wrong endpoint, network down, server stopped)."""


def _scheme(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else ""


def _strip_scheme(uri: str) -> str:
    return uri.split("://", 1)[1] if "://" in uri else uri


def _check_scheme(uri: str) -> str:
    scheme = _scheme(uri)
    if scheme not in LOCAL_SCHEMES + S3_SCHEMES:
        raise ValueError(f"unsupported storage URI {uri!r}: scheme {scheme!r} is not one of {SUPPORTED_SCHEMES}")
    return scheme


def is_local(uri: str) -> bool:
    """True for plain paths and `file://` URIs."""
    return _check_scheme(uri) in LOCAL_SCHEMES


def _local_path(uri: str) -> str:
    return os.path.abspath(os.path.expanduser(_strip_scheme(uri)))


def _s3_kwargs(storage_options: dict | None) -> dict:
    """s3fs constructor arguments: the user's options, environment endpoint, bounded retries.

    Unknown keys are errors (a typo such as `endpoint` must not silently fall back to AWS).
    Listing caches are off by default: Ray workers write files that this process lists later.
    """
    options = dict(storage_options or {})
    unknown = sorted(set(options) - set(S3_OPTIONS))
    if unknown:
        raise ValueError(f"unknown storage_options {unknown}; valid keys: {list(S3_OPTIONS)}")
    env_endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not options.get("endpoint_url") and env_endpoint:
        options["endpoint_url"] = env_endpoint
    options.setdefault("config_kwargs", copy.deepcopy(DEFAULT_S3_CONFIG))
    options.setdefault("use_listings_cache", False)
    return options


def filesystem(uri: str, storage_options: dict | None = None) -> tuple["fsspec.AbstractFileSystem", str]:
    """The fsspec filesystem for `uri` and the path inside it (local: absolute; s3: `bucket/key`)."""
    if is_local(uri):
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem(), _local_path(uri)
    import s3fs

    return s3fs.S3FileSystem(**_s3_kwargs(storage_options)), _strip_scheme(uri).rstrip("/")


def _endpoint(storage_options: dict | None) -> str:
    return _s3_kwargs(storage_options).get("endpoint_url") or "AWS default endpoint"


def _scrub(text: str, storage_options: dict | None) -> str:
    """Remove any credential value that a library error message might echo."""
    for name in ("key", "secret", "token"):
        value = (storage_options or {}).get(name)
        if isinstance(value, str) and value:
            text = text.replace(value, REDACTED)
    return text


def check_reachable(uri: str, storage_options: dict | None = None) -> None:
    """Fail at job start, not per file, when the bucket of `uri` cannot be reached.

    Raises StorageUnreachableError (endpoint does not answer within PROBE_TIMEOUT_S),
    FileNotFoundError (no such bucket) or PermissionError (credentials rejected); messages name
    the URI and endpoint, never credentials. Local URIs always pass.
    """
    if is_local(uri):
        return
    import botocore.exceptions
    from fsspec.exceptions import FSTimeoutError

    fs, path = filesystem(uri, storage_options)
    bucket, where = path.split("/", 1)[0], f"{uri!r} at {_endpoint(storage_options)}"
    try:
        fs.call_s3("head_bucket", Bucket=bucket, timeout=PROBE_TIMEOUT_S)
    except FileNotFoundError:
        raise FileNotFoundError(f"bucket {bucket!r} not found for {where}: check the bucket name and that "
                                "the endpoint is an S3 service") from None
    except PermissionError as e:
        raise PermissionError(f"access denied to bucket {bucket!r} for {where}: "
                              f"{_scrub(str(e), storage_options)}") from None
    except botocore.exceptions.NoCredentialsError:
        raise PermissionError(f"no S3 credentials for {where}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                              "storage_options key/secret, or anon: true") from None
    except (botocore.exceptions.BotoCoreError, FSTimeoutError, OSError) as e:
        raise StorageUnreachableError(f"cannot reach storage for {where}: {type(e).__name__}: "
                                      f"{_scrub(str(e), storage_options)}") from None


def join(uri: str, *parts: str) -> str:
    """`uri` with `parts` appended by `/`; local results are absolute paths, s3 keep `s3://`.

    A trailing empty part gives a trailing slash (a prefix to strip from listed files). Parts come
    from data (file names, ids), so `..` segments are refused: nothing may escape its folder.
    """
    base = _local_path(uri) if is_local(uri) else uri
    pieces = [str(part).strip("/") for part in parts]
    if any(".." in piece.split("/") for piece in pieces):
        raise ValueError(f"refusing to join {parts!r} onto {uri!r}: '..' segments are not allowed")
    body = "/".join(piece for piece in pieces if piece)
    trailing = bool(parts) and (str(parts[-1]) == "" or str(parts[-1]).endswith("/"))
    return base.rstrip("/") + ("/" + body if body else "") + ("/" if trailing else "")


def _as_uri(uri: str, path: str) -> str:
    return path if is_local(uri) else f"{_scheme(uri)}://{path}"


def list_files(uri: str, storage_options: dict | None = None,
               extensions: tuple[str, ...] | None = None) -> list[str]:
    """All files under `uri` (recursive), sorted, as full URIs (local: absolute paths).

    `extensions` such as (".jpg", ".png") keep only files whose lowercase suffix matches.
    A missing folder lists as empty.
    """
    fs, path = filesystem(uri, storage_options)
    wanted = tuple(ext.lower() for ext in extensions) if extensions else None
    found = fs.find(path, withdirs=False)
    files = (f for f in found if wanted is None or f.lower().endswith(wanted))
    return sorted(_as_uri(uri, f) for f in files)


def read_bytes(uri: str, storage_options: dict | None = None) -> bytes:
    """The whole content of one file."""
    fs, path = filesystem(uri, storage_options)
    return fs.cat_file(path)


def _write_local_atomic(path: str, data: bytes) -> None:
    """Temp file in the same folder + rename: readers never see a half-written file."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_bytes(uri: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write one file whole, creating local parent folders; an S3 PUT is atomic by itself."""
    if is_local(uri):
        _write_local_atomic(_local_path(uri), bytes(data))
        return
    fs, path = filesystem(uri, storage_options)
    fs.pipe_file(path, bytes(data))


def exists(uri: str, storage_options: dict | None = None) -> bool:
    """Whether a file or folder (prefix) exists."""
    fs, path = filesystem(uri, storage_options)
    return fs.exists(path)


def remove(uri: str, storage_options: dict | None = None, missing_ok: bool = True) -> None:
    """Delete one file; a missing file is fine unless `missing_ok` is False."""
    fs, path = filesystem(uri, storage_options)
    if not fs.exists(path):
        if missing_ok:
            return
        raise FileNotFoundError(f"cannot remove {uri!r}: no such file")
    fs.rm_file(path)


def _is_secret(name: str) -> bool:
    lowered = name.lower()
    return lowered not in _NOT_SECRET and any(word in lowered for word in _SECRET_WORDS)


def redact(options: dict | None) -> dict:
    """A copy of `options` safe to log or record: credential-like values become "***".

    Nested dicts (client_kwargs, config_kwargs) are redacted too.
    """
    redacted = {}
    for name, value in (options or {}).items():
        if isinstance(value, dict):
            redacted[name] = redact(value)
        elif _is_secret(str(name)) and value is not None:
            redacted[name] = REDACTED
        else:
            redacted[name] = value
    return redacted


def pyarrow_filesystem(uri: str, storage_options: dict | None = None) -> tuple["pyarrow.fs.FileSystem", str]:
    """A pyarrow filesystem (for pyarrow.parquet and Ray Data) and the path inside it.

    Local paths use pyarrow's native filesystem; S3 wraps the same s3fs object that `filesystem`
    builds, so both APIs see one set of credentials, endpoint and retries.
    """
    import pyarrow.fs

    fs, path = filesystem(uri, storage_options)
    if is_local(uri):
        return pyarrow.fs.LocalFileSystem(), path
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path
