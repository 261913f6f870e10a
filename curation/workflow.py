"""The jobs: train detectors, curate a dataset, rescore stored embeddings, evaluate on labelled
images. Each is a function of a validated `RunConfig`; the CLI and `jobs/*.py` are thin shells.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from curation import registry, secrets, storage, tracking
from curation.config import DetectorConfig, RunConfig, ThresholdConfig, to_dict
from curation.detectors.base import artifact_checksums
from curation.metrics import threshold_for_rate
from curation.models import ModelConfig, model_identity
from curation.pipeline import ray_data
from curation.pipeline.lease import RunLease, RunLockedError
from curation.pipeline.plan import OutputConflictError, Partition, RunDirectory, make_partitions, plan, relative_inputs
from curation.pipeline.read import read_parquet_table
from curation.pipeline.write import FAILED, KEEP, REMOVE, write_partition
from curation.progress import Progress

log = logging.getLogger("curation")
NEVER = math.inf  # threshold that never fires: used while only scores are wanted


# -- detectors ---------------------------------------------------------------------------------
def cache_root(cfg: RunConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else storage.cache_home()


def build_detector(det: DetectorConfig):
    from curation.detectors import Detector

    return Detector.registry[det.kind](det.task_texts, side=det.side, name=det.label, **det.params)


def fit_detector(model_cfg: ModelConfig, det: DetectorConfig, cache_dir: str) -> dict[str, bytes]:
    """Ray Task body: fit one detector from text (text shards encoded in parallel tasks, cached)."""
    from curation.detectors.base import detector_to_files
    from curation.progress import ensure_worker_logging
    from curation.text.cache import CachedTextEncoder
    from curation.text.corpora import load_word_corpus

    import torch

    ensure_worker_logging()
    log.info("fitting %s detector %r", det.kind, det.label)
    # On a GPU the task encodes its own shards; on CPUs, shards fan out over Ray Tasks.
    map_shards = None if torch.cuda.is_available() else ray_data.ray_map_shards(model_cfg)
    encoder = CachedTextEncoder(ray_data._worker_model(model_cfg), Path(cache_dir) / "text", map_shards=map_shards)
    detector = build_detector(det)
    if det.kind == "hftt":
        detector.fit(encoder, load_word_corpus(det.corpus))
    else:
        detector.fit(encoder)
    return detector_to_files(detector)


CACHE_RECORD = "_complete.json"  # {file name: sha256} of a cached artifact, written last


def detector_key(model_cfg: ModelConfig, det: DetectorConfig) -> str:
    """Fitted state depends on the model and everything but the threshold; HFTT's word corpus by
    its content (sha256 of the cleaned words), so a word list edited in place is refitted.
    Task texts are already inlined by the config (`task_file` -> `task_texts`)."""
    fit_config = {k: v for k, v in dataclasses.asdict(det).items() if k != "threshold"}
    if det.kind == "hftt":
        from curation.text.corpora import load_word_corpus

        fit_config["corpus"] = load_word_corpus(det.corpus).provenance()
    payload = json.dumps({"model": model_identity(model_cfg), "detector": fit_config}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def fitted_detectors(cfg: RunConfig) -> tuple[list[dict[str, bytes]], dict[str, bool]]:
    """Artifacts of every configured detector: reused from the cache when config and model match
    and the cached files check out, otherwise fitted in Ray Tasks (one per detector) and cached.
    Registered detectors (resolved by `registry.resolve`) are downloaded, never fitted."""
    root, identity = cache_root(cfg) / "detectors", model_identity(cfg.model)
    keys = [None if det.registered else detector_key(cfg.model, det) for det in cfg.detectors]
    cached = [registry.fetch(cfg, det) if det.registered else _cached_artifact(root / key, identity)
              for det, key in zip(cfg.detectors, keys)]
    todo = [(cfg.model, det, str(cache_root(cfg))) for det, files in zip(cfg.detectors, cached) if files is None]
    gpus = 1.0 if todo and ray_data.cluster_gpus() else 0.0  # HFTT training and text encoding on GPU
    if todo:
        reused = [d.label for d, files in zip(cfg.detectors, cached) if files is not None]
        log.info("fitting %d detectors in Ray tasks (%s); cached: %s", len(todo),
                 ", ".join(d.label for _, d, _ in todo), ", ".join(reused) or "none")
    fitted = iter(ray_data.run_tasks(fit_detector, todo, num_cpus=1.0, num_gpus=gpus) if todo else [])
    artifacts = [files if files is not None else _cache_artifact(root / key, next(fitted))
                 for key, files in zip(keys, cached)]
    return artifacts, {det.label: files is not None for det, files in zip(cfg.detectors, cached)}


def _cache_artifact(directory: Path, files: dict[str, bytes]) -> dict[str, bytes]:
    """Write a fitted artifact; the checksum record last, since it marks the entry complete."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CACHE_RECORD).unlink(missing_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    (directory / CACHE_RECORD).write_text(json.dumps(artifact_checksums(files), indent=2))
    return files


