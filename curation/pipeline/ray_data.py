"""The one module that knows Ray: Ray Tasks for fitting and writing, Ray Data for the image stream.

Stream: partition descriptors -> decode + preprocess (CPU tasks, one partition each) -> embed +
score in an actor pool (model loaded once per actor, GPU when the cluster has one) -> batches back
to the driver, which groups rows by partition and hands finished partitions to writer tasks.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from typing import Any, Callable, Iterator

import numpy as np

from curation.config import ComputeConfig, SourceConfig
from curation.models import ModelConfig, batch_size_for
from curation.pipeline.plan import Partition, PlannedPartition

log = logging.getLogger("curation")


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
    return len(node_cpus())


def node_cpus() -> list[float]:
    """CPUs of each alive node of the cluster."""
    import ray

    return [float(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node["Alive"]]


MAX_THREADS_PER_ACTOR = 8  # past this, one more actor embeds faster than more threads in one
DECODE_SHARE = 0.25  # of a node's CPUs kept free of actor reservations for decode and writer tasks
SPOOL_CPUS = 0.25  # curate's writing stage (spooling scored rows) mostly waits on storage


def resolve_compute(compute: ComputeConfig, cpus_per_node: list[float], gpus: float) -> ComputeConfig:
    """`compute` with every unset (None) field chosen for this cluster; set fields are kept.

    GPUs: one actor per GPU, 1 CPU each (decoding fans out over the remaining CPUs). CPUs only:
    threads per actor up to MAX_THREADS_PER_ACTOR, enough actors per node to cover its cores, each
    reserving its share of what decoding leaves. A 2-CPU node gets one actor reserving 1.25 CPUs and
    running 2 torch threads (a 1-CPU actor is pinned to one thread: half the plain loop's speed).
    The smallest node decides, so an actor fits on every node."""
    if gpus and compute.gpus_per_actor != 0:
        gpus_per_actor = compute.gpus_per_actor or 1.0
        fill = {"gpus_per_actor": gpus_per_actor, "actors": max(1, int(gpus // gpus_per_actor)), "cpus_per_actor": 1.0}
    else:
        node = max(1.0, min(cpus_per_node or [1.0]))
        nodes = max(1, len(cpus_per_node))
        per_node = (math.ceil(compute.actors / nodes) if compute.actors
                    else max(1, int(node // min(node, MAX_THREADS_PER_ACTOR))))
        reserve = max(compute.decode_cpus + 0.25, DECODE_SHARE * node)
        fill = {"gpus_per_actor": 0.0, "actors": per_node * nodes,
                "cpus_per_actor": max(0.25, (node - reserve) / per_node),
                "torch_threads": max(1, int(node // per_node))}
    return dataclasses.replace(compute, **{k: v for k, v in fill.items() if getattr(compute, k) is None})


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def run_task_chains(fn: Callable, chains: list[list[tuple]], num_cpus: float = 1.0,
                    num_gpus: float = 0.0) -> Iterator[tuple[int, int, Any]]:
    """Run `fn(*args)` as Ray Tasks, the chains side by side and each chain's tasks one after the
    other (a task starts when the one before it in its chain has returned). Yields (chain index,
    position in the chain, result) as each task finishes. A failed task raises here, its chain
    stops, and the tasks still running are cancelled, as they are when the caller stops early.
    With `force` (their workers exit): Ray's gentle cancel, a KeyboardInterrupt in the task, let a
    running task finish in the full test suite, twice; a fit writes its cache atomically, so a
    killed one loses only its own work."""
    if not any(chains):
        return
    import ray

    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(fn)
    pending = {remote.remote(*chain[0]): (c, 0) for c, chain in enumerate(chains) if chain}
    try:
        while pending:
            [done], _ = ray.wait(list(pending), num_returns=1)
            c, position = pending.pop(done)
            result = ray.get(done)  # raises before the chain goes on
            if position + 1 < len(chains[c]):
                pending[remote.remote(*chains[c][position + 1])] = (c, position + 1)
            yield c, position, result
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


def ray_map_shards(model_cfg: ModelConfig) -> Callable:
    """A `map` for CachedTextEncoder: encode text shards in parallel Ray Tasks, yielding each
    shard's rows in order as soon as it is done (so it is cached and counted then)."""

    def map_shards(_encode, shards):
        import ray

        refs = [submit(_encode_shard, model_cfg, shard, f"encoding text shard {i} of {len(shards)}", num_cpus=1.0)
                for i, shard in enumerate(shards, 1)]
        return (ray.get(ref) for ref in refs)

    return map_shards


@functools.lru_cache(maxsize=2)
def worker_model(model_cfg: ModelConfig):
    from curation.models import load_model

    return load_model(model_cfg)


def _encode_shard(model_cfg: ModelConfig, texts: list[str], what: str) -> np.ndarray:
    """Ray Task body: one shard (16k texts: a minute or more on a CPU), its batches reported."""
    from curation.progress import Progress

    with Progress(what, len(texts), "texts") as progress:
        return worker_model(model_cfg).encode_text(texts, progress=progress)


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
        self.encoder = worker_model(model_cfg)
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


def _decode_batch(batch: dict[str, np.ndarray], image_size: int, source: SourceConfig, plans=None):
    """One partition in, its decoded blocks out (a generator: Ray Data streams each block on as
    its own output, so a large shard never sits in one block). With `plans` (the run directory),
    the partition is a `PlannedPartition` whose names are read from the run's plan."""
    from curation.pipeline.read import decode_partition

    (descriptor,) = batch["partition"]
    partition = plans.load(PlannedPartition.from_json(descriptor)) if plans else Partition.from_json(descriptor)
    yield from decode_partition(partition, source, image_size)


def check_no_deadlock(compute: ComputeConfig) -> None:
    """An actor pool holding every CPU starves the decode tasks (and the writing stage) and Ray
    Data hangs silently: refuse that configuration up front."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 0))
    needed = compute.actors * compute.cpus_per_actor + compute.decode_cpus + SPOOL_CPUS
    if needed > cpus:
        raise ValueError(
            f"compute: {compute.actors} actors x {compute.cpus_per_actor} CPUs + {compute.decode_cpus} CPUs for "
            f"decoding + {SPOOL_CPUS} for writing = {needed} > {cpus} CPUs in the cluster; the stream would "
            "deadlock. Lower "
            "compute.actors or compute.cpus_per_actor (fractions are fine).")


def _quiet_ray_data_progress() -> None:
    """The caller reports the stream's progress (`stream.StreamProgress`: one bar on a terminal,
    a line every few seconds elsewhere); Ray Data's own would draw competing bars, or off a
    terminal log a 9-line status block every 10 s. Its one-time notice that bars are off is
    dropped too: it tells the user to turn them back on."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def _scored(partitions: list, source: SourceConfig, model_cfg: ModelConfig, compute: ComputeConfig,
            detector_files: list[dict], thresholds: dict[str, float], preprocess: tuple[int, tuple, tuple],
            plans=None):
    """The Ray Data plan: partitions (`Partition`s, or `PlannedPartition`s of the run directory
    `plans`) -> decode tasks (blocks of a partition) -> embed-and-score actors. Rows keep
    everything but the pixels."""
    import ray

    image_size, mean, std = preprocess
    compute = resolve_compute(compute, node_cpus(), cluster_gpus())
    log.info("stream: %d actors x %.2f CPUs, %g GPUs, %s torch threads each; decode tasks %.2f CPUs",
             compute.actors, compute.cpus_per_actor, compute.gpus_per_actor, compute.torch_threads or "default",
             compute.decode_cpus)
    check_no_deadlock(compute)
    _quiet_ray_data_progress()
    dataset = ray.data.from_items([{"partition": p.to_json()} for p in partitions],
                                  override_num_blocks=max(len(partitions), 1))
    dataset = dataset.map_batches(
        _decode_batch, batch_size=1, num_cpus=compute.decode_cpus,
        fn_kwargs={"image_size": image_size, "source": source, "plans": plans})
    return dataset.map_batches(
        EmbedAndScore, batch_size=batch_size_for(model_cfg, compute.gpus_per_actor > 0), num_cpus=compute.cpus_per_actor,
        num_gpus=compute.gpus_per_actor,
        compute=ray.data.ActorPoolStrategy(size=compute.actors),
        fn_constructor_kwargs={"model_cfg": model_cfg, "detector_files": ray.put(detector_files),
                               "thresholds": thresholds, "mean": mean, "std": std,
                               "torch_threads": compute.torch_threads})


