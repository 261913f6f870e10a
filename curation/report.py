"""The audit report of a finished curate or rescore run: `<run>/report/index.html`.

People judge a filter by looking at what it removed and what it almost removed. Per detector the
page shows its score histogram with the threshold, contact sheets (highest-scoring flagged items,
flagged items just above the threshold, kept items just below it), a table of what other
thresholds would remove with the `curation rescore` command that applies each, and the failed
items grouped by reason. It is built from what the run wrote (summary.json, _config.json, scores/,
failed/, the manifest) plus thumbnails read from the source: nothing is embedded again.

Memory stays bounded whatever the run size: scores/ files are streamed one record batch at a time
into top-k lists, exact fixed-bin histograms and one uniform reservoir sample of score rows
(`SAMPLE_ROWS`); the threshold table is exact when the run has no more decided items than that,
and says it is estimated otherwise.

    report/index.html      the page; thumbnails by relative path, histograms as inline SVG
    report/thumbs/*.jpg    downscaled thumbnails, one per shown item (named by a hash of
                           partition and position: ids come from hostile datasets)
    report/report.json     everything the page shows, as data
    report/config.yaml     the run's config with every threshold pinned to the value the run
                           used, for the rescore commands (secrets the run record redacted are
                           left out: they come from the environment or --set)

MLflow's UI (3.17, ShowArtifactHtmlView) renders an HTML artifact from a blob: URL in a sandboxed
iframe, where relative paths resolve to nothing; `mlflow_copy` writes the folder for MLflow with an
index.html that carries its thumbnails as data: URIs, so it shows the same page there.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime
import hashlib
import html
import io
import json
import logging
import shlex
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from curation import secrets, storage
from curation.config import RunConfig, SourceConfig, apply_override, from_dict, load_config
from curation.metrics import threshold_for_rate
from curation.pipeline.plan import Partition, RunDirectory
from curation.pipeline.write import KEEP, REMOVE

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa
    import pyarrow.parquet as pq

log = logging.getLogger(__name__)

PER_SHEET = 24  # thumbnails per contact sheet
SAMPLE_ROWS = 100_000  # score rows kept for the threshold table (~1 MB per 3 detectors)
THUMB_PX = 128  # longest side of a thumbnail
BINS = 50  # histogram bins over [0, 1]
RATES = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)  # removal rates the threshold table offers
OFFSETS = (-0.05, -0.02, -0.01, 0.01, 0.02, 0.05)  # score steps around the current threshold
BATCH_ROWS = 8192  # rows per record batch read from a scores/ file
THUMB_THREADS = 8  # concurrent source reads for thumbnails (S3 latency, not CPU, dominates)
MAX_ID_CHARS, MAX_MESSAGE_CHARS = 300, 500  # what of a hostile id or message the page holds
EXAMPLES_PER_KIND = 3


def summary_text(summary: dict) -> str:
    """What a curate or rescore run did, as `curation` prints it: counts, thresholds, where the
    audit report is."""
    lines = [f"\nrun {summary['run_name']}  ->  {summary['run_dir']}",
             f"{'':>9} {'items':>8} {'kept':>8} {'removed':>8} {'failed':>8} {'partitions':>10}"]
    for scope in ("this_run", "total"):
        c = summary[scope]
        lines.append(f"{scope:>9} {c['items']:>8} {c['kept']:>8} {c['removed']:>8} {c['failed']:>8} "
                     f"{c['partitions']:>10}")
    for name, threshold in summary["thresholds"].items():
        lines.append(f"  {name:<20} threshold {threshold['threshold']:.4f} ({threshold['strategy']})"
                     f"  fired on {summary['this_run']['fired'].get(name, 0)} this run")
    lines.append(f"throughput {summary['throughput_items_per_s']:.1f} items/s; MLflow run {summary['mlflow_run_id']}")
    built = summary.get("report", {})
    lines.append(f"audit report: {built['index']}" if built.get("status") == "ok"
                 else f"audit report not built: {built.get('error')}")
    return "\n".join(lines)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _float32(value: float) -> float:
    """Thresholds compare with float32 scores (numpy 2 casts a Python float to the array's type),
    so a threshold is one float32 value, written by its shortest exact decimal form."""
    return float(np.float32(value))


def _decimal(value: float) -> str:
    """The shortest positional decimal that reads back as the same float32 (YAML 1.1 reads
    `1e-05` as a string, so never exponent notation)."""
    return np.format_float_positional(np.float32(value), unique=True, trim="-")


# -- streaming statistics ----------------------------------------------------------------------
@dataclass
class Ranking:
    """The `k` first items of one ordering of one detector's scores, merged batch by batch (ties:
    partition, then position), so memory does not grow with the run."""

    key: str
    title: str
    k: int
    descending: bool
    items: list[dict] = field(default_factory=list)

    def offer(self, scores: np.ndarray, mask: np.ndarray, item_at: Callable[[int], dict]) -> None:
        """Consider the rows of one batch where `mask` holds; `scores` of shape (n_rows,)."""
        rows = np.flatnonzero(mask)
        order = np.argsort(-scores[rows] if self.descending else scores[rows], kind="stable")
        merged = self.items + [item_at(int(i)) for i in rows[order[: self.k]]]
        merged.sort(key=lambda item: (-item["score"] if self.descending else item["score"],
                                      item["partition"], item["position"]))
        self.items = merged[: self.k]


class Reservoir:
    """A uniform sample of at most `size` rows (Algorithm R, vectorised per batch, seeded so a
    rebuild shows the same table): every detector's score and whether it fired, per row."""

    def __init__(self, size: int, n_detectors: int, seed: int = 0):
        self.size, self.seen = size, 0
        self.scores = np.zeros((size, n_detectors), np.float32)
        self.fired = np.zeros((size, n_detectors), bool)
        self.rng = np.random.default_rng(seed)

    def add(self, scores: np.ndarray, fired: np.ndarray) -> None:
        """Rows of shape (n, n_detectors)."""
        fill = min(max(self.size - self.seen, 0), len(scores))
        self.scores[self.seen:self.seen + fill], self.fired[self.seen:self.seen + fill] = scores[:fill], fired[:fill]
        rest = np.arange(fill, len(scores))
        slots = self.rng.integers(0, self.seen + rest + 1) if rest.size else rest
        rows, slots = rest[slots < self.size], slots[slots < self.size]
        # a later row replaces an earlier one drawn to the same slot, as in the sequential algorithm
        _, last = np.unique(slots[::-1], return_index=True)
        rows, slots = rows[::-1][last], slots[::-1][last]
        self.scores[slots], self.fired[slots] = scores[rows], fired[rows]
        self.seen += len(scores)

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        n = min(self.seen, self.size)
        return self.scores[:n], self.fired[:n]


