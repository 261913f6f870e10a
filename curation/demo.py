"""`curation demo`: render an emoji "food crawl" in three formats and curate each with the defaults.

The dataset imitates a crawl for a food-and-drink collection: renders of every "Food & Drink"
emoji (wanted), of emoji from other groups (off-domain) and of the weapon emoji (an unwanted
concept; the kitchen knife is both food-related and a weapon), drawn in the three styles with a
render seed no training or evaluation run uses, plus broken items. It is written as image files,
parquet files and WebDataset shards, because real datasets come in all three, and each gets its
own curate run (a run reads one format). Every item's category goes into `truth.json`, so the
demo can show how each category was decided: nobody labels anything for the job itself.
"""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np

from curation.progress import Progress

DEMO_SEED = 20_241_123  # training draws (seed, step) seeds, evaluation 1234: these renders are new
N_OFF_DOMAIN = 90
WEAPON_RENDERS = 3
FORMATS = ("images", "parquet", "webdataset")
CORRUPT = "corrupt"


def demo_items(seed: int = DEMO_SEED) -> list[tuple[str, str, np.ndarray]]:
    """(emoji id, category, 64 px RGB pixels) for the whole demo dataset, in a seeded order."""
    from curation.emoji.catalog import load_catalog, weapon_ids
    from curation.emoji.render import STYLES, render_image

    emojis = load_catalog()
    weapons = set(weapon_ids())
    food = [e for e in emojis if e.group == "Food & Drink" and e.id not in weapons]
    others = [e for e in emojis if e.group != "Food & Drink" and e.id not in weapons]
    rng = np.random.default_rng(seed)
    off_domain = [others[i] for i in sorted(rng.choice(len(others), N_OFF_DOMAIN, replace=False))]
    chosen = ([(e, "food & drink", 1) for e in food] + [(e, "off-domain", 1) for e in off_domain]
              + [(e, "weapon", WEAPON_RENDERS) for e in emojis if e.id in weapons])
    items = []
    with Progress("rendering the demo dataset", len(chosen), "emoji") as progress:
        for j, (emoji, category, renders) in enumerate(chosen):
            for k in range(renders):
                for offset in range(len(STYLES)):  # styles rotate over items; skip one that lacks the emoji
                    pixels = render_image(emoji, STYLES[(j + k + offset) % len(STYLES)], seed, k)
                    if pixels is not None:
                        items.append((f"{emoji.id}_{k}", category, pixels))
                        break
            progress.update(1, images=len(items))
    return [items[i] for i in rng.permutation(len(items))]


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return out.getvalue()


