"""Throughput of the whole curate job vs a plain single-process loop, on the same images.

The plain loop is the floor users compare with: decode with PIL, open_clip's own eval transform,
batched `encode_image` in one process using every core. The job runs `workflow.curate` on local
Ray (detectors fitted beforehand, so only decode -> embed -> score -> write is timed) with 1 and
2 actors. Scoring and writing overhead is measured by re-running those two stages alone on the
job's own results. Peak memory is sampled over the whole process tree (driver + Ray workers).

    python benchmarks/curate_throughput.py [--models tiny-clip ViT-B-16] [--images 256]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from _common import write

DETECTORS = ("[{kind: mcm, name: mcm, task_texts: [apple, banana, bread]}, "
             "{kind: neglabel, name: neg, task_texts: [apple, banana, bread], "
             "params: {ngroup: 10, noun_lexnames: [noun.shape], adj_lexnames: [adj.ppl]}}]")


class PeakMemory:
    """Peak summed RSS of this process and all its descendants, sampled every 0.2 s."""

    def __init__(self):
        import psutil

        self.root, self.peak, self.running = psutil.Process(), 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        import psutil

        while self.running:
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.2)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()

    @property
    def peak_mb(self) -> int:
        return round(self.peak / 2**20)


def write_images(directory: Path, n: int, size: int = 256) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    base = np.linspace(0, 255, size, dtype=np.float32)
    for i in range(n):
        pixels = (base[None, :, None] + rng.normal(0, 40, (size, size, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(directory / f"img-{i:05d}.jpg", quality=90)


def plain_loop(model_name: str, image_dir: Path, batch_size: int) -> float:
    """images/s of decode + open_clip transform + encode_image in batches, one process."""
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
    return len(files) / (time.perf_counter() - start)


def job_config(model_name: str, image_dir: Path, out: Path, cache: Path, actors: int, batch_size: int,
               torch_threads: int | None = None):
    from curation.config import load_config

    return load_config(None, [
        f"model.name={model_name}", f"model.batch_size={batch_size}", f"source.uri={image_dir}",
        "source.partition_size=32", f"output.uri={out}", f"run_name=bench-{actors}", f"cache_dir={cache}",
        f"tracking.uri=sqlite:///{out}/mlflow.db", f"compute.actors={actors}",
        f"compute.cpus_per_actor={1.0 if actors == 1 else 0.75}", "compute.decode_cpus=0.5",
        f"compute.torch_threads={torch_threads if torch_threads else 'null'}",
        f"detectors={DETECTORS}"])


def score_and_write_s(cfg, run_dir: str) -> float:
    """Time `decide` + `write_partition` alone over the job's own stored embeddings."""
    from curation import workflow
    from curation.pipeline.plan import Partition, RunDirectory
    from curation.pipeline.score import decide
    from curation.pipeline.write import write_partition

    previous = RunDirectory(run_dir, "")
    artifacts, _ = workflow.fitted_detectors(cfg)
    detectors, names = workflow.load_artifacts(artifacts), [d.label for d in cfg.detectors]
    scratch = RunDirectory(tempfile.mkdtemp(), "scratch")
    thresholds = {n: 0.5 for n in names}
    start = time.perf_counter()
    for pid, record in previous.manifest().items():
        results = workflow.stored_results(previous, pid)
        results |= decide(results["embedding"], results["error_kind"] == "", detectors, thresholds)
        write_partition(scratch, Partition(pid, "images", tuple(record["partition"]["inputs"])), results,
                        cfg.source.uri, {}, names, True)
    elapsed = time.perf_counter() - start
    shutil.rmtree(scratch.uri, ignore_errors=True)
    return elapsed


def bench_model(model_name: str, n_images: int, batch_size: int, root: Path) -> dict:
    import ray

    from curation import workflow

    image_dir = root / f"images-{model_name}"
    write_images(image_dir, n_images)
    result = {"model": model_name, "images": n_images, "image_px": 256, "batch_size": batch_size}
    with PeakMemory() as memory:
        result["plain_images_per_s"] = round(plain_loop(model_name, image_dir, batch_size), 2)
    result["plain_peak_mb"] = memory.peak_mb
    for actors, threads in ((1, None), (2, None), (1, 2)):
        ray.init(address="local", num_cpus=2, include_dashboard=False)
        cfg = job_config(model_name, image_dir, root / f"out-{model_name}-{actors}-{threads}", root / "cache",
                         actors, batch_size, threads)
        workflow.fitted_detectors(cfg)  # fit outside the timed run
        with PeakMemory() as memory:
            summary = workflow.curate(cfg)
        stream_s = summary["timings"]["stream_and_write_s"]
        overhead_s = score_and_write_s(cfg, summary["run_dir"])
        ray.shutdown()
        result[f"job_{actors}_actor" + (f"_{threads}_threads" if threads else "")] = {
            "images_per_s": round(n_images / stream_s, 2),
            "ratio_vs_plain": round(n_images / stream_s / result["plain_images_per_s"], 3),
            "score_and_write_share": round(overhead_s / stream_s, 3),
            "end_to_end_s_incl_ray_start": round(summary["timings"]["total_s"], 1),
            "peak_mb": memory.peak_mb,
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["tiny-clip", "ViT-B-16"])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="curate-bench-"))
    try:
        runs = [bench_model(m, args.images, args.batch_size, root) for m in args.models]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    write("curate_throughput", {"runs": runs})


if __name__ == "__main__":
    main()
