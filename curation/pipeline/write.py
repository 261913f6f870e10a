"""Write one finished partition: kept/ and removed/ in the input's format, scores/, failed/, and
the manifest record last.

Output names are deterministic per input (image path, parquet file, shard), so redoing a partition
after a crash overwrites instead of duplicating.

During a curate run, scored rows never travel to the driver: the stream's last stage
(`spool_rows`, in Ray Data) writes each batch's rows of a partition to
`_spool/<partition>/<first position>.parquet` where they were scored and sends the driver counts;
once a partition's rows are all spooled, `finish_partition` (a Ray Task) reads them back and writes
the partition's outputs. A retried batch rewrites the same spool file (same first position), and a
run starts by deleting every spool file (`RunDirectory.remove_stale_work`).
"""

from __future__ import annotations

import contextlib
import io
import tarfile

import numpy as np

from curation import storage
from curation.pipeline.plan import SPOOL, Partition, PlannedPartition, RunDirectory
from curation.pipeline.decode import DecodeError
from curation.pipeline.read import (UNAVAILABLE, StoreReadError, fetch, iter_source_batches, iter_source_shard,
                                    read_parquet_table)

KEEP, REMOVE, FAILED = "keep", "remove", "failed"


def fired_list(fired: str) -> list[str]:
    """Fired detectors travel through Ray Data as one comma-joined string per item."""
    return fired.split(",") if fired else []


def _write_table(run: RunDirectory, table, *parts: str) -> None:
    """Stream a parquet file to storage (no second copy of the table's bytes in memory)."""
    import pyarrow.parquet as pq

    with storage.open_for_write(run.path(*parts), run.options) as handle:
        pq.write_table(table, handle)


class SourceUnavailableError(OSError):
    """A source file could not be read again for kept/ and removed/ (transient errors outlasted
    the retries): the partition stays unfinished and the next run redoes it."""


def _readable(result, uri: str):
    if isinstance(result, DecodeError):
        raise SourceUnavailableError(f"{uri}: {result.kind}: {result.message}")
    return result


def _split_images(run: RunDirectory, source, results: dict) -> None:
    for item_id, decision in zip(results["id"], results["decision"]):
        if decision in (KEEP, REMOVE):
            uri = storage.join(source.uri, item_id)
            data = _readable(fetch(uri, source, source.max_item_bytes), uri)
            storage.write_bytes(run.path("kept" if decision == KEEP else "removed", item_id), data, run.options)