@dataclass
class DetectorStats:
    """One detector's share of the pass: exact flagged count and histogram, its three sheets.
    "Flagged" follows the run's recorded `fired` column, "kept" its recorded decision."""

    name: str
    index: int
    threshold: float
    per_sheet: int
    flagged: int = 0
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.int64))
    rankings: list[Ranking] = field(init=False)

    def __post_init__(self):
        k = self.per_sheet
        self.rankings = [Ranking("top", "Flagged, highest scores", k, True),
                         Ranking("above", "Flagged, nearest the threshold (just above)", k, False),
                         Ranking("below", "Kept, nearest the threshold (just below)", k, True)]

    def add(self, scores: np.ndarray, fired: np.ndarray, kept: np.ndarray,
            item_at: Callable[[int, float], dict]) -> None:
        """One batch: `scores` and `fired` of this detector, `kept` the run's decision, shape (n,)."""
        self.flagged += int(fired.sum())
        self.histogram += np.histogram(np.clip(scores, 0.0, 1.0), bins=BINS, range=(0.0, 1.0))[0]
        at = lambda i: item_at(i, float(scores[i]))  # noqa: E731
        for ranking, mask in zip(self.rankings, (fired, fired, kept)):
            ranking.offer(scores, mask, at)


@dataclass
class FailureGroups:
    """failed/ rows grouped by error kind: counts of items and of whole files, a few examples."""

    kinds: dict[str, dict] = field(default_factory=dict)

    def add(self, batch: pa.RecordBatch) -> None:
        kinds = np.asarray(batch.column("error_kind").to_pylist(), dtype=object)
        whole = np.asarray(batch.column("whole_file").to_pylist(), dtype=bool)
        for kind in np.unique(kinds):
            rows = np.flatnonzero(kinds == kind)
            group = self.kinds.setdefault(str(kind), {"kind": str(kind), "items": 0, "files": 0, "examples": []})
            group["files"] += int(whole[rows].sum())
            group["items"] += int((~whole[rows]).sum())
            for i in rows[: EXAMPLES_PER_KIND - len(group["examples"])]:
                group["examples"].append({"id": _clip(str(batch.column("id")[i].as_py()), MAX_ID_CHARS),
                                          "message": _clip(str(batch.column("message")[i].as_py()),
                                                           MAX_MESSAGE_CHARS)})

    def summary(self) -> list[dict]:
        return sorted(self.kinds.values(), key=lambda g: (-(g["items"] + g["files"]), g["kind"]))


