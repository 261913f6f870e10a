"""Unit tests of the pieces the end-to-end runs cover only together: grouping streamed rows into
partitions, decisions, writing a partition, the manifest and its compaction, thresholds from a
rate, histograms that merge, and `--set` overrides. No Ray, no model: plain arrays and files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from curation import storage
from curation.config import ConfigError, SourceConfig, apply_override
from curation.metrics import (ScoreHistogram, histogram_payload, merge_histogram_payload, score_histograms,
                              threshold_for_rate)
from curation.pipeline.plan import ManifestLayoutError, Partition, RunDirectory, plan_unit, sum_counts, unit_key
from curation.pipeline.score import decide
from curation.pipeline.stream import PartitionCounter
from curation.pipeline.write import (FAILED, KEEP, REMOVE, SPOOL, finish_partition, read_partition_results,
                                     spool_rows, write_partition)
from images import write_rgb_images


def _rows(pid: str, n_items: int, positions, decisions=None, dim: int = 4) -> dict[str, np.ndarray]:
    n = len(positions)
    decisions = decisions if decisions is not None else [KEEP] * n
    return {
        "partition": np.array([pid] * n, dtype=object), "n_items": np.full(n, n_items, np.int64),
        "position": np.asarray(positions, np.int64), "id": np.array([f"{pid}-{p}.png" for p in positions], dtype=object),
        "source": np.array([pid] * n, dtype=object),
        "error_kind": np.array(["" if d != FAILED else "decode" for d in decisions], dtype=object),
        "error_message": np.array(["" if d != FAILED else "bad bytes" for d in decisions], dtype=object),
        "whole_file": np.zeros(n, bool), "decision": np.array(decisions, dtype=object),
        "fired": np.array(["d" if d == REMOVE else "" for d in decisions], dtype=object),
        "score_d": np.where(np.array(decisions) == REMOVE, 0.9, 0.1).astype(np.float32),
        "embedding": np.ones((n, dim), np.float32),
    }


def _concat(*batches: dict) -> dict:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


# -- counting streamed rows, spooling and finishing partitions -------------------------------
def test_spooled_rows_come_back_as_one_partition_and_its_outputs(tmp_path):
    """The writing stage spools each partition's rows of a batch and reports counts only; once all
    rows are spooled, finish_partition writes the outputs from the spool and deletes it."""
    source_dir = tmp_path / "src"
    write_rgb_images(source_dir, 3)
    names = sorted(p.name for p in source_dir.iterdir())
    run = RunDirectory(str(tmp_path / "out"), "run")
    first = _concat(_rows("a", -1, [0, 1], [KEEP, REMOVE]), _rows("b", 1, [0], [KEEP]))
    first["id"] = np.array([names[0], names[1], "b0"], dtype=object)
    out = spool_rows(first, run, {"d": 0.5})
    counts = {pid: json.loads(c) for pid, c in zip(out["partition"], out["counts"])}
    assert counts["a"]["rows"] == 2 and counts["a"]["n_items"] == -1 and counts["b"]["n_items"] == 1
    assert (counts["a"]["kept"], counts["a"]["removed"], counts["a"]["histograms"]["d"]["flagged"]) == (1, 1, 1)
    assert sum(counts["a"]["histograms"]["d"]["counts"]) == 2
    last = _rows("a", 3, [2], [FAILED])
    last["id"] = np.array([names[2]], dtype=object)
    spool_rows(last, run, {"d": 0.5})
    spool = tmp_path / "out" / "run" / SPOOL / "a"
    assert sorted(p.name for p in spool.iterdir()) == ["000000000000.parquet", "000000000002.parquet"]
    partition = run.write_plan(Partition("a", "images", tuple(names)))  # the driver holds no names
    assert partition.inputs is None and partition.size == 3
    outcome = finish_partition(run, partition, SourceConfig(uri=str(source_dir)), ["d"], True, 4, 3)
    assert (outcome["kept"], outcome["removed"], outcome["failed"]) == (1, 1, 1)
    assert not spool.exists() or not list(spool.iterdir())
    # Ray retries a task whose worker died after it finished: the record stands, nothing is redone
    assert finish_partition(run, partition, SourceConfig(uri=str(source_dir)), ["d"], True, 4, 3) == outcome
    assert (tmp_path / "out" / "run" / "kept" / names[0]).is_file() and run.manifest()["a"]["counts"] == outcome
    back = read_partition_results(run, "a")
    assert sorted(back["position"].tolist()) == [0, 1, 2] and back["embedding"].shape == (3, 4)


def test_a_partition_with_missing_spooled_rows_is_left_unfinished(tmp_path):
    run = RunDirectory(str(tmp_path / "out"), "run")
    source = SourceConfig(uri=str(tmp_path))
    spool_rows(_rows("a", 3, [0, 2]), run, {"d": 0.5})  # position 1 never spooled
    planned = {pid: run.write_plan(Partition(pid, "images", names)) for pid, names in
               (("a", ("x", "y", "z")), ("b", ("x", "y", "z")), ("e", ()))}
    outcome = finish_partition(run, planned["a"], source, ["d"], False, 4, 3)
    assert "unfinished" in outcome and run.manifest() == {}
    spool_rows(_rows("b", 3, [0, 1]), run, {"d": 0.5})  # the tail's file not (yet) listed: not a short partition
    assert "unfinished" in finish_partition(run, planned["b"], source, ["d"], False, 4, 3)
    empty = finish_partition(run, planned["e"], source, ["d"], False, 4, 0)
    assert empty["items"] == 0 and "e" in run.manifest()  # a partition that produced no rows at all


def test_partition_counter_counts_completions_without_keeping_rows():
    counter = PartitionCounter()
    assert counter.add(_concat(_rows("a", 2, [0]), _rows("b", 1, [0]))) == ["b"]
    assert counter.add(_rows("a", 2, [1])) == ["a"]
    assert counter.seen == {"a": 2, "b": 1}


def test_a_streamed_partition_completes_only_with_its_last_block():
    """Blocks before the last carry n_items -1 (the reader did not know the total yet)."""
    counter = PartitionCounter()
    early = _rows("s", -1, [0, 1])
    assert counter.add(early) == [] and counter.add(_rows("s", -1, [2, 3])) == []
    assert counter.add(_rows("s", 5, [4])) == ["s"]
    late_first = PartitionCounter()  # the last block may arrive before earlier ones
    assert late_first.add(_rows("s", 3, [2])) == [] and late_first.add(_rows("s", -1, [0, 1])) == ["s"]
    assert counter.incomplete() == [] == late_first.incomplete()
    short = PartitionCounter()
    short.add(_concat(_rows("x", -1, [0]), _rows("y", 4, [3])))
    assert [(u["partition"], "redoes it" in u["reason"]) for u in short.incomplete()] == [("x", True), ("y", True)]


# -- decisions -----------------------------------------------------------------------------------
class _Fixed:
    """A detector stand-in whose score is the embedding's first column."""

    def __init__(self, name: str):
        self.name = name

    def score(self, embeddings):
        return embeddings[:, 0]


