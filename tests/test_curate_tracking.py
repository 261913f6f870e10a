"""The jobs and their MLflow tracking store: credentials never recorded, an unreachable server found
at start in seconds, a server lost mid-run costing the tracking only, never the outputs."""

import contextlib
import http.server
import json
import logging
import socket
import threading
import time
from pathlib import Path

import pytest

from curation import cli, workflow
from curation.tracking import TrackingUnreachableError
from images import write_rgb_images
from mlflow_server import stand_in_handler

pytestmark = pytest.mark.usefixtures("ray_local")
PASSWORD = "s3cr3t-pw-do-not-log"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _assert_complete(source: Path, run_dir: Path) -> None:
    """Every input image is in kept/ or removed/ (these are all decodable), once."""
    inputs = sorted(str(p.relative_to(source)) for p in source.rglob("*") if p.is_file())
    outputs = sorted(str(p.relative_to(run_dir / folder)) for folder in ("kept", "removed")
                     if (run_dir / folder).exists() for p in (run_dir / folder).rglob("*") if p.is_file())
    assert outputs == inputs and len(list((run_dir / "_manifest").iterdir())) >= 1


@contextlib.contextmanager
def _server_that_dies_after_the_probe():
    """Answers the first request like an MLflow server (the job's start-up probe), then closes its
    port: the tracking server going away mid-run."""
    server = http.server.HTTPServer(("127.0.0.1", 0), stand_in_handler())
    server.timeout = 120

    def serve_once():
        server.handle_request()
        server.server_close()

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    thread.join(timeout=1)


@pytest.mark.parametrize("job", ["curate", "train", "rescore", "evaluate"])
def test_unreachable_tracking_server_fails_at_start(job, make_config, tmp_path, monkeypatch):
    def no_ray(*args):
        raise AssertionError("Ray started before the tracking server was checked")

    monkeypatch.setattr(workflow.ray_data, "init_ray", no_ray)
    source = tmp_path / "images"
    write_rgb_images(source, 2)
    port = _closed_port()
    cfg = make_config(str(source), f"tracking.uri=http://alice:{PASSWORD}@127.0.0.1:{port}",
                      f"evaluation.wanted_uri={source}", f"evaluation.unwanted_uri={source}")
    run = {"curate": lambda: workflow.curate(cfg), "train": lambda: workflow.train(cfg),
           "rescore": lambda: workflow.rescore(cfg, str(tmp_path / "previous")),
           "evaluate": lambda: workflow.evaluate(cfg)}[job]
    start = time.perf_counter()
    with pytest.raises(TrackingUnreachableError) as caught:
        run()
    elapsed = time.perf_counter() - start
    print(f"{job}: unreachable tracking server reported after {elapsed:.2f} s")
    assert elapsed < 5
    assert not (tmp_path / "out").exists(), "nothing may be written before the check"
    message = str(caught.value)
    assert PASSWORD not in message and f"alice:***@127.0.0.1:{port}" in message


def test_tracking_server_lost_mid_run_keeps_outputs(make_config, tmp_path, capsys):
    source = tmp_path / "images"
    write_rgb_images(source, 6, seed=11)
    with _server_that_dies_after_the_probe() as host:
        cfg = make_config(str(source), f"tracking.uri=http://alice:{PASSWORD}@{host}", detectors=("mcm",))
        summary = workflow.curate(cfg)
    run_dir = tmp_path / "out" / "test"
    _assert_complete(source, run_dir)
    text = (run_dir / "summary.json").read_text()
    on_disk = json.loads(text)
    assert on_disk["tracking"] == summary["tracking"] and summary["tracking"]["status"] == "failed"
    assert on_disk["mlflow_run_id"] is None and on_disk["this_run"]["items"] == 6
    assert f"alice:***@{host}" in summary["tracking"]["error"] and PASSWORD not in text
    assert cli.report(summary) == 1
    printed = capsys.readouterr()
    assert "MLflow tracking failed" in printed.err and PASSWORD not in printed.out + printed.err

    with _server_that_dies_after_the_probe() as host:
        cfg = make_config(str(source), "run_name=rescored", "detectors.0.threshold.value=0.0",
                          f"tracking.uri=http://alice:{PASSWORD}@{host}", detectors=("mcm",))
        rescored = workflow.rescore(cfg, str(run_dir))
    _assert_complete(source, tmp_path / "out" / "rescored")
    text = (tmp_path / "out" / "rescored" / "summary.json").read_text()
    assert json.loads(text)["tracking"]["status"] == rescored["tracking"]["status"] == "failed"
    assert PASSWORD not in text and rescored["this_run"]["removed"] == 6


@pytest.mark.slow
def test_credentials_in_uris_are_never_recorded(make_config, tmp_path, caplog, capsys):
    """A tracking URI with user:password against a real MLflow server (the client sends the
    userinfo as basic auth): the run is tracked, and no password reaches MLflow params, tags or
    artifacts, _config.json, summary.json, the log or stdout (MLflow prints a "View run" URL)."""
    import mlflow

    from mlflow_server import mlflow_server

    source = tmp_path / "images"
    write_rgb_images(source, 4, seed=12)
    with mlflow_server(tmp_path / "server") as url:
        uri = url.replace("http://", f"http://alice:{PASSWORD}@")
        cfg = make_config(str(source), f"tracking.uri={uri}", f"output.storage_options={{secret: {PASSWORD}}}",
                          f"evaluation.wanted_uri=https://b.s3.amazonaws.com/x?X-Amz-Signature={PASSWORD}",
                          detectors=("mcm",))
        with caplog.at_level(logging.INFO):
            summary = workflow.curate(cfg)
        client = mlflow.MlflowClient(url)
        run = client.get_run(summary["mlflow_run_id"])
        artifact = Path(client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path / "dl")))
        artifact_text = artifact.read_text()
    assert summary["tracking"] == {"status": "ok", "run_id": summary["mlflow_run_id"]}
    params, tags = run.data.params, run.data.tags
    assert params["config.tracking.uri"] == url.replace("http://", "http://alice:***@")
    assert params["config.output.storage_options.secret"] == "***"
    assert params["config.evaluation.wanted_uri"].endswith("X-Amz-Signature=***")
    assert not [k for k, v in {**params, **tags}.items() if PASSWORD in v]
    run_dir = tmp_path / "out" / "test"
    owner = json.loads((run_dir / "_config.json").read_text())
    assert owner["config"]["tracking"]["uri"] == params["config.tracking.uri"]
    assert owner["decision_hash"] == cfg.decision_hash()  # hashed from the real config
    printed = capsys.readouterr()
    for text in ((run_dir / "_config.json").read_text(), (run_dir / "summary.json").read_text(),
                 artifact_text, caplog.text, printed.out, printed.err):
        assert PASSWORD not in text
    assert f"alice:***@{url.split('://')[1]}" in caplog.text  # the tracker's "MLflow run ... at" line