@contextlib.contextmanager
def _parquet(uri: str, options: dict) -> Iterator[pq.ParquetFile]:
    """One of our parquet files opened for reading column by column, batch by batch: a scores/
    file's embeddings are never read."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri, options)
    with fs.open(path, "rb") as handle:
        yield pq.ParquetFile(handle)


def _fired_matrix(fired: pa.Array, names: list[str]) -> np.ndarray:
    """The `fired` list column as a bool matrix of shape (n_rows, n_detectors)."""
    import pyarrow.compute as pc

    flat = np.asarray(pc.list_flatten(fired).to_pylist(), dtype=object)
    parents = np.asarray(pc.list_parent_indices(fired).to_pylist(), dtype=np.int64)
    matrix = np.zeros((len(fired), len(names)), bool)
    for j, name in enumerate(names):
        matrix[parents[flat == name], j] = True
    return matrix


@dataclass
class RunStats:
    """Everything the report needs from scores/ and failed/, gathered in one bounded pass."""

    detectors: list[DetectorStats]
    reservoir: Reservoir
    failures: FailureGroups = field(default_factory=FailureGroups)
    decided: int = 0
    removed: int = 0
    embeddings: bool = True

    def add_scores(self, partition: str, batch: pa.RecordBatch) -> None:
        names = [d.name for d in self.detectors]
        scores = np.column_stack([batch.column(f"score_{n}").to_numpy(zero_copy_only=False) for n in names])
        scores = scores.astype(np.float32).reshape(batch.num_rows, len(names))
        fired = _fired_matrix(batch.column("fired"), names)
        decision = np.asarray(batch.column("decision").to_pylist(), dtype=object)
        positions = batch.column("position").to_numpy(zero_copy_only=False)

        def item_at(i: int, score: float) -> dict:
            return {"id": _clip(str(batch.column("id")[i].as_py()), MAX_ID_CHARS), "partition": partition,
                    "position": int(positions[i]), "score": score, "decision": str(decision[i]),
                    "fired": [n for n, f in zip(names, fired[i]) if f],
                    "scores": {n: float(s) for n, s in zip(names, scores[i])}}

        for j, det in enumerate(self.detectors):
            det.add(scores[:, j], fired[:, j], decision == KEEP, item_at)
        self.reservoir.add(scores, fired)
        self.decided += batch.num_rows
        self.removed += int((decision == REMOVE).sum())


def _scan(run: RunDirectory, names: list[str], thresholds: dict[str, float], per_sheet: int,
          sample_rows: int) -> RunStats:
    detectors = [DetectorStats(n, i, thresholds[n], per_sheet) for i, n in enumerate(names)]
    stats = RunStats(detectors, Reservoir(sample_rows, len(names)))
    columns = ["id", "position", "decision", "fired"] + [f"score_{n}" for n in names]
    for uri in _files(run, "scores"):
        with _parquet(uri, run.options) as scores:
            stats.embeddings &= "embedding" in scores.schema_arrow.names
            for batch in scores.iter_batches(BATCH_ROWS, columns=columns):
                stats.add_scores(uri.rsplit("/", 1)[-1].removesuffix(".parquet"), batch)
    for uri in _files(run, "failed"):
        with _parquet(uri, run.options) as failed:
            for batch in failed.iter_batches(BATCH_ROWS, columns=["id", "error_kind", "message", "whole_file"]):
                stats.failures.add(batch)
    return stats


def _files(run: RunDirectory, folder: str) -> list[str]:
    root = run.path(folder, "")
    return storage.list_files(root, run.options, (".parquet",))


# -- what other thresholds would do ------------------------------------------------------------
def threshold_rows(stats: RunStats, det: DetectorStats) -> list[dict]:
    """Candidate thresholds for one detector, highest first: the current one, those flagging at
    most each of RATES, and OFFSETS around the current one; each with how many decided items it
    flags and how many the run would then remove (the other detectors as they fired). The current
    row holds the run's own counts; the others are counted on the reservoir: exactly when it holds
    every row, else scaled from the sample."""
    scores, fired = stats.reservoir.sample()
    if not len(scores):
        return []
    mine, others = scores[:, det.index], np.delete(fired, det.index, axis=1).any(axis=1)
    exact = stats.reservoir.seen <= stats.reservoir.size
    candidates = [("current", det.threshold, None)]
    candidates += [(f"flags at most {rate:.1%}", threshold_for_rate(mine, rate), rate) for rate in RATES]
    candidates += [(f"current {offset:+.2f}", det.threshold + offset, None) for offset in OFFSETS]
    rows, seen = [], set()
    for label, value, rate in candidates:
        value = _float32(min(max(value, 0.0), 1.0))  # a fixed threshold is an unwanted score in [0, 1]
        if _decimal(value) in seen:
            continue
        seen.add(_decimal(value))
        flagged = mine >= value
        if label == "current":
            counts = det.flagged, stats.removed
        elif exact:
            counts = int(flagged.sum()), int((flagged | others).sum())
        else:
            counts = round(flagged.mean() * stats.decided), round((flagged | others).mean() * stats.decided)
        rows.append({"label": label, "target_rate": rate, "threshold": value, "flagged": counts[0],
                     "flagged_rate": counts[0] / stats.decided, "removed": counts[1],
                     "removed_rate": counts[1] / stats.decided})
    return sorted(rows, key=lambda r: -r["threshold"])


def rescore_command(run_uri: str, config_path: str, run_name: str, index: int, label: str,
                    threshold: float) -> str:
    """The shell command that re-decides the run with detector `index` at `threshold` (all other
    thresholds pinned by the report's config.yaml), into a new run next to this one."""
    value = _decimal(threshold)
    return shlex.join(["curation", "rescore", "--scores", run_uri, "--config", config_path,
                       "--set", f"detectors.{index}.threshold.strategy=fixed",
                       "--set", f"detectors.{index}.threshold.value={value}",
                       "--set", f"run_name={run_name}-{label}-t{value}"])


def without_redacted(data, path: str = "") -> tuple[object, list[str]]:
    """A copy of a recorded config without the values `curation.secrets` masked (whole values and
    URIs holding "***"), and the dotted paths left out: those come from the environment or --set."""
    if isinstance(data, dict):
        kept, dropped = {}, []
        for key, value in data.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(value, str) and secrets.MARKER in value:
                dropped.append(where)
                continue
            kept[key], inner = without_redacted(value, where)
            dropped += inner
        return kept, dropped
    if isinstance(data, list):
        pairs = [without_redacted(value, f"{path}.{i}") for i, value in enumerate(data)]
        return [value for value, _ in pairs], [p for _, inner in pairs for p in inner]
    return data, []


def pinned_config(recorded: dict, thresholds: dict[str, float]) -> tuple[dict, list[str]]:
    """The run's recorded config, redacted values left out, every detector's threshold fixed at
    the value this run used: a rescore with it changes only what its --set overrides change."""
    data, dropped = without_redacted(copy.deepcopy(recorded))
    for det in data["detectors"]:
        value = min(max(thresholds[det.get("name") or det["kind"]], 0.0), 1.0)
        det["threshold"] = {"strategy": "fixed", "value": float(_decimal(value))}
    return data, dropped


# -- thumbnails --------------------------------------------------------------------------------
def thumbnail_bytes(data: bytes, px: int, max_pixels: int) -> bytes | str:
    """JPEG bytes of an image scaled to fit `px` x `px`, or why it cannot be shown."""
    from curation.pipeline.decode import DecodeError, decode_rgb

    image = decode_rgb(data, max_pixels, draft_px=px)
    if isinstance(image, DecodeError):
        return f"{image.kind}: {image.message}"
    image.thumbnail((px, px))
    sink = io.BytesIO()
    image.save(sink, format="JPEG", quality=80)
    return sink.getvalue()


def thumb_name(item: dict) -> str:
    return hashlib.sha1(f"{item['partition']}/{item['position']}".encode()).hexdigest()[:20] + ".jpg"


def _read_images(items: list[dict], source: SourceConfig, manifest: dict) -> dict[str, bytes | str]:
    """One image file per item: its id is its path relative to the source root (`manifest`
    unused: the signature is `_read_container`'s)."""
    from curation.pipeline.read import fetch

    found = {}
    for item in items:
        data = fetch(storage.join(source.uri, item["id"]), source, source.max_item_bytes)
        found[thumb_name(item)] = data if isinstance(data, bytes) else f"{data.kind}: {data.message}"
    return found


def _read_container(items: list[dict], source: SourceConfig, manifest: dict) -> dict[str, bytes | str]:
    """The items of one parquet file or shard (one partition), read once with the run's readers;
    `manifest` is the run's (`RunDirectory.manifest`), read once for all partitions."""
    from curation.pipeline.read import iter_raw_items

    record = manifest.get(items[0]["partition"])
    if record is None:
        return {thumb_name(i): "the run's manifest has no record of this partition" for i in items}
    partition = Partition.from_dict(record["partition"])
    wanted = {item["position"]: item for item in items}
    found = {thumb_name(i): "not in the source any more" for i in items}
    for position, raw in enumerate(iter_raw_items(partition, source)):
        if raw.whole_file:  # the file itself cannot be read (any more)
            return {name: f"{raw.error.kind}: {raw.error.message}" if why == "not in the source any more" else why
                    for name, why in found.items()}
        item = wanted.get(position)
        if item is None:
            continue
        if raw.id != item["id"]:
            found[thumb_name(item)] = "the source changed since the run (another item at this position)"
        else:
            found[thumb_name(item)] = raw.data if raw.error is None else f"{raw.error.kind}: {raw.error.message}"
    return found


def write_thumbnails(run: RunDirectory, source: SourceConfig, items: list[dict], px: int) -> dict[str, str]:
    """Read every shown item from the source (per partition for parquet and WebDataset, so each
    file is read once) and write its thumbnail to report/thumbs/; returns name -> "" when written,
    else the reason it could not be shown. Stale thumbnails of earlier builds are deleted."""
    groups: dict[str, list[dict]] = {}
    for item in {thumb_name(i): i for i in items}.values():
        groups.setdefault(item["partition"] if source.format != "images" else thumb_name(item), []).append(item)
    reader = _read_images if source.format == "images" else _read_container
    manifest = run.manifest() if source.format != "images" and groups else {}

    def unit(group: list[dict]) -> dict[str, str]:
        outcome = {}
        for name, data in reader(group, source, manifest).items():
            result = thumbnail_bytes(data, px, source.max_pixels) if isinstance(data, bytes) else data
            if isinstance(result, bytes):
                storage.write_bytes(run.path("report", "thumbs", name), result, run.options)
            outcome[name] = "" if isinstance(result, bytes) else _clip(secrets.redact_text(result), MAX_MESSAGE_CHARS)
        return outcome

    with ThreadPoolExecutor(THUMB_THREADS) as pool:
        shown = {name: why for outcome in pool.map(unit, groups.values()) for name, why in outcome.items()}
    folder = run.path("report", "thumbs", "")
    old = storage.list_files(folder, run.options)
    storage.remove_many([f for f in old if f[len(folder):] not in shown or shown[f[len(folder):]]], run.options)
    return shown


# -- building ----------------------------------------------------------------------------------
class NotARunError(FileNotFoundError):
    """The directory holds no finished curate or rescore run (no summary.json or _config.json)."""


def _require(run: RunDirectory, name: str) -> dict:
    found = run.read_json(name)
    if found is None:
        raise NotARunError(f"{run.uri} has no {name}: not a finished curate or rescore run directory "
                           "(a report is built after the run wrote its summary)")
    return found


def collect(run: RunDirectory, source: SourceConfig, summary: dict, recorded: dict, per_sheet: int,
            sample_rows: int, thumb_px: int) -> dict:
    """The report as data (what report.json holds) from the run's summary.json, its recorded
    config, scores/ and failed/; writes the thumbnails on the way."""
    names = [d.get("name") or d["kind"] for d in recorded["detectors"]]
    thresholds = {n: summary["thresholds"][n]["threshold"] for n in names}
    stats = _scan(run, names, thresholds, per_sheet, sample_rows)
    run_uri = run.uri.rstrip("/")
    config_path = run.path("report", "config.yaml") if storage.is_local(run.uri) else "config.yaml"
    detectors = []
    for det, spec in zip(stats.detectors, recorded["detectors"]):
        rows = threshold_rows(stats, det)
        for row in rows:
            row["command"] = rescore_command(run_uri, config_path, recorded["run_name"], det.index, det.name,
                                             row["threshold"])
        detectors.append({"name": det.name, "index": det.index, "kind": spec["kind"], "side": spec["side"],
                          "threshold": det.threshold, "strategy": summary["thresholds"][det.name]["strategy"],
                          "flagged": det.flagged, "histogram": det.histogram.tolist(), "thresholds": rows,
                          "sheets": [{"key": r.key, "title": r.title, "items": r.items} for r in det.rankings]})
    shown = [item for d in detectors for sheet in d["sheets"] for item in sheet["items"]]
    unavailable = write_thumbnails(run, source, shown, thumb_px)
    for item in shown:
        item["thumb"], item["unavailable"] = thumb_name(item), unavailable[thumb_name(item)]
    built_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"version": 1, "run": {"name": recorded["run_name"], "uri": run_uri, "built_at": built_at,
                                  "rescored_from": summary.get("rescored_from")},
            "summary": summary, "decided": stats.decided, "removed": stats.removed,
            "sample": {"rows": min(stats.reservoir.seen, sample_rows), "exact": stats.reservoir.seen <= sample_rows},
            "detectors": detectors, "failed": stats.failures.summary(),
            "rescore": {"config": config_path, "config_local": storage.is_local(run.uri),
                        "embeddings": stats.embeddings}}


