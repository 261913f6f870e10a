"""Thresholds: a detector's rule (fixed, quantile of unlabelled data, TPR on labelled wanted
images) turned into a number, and how it was chosen. Data-derived thresholds are stored in the run
directory (`_thresholds.json`) and reused, so incremental runs decide with the same numbers.
"""

from __future__ import annotations

import numpy as np

from curation.config import DetectorConfig, RunConfig, ThresholdConfig
from curation.metrics import threshold_for_rate
from curation.pipeline.plan import Partition, PlannedPartition, RunDirectory, make_partitions
from curation.pipeline.stream import score_image_set, score_partitions


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


def calibration_partitions(cfg: RunConfig, run: RunDirectory, partitions: list[PlannedPartition],
                           sample_size: int) -> list[Partition]:
    """A deterministic spread-out sample: every k-th image file of the plan, else the first 4
    files. Only the plan files that hold a sampled name are read, 64 at a time, keeping only the
    sampled names."""
    if cfg.source.format != "images":
        return run.load_many(partitions[:4])
    ends = np.cumsum([p.size for p in partitions], dtype=np.int64)
    total = int(ends[-1]) if len(ends) else 0
    sampled = np.arange(0, total, max(1, total // sample_size))[:sample_size]
    owners = np.searchsorted(ends, sampled, side="right")
    needed, names = np.unique(owners), []
    for chunk in np.array_split(needed, max(1, -(-len(needed) // 64))):
        for index, partition in zip(chunk.tolist(), run.load_many([partitions[i] for i in chunk])):
            start = int(ends[index]) - partition.size
            names += [partition.inputs[position - start] for position in sampled[owners == index].tolist()]
    return make_partitions(names, "images", cfg.source.partition_size)


def resolve_thresholds(cfg: RunConfig, run: RunDirectory, partitions: list[PlannedPartition], artifacts) -> dict:
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
        scores = score_partitions(cfg, calibration_partitions(cfg, run, partitions, sample_size), artifacts,
                                  what="scoring a sample for quantile thresholds")
        for det in (d for d in pending if d.threshold.strategy == "quantile"):
            sample = scores[f"score_{det.label}"]
            check_calibration_sample(cfg, det, len(sample), scores["failed"], cfg.source.uri)
            result[det.label] = rule_threshold(det.threshold, sample)
    if any(d.threshold.strategy == "tpr" for d in pending):
        result.update(tpr_thresholds(cfg, [d for d in pending if d.threshold.strategy == "tpr"], artifacts))
    run.write_json(result, "_thresholds.json")
    return result


def tpr_thresholds(cfg: RunConfig, detectors: list[DetectorConfig], artifacts) -> dict:
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


def stored_sample(previous: RunDirectory, partition_ids: list[str], size: int, dim: int) -> np.ndarray:
    """Embeddings of decoded items from stored partitions taken in a seeded shuffled order until
    `size` rows: a sample spread over the run, read without loading every partition."""
    from curation.pipeline.write import read_partition_results

    order = np.random.default_rng(0).permutation(sorted(partition_ids)) if partition_ids else []
    chunks, rows = [], 0
    for pid in order:
        if rows >= size:
            break
        results = read_partition_results(previous, str(pid))
        chunks.append(results["embedding"][results["error_kind"] == ""])
        rows += len(chunks[-1])
    return np.concatenate(chunks)[:size] if chunks else np.zeros((0, dim), np.float32)


def rescore_thresholds(cfg: RunConfig, detectors, previous: RunDirectory, partition_ids: list[str],
                       artifacts) -> dict:
    """fixed as configured; quantile over a sample of the stored embeddings (up to the largest
    sample_size, as curate calibrates); tpr from the labelled images."""
    out = {}
    quantile = [d for d in cfg.detectors if d.threshold.strategy == "quantile"]
    sample = (stored_sample(previous, partition_ids, max(d.threshold.sample_size for d in quantile),
                            detectors[0].dim_) if quantile else None)
    for det_cfg, detector in zip(cfg.detectors, detectors):
        rule = det_cfg.threshold
        if rule.strategy == "quantile":
            check_calibration_sample(cfg, det_cfg, len(sample), 0, "the stored embeddings")
            out[det_cfg.label] = rule_threshold(rule, detector.score(sample[:rule.sample_size]))
        elif rule.strategy == "fixed":
            out[det_cfg.label] = rule_threshold(rule)
    tpr = [d for d in cfg.detectors if d.threshold.strategy == "tpr"]
    return out | (tpr_thresholds(cfg, tpr, artifacts) if tpr else {})
