"""Detectors in the MLflow Model Registry: `curation train` registers each fitted detector as a new
version of the registered model `<tracking.registry_prefix><detector label>`; a config then names
one as `registered: models:/<name>@<alias>` (or `models:/<name>/<version>`), so a team promotes a
detector and its threshold by moving an alias, and the next run picks it up.

Why the registry rather than a path to an artifact: a version is immutable, carries its provenance
in tags, and an alias is the one place where "the detector in production" is decided. A run
resolves each alias to a version once, at its start, and from then on is a run of that version:
`models:/<name>/<version>` is in its config, decision hash, summary.json and MLflow tags, so one
run directory never holds the decisions of two versions.

Model-version tags (strings; JSON where structured), written by `register` and `attach_evaluation`:

    curation.model_identity  the CLIP model the detector was fitted for (`models.model_identity`)
    curation.threshold       the threshold rule configured at training, as data
                             ({"strategy": "fixed", "value": 0.5, ...}): used unless a config gives one
    curation.detector        {"kind", "side", "n_task_texts", "params"} of the artifact
    curation.provenance      what it was fitted from beyond its texts: HFTT's word corpus (name, size,
                             sha256), NegLabel's candidate counts ({} for MCM)
    curation.sha256          {file name: sha256} of the artifact, checked on every download
    curation.eval.<metric>   set by `curation evaluate` on a registered detector: auroc, fpr95,
                             precision, recall, threshold, n_wanted, n_unwanted, and run_id (which run
                             measured them); a later evaluation overwrites them
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path

from curation import secrets, tracking
from curation.config import ConfigError, DetectorConfig, RunConfig, ThresholdConfig, from_dict, parse_registered
from curation.detectors.base import artifact_checksums
from curation.models import model_identity
from curation.pipeline.plan import OutputConflictError, RunDirectory

log = logging.getLogger("curation")
TAG = "curation."
EVALUATION_KEYS = ("auroc", "fpr95", "precision", "recall", "threshold", "n_wanted", "n_unwanted")
MODEL_DESCRIPTION = ("A curation detector (HFTT, NegLabel or MCM on frozen CLIP embeddings). Versions are "
                     "registered by `curation train`; their curation.* tags hold the CLIP model, threshold "
                     "rule, provenance and checksums. Point an alias (e.g. production) at a version and use "
                     "it as `registered: models:/<name>@<alias>` in a curate config.")


class RegistryError(ValueError):
    """A registered detector cannot be used: unknown name, version or alias, missing curation tags,
    fitted for another CLIP model, or an artifact that no longer matches its checksums."""


# -- train: register ---------------------------------------------------------------------------
def register(cfg: RunConfig, artifacts: list[dict[str, bytes]], described: dict[str, dict], run_id: str) -> dict:
    """Each fitted detector as a new version of `<registry_prefix><label>`. Its source is the folder
    the train run logged, `runs:/<run id>/detectors/<label>`: MLflow 3 accepts a plain artifact
    folder of the source run there (not only a logged model). `described`: per label, what
    `workflow._detector_params` reports. Returns {label: {"name", "version", "uri"}}."""
    identity, rules = model_identity(cfg.model), {det.label: det.threshold for det in cfg.detectors}
    registered = {}
    with tracking.client(cfg.tracking.uri) as client:
        for files in artifacts:
            label = json.loads(files["detector.json"])["name"]
            name = cfg.tracking.registry_prefix + label
            _ensure_model(client, name)
            version = client.create_model_version(
                name, f"runs:/{run_id}/detectors/{label}", run_id=run_id,
                tags=_version_tags(identity, rules[label], described[label], files),
                description=_description(label, identity, rules[label], described[label], cfg.run_name))
            registered[label] = {"name": name, "version": int(version.version),
                                 "uri": f"models:/{name}/{version.version}"}
            log.info("detector %r registered as %s", label, registered[label]["uri"])
    return registered


def _ensure_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description=MODEL_DESCRIPTION)
    except MlflowException as e:  # registered by an earlier train run (or a concurrent one)
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _version_tags(identity: str, rule: ThresholdConfig, described: dict, files: dict[str, bytes]) -> dict[str, str]:
    detector = {k: described[k] for k in ("kind", "side", "n_task_texts", "params")}
    return {TAG + "model_identity": identity, TAG + "threshold": json.dumps(dataclasses.asdict(rule)),
            TAG + "detector": json.dumps(detector), TAG + "provenance": json.dumps(described["provenance"]),
            TAG + "sha256": json.dumps(artifact_checksums(files))}


def _description(label: str, identity: str, rule: ThresholdConfig, described: dict, run_name: str) -> str:
    threshold = f"{rule.strategy} {rule.value:g}"
    return (f"{described['kind']} detector {label!r} ({described['side']} side, {described['n_task_texts']} task "
            f"texts) fitted for CLIP model {identity}; threshold rule {threshold}; registered by the train run "
            f"{run_name!r}.")


def refuse_registered(cfg: RunConfig) -> None:
    """`train` fits detectors from text; a registered one is fitted already."""
    registered = [det.registered for det in cfg.detectors if det.registered]
    if registered:
        raise RegistryError(f"train fits detectors from text; {', '.join(registered)} is registered already. "
                            "Remove registered detectors from the train config (curate, rescore and evaluate "
                            "use them)")


# -- curate / rescore / evaluate: resolve and fetch -------------------------------------------
def resolve(cfg: RunConfig) -> RunConfig:
    """`cfg` with every registered detector pinned to a version (`models:/<name>/<version>`), named
    (its label), with its kind and side, and a threshold: the config's when it sets one, else the
    version's registered rule. Raises RegistryError for an unknown name, version or alias and for a
    detector fitted for another CLIP model than the run's: at job start, before any image is read
    or output written."""
    if not any(det.registered for det in cfg.detectors):
        return cfg
    with tracking.client(cfg.tracking.uri) as client:
        detectors = [_pinned(client, cfg, det) if det.registered else det for det in cfg.detectors]
    return dataclasses.replace(cfg, detectors=detectors)


def _pinned(client, cfg: RunConfig, det: DetectorConfig) -> DetectorConfig:
    version = _model_version(client, cfg.tracking.uri, det.registered)
    uri, tags = f"models:/{version.name}/{version.version}", version.tags
    registered = _fitted_for(uri, tags, cfg, det)
    threshold = det.threshold if det.threshold is not None else _registered_threshold(uri, tags)
    if uri != det.registered:
        log.info("%s resolved to %s", det.registered, uri)
    # made explicit, so a recorded config (_config.json, MLflow params) describes its detectors alone
    return dataclasses.replace(det, name=det.label, registered=uri, kind=registered["kind"],
                               side=registered["side"], threshold=threshold)


def _fitted_for(uri: str, tags: dict[str, str], cfg: RunConfig, det: DetectorConfig) -> dict:
    """The version's `curation.detector` tag, once its CLIP model is the run's and its kind and side
    are those the config gives (if it does)."""
    missing = [TAG + key for key in ("model_identity", "detector") if TAG + key not in tags]
    if missing:
        raise RegistryError(f"{uri} has no tag {' or '.join(missing)}, so what it was fitted for is unknown: "
                            "register detectors with `curation train`")
    fitted, identity = tags[TAG + "model_identity"], model_identity(cfg.model)
    if fitted != identity:
        raise RegistryError(f"{uri} was fitted for CLIP model {fitted!r}; this run uses {identity!r}. Use a "
                            "version trained for this model (curation train with this config's model) or set "
                            f"model to match {fitted!r}")
    registered = json.loads(tags[TAG + "detector"])
    for key in ("kind", "side"):
        if getattr(det, key) not in (None, registered[key]):
            raise RegistryError(f"{uri} is a {registered['kind']} detector of the {registered['side']} side; the "
                                f"config says {key} {getattr(det, key)!r}: remove {key} or name another version")
    return registered


def _model_version(client, tracking_uri: str | None, uri: str):
    """The ModelVersion `uri` names; RegistryError listing what exists when it names nothing."""
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_registered(uri)
    where = secrets.redact_text(tracking.resolve_tracking_uri(tracking_uri))
    try:
        model = client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        known = sorted(m.name for m in client.search_registered_models(max_results=50))
        raise RegistryError(f"{uri}: no registered model {name!r} at {where} (registered: {known or 'none'}); "
                            "`curation train` registers detectors, check the name and tracking.uri") from None
    if alias is not None:
        version = model.aliases.get(alias)
        if version is None:
            raise RegistryError(f"{uri}: registered model {name!r} has no alias {alias!r} (aliases: "
                                f"{dict(model.aliases) or 'none'}); set it with `curation promote --detector "
                                f"{name} --version <n> --alias {alias}` or in the MLflow UI")
    try:
        found = client.get_model_version(name, str(version))
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        raise RegistryError(f"{uri}: registered model {name!r} has no version {version} at {where} "
                            f"(versions: {versions or 'none'})") from None
    if found.status != "READY":
        raise RegistryError(f"{uri}: version {found.version} of {name!r} is {found.status}, not READY")
    return found


def _registered_threshold(uri: str, tags: dict[str, str]) -> ThresholdConfig:
    raw = tags.get(TAG + "threshold")
    if raw is None:
        raise RegistryError(f"{uri} has no tag {TAG}threshold: give the detector a threshold in the config")
    try:
        return from_dict(ThresholdConfig, json.loads(raw), f"{TAG}threshold")
    except ValueError as e:  # not JSON, or not a valid rule (ConfigError)
        raise RegistryError(f"{uri}: tag {TAG}threshold {raw!r} is not a threshold rule ({e}); fix the tag or "
                            "give the detector a threshold in the config") from None


def fetch(cfg: RunConfig, det: DetectorConfig) -> dict[str, bytes]:
    """The artifact of pinned registered detector `det` as {file name: bytes}, downloaded from its
    version's source and checked against the version's checksums and the pinned kind, side and
    CLIP model. Its detector.json is renamed to `det.label` when that differs (score columns are
    named after the detector); the tensors are the registered bytes."""
    name, version, _ = parse_registered(det.registered)
    with tracking.client(cfg.tracking.uri) as client:
        tags = client.get_model_version(name, version).tags
        files = _download(client.get_model_version_download_uri(name, version), cfg.tracking.uri)
    if TAG + "sha256" not in tags or json.loads(tags[TAG + "sha256"]) != artifact_checksums(files):
        raise RegistryError(f"{det.registered}: the files at its source do not match the checksums registered "
                            f"with it (tag {TAG}sha256): the artifact changed after registration; register a "
                            "new version with `curation train`")
    meta = json.loads(files["detector.json"])
    expected = {"model_identity": model_identity(cfg.model), "kind": det.kind, "side": det.side}
    wrong = {key: meta[key] for key, value in expected.items() if meta[key] != value}
    if wrong:
        raise RegistryError(f"{det.registered} holds a detector with {wrong}, its tags (and this run) say "
                            f"{ {key: expected[key] for key in wrong} }: its tags were edited; register a new "
                            "version with `curation train`")
    if meta["name"] != det.label:
        files = files | {"detector.json": json.dumps(meta | {"name": det.label}, indent=2).encode()}
    return files


def _download(source: str, tracking_uri: str | None) -> dict[str, bytes]:
    """The files of a version's source folder (`runs:/...`, or a storage URI). Not through its
    `models:/` URI: MLflow resolves those in the global registry, not the configured store."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp,
                                                    tracking_uri=tracking.resolve_tracking_uri(tracking_uri))
        return {path.name: path.read_bytes() for path in Path(local).iterdir() if path.is_file()}