def build_report(run: RunDirectory, source: SourceConfig, per_sheet: int = PER_SHEET,
                 sample_rows: int = SAMPLE_ROWS, thumb_px: int = THUMB_PX) -> dict:
    """Write `<run>/report/` (thumbnails, report.json, config.yaml, then index.html last) for a
    finished run whose items are read from `source`; returns where and how big."""
    import yaml

    summary, recorded = _require(run, "summary.json"), _require(run, "_config.json")["config"]
    model = collect(run, source, summary, recorded, per_sheet, sample_rows, thumb_px)
    config, dropped = pinned_config(recorded, {d["name"]: d["threshold"] for d in model["detectors"]})
    model["rescore"]["dropped"] = dropped
    header = (f"# The config of run {json.dumps(recorded['run_name'])} with every detector's threshold pinned to\n"
              "# the value the run used (strategy fixed): `curation rescore --config` this file changes only what\n"
              "# --set changes.\n"
              + "".join(f"# left out (redacted in the run's record; set it in the environment or with --set): {p}\n"
                        for p in dropped))
    storage.write_bytes(run.path("report", "config.yaml"), (header + yaml.safe_dump(config, sort_keys=False)).encode(),
                        run.options)
    storage.write_bytes(run.path("report", "report.json"), json.dumps(model, indent=1).encode(), run.options)
    page = render(model, lambda name: f"thumbs/{name}").encode()
    storage.write_bytes(run.path("report", "index.html"), page, run.options)
    files = storage.list_files(run.path("report", ""), run.options)
    return {"status": "ok", "index": run.path("report", "index.html"), "files": len(files),
            "sampled": not model["sample"]["exact"]}