def stream(partitions: list[Partition], source: SourceConfig, model_cfg: ModelConfig,
           compute: ComputeConfig, detector_files: list[dict], thresholds: dict[str, float],
           preprocess: tuple[int, tuple, tuple]) -> Iterator[dict[str, np.ndarray]]:
    """Decoded, embedded and scored rows of `partitions`, as numpy batches in completion order
    (calibration and evaluation, whose scores the driver needs)."""
    if not partitions:
        return
    dataset = _scored(partitions, source, model_cfg, compute, detector_files, thresholds, preprocess)
    yield from dataset.iter_batches(batch_size=None, batch_format="numpy")


def spooled_stream(partitions: list[PlannedPartition], source: SourceConfig, model_cfg: ModelConfig,
                   compute: ComputeConfig, detector_files: list[dict], thresholds: dict[str, float],
                   preprocess: tuple[int, tuple, tuple], run) -> Iterator[tuple[str, dict]]:
    """`curate`'s stream: the scored rows are written to the run's spool by a last Ray Data stage
    where they were scored (`write.spool_rows`); the driver receives (partition id, counts) only,
    one per batch and partition."""
    import json

    from curation.pipeline.write import spool_rows

    if not partitions:
        return
    dataset = _scored(partitions, source, model_cfg, compute, detector_files, thresholds, preprocess, plans=run)
    dataset = dataset.map_batches(spool_rows, batch_size=None, num_cpus=SPOOL_CPUS,
                                  fn_kwargs={"run": run, "thresholds": thresholds})
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for pid, counts in zip(batch["partition"], batch["counts"]):
            yield str(pid), json.loads(counts)


