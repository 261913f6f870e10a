"""Whole curate runs on local Ray against hostile inputs and careless use: every input image ends
up in exactly one of kept/removed/failed (or is counted as skipped), and runs never corrupt
each other."""

import json
import os
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import hostile
from curation import storage, workflow
from curation.pipeline.lease import RunLease, RunLockedError
from curation.pipeline.plan import OutputConflictError, RunDirectory
from images import write_rgb_images

pytestmark = pytest.mark.usefixtures("ray_local")


def table(folder: Path):
    files = sorted(folder.rglob("*.parquet")) if folder.exists() else []
    return pq.read_table([str(f) for f in files]) if files else None


def shard_keys(folder: Path) -> list[str]:
    keys = []
    for shard in sorted(folder.glob("*.tar")) if folder.exists() else []:
        with tarfile.open(shard) as tar:
            keys += sorted({m.name.split(".")[0] for m in tar.getmembers()})
    return keys


def test_hostile_parquet_files_are_recorded_and_the_rest_completes(make_config, tmp_path):
    source = tmp_path / "parquet"
    source.mkdir()
    expected = [hostile.write_good_parquet(source / "a-good.parquet", 4, seed=1),
                hostile.write_corrupt_parquet(source / "b-corrupt.parquet", 4, seed=2),
                hostile.write_wrong_column_parquet(source / "c-wrong.parquet", 3, seed=3),
                hostile.write_good_parquet(source / "d-good.parquet", 2, seed=4)]
    summary = workflow.curate(make_config(str(source), "source.format=parquet"))
    run_dir = tmp_path / "out" / "test"
    counts = summary["this_run"]
    assert counts["items"] == sum(e["items"] for e in expected) == 9
    assert (counts["files"], counts["failed_files"], counts["partitions"]) == (4, 1, 4)
    assert counts["kept"] + counts["removed"] == 6 and counts["failed"] == 3
    failed = table(run_dir / "failed").to_pydict()
    rows = dict(zip(failed["id"], zip(failed["error_kind"], failed["whole_file"])))
    assert rows["b-corrupt.parquet"] == ("corrupt", True)
    assert [rows[f"p3-{i}"] for i in range(3)] == [("no_image_column", False)] * 3
    decided = table(run_dir / "kept").num_rows + table(run_dir / "removed").num_rows
    assert decided == 6 and not summary["unfinished"]


def test_hostile_shards_are_recorded_and_the_rest_completes(make_config, tmp_path):
    source = tmp_path / "shards"
    source.mkdir()
    expected = [hostile.write_good_shard(source / "a-good.tar", 3, seed=5),
                hostile.write_truncated_shard(source / "b-cut.tar", 3, seed=6),
                hostile.write_gzip_bomb_shard(source / "c-bomb.tar"),
                hostile.write_duplicate_shard(source / "d-dup.tar", 2, seed=7),
                hostile.write_link_shard(source / "e-links.tar", 2, seed=8)]
    summary = workflow.curate(make_config(str(source), "source.format=webdataset"))
    run_dir = tmp_path / "out" / "test"
    counts = summary["this_run"]
    assert counts["items"] == sum(e["items"] for e in expected) == 13
    assert (counts["files"], counts["failed_files"]) == (5, 2)
    failed = table(run_dir / "failed").to_pydict()
    kinds = sorted(zip(failed["error_kind"], failed["whole_file"]))
    assert kinds == sorted([("truncated", False), ("truncated", True), ("unsupported", True),
                            ("duplicate_member", False), ("special_member", False), ("special_member", False)])
    decided = shard_keys(run_dir / "kept") + shard_keys(run_dir / "removed")
    assert len(decided) == counts["kept"] + counts["removed"] == 3 + 2 + 2 + 2
    assert sorted(decided) == sorted(table(run_dir / "scores").column("id").to_pylist())