def test_decide_removes_when_any_detector_reaches_its_threshold():
    emb = np.array([[0.2, 0], [0.5, 0], [0.9, 0], [0.7, 0]], np.float32)
    ok = np.array([True, True, True, False])
    out = decide(emb, ok, [_Fixed("low"), _Fixed("high")], {"low": 0.5, "high": 0.8})
    assert out["decision"].tolist() == [KEEP, REMOVE, REMOVE, FAILED]  # 0.5 >= 0.5: the threshold fires
    assert out["fired"].tolist() == ["", "low", "low,high", ""]
    assert np.isnan(out["score_low"][3]) and out["score_high"][2] == pytest.approx(0.9)
    none_ok = decide(emb, np.zeros(4, bool), [_Fixed("low")], {"low": 0.0})
    assert none_ok["decision"].tolist() == [FAILED] * 4


# -- writing a partition and the manifest ------------------------------------------------------
def test_write_partition_splits_images_records_failures_and_finishes_last(tmp_path):
    source_dir = tmp_path / "src"
    write_rgb_images(source_dir, 3)
    names = sorted(p.name for p in source_dir.iterdir())
    partition = Partition("p1", "images", tuple(names))
    rows = _rows("p1", 3, [2, 0, 1], [REMOVE, KEEP, FAILED])  # any order in, position order out
    rows["id"] = np.array([names[2], names[0], names[1]], dtype=object)
    run = RunDirectory(str(tmp_path / "out"), "run")
    counts = write_partition(run, partition, rows, SourceConfig(uri=str(source_dir)), ["d"], True)
    assert counts == {"files": 3, "failed_files": 0, "items": 3, "kept": 1, "removed": 1, "failed": 1,
                      "fired": {"d": 1}}
    out = tmp_path / "out" / "run"
    assert (out / "kept" / names[0]).read_bytes() == (source_dir / names[0]).read_bytes()
    assert (out / "removed" / names[2]).is_file() and not (out / "kept" / names[1]).exists()
    assert run.manifest()["p1"]["counts"] == counts
    back = read_partition_results(run, "p1")  # the layout's one reader gives the rows back
    assert back["id"].tolist() == [names[0], names[2], names[1]]  # decoded first, then failed
    assert back["error_kind"].tolist() == ["", "", "decode"] and back["embedding"].shape == (3, 4)


