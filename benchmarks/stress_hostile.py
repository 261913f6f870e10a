"""Stress run for hostile inputs and overlapping runs (issue 9): per format, 20 good files mixed
with 5 hostile ones; two `curation curate` processes started at once into one run directory;
the one that runs is SIGKILLed half way; the same command resumes. Checks that every item is
accounted exactly once and records the peak RSS of everything each command started.

    .venv/bin/python benchmarks/stress_hostile.py      # JSON in benchmarks/results/stress_hostile.json
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "benchmarks")]

import hostile  # noqa: E402
from _common import write  # noqa: E402
from images import write_bilevel_png  # noqa: E402

CLI = str(Path(sys.executable).parent / "curation")
GOOD_FILES, ITEMS_PER_FILE = 20, 32
CONFIG = """
run_name: stress
model: {name: tiny-clip, batch_size: 32}
source: {uri: %(source)s, format: %(format)s, max_pixels: 50000000}
output: {uri: %(output)s, lease_ttl_s: 120}
tracking: {uri: "sqlite:///%(work)s/mlflow.db"}
cache_dir: %(work)s/cache
compute: {cpus_per_actor: 1.0, decode_cpus: 0.5}
detectors:
  - {kind: mcm, name: fruit, task_texts: [apple, banana, bread], threshold: {strategy: fixed, value: 0.5}}
"""


def bomb_parquet(path: Path) -> dict:
    """Readable parquet whose rows are decompression bombs (a few kB each, 100k x 100k pixels)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    png = path.with_suffix(".png")
    write_bilevel_png(str(png), 100_000, 100_000)
    pq.write_table(pa.table({"id": ["bomb-0", "bomb-1"], "image": [png.read_bytes()] * 2}), path)
    png.unlink()
    return {"items": 2, "failed_files": 0}


def build(work: Path) -> dict[str, dict]:
    """Both sources; per format the items and whole-file failures a run must account for."""
    plans = {"parquet": [], "webdataset": []}
    parquet, shards = work / "src-parquet", work / "src-shards"
    parquet.mkdir(parents=True)
    shards.mkdir(parents=True)
    for i in range(GOOD_FILES):
        plans["parquet"].append(hostile.write_good_parquet(parquet / f"part-{i:03d}.parquet", ITEMS_PER_FILE, seed=i))
        plans["webdataset"].append(hostile.write_good_shard(shards / f"shard-{i:03d}.tar", ITEMS_PER_FILE, seed=100 + i))
    plans["parquet"] += [hostile.write_corrupt_parquet(parquet / "x-corrupt-1.parquet", 10, seed=200),
                         hostile.write_corrupt_parquet(parquet / "x-corrupt-2.parquet", 10, seed=201),
                         hostile.write_wrong_column_parquet(parquet / "x-wrong-column.parquet", 10, seed=202),
                         bomb_parquet(parquet / "x-bombs.parquet")]
    (parquet / "x-empty.parquet").write_bytes(b"")
    plans["parquet"].append({"items": 0, "failed_files": 1})
    plans["webdataset"] += [hostile.write_truncated_shard(shards / "x-truncated.tar", 10, seed=300),
                            hostile.write_gzip_bomb_shard(shards / "x-gzip-bomb.tar", megabytes=200),
                            hostile.write_duplicate_shard(shards / "x-duplicates.tar", 10, seed=301),
                            hostile.write_link_shard(shards / "x-links.tar", 10, seed=302)]
    (shards / "x-html.tar").write_bytes(b"<html>404 not found</html>" * 20)
    plans["webdataset"].append({"items": 0, "failed_files": 1})
    return {"parquet": {"source": parquet, "expected": plans["parquet"]},
            "webdataset": {"source": shards, "expected": plans["webdataset"]}}


