"""Hostile parquet files and WebDataset shards, as crawls and careless uploads produce them (a
helper module: no tests here). Each writer returns what the curate job must make of the file:
`{"items": images a run must account for, "failed_files": whole-file failure rows}`.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg_bytes(seed: int, size: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def tar_bytes(members: list[tuple[str, bytes]], extra: list[tarfile.TarInfo] = ()) -> bytes:
    sink = io.BytesIO()
    with tarfile.open(fileobj=sink, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return sink.getvalue()


def samples(n: int, seed: int, prefix: str = "s") -> list[tuple[str, bytes]]:
    members = []
    for i in range(n):
        members += [(f"{prefix}{i:04d}.jpg", jpeg_bytes(seed * 1000 + i)),
                    (f"{prefix}{i:04d}.json", json.dumps({"i": i}).encode())]
    return members


def parquet_bytes(n: int, seed: int, image_column: str = "image") -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": [f"p{seed}-{i}" for i in range(n)], image_column: [jpeg_bytes(seed * 1000 + i) for i in range(n)]})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def write_good_shard(path: Path, n: int, seed: int) -> dict:
    path.write_bytes(tar_bytes(samples(n, seed)))
    return {"items": n, "failed_files": 0}


def write_truncated_shard(path: Path, n: int, seed: int) -> dict:
    """Cut inside the last sample's image: the samples before it survive; the cut one and the
    missing end-of-archive marker are recorded."""
    data = tar_bytes(samples(n, seed))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        last_image = [m for m in tar.getmembers() if m.name.endswith(".jpg")][-1]
    path.write_bytes(data[: last_image.offset_data + last_image.size // 2])
    return {"items": n, "failed_files": 1}


def write_gzip_bomb_shard(path: Path, megabytes: int = 50) -> dict:
    """A small gzip file named .tar that would inflate to `megabytes` of tar."""
    path.write_bytes(gzip.compress(tar_bytes([("bomb.jpg", bytes(megabytes * 2**20))]), compresslevel=9))
    return {"items": 0, "failed_files": 1}


def write_duplicate_shard(path: Path, n: int, seed: int) -> dict:
    """Every sample once, then the first sample's image again under the same name."""
    members = samples(n, seed)
    path.write_bytes(tar_bytes(members + [(members[0][0], jpeg_bytes(seed * 1000 + 999))]))
    return {"items": n + 1, "failed_files": 0}


def write_link_shard(path: Path, n: int, seed: int) -> dict:
    """A symlink member to /dev/zero and a FIFO member, each its own sample, besides good samples."""
    link = tarfile.TarInfo("zero.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "/dev/zero"
    fifo = tarfile.TarInfo("pipe.jpg")
    fifo.type = tarfile.FIFOTYPE
    path.write_bytes(tar_bytes(samples(n, seed), extra=[link, fifo]))
    return {"items": n + 2, "failed_files": 0}


def write_good_parquet(path: Path, n: int, seed: int) -> dict:
    path.write_bytes(parquet_bytes(n, seed))
    return {"items": n, "failed_files": 0}


def write_corrupt_parquet(path: Path, n: int, seed: int) -> dict:
    """A partly uploaded parquet file: its footer is missing, so pyarrow raises ArrowInvalid."""
    path.write_bytes(parquet_bytes(n, seed)[:-100])
    return {"items": 0, "failed_files": 1}


def write_wrong_column_parquet(path: Path, n: int, seed: int) -> dict:
    """Readable, but the images are in `jpg`, not the configured `image` column."""
    path.write_bytes(parquet_bytes(n, seed, image_column="jpg"))
    return {"items": n, "failed_files": 0}
