"""Encode a text corpus once per model: a content-addressed cache of text embeddings.

Text embeddings depend only on (model identity, precision, text), so every corpus is encoded once
and reused by every detector, seed and run. Corpora are split into fixed shards, each cached under
the hash of its own texts, so an interrupted encoding resumes and shards can be encoded in
parallel (the pipeline maps them over Ray tasks). The cache may live on S3 (`cache_dir:
s3://...`), shared by every node of a cluster.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np

from curation import storage
from curation.progress import Progress

DEFAULT_SHARD_SIZE = 16384


class TextEncoder(Protocol):
    """What detectors need from a model: a name for its weights and a text encoder."""

    identity: str

    def encode_text(self, texts: Sequence[str]) -> np.ndarray: ...


def default_cache_dir() -> Path:
    from curation.storage import cache_home

    return cache_home() / "text"


def shard_key(cache_tag: str, texts: Sequence[str]) -> str:
    digest = hashlib.sha256(cache_tag.encode())
    for text in texts:
        digest.update(b"\0" + text.encode())
    return digest.hexdigest()


def _save(uri: str, array: np.ndarray, storage_options: dict) -> None:
    """Atomic either way (a local temp file renamed, one S3 PUT): a reader never sees half a shard."""
    from safetensors.numpy import save

    storage.write_bytes(uri, save({"embeddings": np.ascontiguousarray(array)}), storage_options)


def _load(uri: str, storage_options: dict) -> np.ndarray | None:
    from safetensors.numpy import load

    try:
        data = storage.read_bytes(uri, storage_options)
    except FileNotFoundError:
        return None
    return load(data)["embeddings"]


class CachedTextEncoder:
    """Wraps an encoder; `encode_text` returns cached rows when this model has seen the texts.

    Without `map_shards`, missing shards are encoded here by `encoder.encode_text(shard,
    progress=...)` (a `ClipEncoder`), which counts every batch. `map_shards(encode, shards)` (e.g.
    `ray_data.ray_map_shards`) encodes them elsewhere and yields their rows in order as they
    finish; the shards then report their own batches, and this encoder counts each shard as it
    arrives."""

    def __init__(self, encoder, cache_dir: str | Path | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
                 map_shards: Callable | None = None, storage_options: dict | None = None):
        """`cache_dir`: a local folder or an s3:// URI (with `storage_options`), which every node
        of a cluster shares, so a corpus is encoded once, not once per node."""
        self.encoder = encoder
        self.identity = encoder.identity
        self.cache_dir = str(cache_dir) if cache_dir else str(default_cache_dir())
        self.storage_options = storage_options or {}
        self.shard_size = shard_size
        self.map_shards = map_shards
        self.hits = 0
        self.misses = 0

    @property
    def cache_tag(self) -> str:
        return getattr(self.encoder, "cache_tag", self.identity)

    def _path(self, texts: Sequence[str]) -> str:
        return storage.join(self.cache_dir, f"{shard_key(self.cache_tag, texts)}.safetensors")

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Rows of `texts` [n, d]: cached shards read, the others encoded and cached; progress as
        texts to encode (cached shards skipped as an extra)."""
        texts = list(texts)
        shards = [texts[i:i + self.shard_size] for i in range(0, len(texts), self.shard_size)]
        cached = [_load(self._path(shard), self.storage_options) for shard in shards]
        missing = [shard for shard, rows in zip(shards, cached) if rows is None]
        self.hits += len(shards) - len(missing)
        self.misses += len(missing)
        out = []
        with Progress("encoding texts", sum(map(len, missing)), "texts",
                      cached_shards_skipped=len(shards) - len(missing)) as own:
            encoded = self._encode_shards(missing, own)
            for shard, rows in zip(shards, cached):
                if rows is None:
                    rows = np.asarray(next(encoded), dtype=np.float32)
                    _save(self._path(shard), rows, self.storage_options)
                out.append(rows)
        return np.concatenate(out)

    def _encode_shards(self, shards: list[list[str]], progress: Progress) -> Iterator[np.ndarray]:
        if self.map_shards is None:
            return (self.encoder.encode_text(shard, progress=progress) for shard in shards)
        return (_counted(rows, progress) for rows in self.map_shards(self.encoder.encode_text, shards))


def _counted(rows: np.ndarray, progress: Progress) -> np.ndarray:
    progress.update(len(rows))
    return rows