def test_links_fifos_and_other_files_in_a_source_folder_are_skipped_and_counted(make_config, tmp_path):
    source = tmp_path / "images"
    write_rgb_images(source, 3)
    os.symlink("/dev/zero", source / "zero.jpg")
    os.mkfifo(source / "pipe.png")
    (source / "notes.txt").write_text("not an image")
    summary = workflow.curate(make_config(str(source)))
    assert summary["this_run"]["items"] == 3
    assert summary["skipped"] == {"link": 1, "special_file": 1, "extension .txt": 1}
    assert json.loads((tmp_path / "out" / "test" / "summary.json").read_text())["skipped"] == summary["skipped"]


def test_resume_removes_stale_kept_and_removed_copies(make_config, tmp_path):
    """A killed run copied images of a partition it never recorded; the resumed run may decide
    them differently, so the stale copies must go, or an image would sit in kept/ and removed/."""
    source = tmp_path / "images"
    write_rgb_images(source, 16, seed=3)
    cfg = make_config(str(source), detectors=("mcm",))
    workflow.curate(cfg)
    run_dir = tmp_path / "out" / "test"
    victim = sorted((run_dir / "_manifest").glob("*/*.json"))[0]
    inputs = json.loads(victim.read_text())["partition"]["inputs"]
    victim.unlink()
    for name in inputs:  # the opposite decision of what is on disk, as a differently-thresholded run left it
        here = "kept" if (run_dir / "kept" / name).exists() else "removed"
        other = run_dir / ("removed" if here == "kept" else "kept") / name
        other.parent.mkdir(parents=True, exist_ok=True)
        other.write_bytes(b"stale")
    (run_dir / "kept" / ".half-written.jpg.tmp").write_bytes(b"x")
    resumed = workflow.curate(cfg)
    assert resumed["this_run"]["items"] == 8
    on_disk = sorted(str(p.relative_to(d)) for d in (run_dir / "kept", run_dir / "removed") for p in d.rglob("*")
                     if p.is_file())
    assert on_disk == sorted(p.name for p in source.iterdir())


def test_output_inside_the_source_is_refused_before_anything_is_written(make_config, tmp_path):
    source = tmp_path / "images"
    write_rgb_images(source, 2)
    with pytest.raises(OutputConflictError, match="inside source.uri"):
        workflow.curate(make_config(str(source), f"output.uri={source / 'curated'}"))
    assert not (source / "curated").exists()


def test_a_live_lease_refuses_a_second_run_and_a_stale_one_is_taken_over(make_config, tmp_path):
    source = tmp_path / "images"
    write_rgb_images(source, 4)
    cfg = make_config(str(source), detectors=("mcm",))
    run = RunDirectory(str(tmp_path / "out"), "test")
    with RunLease(run, ttl_s=30):
        started = time.perf_counter()
        with pytest.raises(RunLockedError, match="in use by another run"):
            workflow.curate(cfg)
        assert time.perf_counter() - started < 30
        assert not (tmp_path / "out" / "test" / "_config.json").exists()
    summary = workflow.curate(cfg)  # released: free again
    assert summary["this_run"]["items"] == 4
    dead = {"token": "x", "host": "gone", "pid": 1, "started": 0, "heartbeat": time.time() - 700,
            "ttl_s": 600, "released": False}
    storage.write_bytes(run.path("_lease.json"), json.dumps(dead).encode())
    write_rgb_images(source / "more", 2, seed=9)
    assert workflow.curate(cfg)["this_run"]["items"] == 2
    assert json.loads((tmp_path / "out" / "test" / "_lease.json").read_text())["released"] is True


