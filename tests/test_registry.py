"""Detectors in the MLflow Model Registry, against a real `mlflow server` (and a sqlite store):
`train` registers each detector with its provenance; curate, rescore and evaluate use the version an
alias names, exactly (downloaded, never refitted) and with its threshold; a moved alias is a new
run; another CLIP model, an unknown name, version or alias and a malformed URI are refused clearly."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from curation import cli, workflow
from curation.config import ConfigError, load_config
from curation.detectors.base import load_detector
from curation.pipeline.plan import OutputConflictError
from curation.registry import RegistryError
from images import write_rgb_images
from mlflow_server import mlflow_server

pytestmark = pytest.mark.usefixtures("ray_local")
FRUIT = "[apple, banana, bread]"


@pytest.fixture(scope="module")
def server_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mlflow-server")


@pytest.fixture(scope="module")
def server(server_dir):
    """One real server for the module (its store and artifacts under server_dir); each test
    registers under its own prefix."""
    with mlflow_server(server_dir) as url:
        yield url


@pytest.fixture
def source(tmp_path) -> Path:
    write_rgb_images(tmp_path / "images", 6, seed=3)
    return tmp_path / "images"


def _mcm(texts: str = FRUIT, threshold: float = 0.5) -> str:
    rule = f"{{strategy: fixed, value: {threshold}}}"
    return f"detectors=[{{kind: mcm, name: mcm, task_texts: {texts}, threshold: {rule}}}]"


def _registered(uri: str, extra: str = "") -> str:
    return f"detectors=[{{registered: '{uri}'{extra}}}]"


def _train(make_config, source, tracking_uri: str, prefix: str, *overrides, texts: str = FRUIT,
           threshold: float = 0.5) -> dict:
    cfg = make_config(str(source), f"tracking.uri={tracking_uri}", f"tracking.registry_prefix={prefix}",
                      f"run_name=train-{prefix}", _mcm(texts, threshold), *overrides)
    return workflow.train(cfg)


def _promote(tracking_uri: str, name: str, version: int, alias: str, capsys) -> dict:
    code = cli.main(["promote", "--detector", name, "--version", str(version), "--alias", alias,
                     "--set", f"tracking.uri={tracking_uri}"])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out[out.index("{"):])


def assert_scored_by(detector, scores: np.ndarray, embeddings: np.ndarray) -> None:
    """Scores within float16 rounding of the stored embeddings (0.3% seen) of `detector`'s."""
    np.testing.assert_allclose(scores, detector.score(embeddings), rtol=1e-2, atol=1e-6)


def _scores_and_embeddings(run_dir: Path, label: str) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(str(run_dir / "scores"))
    embeddings = np.asarray(table.column("embedding").to_pylist(), np.float32)  # as the pipeline scores them
    return np.asarray(table.column(f"score_{label}").to_pylist(), np.float32), embeddings