def test_a_transiently_unreadable_partition_is_not_finished(tmp_path):
    rows = _rows("p2", 1, [0], [FAILED])
    rows["error_kind"] = np.array(["unavailable"], dtype=object)
    run = RunDirectory(str(tmp_path / "out"), "run")
    result = write_partition(run, Partition("p2", "images", ("a.png",)), rows, SourceConfig(uri=str(tmp_path)),
                             ["d"], False)
    assert "unfinished" in result and run.manifest() == {}
    assert not (tmp_path / "out" / "run" / "scores").exists()


def test_manifest_compaction_keeps_every_record_of_a_unit_in_one_file(tmp_path):
    run = RunDirectory(str(tmp_path / "out"), "run")
    partitions = [Partition(f"p{i}", "images", (f"a/{i}.png",), "a") for i in range(5)]
    run.finish(Partition("other", "images", ("b/x.png",), "b"), {"items": 1})  # another unit: untouched
    for i, partition in enumerate(partitions[:3]):
        run.finish(partition, {"items": i})
    key = unit_key("a")
    before = run.unit_records(key)
    assert sorted(before) == ["p0", "p1", "p2"] and sorted(run.manifest()) == ["other", "p0", "p1", "p2"]
    assert run.compact_unit(key, before) == 3
    folder = tmp_path / "out" / "run" / "_manifest" / key
    [compacted] = list(folder.iterdir())
    assert compacted.name.startswith("compacted-") and run.unit_records(key) == before
    for partition in partitions[3:]:  # later runs add single records beside the compacted file
        run.finish(partition, {"items": 9})
    after = run.unit_records(key)
    assert sorted(after) == [p.id for p in partitions] and after["p1"] == before["p1"]
    assert run.compact_unit(key, after) == 3  # the old compacted file and two singles
    assert len(list(folder.iterdir())) == 1 and run.unit_records(key) == after
    assert run.compact_unit(key, after) == 0  # nothing to fold
    assert sorted(run.manifest()) == ["other"] + [p.id for p in partitions]