def test_throttled_reads_leave_their_partition_for_the_next_run(make_config, tmp_path):
    """S3 answers 503 SlowDown for one file: that partition stays unfinished (no outputs, no
    manifest), the others finish; the next run, with S3 healthy again, finishes it."""
    from s3faults import throttling_proxy
    from s3server import make_bucket, moto_s3

    with moto_s3() as s3, throttling_proxy(s3["endpoint_url"]) as proxy:
        make_bucket(s3, "throttled")
        options = s3 | {"endpoint_url": proxy.url}
        for i in range(3):
            storage.write_bytes(f"s3://throttled/src/part-{i}.parquet", hostile.parquet_bytes(2, seed=20 + i), s3)
        cfg = make_config("s3://throttled/src", "source.format=parquet",
                          f"source.storage_options={json.dumps(options)}",
                          "source.read_attempts=1", detectors=("mcm",))
        proxy.throttle("part-1.parquet")
        first = workflow.curate(cfg)
        assert proxy.hits > 0
        assert len(first["unfinished"]) == 1 and "unavailable" in first["unfinished"][0]["reason"]
        assert first["this_run"]["items"] == 4 and first["this_run"]["partitions"] == 2
        assert not list((tmp_path / "out" / "test" / "kept").glob("part-1*"))
        proxy.throttle()
        second = workflow.curate(cfg)
        assert second["this_run"]["items"] == 2 and not second["unfinished"]
        assert second["total"]["items"] == 6 and second["total"]["partitions"] == 3


def test_a_first_run_over_an_empty_source_is_an_error(make_config, tmp_path):
    from curation.workflow import NoInputsError

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(NoInputsError, match=r"holds no images inputs \(skipped: \{'extension .txt': 1\}\)"):
        workflow.curate(make_config(str(tmp_path / "empty")))
    assert not (tmp_path / "out" / "test" / "_config.json").exists()


@pytest.mark.parametrize("override, named", [
    ("source.uri=demo/data/images", "source.uri='demo/data/images'"),
    ("output.uri=./out", "output.uri='./out'"),
    ("tracking.uri=null", "default MLflow store"),
    ("tracking.uri=sqlite:///mlflow.db", "sqlite:///mlflow.db would land"),
])
def test_relative_paths_are_refused_inside_a_ray_job(override, named, make_config, tmp_path, monkeypatch):
    from curation.preflight import JobPathError, check_paths_for_ray_job

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what `ray job submit` gives its entrypoint
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = make_config(str(tmp_path / "images"), override)
    with pytest.raises(JobPathError) as err:
        workflow.curate(cfg)
    assert named in str(err.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/env.db")
    if override == "tracking.uri=null":
        check_paths_for_ray_job(cfg)  # an absolute store from the environment is fine


def test_detector_artifacts_reach_actors_through_the_object_store(make_config, tmp_path, monkeypatch, caplog):
    """Artifacts are put once, not captured in the actor constructor: no oversized-UDF warning
    whatever their size (here the warning limit is lowered to 1 MiB and the artifact is 2 MiB)."""
    import logging

    import numpy as np
    from ray.data._internal.execution.operators.map_operator import MapOperator

    from curation.detectors.cache import fitted_detectors
    from curation.pipeline import ray_data
    from curation.pipeline.plan import make_partitions
    from curation.pipeline.stream import preprocess_of

    source = tmp_path / "images"
    write_rgb_images(source, 3)
    cfg = make_config(str(source), detectors=("mcm",))
    artifacts, _ = fitted_detectors(cfg)
    padded = [files | {"padding.bin": np.random.default_rng(0).bytes(2 * 2**20)} for files in artifacts]
    monkeypatch.setattr(MapOperator, "MAP_UDF_WARN_SIZE_THRESHOLD", 2**20)
    partitions = make_partitions(sorted(p.name for p in source.iterdir()), "images", 8)
    monkeypatch.setattr(logging.getLogger("ray.data"), "handlers", [caplog.handler])  # it does not propagate
    with caplog.at_level(logging.WARNING):
        batches = list(ray_data.stream(partitions, cfg.source, cfg.model, cfg.compute, padded, {"mcm": 0.5},
                                       preprocess_of(cfg)))
    assert sum(len(b["id"]) for b in batches) == 3
    assert not [r for r in caplog.records if "too large" in r.getMessage()]
