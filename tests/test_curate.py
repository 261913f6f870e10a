"""The curate job end to end on local Ray with real files: invariants, formats, resume, errors."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import workflow
from curation.config import ConfigError
from curation.pipeline.plan import OutputConflictError
from images import write_image_zoo, write_rgb_images

pytestmark = pytest.mark.usefixtures("ray_local")


def read_dir(path: Path):
    return pq.read_table(str(path)) if path.exists() and any(path.iterdir()) else None


def outcome_ids(run_dir: Path) -> dict[str, list[str]]:
    """Per output, the relative paths of image files copied there (kept/removed) or listed (failed)."""
    files = lambda folder: sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    failed = read_dir(run_dir / "failed")
    return {"kept": files(run_dir / "kept") if (run_dir / "kept").exists() else [],
            "removed": files(run_dir / "removed") if (run_dir / "removed").exists() else [],
            "failed": sorted(failed.column("id").to_pylist()) if failed is not None else []}


def assert_partitioned_exactly_once(source: Path, run_dir: Path) -> dict[str, list[str]]:
    inputs = sorted(str(p.relative_to(source)) for p in source.rglob("*") if p.is_file())
    outcome = outcome_ids(run_dir)
    everything = outcome["kept"] + outcome["removed"] + outcome["failed"]
    assert sorted(everything) == inputs, "every input in exactly one of kept/removed/failed, once"
    return outcome


@pytest.fixture
def zoo(tmp_path):
    source = tmp_path / "images"
    expected = write_image_zoo(source / "zoo")
    write_rgb_images(source / "good", 12)
    return source, expected


def test_curate_images_end_to_end(zoo, make_config, tmp_path):
    source, expected = zoo
    summary = workflow.curate(make_config(str(source)))
    run_dir = tmp_path / "out" / "test"
    outcome = assert_partitioned_exactly_once(source, run_dir)

    failed = read_dir(run_dir / "failed").to_pydict()
    kinds = dict(zip(failed["id"], failed["error_kind"]))
    for name, want in expected.items():
        if want == "ok":
            assert f"zoo/{name}" not in kinds
        else:
            assert kinds[f"zoo/{name}"] == want, (name, failed)
    assert all(msg for msg in failed["message"]) and all(s.endswith(i) for s, i in zip(failed["source"], failed["id"]))

    scores = read_dir(run_dir / "scores")
    assert {"id", "source", "score_neg", "score_hftt", "score_mcm", "decision", "fired", "embedding"} <= set(scores.column_names)
    decisions = dict(zip(scores.column("id").to_pylist(), scores.column("decision").to_pylist()))
    assert sorted(k for k, v in decisions.items() if v == "keep") == outcome["kept"]
    for row in scores.to_pylist():
        fired = {n for n in ("neg", "hftt", "mcm") if row[f"score_{n}"] >= summary["thresholds"][n]["threshold"]}
        assert set(row["fired"]) == fired and (row["decision"] == "remove") == bool(fired)
    for rel in outcome["kept"][:3] + outcome["removed"][:3]:
        folder = "kept" if rel in outcome["kept"] else "removed"
        assert (run_dir / folder / rel).read_bytes() == (source / rel).read_bytes()

    counts = summary["this_run"]
    assert counts["items"] == len(list(p for p in source.rglob("*") if p.is_file()))
    assert counts["failed"] == len(outcome["failed"]) == sum(v != "ok" for v in expected.values())
    assert summary["thresholds"]["hftt"]["strategy"] == "quantile"
    assert json.loads((run_dir / "summary.json").read_text())["mlflow_run_id"] == summary["mlflow_run_id"]


def test_rerun_skips_finished_and_processes_only_new_files(make_config, tmp_path):
    source = tmp_path / "images"
    write_rgb_images(source / "a", 10, seed=1)
    cfg = make_config(str(source))
    first = workflow.curate(cfg)
    assert first["this_run"]["items"] == 10 and first["this_run"]["partitions"] == 2

    again = workflow.curate(cfg)
    assert again["this_run"]["items"] == 0 and again["detectors_reused"] == {"neg": True, "hftt": True, "mcm": True}

    write_rgb_images(source / "b", 3, seed=2)
    incremental = workflow.curate(cfg)
    assert incremental["this_run"]["items"] == 3
    assert incremental["total"]["items"] == 13
    assert incremental["thresholds"] == first["thresholds"], "incremental runs reuse data-derived thresholds"
    assert_partitioned_exactly_once(source, tmp_path / "out" / "test")


def test_nested_folders_are_planned_one_folder_at_a_time_and_every_total_stays_exact(make_config, tmp_path):
    """Each folder is planned by its own Ray Task: a partition never spans folders, files added to
    a folder are the only new work, the driver's plan holds no image names, and the records of a
    folder that has left the source still count in the totals."""
    source = tmp_path / "images"
    write_rgb_images(source, 2, seed=1)
    write_rgb_images(source / "x", 3, seed=2)
    write_rgb_images(source / "x" / "deep", 5, seed=3)
    cfg = make_config(str(source), detectors=("mcm",))
    run_dir = tmp_path / "out" / "test"
    (run_dir / "kept").mkdir(parents=True)
    (run_dir / "kept" / "not-ours.txt").write_text("a directory no run claimed yet: nothing in it is deleted")
    first = workflow.curate(cfg)
    assert (first["this_run"]["items"], first["this_run"]["partitions"]) == (10, 3)  # one per folder
    (run_dir / "kept" / "not-ours.txt").unlink()
    records = [json.loads(p.read_text()) for p in (run_dir / "_manifest").glob("*/*.json")]
    assert sorted(r["partition"]["unit"] for r in records) == ["", "x", "x/deep"]
    assert all({str(Path(name).parent) for name in r["partition"]["inputs"]} == {r["partition"]["unit"] or "."}
               for r in records)
    assert not list((run_dir / "_plan").glob("*")), "finished partitions leave no plan behind"
    assert_partitioned_exactly_once(source, run_dir)

    shutil.rmtree(source / "x" / "deep")
    (source / "x" / "img_0000.jpg").rename(source / "x" / "renamed.jpg")  # a new name in a finished folder
    second = workflow.curate(cfg)
    assert (second["this_run"]["items"], second["this_run"]["partitions"]) == (1, 1)
    assert (second["total"]["items"], second["total"]["partitions"]) == (11, 4)
    kept_or_removed = outcome_ids(run_dir)
    assert "x/renamed.jpg" in kept_or_removed["kept"] + kept_or_removed["removed"]
    assert len([n for n in kept_or_removed["kept"] + kept_or_removed["removed"] if n.startswith("x/deep/")]) == 5


def test_interrupted_partition_is_redone_without_duplicates(make_config, tmp_path):
    """A partition whose outputs were written but whose manifest was not (killed in between)."""
    source = tmp_path / "images"
    write_rgb_images(source, 16, seed=3)
    cfg = make_config(str(source))
    workflow.curate(cfg)
    run_dir = tmp_path / "out" / "test"
    victim = sorted((run_dir / "_manifest").glob("*/*.json"))[0]
    victim.unlink()
    (source / "late.png").write_bytes((source / sorted(p.name for p in source.iterdir())[0]).read_bytes())
    resumed = workflow.curate(cfg)
    assert resumed["this_run"]["items"] == 9  # the 8 of the unfinished partition + the new file
    assert_partitioned_exactly_once(source, run_dir)
    ids = read_dir(run_dir / "scores").column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 17


def test_output_location_of_another_config_is_refused(make_config, tmp_path):
    source = tmp_path / "images"
    write_rgb_images(source, 4)
    workflow.curate(make_config(str(source)))
    with pytest.raises(OutputConflictError, match="another config"):
        workflow.curate(make_config(str(source), "detectors.0.threshold.value=0.7"))


def _image_bytes(n, seed=0):
    folder = Path(f"/tmp/curation-img-{seed}-{n}")
    shutil.rmtree(folder, ignore_errors=True)
    return [Path(p).read_bytes() for p in write_rgb_images(folder, n, seed=seed)]


def test_parquet_source_keeps_all_columns(make_config, tmp_path):
    source = tmp_path / "parquet"
    source.mkdir()
    images = _image_bytes(6) + [b"", b"garbage"]
    table = pa.table({"key": [f"k{i}" for i in range(8)], "image": images, "caption": [f"c{i}" for i in range(8)]})
    pq.write_table(table, source / "part-0.parquet")
    pq.write_table(table.slice(0, 3), source / "part-1.parquet")
    cfg = make_config(str(source), "source.format=parquet", "source.id_column=key")
    summary = workflow.curate(cfg)
    run_dir = tmp_path / "out" / "test"
    assert summary["this_run"]["items"] == 11 and summary["this_run"]["failed"] == 2
    kept, removed = read_dir(run_dir / "kept"), read_dir(run_dir / "removed")
    assert kept.num_rows + removed.num_rows == 9
    assert set(kept.column_names) == {"key", "image", "caption"}
    failed = read_dir(run_dir / "failed").to_pydict()
    assert sorted(failed["id"]) == ["k6", "k7"] and set(failed["error_kind"]) == {"empty", "not_an_image"}


def test_webdataset_shards_stay_shards(make_config, tmp_path):
    source = tmp_path / "shards"
    source.mkdir()
    images = _image_bytes(5, seed=4)
    with tarfile.open(source / "shard-000.tar", "w") as tar:
        for i, data in enumerate(images + [b"\x00broken"]):
            for ext, payload in ((".jpg", data), (".json", json.dumps({"i": i}).encode())):
                info = tarfile.TarInfo(f"sample{i:03d}{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    summary = workflow.curate(make_config(str(source), "source.format=webdataset"))
    run_dir = tmp_path / "out" / "test"
    assert summary["this_run"]["items"] == 6 and summary["this_run"]["failed"] == 1
    members = []
    for folder in ("kept", "removed"):
        with tarfile.open(run_dir / folder / "shard-000.tar") as tar:
            members += tar.getnames()
    assert sorted(members) == sorted(f"sample{i:03d}{e}" for i in range(5) for e in (".jpg", ".json"))


def test_a_shard_larger_than_a_decode_block_is_curated_exactly_once(make_config, tmp_path):
    """More samples than `DECODE_BLOCK_ITEMS`: the shard travels as several blocks, and its
    outputs are still one kept and one removed shard with every sample once, in shard order."""
    import hostile
    from curation.pipeline.read import DECODE_BLOCK_ITEMS

    source = tmp_path / "shards"
    source.mkdir()
    n = DECODE_BLOCK_ITEMS + 44
    hostile.write_good_shard(source / "big.tar", n, seed=8)
    summary = workflow.curate(make_config(str(source), "source.format=webdataset", detectors=("mcm",)))
    assert summary["this_run"]["items"] == n and summary["this_run"]["failed"] == 0
    run_dir = tmp_path / "out" / "test"
    scores = pq.read_table(run_dir / "scores")
    assert sorted(scores.column("position").to_pylist()) == list(range(n))
    keys = {folder: [name.rsplit(".", 1)[0] for name in tarfile.open(run_dir / folder / "big.tar").getnames()]
            for folder in ("kept", "removed")}
    with tarfile.open(source / "big.tar") as tar:
        order = [name.rsplit(".", 1)[0] for name in tar.getnames()]
    assert sorted(keys["kept"] + keys["removed"]) == sorted(order)
    assert all(keys[f] == [k for k in order if k in set(keys[f])] for f in keys)  # shard order kept
    decided = dict(zip(scores.column("id").to_pylist(), scores.column("decision").to_pylist()))
    assert sorted(keys["removed"]) == sorted(k for k, d in decided.items() if d == "remove")


def test_rescore_applies_new_thresholds_without_clip(make_config, tmp_path):
    source = tmp_path / "images"
    write_rgb_images(source, 10, seed=5)
    first = workflow.curate(make_config(str(source), detectors=("mcm",)))
    run_dir = tmp_path / "out" / "test"
    cfg = make_config(str(source), "run_name=rescored", "detectors.0.threshold.value=0.0", detectors=("mcm",))
    summary = workflow.rescore(cfg, str(run_dir))
    assert summary["this_run"]["removed"] == 10 and first["this_run"]["items"] == 10
    old = read_dir(run_dir / "scores").to_pandas().set_index("id")["score_mcm"]
    new = read_dir(tmp_path / "out" / "rescored" / "scores").to_pandas().set_index("id")["score_mcm"]
    assert np.allclose(old.sort_index(), new.sort_index(), atol=2e-3)  # float16 embeddings
    assert_partitioned_exactly_once(source, tmp_path / "out" / "rescored")


def test_evaluate_writes_the_contract_json(make_config, tmp_path):
    wanted, unwanted = tmp_path / "wanted", tmp_path / "unwanted"
    write_rgb_images(wanted, 6, seed=6)
    write_rgb_images(unwanted, 5, seed=7)
    cfg = make_config(str(tmp_path / "unused"), f"evaluation.wanted_uri={wanted}", f"evaluation.unwanted_uri={unwanted}")
    report = workflow.evaluate(cfg)
    on_disk = json.loads((tmp_path / "out" / "test" / "evaluation.json").read_text())
    assert set(on_disk) == {"neg", "hftt", "mcm"}
    for name, row in on_disk.items():
        assert 0.0 <= row["auroc"] <= 1.0 and 0.0 <= row["fpr95"] <= 1.0
        assert (row["n_wanted"], row["n_unwanted"]) == (6, 5)
        assert row == pytest.approx(report[name])


def test_actor_pool_that_would_starve_decoding_is_refused(make_config, tmp_path):
    source = tmp_path / "images"
    write_rgb_images(source, 2)
    with pytest.raises(ValueError, match="would deadlock"):
        workflow.curate(make_config(str(source), "compute.actors=2", "compute.cpus_per_actor=1.0"))


def test_two_actors_with_fractional_cpus_finish(make_config, tmp_path):
    source = tmp_path / "images"
    write_rgb_images(source, 20, seed=8)
    summary = workflow.curate(make_config(str(source), "compute.actors=2", "compute.cpus_per_actor=0.5"))
    assert summary["this_run"]["items"] == 20
    assert_partitioned_exactly_once(source, tmp_path / "out" / "test")


@pytest.mark.parametrize("override, field", [
    ("source.colour=red", "source: unknown field(s) ['colour']"),
    ("model.batch_size=big", "model.batch_size: expected int"),
    ("source.format=tiff", "source.format: 'tiff' is not one of"),
    ("detectors.0.params.ngroups=3", "detectors[0].params: unknown parameter(s) ['ngroups']"),
    ("detectors.0.params.noun_templates=['an emoji of a {}', emoji]",
     "detectors[0]: noun_templates: each must contain exactly one '{}' (quote templates in YAML: "
     "'{} emoji'); got ['emoji']"),
    ("detectors.2.task_texts=[apple]", "detectors[2]: MCM needs at least two task texts"),
])
def test_config_errors_name_the_field(make_config, override, field):
    with pytest.raises(ConfigError) as err:
        make_config("/tmp/x", override)
    assert field in str(err.value)


def test_missing_object_is_a_recorded_failure(tmp_path):
    """A file listed at planning time and gone when read (deleted mid-run) fails alone, with a reason."""
    from curation.config import SourceConfig
    from curation.pipeline.plan import make_partitions
    from curation.pipeline.read import decode_partition

    write_rgb_images(tmp_path, 2)
    names = sorted(p.name for p in tmp_path.iterdir())
    (partition,) = make_partitions(names + ["vanished.jpg"], "images", 8)
    (columns,) = decode_partition(partition, SourceConfig(uri=str(tmp_path), max_pixels=10**8), 32)
    assert columns["error_kind"].tolist() == ["", "", "missing"]
    assert "vanished.jpg" in columns["error_message"][2] or "No such file" in columns["error_message"][2]
    assert (columns["n_items"] == 3).all() and columns["pixels"].shape == (3, 32, 32, 3)


def test_train_then_curate_reuses_the_fitted_detectors(make_config, tmp_path):
    import mlflow

    source = tmp_path / "images"
    write_rgb_images(source, 3, seed=9)
    cfg = make_config(str(source), f"cache_dir={tmp_path / 'own-cache'}")  # nothing fitted yet
    trained = workflow.train(cfg)
    assert trained["reused"] == {"neg": False, "hftt": False, "mcm": False}
    for name in ("neg", "hftt", "mcm"):
        meta = json.loads((Path(trained["detectors"]) / name / "detector.json").read_text())
        assert meta["name"] == name and meta["model_identity"] == "tiny-clip/random-seed0"
    hftt_meta = json.loads((Path(trained["detectors"]) / "hftt" / "detector.json").read_text())
    assert hftt_meta["provenance"]["corpus"]["size"] == 18 and len(hftt_meta["provenance"]["corpus"]["sha256"]) == 64
    client = mlflow.MlflowClient(cfg.tracking.uri)
    artifacts = {a.path for a in client.list_artifacts(trained["mlflow_run_id"], "detectors")}
    assert artifacts == {"detectors/neg", "detectors/hftt", "detectors/mcm"}
    summary = workflow.curate(cfg)
    assert summary["detectors_reused"] == {"neg": True, "hftt": True, "mcm": True}