def try_build(run: RunDirectory, source: SourceConfig) -> dict:
    """`build_report` at the end of a run: a failure costs the report only, never the run; it is
    returned (for summary.json) and logged as a warning, credentials redacted."""
    try:
        return build_report(run, source)
    except Exception as err:  # noqa: BLE001 - any fault in the report leaves the run's outputs standing
        known = secrets.secret_values(source.storage_options) + secrets.secret_values(run.options)
        error = secrets.redact_text(f"{type(err).__name__}: {err}", known)
        log.warning("could not build the report of %s (the run's outputs are complete; rebuild it with "
                    "`curation report --run %s`): %s", run.uri, run.uri, error)
        return {"status": "failed", "error": error}


def mlflow_copy(run: RunDirectory, into: Path) -> Path:
    """The report folder as MLflow should hold it, written under `into`: every file of report/,
    but index.html with its thumbnails inlined as data: URIs (MLflow's UI shows HTML artifacts
    from a blob: URL, where the relative thumbnail paths of the run directory's page break)."""
    into.mkdir(parents=True, exist_ok=True)
    root = run.path("report", "")
    for uri in storage.list_files(root, run.options):
        target = into / uri[len(root):]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.read_bytes(uri, run.options))
    model = json.loads((into / "report.json").read_text(encoding="utf-8"))
    inline = lambda name: "data:image/jpeg;base64," + base64.b64encode((into / "thumbs" / name).read_bytes()).decode()  # noqa: E731
    (into / "index.html").write_text(render(model, inline), encoding="utf-8")
    return into


