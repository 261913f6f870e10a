"""The jobs: train detectors, curate a dataset, rescore stored embeddings, evaluate on labelled
images. Each is a function of a validated `RunConfig`; the CLI and `jobs/*.py` are thin shells.

The steps they share live where each idea does: detector artifacts in `detectors.cache`,
thresholds in `thresholds`, the stream and its counts in `pipeline.stream`, outputs in
`pipeline.write`, preflight checks in `preflight`, MLflow in `tracking`.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from curation import registry, secrets, storage, tracking
from curation.config import RunConfig, to_dict
from curation.detectors.cache import fitted_detectors, load_artifacts
from curation.metrics import merge_histogram_payload, score_histograms
from curation.models import ModelConfig, model_identity
from curation.pipeline import ray_data
from curation.pipeline.lease import RunLease, RunLockedError
from curation.pipeline.plan import ManifestLayoutError, RunDirectory, plan, sum_counts
from curation.pipeline.stream import PartitionCounter, StreamProgress, preprocess_of, score_image_set, wait_for_writers
from curation.pipeline.write import finish_partition
from curation.preflight import check_output_outside_source, check_paths_for_ray_job, start_ray
from curation.progress import Progress
from curation.thresholds import rescore_thresholds, resolve_thresholds, rule_threshold
from curation.tracking import detector_params, log_detectors

log = logging.getLogger("curation")

# -- curate ------------------------------------------------------------------------------------
class NoInputsError(FileNotFoundError):
    """A first run found nothing to curate: a wrong URI or format, not a success."""


def _check_lease(lease: RunLease) -> None:
    if lease.lost:
        raise RunLockedError(f"{lease.run.uri}: the lease was taken over by another run (this one was presumed "
                             "dead); stopping before recording more partitions")


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
    # under the lease, before any worker of this run starts: planning deletes leftovers of
    # killed runs and compacts the manifest, in a directory an earlier run of this config claimed
    # (one that no run claimed yet holds nothing of ours: nothing in it is deleted)
    owned = run.check_owner(cfg.decision_hash())
    if owned:
        run.remove_stale_work()
        run.migrate_flat_manifest()
    work = plan(run, cfg.source.uri, cfg.source.storage_options, cfg.source.format, cfg.source.partition_size,
                clean=owned)
    partitions, skipped = work.partitions, work.skipped
    if not partitions and not work.finished:
        raise NoInputsError(f"source.uri {secrets.redact_text(cfg.source.uri)!r} holds no {cfg.source.format} inputs "
                            f"(skipped: {skipped or 'nothing'}); check source.uri and source.format")
    run.claim(cfg.decision_hash(), _loggable(cfg))
    if owned:
        run.remove_unvouched_tables(work.finished)
    log.info("%d partitions to do, %d already finished", len(partitions), len(work.finished))
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
    values = {n: t["threshold"] for n, t in thresholds.items()}
    dim = load_artifacts(artifacts[:1])[0].dim_ if artifacts else 0
    finish_args = (cfg.source, names, cfg.output.store_embeddings, dim)
    histograms, counter, jobs = score_histograms(values), PartitionCounter(), []
    by_id = {p.id: p for p in partitions}
    with StreamProgress("curating", partitions) as progress:
        # rows are spooled where they were scored; the driver sees counts and starts a partition's
        # writer once all its rows are spooled
        for pid, counts in ray_data.spooled_stream(partitions, cfg.source, cfg.model, cfg.compute, artifacts,
                                                   values, preprocess_of(cfg), run):
            merge_histogram_payload(histograms, counts["histograms"])
            complete = counter.add_rows(pid, counts["rows"], counts["n_items"])
            if complete:
                _check_lease(lease)
                jobs.append((by_id[pid], ray_data.submit(finish_partition, run, by_id[pid], *finish_args,
                                                         counter.totals[pid])))
            progress.add_counts(counts, int(complete))
    for partition in (p for p in partitions if p.id not in counter.seen):  # no rows at all: empty files
        jobs.append((partition, ray_data.submit(finish_partition, run, partition, *finish_args, 0)))
    counts, unfinished = wait_for_writers(jobs)
    unfinished += counter.incomplete()
    timings["stream_and_write_s"] = time.perf_counter() - tick
    timings["total_s"] = time.perf_counter() - started

    this_run = sum_counts(counts, names)
    # under the lease no other run records partitions: the manifest read at start plus this run's
    total = sum_counts([work.finished_counts] + counts, names)
    summary = {
        "run_name": cfg.run_name, "run_dir": run.uri, "decision_hash": cfg.decision_hash(),
        "model": model_identity(cfg.model), "thresholds": thresholds, "detectors_reused": reused,
        "registered": registry.pinned(cfg),
        "skipped": skipped, "unfinished": unfinished, "this_run": this_run, "total": total,
        "throughput_items_per_s": this_run["items"] / timings["stream_and_write_s"] if this_run["items"] else 0.0,
        "timings": timings,
    }
    return _write_and_track(cfg, run, summary, artifacts, histograms)


def _loggable(cfg: RunConfig) -> dict:
    """The config as data with secrets redacted (secret keys, URI passwords, secret query
    parameters): safe for MLflow, logs and _config.json. Hashes use the real config."""
    return secrets.redact(to_dict(cfg))


def _write_and_track(cfg: RunConfig, run: RunDirectory, summary: dict, artifacts, histograms: dict) -> dict:
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
        run_id = _track_curate(cfg, summary, artifacts, histograms)
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
def _track_curate(cfg: RunConfig, summary: dict, artifacts, histograms: dict) -> str:
    from curation.tracking import Tracker, flatten

    tags = {"job": "curate"} | registry.run_tags(cfg)
    with Tracker(cfg.tracking.uri, cfg.tracking.experiment, cfg.run_name, tags=tags) as tracker:
        tracker.log_params(flatten({"config": _loggable(cfg), "model_identity": summary["model"],
                                    "detector": detector_params(artifacts)}))
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
        tracker.log_score_histograms(histograms, {n: t["threshold"] for n, t in summary["thresholds"].items()})
        log_detectors(tracker, artifacts)
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
                                    "detector": detector_params(artifacts)}))
        tracker.log_metrics({"timing.fit_s": time.perf_counter() - tick})
        log_detectors(tracker, artifacts)
        run_id = tracker.run_id
        registered = registry.register(cfg, artifacts, detector_params(artifacts), run_id)
    return {"detectors": run.path("detectors"), "reused": reused, "mlflow_run_id": run_id, "registered": registered}


def rescore(cfg: RunConfig, scores_uri: str) -> dict:
    """Apply the configured detectors and thresholds to the embeddings a previous run stored:
    no CLIP forward pass. Writes a full run directory (kept/removed/scores/failed) for `cfg`: a
    Ray Data pipeline over the stored partitions, each decided and written where it is read."""
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
    keys = previous.unit_keys()
    if "" in keys:
        raise ManifestLayoutError(f"{scores_uri}: its manifest has the flat layout of an earlier version; run "
                                  "`curation curate` with its config once (it refiles the manifest per folder), then "
                                  "rescore")
    start_ray(cfg)
    artifacts, _ = fitted_detectors(cfg)
    names = [d.label for d in cfg.detectors]
    partitions = [(key, pid) for key in keys for pid in sorted(previous.unit_records(key))]
    thresholds = rescore_thresholds(cfg, load_artifacts(artifacts), previous, [pid for _, pid in partitions],
                                    artifacts)
    run = RunDirectory(cfg.output.uri, cfg.run_name, cfg.output.storage_options)
    registry.check_run_dir(run, cfg)
    values = {n: t["threshold"] for n, t in thresholds.items()}
    with RunLease(run, cfg.output.lease_ttl_s) as lease:
        run.claim(cfg.decision_hash(), _loggable(cfg))
        counts, unfinished, histograms = [], [], score_histograms(values)
        with Progress("rescoring stored partitions", len(partitions), "partitions") as progress:
            for pid, outcome in ray_data.rescore_stream(partitions, previous, run, cfg.source, cfg.compute, artifacts,
                                                        values, names, cfg.output.store_embeddings):
                _check_lease(lease)
                if "unfinished" in outcome:
                    unfinished.append({"partition": pid, "reason": outcome["unfinished"]})
                else:
                    merge_histogram_payload(histograms, outcome.pop("histograms"))
                    counts.append(outcome)
                progress.update(1, unfinished=len(unfinished))
        this_run = sum_counts(counts, names)
        summary = {"run_name": cfg.run_name, "run_dir": run.uri, "rescored_from": scores_uri,
                   "model": previous_model, "thresholds": thresholds, "unfinished": unfinished,
                   "this_run": this_run, "total": this_run,
                   "throughput_items_per_s": this_run["items"] / (time.perf_counter() - tick),
                   "timings": {"total_s": time.perf_counter() - tick}, "detectors_reused": {},
                   "registered": registry.pinned(cfg)}
        return _write_and_track(cfg, run, summary, artifacts, histograms)


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
                                    "detector": detector_params(artifacts)}))
        tracker.log_metrics({f"{name}.{k}": v for name, r in report.items() for k, v in r.items()
                             if isinstance(v, (int, float))})
        tracker.log_roc_curves(all_scores, np.r_[np.zeros(len(w)), np.ones(len(u))])
        tracker.log_score_histograms(all_scores, {n: r["threshold"] for n, r in report.items()})
        tracker.log_dict(report, "evaluation.json")
    registry.attach_evaluation(cfg, report, tracker.run_id)
    return report