def test_unvouched_outputs_are_removed_and_finished_ones_kept(tmp_path):
    run = RunDirectory(str(tmp_path / "out"), "run")
    run.finish(Partition("done", "images", ("d/a.png",), "d"), {"items": 1})
    root = tmp_path / "out" / "run"
    for rel in ("kept/d/a.png", "kept/d/b.png", "removed/d/.a.png.x.tmp", "kept/d/sub/c.png", "scores/done.parquet",
                "scores/gone.parquet", "failed/gone.parquet", "_spool/gone/0.parquet", "_plan/gone.json"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    # one folder at a time: its subfolders are other units, planned by their own tasks
    assert run.remove_unvouched_outputs("d", {"d/a.png"}) == 2
    assert run.remove_unvouched_tables({"done"}) == 2 and run.remove_stale_work() == 2
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "_manifest" not in str(p))
    assert left == ["kept/d/a.png", "kept/d/sub/c.png", "scores/done.parquet"]


# -- planning: one folder at a time, names in the plan, the old flat manifest migrated ------------
def _touch(root, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


def test_plan_unit_groups_one_folders_new_files_and_keeps_names_in_the_plan(tmp_path):
    source = tmp_path / "src"
    _touch(source, "r1.jpg", "r2.jpg", "notes.txt", "a/1.jpg", "a/2.jpg", "a/3.jpg", "a/b/4.jpg")
    run = RunDirectory(str(tmp_path / "out"), "run")
    _touch(tmp_path / "out" / "run", "kept/r1.jpg")  # not vouched for, but the directory is no run's yet
    plan_unit(run, str(source), {}, "images", 2, "", clean=False)
    assert (tmp_path / "out" / "run" / "kept" / "r1.jpg").exists()
    root = plan_unit(run, str(source), {}, "images", 2, "")
    assert not (tmp_path / "out" / "run" / "kept" / "r1.jpg").exists()
    assert (root.subunits, root.skipped, root.finished) == (["a"], {"extension .txt": 1}, [])
    assert [(p.unit, p.size, p.inputs) for p in root.partitions] == [("", 2, None)]
    sub = plan_unit(run, str(source), {}, "images", 2, "a")
    assert sub.subunits == ["a/b"] and [p.size for p in sub.partitions] == [2, 1]
    loaded = run.load_many(sub.partitions)
    assert [p.inputs for p in loaded] == [("a/1.jpg", "a/2.jpg"), ("a/3.jpg",)] and loaded[0] == run.load(sub.partitions[0])
    run.finish(loaded[0], {"items": 2, "kept": 2, "fired": {"d": 0}})
    _touch(source, "a/0.jpg")  # an incremental run: only what no record covers is planned again
    again = plan_unit(run, str(source), {}, "images", 2, "a")
    assert again.finished == [loaded[0].id] and again.finished_counts["items"] == 2
    assert [p.inputs for p in run.load_many(again.partitions)] == [("a/0.jpg", "a/3.jpg")]


def test_plan_unit_of_containers_carries_the_name_and_counts_a_vanished_folder(tmp_path):
    source = tmp_path / "src"
    _touch(source, "x/s1.tar", "x/s2.tar")
    run = RunDirectory(str(tmp_path / "out"), "run")
    planned = plan_unit(run, str(source), {}, "webdataset", 99, "x").partitions
    assert [p.inputs for p in planned] == [("x/s1.tar",), ("x/s2.tar",)]
    assert not (tmp_path / "out" / "run" / "_plan").exists()  # one name travels with the partition
    run.finish(run.load(planned[0]), {"items": 5})
    (source / "x" / "s1.tar").unlink()
    (source / "x" / "s2.tar").unlink()
    gone = plan_unit(run, str(source), {}, "webdataset", 99, None, unit_key("x"))
    assert (gone.unit, gone.finished, gone.finished_counts["items"], gone.partitions) == ("x", [planned[0].id], 5, [])
    (tmp_path / "out" / "run" / "kept").mkdir()
    (tmp_path / "out" / "run" / "kept" / "root.tar").write_bytes(b"x")
    empty = plan_unit(run, str(source), {}, "webdataset", 99, None, "0" * 16)  # a unit with no record: no folder
    assert (empty.finished, empty.partitions) == ([], []) and (tmp_path / "out" / "run" / "kept" / "root.tar").exists()


def test_the_flat_manifest_of_an_earlier_version_is_refiled_per_folder(tmp_path):
    run = RunDirectory(str(tmp_path / "out"), "run")
    flat = tmp_path / "out" / "run" / "_manifest"
    flat.mkdir(parents=True)
    records = [{"partition": {"id": "p1", "format": "images", "inputs": ["a/1.jpg", "a/2.jpg"]}, "counts": {"items": 2}},
               {"partition": {"id": "p2", "format": "images", "inputs": ["3.jpg"]}, "counts": {"items": 1}}]
    (flat / "compacted-old.jsonl").write_text(json.dumps(records[0]) + "\n")
    (flat / "p2.json").write_text(json.dumps(records[1]))
    assert run.migrate_flat_manifest() == 2 and run.migrate_flat_manifest() == 0
    assert sorted(p.name for p in flat.iterdir()) == sorted([unit_key("a"), unit_key("")])
    assert run.unit_records(unit_key("a"))["p1"]["partition"]["unit"] == "a"
    assert run.unit_records(unit_key(""))["p2"]["counts"] == {"items": 1}
    spanning = RunDirectory(str(tmp_path / "out"), "span")
    (tmp_path / "out" / "span" / "_manifest").mkdir(parents=True)
    (tmp_path / "out" / "span" / "_manifest" / "p.json").write_text(json.dumps(
        {"partition": {"id": "p", "format": "images", "inputs": ["a/1.jpg", "b/2.jpg"]}, "counts": {}}))
    with pytest.raises(ManifestLayoutError, match="spans folders"):
        spanning.migrate_flat_manifest()


def test_sum_counts_adds_records_and_earlier_sums():
    records = [{"items": 2, "kept": 1, "removed": 1, "fired": {"d": 1}}, {"items": 1, "failed": 1, "fired": {}}]
    partial = sum_counts(records)
    assert (partial["partitions"], partial["items"], partial["fired"]) == (2, 3, {"d": 1})
    total = sum_counts([partial, {"items": 4, "kept": 4, "fired": {"d": 0}}], ["d", "e"])
    assert (total["partitions"], total["items"], total["kept"], total["fired"]) == (3, 7, 5, {"d": 1, "e": 0})


def test_read_many_returns_every_file_by_uri(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.json").write_text(json.dumps({"i": i}))
    uris = storage.list_files(str(tmp_path), {}, (".json",))
    got = storage.read_many(uris, {})
    assert set(got) == set(uris) and sorted(json.loads(v)["i"] for v in got.values()) == [0, 1, 2]
    assert storage.read_many([], {}) == {}


# -- thresholds and histograms -----------------------------------------------------------------
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.25, 0.5, 0.99, 1.0])
def test_threshold_for_rate_flags_at_most_the_rate_and_never_splits_ties(rate):
    scores = np.random.default_rng(0).random(1000).astype(np.float32)
    scores[:50] = 0.5  # a block of ties
    threshold = threshold_for_rate(scores, rate)
    allowed = np.floor(rate * len(scores))
    assert (scores >= threshold).sum() <= allowed
    lower = scores[scores < threshold]
    if lower.size:  # the smallest such threshold: the next score down would flag too many
        assert (scores >= lower.max()).sum() > allowed
    assert threshold_for_rate(np.zeros(0), 0.1) == 0.0


