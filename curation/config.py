"""Run configuration: YAML -> frozen, validated dataclasses; `--set key=value` overrides.

Unknown keys and wrong types are errors that name the field (`detectors[1].threshold.value`), so a
typo never silently falls back to a default on a cluster run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from curation.models import ModelConfig


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong type; the message names the field."""


# -- range checks, run by each dataclass's __post_init__ ----------------------------------------
# They name the field relative to their dataclass (`value: ...`); `from_dict` prefixes the path
# (`detectors[0].threshold.value: ...`), so `--set` overrides and YAML get the same message.
DETECTOR_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")
# A detector in the MLflow Model Registry: a fixed version, or an alias resolved at run start.
REGISTERED_URI = re.compile(r"models:/(?P<name>[\w.-]+)(?:/(?P<version>[1-9][0-9]*)|@(?P<alias>[\w-]+))")


def _check_positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ConfigError(f"{name}: must be a positive integer, got {value!r}")


def _check_non_negative(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{name}: must be a finite number >= 0, got {value!r}")


# What of the source decides which items a run holds and how they are grouped. Byte limits and
# retries are guards, not decisions: changing them resumes the same run directory.
DECISION_SOURCE_FIELDS = ("uri", "format", "id_column", "image_column", "partition_size", "max_pixels")


@dataclass(frozen=True)
class SourceConfig:
    """Where the images come from: a folder/prefix of image files, parquet files with an image-bytes
    column, or WebDataset tar shards; local path or s3:// URI."""

    uri: str = "./demo/data/images"
    format: Literal["images", "parquet", "webdataset"] = "images"
    id_column: str = "id"
    image_column: str = "image"
    partition_size: int = 256
    max_pixels: int = 64_000_000
    # Byte limits, checked before the bytes are held: an image (file, shard member or parquet
    # cell), a whole parquet file or shard, and the members of one shard. Beyond: `too_large`.
    max_item_bytes: int = 64 * 2**20
    max_file_bytes: int = 2 * 2**30
    max_members: int = 200_000
    # Transient read errors (throttling, timeouts) are retried with exponential backoff; what
    # still fails leaves its partition unfinished for the next run.
    read_attempts: int = 5
    retry_backoff_s: float = 0.5
    # Decode JPEGs at least 4x larger than the model's input at a reduced DCT scale (PIL's draft
    # mode, still >= 2x the input) before the exact resize: 2.7x less CPU for 2048 px photos, pixels
    # within a mean 0.16 / max 6 levels of the exact ones (benchmarks/scale_on_paper.py). Off: bit
    # for bit open_clip's transform.
    jpeg_draft: bool = False
    storage_options: dict = field(default_factory=dict)

    def __post_init__(self):
        _check_positive(self, "partition_size", "max_pixels", "max_item_bytes", "max_file_bytes", "max_members",
                        "read_attempts")
        _check_non_negative(self, "retry_backoff_s")


@dataclass(frozen=True)
class ThresholdConfig:
    """fixed: remove when score >= value. quantile: remove at most `value` (a fraction) of a sample
    of `sample_size` images of the dataset itself; fewer than `min_sample` decodable images is an
    error, not a threshold frozen for every later run. tpr: from labelled validation images
    (evaluation.*), keep `value` of the wanted. Scores are unwanted scores in [0, 1]."""

    strategy: Literal["fixed", "quantile", "tpr"] = "fixed"
    value: float = 0.5
    sample_size: int = 1024
    min_sample: int = 100

    def __post_init__(self):
        _check_positive(self, "sample_size", "min_sample")
        if self.strategy == "quantile" and self.min_sample > self.sample_size:
            raise ConfigError(f"min_sample: must be <= sample_size ({self.sample_size}), got {self.min_sample}; "
                              "lower min_sample or raise sample_size")
        self._check_value()

    def _check_value(self) -> None:
        value, interval = self.value, "(0, 1]" if self.strategy == "tpr" else "[0, 1]"
        if not math.isfinite(value):
            raise ConfigError(f"value: must be a finite number, got {value!r}")
        if self.strategy != "fixed" and value > 1:
            raise ConfigError(f"value: a {self.strategy} value is a fraction in {interval}; {value:g} looks "
                              f"like a percentage, use {value / 100:g}")
        if not (0 < value <= 1 if self.strategy == "tpr" else 0 <= value <= 1):
            what = "an unwanted score" if self.strategy == "fixed" else f"a {self.strategy} fraction"
            raise ConfigError(f"value: must be {what} in {interval}, got {value!r}")


DetectorKind = Literal["hftt", "neglabel", "mcm"]
# What a registered detector was fitted from: its artifact holds them, a config giving them too would
# be ignored. (Its kind and side may be given: they are checked against the registered version.)
REGISTRY_PROVIDES = ("task_texts", "task_file", "corpus", "params")


def parse_registered(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/<name>/<version>` -> (name, version, None); `models:/<name>@<alias>` -> (name, None, alias)."""
    match = REGISTERED_URI.fullmatch(uri)
    if match is None:
        raise ConfigError(f"registered: {uri!r} is not a registered detector URI; use models:/<name>/<version> "
                          "or models:/<name>@<alias>, e.g. models:/food-hftt@production")
    return match["name"], match["version"], match["alias"]


def _field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@dataclass(frozen=True)
class DetectorConfig:
    """A detector fitted from text (`kind`, `task_texts`/`task_file`, `corpus`, `params`), or one
    already registered in the MLflow Model Registry (`registered: models:/<name>@<alias>` or
    `/<version>`), which brings its kind, side, texts, params and threshold rule. With `registered`,
    `name` may be set, `threshold` overrides the registered rule, `kind`/`side` are checked against
    the registered version; `curation.registry.resolve` fills in what the config leaves out."""

    kind: DetectorKind | None = None
    name: str | None = None
    registered: str | None = None
    side: Literal["wanted", "unwanted"] | None = None  # None: "wanted", or the registered side
    task_texts: list[str] = field(default_factory=list)
    task_file: str | None = None
    corpus: str = "wamerican-huge"
    params: dict = field(default_factory=dict)
    # kind, side and threshold are None only on a registered detector that `curation.registry.resolve`
    # has not yet filled in from its registered version.
    threshold: ThresholdConfig | None = None

    def __post_init__(self):
        # The name becomes a file name, a column name and an item of the comma-joined `fired` list.
        if self.name is not None and not DETECTOR_NAME.fullmatch(self.name):
            raise ConfigError(f"name: {self.name!r} is not a valid detector name: use 1-64 letters, digits, "
                              "'_' or '-' (not first), no '/', '.', ',' or whitespace")
        if self.registered is not None:
            self._check_registered()
        elif self.kind is None:
            raise ConfigError(f"kind: required, one of {list(typing.get_args(DetectorKind))} (or give "
                              "`registered: models:/<name>@<alias>` for a registered detector)")
        else:  # the defaults of a detector fitted from text (frozen: set once, here)
            object.__setattr__(self, "side", self.side or "wanted")
            object.__setattr__(self, "threshold", self.threshold or ThresholdConfig())

    def _check_registered(self) -> None:
        name, _, _ = parse_registered(self.registered)
        given = [f.name for f in dataclasses.fields(self)
                 if f.name in REGISTRY_PROVIDES and getattr(self, f.name) != _field_default(f)]
        if given:
            raise ConfigError(f"registered: a registered detector was fitted from its own {', '.join(given)}; "
                              f"remove {'it' if len(given) == 1 else 'them'} (name, threshold, kind and side may "
                              "be set)")
        if self.name is None and not DETECTOR_NAME.fullmatch(name):
            raise ConfigError(f"name: the registered model name {name!r} cannot serve as the detector name (a "
                              "column and file name: 1-64 letters, digits, '_' or '-'); set name")

    @property
    def label(self) -> str:
        """The detector's name in outputs (`score_<label>`): `name`, else the registered model's name, else kind."""
        return self.name or (parse_registered(self.registered)[0] if self.registered else self.kind)


@dataclass(frozen=True)
class OutputConfig:
    uri: str = "./demo/out"
    store_embeddings: bool = True
    storage_options: dict = field(default_factory=dict)
    # A run's lease on its directory counts as abandoned this long after its last heartbeat.
    lease_ttl_s: float = 600.0

    def __post_init__(self):
        if not (math.isfinite(self.lease_ttl_s) and self.lease_ttl_s > 0):
            raise ConfigError(f"lease_ttl_s: must be a positive number of seconds, got {self.lease_ttl_s!r}")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow: `uri` of the tracking store (also the Model Registry); `curation train` registers
    each detector as a version of the registered model `<registry_prefix><detector label>`."""

    uri: str | None = None
    experiment: str = "curation"
    registry_prefix: str = ""

    def __post_init__(self):
        # prefix + label stays usable as a detector label (a registered detector's default name)
        if not re.fullmatch(r"[A-Za-z0-9_-]{0,32}", self.registry_prefix):
            raise ConfigError(f"registry_prefix: {self.registry_prefix!r} must be 0-32 letters, digits, '_' or '-'")


@dataclass(frozen=True)
class ComputeConfig:
    """Ray resources for the image stream. None (the default) follows the cluster when the stream
    starts (`ray_data.resolve_compute`): one actor per GPU, or on CPUs enough actors to use every
    core with their torch threads, so nobody has to tune a cluster to use it. Actors reserve
    fractional CPUs so decode tasks always find a core (a full pool deadlocks reads on small nodes);
    `torch_threads` lets a CPU actor use more threads than it reserves (Ray pins a 1-CPU actor to
    one thread), since decoding leaves those cores idle most of the time."""

    ray_address: str | None = None
    actors: int | None = None
    cpus_per_actor: float | None = None
    gpus_per_actor: float | None = None
    decode_cpus: float = 0.5
    torch_threads: int | None = None
    # Local paths (source, output, evaluation images) are on storage every Ray node mounts at the
    # same path (NFS, Lustre). Without it a cluster of several nodes refuses local paths: each node
    # would read and write its own disk.
    shared_filesystem: bool = False

    def __post_init__(self):
        _check_positive(self, "actors")
        _check_non_negative(self, "cpus_per_actor", "gpus_per_actor", "decode_cpus", "torch_threads")


@dataclass(frozen=True)
class EvaluationConfig:
    wanted_uri: str | None = None
    unwanted_uri: str | None = None
    format: Literal["images", "parquet", "webdataset"] = "images"
    storage_options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RunConfig:
    run_name: str = "demo"
    model: ModelConfig = field(default_factory=ModelConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    detectors: list[DetectorConfig] = field(default_factory=list)
    output: OutputConfig = field(default_factory=OutputConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    cache_dir: str | None = None

    def __post_init__(self):
        labels = [d.label for d in self.detectors]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"detectors: names must be unique, got {labels}; set `name` on each")

    def decision_hash(self) -> str:
        """Hash of everything that decides keep/remove; an output dir belongs to one such config."""
        relevant = {k: to_dict(self)[k] for k in ("model", "detectors")}
        relevant["source"] = {k: v for k, v in to_dict(self.source).items() if k in DECISION_SOURCE_FIELDS}
        if self.source.jpeg_draft:  # other pixels, another decision; runs without it keep their hash
            relevant["source"]["jpeg_draft"] = True
        relevant["model"].pop("batch_size"), relevant["model"].pop("device")
        for det in relevant["detectors"]:
            if det["registered"] is None:  # runs from before registered detectors keep their hash
                det.pop("registered")
            elif "@" in det["registered"] or det["threshold"] is None:
                raise ValueError(f"{det['registered']}: resolve registered detectors to a version and threshold "
                                 "(curation.registry.resolve) before hashing the decision")
            det["threshold"].pop("min_sample")  # a guard, not a decision: lowering it resumes the same run
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# -- building dataclasses from plain data, with field paths in errors ---------------------------
def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, path: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            return _convert(value, arg, path)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        return [_convert(item, args[0], f"{path}[{i}]") for i, item in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (str, int, float, bool) and (type(value) is not tp):
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls, data: Any, path: str = ""):
    """Build dataclass `cls` from a mapping; unknown keys, missing required keys and wrong types
    raise ConfigError naming the field."""
    where = path or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; valid fields: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        sub = f"{path}.{f.name}" if path else f.name
        if f.name in data:
            kwargs[f.name] = _convert(data[f.name], hints[f.name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{sub}: required field is missing")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(_located(str(err), path, names)) from err


def _located(message: str, path: str, names: set[str]) -> str:
    """A dataclass's own error with the full field path: `value: ...` -> `detectors[0].threshold.value: ...`;
    messages that already carry the path (`model.batch_size: ...`) are kept."""
    head = message.split(":", 1)[0]
    if not path or head == path or head.startswith(f"{path}."):
        return message
    if head.split(".")[0].split("[")[0] in names:
        return f"{path}.{message}"
    return f"{path}: {message}"


def apply_override(data: dict, assignment: str) -> dict:
    """Apply one `dotted.key=value` (value parsed as YAML; list items by index: detectors.0.name)."""
    import yaml

    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        container = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if not isinstance(container, (dict, list)):
            raise ConfigError(f"--set {key}: {'.'.join(parts[:i + 1])} is not a section")
        node = container
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML (or start from the embedded defaults when `path` is None), apply overrides, validate."""
    import yaml

    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for assignment in overrides or []:
        apply_override(data, assignment)
    config = from_dict(RunConfig, data)
    return _finalize_detectors(config, path.parent if path else Path.cwd())


def _check_params(det: DetectorConfig, where: str) -> None:
    from curation.detectors import Detector

    valid = Detector.registry[det.kind].params
    unknown = sorted(set(det.params) - set(valid))
    if unknown:
        raise ConfigError(f"{where}.params: unknown parameter(s) {unknown} for {det.kind}; valid: {list(valid)}")


def _check_constructs(det: DetectorConfig, where: str) -> None:
    """Build the detector once, unfitted (cheap: no model, no text), so a bad parameter value
    fails at config load, naming the detector, rather than later in a Ray Task."""
    from curation.detectors import Detector

    try:
        Detector.registry[det.kind](det.task_texts, side=det.side, name=det.label, **det.params)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err


def _finalize_detectors(config: RunConfig, base: Path) -> RunConfig:
    """Check detector params and inline `task_file` contents (one text per line, # comments) so
    the run records its texts."""
    detectors = []
    for i, det in enumerate(config.detectors):
        if det.registered:  # kind, params and texts come from the registry
            detectors.append(det)
            continue
        _check_params(det, f"detectors[{i}]")
        texts = list(det.task_texts)
        if det.task_file:
            file = Path(det.task_file) if Path(det.task_file).is_absolute() else base / det.task_file
            if not file.exists():
                raise ConfigError(f"detectors[{i}].task_file: {file} does not exist")
            texts += [line.strip() for line in file.read_text().splitlines()
                      if line.strip() and not line.lstrip().startswith("#")]
        if not texts:
            raise ConfigError(f"detectors[{i}]: give task_texts or a task_file (both are empty)")
        det = dataclasses.replace(det, task_texts=texts, task_file=None)
        _check_constructs(det, f"detectors[{i}]")
        detectors.append(det)
    return dataclasses.replace(config, detectors=detectors)
