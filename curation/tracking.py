"""MLflow runs: one small tracker the driver opens once per run, and the bounded client every
other MLflow call goes through (`client`; the Model Registry side lives in `curation.registry`).

Why a wrapper: MLflow rejects long param values, over-full batches and non-finite metrics with
errors that surface at the end of a long run, it would happily store a storage secret given in
a config, and its client retries an unreachable server for ~4 minutes. `check_reachable` finds a
wrong tracking URI at job start, in seconds. `Tracker` bounds param lengths, batches every call,
skips non-finite metrics with a warning, redacts secrets (`curation.secrets`: secret keys, URI
passwords) and, while open, bounds MLflow's HTTP retries (CLIENT_ENV). It uses an explicit
`MlflowClient`, so it sets no MLflow state (no active run, no global tracking URI). mlflow,
requests and matplotlib are imported inside the functions that need them, so `import curation`
stays fast.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import numbers
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from curation.secrets import redact, redact_text

logger = logging.getLogger(__name__)

MAX_PARAM_VALUE_CHARS = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_VALUE_CHARS = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH
PARAMS_PER_BATCH = 100  # MAX_PARAMS_TAGS_PER_BATCH
METRICS_PER_BATCH = 1000  # MAX_METRICS_PER_BATCH
PROBE_TIMEOUT_S = 5.0
# Set while a Tracker is open, unless the user set them. MLflow reads the HTTP ones at every
# request (mlflow.utils.rest_utils.http_request); its defaults, 7 retries with backoff factor 2 and
# a 120 s timeout, make a vanished server cost ~4 minutes, these a few seconds. It also prints
# "View run ... at <tracking URI>" to stdout, password included: the Tracker logs it redacted.
# Its artifact downloads (registered detectors) draw progress bars into the job's log.
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
              "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
_BAD_NAME_CHARS = re.compile(r"[^/\w.\- :]")  # MLflow's allowed param/metric name characters


def resolve_tracking_uri(uri: str | None) -> str:
    """None or "" -> $MLFLOW_TRACKING_URI when set, else `sqlite:///<absolute cwd>/mlflow.db`,
    MLflow's own default store, which `mlflow ui --backend-store-uri <that uri>` reads; anything
    else is passed through."""
    if not uri:
        return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + str(Path.cwd().resolve() / "mlflow.db")
    return uri


def has_explicit_store(uri: str | None) -> bool:
    """Whether the tracking store is independent of the current directory: a server, or a local
    store given by an absolute path (`sqlite:////abs/mlflow.db`), from the config or
    $MLFLOW_TRACKING_URI."""
    resolved = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not resolved:
        return False
    if resolved.startswith("sqlite:"):
        return _sqlite_path(resolved).startswith("/")
    return "://" in resolved or os.path.isabs(resolved)


def _sqlite_path(uri: str) -> str:
    """The database path of a `sqlite:///` URI: `sqlite:////abs/x.db` -> `/abs/x.db`, `sqlite:///x.db`
    -> `x.db` (relative to the current directory); "" when there is none."""
    return uri.split(":///", 1)[1] if ":///" in uri else ""


class TrackingUnreachableError(RuntimeError):
    """The MLflow tracking store of a run cannot be used (server down, wrong host or port, not an
    MLflow server, local store folder not writable); raised at job start, before any work."""


def check_reachable(tracking_uri: str | None) -> None:
    """Fail in seconds, before Ray starts or any output is written, when the tracking store cannot
    be used: http(s) servers get one GET of the experiments API (PROBE_TIMEOUT_S, no retries);
    `sqlite:///` stores need a folder that exists or can be created and is writable. Other
    schemes (databricks, postgresql ...) pass unchecked. Messages name the URI, redacted."""
    uri = resolve_tracking_uri(tracking_uri)
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme in ("http", "https"):
        _probe_server(uri)
    elif scheme == "sqlite":
        _check_sqlite_folder(uri)


def _probe_server(uri: str) -> None:
    import requests

    shown = redact_text(uri)
    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        response = requests.get(url, timeout=PROBE_TIMEOUT_S)  # userinfo is sent as basic auth
    except requests.RequestException as e:
        raise TrackingUnreachableError(
            f"cannot reach the MLflow tracking server at {shown}: {type(e).__name__}: {redact_text(str(e))}. "
            "Check that the server is running (`mlflow server --host 0.0.0.0 --port 5000`) and that "
            "tracking.uri names its scheme, host and port (or leave tracking.uri unset for a local "
            "store in the working directory)") from None
    if response.status_code in (401, 403):
        raise PermissionError(f"the MLflow tracking server at {shown} refused the credentials (HTTP "
                              f"{response.status_code}): check the user and password in tracking.uri or "
                              "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD")
    if response.status_code != 200:
        raise TrackingUnreachableError(
            f"{shown} does not answer like an MLflow tracking server (GET experiments/search: HTTP "
            f"{response.status_code}): check the host, port and path in tracking.uri")


def _check_sqlite_folder(uri: str) -> None:
    path = _sqlite_path(uri)
    if not path or path == ":memory:":
        return
    folder = Path(path).expanduser().parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrackingUnreachableError(f"cannot create the folder {str(folder)!r} of the MLflow store "
                                       f"{redact_text(uri)}: {e.strerror or e}") from None
    if not os.access(folder, os.W_OK) or (Path(path).exists() and not os.access(path, os.W_OK)):
        raise TrackingUnreachableError(f"the MLflow store {redact_text(uri)} is not writable: check the "
                                       f"permissions of {str(folder)!r}")


def flatten(nested: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> dotted keys (`source.storage_options.key`); lists -> JSON strings, with
    secrets inside them redacted first (once a JSON string, keys no longer look like keys)."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(redact(value), default=str)
        else:
            flat[name] = value
    return flat


@contextlib.contextmanager
def _client_env():
    """CLIENT_ENV in the environment for the duration, except what the user set."""
    added = {name: value for name, value in CLIENT_ENV.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


@contextlib.contextmanager
def client(tracking_uri: str | None):
    """A plain MlflowClient for the store `tracking_uri` names (resolved as for runs; the Model
    Registry lives in the same store), with CLIENT_ENV's bounded retries while open: for the
    registry calls of `curation.registry`, which belong to no run."""
    import mlflow

    with _client_env():
        yield mlflow.MlflowClient(resolve_tracking_uri(tracking_uri))


class TrackingError(RuntimeError):
    """An MLflow call failed with a message that named a credential (MLflow's errors quote the
    request URL, userinfo included); this carries that message redacted instead."""


def _redacted_errors(method):
    """Re-raise an error whose message holds a credential as TrackingError with it redacted;
    any other error passes unchanged (its type may matter to the caller)."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except Exception as e:
            shown = redact_text(str(e))
            if shown == str(e):
                raise
            raise TrackingError(f"{type(e).__name__}: {shown}") from None
    return wrapper


