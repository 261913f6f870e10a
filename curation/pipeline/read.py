"""Read one partition into decoded items: image files, parquet rows with image bytes, or
WebDataset tar shards. Per-item problems become failed items with a reason, never exceptions.

The same readers serve the writers (kept/removed keep the input's format), so an item's id means
the same thing everywhere: the relative path for image files, the id column (or `file#row`) for
parquet, the sample key for WebDataset shards.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Iterator

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
    except storage.DEFINITE_ERRORS as err:
        return DecodeError("missing", f"{type(err).__name__}: {err}")
    except Exception as err:  # noqa: BLE001 - only transient errors are turned into values
        if not storage.is_transient(err):
            raise
        return DecodeError(UNAVAILABLE, f"{type(err).__name__} after {source.read_attempts} attempts: {err}")
    if len(data) > max_bytes:
        return DecodeError("too_large", f"more than {max_bytes} bytes (source.max_item_bytes / max_file_bytes)")
    return data


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


def read_source_table(uri: str, source):
    """A source parquet file as a table, or a DecodeError for the whole file (too large, missing,
    unavailable, or not parquet: a corrupt or partly uploaded file raises ArrowInvalid)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = fetch(uri, source, source.max_file_bytes)
    if isinstance(data, DecodeError):
        return data
    try:
        return pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, ValueError, OSError) as err:
        return DecodeError("corrupt", f"not a readable parquet file: {type(err).__name__}: {err}")


