"""curation.tracking against a local sqlite store and against a real `mlflow server`."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from curation.metrics import auroc
from curation.secrets import MARKER as REDACTED
from curation.secrets import redact
from curation.tracking import (
    Tracker,
    TrackingError,
    TrackingUnreachableError,
    check_reachable,
    flatten,
    resolve_tracking_uri,
    roc_points,
)
from mlflow_server import http_server, stand_in_handler

SECRET = "s3cr3t-do-not-log"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

CONFIG = {
    "run_name": "demo",
    "model": {"name": "tiny-clip", "pretrained": None, "batch_size": 64},
    "source": {"uri": "s3://bucket/images", "storage_options": {
        "key": "AKIA-TEST", "secret": SECRET, "endpoint_url": "http://127.0.0.1:9000",
        "client_kwargs": {"aws_session_token": SECRET}}},
    "detectors": [{"kind": "hftt", "task_texts": ["a dog"], "params": {"api_token": SECRET}}],
    "output": {"uri": "./out", "storage_options": {"password": SECRET}},
}


@pytest.fixture
def local_uri(tmp_path, monkeypatch) -> str:
    """The default store, in a temp cwd: nothing lands in the repository."""
    monkeypatch.chdir(tmp_path)
    return resolve_tracking_uri(None)


def _scores(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"hftt": rng.beta(2, 5, 200), "neg label/v2": rng.uniform(0, 1, 150)}


def _log_sample_run(uri: str) -> str:
    with Tracker(uri, "curation-test", "sample", tags={"stage": "curate"}) as tracker:
        tracker.log_params(flatten(CONFIG))
        tracker.log_params({"long": "x" * 10_000})
        tracker.log_metrics({"kept": 180, "removed": 20, "rate": np.float32(0.1)})
        tracker.log_metrics({"kept": 190}, step=1)
        tracker.log_score_histograms(_scores(), {"hftt": 0.5, "neg label/v2": 0.9})
        tracker.log_dict({"counts": {"kept": 180}, "storage_options": {"secret": SECRET}},
                         "summary.json")
        return tracker.run_id


def _artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    paths = set()
    for info in client.list_artifacts(run_id, path):
        paths |= _artifact_paths(client, run_id, info.path) if info.is_dir else {info.path}
    return paths


def _check_sample_run(uri: str, run_id: str, tmp_path: Path) -> None:
    import mlflow
    from PIL import Image

    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "sample"
    params = run.data.params
    assert params["model.name"] == "tiny-clip" and params["model.pretrained"] == "None"
    assert params["model.batch_size"] == "64"
    assert params["source.storage_options.endpoint_url"] == "http://127.0.0.1:9000"
    assert params["source.storage_options.secret"] == REDACTED
    assert params["source.storage_options.client_kwargs.aws_session_token"] == REDACTED
    assert json.loads(params["detectors"])[0]["task_texts"] == ["a dog"]
    assert params["long"] == "x" * 6000
    assert not [k for k, v in params.items() if SECRET in v or "AKIA" in v]
    assert run.data.tags["stage"] == "curate" and "mlflow.user" in run.data.tags
    assert run.data.metrics == {"kept": 190.0, "removed": 20.0, "rate": pytest.approx(0.1)}
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "kept")] == [
        (0, 180.0), (1, 190.0)]
    assert _artifact_paths(client, run_id) == {
        "summary.json", "plots/scores_hftt.png", "plots/scores_neg_label_v2.png"}
    local = Path(client.download_artifacts(run_id, "plots/scores_hftt.png", str(tmp_path)))
    assert local.read_bytes()[:8] == PNG_MAGIC
    with Image.open(local) as image:
        assert image.format == "PNG" and image.size == (640, 480)
    summary = Path(client.download_artifacts(run_id, "summary.json", str(tmp_path))).read_text()
    assert json.loads(summary)["counts"] == {"kept": 180} and SECRET not in summary


# -- pure helpers ---------------------------------------------------------------------------------
def test_resolve_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    expected = f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_tracking_uri(None) == resolve_tracking_uri("") == expected
    assert expected.startswith("sqlite:////")  # absolute path: four slashes
    for uri in ("http://mlflow:5000", "sqlite:///rel.db", "file:/tmp/mlruns"):
        assert resolve_tracking_uri(uri) == uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    assert resolve_tracking_uri(None) == "http://from-env:5000" and resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_flatten_dots_nested_keys_and_json_encodes_lists():
    assert flatten({"a": {"b": {"c": 1}, "d": [1, {"e": 2}]}, "f": None}) == {
        "a.b.c": 1, "a.d": '[1, {"e": 2}]', "f": None}
    assert flatten({"x": 1}, prefix="cfg.") == {"cfg.x": 1}


def test_redact_by_last_key_component():
    flat = {"source.storage_options.key": "k", "a.aws_secret_access_key": "s", "b.Password": "p",
            "c.session_token": "t", "c.endpoint_url": "http://e", "model.name": "m",
            "keep": "yes"}
    assert redact(flat) == {
        "source.storage_options.key": REDACTED, "a.aws_secret_access_key": REDACTED,
        "b.Password": REDACTED, "c.session_token": REDACTED, "c.endpoint_url": "http://e",
        "model.name": "m", "keep": "yes"}
    nested = redact({"so": {"secret": "s"}, "items": [{"token": "t"}]})
    assert nested == {"so": {"secret": REDACTED}, "items": [{"token": REDACTED}]}


def test_roc_points_match_auroc_with_ties():
    rng = np.random.default_rng(1)
    scores = np.round(rng.uniform(size=300), 1)  # many ties
    labels = (rng.uniform(size=300) < scores).astype(int)
    fpr, tpr = roc_points(scores, labels)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(auroc(scores, labels))


def test_import_is_light():
    code = ("import sys, curation.tracking; "
            "assert not {'mlflow', 'matplotlib'} & set(sys.modules), 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- local store ----------------------------------------------------------------------------------
def test_local_run_round_trip(local_uri, tmp_path):
    run_id = _log_sample_run(local_uri)
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "mlruns").is_dir()
    _check_sample_run(local_uri, run_id, tmp_path / "download")


def test_exception_marks_run_failed_and_propagates(local_uri):
    import mlflow

    with pytest.raises(RuntimeError, match="boom"):
        with Tracker(local_uri, "curation-test", "broken") as tracker:
            tracker.log_metrics({"partial": 1})
            raise RuntimeError("boom")
    run = mlflow.MlflowClient(local_uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED" and run.data.metrics == {"partial": 1.0}


def test_metrics_skip_non_finite_and_reject_text(local_uri, caplog):
    import mlflow

    with Tracker(local_uri, "curation-test", "metrics") as tracker:
        with caplog.at_level(logging.WARNING, logger="curation.tracking"):
            tracker.log_metrics({"ok": 1.5, "nan": float("nan"), "inf": np.inf, "flag": True})
        with pytest.raises(TypeError, match="'name'"):
            tracker.log_metrics({"name": "tiny-clip"})
    assert "'nan'" in caplog.text and "'inf'" in caplog.text
    metrics = mlflow.MlflowClient(local_uri).get_run(tracker.run_id).data.metrics
    assert metrics == {"ok": 1.5, "flag": 1.0}


def test_many_params_are_batched_and_names_cleaned(local_uri):
    import mlflow

    params = {f"p{i:03d}": i for i in range(250)} | {"odd(name)": "v"}
    with Tracker(local_uri, "curation-test", "many") as tracker:
        tracker.log_params(params)
        tracker.set_tags({"owner": "ci", "aws_secret_access_key": SECRET})
    run = mlflow.MlflowClient(local_uri).get_run(tracker.run_id)
    assert len(run.data.params) == 251 and run.data.params["p249"] == "249"
    assert run.data.params["odd_name_"] == "v"
    assert run.data.tags["owner"] == "ci" and run.data.tags["aws_secret_access_key"] == REDACTED


def test_roc_curve_and_existing_experiment_reused(local_uri, tmp_path):
    import mlflow

    scores = _scores()["hftt"]
    labels = (scores > 0.3).astype(int)
    labels[:5] = 1 - labels[:5]
    with Tracker(local_uri, "curation-test", "eval-1") as first:
        first.log_roc_curves({"hftt": scores, "mcm": 1 - scores}, labels)
    with Tracker(local_uri, "curation-test", "eval-2") as second:
        pass
    assert first.experiment_id == second.experiment_id
    client = mlflow.MlflowClient(local_uri)
    local = Path(client.download_artifacts(first.run_id, "plots/roc.png", str(tmp_path)))
    assert local.read_bytes()[:8] == PNG_MAGIC


def test_deleted_experiment_is_a_clear_error(local_uri):
    import mlflow

    with Tracker(local_uri, "gone", "r") as tracker:
        pass
    mlflow.MlflowClient(local_uri).delete_experiment(tracker.experiment_id)
    with pytest.raises(ValueError, match="deleted; restore"):
        with Tracker(local_uri, "gone", "r2"):
            pass


def test_secrets_in_uris_and_tags_are_redacted(local_uri, caplog):
    import mlflow

    config = {"tracking": {"uri": f"http://alice:{SECRET}@mlflow:5000"},
              "evaluation": {"wanted_uri": f"https://b/x?X-Amz-Signature={SECRET}"},
              "source": {"uri": f"s3://AKIA-TEST:{SECRET}@bucket/x"}}
    with caplog.at_level(logging.INFO, logger="curation.tracking"):
        with Tracker(local_uri, "curation-test", "uris", tags={"remote": f"https://{SECRET}@git/r"}) as tracker:
            tracker.log_params(flatten(config))
            tracker.set_tags({"origin": f"http://bob:{SECRET}@h"})
            tracker.log_dict(config, "config.json")
    client = mlflow.MlflowClient(local_uri)
    run = client.get_run(tracker.run_id)
    assert run.data.params["tracking.uri"] == "http://alice:***@mlflow:5000"
    assert run.data.params["evaluation.wanted_uri"] == "https://b/x?X-Amz-Signature=***"
    assert run.data.tags["remote"] == "https://***@git/r" and run.data.tags["origin"] == "http://bob:***@h"
    assert not [k for k, v in {**run.data.params, **run.data.tags}.items() if SECRET in v]
    assert SECRET not in client.download_artifacts(tracker.run_id, "config.json") and SECRET not in caplog.text


def test_context_tags_are_redacted(monkeypatch):
    """MLflow's git context tag holds the remote URL, which may carry a token."""
    import mlflow.tracking.context.registry as registry

    monkeypatch.setattr(registry, "resolve_tags", lambda tags: tags | {
        "mlflow.source.git.repoURL": f"https://user:{SECRET}@github.com/o/r.git"})
    from curation.tracking import _context_tags

    assert _context_tags({"job": "curate"}) == {
        "job": "curate", "mlflow.source.git.repoURL": "https://user:***@github.com/o/r.git"}


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_check_reachable_closed_port_fails_in_seconds_without_password():
    uri = f"http://alice:{SECRET}@127.0.0.1:{_closed_port()}"
    start = time.perf_counter()
    with pytest.raises(TrackingUnreachableError) as caught:
        check_reachable(uri)
    assert time.perf_counter() - start < 5
    message = str(caught.value)
    assert SECRET not in message and f"alice:***@127.0.0.1:{uri.rsplit(':', 1)[1]}" in message
    assert "mlflow server" in message and "tracking.uri" in message