def _broken(good_png: bytes) -> dict[str, bytes | None]:
    """Broken items every real crawl has: each must end up in failed/ with a reason."""
    return {"truncated": good_png[: len(good_png) // 2], "empty": b"",
            "not-an-image": b"<html><body>404 Not Found</body></html>\n"}


def _write_images(root: Path, items, truth: dict) -> None:
    for i, (name, category, pixels) in enumerate(items):
        fmt = "JPEG" if i % 3 == 0 else "PNG"
        rel = f"crawl-{i % 4}/{name}.{'jpg' if fmt == 'JPEG' else 'png'}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_encode(pixels, fmt))
        truth[rel] = category
    for kind, data in _broken(_encode(items[0][2], "PNG")).items():
        rel = f"crawl-0/{kind}.{'png' if kind != 'empty' else 'jpg'}"
        (root / rel).write_bytes(data)
        truth[rel] = CORRUPT


def _write_parquet(root: Path, items, truth: dict, files: int = 2) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    broken = _broken(_encode(items[0][2], "PNG"))
    broken["null-cell"] = None
    root.mkdir(parents=True, exist_ok=True)
    for part in range(files):
        rows = [(f"p{part}-{name}", _encode(pixels, "PNG"), f"crawled image {name}")
                for name, _, pixels in items[part::files]]
        truth.update({f"p{part}-{name}": category for name, category, _ in items[part::files]})
        if part == 0:
            rows += [(f"p0-{kind}", data, "broken") for kind, data in broken.items()]
            truth.update({f"p0-{kind}": CORRUPT for kind in broken})
        ids, images, alt = zip(*rows)
        table = pa.table({"id": list(ids), "image": pa.array(images, pa.binary()), "alt_text": list(alt)})
        pq.write_table(table, root / f"part-{part:04d}.parquet")


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_webdataset(root: Path, items, truth: dict, shards: int = 2) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        with tarfile.open(root / f"shard-{shard:04d}.tar", "w") as tar:
            for name, category, pixels in items[shard::shards]:
                key = f"s{shard}-{name}"
                _add_member(tar, f"{key}.jpg", _encode(pixels, "JPEG"))
                _add_member(tar, f"{key}.txt", f"crawled image {name}".encode())
                truth[key] = category
            if shard == 0:
                _add_member(tar, "s0-truncated.jpg", _encode(items[0][2], "JPEG")[:300])
                _add_member(tar, "s0-caption-only.txt", b"a sample whose image never arrived")
                truth.update({"s0-truncated": CORRUPT, "s0-caption-only": CORRUPT})


def build_demo_dataset(root: str | Path, seed: int = DEMO_SEED) -> dict[str, dict[str, str]]:
    """Write `root/{images,parquet,webdataset}` and `root/truth.json` unless they exist.

    The items are dealt round-robin to the three formats. Returns {format: {item id: category}}.
    """
    root = Path(root)
    truth_path = root / "truth.json"
    if truth_path.exists():
        return json.loads(truth_path.read_text())
    items = demo_items(seed)
    truth = {fmt: {} for fmt in FORMATS}
    writers = {"images": _write_images, "parquet": _write_parquet, "webdataset": _write_webdataset}
    for i, fmt in enumerate(FORMATS):
        writers[fmt](root / fmt, items[i::len(FORMATS)], truth[fmt])
    truth_path.write_text(json.dumps(truth, indent=1, sort_keys=True))  # written last: marks the set complete
    return truth


def decisions_by_category(run_dir: str, truth: dict[str, str]) -> dict[str, Counter]:
    """{category: Counter(kept/removed/failed)} from a run's scores/ and failed/ tables."""
    import pyarrow.parquet as pq

    table: dict[str, Counter] = {}
    for folder, column in (("scores", "decision"), ("failed", None)):
        path = Path(run_dir) / folder
        if not path.exists():
            continue
        rows = pq.read_table(path)
        decisions = rows.column(column).to_pylist() if column else ["failed"] * rows.num_rows
        for item_id, decision in zip(rows.column("id").to_pylist(), decisions):
            outcome = {"keep": "kept", "remove": "removed"}.get(decision, decision)
            table.setdefault(truth[item_id], Counter())[outcome] += 1
    return table


def print_category_table(table: dict[str, Counter]) -> None:
    print(f"  {'true category':<14} {'kept':>6} {'removed':>8} {'failed':>7}")
    for category in ("food & drink", "off-domain", "weapon", CORRUPT):
        c = table.get(category, Counter())
        print(f"  {category:<14} {c['kept']:>6} {c['removed']:>8} {c['failed']:>7}")


def run_demo(config_path: str | None, overrides: list[str]) -> int:
    from curation import workflow
    from curation.config import load_config
    from curation.report import summary_text
    from curation.tracking import resolve_tracking_uri

    cfg = load_config(config_path, overrides)
    data_root = Path(cfg.source.uri).parent  # source.uri names the images folder; the others sit beside it
    truth = build_demo_dataset(data_root)
    print(f"demo data: {data_root}/{{{','.join(FORMATS)}}} "
          f"({sum(map(len, truth.values()))} items; categories in {data_root / 'truth.json'})")
    for fmt in FORMATS:
        run_cfg = dataclasses.replace(cfg, run_name=f"{cfg.run_name}-{fmt}",
                                      source=dataclasses.replace(cfg.source, uri=str(data_root / fmt), format=fmt))
        summary = workflow.curate(run_cfg)
        print(summary_text(summary))
        print_category_table(decisions_by_category(summary["run_dir"], truth[fmt]))
        run_dir = summary["run_dir"]
        print(f"  kept: {run_dir}/kept/   removed: {run_dir}/removed/   "
              f"scores: {run_dir}/scores/   failed: {run_dir}/failed/")
    print(f"\nMLflow UI: .venv/bin/mlflow ui --backend-store-uri {resolve_tracking_uri(cfg.tracking.uri)}"
          f"  (experiment {cfg.tracking.experiment!r}), then open http://127.0.0.1:5000")
    return 0
