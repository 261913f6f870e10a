"""Text encoding: cached + context-trimmed vs plain open_clip `encode_text`, same prompts.

"plain" tokenises to 77 positions and calls `model.encode_text` in batches, as users would. "trimmed"
is `ClipEncoder.encode_text` (context cut to each batch's longest prompt) filling an empty cache;
"cached" reads the same corpus back. Outputs must agree within 1e-5.

    python benchmarks/text_encoding.py [--prompts 2000]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from _common import peak_rss_mb, write
from curation.models import ModelConfig, load_model
from curation.text.cache import CachedTextEncoder
from curation.text.templates import NEGLABEL_NOUN_TEMPLATE, fill


def plain_encode(encoder, texts, batch_size=256) -> np.ndarray:
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            tokens = encoder.tokenizer(texts[start:start + batch_size])
            out.append(F.normalize(encoder.model.encode_text(tokens).float(), dim=-1).numpy())
    return np.concatenate(out)


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def bench(model_name: str, texts: list[str]) -> dict:
    encoder = load_model(ModelConfig(name=model_name))
    plain, plain_s = timed(plain_encode, encoder, texts)
    with tempfile.TemporaryDirectory() as cache_dir:
        cached = CachedTextEncoder(encoder, cache_dir)
        trimmed, trimmed_s = timed(cached.encode_text, texts)
        again, cached_s = timed(cached.encode_text, texts)
    return {
        "model": model_name, "prompts": len(texts),
        "plain_s": round(plain_s, 2), "plain_prompts_per_s": round(len(texts) / plain_s),
        "trimmed_cold_s": round(trimmed_s, 2), "trimmed_speedup": round(plain_s / trimmed_s, 1),
        "cached_warm_s": round(cached_s, 3), "cached_speedup": round(plain_s / cached_s, 1),
        "max_abs_diff": float(max(np.abs(trimmed - plain).max(), np.abs(again - plain).max())),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--models", nargs="+", default=["tiny-clip", "ViT-B-16"])
    args = parser.parse_args()
    words = [w.strip() for w in open("/usr/share/dict/american-english-huge", encoding="utf-8")
             if w.strip().isalpha()][:: 97][: args.prompts]
    texts = fill(NEGLABEL_NOUN_TEMPLATE, words)
    results = [bench(name, texts) for name in args.models]
    assert all(r["max_abs_diff"] < 1e-5 for r in results), results
    write("text_encoding", {"runs": results, "peak_rss_mb": round(peak_rss_mb())})


if __name__ == "__main__":
    main()
