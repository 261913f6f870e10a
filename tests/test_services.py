"""The job against real services: moto's S3 server, a real `mlflow server`, a Ray head node with
`ray job submit`, and the CLI killed half-way and started again."""

import json
import shutil
import tempfile
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curation import storage, workflow
from curation.storage import StorageUnreachableError
from images import write_image_zoo, write_rgb_images
from mlflow_server import mlflow_server
from s3server import DUMMY_KEY, DUMMY_SECRET, make_bucket, moto_s3

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def upload_tree(local: Path, uri: str, options: dict) -> list[str]:
    names = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    for name in names:
        storage.write_bytes(storage.join(uri, name), (local / name).read_bytes(), options)
    return names


def cli_env(tmp_path: Path, shared_cache: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "CURATION_CACHE": str(shared_cache),
            "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "RAY_ADDRESS": ""}


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_s3_in_s3_out_tracked_on_mlflow_server(make_config, tmp_path, capsys):
    import mlflow

    local = tmp_path / "images"
    expected = write_image_zoo(local / "zoo")
    write_rgb_images(local / "good", 6)
    with moto_s3() as s3, mlflow_server(tmp_path / "mlflow") as tracking_uri:
        make_bucket(s3, "curation-in")
        make_bucket(s3, "curation-out")
        names = upload_tree(local, "s3://curation-in/images", s3)
        options = json.dumps(s3)
        cfg = make_config("s3://curation-in/images", f"source.storage_options={options}",
                          "output.uri=s3://curation-out/runs", f"output.storage_options={options}",
                          f"tracking.uri={tracking_uri}", "tracking.experiment=s3-test")
        summary = workflow.curate(cfg)

        run = "s3://curation-out/runs/test"
        listed = lambda folder: sorted(f.split(f"{run}/{folder}/", 1)[1] for f in storage.list_files(f"{run}/{folder}", s3))
        fs, path = storage.pyarrow_filesystem(f"{run}/failed", s3)
        failed = pq.read_table(path, filesystem=fs).column("id").to_pylist()
        assert sorted(listed("kept") + listed("removed") + failed) == names
        assert len(failed) == sum(v != "ok" for v in expected.values())

        client = mlflow.MlflowClient(tracking_uri)
        run_info = client.get_run(summary["mlflow_run_id"])
        assert run_info.data.metrics["this_run.items"] == len(names)
        assert run_info.data.metrics["this_run.failed"] == len(failed)
        assert "threshold.hftt" in run_info.data.metrics
        assert run_info.data.params["config.source.uri"] == "s3://curation-in/images"
        assert all(DUMMY_SECRET not in v and DUMMY_KEY not in v for v in run_info.data.params.values())
        artifacts = {a.path for a in client.list_artifacts(summary["mlflow_run_id"])}
        assert {"detectors", "plots", "summary.json"} <= artifacts
        plots = {a.path for a in client.list_artifacts(summary["mlflow_run_id"], "plots")}
        assert any(p.endswith(".png") for p in plots)
        detector_files = {a.path for a in client.list_artifacts(summary["mlflow_run_id"], "detectors/neg")}
        assert {"detectors/neg/detector.json", "detectors/neg/tensors.safetensors"} == detector_files
    out = capsys.readouterr()
    assert DUMMY_SECRET not in out.out + out.err


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_unreachable_s3_endpoint_fails_fast_and_writes_nothing(make_config, tmp_path):
    port = free_port()  # nothing listens here
    options = json.dumps({"endpoint_url": f"http://127.0.0.1:{port}", "key": "k", "secret": "s3cr3t-value"})
    cfg = make_config("s3://curation-in/images", f"source.storage_options={options}")
    start = time.monotonic()
    with pytest.raises(StorageUnreachableError) as err:
        workflow.curate(cfg)
    assert time.monotonic() - start < 60
    assert f"127.0.0.1:{port}" in str(err.value) and "s3cr3t-value" not in str(err.value)
    assert not (tmp_path / "out").exists(), "nothing half-written, nothing marked done"


def run_cli(args: list[str], env: dict, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "curation"), *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def contract_overrides(source: Path, out: Path, tracking: str, run_name: str = "contract") -> list[str]:
    """The overrides outside checks use with configs/demo.yaml."""
    return ["--set", f"source.uri={source}", "--set", "source.format=images", "--set", f"output.uri={out}",
            "--set", f"run_name={run_name}", "--set", f"tracking.uri={tracking}"]


@pytest.mark.slow
def test_cli_killed_half_way_resumes_without_duplicates_or_loss(tmp_path, shared_cache):
    source = tmp_path / "images"
    write_rgb_images(source, 40, seed=11)
    (source / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    env = cli_env(tmp_path, shared_cache)
    args = ["curate", "--config", str(REPO / "configs/demo.yaml"),
            *contract_overrides(source, tmp_path / "out", f"sqlite:///{tmp_path}/mlflow.db"),
            "--set", "source.partition_size=2", "--set", "model.batch_size=2"]
    manifest = tmp_path / "out" / "contract" / "_manifest"
    proc = subprocess.Popen([str(VENV_BIN / "curation"), *args], env=env, cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 1800  # a cold detector cache first fits on full corpora (minutes)
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.exists() and len(list(manifest.glob("*/*.json"))) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(manifest.glob("*/*.json")))
    assert 3 <= done_before < 21

    finished = run_cli(args, env, tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    run_dir = tmp_path / "out" / "contract"
    scores = pq.read_table(run_dir / "scores").column("id").to_pylist()
    failed = pq.read_table(run_dir / "failed").column("id").to_pylist()
    assert len(scores) == len(set(scores)) and failed == ["broken.jpg"]
    assert sorted(scores + failed) == sorted(p.name for p in source.iterdir())
    outputs = sorted(p.name for folder in ("kept", "removed") if (run_dir / folder).exists()
                     for p in (run_dir / folder).iterdir())
    assert outputs == sorted(scores)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["total"]["items"] == 41
    assert summary["this_run"]["items"] <= 41 - 2 * done_before, "finished partitions are not redone"


@pytest.mark.slow
def test_ray_job_submit_runs_the_job_on_a_head_node(tmp_path, shared_cache):
    source = tmp_path / "images"
    write_rgb_images(source, 6, seed=12)
    env = cli_env(tmp_path, shared_cache)
    ray_temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # unix socket paths must stay < 108 chars
    head_log = tmp_path / "head.log"
    port, dashboard, agent, agent_grpc, runtime_env, metrics = (free_port() for _ in range(6))
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--num-cpus=2", "--include-dashboard=true",
         f"--temp-dir={ray_temp}"], env=env, start_new_session=True,
        stdout=head_log.open("wb"), stderr=subprocess.STDOUT)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        submit = [str(VENV_BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
                  "python", "jobs/curate.py", "--config", "configs/demo.yaml",
                  *contract_overrides(source, tmp_path / "out", f"sqlite:///{tmp_path}/mlflow.db", "submitted")]
        for _ in range(60):  # the dashboard's job server takes a few seconds to come up
            result = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900)
            if not any(m in result.stdout + result.stderr for m in ("Failed to connect", "No available agent")):
                break
            time.sleep(2)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:] + head_log.read_text()[-2000:]
        assert "succeeded" in result.stdout
        summary = json.loads((tmp_path / "out" / "submitted" / "summary.json").read_text())
        assert summary["this_run"]["items"] == 6
        assert pq.read_table(tmp_path / "out" / "submitted" / "scores").num_rows == 6

        # as a new user first tried: the demo config's relative source, output and default MLflow
        # store would resolve inside the job's temporary working directory; refused, not "succeeded"
        naive = submit[:submit.index("--config") + 2]
        refused = subprocess.run(naive, env=env, capture_output=True, text=True, timeout=900)
        assert refused.returncode != 0 and "succeeded" not in refused.stdout
        assert "relative paths resolve in the job's temporary working directory" in refused.stdout + refused.stderr
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        shutil.rmtree(ray_temp, ignore_errors=True)
