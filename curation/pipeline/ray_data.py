"""The one module that knows Ray: Ray Tasks for fitting and writing, Ray Data for the image stream.

Stream: partition descriptors -> decode + preprocess (CPU tasks, one partition each) -> embed +
score in an actor pool (model loaded once per actor, GPU when the cluster has one) -> batches back
to the driver, which groups rows by partition and hands finished partitions to writer tasks.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Iterator

import numpy as np

from curation.config import ComputeConfig, SourceConfig
from curation.models import ModelConfig
from curation.pipeline.plan import Partition


def init_ray(address: str | None = None) -> None:
    """Join the cluster a `ray job submit` driver runs on (RAY_ADDRESS), a configured address, or
    start a local Ray. "local" never joins a stale cluster recorded in a temp dir."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=True,
             include_dashboard=False if address == "local" else None)


def in_ray_job() -> bool:
    """Whether this process is the entrypoint of `ray job submit` (the job supervisor sets this
    variable for the driver it starts)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def alive_nodes() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node["Alive"])


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def run_tasks(fn: Callable, arg_lists: list[tuple], num_cpus: float = 1.0, num_gpus: float = 0.0) -> list:
    """Run `fn(*args)` for each args tuple as Ray Tasks; results in order."""
    import ray

    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(fn)
    return ray.get([remote.remote(*args) for args in arg_lists])


def ray_map_shards(model_cfg: ModelConfig) -> Callable:
    """A `map` for CachedTextEncoder: encode text shards in parallel Ray Tasks."""

    def map_shards(_encode, shards):
        if not shards:
            return []
        return run_tasks(_encode_shard, [(model_cfg, shard) for shard in shards], num_cpus=1.0)

    return map_shards


@functools.lru_cache(maxsize=2)
def _worker_model(model_cfg: ModelConfig):
    from curation.models import load_model

    return load_model(model_cfg)


def _encode_shard(model_cfg: ModelConfig, texts: list[str]) -> np.ndarray:
    return _worker_model(model_cfg).encode_text(texts)


class EmbedAndScore:
    """Ray Data callable class: one model and all detectors per actor, reused for every batch."""

    def __init__(self, model_cfg: ModelConfig, detector_files, thresholds: dict[str, float],
                 mean: tuple, std: tuple, torch_threads: int | None = None):
        """`detector_files`: an ObjectRef of the artifacts (list of {file name: bytes}), put once by
        the driver; inside the constructor's arguments they would make the UDF as large as the
        artifacts (NegLabel's ~70k negatives: 100+ MB), shipped with every actor."""
        import ray
        import torch

        from curation.detectors.base import detector_from_files

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.encoder = _worker_model(model_cfg)
        self.detectors = [detector_from_files(files, self.encoder.identity) for files in ray.get(detector_files)]
        self.thresholds, self.mean, self.std = thresholds, mean, std

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from curation.pipeline.decode import normalize_pixels
        from curation.pipeline.score import decide

        ok = batch["error_kind"] == ""
        pixels = batch.pop("pixels")
        embeddings = np.zeros((len(ok), self.encoder_dim), np.float32)
        if ok.any():
            embeddings[ok] = self.encoder.encode_pixels(normalize_pixels(pixels[ok], self.mean, self.std))
        return {**batch, "embedding": embeddings, **decide(embeddings, ok, self.detectors, self.thresholds)}

    @functools.cached_property
    def encoder_dim(self) -> int:
        return self.encoder.dim


def _decode_batch(batch: dict[str, np.ndarray], image_size: int, source: SourceConfig):
    from curation.pipeline.read import decode_partition

    (descriptor,) = batch["partition"]
    return decode_partition(Partition.from_json(descriptor), source, image_size)


def check_no_deadlock(compute: ComputeConfig) -> None:
    """An actor pool holding every CPU starves the decode tasks and Ray Data hangs silently:
    refuse that configuration up front."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 0))
    needed = compute.actors * compute.cpus_per_actor + compute.decode_cpus
    if needed > cpus:
        raise ValueError(
            f"compute: {compute.actors} actors x {compute.cpus_per_actor} CPUs + {compute.decode_cpus} CPUs for "
            f"decoding = {needed} > {cpus} CPUs in the cluster; the stream would deadlock. Lower "
            "compute.actors or compute.cpus_per_actor (fractions are fine).")


def stream(partitions: list[Partition], source: SourceConfig, model_cfg: ModelConfig,
           compute: ComputeConfig, detector_files: list[dict], thresholds: dict[str, float],
           preprocess: tuple[int, tuple, tuple]) -> Iterator[dict[str, np.ndarray]]:
    """Decoded, embedded and scored rows of `partitions`, as numpy batches in completion order."""
    import ray

    if not partitions:
        return
    image_size, mean, std = preprocess
    gpus = compute.gpus_per_actor if compute.gpus_per_actor is not None else (1.0 if cluster_gpus() else 0.0)
    check_no_deadlock(compute)
    dataset = ray.data.from_items([{"partition": p.to_json()} for p in partitions],
                                  override_num_blocks=max(len(partitions), 1))
    dataset = dataset.map_batches(
        _decode_batch, batch_size=1, num_cpus=compute.decode_cpus,
        fn_kwargs={"image_size": image_size, "source": source})
    dataset = dataset.map_batches(
        EmbedAndScore, batch_size=model_cfg.batch_size, num_cpus=compute.cpus_per_actor, num_gpus=gpus,
        compute=ray.data.ActorPoolStrategy(size=compute.actors),
        fn_constructor_kwargs={"model_cfg": model_cfg, "detector_files": ray.put(detector_files),
                               "thresholds": thresholds, "mean": mean, "std": std,
                               "torch_threads": compute.torch_threads})
    yield from dataset.iter_batches(batch_size=None, batch_format="numpy")


def submit(fn: Callable, *args, num_cpus: float = 0.25):
    """Start `fn(*args)` as a Ray Task; returns its ref (see `wait_all`)."""
    import ray

    return ray.remote(num_cpus=num_cpus)(fn).remote(*args)


def wait_all(refs: list) -> list:
    """Results of Ray Tasks in order; a task that raised gives its exception instead, so one
    failed task does not hide what the others finished."""
    import ray

    results = []
    for ref in refs:
        try:
            results.append(ray.get(ref))
        except ray.exceptions.RayTaskError as err:
            results.append(err)
    return results
