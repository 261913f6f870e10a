"""Compute defaults that follow the cluster: `ray_data.resolve_compute` is pure, tested without Ray."""

import pytest

from curation.config import ComputeConfig
from curation.pipeline.ray_data import MAX_THREADS_PER_ACTOR, resolve_compute


def test_two_cpu_node_gets_one_actor_with_both_cores_as_torch_threads():
    plan = resolve_compute(ComputeConfig(), [2.0], gpus=0)
    assert (plan.actors, plan.torch_threads, plan.gpus_per_actor) == (1, 2, 0.0)
    # decoding always finds a core: actors never reserve what decode tasks need
    assert plan.actors * plan.cpus_per_actor + plan.decode_cpus <= 2.0
    assert plan.cpus_per_actor == pytest.approx(1.25)


@pytest.mark.parametrize("cpus,nodes", [(16, 1), (64, 1), (8, 3), (4, 2), (1, 1), (3, 1)])
def test_cpu_clusters_use_every_core_without_oversubscribing_threads(cpus, nodes):
    plan = resolve_compute(ComputeConfig(), [float(cpus)] * nodes, gpus=0)
    per_node = plan.actors // nodes
    assert plan.actors % nodes == 0 and per_node >= 1
    assert plan.torch_threads <= max(MAX_THREADS_PER_ACTOR, cpus // per_node)
    assert per_node * plan.torch_threads == pytest.approx(cpus, abs=per_node)  # threads cover the node's cores
    assert per_node * plan.cpus_per_actor + plan.decode_cpus <= cpus


def test_gpu_cluster_gets_one_actor_per_gpu():
    plan = resolve_compute(ComputeConfig(), [16.0, 16.0], gpus=4)
    assert (plan.actors, plan.gpus_per_actor, plan.cpus_per_actor, plan.torch_threads) == (4, 1.0, 1.0, None)
    half = resolve_compute(ComputeConfig(gpus_per_actor=0.5), [16.0], gpus=1)
    assert (half.actors, half.gpus_per_actor) == (2, 0.5)
    assert resolve_compute(ComputeConfig(gpus_per_actor=0), [16.0], gpus=1).gpus_per_actor == 0  # CPUs only


def test_fields_the_config_sets_are_kept():
    given = ComputeConfig(actors=3, cpus_per_actor=0.5, torch_threads=1)
    plan = resolve_compute(given, [8.0], gpus=0)
    assert (plan.actors, plan.cpus_per_actor, plan.torch_threads) == (3, 0.5, 1)
    # a set actor count still gets threads that share the node's cores among them
    assert resolve_compute(ComputeConfig(actors=2), [8.0], gpus=0).torch_threads == 4


def test_batch_size_follows_the_device_unless_configured():
    from curation.config import load_config
    from curation.models import CPU_BATCH, GPU_BATCH, ModelConfig, batch_size_for

    auto = load_config(None, ["model.batch_size=null"]).model
    assert auto.batch_size is None
    assert (batch_size_for(auto, on_gpu=False), batch_size_for(auto, on_gpu=True)) == (CPU_BATCH, GPU_BATCH)
    assert batch_size_for(ModelConfig(batch_size=8), on_gpu=True) == 8
    with pytest.raises(ValueError, match="model.batch_size: must be a positive integer or null"):
        ModelConfig(batch_size=0)
