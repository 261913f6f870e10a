"""`curation demo`: build a small offline dataset and run the full curate job on it.

The dataset is deterministic synthetic images (coloured shapes on noise) plus a few broken files,
so a fresh machine shows every output (kept/, removed/, scores/, failed/, MLflow) with nothing to
download.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

JPEG_MAGIC = b"\xff\xd8"
BROKEN_FILES = {
    "broken/zero-bytes.jpg": b"",
    "broken/not-an-image.png": b"this is a text file with an image extension\n",
}


def synthetic_image(rng: np.random.Generator, size: int = 96) -> bytes:
    from PIL import Image, ImageDraw

    background = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(1, 4)):
        x0, y0 = rng.integers(0, size // 2, 2)
        x1, y1 = np.array([x0, y0]) + rng.integers(10, size // 2, 2)
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    out = io.BytesIO()
    image.save(out, format="JPEG" if rng.random() < 0.7 else "PNG")
    return out.getvalue()


def build_demo_images(directory: str | Path, n_images: int = 96, seed: int = 0) -> int:
    """Write the demo image folder (idempotent); returns the number of files written."""
    directory = Path(directory)
    rng = np.random.default_rng(seed)
    written = 0
    for i in range(n_images):
        data = synthetic_image(rng)
        extension = "jpg" if data.startswith(JPEG_MAGIC) else "png"
        path = directory / f"shapes/{i // 32:02d}/img-{i:04d}.{extension}"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            written += 1
    for name, data in BROKEN_FILES.items():
        path = directory / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            written += 1
    return written


def run_demo(config_path: str | None, overrides: list[str]) -> int:
    from curation import workflow
    from curation.cli import print_summary
    from curation.config import load_config
    from curation.tracking import resolve_tracking_uri

    cfg = load_config(config_path, overrides)
    written = build_demo_images(cfg.source.uri)
    print(f"demo data: {cfg.source.uri} ({written} new files)")
    summary = workflow.curate(cfg)
    print_summary(summary)
    run_dir = summary["run_dir"]
    print(f"\nkept images:    {run_dir}/kept/\nremoved images: {run_dir}/removed/\n"
          f"scores:         {run_dir}/scores/*.parquet\nfailed:         {run_dir}/failed/*.parquet")
    print(f"MLflow UI:      .venv/bin/mlflow ui --backend-store-uri {resolve_tracking_uri(cfg.tracking.uri)}")
    return 0