def _clean_name(key: str) -> str:
    """MLflow refuses names with characters outside [/\\w.\\- :]; map them to `_`."""
    return _BAD_NAME_CHARS.sub("_", str(key))


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


class Tracker:
    """One MLflow run, as a context manager; only the driver uses it.

    ```
    with Tracker(uri, "curation", "demo", tags={"stage": "curate"}) as tracker:
        tracker.log_params(to_dict(config))
        tracker.log_metrics({"kept": 10, "removed": 2})
    ```
    The run ends FINISHED, or FAILED when the block raises (KILLED on KeyboardInterrupt).
    """

    def __init__(self, tracking_uri: str | None, experiment: str, run_name: str,
                 tags: dict | None = None):
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.experiment = experiment
        self.run_name = run_name
        self.tags = dict(tags or {})
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._client = None
        self._limits = contextlib.ExitStack()

    # -- run lifecycle --------------------------------------------------------------------------
    @_redacted_errors
    def __enter__(self) -> Tracker:
        import mlflow

        self._limits.enter_context(_client_env())
        try:
            self._client = mlflow.MlflowClient(self.tracking_uri)
            self.experiment_id = self._experiment_id()
            run = self._client.create_run(self.experiment_id, run_name=self.run_name,
                                          tags=_context_tags(self._clean_tags(self.tags)))
        except BaseException:
            self._limits.close()
            raise
        self.run_id = run.info.run_id
        logger.info("MLflow run %s (%s) in experiment %r at %s", self.run_name, self.run_id,
                    self.experiment, redact_text(self.tracking_uri))
        return self

    @_redacted_errors
    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            status = "FINISHED"
        else:
            status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        try:
            self._client.set_terminated(self.run_id, status=status)
            if self.tracking_uri.startswith(("http://", "https://")):
                logger.info("View MLflow run %s at %s/#/experiments/%s/runs/%s", self.run_name,
                            redact_text(self.tracking_uri.rstrip("/")), self.experiment_id, self.run_id)
        except Exception as e:
            if exc_type is None:
                raise
            # never hide the run's own error behind a tracking-server hiccup
            logger.error("could not mark MLflow run %s %s: %s", self.run_id, status,
                         redact_text(f"{type(e).__name__}: {e}"))
        finally:
            self._limits.close()

    def _experiment_id(self) -> str:
        """Existing experiment's id, or a new one's; a deleted experiment of that name is an error
        (MLflow would refuse the run with a less helpful message)."""
        from mlflow.exceptions import MlflowException

        found = self._client.get_experiment_by_name(self.experiment)
        if found is None:
            try:
                return self._client.create_experiment(self.experiment)
            except MlflowException:  # created concurrently by another driver
                found = self._client.get_experiment_by_name(self.experiment)
                if found is None:
                    raise
        if found.lifecycle_stage != "active":
            raise ValueError(
                f"MLflow experiment {self.experiment!r} at {redact_text(self.tracking_uri)} is deleted; restore "
                f"it (`mlflow experiments restore --experiment-id {found.experiment_id}`) "
                f"or choose another tracking.experiment")
        return found.experiment_id

    # -- params, tags, metrics ------------------------------------------------------------------
    @_redacted_errors
    def log_params(self, params: dict) -> None:
        """Params as strings of at most 6000 chars; nested dicts are flattened first and secret
        keys redacted. MLflow params are immutable: re-logging a key with another value raises."""
        from mlflow.entities import Param

        flat = flatten(redact(params))
        items = [Param(_clean_name(k), str(v)[:MAX_PARAM_VALUE_CHARS]) for k, v in flat.items()]
        for chunk in _chunks(items, PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=chunk)

    @_redacted_errors
    def set_tags(self, tags: dict) -> None:
        """Tags as strings of at most 8000 chars; secret keys redacted."""
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in self._clean_tags(tags).items()]
        for chunk in _chunks(items, PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=chunk)

    @staticmethod
    def _clean_tags(tags: dict) -> dict[str, str]:
        flat = flatten(redact(tags))
        return {_clean_name(k): str(v)[:MAX_TAG_VALUE_CHARS] for k, v in flat.items()}

    @_redacted_errors
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Numeric metrics at `step` (0 when None). NaN/inf are skipped with a logged warning rather
        than stored (they make charts and run comparisons meaningless); non-numbers raise TypeError."""
        from mlflow.entities import Metric

        timestamp, items = int(time.time() * 1000), []
        for key, value in metrics.items():
            if not isinstance(value, numbers.Real):
                raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__} "
                                f"{value!r}; log text as a param or tag")
            if not math.isfinite(float(value)):
                logger.warning("MLflow metric %r skipped: value %r is not finite", key, value)
                continue
            items.append(Metric(_clean_name(key), float(value), timestamp, step or 0))
        for chunk in _chunks(items, METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=chunk)

    # -- artifacts ------------------------------------------------------------------------------
    @_redacted_errors
    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """`obj` as indented JSON at `artifact_file` (e.g. "config.json"), secret keys redacted
        as in `log_params` (a config's storage options would otherwise land in the artifact)."""
        text = json.dumps(redact(obj), indent=2, default=str)
        self._client.log_text(self.run_id, text, artifact_file)

    @_redacted_errors
    def log_artifact(self, local_file: str | Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(local_file), artifact_path)

    @_redacted_errors
    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        """Every file under `local_dir` (e.g. a detector directory) under `artifact_path`."""
        self._client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_score_histograms(self, scores: dict, thresholds: dict[str, float],
                             artifact_path: str = "plots") -> list[str]:
        """One PNG per detector, `<artifact_path>/scores_<detector>.png`: histogram of its unwanted
        scores (an array of shape (n_images,) in [0, 1], or a `ScoreHistogram` merged over a run)
        with its threshold and removal rate (score >= threshold). A detector missing from
        `thresholds` gets no line. Returns the artifact paths."""
        from curation.metrics import ScoreHistogram

        with tempfile.TemporaryDirectory(prefix="curation-plots-") as tmp:
            names = []
            for name, values in scores.items():
                histogram = values if isinstance(values, ScoreHistogram) else ScoreHistogram.of(
                    values, thresholds.get(name))
                names.append(_plot_histogram(name, histogram, thresholds.get(name), Path(tmp)))
            self.log_artifacts(tmp, artifact_path)
        return [f"{artifact_path}/{name}" if artifact_path else name for name in names]

    def log_roc_curves(self, scores: dict[str, np.ndarray], labels: np.ndarray,
                       artifact_file: str = "plots/roc.png") -> None:
        """One ROC figure for all detectors; `labels` of shape (n_images,) with 1 = unwanted
        (positive), scores of the same shape with higher = more unwanted."""
        from curation.metrics import auroc

        labels = np.asarray(labels).ravel()
        fig, ax = _figure()
        for name, values in scores.items():
            fpr, tpr = roc_points(values, labels)
            ax.plot(fpr, tpr, label=f"{name} (AUROC {auroc(values, labels):.3f})")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.set(xlabel="false-positive rate (wanted removed)",
               ylabel="true-positive rate (unwanted removed)", xlim=(0, 1), ylim=(0, 1.01),
               title=f"ROC, {int(labels.sum())} unwanted / {int((labels == 0).sum())} wanted")
        ax.legend(loc="lower right")
        self._log_figure(fig, artifact_file)

    def _log_figure(self, fig, artifact_file: str) -> None:
        artifact_path, _, filename = artifact_file.rpartition("/")
        with tempfile.TemporaryDirectory(prefix="curation-plots-") as tmp:
            fig.savefig(Path(tmp) / filename, dpi=100)
            self.log_artifact(Path(tmp) / filename, artifact_path or None)


def _context_tags(tags: dict[str, str]) -> dict[str, str]:
    """User tags plus MLflow's context tags (user, source name/type, git commit), which its fluent
    API adds on `start_run` and `MlflowClient.create_run` does not; the UI shows them per run.
    Redacted: the git remote URL (`mlflow.source.git.repoURL`) may hold a token or password."""
    try:
        from mlflow.tracking.context.registry import resolve_tags
    except ImportError:  # internal API moved: the run is still valid without them
        return tags
    return redact(resolve_tags(tags))


def roc_points(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr), each of shape (n_distinct_scores + 1,), from (0, 0) to (1, 1): one point per
    distinct score threshold (score >= t flagged), ties stepping together. Labels 1 = positive."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels differ in length: {scores.shape[0]} vs {labels.shape[0]}")
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tps = np.cumsum(labels)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    tpr = np.r_[0.0, tps / max(labels.sum(), 1)]
    fpr = np.r_[0.0, fps / max((~labels).sum(), 1)]
    return fpr, tpr