def _http_server(status: int, requests_served: list):
    """A local HTTP server answering every GET with `status` (stands in for MLflow or a stranger)."""
    return http_server(stand_in_handler(status, requests_served))


def test_check_reachable_answers_by_status():
    served = []
    with _http_server(200, served) as host:
        check_reachable(f"http://alice:{SECRET}@{host}/")
    assert served[0][0] == "/api/2.0/mlflow/experiments/search?max_results=1"
    assert served[0][1].startswith("Basic ")  # userinfo goes as basic auth, as MLflow's client does
    with _http_server(404, []) as host, pytest.raises(TrackingUnreachableError, match="does not answer like"):
        check_reachable(f"http://{host}")
    with _http_server(401, []) as host, pytest.raises(PermissionError, match="refused the credentials") as caught:
        check_reachable(f"http://alice:{SECRET}@{host}")
    assert SECRET not in str(caught.value)


def test_check_reachable_sqlite_folder(tmp_path):
    check_reachable(f"sqlite:///{tmp_path / 'new' / 'deeper' / 'mlflow.db'}")
    assert (tmp_path / "new" / "deeper").is_dir()
    check_reachable("databricks")  # other schemes are left to MLflow
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(TrackingUnreachableError, match="cannot create the folder"):
        check_reachable(f"sqlite:///{blocker / 'mlflow.db'}")