class SessionRss:
    """Peak resident memory of a process session (the CLI and every Ray process it started)."""

    def __init__(self, pid: int):
        self.pid, self.peak_total, self.peak_process = pid, 0, 0

    def sample(self) -> None:
        """Sum RSS over /proc entries whose session id is the CLI's (it was started in its own)."""
        total = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[3]) != self.pid:  # field 6: session id
                    continue
                rss = int((entry / "statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, ValueError, IndexError):
                continue
            total += rss
            self.peak_process = max(self.peak_process, rss)
        self.peak_total = max(self.peak_total, total)

    def as_mb(self) -> dict:
        return {"peak_session_rss_mb": round(self.peak_total / 2**20), "peak_process_rss_mb": round(self.peak_process / 2**20)}


def start(config: Path, work: Path) -> subprocess.Popen:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "CURATION_CACHE": str(work / "cache")}
    return subprocess.Popen([CLI, "curate", "--config", str(config)], cwd=work, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def watch(procs: list[subprocess.Popen], until, rss: dict[int, SessionRss]) -> None:
    while not until():
        for proc in procs:
            if proc.poll() is None:
                rss[proc.pid].sample()
        time.sleep(0.5)


def accounted(run_dir: Path) -> dict:
    import pyarrow.parquet as pq

    scores = pq.read_table(run_dir / "scores").column("source").to_pylist()
    failed = pq.read_table(run_dir / "failed")
    whole = failed.column("whole_file").to_pylist()
    failed_items = [s for s, w in zip(failed.column("source").to_pylist(), whole) if not w]
    items = scores + failed_items  # `source` locates an item (shard sample keys repeat across shards)
    return {"items": len(items), "distinct_items": len(set(items)), "decided": len(scores), "failed": len(failed_items),
            "failed_files": sum(whole), "failed_kinds": sorted(set(failed.column("error_kind").to_pylist()))}


def stress(fmt: str, spec: dict, work: Path) -> dict:
    output = work / f"out-{fmt}"
    config = work / f"{fmt}.yaml"
    config.write_text(CONFIG % {"source": spec["source"], "format": fmt, "output": output, "work": work})
    manifest = output / "stress" / "_manifest"
    first, second = start(config, work), start(config, work)
    rss = {p.pid: SessionRss(p.pid) for p in (first, second)}
    tick = time.perf_counter()
    watch([first, second], lambda: first.poll() is not None or second.poll() is not None, rss)
    loser, winner = (first, second) if first.poll() is not None else (second, first)
    loser_output = loser.communicate()[0]
    loser_seconds = time.perf_counter() - tick
    watch([winner], lambda: winner.poll() is not None or (manifest.exists() and len(list(manifest.glob("*/*.json"))) >= 8), rss)
    killed_after = len(list(manifest.glob("*/*.json"))) if manifest.exists() else 0
    was_running = winner.poll() is None
    os.killpg(winner.pid, signal.SIGKILL)
    winner.wait()
    resumed = start(config, work)
    rss[resumed.pid] = SessionRss(resumed.pid)
    watch([resumed], lambda: resumed.poll() is not None, rss)
    resumed_output = resumed.communicate()[0]
    summary = json.loads((output / "stress" / "summary.json").read_text())
    expected_items = sum(e["items"] for e in spec["expected"])
    expected_files = sum(e["failed_files"] for e in spec["expected"])
    found = accounted(output / "stress")
    return {
        "files_in": len(spec["expected"]), "items_in": expected_items, "whole_file_failures_expected": expected_files,
        "accounted": found, "summary_total": summary["total"], "skipped": summary.get("skipped"),
        "exactly_once": found["items"] == found["distinct_items"] == expected_items == summary["total"]["items"]
                        and found["failed_files"] == expected_files,
        "second_run": {"exit_code": loser.returncode, "seconds": round(loser_seconds, 1),
                       "message": next((l for l in loser_output.splitlines() if "in use by another run" in l), loser_output[-400:])},
        "killed": {"was_running": was_running, "partitions_finished_before_kill": killed_after},
        "resumed": {"exit_code": resumed.returncode, "this_run_items": summary["this_run"]["items"],
                    "tail": resumed_output[-300:] if resumed.returncode else ""},
        "peak_rss": {"first": rss[first.pid].as_mb(), "second": rss[second.pid].as_mb(),
                     "resumed": rss[resumed.pid].as_mb()},
    }


def main() -> None:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="curation-stress-") as tmp:
        work = Path(tmp)
        specs = build(work)
        results = {fmt: stress(fmt, spec, work) for fmt, spec in specs.items()}
    write("stress_hostile", {"load_average_before": load_before, "good_files": GOOD_FILES,
                             "items_per_good_file": ITEMS_PER_FILE, "results": results})


if __name__ == "__main__":
    main()
