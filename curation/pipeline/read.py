"""Read one partition into decoded items: image files, parquet rows with image bytes, or
WebDataset tar shards. Per-item problems become failed items with a reason, never exceptions.

The same readers serve the writers (kept/removed keep the input's format), so an item's id means
the same thing everywhere: the relative path for image files, the id column (or `file#row`) for
parquet, the sample key for WebDataset shards.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import numpy as np

from curation import storage
from curation.pipeline.decode import DecodeError, decode_image
from curation.pipeline.plan import IMAGE_EXTENSIONS, Partition


# Kinds that say "try again later", not "this item is bad": a partition holding one is left
# unfinished (no outputs, no manifest record), so the next run reads it again.
UNAVAILABLE = "unavailable"
COMPRESSION_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
TAR_END = bytes(1024)  # two zero blocks close every complete tar archive


@dataclass
class RawItem:
    """One input image before decoding: its id, where it came from, and its bytes or an error.
    `whole_file` marks a row that stands for a whole parquet file or shard none (or not all) of
    whose items could be read, so summaries count files apart from images."""

    id: str
    source: str
    data: bytes | None
    error: DecodeError | None = None
    whole_file: bool = False


def fetch(uri: str, source, max_bytes: int) -> bytes | DecodeError:
    """A file of `source` (a SourceConfig: storage options, retry policy) as bytes, or why not:
    `too_large` past `max_bytes` (never holding more than max_bytes + 1), `missing` for a definite
    not-found, UNAVAILABLE when transient errors outlast the retries."""
    try:
        data = storage.retry_transient(lambda: storage.read_bytes(uri, source.storage_options, max_bytes),
                                       source.read_attempts, source.retry_backoff_s)
    except Exception as err:  # noqa: BLE001 - classified by _read_failure
        return _read_failure(err, source)
    if len(data) > max_bytes:
        return DecodeError("too_large", f"more than {max_bytes} bytes (source.max_item_bytes / max_file_bytes)")
    return data


def _read_failure(err: Exception, source) -> DecodeError:
    """A read that raised, as a value: `missing` for a definite answer, UNAVAILABLE for transient
    errors that outlasted the retries; anything else is a bug and propagates."""
    if isinstance(err, storage.DEFINITE_ERRORS):
        return DecodeError("missing", f"{type(err).__name__}: {err}")
    if not storage.is_transient(err):
        raise err
    return DecodeError(UNAVAILABLE, f"{type(err).__name__} after {source.read_attempts} attempts: {err}")


class StoreReadError(OSError):
    """A read of an open source file failed in the store (not in the data): transient, the
    partition is redone by the next run."""


class _Guarded:
    """A source file handle whose read failures say they came from the store, so a parser's own
    errors (a corrupt parquet page, a cut tar) are never mistaken for them. Parsers (pyarrow,
    tarfile) re-raise a failing read's exception as it was."""

    def __init__(self, handle: BinaryIO):
        self._handle = handle

    def read(self, *args):
        try:
            return self._handle.read(*args)
        except Exception as err:  # noqa: BLE001 - store failures re-raised as one type, others as they are
            if storage.is_transient(err) or isinstance(err, storage.DEFINITE_ERRORS):
                raise StoreReadError(f"{type(err).__name__}: {err}") from err
            raise

    def __getattr__(self, name: str):
        return getattr(self._handle, name)


@contextlib.contextmanager
def open_source(uri: str, source, max_bytes: int) -> Iterator[BinaryIO | DecodeError]:
    """A file of `source` opened for streaming (retried like `fetch`), or why not: `too_large`
    past `max_bytes` (from its size, before reading), `missing`, UNAVAILABLE. Reads that fail
    later raise StoreReadError."""
    try:
        handle, size = storage.retry_transient(lambda: storage.open_for_read(uri, source.storage_options),
                                               source.read_attempts, source.retry_backoff_s)
    except Exception as err:  # noqa: BLE001 - classified by _read_failure
        yield _read_failure(err, source)
        return
    with handle:
        if size > max_bytes:
            yield DecodeError("too_large", f"{size} bytes > {max_bytes} (source.max_file_bytes)")
        else:
            yield _Guarded(handle)


