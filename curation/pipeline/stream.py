"""The image stream as the jobs consume it: partitions counted to completion, progress, writer
results and counts, and scoring image sets without deciding (calibration and evaluation).

Rows (or, in curate, the writing stage's counts) arrive in any order across partitions; a
partition is complete when as many rows arrived as the `n_items` of its last block says (earlier
blocks carry -1: the reader streams a file and learns its total only at the end).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from curation.config import RunConfig
from curation.pipeline import ray_data
from curation.pipeline.plan import Partition, PlannedPartition, make_partitions, relative_inputs
from curation.pipeline.write import FAILED, KEEP, REMOVE
from curation.progress import Progress

log = logging.getLogger("curation")
NEVER = float("inf")  # threshold that never fires: used while only scores are wanted


def preprocess_of(cfg: RunConfig) -> tuple[int, tuple, tuple]:
    from curation.pipeline.decode import preprocess_config

    return preprocess_config(cfg.model.name, cfg.model.pretrained)


def score_partitions(cfg: RunConfig, partitions: list[Partition], artifacts, source=None,
                     what: str = "scoring images") -> dict[str, np.ndarray]:
    """Scores of every decodable item in `partitions` of `source` (default: the run's source);
    no decisions, nothing written, no row kept beyond its scores. Progress reported as `what`."""
    source = source or cfg.source
    names = [det.label for det in cfg.detectors]
    never = dict.fromkeys(names, NEVER)
    scores, failed, counter = {n: [] for n in names}, 0, PartitionCounter()
    with StreamProgress(what, partitions, decided=False) as progress:
        for batch in ray_data.stream(partitions, source, cfg.model, cfg.compute, artifacts, never, preprocess_of(cfg)):
            ok = batch["decision"] != FAILED
            for n in names:
                scores[n].append(batch[f"score_{n}"][ok])
            failed += int((~ok).sum())
            progress.add(batch, len(counter.add(batch)))
    return {f"score_{n}": np.concatenate(v) if v else np.zeros(0, np.float32) for n, v in scores.items()} | {
        "failed": failed}


def score_image_set(cfg: RunConfig, uri: str, fmt: str, options: dict, artifacts,
                    what: str = "scoring images") -> dict[str, np.ndarray]:
    source = dataclasses.replace(cfg.source, uri=uri, format=fmt, storage_options=options)
    partitions = make_partitions(relative_inputs(uri, options, fmt), fmt, cfg.source.partition_size)
    if not partitions:
        raise ValueError(f"no {fmt} inputs found under {uri}")
    return score_partitions(cfg, partitions, artifacts, source, what)


class PartitionCounter:
    """How many rows of each partition arrived and, once its last block did, how many it has:
    a partition is complete without anyone keeping its rows."""

    def __init__(self):
        self.seen: dict[str, int] = {}
        self.totals: dict[str, int] = {}

    def add_rows(self, pid: str, rows: int, n_items: int) -> bool:
        """`rows` more rows of `pid`, with the largest `n_items` among them (-1: not its last
        block); returns whether the partition is now complete."""
        self.seen[pid] = self.seen.get(pid, 0) + rows
        if n_items >= 0:
            self.totals[pid] = n_items
        return self.seen[pid] == self.totals.get(pid)

    def incomplete(self) -> list[dict]:
        """{partition, reason} of partitions with rows that never completed (rows lost or
        delivered twice by the stream): left for the next run, never silently dropped."""
        return [{"partition": pid, "reason": f"the stream delivered {seen} rows of "
                                              f"{self.totals.get(pid, 'an unknown number')}; the next run redoes it"}
                for pid, seen in sorted(self.seen.items()) if seen != self.totals.get(pid)]

    def add(self, batch: dict[str, np.ndarray]) -> list[str]:
        """Count a batch's rows; returns the partitions it completed."""
        pids, inverse = np.unique(batch["partition"], return_inverse=True)
        return [pid for i, pid in enumerate(pids)
                if self.add_rows(pid, int((inverse == i).sum()), int(batch["n_items"][inverse == i].max()))]


class StreamProgress:
    """Progress of an image stream. Image folders: images done against the file count. Parquet
    and WebDataset items are counted only once read: partitions done against the total, items
    as an extra. Kept/removed/failed so far (only failed while scoring: nothing is decided)."""

    def __init__(self, what: str, partitions: list, decided: bool = True):
        """`partitions`: `Partition`s or `PlannedPartition`s (both have a size)."""
        self.by_images = bool(partitions) and all(p.format == "images" for p in partitions)
        total, unit = ((sum(p.size for p in partitions), "images") if self.by_images
                       else (len(partitions), "partitions"))
        self.counts = dict.fromkeys(("items", "kept", "removed", "failed") if decided else ("items", "failed"), 0)
        self.progress = Progress(what, total, unit, **self.counts)

    def __enter__(self) -> "StreamProgress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.progress.close(ok=exc_type is None)

    def add(self, batch: dict[str, np.ndarray], finished_partitions: int) -> None:
        decisions = batch["decision"]
        self.add_counts({"rows": len(decisions), **{key: int((decisions == outcome).sum()) for outcome, key in
                                                    ((FAILED, "failed"), (KEEP, "kept"), (REMOVE, "removed"))}},
                        finished_partitions)

    def add_counts(self, counts: dict, finished_partitions: int) -> None:
        """`counts`: rows and kept/removed/failed of some rows (what the writing stage reports)."""
        self.counts["items"] += counts["rows"]
        for key in ("kept", "removed", "failed"):
            if key in self.counts:
                self.counts[key] += counts[key]
        self.progress.update(counts["rows"] if self.by_images else finished_partitions, **self.counts)


def wait_for_writers(jobs: list[tuple[PlannedPartition, object]]) -> tuple[list[dict], list[dict]]:
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