def check_run_dir(run: RunDirectory, cfg: RunConfig) -> None:
    """Refuse, naming both versions, to continue a run directory whose decisions were made with
    another version of a registered detector (its alias moved since): `RunDirectory.claim` would
    refuse too, but by decision hash only, which does not say that a new version is the cause."""
    owner = run.read_json("_config.json")
    before = {det.get("registered") for det in owner["config"]["detectors"]} - {None} if owner else set()
    now = set(pinned(cfg).values())
    if before and before != now:
        raise OutputConflictError(
            f"{run.uri} holds decisions made with {', '.join(sorted(before))}; this run uses "
            f"{', '.join(sorted(now)) or 'no registered detector'} (an alias moved?). One run directory holds "
            "the decisions of one detector version: use a new run_name or output.uri for the new version, or "
            "pin the old one (registered: models:/<name>/<version>) to finish this run.")


def pinned(cfg: RunConfig) -> dict[str, str]:
    """{label: models:/<name>/<version>} of the registered detectors of a resolved config."""
    return {det.label: det.registered for det in cfg.detectors if det.registered}


def run_tags(cfg: RunConfig) -> dict[str, str]:
    """MLflow run tags naming the registered versions a run used (searchable: tags."registered.x")."""
    return {f"registered.{label}": uri for label, uri in pinned(cfg).items()}