def report_config(run_uri: str, config_path: str | None = None,
                  overrides: list[str] | tuple[str, ...] = ()) -> tuple[RunDirectory, RunConfig]:
    """The run directory and the config to read its source with: `config_path` (plus --set
    overrides) when given, else the run's recorded config without its redacted values (credentials
    then come from the environment) plus the overrides. The run directory is opened with the
    output storage options of --config/--set (or none: the environment's credentials)."""
    if config_path:
        cfg = load_config(config_path, list(overrides))
        return RunDirectory(run_uri, "", cfg.output.storage_options), cfg
    given: dict = {}
    for assignment in overrides:
        apply_override(given, assignment)
    run = RunDirectory(run_uri, "", given.get("output", {}).get("storage_options", {}))
    data, _ = without_redacted(_require(run, "_config.json")["config"])
    for assignment in overrides:
        apply_override(data, assignment)
    return run, from_dict(RunConfig, data)


def rebuild(run_uri: str, config_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """`curation report`: rebuild the report of a finished run from its files (no embedding)."""
    run, cfg = report_config(run_uri, config_path, overrides)
    return build_report(run, cfg.source)


# -- the page ----------------------------------------------------------------------------------
STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}tr.current{background:#fff3c4}
code{font-size:12px;word-break:break-all}
.sheet{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;width:140px;font-size:11px}
figure img{display:block;max-width:128px;max-height:128px;border:1px solid #ccc}
.missing{width:128px;height:96px;background:#eee;color:#a00;overflow:hidden;font-size:10px}
figcaption{overflow-wrap:anywhere}.note{color:#555}
"""
# Defence in depth (ids and messages are escaped anyway): no scripts, frames, fonts or fetches;
# images by URL from where the page is served (file:, http:) or as data: URIs (the MLflow copy).
CSP = "default-src 'none'; img-src * data:; style-src 'unsafe-inline'"
esc = html.escape


def render(model: dict, src: Callable[[str], str]) -> str:
    """The page for `model` (report.json); `src(thumbnail name)` says how an <img> finds it."""
    run = model["run"]
    body = [f"<h1>Curation report: {esc(run['name'])}</h1>", _summary_html(model)]
    body += [_detector_html(det, model, src) for det in model["detectors"]]
    body.append(_failures_html(model["failed"]))
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            f"<meta http-equiv=Content-Security-Policy content=\"{CSP}\">"
            f"<title>Curation report: {esc(run['name'])}</title><style>{STYLE}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")


def _summary_html(model: dict) -> str:
    summary, run = model["summary"], model["run"]
    scopes = [s for s in ("total", "this_run") if s in summary]
    keys = ("items", "kept", "removed", "failed", "files", "failed_files", "partitions")
    rows = "".join(f"<tr><th class=l>{esc(s.replace('_', ' '))}</th>"
                   + "".join(f"<td>{esc(str(summary[s].get(k, '')))}</td>" for k in keys) + "</tr>" for s in scopes)
    thresholds = ", ".join(f"{esc(d['name'])} {d['threshold']:.4g} ({esc(d['strategy'])})" for d in model["detectors"])
    origin = f"rescored from <code>{esc(str(run['rescored_from']))}</code>; " if run["rescored_from"] else ""
    tracked = f"MLflow run {esc(str(summary['mlflow_run_id']))}; " if summary.get("mlflow_run_id") else ""
    return (f"<p class=note>{origin}run directory <code>{esc(run['uri'])}</code>; "
            f"model {esc(str(summary.get('model')))}; {tracked}built {esc(run['built_at'])}</p>"
            f"<table><tr><th></th>{''.join(f'<th>{k}</th>' for k in keys)}</tr>{rows}</table>"
            f"<p>{model['decided']} decided items, {model['removed']} removed "
            f"({model['removed'] / max(model['decided'], 1):.2%}). Thresholds: {thresholds}.</p>")


def _detector_html(det: dict, model: dict, src: Callable[[str], str]) -> str:
    rate = det["flagged"] / max(model["decided"], 1)
    head = (f"<h2>Detector {esc(det['name'])}</h2><p>{esc(det['kind'])}, task texts describe the "
            f"{esc(det['side'])} side; threshold {det['threshold']:.6g} ({esc(det['strategy'])}) flags "
            f"{det['flagged']} of {model['decided']} decided items ({rate:.2%}).</p>")
    sheets = "".join(_sheet_html(sheet, src) for sheet in det["sheets"])
    return head + _histogram_svg(det) + _threshold_table(det, model) + sheets


def _histogram_svg(det: dict) -> str:
    counts, width, height, pad = det["histogram"], 600, 160, 30
    top, bar = max(max(counts), 1), width / len(counts)
    bars = "".join(f"<rect x={pad + i * bar:.1f} y={pad + height - c / top * height:.1f} width={bar - 1:.1f} "
                   f"height={c / top * height:.1f} fill=#4a7ab5><title>{i / len(counts):.2f}-"
                   f"{(i + 1) / len(counts):.2f}: {c}</title></rect>" for i, c in enumerate(counts))
    x = pad + min(max(det["threshold"], 0.0), 1.0) * width
    ticks = "".join(f"<text x={pad + t * width:.0f} y={pad + height + 16} font-size=11 text-anchor=middle>"
                    f"{t:.1f}</text>" for t in np.linspace(0, 1, 6))
    return (f"<svg width={width + 2 * pad} height={height + 2 * pad + 10} role=img "
            f"aria-label=\"score histogram\"><text x={pad} y=16 font-size=12>unwanted score of every decided item "
            f"(max bin {top})</text>{bars}<line x1={x:.1f} x2={x:.1f} y1={pad - 4} y2={pad + height} stroke=#c00 "
            f"stroke-dasharray=4 stroke-width=2 /><text x={x + 4:.1f} y={pad + 8} font-size=11 fill=#c00>"
            f"threshold {det['threshold']:.4g}</text>{ticks}</svg>")


def _threshold_table(det: dict, model: dict) -> str:
    sample, rescore = model["sample"], model["rescore"]
    basis = "counted over every decided item" if sample["exact"] else (
        f"estimated from a uniform sample of {sample['rows']} of {model['decided']} decided items "
        "(the current row is exact)")
    rows = "".join(
        f"<tr class={'current' if r['label'] == 'current' else 'other'}><td class=l>{esc(r['label'])}</td>"
        f"<td>{r['threshold']:.6g}</td><td>{r['flagged']}</td><td>{r['flagged_rate']:.2%}</td><td>{r['removed']}</td>"
        f"<td>{r['removed_rate']:.2%}</td><td class=l><code>{esc(r['command'])}</code></td></tr>"
        for r in det["thresholds"])
    notes = [f"What other thresholds of {esc(det['name'])} would do, {basis}. The rescore scores the stored float16 "
             "embeddings again, so items within about 0.002 of a threshold may land on either side."]
    if not rescore["embeddings"]:
        notes.append("This run stored no embeddings: the commands need a run made with output.store_embeddings=true.")
    if not rescore["config_local"]:
        notes.append("Download <code>report/config.yaml</code> of this run to <code>config.yaml</code> first.")
    if rescore.get("dropped"):
        notes.append("config.yaml leaves out values the run's record redacts (give them in the environment or with "
                     f"--set): {esc(', '.join(rescore['dropped']))}.")
    return (f"<p class=note>{' '.join(notes)}</p><table><tr><th class=l>threshold that</th><th>value</th>"
            f"<th>flagged by {esc(det['name'])}</th><th>rate</th><th>removed by the run</th><th>rate</th>"
            f"<th class=l>apply it</th></tr>{rows}</table>")


def _sheet_html(sheet: dict, src: Callable[[str], str]) -> str:
    figures = []
    for item in sheet["items"]:
        picture = (f"<div class=missing>unavailable: {esc(item['unavailable'])}</div>" if item["unavailable"]
                   else f"<img src=\"{esc(src(item['thumb']))}\" alt=\"{esc(item['id'])}\">")
        fired = ", ".join(item["fired"]) or "none"
        figures.append(f"<figure>{picture}<figcaption><b>{esc(item['id'])}</b><br>score {item['score']:.4f} · "
                       f"{esc(item['decision'])}<br>fired: {esc(fired)}</figcaption></figure>")
    empty = "" if figures else "<p class=note>no items</p>"
    return f"<h3>{esc(sheet['title'])}</h3>{empty}<div class=sheet>{''.join(figures)}</div>"


def _failures_html(groups: list[dict]) -> str:
    if not groups:
        return "<h2>Failed items</h2><p>none</p>"
    rows = "".join(f"<tr><td class=l>{esc(g['kind'])}</td><td>{g['items']}</td><td>{g['files']}</td><td class=l>"
                   + "<br>".join(f"<b>{esc(x['id'])}</b>: {esc(x['message'])}" for x in g["examples"]) + "</td></tr>"
                   for g in groups)
    return (f"<h2>Failed items</h2><table><tr><th class=l>reason</th><th>items</th><th>whole files</th>"
            f"<th class=l>examples</th></tr>{rows}</table>")