class RescorePartitions:
    """Ray Data callable class for `rescore`: one stored partition in (its manifest unit key and
    id; the actor reads its record and its scores/ and failed/ files, embeddings included),
    decided with new detectors or thresholds, written to the new run directory where the actor
    runs; out goes one row of counts and score histograms (JSON)."""

    def __init__(self, detector_files, thresholds: dict[str, float], previous, run, source: SourceConfig,
                 detector_names: list[str], store_embeddings: bool):
        import ray

        from curation.detectors.base import detector_from_files

        self.detectors = [detector_from_files(files) for files in ray.get(detector_files)]
        self.thresholds, self.previous, self.run, self.source = thresholds, previous, run, source
        self.names, self.store_embeddings = detector_names, store_embeddings
        self._unit: tuple[str, dict] = ("", {})

    def _record(self, key: str, pid: str) -> dict:
        """A partition's manifest record; a unit's records are read once per actor, as its
        partitions arrive in order."""
        if self._unit[0] != key or not self._unit[1]:
            self._unit = (key, self.previous.unit_records(key))
        return self._unit[1][pid]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import json

        from curation.pipeline.score import decide
        from curation.pipeline.write import read_partition_results, score_histograms_of, write_partition

        (key,), (pid,) = batch["unit_key"], batch["partition"]
        partition = Partition(pid, "", ())
        try:
            partition = Partition.from_dict(self._record(key, pid)["partition"])
            results = read_partition_results(self.previous, partition.id)
            ok = results["error_kind"] == ""
            results |= decide(results["embedding"], ok, self.detectors, self.thresholds)
            outcome = write_partition(self.run, partition, results, self.source, self.names, self.store_embeddings)
            outcome["histograms"] = score_histograms_of(results, self.thresholds)
        except Exception as err:  # noqa: BLE001 - one partition's failure is recorded, the others go on
            outcome = {"unfinished": f"{type(err).__name__}: {err}"[:2000], "partition": partition.id}
        return {"partition": np.array([partition.id], dtype=object), "outcome": np.array([json.dumps(outcome)], dtype=object)}


def rescore_stream(partitions: list[tuple[str, str]], previous, run, source: SourceConfig, compute: ComputeConfig,
                   detector_files: list[dict], thresholds: dict[str, float], detector_names: list[str],
                   store_embeddings: bool) -> Iterator[tuple[str, dict]]:
    """(partition id, outcome) per stored partition ((unit key, id) of `previous`'s manifest), as
    each is rescored and written: a Ray Data pipeline over scores/, one partition per batch, on an
    actor pool that loads the detectors once per actor; the driver receives counts and histograms
    only."""
    import json

    import ray

    if not partitions:
        return
    compute = resolve_compute(compute, node_cpus(), 0.0)
    _quiet_ray_data_progress()
    dataset = ray.data.from_items([{"unit_key": key, "partition": pid} for key, pid in partitions],
                                  override_num_blocks=max(len(partitions), 1))
    dataset = dataset.map_batches(
        RescorePartitions, batch_size=1, num_cpus=compute.cpus_per_actor,
        compute=ray.data.ActorPoolStrategy(size=compute.actors),
        fn_constructor_kwargs={"detector_files": ray.put(detector_files), "thresholds": thresholds,
                               "previous": previous, "run": run, "source": source,
                               "detector_names": detector_names, "store_embeddings": store_embeddings})
    for row in dataset.iter_rows():
        yield row["partition"], json.loads(row["outcome"])


def submit(fn: Callable, *args, num_cpus: float = 0.25):
    """Start `fn(*args)` as a Ray Task; returns its ref (see `wait_all`)."""
    import ray

    return ray.remote(num_cpus=num_cpus)(fn).remote(*args)


def run_all(fn: Callable, arg_lists: list[tuple], num_cpus: float = 0.25) -> list:
    """`fn(*args)` for each of `arg_lists` as parallel Ray Tasks; their results in order. A failure
    raises, but only once every task has ended: none may still act (planning deletes and compacts)
    after the caller gives up its lease."""
    import ray

    task = ray.remote(num_cpus=num_cpus)(fn)
    refs = [task.remote(*args) for args in arg_lists]
    ray.wait(refs, num_returns=len(refs))
    return ray.get(refs)


def wait_all(refs: list) -> Iterator:
    """Results of Ray Tasks in order, each as soon as it is ready (the caller counts them); a task
    that raised, or whose worker died (crash, out of memory), gives its exception instead, so one
    failed task does not hide what the others finished."""
    import ray

    for ref in refs:
        try:
            yield ray.get(ref)
        except ray.exceptions.RayError as err:
            yield err
