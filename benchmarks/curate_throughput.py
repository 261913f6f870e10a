"""Throughput of the curate job against a plain single-process loop, in steady state, on default
compute settings; the job's start-up separately; driver and worker memory at scale.

Steady state is measured the marginal way: each side runs on two dataset sizes, and
(n_large - n_small) / (t_large - t_small) cancels what both runs pay once (Ray start, actor and
model start, planning, MLflow). The intercept t_small - n_small / marginal is the job's start-up.
The plain loop is the floor users compare with: decode with PIL, open_clip's own eval transform,
batched `encode_image` in one process using every core. Detectors are fitted before the timed runs
(their cache), as every run after a team's first one finds them.

Also: the driver's peak RSS and CPU time at two dataset sizes (does the driver grow with the
data?) and the peak RSS of the single process holding one large WebDataset shard.

    python benchmarks/curate_throughput.py [--models tiny-clip ViT-B-32 ViT-B-16] [--skip-memory]

Run it on a quiet machine (no tests, no training): the JSON records the load average at start.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from _common import write

DETECTORS = ("[{kind: mcm, name: mcm, task_texts: [apple, banana, bread], threshold: {strategy: fixed, value: 0.5}}, "
             "{kind: neglabel, name: neg, task_texts: [apple, banana, bread], threshold: {strategy: fixed, value: 0.5}, "
             "params: {ngroup: 10, noun_lexnames: [noun.shape], adj_lexnames: [adj.ppl]}}]")
# (small, large) image counts per model: the large run long enough that the difference dominates noise
SIZES = {"tiny-clip": (2000, 8000), "ViT-B-32": (96, 384), "ViT-B-16": (48, 192)}


class PeakMemory:
    """Peak RSS sampled every 0.2 s: of this process alone, of the largest single descendant, and
    summed over the whole tree (driver + Ray workers)."""

    def __init__(self):
        import psutil

        self.root = psutil.Process()
        self.driver = self.largest_child = self.tree = 0
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        import psutil

        while self.running:
            try:
                children = [(p, p.memory_info().rss) for p in self.root.children(recursive=True) if p.is_running()]
                own = self.root.memory_info().rss
                self.driver = max(self.driver, own)
                self.largest_child = max([self.largest_child] + [rss for _, rss in children])
                self.tree = max(self.tree, own + sum(rss for _, rss in children))
            except psutil.Error:
                pass
            time.sleep(0.2)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()

    def mb(self) -> dict:
        return {"driver_peak_mb": round(self.driver / 2**20), "largest_worker_peak_mb": round(self.largest_child / 2**20),
                "all_processes_peak_mb": round(self.tree / 2**20)}


def _jpeg(rng, size: int) -> bytes:
    from PIL import Image

    base = np.linspace(0, 255, size, dtype=np.float32)
    pixels = (base[None, :, None] + rng.normal(0, 40, (size, size, 3))).clip(0, 255).astype(np.uint8)
    sink = io.BytesIO()
    Image.fromarray(pixels).save(sink, format="JPEG", quality=90)
    return sink.getvalue()


def write_images(directory: Path, n: int, size: int = 256, distinct: int = 64) -> Path:
    """n JPEG files (`distinct` different images repeated: generating is not what is measured)."""
    rng = np.random.default_rng(0)
    payloads = [_jpeg(rng, size) for _ in range(min(n, distinct))]
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (directory / f"img-{i:06d}.jpg").write_bytes(payloads[i % len(payloads)])
    return directory


def write_shard(path: Path, n: int, size: int = 224, distinct: int = 64) -> Path:
    rng = np.random.default_rng(1)
    payloads = [_jpeg(rng, size) for _ in range(distinct)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            info = tarfile.TarInfo(f"sample-{i:06d}.jpg")
            info.size = len(payloads[i % distinct])
            tar.addfile(info, io.BytesIO(payloads[i % distinct]))
    return path


def plain_loop_s(model_name: str, image_dir: Path, batch_size: int) -> float:
    """Seconds for decode + open_clip transform + encode_image in batches, one process (model
    creation excluded: it is paid once either way)."""
    import open_clip
    import torch
    from PIL import Image

    from curation.models import register_local_configs

    register_local_configs()
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name)
    model.eval()
    files = sorted(image_dir.iterdir())
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(files), batch_size):
            batch = torch.stack([preprocess(Image.open(f).convert("RGB")) for f in files[i:i + batch_size]])
            torch.nn.functional.normalize(model.encode_image(batch), dim=-1)
    return time.perf_counter() - start


def job_config(model_name: str, source: Path, out: Path, cache: Path, run_name: str, fmt: str = "images"):
    """Default compute and batch settings: only what says which data, model and detectors."""
    from curation.config import load_config

    return load_config(None, [
        f"model.name={model_name}", f"source.uri={source}", f"source.format={fmt}", f"output.uri={out}",
        f"run_name={run_name}", f"cache_dir={cache}", f"tracking.uri=sqlite:///{out}/mlflow.db",
        f"detectors={DETECTORS}"])


def timed_job(cfg) -> tuple[float, dict, dict]:
    """Wall seconds of one whole `curate` (a fresh local Ray each time), its summary, its memory."""
    import ray

    from curation import workflow

    start = time.perf_counter()
    with PeakMemory() as memory:
        summary = workflow.curate(cfg)
    elapsed = time.perf_counter() - start
    ray.shutdown()
    return elapsed, summary, memory.mb()


def marginal(n: tuple[int, int], t: tuple[float, float]) -> float:
    return (n[1] - n[0]) / (t[1] - t[0])


def bench_model(model_name: str, root: Path) -> dict:
    import ray

    from curation.detectors.cache import fitted_detectors
    from curation.models import batch_size_for

    sizes = SIZES[model_name]
    dirs = [write_images(root / f"{model_name}-{n}", n) for n in sizes]
    cfg = job_config(model_name, dirs[0], root / "out", root / "cache", "fit")
    batch_size = batch_size_for(cfg.model, on_gpu=False)  # what the job's CPU actors use
    plain = [plain_loop_s(model_name, d, batch_size) for d in dirs]
    ray.init(address="local", include_dashboard=False)
    fitted_detectors(cfg)  # fitted once, outside the timed runs
    ray.shutdown()
    # An untimed job first: the first job of a process also pays one-time imports (Ray Data and
    # friends) that a second does not, which would break the equal-fixed-cost premise.
    timed_job(job_config(model_name, dirs[0], root / "out", root / "cache", f"{model_name}-warm-up"))
    jobs = [timed_job(job_config(model_name, d, root / "out", root / "cache", f"{model_name}-{n}"))
            for d, n in zip(dirs, sizes)]
    job_s = [elapsed for elapsed, _, _ in jobs]
    plain_rate, job_rate = marginal(sizes, plain), marginal(sizes, job_s)
    return {"model": model_name, "images": list(sizes), "image_px": 256, "batch_size": batch_size,
            "compute_defaults": "compute: {} (follows the cluster)",
            "plain_s": [round(s, 2) for s in plain], "job_s": [round(s, 2) for s in job_s],
            "plain_marginal_images_per_s": round(plain_rate, 2), "job_marginal_images_per_s": round(job_rate, 2),
            "ratio_vs_plain": round(job_rate / plain_rate, 3),
            "job_startup_s": round(job_s[0] - sizes[0] / job_rate, 1),
            "job_timings_large": {k: round(v, 2) for k, v in jobs[1][1]["timings"].items()},
            "memory_large": jobs[1][2]}


def bench_driver(root: Path, sizes=(5_000, 50_000)) -> dict:
    """Driver (this process) peak RSS and CPU seconds at two dataset sizes, tiny-clip, 64 px images."""
    import psutil

    result = {"model": "tiny-clip", "image_px": 64, "runs": []}
    for n in sizes:
        source = write_images(root / f"driver-{n}", n, size=64)
        before = psutil.Process().cpu_times()
        elapsed, summary, memory = timed_job(job_config("tiny-clip", source, root / "out", root / "cache", f"driver-{n}"))
        after = psutil.Process().cpu_times()
        result["runs"].append({"images": n, "items_done": summary["this_run"]["items"], "wall_s": round(elapsed, 1),
                               "driver_cpu_s": round(after.user + after.system - before.user - before.system, 1),
                               **memory})
        shutil.rmtree(source)
    small, large = result["runs"]
    result["driver_rss_growth"] = round(large["driver_peak_mb"] / small["driver_peak_mb"] - 1, 3)
    return result


def bench_shard(root: Path, n: int = 20_000) -> dict:
    """Peak RSS of the largest single process while one shard of n 224 px JPEGs is curated."""
    shard = write_shard(root / "shard" / "big-000000.tar", n)
    elapsed, summary, memory = timed_job(job_config("tiny-clip", shard.parent, root / "out", root / "cache",
                                                    "shard", fmt="webdataset"))
    return {"samples": n, "image_px": 224, "shard_mb": round(shard.stat().st_size / 2**20), "wall_s": round(elapsed, 1),
            "items_done": summary["this_run"]["items"], **memory}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=list(SIZES))
    parser.add_argument("--skip-memory", action="store_true", help="only the throughput part")
    args = parser.parse_args()
    quiet = {"load_average_at_start": os.getloadavg(),
             "note": "run alone: no tests, training or other benchmarks at the same time"}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    root = Path(tempfile.mkdtemp(prefix="curate-bench-"))
    try:
        payload = {"commit": commit, "quiet_machine": quiet, "runs": [bench_model(m, root) for m in args.models]}
        if not args.skip_memory:
            payload["driver"] = bench_driver(root)
            payload["one_large_shard"] = bench_shard(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    write("curate_throughput", payload)


if __name__ == "__main__":
    main()