def _cell_bytes(value) -> bytes | None:
    """Image cell as bytes: binary, or a {"bytes": ...} struct as Hugging Face datasets store it."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return bytes(value) if value is not None else None


def parquet_ids(table, name: str, id_column: str) -> list[str]:
    if id_column in table.column_names:
        return [str(v) for v in table.column(id_column).to_pylist()]
    return [f"{name}#{row}" for row in range(table.num_rows)]


def _cell_error(data: bytes | None, source) -> DecodeError | None:
    if data is None:
        return DecodeError("empty", "image cell is null")
    if len(data) > source.max_item_bytes:
        return DecodeError("too_large", f"{len(data)} bytes > source.max_item_bytes {source.max_item_bytes}")
    return None


def iter_parquet(partition: Partition, source) -> Iterator[RawItem]:
    (name,) = partition.inputs
    uri = storage.join(source.uri, name)
    table = read_source_table(uri, source)
    if isinstance(table, DecodeError):
        yield RawItem(name, uri, None, table, whole_file=True)
        return
    ids = parquet_ids(table, name, source.id_column)
    if source.image_column not in table.column_names:
        error = DecodeError("no_image_column", f"source.image_column {source.image_column!r} is not a column of "
                                               f"{uri}; columns: {table.column_names}")
        yield from (RawItem(item_id, f"{uri}#{row}", None, error) for row, item_id in enumerate(ids))
        return
    for row, (item_id, cell) in enumerate(zip(ids, table.column(source.image_column).to_pylist())):
        data = _cell_bytes(cell)
        error = _cell_error(data, source)
        yield RawItem(item_id, f"{uri}#{row}", None if error else data, error)


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


def _add_member(tar, member, entries: dict[str, ShardEntry], duplicates: list[ShardEntry],
                source) -> None:
    """Record one tar member into its sample, or fail the sample / record a duplicate, without
    reading more than `source.max_item_bytes` of it."""
    import tarfile

    key, ext = sample_key(member.name)
    entry = entries.setdefault(key, ShardEntry(key, {}, where=member.name))
    if entry.error is not None:
        return
    if not member.isfile():
        entry.error = DecodeError("special_member", f"member {member.name!r} is a {_member_kind(member)}; "
                                                    "only regular files are read")
    elif ext in entry.members:
        duplicates.append(ShardEntry(f"{key}#duplicate{len(duplicates) + 1}", {}, DecodeError(
            "duplicate_member", f"member {member.name!r} appears again at byte {member.offset}; the first is used"),
            where=f"{member.name}@{member.offset}"))
    elif member.size > source.max_item_bytes:
        entry.error = DecodeError("too_large", f"member {member.name!r} has {member.size} bytes > "
                                               f"source.max_item_bytes {source.max_item_bytes}")
    else:
        try:
            entry.members[ext] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError) as err:
            entry.error = DecodeError("truncated", f"member {member.name!r}: {type(err).__name__}: {err}")


def read_shard(data: bytes, source) -> list[ShardEntry]:
    """Shard bytes -> its samples in shard order, then recorded problems.

    Plain (uncompressed) tar only: a compressed shard is refused as `unsupported` instead of
    being inflated in memory (a 200 KB gzip can hold 200 MB). Only regular-file members are
    read; each is size-checked from its header first. A shard cut short keeps the samples read
    before the cut and adds a whole-file `truncated` entry.
    """
    import tarfile

    compression = _compression(data)
    if compression:
        return [ShardEntry("", {}, DecodeError("unsupported", f"{compression}-compressed shard: compressed "
                                               "WebDataset shards are not supported; decompress to a plain .tar"),
                           whole_file=True)]
    if data[:len(TAR_END)] == TAR_END:
        return []  # an empty archive: only the end-of-archive marker
    entries: dict[str, ShardEntry] = {}
    duplicates: list[ShardEntry] = []
    tail: list[ShardEntry] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for count, member in enumerate(tar):
                if count >= source.max_members:
                    tail.append(ShardEntry("", {}, DecodeError("too_large", f"more than source.max_members "
                                           f"{source.max_members} members; the rest was not read"), whole_file=True))
                    break
                if not member.isdir():
                    _add_member(tar, member, entries, duplicates, source)
            if not tail and data[tar.offset:tar.offset + len(TAR_END)] != TAR_END:
                tail.append(ShardEntry("", {}, DecodeError("truncated", f"shard ends at byte {len(data)} without "
                                       f"the end-of-archive marker after {len(entries)} samples; later samples "
                                       "may be lost (partly uploaded?)"), whole_file=True))
    except (tarfile.TarError, EOFError) as err:
        tail.append(ShardEntry("", {}, DecodeError("corrupt" if not entries else "truncated",
                                                   f"not a readable tar: {type(err).__name__}: {err}"),
                               whole_file=True))
    return list(entries.values()) + duplicates + tail


def image_member(sample: dict[str, bytes]) -> bytes | None:
    for ext, data in sample.items():
        if ext.lower().rsplit(".", 1)[-1] in {e.lstrip(".") for e in IMAGE_EXTENSIONS}:
            return data
    return None


def read_source_shard(uri: str, source) -> list[ShardEntry]:
    data = fetch(uri, source, source.max_file_bytes)
    if isinstance(data, DecodeError):
        return [ShardEntry("", {}, data, whole_file=True)]
    return read_shard(data, source)


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
    for entry in read_source_shard(uri, source):
        yield _shard_item(name, uri, entry)


def iter_raw_items(partition: Partition, source) -> Iterator[RawItem]:
    """The raw items of one partition of `source` (a SourceConfig: root, options, columns, limits)."""
    if partition.format == "images":
        return iter_image_files(partition, source)
    if partition.format == "parquet":
        return iter_parquet(partition, source)
    return iter_webdataset(partition, source)


DECODE_BLOCK_ITEMS = 256  # pixels of this many items per block: 256 x 224 x 224 x 3 bytes = 38 MB


def decode_partition(partition: Partition, source, image_size: int,
                     block_items: int = DECODE_BLOCK_ITEMS) -> Iterator[dict[str, np.ndarray]]:
    """Read a partition and decode it into column blocks of at most `block_items` items; failed
    items get zero pixels and a reason. A decode task holds the file's encoded bytes and one
    block of pixels, never a whole shard's pixels (10k images at 224 px would be 1.5 GB). Every
    row carries `n_items`, the partition's total, so the driver knows when all blocks arrived; an
    empty partition yields one empty block."""
    items = list(iter_raw_items(partition, source))
    for start in range(0, max(len(items), 1), block_items):
        yield _decode_block(partition.id, items, start, min(start + block_items, len(items)), source, image_size)


def _decode_block(partition_id: str, items: list[RawItem], start: int, stop: int, source,
                  image_size: int) -> dict[str, np.ndarray]:
    block = items[start:stop]
    pixels = np.zeros((len(block), image_size, image_size, 3), np.uint8)
    kinds, messages = [], []
    for i, item in enumerate(block):
        result = item.error or decode_image(item.data, image_size, source.max_pixels)
        if isinstance(result, DecodeError):
            kinds.append(result.kind)
            messages.append(result.message)
        else:
            pixels[i] = result
            kinds.append("")
            messages.append("")
    return {
        "partition": np.array([partition_id] * len(block), dtype=object),
        "n_items": np.full(len(block), len(items), np.int64),
        "position": np.arange(start, stop, dtype=np.int64),
        "id": np.array([item.id for item in block], dtype=object),
        "source": np.array([item.source for item in block], dtype=object),
        "error_kind": np.array(kinds, dtype=object),
        "error_message": np.array(messages, dtype=object),
        "whole_file": np.array([item.whole_file for item in block], dtype=bool),
        "pixels": pixels,
    }
