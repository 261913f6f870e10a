"""A finished curate run directory written without Ray or a model (a helper module: no tests here).

The run's own writer (`write_partition`) writes kept/, removed/, scores/, failed/ and the manifest
from seeded random scores over real image files, and summary.json and _config.json are recorded
as `workflow` records them; so the report and the benchmark see the layout of a real run at any
size, in seconds. Thresholds must be `fixed` (nothing is calibrated).
"""

from __future__ import annotations

import numpy as np

from curation import secrets
from curation.config import RunConfig, to_dict
from curation.pipeline.plan import RunDirectory, make_partitions, relative_inputs
from curation.pipeline.write import FAILED, KEEP, REMOVE, write_partition

EMBEDDING_DIM = 8


def _results(names: list[str], cfg: RunConfig, rng: np.random.Generator, failures: dict) -> dict:
    """A partition's result columns, as the stream hands them to the writer."""
    bad = np.array([name in failures for name in names], bool)
    results = {"id": np.array(names, dtype=object), "position": np.arange(len(names)),
               "source": np.array([f"{cfg.source.uri}/{name}" for name in names], dtype=object),
               "error_kind": np.array([failures.get(n, ("", ""))[0] for n in names], dtype=object),
               "error_message": np.array([failures.get(n, ("", ""))[1] for n in names], dtype=object),
               "whole_file": np.zeros(len(names), bool),
               "embedding": rng.normal(size=(len(names), EMBEDDING_DIM)).astype(np.float32)}
    fired = [[] for _ in names]
    for det in cfg.detectors:
        scores = rng.beta(2, 5, len(names)).astype(np.float32)
        scores[bad] = np.nan
        results[f"score_{det.label}"] = scores
        for i in np.flatnonzero(~bad & (scores >= det.threshold.value)):
            fired[i].append(det.label)
    results["decision"] = np.array([FAILED if b else REMOVE if f else KEEP for b, f in zip(bad, fired)], dtype=object)
    results["fired"] = np.array([",".join(f) for f in fired], dtype=object)
    return results


def write_run(cfg: RunConfig, failures: dict[str, tuple[str, str]] | None = None, seed: int = 0) -> RunDirectory:
    """Write the run directory of `cfg` over its image-file source: every input decided with random
    Beta(2, 5) scores per detector, except `failures` (relative name -> (error kind, message))."""
    assert cfg.source.format == "images" and all(d.threshold.strategy == "fixed" for d in cfg.detectors)
    failures, rng = failures or {}, np.random.default_rng(seed)
    run = RunDirectory(cfg.output.uri, cfg.run_name, cfg.output.storage_options)
    run.claim(cfg.decision_hash(), secrets.redact(to_dict(cfg)))
    names = relative_inputs(cfg.source.uri, cfg.source.storage_options, "images")
    counts = [write_partition(run, partition, _results(list(partition.inputs), cfg, rng, failures), cfg.source,
                              [d.label for d in cfg.detectors], cfg.output.store_embeddings)
              for partition in make_partitions(names, "images", cfg.source.partition_size)]
    total = {k: sum(c[k] for c in counts) for k in ("items", "kept", "removed", "failed", "files", "failed_files")}
    total |= {"partitions": len(counts), "fired": {d.label: sum(c["fired"][d.label] for c in counts)
                                                   for d in cfg.detectors}}
    thresholds = {d.label: {"strategy": "fixed", "threshold": d.threshold.value} for d in cfg.detectors}
    run.write_json({"run_name": cfg.run_name, "run_dir": run.uri, "model": "synthetic", "thresholds": thresholds,
                    "this_run": total, "total": total}, "summary.json")
    return run