def _sha256(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.slow
@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_train_registers_versions_that_evaluate_uses_by_alias(store, server, source, make_config, tmp_path, capsys):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'registry.db'}" if store == "sqlite" else server
    prefix = f"{store}-"
    first = _train(make_config, source, uri, prefix, threshold=0.42)
    assert first["registered"] == {"mcm": {"name": f"{prefix}mcm", "version": 1, "uri": f"models:/{prefix}mcm/1"}}
    second = _train(make_config, source, uri, prefix, threshold=0.42)  # same model, a new version
    assert second["registered"]["mcm"]["version"] == 2

    client = mlflow.MlflowClient(uri)
    version = client.get_model_version(f"{prefix}mcm", "1")
    assert version.run_id == first["mlflow_run_id"]
    assert version.source == f"runs:/{first['mlflow_run_id']}/detectors/mcm"
    tags = version.tags
    assert tags["curation.model_identity"] == "tiny-clip/random-seed0"
    assert json.loads(tags["curation.threshold"]) == {"strategy": "fixed", "value": 0.42, "sample_size": 1024,
                                                      "min_sample": 100}
    assert json.loads(tags["curation.detector"]) == {"kind": "mcm", "side": "wanted", "n_task_texts": 3, "params": {
        "template": "a photo of a {}.", "temperature": 0.01}}
    assert json.loads(tags["curation.provenance"]) == {}
    assert json.loads(tags["curation.sha256"]) == _sha256(Path(first["detectors"]) / "mcm")
    assert "fitted for CLIP model tiny-clip/random-seed0" in version.description
    assert "curation detector" in client.get_registered_model(f"{prefix}mcm").description

    assert _promote(uri, f"{prefix}mcm", 1, "production", capsys) == {
        "uri": f"models:/{prefix}mcm@production", "version": 1, "previous": None}
    cfg = make_config(str(source), f"tracking.uri={uri}", f"run_name=eval-{store}", f"cache_dir={tmp_path / 'fresh'}",
                      _registered(f"models:/{prefix}mcm@production"),
                      f"evaluation.wanted_uri={source}", f"evaluation.unwanted_uri={source}")
    report = workflow.evaluate(cfg)
    assert report[f"{prefix}mcm"]["threshold"] == 0.42 and report[f"{prefix}mcm"]["auroc"] == pytest.approx(0.5)
    assert not (tmp_path / "fresh" / "detectors").exists(), "a registered detector is never fitted"
    tags = client.get_model_version(f"{prefix}mcm", "1").tags
    (evaluation_run,) = client.search_runs([client.get_experiment_by_name("curation").experiment_id],
                                           f"tags.job = 'evaluate' and attributes.run_name = 'eval-{store}'")
    assert tags["curation.eval.run_id"] == evaluation_run.info.run_id
    assert float(tags["curation.eval.auroc"]) == pytest.approx(0.5) and tags["curation.eval.n_wanted"] == "6"
    assert evaluation_run.data.tags[f"registered.{prefix}mcm"] == f"models:/{prefix}mcm/1"
    assert "curation.eval.auroc" not in client.get_model_version(f"{prefix}mcm", "2").tags


