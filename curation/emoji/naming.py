"""Zero-shot naming of any emoji-clip weights on today's splits: the README's naming table.

The training run measures its own weights at the end (`train.naming_report`, in the sidecar);
this measures any weights file the same way, on the same fresh renders and the same split
(today's `TrainConfig` defaults), so v1 and v2, or two candidate v2 runs, compare on equal terms.

    python -m curation.emoji.naming --weights curation/emoji/weights/emoji-clip-v1.safetensors \\
        --weights curation/emoji/weights/emoji-clip-v2.safetensors --out demo/naming.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from curation.progress import configure_logging


def measure(weights: Sequence[str | Path], cfg=None, emojis: list | None = None) -> dict:
    """{weights path as given: sha256 and `train.naming_report`} for each weights file, all on one
    prepared split (`prepare_data(cfg, emojis)`; `cfg` defaults to today's TrainConfig). Keyed by
    path, not file name: two candidate runs usually share the name emoji-clip-v2.safetensors."""
    from curation.emoji import catalog, train
    from curation.emoji.model import build_emoji_clip
    from curation.storage import file_sha256

    cfg = cfg or train.TrainConfig()
    data = train.prepare_data(cfg, emojis)
    candidates = emojis if emojis is not None else catalog.load_catalog()
    results = {}
    for path in map(str, weights):
        model, _, tokenizer = build_emoji_clip("cpu", path)  # frozen, in eval mode
        results[path] = {"weights_sha256": file_sha256(path),
                         **train.naming_report(model, tokenizer, data, candidates, cfg)}
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m curation.emoji.naming", description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", action="append", required=True, help="a weights file (repeat to compare)")
    parser.add_argument("--out", type=Path, help="write the JSON here as well as to stdout")
    args = parser.parse_args(argv)
    configure_logging()
    text = json.dumps(measure(args.weights), indent=1) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
