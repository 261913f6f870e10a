"""Fitting detectors that encode one corpus: chained (`cache.fit_chains`, the job's way) against
all at once (the job before it), from a cold text cache.

`configs/demo.yaml`'s two NegLabels encode the same WordNet candidates with the same prompts.
"parallel" starts every fit at once, each in its own Ray Task: each misses the empty cache and
encodes every shard. "chained" is `fitted_detectors`: the second fit reads the first's shards.
Each variant gets its own empty cache; "chained" runs first, so what warms up (Ray's workers, the
model in them) favours the baseline. Both must produce byte-identical artifacts.

    python benchmarks/detector_fit.py [--config configs/demo.yaml]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from _common import write
from curation.config import load_config
from curation.detectors import cache

ROOT = Path(__file__).resolve().parents[1]


def fit_all_at_once(cfg) -> list[dict[str, bytes]]:
    """Every detector its own chain: all fits start together, as the job did before chaining."""
    fitted = dict(cache.fit_in_chains(cfg, [[i] for i in range(len(cfg.detectors))]))
    return [fitted[i] for i in range(len(cfg.detectors))]


def timed(fn, cfg) -> tuple[list[dict[str, bytes]], float]:
    start = time.perf_counter()
    artifacts = fn(cfg)
    return artifacts, time.perf_counter() - start


def main() -> None:
    import ray

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    args = parser.parse_args()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as chained_cache, tempfile.TemporaryDirectory() as parallel_cache:
        chained, chained_s = timed(lambda c: cache.fitted_detectors(c)[0],
                                   load_config(args.config, [f"cache_dir={chained_cache}"]))
        parallel_cfg = load_config(args.config, [f"cache_dir={parallel_cache}"])
        parallel, parallel_s = timed(fit_all_at_once, parallel_cfg)
    assert chained == parallel, "chained and parallel fits disagree"
    write("detector_fit", {
        "config": os.path.relpath(args.config, ROOT),
        "detectors": [f"{d.kind}:{d.label}" for d in parallel_cfg.detectors],
        "chains": cache.fit_chains(parallel_cfg.detectors),
        "parallel_cold_s": round(parallel_s, 1), "chained_cold_s": round(chained_s, 1),
        "speedup": round(parallel_s / chained_s, 2),
    })


if __name__ == "__main__":
    main()