def _cached_artifact(directory: Path, identity: str) -> dict[str, bytes] | None:
    """The cached artifact if it is complete, matches its checksums and loads for model `identity`;
    None (refit) otherwise, with a warning when an entry was there but failed the check."""
    from curation.detectors.base import detector_from_files

    if not directory.exists():
        return None
    try:
        record = json.loads((directory / CACHE_RECORD).read_text())
        files = {name: (directory / name).read_bytes() for name in record}
        checksums = artifact_checksums(files)
        corrupt = sorted(n for n in files if checksums[n] != record[n])
        if corrupt:
            raise ValueError(f"checksum mismatch in {corrupt}")
        detector_from_files(files, identity)
    except Exception as err:  # noqa: BLE001 - any fault in a cache entry means: fit again
        log.warning("cached detector %s is unusable (%s: %s); refitting", directory, type(err).__name__, err)
        return None
    return files


def load_artifacts(artifacts: list[dict[str, bytes]]):
    from curation.detectors.base import detector_from_files

    return [detector_from_files(files) for files in artifacts]


# -- scoring image sets (calibration and evaluation) -------------------------------------------
def preprocess_of(cfg: RunConfig) -> tuple[int, tuple, tuple]:
    from curation.pipeline.decode import preprocess_config

    return preprocess_config(cfg.model.name, cfg.model.pretrained)


def score_partitions(cfg: RunConfig, partitions: list[Partition], artifacts, source=None,
                     what: str = "scoring images") -> dict[str, np.ndarray]:
    """Scores of every decodable item in `partitions` of `source` (default: the run's source);
    no decisions, nothing written. Progress reported as `what`."""
    source = source or cfg.source
    never = {det.label: NEVER for det in cfg.detectors}
    collector, batches = PartitionCollector(partitions), []
    with StreamProgress(what, partitions, decided=False) as progress:
        for batch in ray_data.stream(partitions, source, cfg.model, cfg.compute, artifacts, never, preprocess_of(cfg)):
            finished = [results for _, results in collector.add(batch)]
            batches.extend(finished)
            progress.add(batch, len(finished))
    if not batches:
        return {f"score_{d.label}": np.zeros(0, np.float32) for d in cfg.detectors} | {"failed": 0}
    merged = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    ok = merged["decision"] != FAILED
    return {f"score_{d.label}": merged[f"score_{d.label}"][ok] for d in cfg.detectors} | {"failed": int((~ok).sum())}


def score_image_set(cfg: RunConfig, uri: str, fmt: str, options: dict, artifacts,
                    what: str = "scoring images") -> dict[str, np.ndarray]:
    source = dataclasses.replace(cfg.source, uri=uri, format=fmt, storage_options=options)
    partitions = make_partitions(relative_inputs(uri, options, fmt), fmt, cfg.source.partition_size)
    if not partitions:
        raise ValueError(f"no {fmt} inputs found under {uri}")
    return score_partitions(cfg, partitions, artifacts, source, what)


# -- thresholds --------------------------------------------------------------------------------
def rule_threshold(rule: ThresholdConfig, sample: np.ndarray | None = None,
                   wanted: np.ndarray | None = None) -> dict:
    """A threshold and how it was chosen: `fixed` as configured, `quantile` flags `rate` of the
    unlabelled `sample`, `tpr` keeps that fraction of the labelled `wanted` scores."""
    if rule.strategy == "fixed":
        return {"strategy": "fixed", "threshold": rule.value}
    if rule.strategy == "quantile":
        return {"strategy": "quantile", "rate": rule.value, "sample": int(len(sample)),
                "threshold": threshold_for_rate(sample, rule.value) if len(sample) else 1.0}
    return {"strategy": "tpr", "tpr": rule.value, "threshold": threshold_for_rate(wanted, 1.0 - rule.value)}


class CalibrationError(ValueError):
    """Too few decodable images to derive a data-dependent (quantile) threshold from."""


def check_calibration_sample(cfg: RunConfig, det: DetectorConfig, found: int, failed: int, where: str) -> None:
    """Refuse to calibrate (and freeze in _thresholds.json) a quantile threshold on a tiny sample."""
    needed = det.threshold.min_sample
    if found < needed:
        i = cfg.detectors.index(det)
        raise CalibrationError(
            f"detector {det.label!r}: a quantile threshold needs at least {needed} decodable images to "
            f"calibrate on; found {found} ({failed} failed to decode) in {where} (the sample is up to "
            f"sample_size image files, or the first 4 parquet files / shards). Add data, lower "
            f"detectors[{i}].threshold.min_sample, or use a fixed threshold (threshold.strategy: fixed).")