def _split_parquet(run: RunDirectory, source, name: str, decisions: np.ndarray) -> None:
    """kept/ and removed/ parquet files with every original column, streamed a record batch at a
    time from the source into both outputs (never the whole table in memory). `decisions` are the
    file's item rows; a file that decoding found unreadable part way (its tail a whole-file
    failed row) ends the same way here, right after the decided rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    uri = storage.join(source.uri, name)
    stream = iter_source_batches(uri, source)
    _readable(next(stream), uri)
    row = 0
    with contextlib.ExitStack() as stack:
        writers = {}
        try:
            for batch in stream:
                chosen = decisions[row:row + batch.num_rows]
                row += batch.num_rows
                for folder, wanted in (("kept", KEEP), ("removed", REMOVE)):
                    if folder not in writers:
                        handle = stack.enter_context(storage.open_for_write(run.path(folder, name), run.options))
                        writers[folder] = stack.enter_context(pq.ParquetWriter(handle, batch.schema))
                    writers[folder].write_batch(batch.filter(pa.array(chosen == wanted)))
        except StoreReadError as err:
            raise SourceUnavailableError(f"{uri}: could not be read again: {err}") from err
        except (pa.ArrowException, ValueError, OSError) as err:
            if row != len(decisions):  # not where decoding stopped: another column is damaged
                raise SourceUnavailableError(f"{uri}: unreadable after {row} of {len(decisions)} decided rows "
                                             f"when copied: {type(err).__name__}: {err}") from err
        if row != len(decisions):
            raise SourceUnavailableError(f"{uri}: has {row} rows now, {len(decisions)} when it was decoded")


def _tar_writer(uri: str, options: dict, stack: contextlib.ExitStack) -> tarfile.TarFile:
    """A tar streamed to `uri` (appears only if the whole `stack` closes without error)."""
    handle = stack.enter_context(storage.open_for_write(uri, options))
    return stack.enter_context(tarfile.open(fileobj=handle, mode="w|"))


def _add_sample(tar: tarfile.TarFile, key: str, members: dict[str, bytes]) -> None:
    for ext, data in members.items():
        info = tarfile.TarInfo(key + ext)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def _split_webdataset(run: RunDirectory, source, name: str, results: dict) -> None:
    """kept/ and removed/ shards hold the decided samples, every member of each, in shard order:
    the source shard is streamed again, one sample at a time, into both output shards."""
    uri = storage.join(source.uri, name)
    decision_of = dict(zip(results["id"], results["decision"]))
    with contextlib.ExitStack() as stack:
        outputs = {KEEP: _tar_writer(run.path("kept", name), run.options, stack),
                   REMOVE: _tar_writer(run.path("removed", name), run.options, stack)}
        for entry in iter_source_shard(uri, source):
            if entry.whole_file and entry.error.kind == UNAVAILABLE:
                raise SourceUnavailableError(f"{uri}: could not be read again: {entry.error.message}")
            tar = None if entry.whole_file else outputs.get(decision_of.get(entry.key))
            if tar is not None:
                _add_sample(tar, entry.key, entry.members)


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
                        ("error_kind", pa.string()), ("message", pa.string()), ("whole_file", pa.bool_())])
    return pa.table({"id": results["id"][bad].tolist(), "source": results["source"][bad].tolist(),
                     "position": results["position"][bad].astype(np.int64),
                     "error_kind": results["error_kind"][bad].tolist(),
                     "message": results["error_message"][bad].tolist(),
                     "whole_file": results["whole_file"][bad].astype(bool)}, schema=schema)


def read_partition_results(previous: RunDirectory, pid: str) -> dict[str, np.ndarray]:
    """A finished partition's rows rebuilt from its scores/ and failed/ files (embeddings included):
    the reader of the layout `_scores_table` and `_failed_table` write."""
    scored = read_parquet_table(previous.path("scores", f"{pid}.parquet"), previous.options)
    failed = read_parquet_table(previous.path("failed", f"{pid}.parquet"), previous.options)
    if "embedding" not in scored.column_names:
        raise ValueError(f"{previous.uri}/scores holds no embeddings: run curate with output.store_embeddings=true")
    n_ok, n_bad = scored.num_rows, failed.num_rows
    dim = scored.schema.field("embedding").type.list_size
    embedding = np.asarray(scored.column("embedding").combine_chunks().flatten(), np.float32).reshape(n_ok, dim)
    column = lambda name: np.array(scored.column(name).to_pylist() + failed.column(name).to_pylist(), dtype=object)
    return {"id": column("id"), "source": column("source"),
            "position": np.array(scored.column("position").to_pylist() + failed.column("position").to_pylist()),
            "error_kind": np.array([""] * n_ok + failed.column("error_kind").to_pylist(), dtype=object),
            "error_message": np.array([""] * n_ok + failed.column("message").to_pylist(), dtype=object),
            "whole_file": np.array([False] * n_ok + (failed.column("whole_file").to_pylist()
                                                     if "whole_file" in failed.column_names else [False] * n_bad)),
            "embedding": np.concatenate([embedding, np.zeros((n_bad, dim), np.float32)])}


def _rows_table(rows: dict[str, np.ndarray]):
    """Scored rows as an Arrow table: strings, numbers, and (n, d) embeddings as fixed-size lists."""
    import pyarrow as pa

    columns = []
    for values in rows.values():
        values = np.asarray(values)
        if values.ndim == 2:
            flat = pa.array(np.ascontiguousarray(values, np.float32).reshape(-1), type=pa.float32())
            columns.append(pa.FixedSizeListArray.from_arrays(flat, values.shape[1]))
        elif values.dtype == object:
            columns.append(pa.array(values.tolist(), type=pa.string()))
        else:
            columns.append(pa.array(values))
    return pa.Table.from_arrays(columns, names=list(rows))


def _table_rows(table) -> dict[str, np.ndarray]:
    import pyarrow as pa

    out = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(column.type):
            out[name] = np.asarray(column.flatten(), np.float32).reshape(len(column), column.type.list_size)
        elif pa.types.is_string(column.type):
            out[name] = np.array(column.to_pylist(), dtype=object)
        else:
            out[name] = column.to_numpy(zero_copy_only=False)
    return out


def empty_rows(dim: int, detector_names: list[str]) -> dict[str, np.ndarray]:
    """The columns of a partition that produced no rows at all (an empty file)."""
    rows = {k: np.zeros(0, object) for k in ("partition", "id", "source", "error_kind", "error_message",
                                             "decision", "fired")}
    rows |= {"position": np.zeros(0, np.int64), "n_items": np.zeros(0, np.int64), "whole_file": np.zeros(0, bool),
             "embedding": np.zeros((0, dim), np.float32)}
    return rows | {f"score_{n}": np.zeros(0, np.float32) for n in detector_names}


def score_histograms_of(results: dict[str, np.ndarray], thresholds: dict[str, float]) -> dict[str, dict]:
    """`metrics.histogram_payload` of the decided rows (no error) of a results table."""
    from curation.metrics import histogram_payload

    ok = results["error_kind"] == ""
    return histogram_payload({n: results[f"score_{n}"][ok] for n in thresholds}, thresholds)


def spool_rows(batch: dict[str, np.ndarray], run: RunDirectory, thresholds: dict[str, float]) -> dict[str, np.ndarray]:
    """Ray Data writing stage: each partition's rows of `batch` to `_spool/<partition>/<first
    position>.parquet`; out goes one row per partition with its counts (JSON): rows, `n_items`
    (-1 until its last block), kept/removed/failed, and score histograms per detector."""
    import json

    out = {"partition": [], "counts": []}
    for pid in np.unique(batch["partition"]):
        mask = batch["partition"] == pid
        rows = {key: value[mask] for key, value in batch.items()}
        _write_table(run, _rows_table(rows), SPOOL, pid, f"{int(rows['position'].min()):012d}.parquet")
        counts = {"rows": int(mask.sum()), "n_items": int(rows["n_items"].max()),
                  "kept": int((rows["decision"] == KEEP).sum()), "removed": int((rows["decision"] == REMOVE).sum()),
                  "failed": int((rows["decision"] == FAILED).sum()),
                  "histograms": score_histograms_of(rows, thresholds)}
        out["partition"].append(pid)
        out["counts"].append(json.dumps(counts))
    return {key: np.array(values, dtype=object) for key, values in out.items()}


def finish_partition(run: RunDirectory, planned: PlannedPartition, source, detector_names: list[str],
                     store_embeddings: bool, dim: int, expected_rows: int) -> dict:
    """Ray Task: a partition whose `expected_rows` rows are all spooled -> its outputs and manifest
    record (`write_partition`; its names read from the run's plan), then its spool files and plan
    deleted. The spooled positions must be exactly
    0..expected_rows-1 (a lagging listing or a lost file must not pass for a short partition);
    anything else leaves the partition unfinished for the next run, never a wrong output. A retry
    of a task that already finished (Ray retries tasks whose worker died) returns its record."""
    done = run.finished_record(planned)
    if done is not None:
        return done["counts"]
    partition = run.load(planned)
    files = storage.list_files(run.path(SPOOL, partition.id, ""), run.options, (".parquet",))
    chunks = [_table_rows(read_parquet_table(file, run.options)) for file in files]
    results = ({key: np.concatenate([chunk[key] for chunk in chunks]) for key in chunks[0]} if chunks
               else empty_rows(dim, detector_names))
    if sorted(results["position"].tolist()) != list(range(expected_rows)):
        return {"unfinished": f"spooled rows of {partition.id} ({len(results['position'])}) do not cover its "
                              f"{expected_rows} items exactly once", "partition": partition.id}
    outcome = write_partition(run, partition, results, source, detector_names, store_embeddings)
    if "unfinished" not in outcome:  # the record stands: spool and plan are done with
        storage.remove_many(files + run.plan_files([planned]), run.options)
    return outcome


def partition_counts(partition: Partition, results: dict, detector_names: list[str]) -> dict:
    """Items and files: a whole-file failure row stands for a file, not for one image."""
    fired, whole = results["fired"], results["whole_file"].astype(bool)
    return {
        "files": len(partition.inputs),
        "failed_files": int(whole.sum()),
        "items": int((~whole).sum()),
        "kept": int((results["decision"] == KEEP).sum()),
        "removed": int((results["decision"] == REMOVE).sum()),
        "failed": int(((results["error_kind"] != "") & ~whole).sum()),
        "fired": {name: int(sum(name in fired_list(f) for f in fired)) for name in detector_names},
    }


def unavailable(results: dict) -> str | None:
    """Why a partition cannot be finished now (a transient read error), or None."""
    transient = results["error_kind"] == UNAVAILABLE
    return f"{int(transient.sum())} items unavailable, e.g. {results['error_message'][transient][0]}" \
        if transient.any() else None


def write_partition(run: RunDirectory, partition: Partition, results: dict, source, detector_names: list[str],
                    store_embeddings: bool) -> dict:
    """Write every output of `partition` (`results` are its columns, any order) and its manifest
    record last. A partition with items that were only transiently unreadable is not written at
    all: it returns {"unfinished": reason} and the next run redoes it."""
    order = np.argsort(results["position"], kind="stable")
    results = {key: np.asarray(value)[order] for key, value in results.items()}
    reason = unavailable(results)
    if reason is None:
        try:
            _write_outputs(run, partition, results, source, detector_names, store_embeddings)
        except SourceUnavailableError as err:
            reason = str(err)
    if reason is not None:
        return {"unfinished": reason, "partition": partition.id}
    counts = partition_counts(partition, results, detector_names)
    run.finish(partition, counts)
    return counts


def _write_outputs(run: RunDirectory, partition: Partition, results: dict, source, detector_names: list[str],
                   store_embeddings: bool) -> None:
    if partition.format == "images":
        _split_images(run, source, results)
    elif not (results["decision"] != FAILED).any():
        pass  # nothing decoded (empty or unreadable file): failed/ records why
    elif partition.format == "parquet":
        _split_parquet(run, source, partition.inputs[0], results["decision"][~results["whole_file"].astype(bool)])
    elif partition.format == "webdataset":
        _split_webdataset(run, source, partition.inputs[0], results)
    _write_table(run, _scores_table(results, detector_names, store_embeddings), "scores", f"{partition.id}.parquet")
    _write_table(run, _failed_table(results), "failed", f"{partition.id}.parquet")
