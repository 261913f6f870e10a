"""The driver's memory for planning a large image folder: `plan.plan` (one Ray Task per folder,
names kept in the run's `_plan/`) against holding the whole listing in the driver (`scan_inputs`,
what curate did before, and what the finished-name set added on an incremental run), in the same
run on the same files.

Each source is `folders` x `per_folder` empty .jpg files (img2dataset's layout: 10,000 per folder);
planning never opens them. Memory is Python's allocations on the driver (tracemalloc peak while
planning); the Ray workers' are not the driver's. The incremental case records every planned
partition as finished, adds one file per folder, and plans again.

    python benchmarks/plan_memory.py [--folders 10 100] [--per-folder 10000]

Run it on a quiet machine (no tests, no training): the JSON records the load average at start.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import tracemalloc
from pathlib import Path

from _common import write


def _peak(call) -> tuple[object, float, float]:
    """Result, peak MB of Python allocations during `call`, seconds."""
    tracemalloc.start()
    tick = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - tick
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return result, peak, seconds


def _make_source(root: Path, folders: int, per_folder: int, suffix: str = "") -> None:
    for f in range(folders):
        folder = root / f"{f:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_folder):
            (folder / f"{f:05d}{i:05d}{suffix}.jpg").touch()


def measure(root: Path, folders: int, per_folder: int, partition_size: int) -> dict:
    from curation.pipeline.plan import RunDirectory, plan, scan_inputs

    source, run = root / "src", RunDirectory(str(root / "out"), "run")
    _make_source(source, folders, per_folder)
    images = folders * per_folder
    (names, _), listing_mb, listing_s = _peak(lambda: scan_inputs(str(source), {}, "images"))
    del names
    work, plan_mb, plan_s = _peak(lambda: plan(run, str(source), {}, "images", partition_size))
    assert sum(p.size for p in work.partitions) == images
    for partition in run.load_many(work.partitions):  # every partition finished, as after a run
        run.finish(partition, {"items": partition.size, "fired": {}})
    run.remove_stale_work()
    _make_source(source, folders, 1, suffix="-new")

    def held_incremental():  # before: every record, the finished-name set and the listing
        finished = run.manifest()
        done = {name for record in finished.values() for name in record["partition"]["inputs"]}
        return [name for name in scan_inputs(str(source), {}, "images")[0] if name not in done]

    _, held_incremental_mb, held_incremental_s = _peak(held_incremental)
    again, again_mb, again_s = _peak(lambda: plan(run, str(source), {}, "images", partition_size))
    assert sum(p.size for p in again.partitions) == folders and again.finished_counts["items"] == images
    return {
        "images": images, "folders": folders,
        "first_run": {"whole_listing_on_driver_mb": round(listing_mb, 1), "whole_listing_s": round(listing_s, 2),
                      "plan_driver_mb": round(plan_mb, 1), "plan_s": round(plan_s, 2),
                      "partitions": len(work.partitions)},
        "incremental_run": {"manifest_and_listing_on_driver_mb": round(held_incremental_mb, 1),
                            "manifest_and_listing_s": round(held_incremental_s, 2),
                            "plan_driver_mb": round(again_mb, 1), "plan_s": round(again_s, 2),
                            "new_partitions": len(again.partitions)},
    }


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folders", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--per-folder", type=int, default=10_000)
    parser.add_argument("--partition-size", type=int, default=256)
    args = parser.parse_args()
    load_at_start = os.getloadavg()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        measure(Path(tmp) / "warm-up", 2, 10, args.partition_size)  # Ray's first remote calls, once per job
        runs = [measure(Path(tmp) / f"run-{folders}", folders, args.per_folder, args.partition_size)
                for folders in args.folders]
    ray.shutdown()
    write("plan_memory", {"partition_size": args.partition_size, "per_folder": args.per_folder,
                          "load_average_at_start": load_at_start,
                          "quiet_machine": "run with no tests, benchmarks or training going",
                          "note": "tracemalloc peak of the driver's Python allocations; after a warm-up plan "
                                  "(Ray's first remote calls)", "runs": runs})


if __name__ == "__main__":
    main()
