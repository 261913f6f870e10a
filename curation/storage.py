"""Every file the project reads or writes goes through here: local paths and `s3://` URIs alike.

One module builds filesystems so that credentials, endpoints, timeouts and retries are decided in
one place, and local runs, S3 runs and tests share one code path. A URI is a local path
(relative, absolute or `file://`) or `s3://bucket/key`; `storage_options` holds the S3 settings
(endpoint, credentials) and is ignored for local paths, so one options dict can serve a run whose
input is local and output is on S3. s3fs and pyarrow are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterator

from curation.secrets import redact_text, secret_values

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
        raise ValueError(f"unsupported storage URI {redact_text(uri)!r}: scheme {scheme!r} is not one of "
                         f"{SUPPORTED_SCHEMES}")
    if scheme in S3_SCHEMES and "@" in _strip_scheme(uri).split("/", 1)[0]:  # no bucket name holds '@'
        raise ValueError(f"storage URI {redact_text(uri)!r} holds credentials: put them in storage_options "
                         "(key/secret) or the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
    return scheme


def is_local(uri: str) -> bool:
    """True for plain paths and `file://` URIs."""
    return _check_scheme(uri) in LOCAL_SCHEMES


def is_relative(uri: str) -> bool:
    """A local path that depends on the current directory (`./out`, `demo/data`, `file://out`)."""
    return is_local(uri) and not os.path.isabs(os.path.expanduser(_strip_scheme(uri)))


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
    bucket = path.split("/", 1)[0]
    where = redact_text(f"{uri!r} at {_endpoint(storage_options)}")
    try:
        fs.call_s3("head_bucket", Bucket=bucket, timeout=PROBE_TIMEOUT_S)
    except FileNotFoundError:
        raise FileNotFoundError(f"bucket {bucket!r} not found for {where}: check the bucket name and that "
                                "the endpoint is an S3 service") from None
    except PermissionError as e:
        raise PermissionError(f"access denied to bucket {bucket!r} for {where}: "
                              f"{redact_text(str(e), secret_values(storage_options))}") from None
    except botocore.exceptions.NoCredentialsError:
        raise PermissionError(f"no S3 credentials for {where}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                              "storage_options key/secret, or anon: true") from None
    except (botocore.exceptions.BotoCoreError, FSTimeoutError, OSError) as e:
        raise StorageUnreachableError(f"cannot reach storage for {where}: {type(e).__name__}: "
                                      f"{redact_text(str(e), secret_values(storage_options))}") from None


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


def list_dir(uri: str, storage_options: dict | None = None) -> tuple[list[str], list[str], dict[str, int]]:
    """One level of a folder: file names, subfolder names (both relative to `uri`, sorted) and
    what was passed over, counted by reason: `link` and `special_file` (FIFOs, devices, sockets;
    local only). Links are never followed: a symlink to /dev/zero or to a folder above (a loop)
    must not be read or walked. A missing folder lists as empty.

    S3 has no folders: a subfolder is a common key prefix, so keys such as `a//b.jpg` or
    `a/./b.jpg` show up as subfolders named "" or "."; they are returned as they are, for the
    caller to refuse (walking them would list `a/` again)."""
    import stat
    from collections import Counter

    files, folders, skipped = [], [], Counter()
    if is_local(uri):
        path = _local_path(uri)
        if not os.path.isdir(path):  # the root itself may be a link (a linked dataset folder)
            return [], [], {}
        with os.scandir(path) as entries:
            for entry in entries:
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISLNK(mode):
                    skipped["link"] += 1
                elif stat.S_ISDIR(mode):
                    folders.append(entry.name)
                elif stat.S_ISREG(mode):
                    files.append(entry.name)
                else:
                    skipped["special_file"] += 1
    else:
        fs, path = filesystem(uri, storage_options)
        prefix = path.rstrip("/") + "/"
        try:
            entries = fs.ls(prefix, detail=True, refresh=True)
        except FileNotFoundError:
            entries = []
        for entry in entries:  # a file key answers a listing with itself: not a child of the prefix
            if entry["name"].startswith(prefix):
                (folders if entry["type"] == "directory" else files).append(entry["name"][len(prefix):])
    return sorted(files), sorted(folders), dict(skipped)


def open_for_read(uri: str, storage_options: dict | None = None) -> tuple[BinaryIO, int]:
    """A seekable binary handle on `uri` and the file's size. Readers stream through it (tar
    members, one at a time) instead of holding a whole file; S3 reads go through s3fs's
    read-ahead buffer, so a sequential pass costs few requests."""
    if is_local(uri):
        handle = open(_local_path(uri), "rb")
        return handle, os.fstat(handle.fileno()).st_size
    fs, path = filesystem(uri, storage_options)
    handle = fs.open(path, "rb")
    return handle, handle.size


def read_bytes(uri: str, storage_options: dict | None = None, max_bytes: int | None = None) -> bytes:
    """The whole content of one file; with `max_bytes`, at most max_bytes + 1 bytes (one ranged
    request), so a caller sees an oversized file without ever holding all of it."""
    import errno

    fs, path = filesystem(uri, storage_options)
    if max_bytes is None:
        return fs.cat_file(path)
    try:
        return fs.cat_file(path, start=0, end=max_bytes + 1)
    except OSError as err:  # S3 answers a range request on an empty object with 416 InvalidRange
        if err.errno == errno.EINVAL and not is_local(uri) and fs.size(path) == 0:
            return b""
        raise


# Answers that will not change if asked again; anything else (throttling, timeouts, resets,
# access denied while credentials rotate) is worth another attempt.
DEFINITE_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


def is_transient(err: BaseException) -> bool:
    """Whether a failed read may succeed later: every OSError (s3fs turns S3 `SlowDown` into
    one) and timeout, except the definite answers in DEFINITE_ERRORS."""
    from fsspec.exceptions import FSTimeoutError

    return isinstance(err, (OSError, TimeoutError, FSTimeoutError)) and not isinstance(err, DEFINITE_ERRORS)


def retry_transient(call, attempts: int = 5, backoff_s: float = 0.5):
    """`call()` with up to `attempts` tries, sleeping backoff_s * 2**i (capped at 30 s) between
    tries that failed transiently. Definite errors and the last transient one propagate."""
    import time

    for attempt in range(attempts):
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - classified below, re-raised unless transient
            if not is_transient(err) or attempt == attempts - 1:
                raise
            time.sleep(min(backoff_s * 2 ** attempt, 30.0))
    raise ValueError(f"attempts must be positive, got {attempts}")


def is_within(inner: str, outer: str) -> bool:
    """Whether `inner` is `outer` or lies below it (same scheme and bucket; local paths resolved)."""
    if is_local(inner) != is_local(outer):
        return False
    if is_local(inner):
        a, b = os.path.realpath(_local_path(inner)), os.path.realpath(_local_path(outer))
    else:
        a, b = _strip_scheme(inner).rstrip("/"), _strip_scheme(outer).rstrip("/")
    return a == b or a.startswith(b.rstrip("/") + "/")


@contextlib.contextmanager
def _local_atomic(path: str) -> Iterator[BinaryIO]:
    """Temp file in the same folder + rename: readers never see a half-written file."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_local_atomic(path: str, data: bytes) -> None:
    with _local_atomic(path) as handle:
        handle.write(data)


