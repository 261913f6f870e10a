"""Weight averaging ("model soup") of emoji-clip image towers fine-tuned from one starting point.

Why: runs fine-tuned from the same weights stay in one basin of the loss, so the plain mean of
their tensors is itself a good model and often generalises better than each run alone (Wortsman et
al., "Model soups", ICML 2022); emoji-clip v2 is such a mean (README, "emoji-clip v2", stage 3).
Averaging towers trained from different starts gives noise, so every ingredient must be the base
itself or name the base as its `--init-from` (`init_from_sha256` in its sidecar). BatchNorm
statistics are averaged like the weights: re-estimating them on training renders scored lower on
the icon validation (measured on a three-run soup).

    python -m curation.emoji.soup --base stage2.safetensors --out curation/emoji/weights/emoji-clip-v2.safetensors \\
        stage2.safetensors smooth-a.safetensors smooth-b.safetensors

Each ingredient's sidecar (the `.json` beside it, with its command and schedule) is copied into
the soup's sidecar, whose `reproduce` lists every command behind the soup, oldest first (earlier
stages from an ingredient's `lineage`, then the ingredients', then this one). Paths are as they
were when each command ran: an `--init-from` may name a file that held other weights then, and the
recorded hashes (`init_from_sha256`, `weights_sha256`) say which.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from curation.progress import configure_logging

if TYPE_CHECKING:  # pragma: no cover
    import torch

METHOD = ("uniform mean of each floating tensor over the ingredients (computed in fp32, saved in fp16); "
          "integer BatchNorm batch counters from the first ingredient")


def average_towers(paths: Sequence[str | Path]) -> dict[str, "torch.Tensor"]:
    """The element-wise mean (computed in fp32) of each floating tensor over the weights files;
    integer buffers (BatchNorm batch counters) are taken from the first. Refuses files whose tensor
    names, shapes or image-tower configs differ, naming the file."""
    from curation.emoji.model import read_image_tower

    if len(paths) < 2:
        raise ValueError(f"a soup needs at least two ingredients, got {len(paths)}")
    first, first_meta = read_image_tower(paths[0])
    sums = {k: v.float() if v.is_floating_point() else v.clone() for k, v in first.items()}
    expected = {k: tuple(v.shape) for k, v in first.items()}
    for path in paths[1:]:
        tensors, meta = read_image_tower(path)
        if meta.get("vision_cfg") != first_meta.get("vision_cfg"):
            raise ValueError(f"{path} has image tower {meta.get('vision_cfg')}, "
                             f"{paths[0]} has {first_meta.get('vision_cfg')}: they cannot be averaged")
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        if shapes != expected:
            differ = sorted(k for k in set(shapes) | set(expected) if shapes.get(k) != expected.get(k))
            raise ValueError(f"{path} does not match {paths[0]}: tensors {differ[:5]} differ")
        for k, v in tensors.items():
            if v.is_floating_point():
                sums[k] += v.float()
    return {k: v / len(paths) if v.is_floating_point() else v for k, v in sums.items()}


def ingredient_sidecar(path: str | Path) -> dict:
    """The training sidecar beside a weights file (`train.train` writes it); a soup without its
    ingredients' commands could not be reproduced, so a missing one is an error."""
    sidecar = Path(path).with_suffix(".json")
    if not sidecar.is_file():
        raise FileNotFoundError(f"{sidecar} not found: each ingredient needs the sidecar its training run "
                                "wrote beside it")
    return json.loads(sidecar.read_text())


def check_common_start(paths: Sequence[str | Path], sidecars: Sequence[dict], base: str | Path) -> str:
    """The base's sha256, after checking that every ingredient (its weights file and its
    `ingredient_sidecar`) is the base or was trained from it."""
    from curation.storage import file_sha256

    base_sha = file_sha256(base)
    seen: dict[str, str] = {}
    for path, sidecar in zip(map(str, paths), sidecars):
        sha = file_sha256(path)
        if sha in seen:
            raise ValueError(f"{path} holds the same weights as {seen[sha]}: an ingredient listed twice "
                             "would count twice in the mean")
        seen[sha] = path
        started = sidecar.get("init_from_sha256")
        if base_sha not in (sha, started):
            start = f"weights {started[:16]}" if started else "random weights (or its sidecar does not say)"
            raise ValueError(f"{path} was trained from {start}, not from the base {base} ({base_sha[:16]}): "
                             "only runs fine-tuned from one start can be averaged")
    return base_sha


def commands_behind(sidecar: dict) -> list[str]:
    """Every command that made a weights file, oldest first: the stages of its `lineage`, then its
    own (`reproduce`, or `command`); a soup's sidecar already holds such a list."""
    stages = sidecar.get("lineage", {}).get("stages", [])
    own = sidecar.get("reproduce") or " ".join(sidecar["command"])
    return [stage.get("reproduce") or stage["command"] for stage in stages] + (own if isinstance(own, list) else [own])


def make_soup(ingredients: Sequence[str | Path], base: str | Path, out: str | Path, command: Sequence[str] = (),
              cfg=None, emojis: list | None = None) -> dict:
    """Average `ingredients` (all fine-tuned from `base`) into `out` (fp16 safetensors) and write
    its sidecar: the ingredients' own sidecars, and the naming report measured on the saved file
    exactly as `python -m curation.emoji.naming` would (`cfg`: the split, today's TrainConfig by
    default). Returns the sidecar."""
    from curation.emoji import naming
    from curation.emoji.model import build_emoji_clip, save_image_tower
    from curation.emoji.train import software_versions

    started = time.time()
    ingredients = [str(p) for p in ingredients]
    sidecars = [ingredient_sidecar(path) for path in ingredients]  # read before `out` may replace one
    base_sha = check_common_start(ingredients, sidecars, base)
    recorded = [{**sidecar, "given_as": path} for path, sidecar in zip(ingredients, sidecars)]
    model, _, _ = build_emoji_clip("cpu", ingredients[0])
    model.load_state_dict(average_towers(ingredients), strict=False)
    out = save_image_tower(model, out, {"command": " ".join(command), "ingredients": str(len(ingredients))})
    measured = naming.measure([out], cfg, emojis)[str(out)]
    sidecar = {"command": list(command), "method": METHOD,
               "base_sha256": base_sha, "ingredients": recorded, "eval": {k: v for k, v in measured.items()
                                                                          if k != "weights_sha256"},
               "weights": str(out), "weights_sha256": measured["weights_sha256"],
               "weights_bytes": Path(out).stat().st_size,
               "image_tower_params": sum(p.numel() for p in model.visual.parameters()),
               "versions": software_versions(), "wall_seconds": round(time.time() - started, 1),
               "reproduce": list(dict.fromkeys(c for r in recorded for c in commands_behind(r))) + [" ".join(command)]}
    Path(out).with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return sidecar


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m curation.emoji.soup", description=__doc__.split("\n\n")[0])
    parser.add_argument("ingredients", nargs="+", help="weights files fine-tuned from --base (or --base itself)")
    parser.add_argument("--base", required=True, help="the weights every ingredient started from")
    parser.add_argument("--out", required=True, type=Path, help="soup weights (.safetensors); sidecar .json beside it")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    configure_logging()
    sidecar = make_soup(args.ingredients, args.base, args.out, ["python", "-m", "curation.emoji.soup", *argv])
    print(json.dumps({"weights": sidecar["weights"], "weights_sha256": sidecar["weights_sha256"],
                      "validation_icon_naming_top1": sidecar["eval"]["validation_icon_naming_top1"],
                      "naming": {s: r.get("all") for s, r in sidecar["eval"]["naming"].items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
