"""Scale on paper: what feeding a GPU and curating LAION-2B would take, from costs measured here.

Measured on this machine (one core, `time.process_time`, so a cost per core):
- decoding for CLIP (decode + resize + center crop at 224 px) by source size, exact and with PIL's
  JPEG draft mode, and how far draft-mode pixels are from exact ones;
- the image towers' forward FLOPs (torch's FLOP counter, one image, random weights).
Taken from the curate benchmark (benchmarks/results/curate_throughput.json): the job's CPU cost
per image beyond decoding and the model (reading, Ray Data, scoring, writing), from tiny-clip's
marginal throughput, whose model costs next to nothing.
Assumed, and written as such into the JSON: the GPU's dense fp16 peak and the fraction of it an
inference stream reaches (MFU). Device runs replace the assumption when a GPU is lent.

    .venv/bin/python benchmarks/scale_on_paper.py   # writes benchmarks/results/scale_on_paper.json

Images are photo-like JPEGs (blurred colour fields, sharp shapes, mild noise, quality 90), 4:3, at
256 px (img2dataset's default resize), 512, 1024 and 2048 px on the longer side. Run it alone.
"""

from __future__ import annotations

import io
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from curation.pipeline.decode import decode_image

RESULTS = Path(__file__).parent / "results"
SIDES = (256, 512, 1024, 2048)
IMAGE_SIZE = 224
N_IMAGES = 24
REPEATS = 3
MODELS = ("ViT-B-32", "ViT-B-16", "ViT-L-14")
GPU = {"name": "H100 SXM", "dense_fp16_tflops": 989.0}  # NVIDIA's datasheet figure, without sparsity
ASSUMED_MFU = 0.4  # fraction of peak an fp16 inference stream at batch 256+ reaches: an assumption
LAION_IMAGES = 2_320_000_000  # LAION-2B-en: 2.32 billion image-text pairs


