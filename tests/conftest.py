import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may wait on the network
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_encoder():
    """The tiny random-weight open_clip model: every code path, seconds to load."""
    from curation.models import ModelConfig, load_model

    return load_model(ModelConfig(name="tiny-clip", seed=0))


@pytest.fixture
def cached_tiny(tiny_encoder, tmp_path):
    from curation.text.cache import CachedTextEncoder

    return CachedTextEncoder(tiny_encoder, tmp_path / "text-cache")
