"""Write one finished partition: kept/ and removed/ in the input's format, scores/, failed/, and
the manifest record last.

Output names are deterministic per input (image path, parquet file, shard), so redoing a partition
after a crash overwrites instead of duplicating.
"""

from __future__ import annotations

import io
import tarfile

import numpy as np

from curation import storage
from curation.pipeline.plan import Partition, RunDirectory
from curation.pipeline.read import read_parquet_table, read_tar_samples, sample_key

KEEP, REMOVE, FAILED = "keep", "remove", "failed"


def fired_list(fired: str) -> list[str]:
    """Fired detectors travel through Ray Data as one comma-joined string per item."""
    return fired.split(",") if fired else []


def _parquet_bytes(table) -> bytes:
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _write_table(run: RunDirectory, table, *parts: str) -> None:
    storage.write_bytes(run.path(*parts), _parquet_bytes(table), run.options)


def _split_images(run: RunDirectory, root: str, options: dict, results: dict) -> None:
    for item_id, decision in zip(results["id"], results["decision"]):
        if decision in (KEEP, REMOVE):
            data = storage.read_bytes(storage.join(root, item_id), options)
            storage.write_bytes(run.path("kept" if decision == KEEP else "removed", item_id), data, run.options)


def _split_parquet(run: RunDirectory, root: str, options: dict, name: str, decisions: np.ndarray) -> None:
    table = read_parquet_table(storage.join(root, name), options)
    for folder, wanted in (("kept", KEEP), ("removed", REMOVE)):
        _write_table(run, table.filter(decisions == wanted), folder, name)


def _tar_bytes(samples: dict[str, dict[str, bytes]]) -> bytes:
    sink = io.BytesIO()
    with tarfile.open(fileobj=sink, mode="w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(key + ext)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return sink.getvalue()


def _split_webdataset(run: RunDirectory, root: str, options: dict, name: str, results: dict) -> None:
    samples = read_tar_samples(storage.read_bytes(storage.join(root, name), options))
    decision_of = dict(zip(results["id"], results["decision"]))
    for folder, wanted in (("kept", KEEP), ("removed", REMOVE)):
        chosen = {key: members for key, members in samples.items() if decision_of.get(key) == wanted}
        storage.write_bytes(run.path(folder, name), _tar_bytes(chosen), run.options)


def _scores_table(results: dict, detector_names: list[str], store_embeddings: bool):
    """scores/ rows of decoded items, with an explicit schema so every file of a run reads as one
    dataset (an all-empty `fired` column must not become list<null>)."""
    import pyarrow as pa

    ok = results["error_kind"] == ""
    fields = [("id", pa.string(), results["id"][ok].tolist()),
              ("source", pa.string(), results["source"][ok].tolist()),
              ("position", pa.int64(), results["position"][ok].astype(np.int64))]
    fields += [(f"score_{n}", pa.float32(), results[f"score_{n}"][ok].astype(np.float32)) for n in detector_names]
    fields += [("decision", pa.string(), results["decision"][ok].tolist()),
               ("fired", pa.list_(pa.string()), [fired_list(f) for f in results["fired"][ok]])]
    columns = [pa.array(values, type=type_) for _, type_, values in fields]
    names = [name for name, _, _ in fields]
    if store_embeddings:
        emb = np.ascontiguousarray(results["embedding"][ok].astype(np.float16))
        values = pa.array(emb.reshape(-1), type=pa.float16())
        columns.append(pa.FixedSizeListArray.from_arrays(values, emb.shape[1]))
        names.append("embedding")
    return pa.Table.from_arrays(columns, names=names)


def _failed_table(results: dict):
    import pyarrow as pa

    bad = results["error_kind"] != ""
    schema = pa.schema([("id", pa.string()), ("source", pa.string()), ("position", pa.int64()),
                        ("error_kind", pa.string()), ("message", pa.string())])
    return pa.table({"id": results["id"][bad].tolist(), "source": results["source"][bad].tolist(),
                     "position": results["position"][bad].astype(np.int64),
                     "error_kind": results["error_kind"][bad].tolist(),
                     "message": results["error_message"][bad].tolist()}, schema=schema)


def partition_counts(results: dict, detector_names: list[str]) -> dict:
    fired = results["fired"]
    return {
        "items": int(len(results["id"])),
        "kept": int((results["decision"] == KEEP).sum()),
        "removed": int((results["decision"] == REMOVE).sum()),
        "failed": int((results["error_kind"] != "").sum()),
        "fired": {name: int(sum(name in fired_list(f) for f in fired)) for name in detector_names},
    }


def write_partition(run: RunDirectory, partition: Partition, results: dict, source_root: str,
                    source_options: dict, detector_names: list[str], store_embeddings: bool) -> dict:
    """Write every output of `partition`; `results` are columns sorted by `position`."""
    order = np.argsort(results["position"], kind="stable")
    results = {key: np.asarray(value)[order] for key, value in results.items()}
    if partition.format == "images":
        _split_images(run, source_root, source_options, results)
    elif not (results["decision"] != FAILED).any():
        pass  # nothing decoded (empty or unreadable file): failed/ records why
    elif partition.format == "parquet":
        _split_parquet(run, source_root, source_options, partition.inputs[0], results["decision"])
    elif partition.format == "webdataset":
        _split_webdataset(run, source_root, source_options, partition.inputs[0], results)
    _write_table(run, _scores_table(results, detector_names, store_embeddings), "scores", f"{partition.id}.parquet")
    _write_table(run, _failed_table(results), "failed", f"{partition.id}.parquet")
    counts = partition_counts(results, detector_names)
    run.finish(partition, counts)
    return counts