def iter_image_files(partition: Partition, source) -> Iterator[RawItem]:
    for name in partition.inputs:
        uri = storage.join(source.uri, name)
        result = fetch(uri, source, source.max_item_bytes)
        error = result if isinstance(result, DecodeError) else None
        yield RawItem(name, uri, None if error else result, error)


def read_parquet_table(uri: str, options: dict):
    """A trusted parquet file of our own (scores/, failed/): read whole, errors raise."""
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(storage.read_bytes(uri, options)))


PARQUET_BATCH_ROWS = 256  # rows per record batch when a source parquet file is streamed


def iter_source_batches(uri: str, source, columns: list[str] | None = None):
    """A source parquet file as (schema names, record batches of PARQUET_BATCH_ROWS rows) streamed
    from storage (one row group decompressed at a time, only `columns`), or a DecodeError for the
    whole file (too large, missing, unavailable, not parquet: a partly uploaded file has no
    footer). A failure part way raises: StoreReadError from the store, else the parser's error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open_source(uri, source, source.max_file_bytes) as handle:
        if isinstance(handle, DecodeError):
            yield handle
            return
        try:
            parquet = pq.ParquetFile(handle, pre_buffer=False)  # pre-buffering would fetch every row group at once
        except StoreReadError as err:
            yield DecodeError(UNAVAILABLE, str(err))
            return
        except (pa.ArrowException, ValueError, OSError) as err:
            yield DecodeError("corrupt", f"not a readable parquet file: {type(err).__name__}: {err}")
            return
        names = parquet.schema_arrow.names
        wanted = None if columns is None else [c for c in columns if c in names] or None
        yield names
        yield from parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted)


def _cell_bytes(value) -> bytes | None:
    """Image cell as bytes: binary, or a {"bytes": ...} struct as Hugging Face datasets store it."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return bytes(value) if value is not None else None


def parquet_ids(table, name: str, id_column: str, first_row: int = 0) -> list[str]:
    """The id column's values, or `file#row` (rows counted from the file's start)."""
    if id_column in table.schema.names:
        return [str(v) for v in table.column(id_column).to_pylist()]
    return [f"{name}#{row}" for row in range(first_row, first_row + table.num_rows)]


def _cell_error(data: bytes | None, source) -> DecodeError | None:
    if data is None:
        return DecodeError("empty", "image cell is null")
    if len(data) > source.max_item_bytes:
        return DecodeError("too_large", f"{len(data)} bytes > source.max_item_bytes {source.max_item_bytes}")
    return None


def iter_parquet(partition: Partition, source) -> Iterator[RawItem]:
    """A parquet file's rows, streamed a record batch at a time (never the whole file)."""
    import pyarrow as pa

    (name,) = partition.inputs
    uri = storage.join(source.uri, name)
    stream = iter_source_batches(uri, source, [source.id_column, source.image_column])
    header = next(stream)
    if isinstance(header, DecodeError):
        yield RawItem(name, uri, None, header, whole_file=True)
        return
    missing_column = None if source.image_column in header else DecodeError(
        "no_image_column", f"source.image_column {source.image_column!r} is not a column of {uri}; columns: {header}")
    row = 0
    try:
        for batch in stream:
            ids = parquet_ids(batch, name, source.id_column, first_row=row)
            cells = (batch.column(source.image_column).to_pylist() if missing_column is None
                     else [None] * batch.num_rows)
            for item_id, cell in zip(ids, cells):
                data = None if missing_column else _cell_bytes(cell)
                error = missing_column or _cell_error(data, source)
                yield RawItem(item_id, f"{uri}#{row}", None if error else data, error)
                row += 1
    except StoreReadError as err:
        yield RawItem(name, uri, None, DecodeError(UNAVAILABLE, str(err)), whole_file=True)
    except (pa.ArrowException, ValueError, OSError) as err:
        yield RawItem(name, uri, None, DecodeError("truncated" if row else "corrupt",
                                                   f"parquet read failed after {row} rows: {type(err).__name__}: {err}"),
                      whole_file=True)


def sample_key(member_name: str) -> tuple[str, str]:
    """WebDataset convention: `dir/key.ext1.ext2` -> ("dir/key", ".ext1.ext2")."""
    directory, _, base = member_name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), dot + ext


@dataclass
class ShardEntry:
    """One sample of a shard (`members`: extension -> bytes), or why it cannot be used.
    Entries with `whole_file` stand for the shard itself (unreadable, truncated, too many members)."""

    key: str
    members: dict[str, bytes]
    error: DecodeError | None = None
    whole_file: bool = False
    where: str = ""