def calibration_partitions(cfg: RunConfig, partitions: list[Partition], sample_size: int) -> list[Partition]:
    """A deterministic spread-out sample: image files every k-th, else the first files."""
    if cfg.source.format == "images":
        names = [name for p in partitions for name in p.inputs]
        step = max(1, len(names) // sample_size)
        return make_partitions(names[::step][:sample_size], "images", cfg.source.partition_size)
    return partitions[: max(1, min(len(partitions), 4))]


def resolve_thresholds(cfg: RunConfig, run: RunDirectory, partitions: list[Partition], artifacts) -> dict:
    """Threshold per detector, with how it was chosen. Data-derived thresholds are stored in the
    run directory and reused, so incremental runs decide with the same thresholds."""
    stored = run.read_json("_thresholds.json") or {}
    result, pending = {}, []
    for det in cfg.detectors:
        rule = det.threshold
        if det.label in stored:
            result[det.label] = stored[det.label]
        elif rule.strategy == "fixed":
            result[det.label] = rule_threshold(rule)
        else:
            pending.append(det)
    if any(d.threshold.strategy == "quantile" for d in pending):
        sample_size = max(d.threshold.sample_size for d in pending)
        scores = score_partitions(cfg, calibration_partitions(cfg, partitions, sample_size), artifacts,
                                  what="scoring a sample for quantile thresholds")
        for det in (d for d in pending if d.threshold.strategy == "quantile"):
            sample = scores[f"score_{det.label}"]
            check_calibration_sample(cfg, det, len(sample), scores["failed"], cfg.source.uri)
            result[det.label] = rule_threshold(det.threshold, sample)
    if any(d.threshold.strategy == "tpr" for d in pending):
        result.update(_tpr_thresholds(cfg, [d for d in pending if d.threshold.strategy == "tpr"], artifacts))
    run.write_json(result, "_thresholds.json")
    return result


def _tpr_thresholds(cfg: RunConfig, detectors: list[DetectorConfig], artifacts) -> dict:
    ev = cfg.evaluation
    if not ev.wanted_uri:
        raise ValueError("threshold strategy 'tpr' needs evaluation.wanted_uri (labelled wanted images)")
    wanted = score_image_set(cfg, ev.wanted_uri, ev.format, ev.storage_options, artifacts,
                             "scoring labelled wanted images for tpr thresholds")
    unwanted = score_image_set(cfg, ev.unwanted_uri, ev.format, ev.storage_options, artifacts,
                               "scoring labelled unwanted images") if ev.unwanted_uri else None
    out = {}
    for det in detectors:
        keep = wanted[f"score_{det.label}"]
        record = rule_threshold(det.threshold, wanted=keep)
        record["wanted_kept"] = float((keep < record["threshold"]).mean())
        if unwanted is not None:
            record["fpr_unwanted_kept"] = float((unwanted[f"score_{det.label}"] < record["threshold"]).mean())
        out[det.label] = record
    return out


# -- curate ------------------------------------------------------------------------------------
class NoInputsError(FileNotFoundError):
    """A first run found nothing to curate: a wrong URI or format, not a success."""


class JobPathError(ValueError):
    """A path that would resolve inside a Ray job's temporary working directory."""


def check_paths_for_ray_job(cfg: RunConfig) -> None:
    """Inside `ray job submit`, the entrypoint's working directory is a per-session copy under
    /tmp/ray/session_*/runtime_resources/ that vanishes with the session (and holds only what git
    does not ignore): relative local paths and the cwd-relative default MLflow store would read
    nothing or write where nobody finds it. Refuse them, naming the fix."""
    if not ray_data.in_ray_job():
        return
    paths = {"source.uri": cfg.source.uri, "output.uri": cfg.output.uri, "cache_dir": cfg.cache_dir,
             "evaluation.wanted_uri": cfg.evaluation.wanted_uri, "evaluation.unwanted_uri": cfg.evaluation.unwanted_uri}
    relative = [f"{name}={value!r}" for name, value in paths.items() if value and storage.is_relative(value)]
    if relative:
        raise JobPathError(f"inside a Ray job, relative paths resolve in the job's temporary working directory: "
                           f"{', '.join(relative)}. Use absolute paths on storage every node shares, or s3:// URIs.")
    if not tracking.has_explicit_store(cfg.tracking.uri):
        store = secrets.redact_text(cfg.tracking.uri or "the default MLflow store sqlite:///<cwd>/mlflow.db")
        raise JobPathError(f"inside a Ray job, {store} would land in the job's temporary working directory: "
                           "set tracking.uri to an MLflow server or an absolute "
                           "sqlite:////path, or export MLFLOW_TRACKING_URI (e.g. ray job submit "
                           "--runtime-env-json '{\"env_vars\": {\"MLFLOW_TRACKING_URI\": ...}}').")


class ClusterPathError(ValueError):
    """A local path on a cluster of several nodes that the config does not declare shared."""


def start_ray(cfg: RunConfig) -> None:
    """Join or start Ray, then refuse local paths a multi-node cluster cannot share."""
    ray_data.init_ray(cfg.compute.ray_address)
    check_local_paths_on_cluster(cfg, ray_data.alive_nodes())


def check_local_paths_on_cluster(cfg: RunConfig, nodes: int) -> None:
    """Decode tasks and writer tasks run on every node: on a cluster of several nodes a local path
    means each node's own disk (inputs missing on some nodes, outputs scattered over all of them),
    unless every node mounts it at the same path (`compute.shared_filesystem`)."""
    if nodes < 2 or cfg.compute.shared_filesystem:
        return
    paths = {"source.uri": cfg.source.uri, "output.uri": cfg.output.uri,
             "evaluation.wanted_uri": cfg.evaluation.wanted_uri, "evaluation.unwanted_uri": cfg.evaluation.unwanted_uri}
    local = [f"{name}={value!r}" for name, value in paths.items() if value and storage.is_local(value)]
    if local:
        raise ClusterPathError(
            f"the Ray cluster has {nodes} nodes and these are local paths: {', '.join(local)}; each node would read "
            "and write its own disk. Use s3:// URIs, or, if the paths are on storage every node mounts at the same "
            "path (NFS, Lustre), set compute.shared_filesystem: true.")


def check_output_outside_source(source_uri: str, output_uri: str) -> None:
    """The source listing is recursive: an output inside the source would be curated by the next run."""
    if storage.is_within(output_uri, source_uri):
        raise OutputConflictError(f"output.uri {output_uri!r} lies inside source.uri {source_uri!r}; the next run "
                                  "would curate its own outputs. Choose an output location outside the source.")


def _check_lease(lease: RunLease) -> None:
    if lease.lost:
        raise RunLockedError(f"{lease.run.uri}: the lease was taken over by another run (this one was presumed "
                             "dead); stopping before recording more partitions")


def _finished_and_unfinished(jobs: list[tuple[Partition, object]]) -> tuple[list[dict], list[dict]]:
    """Counts of the partitions written, and {partition, reason} of those left for the next run:
    transiently unreadable inputs, or a writer task that failed (its error is the reason)."""
    counts, unfinished = [], []
    with Progress("writing partitions", len(jobs), "partitions") as progress:
        for (partition, _), result in zip(jobs, ray_data.wait_all([ref for _, ref in jobs])):
            if isinstance(result, Exception):
                unfinished.append({"partition": partition.id, "reason": f"{type(result).__name__}: {result}"[:2000]})
            elif "unfinished" in result:
                unfinished.append({"partition": partition.id, "reason": result["unfinished"][:2000]})
            else:
                counts.append(result)
            progress.update(1, unfinished=len(unfinished))
    if unfinished:
        log.warning("%d of %d partitions left unfinished (the next run retries them), e.g. %s", len(unfinished),
                    len(jobs), unfinished[0]["reason"])
    return counts, unfinished


class PartitionCollector:
    """Groups streamed rows by partition; yields a partition's columns once all its rows arrived."""

    def __init__(self, partitions: list[Partition]):
        self.partitions = {p.id: p for p in partitions}
        self.rows: dict[str, list[dict]] = {}
        self.seen: dict[str, int] = {}

    def add(self, batch: dict[str, np.ndarray]):
        for pid in np.unique(batch["partition"]):
            mask = batch["partition"] == pid
            part = {k: v[mask] for k, v in batch.items()}
            self.rows.setdefault(pid, []).append(part)
            self.seen[pid] = self.seen.get(pid, 0) + int(mask.sum())
            if self.seen[pid] == int(part["n_items"][0]):
                chunks = self.rows.pop(pid)
                yield self.partitions[pid], {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}

    def unseen(self, dim: int, detector_names: list[str]):
        """Partitions that produced no rows at all (empty files): finished with empty outputs."""
        if self.rows:
            raise RuntimeError(f"stream ended with incomplete partitions: {sorted(self.rows)}")
        empty = {k: np.zeros(0, object) for k in ("partition", "id", "source", "error_kind", "error_message",
                                                  "decision", "fired")}
        empty |= {"position": np.zeros(0, np.int64), "n_items": np.zeros(0, np.int64), "whole_file": np.zeros(0, bool),
                  "embedding": np.zeros((0, dim), np.float32)}
        empty |= {f"score_{n}": np.zeros(0, np.float32) for n in detector_names}
        for pid, partition in self.partitions.items():
            if pid not in self.seen:
                yield partition, empty


class StreamProgress:
    """Progress of an image stream. Image folders: images done against the file count. Parquet
    and WebDataset items are counted only once read: partitions done against the total, items
    as an extra. Kept/removed/failed so far (only failed while scoring: nothing is decided)."""

    def __init__(self, what: str, partitions: list[Partition], decided: bool = True):
        self.by_images = bool(partitions) and all(p.format == "images" for p in partitions)
        total, unit = ((sum(len(p.inputs) for p in partitions), "images") if self.by_images
                       else (len(partitions), "partitions"))
        self.counts = dict.fromkeys(("items", "kept", "removed", "failed") if decided else ("items", "failed"), 0)
        self.progress = Progress(what, total, unit, **self.counts)

    def __enter__(self) -> "StreamProgress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.progress.close(ok=exc_type is None)

    def add(self, batch: dict[str, np.ndarray], finished_partitions: int) -> None:
        decisions = batch["decision"]
        self.counts["items"] += len(decisions)
        for outcome, key in ((FAILED, "failed"), (KEEP, "kept"), (REMOVE, "removed")):
            if key in self.counts:
                self.counts[key] += int((decisions == outcome).sum())
        self.progress.update(len(decisions) if self.by_images else finished_partitions, **self.counts)


def _sum_counts(counts: list[dict], names: list[str]) -> dict:
    total = {k: sum(c.get(k, 0) for c in counts) for k in ("items", "kept", "removed", "failed", "files",
                                                          "failed_files")}
    total["fired"] = {n: sum(c["fired"].get(n, 0) for c in counts) for n in names}
    total["partitions"] = len(counts)
    return total


def curate(cfg: RunConfig) -> dict:
    """The main job: fit (or reuse) detectors, decide thresholds, stream, write, track; under a
    lease on the run directory, so overlapping runs cannot corrupt each other."""
    started = time.perf_counter()
    check_paths_for_ray_job(cfg)
    tracking.check_reachable(cfg.tracking.uri)
    cfg = registry.resolve(cfg)  # aliases -> versions once, for the whole run
    check_output_outside_source(cfg.source.uri, cfg.output.uri)
    storage.check_reachable(cfg.source.uri, cfg.source.storage_options)
    storage.check_reachable(cfg.output.uri, cfg.output.storage_options)
    run = RunDirectory(cfg.output.uri, cfg.run_name, cfg.output.storage_options)
    registry.check_run_dir(run, cfg)
    with RunLease(run, cfg.output.lease_ttl_s) as lease:  # before Ray starts: a refused run costs nothing
        start_ray(cfg)
        return _curate_leased(cfg, run, lease, started)


def _curate_leased(cfg: RunConfig, run: RunDirectory, lease: RunLease, started: float) -> dict:
    timings = {}
    finished = run.manifest()
    partitions, skipped = plan(cfg.source.uri, cfg.source.storage_options, cfg.source.format,
                               cfg.source.partition_size, finished)
    if not partitions and not finished:
        raise NoInputsError(f"source.uri {secrets.redact_text(cfg.source.uri)!r} holds no {cfg.source.format} inputs "
                            f"(skipped: {skipped or 'nothing'}); check source.uri and source.format")
    run.claim(cfg.decision_hash(), _loggable(cfg))
    run.remove_unfinished_outputs(finished)
    log.info("%d partitions to do, %d already finished", len(partitions), len(finished))
    if skipped:
        log.warning("source entries skipped (not inputs of format %r): %s", cfg.source.format, skipped)

    tick = time.perf_counter()
    artifacts, reused = fitted_detectors(cfg)
    timings["fit_s"] = time.perf_counter() - tick
    tick = time.perf_counter()
    thresholds = resolve_thresholds(cfg, run, partitions, artifacts)
    timings["thresholds_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    names = [d.label for d in cfg.detectors]
    scores = {n: [] for n in names}
    collector, jobs = PartitionCollector(partitions), []
    write_args = (cfg.source, names, cfg.output.store_embeddings)
    values = {n: t["threshold"] for n, t in thresholds.items()}
    with StreamProgress("curating", partitions) as progress:
        for batch in ray_data.stream(partitions, cfg.source, cfg.model, cfg.compute, artifacts,
                                     values, preprocess_of(cfg)):
            for n in names:
                scores[n].append(batch[f"score_{n}"][batch["decision"] != FAILED])
            completed = 0
            for partition, results in collector.add(batch):
                _check_lease(lease)
                jobs.append((partition, ray_data.submit(write_partition, run, partition, results, *write_args)))
                completed += 1
            progress.add(batch, completed)
    dim = load_artifacts(artifacts[:1])[0].dim_ if artifacts else 0
    for partition, results in collector.unseen(dim, names):
        jobs.append((partition, ray_data.submit(write_partition, run, partition, results, *write_args)))
    counts, unfinished = _finished_and_unfinished(jobs)
    timings["stream_and_write_s"] = time.perf_counter() - tick
    timings["total_s"] = time.perf_counter() - started

    this_run = _sum_counts(counts, names)
    # under the lease no other run records partitions: the manifest read at start plus this run's
    total = _sum_counts([record["counts"] for record in finished.values()] + counts, names)
    summary = {
        "run_name": cfg.run_name, "run_dir": run.uri, "decision_hash": cfg.decision_hash(),
        "model": model_identity(cfg.model), "thresholds": thresholds, "detectors_reused": reused,
        "registered": registry.pinned(cfg),
        "skipped": skipped, "unfinished": unfinished, "this_run": this_run, "total": total,
        "throughput_items_per_s": this_run["items"] / timings["stream_and_write_s"] if this_run["items"] else 0.0,
        "timings": timings,
    }
    return _write_and_track(cfg, run, summary, artifacts,
                            {n: np.concatenate(v) if v else np.zeros(0) for n, v in scores.items()})


def _loggable(cfg: RunConfig) -> dict:
    """The config as data with secrets redacted (secret keys, URI passwords, secret query
    parameters): safe for MLflow, logs and _config.json. Hashes use the real config."""
    return secrets.redact(to_dict(cfg))


def _write_and_track(cfg: RunConfig, run: RunDirectory, summary: dict, artifacts, scores) -> dict:
    """summary.json first, so the outputs are complete whatever MLflow does; then the MLflow run,
    and summary.json again with its outcome: `tracking` {"status": "ok", "run_id"} or
    {"status": "failed", "error"} (the job still returns; the CLI exits non-zero), `mlflow_run_id`.
    The audit report (report/) is built in between, from the files written: `report` records
    {"status": "ok", ...} or {"status": "failed", "error"}; a failed report never fails the run."""
    from curation.report import try_build

    summary = secrets.redact(summary, keys=False)  # URIs in run_dir / rescored_from
    run.write_json(summary | {"tracking": {"status": "pending"}, "mlflow_run_id": None}, "summary.json")
    summary["report"] = try_build(run, cfg.source)
    try:
        run_id = _track_curate(cfg, summary, artifacts, scores)
        summary["tracking"] = {"status": "ok", "run_id": run_id}
    except Exception as e:  # noqa: BLE001 - any tracking fault is recorded, outputs stand
        run_id, error = None, secrets.redact_text(f"{type(e).__name__}: {e}")
        log.error("MLflow tracking at %s failed; the outputs in %s are complete and summary.json "
                  "records the failure: %s", secrets.redact_text(tracking.resolve_tracking_uri(cfg.tracking.uri)),
                  summary["run_dir"], error)
        summary["tracking"] = {"status": "failed", "error": error}
    summary["mlflow_run_id"] = run_id
    run.write_json(summary, "summary.json")
    return summary


# -- tracking ----------------------------------------------------------------------------------
def _detector_dirs(artifacts, into: Path) -> dict[str, Path]:
    dirs = {}
    for files in artifacts:
        name = json.loads(files["detector.json"])["name"]
        dirs[name] = into / name
        dirs[name].mkdir(parents=True)
        for file, data in files.items():
            (dirs[name] / file).write_bytes(data)
    return dirs


def _detector_params(artifacts) -> dict:
    """Per detector: kind, side, hyper-parameters and corpus provenance (not the word lists)."""
    out = {}
    for files in artifacts:
        meta = json.loads(files["detector.json"])
        provenance = {k: v for k, v in meta["provenance"].items() if k != "negative_labels"}
        out[meta["name"]] = {"kind": meta["kind"], "side": meta["side"], "n_task_texts": len(meta["task_texts"]),
                             "params": meta["params"], "provenance": provenance}
    return out


def _track_curate(cfg: RunConfig, summary: dict, artifacts, scores: dict[str, np.ndarray]) -> str:
    from curation.tracking import Tracker, flatten

    tags = {"job": "curate"} | registry.run_tags(cfg)
    with Tracker(cfg.tracking.uri, cfg.tracking.experiment, cfg.run_name, tags=tags) as tracker:
        tracker.log_params(flatten({"config": _loggable(cfg), "model_identity": summary["model"],
                                    "detector": _detector_params(artifacts)}))
        metrics = {f"threshold.{n}": t["threshold"] for n, t in summary["thresholds"].items()}
        for scope in ("this_run", "total"):
            counts = summary[scope]
            metrics |= {f"{scope}.{k}": counts[k] for k in ("items", "kept", "removed", "failed", "partitions")}
            metrics |= {f"{scope}.fired.{n}": v for n, v in counts["fired"].items()}
            decided = counts["kept"] + counts["removed"]
            metrics |= {f"{scope}.removal_rate": counts["removed"] / decided if decided else 0.0}
            metrics |= {f"{scope}.removal_rate.{n}": v / decided if decided else 0.0 for n, v in counts["fired"].items()}
        metrics |= {f"timing.{k}": v for k, v in summary["timings"].items()}
        metrics["throughput_items_per_s"] = summary["throughput_items_per_s"]
        tracker.log_metrics(metrics)
        tracker.log_score_histograms(scores, {n: t["threshold"] for n, t in summary["thresholds"].items()})
        with tempfile.TemporaryDirectory() as tmp:
            for name, path in _detector_dirs(artifacts, Path(tmp)).items():
                tracker.log_artifacts(str(path), f"detectors/{name}")
        if summary["report"]["status"] == "ok":
            from curation.report import mlflow_copy

            run = RunDirectory(cfg.output.uri, cfg.run_name, cfg.output.storage_options)
            with tempfile.TemporaryDirectory() as tmp:
                tracker.log_artifacts(mlflow_copy(run, Path(tmp)), "report")
        tracker.log_dict(summary, "summary.json")
        return tracker.run_id


# -- train / rescore / evaluate ----------------------------------------------------------------
def train(cfg: RunConfig) -> dict:
    """Fit the configured detectors only; artifacts to the cache, the run directory and MLflow,
    where each becomes a new version of a registered model (`registry.register`)."""
    from curation.tracking import Tracker, flatten

    registry.refuse_registered(cfg)
    tracking.check_reachable(cfg.tracking.uri)
    start_ray(cfg)
    tick = time.perf_counter()
    artifacts, reused = fitted_detectors(cfg)
    run = RunDirectory(cfg.output.uri, cfg.run_name, cfg.output.storage_options)
    for files in artifacts:
        name = json.loads(files["detector.json"])["name"]
        for file, data in files.items():
            storage.write_bytes(run.path("detectors", name, file), data, run.options)
    with Tracker(cfg.tracking.uri, cfg.tracking.experiment, cfg.run_name, tags={"job": "train"}) as tracker:
        tracker.log_params(flatten({"config": _loggable(cfg), "model_identity": model_identity(cfg.model),
                                    "detector": _detector_params(artifacts)}))
        tracker.log_metrics({"timing.fit_s": time.perf_counter() - tick})
        with tempfile.TemporaryDirectory() as tmp:
            for name, path in _detector_dirs(artifacts, Path(tmp)).items():
                tracker.log_artifacts(str(path), f"detectors/{name}")
        run_id = tracker.run_id
        registered = registry.register(cfg, artifacts, _detector_params(artifacts), run_id)
    return {"detectors": run.path("detectors"), "reused": reused, "mlflow_run_id": run_id, "registered": registered}


def stored_results(previous: RunDirectory, pid: str) -> dict[str, np.ndarray]:
    """A finished partition's rows rebuilt from its scores/ and failed/ files (embeddings included)."""
    scored = read_parquet_table(previous.path("scores", f"{pid}.parquet"), previous.options)
    failed = read_parquet_table(previous.path("failed", f"{pid}.parquet"), previous.options)
    if "embedding" not in scored.column_names:
        raise ValueError(f"{previous.uri}/scores holds no embeddings: run curate with output.store_embeddings=true")
    n_ok, n_bad = scored.num_rows, failed.num_rows
    dim = scored.schema.field("embedding").type.list_size
    embedding = np.asarray(scored.column("embedding").combine_chunks().flatten(), np.float32).reshape(n_ok, dim)
    column = lambda name: np.array(scored.column(name).to_pylist() + failed.column(name).to_pylist(), dtype=object)
    return {"id": column("id"), "source": column("source"),
            "position": np.array(scored.column("position").to_pylist() + failed.column("position").to_pylist()),
            "error_kind": np.array([""] * n_ok + failed.column("error_kind").to_pylist(), dtype=object),
            "error_message": np.array([""] * n_ok + failed.column("message").to_pylist(), dtype=object),
            "whole_file": np.array([False] * n_ok + (failed.column("whole_file").to_pylist()
                                                     if "whole_file" in failed.column_names else [False] * n_bad)),
            "embedding": np.concatenate([embedding, np.zeros((n_bad, dim), np.float32)])}


def rescore(cfg: RunConfig, scores_uri: str) -> dict:
    """Apply the configured detectors and thresholds to the embeddings a previous run stored:
    no CLIP forward pass. Writes a full run directory (kept/removed/scores/failed) for `cfg`."""
    from curation.pipeline.score import decide

    tick = time.perf_counter()
    tracking.check_reachable(cfg.tracking.uri)
    cfg = registry.resolve(cfg)
    previous = RunDirectory(scores_uri, "", cfg.output.storage_options)
    owner = previous.read_json("_config.json")
    if owner is None:
        raise FileNotFoundError(f"{scores_uri} is not a curate run directory (no _config.json)")
    previous_model = model_identity(ModelConfig(**owner["config"]["model"]))
    if previous_model != model_identity(cfg.model):
        raise ValueError(f"{scores_uri} stored embeddings of {previous_model}, the config uses "
                         f"{model_identity(cfg.model)}: detectors must be fitted for the same model")
    start_ray(cfg)
    artifacts, _ = fitted_detectors(cfg)
    detectors, names = load_artifacts(artifacts), [d.label for d in cfg.detectors]
    records = previous.manifest()
    partitions = {pid: Partition(pid, r["partition"]["format"], tuple(r["partition"]["inputs"])) for pid, r in records.items()}
    stored = {pid: stored_results(previous, pid) for pid in partitions}
    thresholds = _rescore_thresholds(cfg, detectors, stored, artifacts)
    run = RunDirectory(cfg.output.uri, cfg.run_name, cfg.output.storage_options)
    registry.check_run_dir(run, cfg)
    values = {n: t["threshold"] for n, t in thresholds.items()}
    with RunLease(run, cfg.output.lease_ttl_s):
        run.claim(cfg.decision_hash(), _loggable(cfg))
        jobs = []
        for pid, results in stored.items():
            results |= decide(results["embedding"], results["error_kind"] == "", detectors, values)
            jobs.append((partitions[pid], ray_data.submit(write_partition, run, partitions[pid], results, cfg.source,
                                                          names, cfg.output.store_embeddings)))
        counts, unfinished = _finished_and_unfinished(jobs)
        this_run = _sum_counts(counts, names)
        summary = {"run_name": cfg.run_name, "run_dir": run.uri, "rescored_from": scores_uri,
                   "model": previous_model, "thresholds": thresholds, "unfinished": unfinished,
                   "this_run": this_run, "total": this_run,
                   "throughput_items_per_s": this_run["items"] / (time.perf_counter() - tick),
                   "timings": {"total_s": time.perf_counter() - tick}, "detectors_reused": {},
                   "registered": registry.pinned(cfg)}
        scores = {n: np.concatenate([r[f"score_{n}"][r["error_kind"] == ""] for r in stored.values()]) if stored
                  else np.zeros(0) for n in names}
        return _write_and_track(cfg, run, summary, artifacts, scores)


def _rescore_thresholds(cfg: RunConfig, detectors, stored: dict, artifacts) -> dict:
    """fixed as configured; quantile over all stored embeddings; tpr from the labelled images."""
    out = {}
    embeddings = [r["embedding"][r["error_kind"] == ""] for r in stored.values()]
    all_embeddings = np.concatenate(embeddings) if embeddings else np.zeros((0, detectors[0].dim_), np.float32)
    for det_cfg, detector in zip(cfg.detectors, detectors):
        rule = det_cfg.threshold
        if rule.strategy == "quantile":
            check_calibration_sample(cfg, det_cfg, len(all_embeddings), 0, "the stored embeddings")
            out[det_cfg.label] = rule_threshold(rule, detector.score(all_embeddings))
        elif rule.strategy == "fixed":
            out[det_cfg.label] = rule_threshold(rule)
    tpr = [d for d in cfg.detectors if d.threshold.strategy == "tpr"]
    return out | (_tpr_thresholds(cfg, tpr, artifacts) if tpr else {})


def evaluate(cfg: RunConfig) -> dict:
    """Labelled wanted/unwanted images -> per detector AUROC and FPR@95%TPR (unwanted = positive,
    and the ID-positive direction of the NegLabel tables), the threshold's precision/recall."""
    from curation.metrics import auroc, fpr_at_tpr
    from curation.tracking import Tracker, flatten

    ev = cfg.evaluation
    if not (ev.wanted_uri and ev.unwanted_uri):
        raise ValueError("evaluate needs evaluation.wanted_uri and evaluation.unwanted_uri")
    tracking.check_reachable(cfg.tracking.uri)
    cfg = registry.resolve(cfg)
    start_ray(cfg)
    artifacts, _ = fitted_detectors(cfg)
    wanted = score_image_set(cfg, ev.wanted_uri, ev.format, ev.storage_options, artifacts, "scoring wanted images")
    unwanted = score_image_set(cfg, ev.unwanted_uri, ev.format, ev.storage_options, artifacts,
                               "scoring unwanted images")
    report, all_scores = {}, {}
    for det in cfg.detectors:
        w, u = wanted[f"score_{det.label}"], unwanted[f"score_{det.label}"]
        scores, labels = np.concatenate([w, u]), np.r_[np.zeros(len(w)), np.ones(len(u))]
        all_scores[det.label] = scores
        threshold = rule_threshold(det.threshold, scores, w)["threshold"]
        flagged = scores >= threshold
        report[det.label] = {
            "auroc": auroc(scores, labels), "fpr95": fpr_at_tpr(scores, labels, 0.95),
            "fpr95_wanted_positive": fpr_at_tpr(-scores, 1 - labels, 0.95),
            "n_wanted": int(len(w)), "n_unwanted": int(len(u)),
            "threshold": threshold,
            "precision": float(labels[flagged].mean()) if flagged.any() else 0.0,
            "recall": float(flagged[labels == 1].mean()),
            "failed_wanted": wanted["failed"], "failed_unwanted": unwanted["failed"],
        }
    run = RunDirectory(cfg.output.uri, cfg.run_name, cfg.output.storage_options)
    run.write_json(report, "evaluation.json")
    tags = {"job": "evaluate"} | registry.run_tags(cfg)
    with Tracker(cfg.tracking.uri, cfg.tracking.experiment, cfg.run_name, tags=tags) as tracker:
        tracker.log_params(flatten({"config": _loggable(cfg), "model_identity": model_identity(cfg.model),
                                    "detector": _detector_params(artifacts)}))
        tracker.log_metrics({f"{name}.{k}": v for name, r in report.items() for k, v in r.items()
                             if isinstance(v, (int, float))})
        tracker.log_roc_curves(all_scores, np.r_[np.zeros(len(w)), np.ones(len(u))])
        tracker.log_score_histograms(all_scores, {n: r["threshold"] for n, r in report.items()})
        tracker.log_dict(report, "evaluation.json")
    registry.attach_evaluation(cfg, report, tracker.run_id)
    return report