def test_score_histograms_merge_and_count_the_threshold_exactly():
    rng = np.random.default_rng(1)
    a, b = rng.random(300), rng.random(200)
    merged = ScoreHistogram.of(a, 0.37).merge(ScoreHistogram.of(b, 0.37))
    whole = ScoreHistogram.of(np.concatenate([a, b]), 0.37)
    assert np.array_equal(merged.counts, whole.counts) and merged.n == 500
    assert merged.flagged == int((np.concatenate([a, b]) >= 0.37).sum())
    assert ScoreHistogram.of([np.nan, 1.0, 0.0], 0.5).n == 2  # NaN (failed) never counted
    tie = np.array([0.977], np.float32)  # a float32 score equal to the threshold: `decide` flags it
    assert ScoreHistogram.of(tie, 0.977).flagged == int((tie >= 0.977).sum()) == 1
    with pytest.raises(ValueError, match="do not merge"):
        merged.merge(ScoreHistogram(0.5))


def test_worker_histogram_payloads_merge_into_the_whole_runs_histograms():
    import json

    rng = np.random.default_rng(2)
    thresholds = {"hftt": 0.4, "neglabel": 0.8}
    parts = [{n: rng.random(k) for n in thresholds} for k in (0, 7, 300)]  # an all-failed batch too
    run = score_histograms(thresholds)
    for part in parts:  # as the workers send them: through JSON
        merge_histogram_payload(run, json.loads(json.dumps(histogram_payload(part, thresholds))))
    for name, threshold in thresholds.items():
        whole = ScoreHistogram.of(np.concatenate([p[name] for p in parts]), threshold)
        assert np.array_equal(run[name].counts, whole.counts) and run[name].flagged == whole.flagged > 0


