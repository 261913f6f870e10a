"""Read one partition into decoded items: image files, parquet rows with image bytes, or
WebDataset tar shards. Per-item problems become failed items with a reason, never exceptions.

The same readers serve the writers (kept/removed keep the input's format), so an item's id means
the same thing everywhere: the relative path for image files, the id column (or `file#row`) for
parquet, the sample key for WebDataset shards.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from curation import storage
from curation.pipeline.decode import DecodeError, decode_image
from curation.pipeline.plan import IMAGE_EXTENSIONS, Partition


@dataclass
class RawItem:
    """One input image before decoding: its id, where it came from, and its bytes or an error."""

    id: str
    source: str
    data: bytes | None
    error: DecodeError | None = None


def _missing(item_id: str, source: str, err: Exception) -> RawItem:
    return RawItem(item_id, source, None, DecodeError("missing", f"{type(err).__name__}: {err}"))


def iter_image_files(root: str, partition: Partition, options: dict) -> Iterator[RawItem]:
    for name in partition.inputs:
        uri = storage.join(root, name)
        try:
            yield RawItem(name, uri, storage.read_bytes(uri, options))
        except (FileNotFoundError, OSError) as err:
            yield _missing(name, uri, err)


def read_parquet_table(uri: str, options: dict):
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(storage.read_bytes(uri, options)))


def _cell_bytes(value) -> bytes | None:
    """Image cell as bytes: binary, or a {"bytes": ...} struct as Hugging Face datasets store it."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return bytes(value) if value is not None else None


def parquet_ids(table, name: str, id_column: str) -> list[str]:
    if id_column in table.column_names:
        return [str(v) for v in table.column(id_column).to_pylist()]
    return [f"{name}#{row}" for row in range(table.num_rows)]


def iter_parquet(root: str, partition: Partition, options: dict, id_column: str, image_column: str):
    (name,) = partition.inputs
    uri = storage.join(root, name)
    try:
        table = read_parquet_table(uri, options)
    except (FileNotFoundError, OSError) as err:
        yield _missing(name, uri, err)
        return
    if image_column not in table.column_names:
        raise ValueError(f"source.image_column: {uri} has no column {image_column!r}; "
                         f"columns: {table.column_names}")
    for row, (item_id, cell) in enumerate(zip(parquet_ids(table, name, id_column),
                                              table.column(image_column).to_pylist())):
        data = _cell_bytes(cell)
        error = None if data is not None else DecodeError("empty", "image cell is null")
        yield RawItem(item_id, f"{uri}#{row}", data, error)


def sample_key(member_name: str) -> tuple[str, str]:
    """WebDataset convention: `dir/key.ext1.ext2` -> ("dir/key", ".ext1.ext2")."""
    directory, _, base = member_name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), dot + ext


def read_tar_samples(data: bytes) -> dict[str, dict[str, bytes]]:
    """Shard bytes -> {key: {extension: member bytes}}, in shard order."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for member in tar:
            if member.isfile():
                key, ext = sample_key(member.name)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def image_member(sample: dict[str, bytes]) -> bytes | None:
    for ext, data in sample.items():
        if ext.lower().rsplit(".", 1)[-1] in {e.lstrip(".") for e in IMAGE_EXTENSIONS}:
            return data
    return None


def iter_webdataset(root: str, partition: Partition, options: dict) -> Iterator[RawItem]:
    (name,) = partition.inputs
    uri = storage.join(root, name)
    try:
        samples = read_tar_samples(storage.read_bytes(uri, options))
    except (FileNotFoundError, OSError, tarfile.TarError) as err:
        yield _missing(name, uri, err)
        return
    for key, sample in samples.items():
        data = image_member(sample)
        error = None if data is not None else DecodeError("no_image", f"sample has no image member: {list(sample)}")
        yield RawItem(key, f"{uri}#{key}", data, error)


def iter_raw_items(root: str, partition: Partition, options: dict, id_column: str = "id",
                   image_column: str = "image") -> Iterator[RawItem]:
    if partition.format == "images":
        return iter_image_files(root, partition, options)
    if partition.format == "parquet":
        return iter_parquet(root, partition, options, id_column, image_column)
    return iter_webdataset(root, partition, options)


def decode_partition(root: str, partition: Partition, options: dict, image_size: int, max_pixels: int,
                     id_column: str = "id", image_column: str = "image") -> dict[str, np.ndarray]:
    """Read and decode a whole partition into columns; failed items get zero pixels and a reason."""
    items = list(iter_raw_items(root, partition, options, id_column, image_column))
    pixels = np.zeros((len(items), image_size, image_size, 3), np.uint8)
    kinds, messages = [], []
    for i, item in enumerate(items):
        result = item.error or decode_image(item.data, image_size, max_pixels)
        if isinstance(result, DecodeError):
            kinds.append(result.kind)
            messages.append(result.message)
        else:
            pixels[i] = result
            kinds.append("")
            messages.append("")
    return {
        "partition": np.array([partition.id] * len(items), dtype=object),
        "n_items": np.full(len(items), len(items), np.int64),
        "position": np.arange(len(items), dtype=np.int64),
        "id": np.array([item.id for item in items], dtype=object),
        "source": np.array([item.source for item in items], dtype=object),
        "error_kind": np.array(kinds, dtype=object),
        "error_message": np.array(messages, dtype=object),
        "pixels": pixels,
    }