def photo_like_jpeg(long_side: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    width, height = long_side, long_side * 3 // 4
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float32)
    pixels += np.linspace(-30, 30, width)[None, :, None]
    for _ in range(6):  # hard-edged shapes: detail a reduced decode must keep
        x0, y0 = rng.integers(0, width - width // 8), rng.integers(0, height - height // 8)
        pixels[y0:y0 + height // 8, x0:x0 + width // 8] = rng.integers(0, 256, 3)
    pixels += rng.normal(0, 4, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).filter(ImageFilter.SMOOTH)
    sink = io.BytesIO()
    image.save(sink, format="JPEG", quality=90)
    return sink.getvalue()


def decode_with_draft(data: bytes, image_size: int) -> np.ndarray:
    """What `source.jpeg_draft: true` does (decode_image with draft)."""
    return decode_image(data, image_size, draft=True)


def _timed(fn) -> float:
    """CPU milliseconds of one call."""
    start = time.process_time()
    fn()
    return (time.process_time() - start) * 1e3


def cpu_ms_per_image(fn, images: list[bytes]) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        start = time.process_time()
        for data in images:
            fn(data, IMAGE_SIZE)
        best = min(best, (time.process_time() - start) / len(images))
    return best * 1e3


def decoding() -> list[dict]:
    rows = []
    for side in SIDES:
        images = [photo_like_jpeg(side, seed) for seed in range(N_IMAGES)]
        exact, draft = cpu_ms_per_image(decode_image, images), cpu_ms_per_image(decode_with_draft, images)
        diffs = np.concatenate([np.abs(decode_image(d, IMAGE_SIZE).astype(np.int16)
                                       - decode_with_draft(d, IMAGE_SIZE).astype(np.int16)).ravel() for d in images])
        rows.append({"long_side_px": side, "jpeg_kb_mean": round(np.mean([len(d) for d in images]) / 1024, 1),
                     "exact_cpu_ms": round(exact, 3), "draft_cpu_ms": round(draft, 3),
                     "draft_speedup": round(exact / draft, 2),
                     "draft_pixel_abs_diff": {"mean": round(float(diffs.mean()), 3),
                                              "p99": int(np.percentile(diffs, 99)), "max": int(diffs.max())}})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def image_gflops(model_name: str) -> float:
    import open_clip
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = open_clip.create_model(model_name, pretrained=None).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encode_image(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    return counter.get_total_flops() / 1e9


def job_overhead_ms() -> dict:
    """CPU per image of the curate job beyond decoding and the model: tiny-clip's job marginal
    throughput on all cores, minus decoding 256 px sources to tiny-clip's input size (as that
    benchmark does) and tiny-clip's own forward cost, both measured here."""
    import torch

    from curation.models import ModelConfig, load_model
    from curation.pipeline.decode import preprocess_config

    bench = json.loads((RESULTS / "curate_throughput.json").read_text())
    tiny = next(r for r in bench["runs"] if r["model"] == "tiny-clip")
    cores = bench["machine"]["cpu_count"]
    per_image_ms = cores / tiny["job_marginal_images_per_s"] * 1e3
    torch.set_num_threads(1)
    encoder = load_model(ModelConfig(name="tiny-clip"))
    size = preprocess_config("tiny-clip", None)[0]
    images = [photo_like_jpeg(256, seed) for seed in range(N_IMAGES)]
    decode_256_ms = min(_timed(lambda: [decode_image(d, size) for d in images]) for _ in range(REPEATS)) / len(images)
    pixels = torch.zeros(256, 3, size, size)
    encoder.encode_pixels(pixels[:8])
    start = time.process_time()
    encoder.encode_pixels(pixels)
    model_ms = (time.process_time() - start) / len(pixels) * 1e3
    return {"job_cpu_ms_per_image": round(per_image_ms, 3), "tiny_clip_model_cpu_ms": round(model_ms, 3),
            "decode_cpu_ms": round(decode_256_ms, 3),
            "overhead_cpu_ms": round(max(0.0, per_image_ms - model_ms - decode_256_ms), 3),
            "from": f"curate_throughput.json (commit {bench['commit']}): tiny-clip job marginal "
                    f"{tiny['job_marginal_images_per_s']} img/s on {cores} cores"}


def plan(decode_rows: list[dict], overhead_ms: float, gflops: dict[str, float]) -> list[dict]:
    """Per model: GPU images/s at the assumed MFU, CPU cores to feed one GPU by source size (exact
    decoding), and LAION-2B in GPU-hours and CPU-node-hours (the CPU work at 256 px sources)."""
    out = []
    for name, flops in gflops.items():
        gpu_images_s = GPU["dense_fp16_tflops"] * 1e12 * ASSUMED_MFU / (flops * 1e9)
        cores = {str(r["long_side_px"]): round(gpu_images_s * (r["exact_cpu_ms"] + overhead_ms) / 1e3, 1)
                 for r in decode_rows}
        cpu_ms_256 = decode_rows[0]["exact_cpu_ms"] + overhead_ms
        gpu_hours = LAION_IMAGES / gpu_images_s / 3600
        out.append({"model": name, "image_gflops": round(flops, 2),
                    "gpu_images_per_s_estimate": round(gpu_images_s), "cpu_cores_per_gpu_by_source_px": cores,
                    "laion2b_gpu_hours": round(gpu_hours), "laion2b_cpu_core_hours_256px": round(
                        LAION_IMAGES * cpu_ms_256 / 1e3 / 3600),
                    "laion2b_node_hours_8_gpus": round(gpu_hours / 8, 1),
                    "node": f"8 GPUs + {round(8 * cores['256'])} cores for 256 px sources"})
    return out


def main() -> None:
    load = os.getloadavg()
    rows = decoding()
    overhead = job_overhead_ms()
    gflops = {name: image_gflops(name) for name in MODELS}
    result = {
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "pillow": Image.__version__},
        "quiet_machine": {"load_average_at_start": load,
                          "note": "run alone: no tests, training or other benchmarks at the same time"},
        "image_size": IMAGE_SIZE, "images_per_size": N_IMAGES, "decoding": rows, "job_overhead": overhead,
        "assumed": {"gpu": GPU, "mfu": ASSUMED_MFU, "laion_images": LAION_IMAGES,
                    "note": "GPU images/s are estimates (FLOPs / (peak x MFU)) until measured on a device"},
        "plan": plan(rows, overhead["overhead_cpu_ms"], gflops),
    }
    (RESULTS / "scale_on_paper.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["plan"], indent=2))


if __name__ == "__main__":
    main()