def test_tracker_bounds_mlflow_http_retries(local_uri, monkeypatch):
    """MLflow's own defaults retry a dead server for ~4 minutes; a Tracker bounds them while open,
    and leaves the user's own settings and the environment after it alone."""
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    with Tracker(local_uri, "curation-test", "limits"):
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
        assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"  # it prints the password
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"


def test_tracker_against_a_dead_server_fails_in_seconds():
    uri = f"http://alice:{SECRET}@127.0.0.1:{_closed_port()}"
    start = time.perf_counter()
    with pytest.raises(TrackingError) as caught:
        with Tracker(uri, "curation-test", "dead"):
            pass
    assert time.perf_counter() - start < 30
    assert "alice:***@127.0.0.1" in str(caught.value) and SECRET not in str(caught.value)
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


# -- real server ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_run_through_real_server(tmp_path):
    import mlflow

    from mlflow_server import mlflow_server  # tests/ is on sys.path (rootdir-less test modules)

    server_dir = tmp_path / "server"
    server_dir.mkdir()
    with mlflow_server(server_dir) as url:
        run_id = _log_sample_run(url)
        _check_sample_run(url, run_id, tmp_path / "download")
        with pytest.raises(KeyError):
            with Tracker(url, "curation-test", "broken"):
                raise KeyError("boom")
        runs = mlflow.MlflowClient(url).search_runs(
            [mlflow.MlflowClient(url).get_experiment_by_name("curation-test").experiment_id])
        assert {r.info.run_name: r.info.status for r in runs} == {
            "sample": "FINISHED", "broken": "FAILED"}
    stored = list((server_dir / "artifacts").rglob("scores_hftt.png"))
    assert len(stored) == 1 and stored[0].read_bytes()[:8] == PNG_MAGIC  # proxied by the server
