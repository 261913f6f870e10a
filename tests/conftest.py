import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may wait on the network
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests name their stores; `tracking.uri: null` honours this
if "CURATION_CACHE" not in os.environ:  # generated configs and caches stay out of ~/.cache
    import tempfile

    os.environ["CURATION_CACHE"] = tempfile.mkdtemp(prefix="curation-test-cache-")

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


WORLD_WORDS = ["car", "tree", "house", "river", "cloud", "shoe", "lamp", "chair", "mountain", "phone",
               "bicycle", "window", "guitar", "bottle", "pencil", "garden", "bridge", "candle"]


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session ("local" never joins a stale cluster)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """Text embeddings and fitted detectors shared by all tests (keyed by model and config)."""
    return tmp_path_factory.mktemp("curation-cache")


@pytest.fixture(scope="session")
def world_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "world.txt"
    path.write_text("\n".join(WORLD_WORDS) + "\n")
    return str(path)


@pytest.fixture
def make_config(shared_cache, world_file, tmp_path):
    """A small, fast run config (tiny model, three detectors) with dotted overrides."""
    from curation.config import load_config

    def make(source_uri, *overrides, detectors=("neglabel", "hftt", "mcm")):
        base = [f"source.uri={source_uri}", f"output.uri={tmp_path / 'out'}", "run_name=test",
                f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"cache_dir={shared_cache}",
                "source.partition_size=8", "model.batch_size=16", "compute.cpus_per_actor=1.0",
                "compute.decode_cpus=0.5"]
        specs = {
            "neglabel": "{kind: neglabel, name: neg, task_texts: [apple, banana, bread], "
                        "params: {ngroup: 5, noun_lexnames: [noun.shape], adj_lexnames: [adj.ppl]}, "
                        "threshold: {strategy: fixed, value: 0.5}}",
            "hftt": f"{{kind: hftt, name: hftt, task_texts: [apple, banana, bread], corpus: {world_file}, "
                    "params: {templates: ['a photo of a {}.'], n_trainable: 3, batch_size: 8}, "
                    "threshold: {strategy: quantile, value: 0.3, sample_size: 64, min_sample: 2}}",
            "mcm": "{kind: mcm, name: mcm, task_texts: [apple, banana, bread], "
                   "threshold: {strategy: fixed, value: 0.5}}",
        }
        base.append("detectors=[" + ", ".join(specs[d] for d in detectors) + "]")
        return load_config(None, base + list(overrides))

    return make
