"""Fitted detector artifacts for a run: reused from the cache, fetched from the Model Registry, or
fitted from text in Ray Tasks (one per detector; those that encode one corpus one after the
other, `fit_chains`) and cached.

A cache entry is a directory named by `detector_key` under `<cache>/detectors/`, holding the
artifact files and `_complete.json` ({file name: sha256}), written last: an entry without it, or
whose files fail their checksums or do not load for the model, is refitted, never trusted. The
cache (`cache_dir`, with the text cache under `<cache>/text/`) is a local folder or an s3:// URI
read with `output.storage_options`: on S3 every node of a cluster shares one cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Iterator

from curation import registry, storage
from curation.config import DetectorConfig, RunConfig
from curation.detectors.base import Detector, artifact_checksums, detector_from_files, detector_to_files
from curation.models import ModelConfig, model_identity
from curation.pipeline import ray_data
from curation.text.corpora import load_corpus

log = logging.getLogger("curation")
CACHE_RECORD = "_complete.json"  # {file name: sha256} of a cached artifact, written last


def cache_root(cfg: RunConfig) -> str:
    return cfg.cache_dir if cfg.cache_dir else str(storage.cache_home())


def detector_class(det: DetectorConfig) -> type[Detector]:
    return Detector.registry[det.kind]


def build_detector(det: DetectorConfig) -> Detector:
    return detector_class(det)(det.task_texts, side=det.side, name=det.label, **det.params)


def fit_detector(model_cfg: ModelConfig, det: DetectorConfig, cache_dir: str,
                 options: dict) -> tuple[dict[str, bytes], dict[str, int]]:
    """Ray Task body: fit one detector from text (text shards encoded in parallel tasks, cached).
    Returns its artifact files and how many text shards it encoded and read from the cache."""
    import torch

    from curation.progress import ensure_worker_logging
    from curation.text.cache import CachedTextEncoder

    ensure_worker_logging()
    log.info("fitting %s detector %r", det.kind, det.label)
    # On a GPU the task encodes its own shards; on CPUs, shards fan out over Ray Tasks.
    map_shards = None if torch.cuda.is_available() else ray_data.ray_map_shards(model_cfg)
    encoder = CachedTextEncoder(ray_data.worker_model(model_cfg), storage.join(cache_dir, "text"),
                                map_shards=map_shards, storage_options=options)
    detector = build_detector(det)
    detector.fit(encoder, load_corpus(detector_class(det).corpus_kind, det.corpus))
    return detector_to_files(detector), {"text_shards_encoded": encoder.misses, "text_shards_cached": encoder.hits}


def fit_chains(detectors: list[DetectorConfig]) -> list[list[int]]:
    """Indices of `detectors` in chains: the chains fit side by side, each chain's detectors one
    after the other. Detectors with one corpus source (`Detector.corpus_source`: two NegLabels on
    WordNet with the same lexnames and templates, two HFTTs on one word list) encode identical
    corpus shards; fitted at once, each would miss the text cache and encode all of them. Chained,
    the later ones read those shards from the cache. Only they wait, and only for the one before:
    on CPUs that costs little, since one fit's shards already fan out over all the cluster's CPUs
    (`ray_data.ray_map_shards`), but two HFTTs on one word list also train one after the other.
    Takes detectors to fit: registered ones are fetched, never fitted."""
    chains: dict[object, list[int]] = {}
    for i, det in enumerate(detectors):
        source = build_detector(det).corpus_source(det.corpus)
        chains.setdefault(("alone", i) if source is None else source, []).append(i)
    return list(chains.values())


def detector_key(model_cfg: ModelConfig, det: DetectorConfig) -> str:
    """Fitted state depends on the model and every field but the threshold that the detector's kind
    uses: `corpus` only for kinds that learn from a word list, and then by its content (sha256 of
    the cleaned words), so a word list edited in place is refitted and other kinds never are.
    Task texts are already inlined by the config (`task_file` -> `task_texts`)."""
    fit_config = {k: v for k, v in dataclasses.asdict(det).items() if k not in ("threshold", "corpus")}
    corpus_kind = detector_class(det).corpus_kind
    if corpus_kind == "word_list":
        fit_config["corpus"] = load_corpus(corpus_kind, det.corpus).provenance()
    payload = json.dumps({"model": model_identity(model_cfg), "detector": fit_config}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def fitted_detectors(cfg: RunConfig) -> tuple[list[dict[str, bytes]], dict[str, bool]]:
    """Artifacts of every configured detector: reused from the cache when config and model match
    and the cached files check out, otherwise fitted in Ray Tasks (`fit_chains`) and cached.
    Registered detectors (resolved by `registry.resolve`) are downloaded, never fitted."""
    root, identity = storage.join(cache_root(cfg), "detectors"), model_identity(cfg.model)
    options = cfg.output.storage_options
    keys = [None if det.registered else detector_key(cfg.model, det) for det in cfg.detectors]
    cached = [registry.fetch(cfg, det) if det.registered else cached_artifact(storage.join(root, key), identity, options)
              for det, key in zip(cfg.detectors, keys)]
    todo = [i for i, files in enumerate(cached) if files is None]
    if todo:
        reused = [d.label for d, files in zip(cfg.detectors, cached) if files is not None]
        log.info("fitting %d detectors in Ray tasks (%s); cached: %s", len(todo),
                 ", ".join(cfg.detectors[i].label for i in todo), ", ".join(reused) or "none")
    chains = [[todo[j] for j in chain] for chain in fit_chains([cfg.detectors[i] for i in todo])]
    artifacts = list(cached)
    for i, files in fit_in_chains(cfg, chains):  # each cached as it comes: a later failure keeps it
        artifacts[i] = cache_artifact(storage.join(root, keys[i]), files, options)
    return artifacts, {det.label: files is not None for det, files in zip(cfg.detectors, cached)}


def fit_in_chains(cfg: RunConfig, chains: list[list[int]]) -> Iterator[tuple[int, dict[str, bytes]]]:
    """Fit `cfg.detectors[i]` for each i in `chains` in Ray Tasks, the chains side by side and each
    chain's detectors one after the other (`fit_chains` makes the job's); yields (i, artifact
    files) as each fit finishes, logging how many text shards it encoded and read."""
    if not any(chains):
        return  # nothing to fit: Ray need not even be running
    gpus = 1.0 if ray_data.cluster_gpus() else 0.0  # HFTT training and text encoding on GPU
    args = [[(cfg.model, cfg.detectors[i], cache_root(cfg), cfg.output.storage_options) for i in chain]
            for chain in chains]
    for c, position, (files, shards) in ray_data.run_task_chains(fit_detector, args, num_cpus=1.0, num_gpus=gpus):
        i = chains[c][position]
        log.info("fitted %s: %d text shards encoded, %d read from the text cache", cfg.detectors[i].label,
                 shards["text_shards_encoded"], shards["text_shards_cached"])
        yield i, files


def cache_artifact(directory: str | Path, files: dict[str, bytes], options: dict | None = None) -> dict[str, bytes]:
    """Write a fitted artifact; the checksum record last, since it marks the entry complete."""
    directory = str(directory)
    storage.remove(storage.join(directory, CACHE_RECORD), options)
    for name, data in files.items():
        storage.write_bytes(storage.join(directory, name), data, options)
    storage.write_bytes(storage.join(directory, CACHE_RECORD),
                        json.dumps(artifact_checksums(files), indent=2).encode(), options)
    return files


def cached_artifact(directory: str, identity: str, options: dict | None = None) -> dict[str, bytes] | None:
    """The cached artifact if it is complete, matches its checksums and loads for model `identity`;
    None (refit) otherwise, with a warning when an entry was there but failed the check."""
    if not storage.list_files(directory, options):
        return None
    try:
        record = json.loads(storage.read_bytes(storage.join(directory, CACHE_RECORD), options))
        files = {name: storage.read_bytes(storage.join(directory, name), options) for name in record}
        checksums = artifact_checksums(files)
        corrupt = sorted(n for n in files if checksums[n] != record[n])
        if corrupt:
            raise ValueError(f"checksum mismatch in {corrupt}")
        detector_from_files(files, identity)
    except Exception as err:  # noqa: BLE001 - any fault in a cache entry means: fit again
        log.warning("cached detector %s is unusable (%s: %s); refitting", directory, type(err).__name__, err)
        return None
    return files


def load_artifacts(artifacts: list[dict[str, bytes]]) -> list[Detector]:
    return [detector_from_files(files) for files in artifacts]