def _figure(size=(6.4, 4.8)):
    """A matplotlib Figure on the Agg canvas, made without pyplot, so no global backend or figure
    registry is touched (the driver may be a notebook with its own backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _plot_histogram(name: str, histogram, threshold: float | None, out_dir: Path) -> str:
    fig, ax = _figure()
    edges = histogram.edges
    ax.stairs(histogram.counts, edges, fill=True, color="tab:blue")
    title = f"{name}: {histogram.n} scores"
    if threshold is not None:
        ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:.4g}")
        title += f", removal rate {histogram.removal_rate:.1%}"
        ax.legend(loc="upper center")
    ax.set(xlabel="unwanted score", ylabel="images", xlim=(0, 1), title=title)
    filename = "scores_" + re.sub(r"[^\w.-]", "_", name) + ".png"
    fig.savefig(out_dir / filename, dpi=100)
    return filename


def detector_params(artifacts: list[dict[str, bytes]]) -> dict:
    """Per detector: kind, side, hyper-parameters and corpus provenance (not the word lists)."""
    out = {}
    for files in artifacts:
        meta = json.loads(files["detector.json"])
        provenance = {k: v for k, v in meta["provenance"].items() if k != "negative_labels"}
        out[meta["name"]] = {"kind": meta["kind"], "side": meta["side"], "n_task_texts": len(meta["task_texts"]),
                             "params": meta["params"], "provenance": provenance}
    return out


def log_detectors(tracker: "Tracker", artifacts: list[dict[str, bytes]]) -> None:
    """Each detector's artifact files under `detectors/<name>/` of the MLflow run."""
    with tempfile.TemporaryDirectory() as tmp:
        for files in artifacts:
            name = json.loads(files["detector.json"])["name"]
            directory = Path(tmp) / name
            directory.mkdir(parents=True)
            for file, data in files.items():
                (directory / file).write_bytes(data)
            tracker.log_artifacts(str(directory), f"detectors/{name}")