@contextlib.contextmanager
def open_for_write(uri: str, storage_options: dict | None = None) -> Iterator[BinaryIO]:
    """A binary handle whose content appears at `uri` only when the block completes without error:
    a temp file renamed into place locally, an S3 multipart upload completed at close (aborted on
    error). Writers stream through it instead of building a whole file in memory."""
    if is_local(uri):
        with _local_atomic(_local_path(uri)) as handle:
            yield handle
        return
    fs, path = filesystem(uri, storage_options)
    handle = fs.open(path, "wb")
    try:
        yield handle
    except BaseException:
        handle.discard()  # aborts the multipart upload: nothing appears at `uri`
        handle.closed = True  # or fsspec's __del__ would try to complete the discarded upload
        raise
    handle.close()


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


def _local_version(data: bytes) -> str:
    """A local file's version for compare-and-swap: its content hash (S3 uses the ETag)."""
    import hashlib

    return hashlib.sha256(data).hexdigest()


def read_versioned(uri: str, storage_options: dict | None = None) -> tuple[bytes | None, str | None]:
    """A small file's bytes and version (S3: its ETag; local: `_local_version`), or
    (None, None) when it does not exist. The version is what `compare_and_swap` checks."""
    fs, path = filesystem(uri, storage_options)
    try:
        if is_local(uri):
            data = fs.cat_file(path)
            return data, _local_version(data)
        etag = fs.info(path)["ETag"]
        return fs.cat_file(path), etag
    except FileNotFoundError:
        return None, None


def compare_and_swap(uri: str, data: bytes, expected: str | None,
                     storage_options: dict | None = None) -> str | None:
    """Write `uri` only if its version is still `expected` (None: only if it does not exist).
    Returns the new version, or None when another writer got there first.

    S3 uses conditional PUTs (If-None-Match / If-Match), atomic on the server; local disk holds an
    exclusive flock on a `.lock` file beside it while checking and replacing.
    """
    if is_local(uri):
        import fcntl

        path = _local_path(uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = _local_version(Path(path).read_bytes()) if os.path.exists(path) else None
            if current != expected:
                return None
            _write_local_atomic(path, data)
            return _local_version(data)
    import errno

    fs, path = filesystem(uri, storage_options)
    condition = {"mode": "create"} if expected is None else {"IfMatch": expected}
    try:
        return fs.pipe_file(path, bytes(data), **condition)["ETag"]
    except (FileExistsError, FileNotFoundError):
        return None
    except OSError as err:
        if err.errno == errno.EINVAL:  # 412 Precondition Failed on If-Match
            return None
        raise


def remove_many(uris: list[str], storage_options: dict | None = None) -> None:
    """Delete many files of one store in bulk (S3: DeleteObjects, 1000 keys a request)."""
    if not uris:
        return
    fs, _ = filesystem(uris[0], storage_options)
    fs.rm([filesystem(uri, storage_options)[1] for uri in uris])


def read_many(uris: list[str], storage_options: dict | None = None) -> dict[str, bytes]:
    """The contents of many files of one store, fetched concurrently (fsspec `cat` on a list:
    s3fs runs the GETs in parallel batches), keyed by the given URIs."""
    if not uris:
        return {}
    fs, _ = filesystem(uris[0], storage_options)
    paths = {filesystem(uri, storage_options)[1]: uri for uri in uris}
    if any(char in path for path in paths for char in "*?["):  # `cat` would expand them as globs
        return {uri: fs.cat_file(path) for path, uri in paths.items()}
    contents = fs.cat(list(paths), on_error="raise")
    return {paths[path]: data for path, data in contents.items()}


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


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a local file, read in chunks (weights files are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
