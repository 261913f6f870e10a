"""Partitions and the manifest: what a run has to do, and what earlier runs already finished.

A partition is the unit of work and of resume: one parquet file, one WebDataset shard, or a group
of image files. A partition is finished when `_manifest/<id>.json` exists; that record is written
last, after all its outputs, so a killed run redoes exactly the unfinished partitions. Image files
that earlier runs did not cover are grouped into new partitions, so files added to the source are
the only ones the next (incremental) run processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass

from curation import storage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
FORMAT_EXTENSIONS = {"images": IMAGE_EXTENSIONS, "parquet": (".parquet",), "webdataset": (".tar",)}
OUTPUT_DIRS = ("kept", "removed", "scores", "failed")
log = logging.getLogger(__name__)


class OutputConflictError(RuntimeError):
    """The output location holds a run made with another decision config."""


@dataclass(frozen=True)
class Partition:
    """`inputs` are URIs relative to the source root (POSIX style), in a stable order."""

    id: str
    format: str
    inputs: tuple[str, ...]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Partition":
        data = json.loads(text)
        return cls(data["id"], data["format"], tuple(data["inputs"]))


def _partition_id(inputs: list[str]) -> str:
    return hashlib.sha1("\n".join(inputs).encode()).hexdigest()[:16]


def _unsafe_name(name: str) -> bool:
    """Names that cannot map to a distinct output path: S3 keys with empty, `.` or `..`
    segments (`a//b.jpg` and `a/./b.jpg` would both land on `kept/a/b.jpg`) or backslashes."""
    return "\\" in name or any(segment in ("", ".", "..") for segment in name.split("/"))


def scan_inputs(source_uri: str, storage_options: dict, fmt: str) -> tuple[list[str], dict[str, int]]:
    """All input files of the source, relative to its root, sorted; and what was skipped, counted
    by reason (links, special files, other extensions, unsafe names), for summary.json."""
    root = storage.join(source_uri, "")
    files, skipped = storage.scan_files(source_uri, storage_options, FORMAT_EXTENSIONS[fmt])
    names = [f[len(root):] if f.startswith(root) else f for f in files]
    unsafe = [name for name in names if _unsafe_name(name)]
    if unsafe:
        skipped["unsafe_name"] = len(unsafe)
        log.warning("skipping %d inputs whose names cannot map to distinct outputs, e.g. %r", len(unsafe), unsafe[:3])
    return sorted(set(names) - set(unsafe)), skipped


def relative_inputs(source_uri: str, storage_options: dict, fmt: str) -> list[str]:
    """All input files of the source, relative to its root, sorted."""
    return scan_inputs(source_uri, storage_options, fmt)[0]


def make_partitions(inputs: list[str], fmt: str, partition_size: int) -> list[Partition]:
    """Image files are grouped `partition_size` at a time; parquet files and shards stand alone."""
    size = partition_size if fmt == "images" else 1
    groups = [inputs[i:i + size] for i in range(0, len(inputs), size)]
    return [Partition(_partition_id(group), fmt, tuple(group)) for group in groups]


class RunDirectory:
    """`<output uri>/<run name>/`: outputs, manifest, thresholds and the config that owns it."""

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

    def claim(self, decision_hash: str, config_dict: dict) -> None:
        """Mark this directory as owned by one decision config; refuse another config's run."""
        owner = self.read_json("_config.json")
        if owner is not None and owner["decision_hash"] != decision_hash:
            raise OutputConflictError(
                f"{self.uri} already holds a run of another config (decision hash "
                f"{owner['decision_hash']}, this config {decision_hash}). Use another run_name or "
                "output.uri; re-running the same config resumes and adds new partitions.")
        if owner is None:
            self.write_json({"decision_hash": decision_hash, "config": config_dict}, "_config.json")

    def manifest(self) -> dict[str, dict]:
        """Finished partitions: id -> manifest record, from the compacted files and the single
        records written since, all fetched in one concurrent batch (see `compact_manifest`)."""
        for attempt in range(3):  # a resumed run compacting meanwhile may delete a listed file
            files = storage.list_files(self.path("_manifest"), self.options, (".json", ".jsonl"))
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

    def compact_manifest(self, finished: dict[str, dict]) -> int:
        """Fold every manifest record into one `compacted-<content hash>.jsonl`, then delete the
        single records and older compacted files in bulk: a run of 200k partitions reads one file
        at its next start instead of 200k. Crash-safe in either order (records are identical
        wherever they appear). Call it under the lease, when no writer of this run is active.
        Returns how many files it replaced."""
        folder = self.path("_manifest", "")
        files = storage.list_files(folder, self.options, (".json", ".jsonl"))
        if len(files) <= 1:
            return 0
        body = "".join(json.dumps(finished[pid], sort_keys=True) + "\n" for pid in sorted(finished)).encode()
        name = f"compacted-{hashlib.sha256(body).hexdigest()[:16]}.jsonl"
        storage.write_bytes(self.path("_manifest", name), body, self.options)
        stale = [file for file in files if file[len(folder):] != name]
        storage.remove_many(stale, self.options)
        return len(stale)

    def finish(self, partition: Partition, counts: dict) -> None:
        """Written last: from now on the partition counts as done."""
        self.write_json({"partition": asdict(partition), "counts": counts}, "_manifest", f"{partition.id}.json")

    def remove_unfinished_outputs(self, finished: dict[str, dict]) -> int:
        """Delete every output that no manifest record vouches for (a killed run's leftovers):
        spooled rows, score/failure files of unfinished partitions, and kept/ and removed/ copies of
        inputs that no finished partition covers (half-written temp files included). A resumed run may
        regroup those inputs and decide them again, so nothing stale may stay. Bulk deletes."""
        inputs = finished_inputs(finished)
        stale = storage.list_files(self.path("_spool", ""), self.options)  # no writer is active yet
        for folder in OUTPUT_DIRS:
            root = self.path(folder, "")
            for file in storage.list_files(root, self.options):
                name = file[len(root):]
                done = name.split(".")[0] in finished if folder in ("scores", "failed") else name in inputs
                if not done:
                    stale.append(file)
        storage.remove_many(stale, self.options)
        return len(stale)


def finished_inputs(finished: dict[str, dict]) -> set[str]:
    return {name for record in finished.values() for name in record["partition"]["inputs"]}


def plan(source_uri: str, storage_options: dict, fmt: str, partition_size: int,
         finished: dict[str, dict]) -> tuple[list[Partition], dict[str, int]]:
    """Partitions still to do (inputs not covered by any finished partition), and the source
    entries skipped by reason."""
    done = finished_inputs(finished)
    names, skipped = scan_inputs(source_uri, storage_options, fmt)
    return make_partitions([name for name in names if name not in done], fmt, partition_size), skipped