# -- evaluate and promote ----------------------------------------------------------------------
def attach_evaluation(cfg: RunConfig, report: dict[str, dict], run_id: str) -> None:
    """Tag each registered detector's version with what `curation evaluate` measured for it
    (curation.eval.*) and the evaluate run that did: the registry then shows how good a version
    is, on which data (the run's params), before anyone promotes it."""
    with tracking.client(cfg.tracking.uri) as client:
        for label, uri in pinned(cfg).items():
            name, version, _ = parse_registered(uri)
            values = {key: report[label][key] for key in EVALUATION_KEYS} | {"run_id": run_id}
            for key, value in values.items():
                client.set_model_version_tag(name, version, f"{TAG}eval.{key}", str(value))


def promote(cfg: RunConfig, name: str, version: int, alias: str) -> dict:
    """Point `alias` of registered detector `name` at `version`, after checking that the version
    exists and was registered by curation. Returns {"uri", "version", "previous"} (previous: the
    version the alias pointed at, or None)."""
    try:
        parse_registered(f"models:/{name}@{alias}"), parse_registered(f"models:/{name}/{version}")
    except ConfigError:
        raise RegistryError(f"--detector {name!r} --version {version!r} --alias {alias!r}: a registered model "
                            "name is letters, digits, '_', '.' or '-', a version a number from 1, an alias "
                            "letters, digits, '_' or '-'") from None
    with tracking.client(cfg.tracking.uri) as client:
        found = _model_version(client, cfg.tracking.uri, f"models:/{name}/{version}")
        if TAG + "model_identity" not in found.tags:
            raise RegistryError(f"models:/{name}/{version} has no tag {TAG}model_identity: it was not registered "
                                "by `curation train`")
        previous = client.get_registered_model(name).aliases.get(alias)
        client.set_registered_model_alias(name, alias, str(version))
    log.info("models:/%s@%s -> version %s (was %s)", name, alias, version, previous)
    return {"uri": f"models:/{name}@{alias}", "version": int(version),
            "previous": int(previous) if previous is not None else None}
