import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from curation.models import ModelConfig, load_model, model_identity
from curation.text.cache import CachedTextEncoder

PROMPTS = ["a photo of a dog.", "the nice ice cream cone", "This is a photo of a antidisestablishmentarianism."]


def test_text_encoding_is_normalised_float32_and_trim_changes_nothing(tiny_encoder):
    trimmed = tiny_encoder.encode_text(PROMPTS * 10)
    full = tiny_encoder.encode_text(PROMPTS * 10, trim=False)
    assert trimmed.dtype == np.float32 and trimmed.shape == (30, 32)
    assert np.allclose(np.linalg.norm(trimmed, axis=1), 1.0, atol=1e-5)
    assert np.abs(trimmed - full).max() < 1e-5


def test_image_encoding_batches(tiny_encoder):
    pixels = torch.rand(5, 3, 32, 32)
    one_batch = tiny_encoder.encode_pixels(pixels)
    tiny_encoder.batch_size = 2
    try:
        assert np.allclose(tiny_encoder.encode_pixels(pixels), one_batch, atol=1e-6)
    finally:
        tiny_encoder.batch_size = 64
    assert np.allclose(np.linalg.norm(one_batch, axis=1), 1.0, atol=1e-5)


def test_random_weights_are_seeded(tiny_encoder):
    again = load_model(ModelConfig(name="tiny-clip", seed=0)).encode_text(PROMPTS)
    other = load_model(ModelConfig(name="tiny-clip", seed=1)).encode_text(PROMPTS)
    assert np.allclose(again, tiny_encoder.encode_text(PROMPTS))
    assert not np.allclose(other, again)


def test_local_checkpoint_loads_with_hash_identity(tiny_encoder, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_encoder.model.state_dict(), path)
    loaded = load_model(ModelConfig(name="tiny-clip", pretrained=str(path)))
    assert loaded.identity.startswith("tiny-clip/sha256:")
    assert np.allclose(loaded.encode_text(PROMPTS), tiny_encoder.encode_text(PROMPTS), atol=1e-6)


def test_missing_pretrained_weights_fail_fast_with_instructions():
    """Even without HF_HUB_OFFLINE, an unreachable hub must not hang for most of a minute."""
    code = ("from curation.models import *\n"
            "try:\n load_model(ModelConfig(name='ViT-B-16', pretrained='openai'))\n"
            "except WeightsUnavailableError as e: print('ERR', e)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "HF_HUB_OFFLINE"}
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.monotonic() - start
    assert "ERR" in out.stdout, out.stderr[-2000:]
    assert "local checkpoint" in out.stdout and "HF_HUB_OFFLINE" in out.stdout
    assert elapsed < 30  # process start + imports dominate; the network wait alone was ~46 s


def test_unknown_tag_and_architecture_list_choices():
    with pytest.raises(ValueError, match="Available tags: .*openai"):
        load_model(ModelConfig(name="ViT-B-16", pretrained="no-such-tag"))
    with pytest.raises(ValueError, match="unknown architecture 'ViT-Q-99'"):
        load_model(ModelConfig(name="ViT-Q-99"))
    with pytest.raises(ValueError, match="model.precision"):
        ModelConfig(precision="fp8")


def test_identity_names_the_weights():
    assert model_identity(ModelConfig(name="ViT-B-16", pretrained="openai")) == "ViT-B-16/openai"
    assert model_identity(ModelConfig(name="tiny-clip", seed=3)) == "tiny-clip/random-seed3"


def test_text_cache_hits_on_second_call_and_returns_same_rows(tiny_encoder, tmp_path):
    cache = CachedTextEncoder(tiny_encoder, tmp_path, shard_size=2)
    first = cache.encode_text(PROMPTS)
    assert (cache.hits, cache.misses) == (0, 2)
    second = cache.encode_text(PROMPTS)
    assert (cache.hits, cache.misses) == (2, 2)
    assert np.array_equal(first, second)
    assert np.allclose(first, tiny_encoder.encode_text(PROMPTS), atol=1e-6)
    other = CachedTextEncoder(load_model(ModelConfig(name="tiny-clip", seed=5)), tmp_path, shard_size=2)
    other.encode_text(PROMPTS)
    assert other.misses == 2  # another model never reads this model's rows


def test_emoji_clip_text_tower_is_a_real_sentence_encoder():
    """The demo model's locked MiniLM tower: meaningful similarities, exact pad trimming."""
    encoder = load_model(ModelConfig(name="emoji-clip", seed=0))
    gun, weapon, banana = encoder.encode_text(["a gun", "a weapon", "a banana"])
    assert gun @ weapon > 0.7 and gun @ banana < 0.6
    texts = ["a gun", "This is a photo of a antidisestablishmentarianism."] * 3
    assert np.abs(encoder.encode_text(texts) - encoder.encode_text(texts, trim=False)).max() < 1e-5
    assert encoder.encode_pixels(torch.rand(2, 3, 64, 64)).shape == (2, 384)
    with pytest.raises(ValueError, match="takes 'demo'"):
        load_model(ModelConfig(name="emoji-clip", pretrained="openai"))


def test_emoji_clip_text_cache_is_shared_across_image_towers(tmp_path):
    """Text features depend only on the pinned text tower: a retrained image tower reuses them."""
    first = load_model(ModelConfig(name="emoji-clip", seed=0))
    second = load_model(ModelConfig(name="emoji-clip", seed=1))
    assert first.identity != second.identity and first.cache_tag == second.cache_tag
    assert load_model(ModelConfig(name="tiny-clip", seed=0)).cache_tag.startswith("tiny-clip/random-seed0|")