# -- overrides -----------------------------------------------------------------------------------
def test_apply_override_sets_nested_keys_list_items_and_yaml_values():
    data = {"detectors": [{"kind": "mcm"}, {"kind": "hftt"}]}
    apply_override(data, "detectors.1.threshold={strategy: fixed, value: 0.2}")
    apply_override(data, "model.batch_size=32")
    apply_override(data, "run_name=")
    assert data["detectors"][1]["threshold"] == {"strategy": "fixed", "value": 0.2}
    assert data["model"] == {"batch_size": 32} and data["run_name"] == ""
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_override(data, "model.batch_size")
    with pytest.raises(ConfigError, match="model.batch_size is not a section"):
        apply_override(data, "model.batch_size.x=1")


def test_read_many_takes_glob_characters_literally(tmp_path):
    folder = tmp_path / "run[1]*"
    folder.mkdir()
    (folder / "a?.json").write_text("1")
    (folder / "ab.json").write_text("2")
    uris = storage.list_files(str(folder), {})
    assert sorted(storage.read_many(uris, {}).values()) == [b"1", b"2"]


def test_calibration_samples_every_kth_name_across_folders_from_the_plan(tmp_path):
    from types import SimpleNamespace

    from curation.thresholds import calibration_partitions

    run = RunDirectory(str(tmp_path / "out"), "run")
    folders = {"": 5, "a": 3, "a/b": 4}
    planned = [run.write_plan(Partition(f"p{unit}", "images", tuple(f"{unit}/{i}.jpg".lstrip("/") for i in range(n)),
                                        unit)) for unit, n in folders.items()]
    cfg = SimpleNamespace(source=SimpleNamespace(format="images", partition_size=3))
    sample = calibration_partitions(cfg, run, planned, 4)  # 12 names, every 3rd
    assert [name for p in sample for name in p.inputs] == ["0.jpg", "3.jpg", "a/1.jpg", "a/b/1.jpg"]
    assert [p.size for p in sample] == [3, 1]
    everything = calibration_partitions(cfg, run, planned, 100)
    assert sum(p.size for p in everything) == 12


def test_rescore_refuses_a_flat_manifest_before_any_work(make_config, tmp_path):
    previous = tmp_path / "old"
    (previous / "_manifest").mkdir(parents=True)
    cfg = make_config(str(tmp_path / "src"), detectors=("mcm",))
    (previous / "_config.json").write_text(json.dumps({"decision_hash": "x", "config": {"model": {
        "name": cfg.model.name, "pretrained": cfg.model.pretrained}}}))
    (previous / "_manifest" / "p.json").write_text(json.dumps(
        {"partition": {"id": "p", "format": "images", "inputs": ["a/1.jpg", "b/2.jpg"]}, "counts": {}}))
    from curation import workflow

    with pytest.raises(ManifestLayoutError, match="flat layout of an earlier version"):
        workflow.rescore(cfg, str(previous))
