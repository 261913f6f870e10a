"""Evaluate the two demo tasks on fresh renders of trained and of held-out emoji.

For each task (ood: wanted = the "Food & Drink" group; unwanted: the weapon ids) and each split,
write labelled image folders and run `curation evaluate` on them (`workflow.evaluate`), collecting
every detector's AUROC / FPR@95 into one JSON table. Splits: trained and held-out emoji in the
classic styles (Noto, Twemoji, Symbola, mixed), and both again in the held-out style
(`render.HELD_OUT_STYLE`, which emoji-clip v2 never trained on): `style/trained` measures transfer
to an unseen style alone, `style/held_out` an unseen emoji in an unseen style.

    python -m curation.emoji.evaluate --out ./demo/eval [--n-per-emoji 2] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from curation.emoji.catalog import load_catalog, weapon_ids
from curation.emoji.render import HELD_OUT_STYLE, write_eval_set
from curation.progress import configure_logging

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TASKS = {"ood": CONFIGS / "demo-ood.yaml", "unwanted": CONFIGS / "demo-unwanted.yaml"}


def task_labels(task: str, emojis) -> tuple[list[str], list[str]]:
    """(wanted ids, unwanted ids) among `emojis` for a demo task."""
    if task == "ood":
        unwanted = {e.id for e in emojis if e.group != "Food & Drink"}
    else:
        unwanted = set(weapon_ids()) & {e.id for e in emojis}
    return [e.id for e in emojis if e.id not in unwanted], [e.id for e in emojis if e.id in unwanted]


def _subsample(ids: list[str], limit: int, seed: int) -> list[str]:
    if len(ids) <= limit:
        return ids
    return sorted(np.random.default_rng(seed).choice(ids, limit, replace=False).tolist())


def renders_per_emoji(n_emoji: int, n_per_emoji: int, min_images: int) -> int:
    """Small classes (5 trained weapons, 3 held out) get more renders each, so that AUROC is not
    decided by a handful of images; the extra renders are new augmentations of the same emoji."""
    return max(n_per_emoji, math.ceil(min_images / max(n_emoji, 1)))


def write_split(root: Path, task: str, emojis, n_per_emoji: int, limit: int, seed: int,
                min_images: int, style: str = "mixed") -> tuple[Path, Path]:
    wanted, unwanted = task_labels(task, emojis)
    folders = root / "wanted", root / "unwanted"
    for folder, ids in zip(folders, (wanted, unwanted)):
        ids = _subsample(ids, limit, seed)
        write_eval_set(folder, ids, style, renders_per_emoji(len(ids), n_per_emoji, min_images), seed)
    return folders


SPLITS = {"trained": "mixed", "held_out": "mixed",
          "style/trained": HELD_OUT_STYLE, "style/held_out": HELD_OUT_STYLE}


def evaluate_all(out: Path, n_per_emoji: int, limit: int, seed: int, min_images: int,
                 overrides: list[str]) -> dict:
    from curation import workflow
    from curation.config import load_config

    from curation.emoji.train import TrainConfig, split_emoji

    trained, _, held_out = split_emoji(TrainConfig(), load_catalog())  # v2's validation emoji left out
    results = {}
    for task, config in TASKS.items():
        for split, style in SPLITS.items():
            emojis = held_out if split.endswith("held_out") else trained
            wanted, unwanted = write_split(out / "images" / task / split, task, emojis, n_per_emoji, limit,
                                           seed, min_images, style)
            name = split.replace("/", "-")
            cfg = load_config(config, [f"evaluation.wanted_uri={wanted}", f"evaluation.unwanted_uri={unwanted}",
                                       f"output.uri={out}", f"run_name=eval-{task}-{name}", *overrides])
            results[f"{task}/{split}"] = workflow.evaluate(cfg)
    (out / "demo_evaluation.json").write_text(json.dumps(results, indent=2))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo/eval"))
    parser.add_argument("--n-per-emoji", type=int, default=2)
    parser.add_argument("--limit", type=int, default=400, help="at most this many emoji per class")
    parser.add_argument("--min-images", type=int, default=60, help="at least this many renders per class")
    parser.add_argument("--seed", type=int, default=1234, help="render seed (training used others)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    configure_logging()
    results = evaluate_all(args.out, args.n_per_emoji, args.limit, args.seed, args.min_images,
                           args.overrides)
    for key, report in results.items():
        for name, row in report.items():
            print(f"{key:<18} {name:<10} AUROC {row['auroc']:.3f}  FPR95 {row['fpr95']:.3f}  "
                  f"(wanted {row['n_wanted']}, unwanted {row['n_unwanted']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