@pytest.mark.slow
def test_curate_follows_the_alias_one_version_per_run_directory(server, source, make_config, tmp_path, capsys):
    import mlflow

    v1_train = _train(make_config, source, server, "flow-", threshold=0.006)  # MCM scores here: 0.003-0.009
    v2_train = _train(make_config, source, server, "flow-", "run_name=train-flow-2", texts="[pear, plum, fig]",
                      threshold=0.6)
    assert v2_train["registered"]["mcm"]["uri"] == "models:/flow-mcm/2"
    assert _promote(server, "flow-mcm", 1, "production", capsys)["previous"] is None
    nightly = lambda run_name, *more: make_config(
        str(source), f"tracking.uri={server}", f"run_name={run_name}", f"cache_dir={tmp_path / 'fresh'}",
        _registered("models:/flow-mcm@production"), *more)

    summary = workflow.curate(nightly("nightly-1"))
    assert summary["registered"] == {"flow-mcm": "models:/flow-mcm/1"}
    assert summary["detectors_reused"] == {"flow-mcm": True}
    assert summary["thresholds"] == {"flow-mcm": {"strategy": "fixed", "threshold": 0.006}}
    assert not (tmp_path / "fresh" / "detectors").exists(), "a registered detector is never fitted"
    run_dir = tmp_path / "out" / "nightly-1"
    scores, embeddings = _scores_and_embeddings(run_dir, "flow-mcm")
    registered_v1 = load_detector(Path(v1_train["detectors"]) / "mcm")
    assert_scored_by(registered_v1, scores, embeddings)
    assert summary["this_run"]["removed"] == len(list((run_dir / "removed").iterdir())) == int((scores >= 0.006).sum())
    assert 0 < summary["this_run"]["removed"] < 6, "the registered threshold decides"
    assert json.loads((run_dir / "summary.json").read_text())["registered"] == {"flow-mcm": "models:/flow-mcm/1"}
    (recorded,) = json.loads((run_dir / "_config.json").read_text())["config"]["detectors"]
    assert {k: recorded[k] for k in ("name", "registered", "kind", "side")} == {
        "name": "flow-mcm", "registered": "models:/flow-mcm/1", "kind": "mcm", "side": "wanted"}
    run = mlflow.MlflowClient(server).get_run(summary["mlflow_run_id"])
    assert run.data.tags["registered.flow-mcm"] == "models:/flow-mcm/1"
    assert json.loads(run.data.params["config.detectors"])[0]["registered"] == "models:/flow-mcm/1"

    assert _promote(server, "flow-mcm", 2, "production", capsys)["previous"] == 1
    with pytest.raises(OutputConflictError) as refused:
        workflow.curate(nightly("nightly-1"))
    assert "models:/flow-mcm/1" in str(refused.value) and "models:/flow-mcm/2" in str(refused.value)
    assert "new run_name" in str(refused.value)

    summary = workflow.curate(nightly("nightly-2"))
    assert summary["registered"] == {"flow-mcm": "models:/flow-mcm/2"}
    assert summary["thresholds"]["flow-mcm"]["threshold"] == 0.6
    scores, embeddings = _scores_and_embeddings(tmp_path / "out" / "nightly-2", "flow-mcm")
    registered_v2 = load_detector(Path(v2_train["detectors"]) / "mcm")
    assert_scored_by(registered_v2, scores, embeddings)
    assert not np.allclose(scores, registered_v1.score(embeddings), rtol=0.1), "the versions must differ"

    # rescore with the alias too; an explicit threshold overrides the registered one
    rescored = workflow.rescore(nightly("rescored", "detectors.0.threshold={strategy: fixed, value: 0.0}"),
                                str(run_dir))
    assert rescored["registered"] == {"flow-mcm": "models:/flow-mcm/2"}
    assert rescored["thresholds"]["flow-mcm"]["threshold"] == 0.0 and rescored["this_run"]["removed"] == 6
    scores, embeddings = _scores_and_embeddings(tmp_path / "out" / "rescored", "flow-mcm")
    np.testing.assert_allclose(scores, registered_v2.score(embeddings), rtol=1e-6)  # the same stored inputs


@pytest.mark.slow
def test_a_detector_of_another_clip_model_is_refused_before_any_image_is_read(server, source, make_config, tmp_path):
    _train(make_config, source, server, "other-", "model.seed=1")
    cfg = make_config(str(source), f"tracking.uri={server}", "run_name=mismatch",
                      _registered("models:/other-mcm/1"))
    with pytest.raises(RegistryError) as refused:
        workflow.curate(cfg)
    message = str(refused.value)
    assert "models:/other-mcm/1" in message
    assert "'tiny-clip/random-seed1'" in message and "'tiny-clip/random-seed0'" in message
    assert not (tmp_path / "out" / "mismatch").exists(), "refused before the run directory is touched"


@pytest.mark.slow
def test_an_artifact_changed_after_registration_is_refused(server, server_dir, source, make_config):
    trained = _train(make_config, source, server, "tamper-")
    (stored,) = [p for p in server_dir.rglob("tensors.safetensors") if trained["mlflow_run_id"] in str(p)]
    stored.write_bytes(stored.read_bytes()[:-4] + b"\0\0\0\0")
    cfg = make_config(str(source), f"tracking.uri={server}", "run_name=tampered", _registered("models:/tamper-mcm/1"))
    with pytest.raises(RegistryError, match="do not match the checksums registered"):
        workflow.curate(cfg)


