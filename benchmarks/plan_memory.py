"""The driver's memory for planning a large image folder: `plan.plan` (one Ray Task per folder,
names kept in the run's `_plan/`) against holding the whole listing in the driver (`scan_inputs`,
what curate did before, and what the finished-name set added on an incremental run), in the same
run on the same files.

The source is `folders` x `per_folder` empty .jpg files (img2dataset's layout: 10,000 per folder);
planning never opens them. Memory is Python's allocations on the driver (tracemalloc peak while
planning); the Ray workers' are not the driver's. The incremental case records every planned
partition as finished, adds one file per folder, and plans again.

    python benchmarks/plan_memory.py [--folders 100] [--per-folder 10000]

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


def main() -> None:
    import ray

    from curation.pipeline.plan import RunDirectory, plan, scan_inputs

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folders", type=int, default=100)
    parser.add_argument("--per-folder", type=int, default=10_000)
    parser.add_argument("--partition-size", type=int, default=256)
    args = parser.parse_args()
    load_at_start = os.getloadavg()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        source, run = Path(tmp) / "src", RunDirectory(str(Path(tmp) / "out"), "run")
        _make_source(source, args.folders, args.per_folder)
        images = args.folders * args.per_folder

        (names, _), listing_mb, listing_s = _peak(lambda: scan_inputs(str(source), {}, "images"))
        del names
        work, plan_mb, plan_s = _peak(lambda: plan(run, str(source), {}, "images", args.partition_size))
        assert sum(p.size for p in work.partitions) == images
        for partition in run.load_many(work.partitions):  # every partition finished, as after a run
            run.finish(partition, {"items": partition.size, "fired": {}})
        run.remove_stale_work()
        _make_source(source, args.folders, 1, suffix="-new")

        def held_incremental():  # before: every record, the finished-name set and the listing
            finished = run.manifest()
            done = {name for record in finished.values() for name in record["partition"]["inputs"]}
            return [name for name in scan_inputs(str(source), {}, "images")[0] if name not in done]

        _, held_incremental_mb, held_incremental_s = _peak(held_incremental)
        again, again_mb, again_s = _peak(lambda: plan(run, str(source), {}, "images", args.partition_size))
        assert sum(p.size for p in again.partitions) == args.folders and again.finished_counts["items"] == images
    ray.shutdown()
    write("plan_memory", {
        "images": images, "folders": args.folders, "partition_size": args.partition_size,
        "load_average_at_start": load_at_start,
        "quiet_machine": "run with no tests, benchmarks or training going",
        "first_run": {"whole_listing_on_driver_mb": round(listing_mb, 1), "whole_listing_s": round(listing_s, 2),
                      "plan_driver_mb": round(plan_mb, 1), "plan_s": round(plan_s, 2),
                      "partitions": len(work.partitions)},
        "incremental_run": {"manifest_and_listing_on_driver_mb": round(held_incremental_mb, 1),
                            "manifest_and_listing_s": round(held_incremental_s, 2),
                            "plan_driver_mb": round(again_mb, 1), "plan_s": round(again_s, 2),
                            "new_partitions": len(again.partitions)},
    })


if __name__ == "__main__":
    main()
