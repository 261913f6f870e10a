"""Partitions, the walk of the source and the manifest: what a run has to do, and what earlier
runs already finished.

A partition is the unit of work and of resume: one parquet file, one WebDataset shard, or up to
`partition_size` image files of one folder. A partition is finished when its manifest record
exists; that record is written last, after all its outputs, so a killed run redoes exactly the
unfinished partitions.

Nothing here holds the whole source on the driver. The source is walked one folder (a *unit*) at
a time, each by its own Ray Task (`plan_unit`; the walk is a parallel breadth-first search): the
task lists its folder one level, reads and compacts that folder's manifest
(`_manifest/<unit key>/`), deletes the folder's outputs that no record vouches for, groups the
files no record covers into new partitions and writes each image group's names to
`_plan/<id>.json`. The driver gets back subfolders, counts and `PlannedPartition`s: its memory
grows with the number of partitions, not of images, and the stream's stages read the names from
the plan. Files added to a folder are the only ones the next (incremental) run processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
from collections import Counter
from dataclasses import asdict, dataclass

from curation import storage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
FORMAT_EXTENSIONS = {"images": IMAGE_EXTENSIONS, "parquet": (".parquet",), "webdataset": (".tar",)}
COUNT_KEYS = ("items", "kept", "removed", "failed", "files", "failed_files")
MANIFEST, PLAN, SPOOL = "_manifest", "_plan", "_spool"
log = logging.getLogger(__name__)


class OutputConflictError(RuntimeError):
    """The output location holds a run made with another decision config."""


class ManifestLayoutError(RuntimeError):
    """A manifest written before partitions were kept within one folder cannot be migrated."""


@dataclass(frozen=True)
class Partition:
    """`inputs` are URIs relative to the source root (POSIX style), in a stable order; `unit` is
    the folder they lie in ("" for the root; calibration and evaluation sets may span folders)."""

    id: str
    format: str
    inputs: tuple[str, ...]
    unit: str = ""

    @property
    def size(self) -> int:
        return len(self.inputs)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Partition":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: dict) -> "Partition":
        inputs = tuple(data["inputs"])  # records of the old flat layout have no unit: their folder
        return cls(data["id"], data["format"], inputs, data.get("unit", posixpath.dirname(inputs[0]) if inputs else ""))


@dataclass(frozen=True)
class PlannedPartition:
    """A partition as the driver holds it. A parquet file or shard travels with its one name; an
    image group's names stay in the run's `_plan/<id>.json` (`RunDirectory.load`)."""

    id: str
    format: str
    unit: str
    size: int
    inputs: tuple[str, ...] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "PlannedPartition":
        data = json.loads(text)
        inputs = data.get("inputs")
        return cls(data["id"], data["format"], data["unit"], data["size"], None if inputs is None else tuple(inputs))


def _partition_id(inputs: list[str]) -> str:
    return hashlib.sha1("\n".join(inputs).encode()).hexdigest()[:16]


def unit_key(unit: str) -> str:
    """The manifest folder of a unit: a hash, since folder names may be long or odd."""
    return hashlib.sha1(f"unit:{unit}".encode()).hexdigest()[:16]


def _unsafe_name(name: str) -> bool:
    """A file or folder name (one path segment) that cannot map to a distinct output path: S3
    keys with empty, `.` or `..` segments (`a//b.jpg` and `a/./b.jpg` would both land on
    `kept/a/b.jpg`) list as folders named "", "." or "..", and backslashes are refused too."""
    return name in ("", ".", "..") or "\\" in name or "/" in name


def list_unit(source_uri: str, storage_options: dict, fmt: str, unit: str) -> tuple[list[str], list[str], Counter]:
    """One folder of the source: its input files and subfolders (relative to the source root,
    sorted), and what was skipped by reason (links, special files, other extensions, unsafe
    names), for summary.json. Nothing is dropped uncounted; an unsafe subfolder counts once, for
    its whole subtree, which is never listed."""
    files, folders, passed_over = storage.list_dir(storage.join(source_uri, unit), storage_options)
    skipped, prefix, wanted = Counter(passed_over), f"{unit}/" if unit else "", FORMAT_EXTENSIONS[fmt]
    names, subunits = [], []
    for name in files:
        if _unsafe_name(name):
            skipped["unsafe_name"] += 1
        elif not name.lower().endswith(wanted):
            skipped[f"extension {os.path.splitext(name)[1].lower() or '(none)'}"] += 1
        else:
            names.append(prefix + name)
    for name in folders:
        if _unsafe_name(name):  # a whole subtree of keys that cannot map to distinct outputs
            skipped["unsafe_name"] += 1
        else:
            subunits.append(prefix + name)
    return names, subunits, skipped


def scan_inputs(source_uri: str, storage_options: dict, fmt: str) -> tuple[list[str], dict[str, int]]:
    """All input files of the source, relative to its root, sorted, and what was skipped by
    reason: the walk of `plan`, in this process, for sets small enough to hold (labelled
    evaluation sets). Curate never holds the whole listing."""
    names, skipped, frontier = [], Counter(), [""]
    while frontier:
        unit = frontier.pop()
        found, subunits, passed_over = list_unit(source_uri, storage_options, fmt, unit)
        names += found
        skipped.update(passed_over)
        frontier += subunits
    if skipped.get("unsafe_name"):
        log.warning("skipped %d source names that cannot map to distinct outputs", skipped["unsafe_name"])
    return sorted(names), dict(skipped)


def relative_inputs(source_uri: str, storage_options: dict, fmt: str) -> list[str]:
    """All input files of the source, relative to its root, sorted."""
    return scan_inputs(source_uri, storage_options, fmt)[0]


def make_partitions(inputs: list[str], fmt: str, partition_size: int, unit: str = "") -> list[Partition]:
    """Image files are grouped `partition_size` at a time; parquet files and shards stand alone."""
    size = partition_size if fmt == "images" else 1
    groups = [inputs[i:i + size] for i in range(0, len(inputs), size)]
    return [Partition(_partition_id(group), fmt, tuple(group), unit) for group in groups]


def sum_counts(counts: list[dict], names: list[str] | None = None) -> dict:
    """Counts of many partitions (manifest records' counts, or sums made by this function) added
    up; `fired` per detector, restricted to `names` when given."""
    total = {key: sum(c.get(key, 0) for c in counts) for key in COUNT_KEYS}
    fired: Counter = Counter()
    for c in counts:
        fired.update(c.get("fired", {}))
    total["fired"] = {n: fired.get(n, 0) for n in names} if names is not None else dict(fired)
    total["partitions"] = sum(c.get("partitions", 1) for c in counts)
    return total


class RunDirectory:
    """`<output uri>/<run name>/`: outputs, manifest, plan, thresholds and the config that owns it."""

    def __init__(self, output_uri: str, run_name: str, storage_options: dict | None = None):
        self.uri = storage.join(output_uri, run_name)
        self.options = storage_options or {}

    def path(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    def read_json(self, *parts: str) -> dict | None:
        uri = self.path(*parts)
        return json.loads(storage.read_bytes(uri, self.options)) if storage.exists(uri, self.options) else None

    def write_json(self, obj, *parts: str) -> None:
        storage.write_bytes(self.path(*parts), json.dumps(obj, indent=2, default=str).encode(), self.options)

    def check_owner(self, decision_hash: str) -> bool:
        """Refuse a directory owned by another decision config, before anything in it changes;
        returns whether this config owns it already (an earlier run claimed it)."""
        owner = self.read_json("_config.json")
        if owner is not None and owner["decision_hash"] != decision_hash:
            raise OutputConflictError(
                f"{self.uri} already holds a run of another config (decision hash "
                f"{owner['decision_hash']}, this config {decision_hash}). Use another run_name or "
                "output.uri; re-running the same config resumes and adds new partitions.")
        return owner is not None

    def claim(self, decision_hash: str, config_dict: dict) -> None:
        """Mark this directory as owned by one decision config; refuse another config's run."""
        if not self.check_owner(decision_hash):
            self.write_json({"decision_hash": decision_hash, "config": config_dict}, "_config.json")

    # -- the manifest: `_manifest/<unit key>/` per folder of the source ---------------------------
    def unit_keys(self) -> list[str]:
        """The manifest's units; "" stands for records of the old flat layout, if any."""
        files, folders, _ = storage.list_dir(self.path(MANIFEST), self.options)
        return folders + ([""] if files else [])

    def unit_records(self, key: str) -> dict[str, dict]:
        """Finished partitions of one unit: id -> manifest record, from its compacted files and
        the single records written since, fetched in one concurrent batch."""
        folder = self.path(MANIFEST, key, "")  # key "": the old flat layout's files
        for attempt in range(3):  # a resumed run compacting meanwhile may delete a listed file
            files = [folder + name for name in storage.list_dir(folder, self.options)[0]
                     if name.endswith((".json", ".jsonl"))]
            try:
                contents = storage.read_many(files, self.options)
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
        records = {}
        for file, data in contents.items():
            for text in data.decode("utf-8").splitlines() if file.endswith(".jsonl") else [data]:
                if text.strip():
                    record = json.loads(text)
                    records[record["partition"]["id"]] = record
        return records

    def manifest(self) -> dict[str, dict]:
        """Every finished partition: id -> record. It holds every input name, so only for what is
        small (the report's container partitions, tests); the jobs read one unit at a time."""
        return {pid: record for key in self.unit_keys() for pid, record in self.unit_records(key).items()}

    def compact_unit(self, key: str, records: dict[str, dict]) -> int:
        """Fold a unit's records into one `compacted-<content hash>.jsonl`, then delete the
        single records and older compacted files in bulk: a unit of 200 partitions is one read at
        the next start instead of 200. Crash-safe in either order (records are identical
        wherever they appear). Call it under the lease, when no writer of this run is active.
        Returns how many files it replaced."""
        folder = self.path(MANIFEST, key, "")
        files = [name for name in storage.list_dir(folder, self.options)[0] if name.endswith((".json", ".jsonl"))]
        if len(files) <= 1:
            return 0
        name = self._write_compacted(key, records)
        storage.remove_many([folder + file for file in files if file != name], self.options)
        return len(files) - (name in files)

    def _write_compacted(self, key: str, records: dict[str, dict]) -> str:
        body = "".join(json.dumps(records[pid], sort_keys=True) + "\n" for pid in sorted(records)).encode()
        name = f"compacted-{hashlib.sha256(body).hexdigest()[:16]}.jsonl"
        storage.write_bytes(self.path(MANIFEST, key, name), body, self.options)
        return name

    def migrate_flat_manifest(self) -> int:
        """Records of the old flat layout (`_manifest/<id>.json`, `compacted-*.jsonl`) refiled per
        unit, once, under the lease. Old partitions could span folders; one that does cannot be
        refiled and the run is refused rather than redoing or double-counting anything."""
        records = self.unit_records("")
        if not records:
            return 0
        by_unit: dict[str, dict] = {}
        for pid, record in records.items():
            folders = {posixpath.dirname(name) for name in record["partition"]["inputs"]}
            if len(folders) > 1:
                raise ManifestLayoutError(
                    f"{self.uri}: partition {pid} of an earlier version spans folders {sorted(folders)[:3]}; "
                    "this version keeps each partition within one folder and cannot resume it. Curate into "
                    "a new run_name (or output.uri).")
            unit = folders.pop() if folders else ""
            by_unit.setdefault(unit, {})[pid] = record | {"partition": record["partition"] | {"unit": unit}}
        for unit, unit_records in by_unit.items():
            self._write_compacted(unit_key(unit), unit_records)
        folder = self.path(MANIFEST, "")
        storage.remove_many([folder + name for name in storage.list_dir(folder, self.options)[0]], self.options)
        return len(records)

    def finish(self, partition: Partition, counts: dict) -> None:
        """Written last: from now on the partition counts as done."""
        self.write_json({"partition": asdict(partition), "counts": counts},
                        MANIFEST, unit_key(partition.unit), f"{partition.id}.json")

    def finished_record(self, partition: Partition | PlannedPartition) -> dict | None:
        return self.read_json(MANIFEST, unit_key(partition.unit), f"{partition.id}.json")

    # -- the plan: image groups' names, read by the stream's stages ----------------------------
    def _plan_uri(self, pid: str) -> str:
        return self.path(PLAN, f"{pid}.json")

    def write_plan(self, partition: Partition) -> PlannedPartition:
        inline = partition.format != "images"
        if not inline:
            storage.write_bytes(self._plan_uri(partition.id), json.dumps(asdict(partition)).encode(), self.options)
        return PlannedPartition(partition.id, partition.format, partition.unit, partition.size,
                                partition.inputs if inline else None)

    def plan_files(self, planned: list[PlannedPartition]) -> list[str]:
        return [self._plan_uri(p.id) for p in planned if p.inputs is None]

    def load_many(self, planned: list[PlannedPartition]) -> list[Partition]:
        """The partitions with their names, the plan files fetched in one concurrent batch."""
        contents = storage.read_many(self.plan_files(planned), self.options)
        return [Partition(p.id, p.format, p.inputs, p.unit) if p.inputs is not None else
                Partition.from_dict(json.loads(contents[self._plan_uri(p.id)])) for p in planned]

    def load(self, planned: PlannedPartition) -> Partition:
        return self.load_many([planned])[0]

    # -- leftovers of killed runs ----------------------------------------------------------------
    def remove_stale_work(self) -> int:
        """Spooled rows and plans of earlier runs: every run plans and spools afresh. Call it
        under the lease, before any worker of this run starts."""
        stale = storage.list_files(self.path(SPOOL, ""), self.options) + storage.list_files(self.path(PLAN, ""),
                                                                                           self.options)
        storage.remove_many(stale, self.options)
        return len(stale)

    def remove_unvouched_outputs(self, unit: str, inputs: set[str]) -> int:
        """kept/ and removed/ files of one folder that no finished partition covers (a killed
        run's leftovers, half-written temp files included): a resumed run may regroup those
        inputs and decide them again, so nothing stale may stay. Bulk delete."""
        stale = []
        for folder in ("kept", "removed"):
            root = self.path(folder, unit, "")
            prefix = f"{unit}/" if unit else ""
            stale += [root + name for name in storage.list_dir(root, self.options)[0] if prefix + name not in inputs]
        storage.remove_many(stale, self.options)
        return len(stale)

    def remove_unvouched_tables(self, finished: set[str]) -> int:
        """scores/ and failed/ files of partitions that no manifest record vouches for."""
        stale = []
        for folder in ("scores", "failed"):
            root = self.path(folder, "")
            stale += [root + name for name in storage.list_dir(root, self.options)[0]
                      if name.split(".")[0] not in finished]
        storage.remove_many(stale, self.options)
        return len(stale)


@dataclass
class UnitPlan:
    """What `plan_unit` found in one folder."""

    unit: str
    key: str
    subunits: list[str]
    skipped: dict[str, int]
    partitions: list[PlannedPartition]
    finished: list[str]
    finished_counts: dict


def plan_unit(run: RunDirectory, source_uri: str, storage_options: dict, fmt: str, partition_size: int,
              unit: str | None, key: str | None = None, clean: bool = True) -> UnitPlan:
    """Ray Task: plan one folder of the source (see the module docstring). With `unit=None`,
    a manifest unit the walk did not reach (its folder is gone from the source): its records
    still count, and nothing is listed. `clean=False` deletes nothing (a directory no run has
    claimed yet holds nothing of ours). Call it under the lease."""
    key = key or unit_key(unit)
    records = run.unit_records(key)
    if unit is None and not records:  # no folder name to act on: touch nothing
        return UnitPlan("", key, [], {}, [], [], sum_counts([]))
    if clean:
        run.compact_unit(key, records)
    if unit is None:
        unit = Partition.from_dict(next(iter(records.values()))["partition"]).unit
        names, subunits, skipped = [], [], Counter()
    else:
        names, subunits, skipped = list_unit(source_uri, storage_options, fmt, unit)
    done = {name for record in records.values() for name in record["partition"]["inputs"]}
    if clean:
        run.remove_unvouched_outputs(unit, done)
    todo = make_partitions([name for name in names if name not in done], fmt, partition_size, unit)
    return UnitPlan(unit, key, subunits, dict(skipped), [run.write_plan(p) for p in todo], sorted(records),
                    sum_counts([record["counts"] for record in records.values()]))


@dataclass
class Plan:
    """The run's work: partitions to do, ids and summed counts of those finished, skipped entries."""

    partitions: list[PlannedPartition]
    finished: set[str]
    finished_counts: dict
    skipped: dict[str, int]


def plan(run: RunDirectory, source_uri: str, storage_options: dict, fmt: str, partition_size: int,
         clean: bool = True) -> Plan:
    """Walk the source breadth-first, one `plan_unit` Ray Task per folder (a level's folders in
    parallel), then the manifest units the walk did not reach. Call it under the lease, after the
    flat manifest is migrated and stale work removed."""
    from curation.pipeline.ray_data import run_all

    partitions, finished, unit_counts, skipped, seen = [], set(), [], Counter(), set()
    frontier: list[tuple[str | None, str | None]] = [("", None)]
    while frontier:
        results = run_all(plan_unit, [(run, source_uri, storage_options, fmt, partition_size, unit, key, clean)
                                      for unit, key in frontier])
        frontier = [(sub, None) for result in results for sub in result.subunits]
        for result in results:
            seen.add(result.key)
            partitions += result.partitions
            finished.update(result.finished)
            unit_counts.append(result.finished_counts)
            skipped.update(result.skipped)
        if not frontier:
            frontier = [(None, key) for key in run.unit_keys() if key and key not in seen]
    return Plan(partitions, finished, sum_counts(unit_counts), dict(skipped))