def _compression(data: bytes) -> str | None:
    return next((name for magic, name in COMPRESSION_MAGIC.items() if data.startswith(magic)), None)


def _member_kind(member) -> str:
    return "symlink" if member.issym() else "hard link" if member.islnk() else "special file"


def _read_member(tar, member, entry: ShardEntry, source) -> None:
    """Read one tar member into its sample, or fail the sample, without reading more than
    `source.max_item_bytes` of it."""
    import tarfile

    _, ext = sample_key(member.name)
    if not member.isfile():
        entry.error = DecodeError("special_member", f"member {member.name!r} is a {_member_kind(member)}; "
                                                    "only regular files are read")
    elif member.size > source.max_item_bytes:
        entry.error = DecodeError("too_large", f"member {member.name!r} has {member.size} bytes > "
                                               f"source.max_item_bytes {source.max_item_bytes}")
    else:
        try:  # an OSError is the store failing, not the data: it propagates (see iter_source_shard)
            entry.members[ext] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError) as err:
            entry.error = DecodeError("truncated", f"member {member.name!r}: {type(err).__name__}: {err}")


def _whole(kind: str, message: str) -> ShardEntry:
    return ShardEntry("", {}, DecodeError(kind, message), whole_file=True)


def iter_shard(handle: BinaryIO, source) -> Iterator[ShardEntry]:
    """A shard's samples in shard order, read from a seekable handle one sample at a time (a
    worker holds one sample's members, never the shard), then recorded problems.

    Plain (uncompressed) tar only: a compressed shard is refused as `unsupported` instead of being
    inflated (a 200 KB gzip can hold 200 MB). Only regular-file members are read; each is
    size-checked from its header first. A sample's members are contiguous (the WebDataset
    convention): a member whose sample already ended, or a second member with the same
    extension, is a `duplicate_member` row and is not used. A shard cut short keeps the samples
    read before the cut and ends with a whole-file `truncated` entry.
    """
    import tarfile

    head = handle.read(len(TAR_END))
    handle.seek(0)
    if compression := _compression(head):
        yield _whole("unsupported", f"{compression}-compressed shard: compressed WebDataset shards are not "
                                    "supported; decompress to a plain .tar")
        return
    if head == TAR_END:
        return  # an empty archive: only the end-of-archive marker
    ended: set[str] = set()
    current: ShardEntry | None = None
    duplicates: list[ShardEntry] = []
    yielded = 0
    try:
        with tarfile.open(fileobj=handle, mode="r:") as tar:
            for count, member in enumerate(tar):
                if count >= source.max_members:
                    duplicates.append(_whole("too_large", f"more than source.max_members {source.max_members} "
                                                          "members; the rest was not read"))
                    break
                if member.isdir():
                    continue
                key, ext = sample_key(member.name)
                if current is not None and key != current.key:
                    ended.add(current.key)
                    yield current
                    yielded += 1
                    current = None
                if key in ended or (current is not None and ext in current.members):
                    duplicates.append(ShardEntry(f"{key}#duplicate{sum(not d.whole_file for d in duplicates) + 1}", {},
                                                 DecodeError("duplicate_member", f"member {member.name!r} appears "
                                                             f"again at byte {member.offset}; the first is used"),
                                                 where=f"{member.name}@{member.offset}"))
                    continue
                current = current or ShardEntry(key, {}, where=member.name)
                if current.error is None:
                    _read_member(tar, member, current, source)
            if current is not None:
                yield current
                yielded += 1
                current = None
            if not duplicates or not duplicates[-1].whole_file:
                handle.seek(tar.offset)
                if handle.read(len(TAR_END)) != TAR_END:
                    duplicates.append(_whole("truncated", f"shard ends at byte {tar.offset} without the "
                                                          f"end-of-archive marker after {yielded} samples; later "
                                                          "samples may be lost (partly uploaded?)"))
    except (tarfile.TarError, EOFError) as err:
        if current is not None:
            yield current
            yielded += 1
        duplicates.append(_whole("corrupt" if not yielded else "truncated",
                                 f"not a readable tar: {type(err).__name__}: {err}"))
    yield from duplicates


