"""Size and build time of the audit report (report/) for a 10k-image run, and its peak memory.

The run directory is synthesized, not curated: 10k JPEG files (benchmarks/curate_throughput's
generator: 64 distinct 256 px images repeated), 20 of them recorded as failed, and the run's own
writer (`write_partition`, via tests/synthetic_runs.py) writing kept/, removed/, scores/ (with
512-d embeddings, as a ViT-B run stores them), failed/ and the manifest from seeded Beta(2, 5)
scores of three detectors; curating 10k images with the tiny model would
take ~6 minutes on 2 cores and measure CLIP, not the report. The report is then built twice: with
the default sample (every row: exact table) and with a 2,000-row sample (the estimated path).
Each build runs in a fresh process, so its peak RSS is its own; a process that only imports the
same modules gives the baseline.

    python benchmarks/report_build.py [--images 10000] [--size 256]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "benchmarks")]

import synthetic_runs  # noqa: E402
from _common import peak_rss_mb, write  # noqa: E402
from curate_throughput import write_images  # noqa: E402

DETECTORS = ("detectors=[{kind: mcm, name: mcm, task_texts: [a, a2], threshold: {value: 0.5}}, "
             "{kind: mcm, name: neg, task_texts: [b, b2], threshold: {value: 0.55}}, "
             "{kind: mcm, name: hftt, task_texts: [c, c2], threshold: {value: 0.6}}]")


def folder_size(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def _imports_only() -> float:
    """Peak RSS (MB) of a fresh process that only imports what a build uses: the baseline."""
    import pyarrow.parquet  # noqa: F401
    from PIL import Image  # noqa: F401

    from curation import report  # noqa: F401
    return peak_rss_mb()


def _build(run_uri: str, source, limits: dict) -> dict:
    """One report build in a fresh process (its peak RSS is the build's alone)."""
    from curation import report
    from curation.pipeline.plan import RunDirectory

    run = RunDirectory(run_uri, "")
    started = time.perf_counter()
    outcome = report.build_report(run, source, **limits)
    seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        tick = time.perf_counter()
        inline = (report.mlflow_copy(run, Path(tmp)) / "index.html").stat().st_size
        copy_s = time.perf_counter() - tick
    return {"build_s": round(seconds, 2), "sampled": outcome["sampled"], "peak_rss_mb": round(peak_rss_mb()),
            "mlflow_copy_s": round(copy_s, 2), "mlflow_index_html_bytes": inline}


def in_fresh_process(function, *args):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def build(run, source, **limits) -> dict:
    result = in_fresh_process(_build, run.uri, source, limits)
    files, size = folder_size(Path(run.path("report")))
    page = Path(run.path("report", "index.html")).stat().st_size
    return {"files": files, "thumbnails": files - 3, "bytes": size, "index_html_bytes": page} | result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=256, help="generated image side, pixels")
    args = parser.parse_args()
    from curation.config import load_config

    synthetic_runs.EMBEDDING_DIM = 512
    with tempfile.TemporaryDirectory(prefix="report-bench-") as tmp:
        source = Path(tmp) / "images"
        tick = time.perf_counter()
        write_images(source, args.images, args.size)
        cfg = load_config(None, [f"source.uri={source}", f"output.uri={Path(tmp) / 'out'}", "run_name=bench",
                                 DETECTORS])
        names = sorted(p.name for p in source.iterdir())
        failures = {name: ("not_an_image", "synthetic failure") for name in names[::500]}
        run = synthetic_runs.write_run(cfg, failures, seed=1)
        setup_s = time.perf_counter() - tick
        scores_files, scores_bytes = folder_size(Path(run.path("scores")))
        exact = build(run, cfg.source)
        sampled = build(run, cfg.source, sample_rows=2_000)
        write("report_build", {
            "run": {"images": args.images, "image_px": args.size, "detectors": 3, "partitions": scores_files,
                    "scores_bytes": scores_bytes, "embedding_dim": synthetic_runs.EMBEDDING_DIM,
                    "synthesized_in_s": round(setup_s, 1),
                    "how": "synthesized: generated JPEGs + write_partition with seeded scores (no curate)"},
            "failed_items": len(failures), "report_exact_table": exact, "report_sampled_2000_rows": sampled,
            "imports_only_peak_rss_mb": round(in_fresh_process(_imports_only)),
        })


if __name__ == "__main__":
    main()
