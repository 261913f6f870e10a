"""A real second node: a Ray head plus a second raylet joined with `ray start --address`, both on
this machine, and `curation curate` with work on both nodes."""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from curation.config import to_dict
from images import write_rgb_images
from test_services import VENV_BIN, cli_env, free_port, run_cli


def _ray_start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`ray start ... --block` in its own session, so the test can stop the node and its children."""
    ports = {name: free_port() for name in ("node-manager-port", "object-manager-port", "metrics-export-port",
                                              "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                              "runtime-env-agent-port")}
    return subprocess.Popen([str(VENV_BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                             *args, *(f"--{name}={port}" for name, port in ports.items())],
                            env=env, start_new_session=True, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def _wait_for_nodes(address: str, env: dict, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = subprocess.run([str(VENV_BIN / "ray"), "status", f"--address={address}"], env=env,
                                capture_output=True, text=True, timeout=60)
        if status.stdout.count("node_") >= count:
            return
        time.sleep(1)
    raise AssertionError(f"the cluster did not reach {count} nodes:\n{status.stdout}{status.stderr}")


def _actor_nodes(dashboard: str, env: dict) -> dict[str, set[str]]:
    """Node ids per actor class, from the cluster's state API (dead actors stay listed)."""
    listing = subprocess.run([str(VENV_BIN / "ray"), "list", "actors", f"--address={dashboard}", "--detail",
                              "--format=json", "--limit=1000"], env=env, capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr[-2000:]
    nodes: dict[str, set[str]] = {}
    for actor in json.loads(listing.stdout):
        nodes.setdefault(actor["class_name"], set()).add(actor["node_id"])
    return nodes


@pytest.mark.slow
def test_curate_on_a_two_node_cluster_uses_both_nodes(make_config, tmp_path, shared_cache):
    source = tmp_path / "images"
    write_rgb_images(source, 24, seed=21)
    # Two embedding actors of 1.5 CPUs each cannot share a 2-CPU node: one lands on each node.
    cfg = make_config(source, "compute.actors=2", "compute.cpus_per_actor=1.5", "source.partition_size=4",
                      "model.batch_size=4", detectors=("mcm",))
    config_file = tmp_path / "cluster.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(cfg)))
    env = cli_env(tmp_path, shared_cache)
    ray_temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # unix socket paths must stay < 108 chars
    port, dashboard = free_port(), free_port()
    head = _ray_start(["--head", f"--port={port}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
                       "--include-dashboard=true", f"--temp-dir={ray_temp}"], env, tmp_path / "head.log")
    worker = None
    try:
        address = f"127.0.0.1:{port}"
        _wait_for_nodes(address, env, 1)
        worker = _ray_start([f"--address={address}"], env, tmp_path / "worker.log")
        _wait_for_nodes(address, env, 2)
        env["RAY_ADDRESS"] = address

        # local output on a 2-node cluster: refused, naming the fix, before anything is written
        refused = run_cli(["curate", "--config", str(config_file)], env, tmp_path)
        assert refused.returncode == 1, refused.stderr[-3000:]
        assert "compute.shared_filesystem: true" in refused.stderr and "output.uri=" in refused.stderr
        assert not (tmp_path / "out" / "test" / "summary.json").exists()

        # declared shared (both raylets see this machine's disk): runs, with actors on both nodes
        done = run_cli(["curate", "--config", str(config_file), "--set", "compute.shared_filesystem=true"],
                       env, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        run_dir = tmp_path / "out" / "test"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["total"]["items"] == 24 and summary["total"]["failed"] == 0
        ids = pq.read_table(run_dir / "scores").column("id").to_pylist()
        assert sorted(ids) == sorted(p.name for p in source.iterdir())
        embedders = {cls: nodes for cls, nodes in _actor_nodes(f"http://127.0.0.1:{dashboard}", env).items()
                     if "MapWorker" in cls}
        assert embedders and all(len(nodes) == 2 for nodes in embedders.values()), embedders
    finally:
        for node in (worker, head):
            if node is not None:
                os.killpg(node.pid, signal.SIGTERM)
                node.wait(timeout=60)
        shutil.rmtree(ray_temp, ignore_errors=True)