def image_member(sample: dict[str, bytes]) -> bytes | None:
    for ext, data in sample.items():
        if ext.lower().rsplit(".", 1)[-1] in {e.lstrip(".") for e in IMAGE_EXTENSIONS}:
            return data
    return None


def iter_source_shard(uri: str, source) -> Iterator[ShardEntry]:
    """A source shard's samples, streamed (see `iter_shard`); an unreadable shard is one
    whole-file entry. A transient read error part way is a whole-file UNAVAILABLE entry, which
    leaves the partition unfinished for the next run."""
    with open_source(uri, source, source.max_file_bytes) as handle:
        if isinstance(handle, DecodeError):
            yield ShardEntry("", {}, handle, whole_file=True)
            return
        try:
            yield from iter_shard(handle, source)
        except StoreReadError as err:  # the store failed under the streaming read
            yield ShardEntry("", {}, DecodeError(UNAVAILABLE, str(err)), whole_file=True)


def _shard_item(name: str, uri: str, entry: ShardEntry) -> RawItem:
    if entry.whole_file:
        return RawItem(name, uri, None, entry.error, whole_file=True)
    source = f"{uri}#{entry.key}"
    data = None if entry.error else image_member(entry.members)
    error = entry.error or (None if data is not None else
                            DecodeError("no_image", f"sample has no image member: {list(entry.members)}"))
    return RawItem(entry.key, source, data, error)


def iter_webdataset(partition: Partition, source) -> Iterator[RawItem]:
    (name,) = partition.inputs
    uri = storage.join(source.uri, name)
    for entry in iter_source_shard(uri, source):
        yield _shard_item(name, uri, entry)


def iter_raw_items(partition: Partition, source) -> Iterator[RawItem]:
    """The raw items of one partition of `source` (a SourceConfig: root, options, columns, limits)."""
    if partition.format == "images":
        return iter_image_files(partition, source)
    if partition.format == "parquet":
        return iter_parquet(partition, source)
    return iter_webdataset(partition, source)


DECODE_BLOCK_ITEMS = 256  # pixels of this many items per block: 256 x 224 x 224 x 3 bytes = 38 MB


UNKNOWN_TOTAL = -1  # `n_items` of every block but a partition's last: the reader has not reached its end


def decode_partition(partition: Partition, source, image_size: int,
                     block_items: int = DECODE_BLOCK_ITEMS) -> Iterator[dict[str, np.ndarray]]:
    """Read a partition as a stream and decode it into column blocks of at most `block_items`
    items; failed items get zero pixels and a reason. A decode task holds one block of encoded
    items and its pixels, never a whole shard (10k images at 224 px would be 1.5 GB of pixels, and
    the shard's bytes besides). The rows of the last block carry `n_items`, the partition's total,
    earlier ones UNKNOWN_TOTAL, so the driver knows when all blocks arrived; an empty partition
    yields one empty block."""
    block: list[RawItem] = []
    start = 0
    for item in iter_raw_items(partition, source):
        if len(block) == block_items:
            yield _decode_block(partition.id, block, start, UNKNOWN_TOTAL, source, image_size)
            start, block = start + len(block), []
        block.append(item)
    yield _decode_block(partition.id, block, start, start + len(block), source, image_size)


def _decode_block(partition_id: str, block: list[RawItem], start: int, n_items: int, source,
                  image_size: int) -> dict[str, np.ndarray]:
    pixels = np.zeros((len(block), image_size, image_size, 3), np.uint8)
    kinds, messages = [], []
    for i, item in enumerate(block):
        result = item.error or decode_image(item.data, image_size, source.max_pixels, source.jpeg_draft)
        if isinstance(result, DecodeError):
            kinds.append(result.kind)
            messages.append(result.message)
        else:
            pixels[i] = result
            kinds.append("")
            messages.append("")
    return {
        "partition": np.array([partition_id] * len(block), dtype=object),
        "n_items": np.full(len(block), n_items, np.int64),
        "position": np.arange(start, start + len(block), dtype=np.int64),
        "id": np.array([item.id for item in block], dtype=object),
        "source": np.array([item.source for item in block], dtype=object),
        "error_kind": np.array(kinds, dtype=object),
        "error_message": np.array(messages, dtype=object),
        "whole_file": np.array([item.whole_file for item in block], dtype=bool),
        "pixels": pixels,
    }