@pytest.mark.slow
def test_unknown_names_versions_and_aliases_are_one_line_errors(server, source, make_config, tmp_path, capsys):
    _train(make_config, source, server, "unknown-")
    _promote(server, "unknown-mcm", 1, "staging", capsys)
    cases = {"models:/unknown-mcm@production": ["has no alias 'production' (aliases: {'staging': "],
             "models:/unknown-mcm/7": ["has no version 7 at http://127.0.0.1:", "(versions: [1])"],
             "models:/nothing-here@production": ["no registered model 'nothing-here' at http://127.0.0.1:",
                                                 "'unknown-mcm'"]}
    for uri, expected in cases.items():
        with pytest.raises(RegistryError) as refused:
            workflow.curate(make_config(str(source), f"tracking.uri={server}", "run_name=unknown", _registered(uri)))
        assert all(part in str(refused.value) for part in expected), str(refused.value)
    with pytest.raises(RegistryError, match="models:/unknown-mcm/1 is a mcm detector of the wanted side; the config "
                                            "says side 'unwanted'"):
        workflow.curate(make_config(str(source), f"tracking.uri={server}", "run_name=unknown",
                                    _registered("models:/unknown-mcm/1", ", side: unwanted")))
    args = ["curate", "--set", f"source.uri={source}", "--set", f"output.uri={tmp_path / 'cli'}",
            "--set", f"tracking.uri={server}", "--set", "detectors=[{registered: 'models:/unknown-mcm@production'}]"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("curation curate: RegistryError: models:/unknown-mcm@production: registered model "
                          "'unknown-mcm' has no alias 'production'") and "\n" not in err
    assert "curation promote --detector unknown-mcm" in err
    assert not (tmp_path / "cli").exists()


@pytest.mark.parametrize("uri", ["models:/food", "models:/food/latest", "models:/food@", "models:/food/0",
                                 "runs:/0123abcd/detectors/food", "models:/a/b/c", "models:/food@prod/1", "food"])
def test_a_malformed_registered_uri_is_a_config_error_naming_the_field(uri):
    with pytest.raises(ConfigError, match=r"^detectors\[0\]\.registered: .* is not a registered detector URI; "
                                          r"use models:/<name>/<version> or models:/<name>@<alias>"):
        load_config(None, [_registered(uri)])


@pytest.mark.parametrize("extra, message", [
    (", corpus: words.txt", r"detectors\[0\]\.registered: a registered detector was fitted from its own corpus; "
                            r"remove it \(name, threshold, kind and side may be set\)"),
    (", task_texts: [apple], params: {x: 1}", r"fitted from its own task_texts, params; remove them"),
])
def test_a_registered_detector_takes_no_fitting_fields(extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [_registered("models:/food@production", extra)])


def test_registered_detector_config():
    cfg = load_config(None, [_registered("models:/food-hftt@production"),
                             "detectors.0.threshold={strategy: fixed, value: 0.3}", "tracking.registry_prefix=team-a_"])
    (det,) = cfg.detectors
    assert det.label == "food-hftt" and det.kind is None and det.side is None and det.threshold.value == 0.3
    with pytest.raises(ValueError, match="resolve registered detectors"):
        cfg.decision_hash()  # an alias is not a decision
    with pytest.raises(ConfigError, match=r"detectors\[0\]\.name: the registered model name 'food\.v2' cannot"):
        load_config(None, [_registered("models:/food.v2/3")])
    assert load_config(None, [_registered("models:/food.v2/3", ", name: food")]).detectors[0].label == "food"
    with pytest.raises(ConfigError, match=r"detectors\[0\]\.kind: required, one of \['hftt', 'neglabel', 'mcm'\]"):
        load_config(None, ["detectors=[{task_texts: [apple]}]"])
    with pytest.raises(ConfigError, match=r"tracking\.registry_prefix: 'a/b' must be"):
        load_config(None, ["tracking.registry_prefix=a/b"])


def test_train_refuses_registered_detectors(make_config, tmp_path):
    cfg = make_config(str(tmp_path), _registered("models:/food@production"))
    with pytest.raises(RegistryError, match="train fits detectors from text; models:/food@production is registered"):
        workflow.train(cfg)
