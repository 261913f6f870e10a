"""The audit report: built from a run directory's files alone (nothing embedded again) with bounded
memory; sheets, threshold table and failure groups checked against the stored scores; hostile ids
escaped; the printed rescore commands apply their thresholds; local, S3 and `curation report`."""

import html
import io
import json
import logging
import re
import shlex
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation import cli, report, storage, workflow
from curation.config import load_config
from curation.pipeline.plan import Partition, RunDirectory
from images import write_rgb_images
from synthetic_runs import write_run

HOSTILE = '<script>alert("x")&amp.png'  # a real file name: ids come from hostile datasets
DETECTORS = ("detectors=[{kind: mcm, name: mcm, task_texts: [a, a2]}, "
             "{kind: mcm, name: other, task_texts: [b, b2], threshold: {value: 0.4}}]")


def _config(tmp_path: Path, source: str, *overrides: str):
    return load_config(None, [f"source.uri={source}", f"output.uri={tmp_path / 'out'}", "run_name=audit",
                              "source.partition_size=16", DETECTORS, *overrides])


def _source(folder: Path, n: int) -> Path:
    write_rgb_images(folder, n)
    (folder / HOSTILE).write_bytes((folder / "img_0001.png").read_bytes())
    for name in ("bad.jpg", "bad2.jpg", '<img src=x onerror="alert(1)">.jpg'):
        (folder / name).write_bytes(b"not an image")
    return folder


FAILURES = {"bad.jpg": ("not_an_image", "no image format recognised"),
            "bad2.jpg": ("not_an_image", "no image format recognised; starts with b'not'"),
            '<img src=x onerror="alert(1)">.jpg': ("truncated", "<script>alert(2)</script>"),
            "img_0003.png": ("truncated", "cut short")}


@pytest.fixture
def audited(tmp_path):
    """A finished 64-item run over real image files (4 partitions), 4 failed items."""
    cfg = _config(tmp_path, str(_source(tmp_path / "src", 60)))
    return cfg, write_run(cfg, FAILURES)


def _model(run: RunDirectory) -> dict:
    return json.loads(Path(run.path("report", "report.json")).read_text())


def _page(run: RunDirectory) -> str:
    return Path(run.path("report", "index.html")).read_text()


def _stored_rows(run: RunDirectory) -> list[dict]:
    """Every scores/ row with the partition it came from, read plainly with pyarrow."""
    rows = []
    for file in sorted(Path(run.path("scores")).glob("*.parquet")):
        rows += [r | {"partition": file.stem} for r in pq.read_table(file).drop(["embedding"]).to_pylist()]
    return rows


def test_sheets_hold_the_right_items_in_order_with_labels(audited):
    cfg, run = audited
    report.build_report(run, cfg.source, per_sheet=5)
    model, page, rows = _model(run), _page(run), _stored_rows(run)
    for det in model["detectors"]:
        name = det["name"]
        by_score = lambda r, sign: (sign * r[f"score_{name}"], r["partition"], r["position"])  # noqa: E731
        fired = [r for r in rows if name in r["fired"]]
        kept = [r for r in rows if r["decision"] == "keep"]
        expected = {"top": sorted(fired, key=lambda r: by_score(r, -1)),
                    "above": sorted(fired, key=lambda r: by_score(r, 1)),
                    "below": sorted(kept, key=lambda r: by_score(r, -1))}
        assert len(fired) > 5 and len(kept) > 5, "the sheets must be cut to per_sheet"
        assert [s["key"] for s in det["sheets"]] == ["top", "above", "below"]
        for sheet in det["sheets"]:
            want = expected[sheet["key"]][:5]
            assert [i["id"] for i in sheet["items"]] == [r["id"] for r in want], (name, sheet["key"])
            assert [i["fired"] for i in sheet["items"]] == [r["fired"] for r in want]
            assert [i["score"] for i in sheet["items"]] == pytest.approx([r[f"score_{name}"] for r in want])
            for item in sheet["items"]:
                assert item["unavailable"] == ""
                caption = (f"<b>{html.escape(item['id'])}</b><br>score {item['score']:.4f} · {item['decision']}"
                           f"<br>fired: {', '.join(item['fired']) or 'none'}")
                assert caption in page
        highest_kept, lowest_flagged = expected["below"][0][f"score_{name}"], expected["above"][0][f"score_{name}"]
        assert highest_kept < det["threshold"] <= lowest_flagged
    thumbs = Path(run.path("report", "thumbs"))
    sources = set(re.findall(r'<img src="([^"]+)"', page))
    assert sources == {f"thumbs/{p.name}" for p in thumbs.iterdir()} and len(sources) >= 5
    for file in thumbs.iterdir():
        with Image.open(file) as image:
            assert image.format == "JPEG" and max(image.size) <= report.THUMB_PX


def test_threshold_table_matches_numpy_and_its_commands_apply_the_threshold(audited):
    cfg, run = audited
    report.build_report(run, cfg.source)
    model, rows = _model(run), _stored_rows(run)
    summary = json.loads(Path(run.path("summary.json")).read_text())
    assert model["sample"] == {"rows": len(rows), "exact": True} and model["decided"] == len(rows) == 60
    for det in model["detectors"]:
        name = det["name"]
        mine = np.array([r[f"score_{name}"] for r in rows], np.float32)
        others = np.array([any(f != name for f in r["fired"]) for r in rows])
        table = det["thresholds"]
        assert [r["threshold"] for r in table] == sorted((r["threshold"] for r in table), reverse=True)
        assert {"current", "current +0.01", "current -0.05"} <= {r["label"] for r in table}
        for row in table:
            flagged = mine >= np.float32(row["threshold"])
            assert row["flagged"] == int(flagged.sum()) and row["removed"] == int((flagged | others).sum())
            assert row["flagged_rate"] == pytest.approx(flagged.mean())
            if row["target_rate"] is not None:  # the lowest threshold that flags at most that share
                allowed = np.floor(row["target_rate"] * len(mine))
                lower = mine[~flagged]
                assert flagged.sum() <= allowed and (not lower.size or (mine >= lower.max()).sum() > allowed)
        current = next(r for r in table if r["label"] == "current")
        total = summary["total"]
        assert (current["flagged"], current["removed"]) == (total["fired"][name], total["removed"])

        args = shlex.split(table[0]["command"])
        assert args[:4] == ["curation", "rescore", "--scores", run.uri]
        overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        rescore_cfg = load_config(args[args.index("--config") + 1], overrides)
        for i, other in enumerate(rescore_cfg.detectors):
            want = table[0]["threshold"] if i == det["index"] else summary["thresholds"][other.label]["threshold"]
            assert other.threshold.strategy == "fixed" and np.float32(other.threshold.value) == np.float32(want)
        assert rescore_cfg.run_name not in (cfg.run_name, "") and rescore_cfg.source == cfg.source


def test_hostile_ids_and_messages_are_escaped(audited):
    cfg, run = audited
    report.build_report(run, cfg.source, per_sheet=100)  # every decided item on some sheet
    page = _page(run)
    assert "<script" not in page.lower() and "<img src=x" not in page
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;.jpg" in page  # a hostile failed item's id
    assert "&lt;script&gt;alert(&quot;x&quot;)&amp;amp.png" in page  # the hostile image's caption
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in page  # a hostile failure message
    assert '<meta http-equiv=Content-Security-Policy content="default-src \'none\'' in page


def test_failed_items_are_grouped_by_reason(audited):
    cfg, run = audited
    report.build_report(run, cfg.source)
    failed = pq.read_table(run.path("failed")).to_pylist()
    groups = _model(run)["failed"]
    assert [(g["kind"], g["items"], g["files"]) for g in groups] == [("not_an_image", 2, 0), ("truncated", 2, 0)]
    for group in groups:
        stored = {(r["id"], r["message"]) for r in failed if r["error_kind"] == group["kind"]}
        assert {(x["id"], x["message"]) for x in group["examples"]} == stored
    assert "<td class=l>not_an_image</td><td>2</td><td>0</td>" in _page(run)


def test_a_run_larger_than_the_sample_is_estimated_and_says_so(tmp_path):
    cfg = _config(tmp_path, str(_source(tmp_path / "src", 300)))
    run = write_run(cfg, FAILURES, seed=3)
    report.build_report(run, cfg.source, per_sheet=4, sample_rows=100)
    model, rows = _model(run), _stored_rows(run)
    assert model["sample"] == {"rows": 100, "exact": False} and model["decided"] == len(rows) == 300
    assert "estimated from a uniform sample of 100 of 300 decided items" in _page(run)
    for det in model["detectors"]:
        mine = np.array([r[f"score_{det['name']}"] for r in rows], np.float32)
        for row in det["thresholds"]:
            exact = int((mine >= np.float32(row["threshold"])).sum())
            if row["label"] == "current":
                assert row["flagged"] == exact
            else:  # a seeded sample of 100: within 4 standard errors of the true share
                assert abs(row["flagged_rate"] - exact / 300) <= 4 * max(np.sqrt(0.25 / 100), 0.02)
        top = sorted(mine[mine >= np.float32(det["threshold"])])[::-1][:4]
        assert [i["score"] for i in det["sheets"][0]["items"]] == pytest.approx(top)  # rankings stay exact


def test_reservoir_is_a_uniform_sample_of_bounded_size():
    reservoir = report.Reservoir(2000, 1)
    values = np.arange(100_000, dtype=np.float32)
    for start in range(0, len(values), 777):
        chunk = values[start:start + 777, None]
        reservoir.add(chunk, chunk > 50_000)
    sample, fired = reservoir.sample()
    assert sample.shape == (2000, 1) and len(np.unique(sample)) == 2000
    assert np.array_equal(fired[:, 0], sample[:, 0] > 50_000)
    counts = np.histogram(sample, bins=10, range=(0, 100_000))[0]
    chi2 = ((counts - 200) ** 2 / 200).sum()
    assert chi2 < 27.9, counts  # chi-square, 9 degrees of freedom, p = 0.001
    small = report.Reservoir(10, 1)
    small.add(values[:7, None], np.zeros((7, 1), bool))
    assert small.sample()[0][:, 0].tolist() == list(range(7))


def test_a_failed_build_is_recorded_and_logged_not_raised(audited, caplog):
    cfg, run = audited
    Path(run.path("report")).write_text("a file where the report folder goes")
    with caplog.at_level(logging.WARNING, logger="curation.report"):
        outcome = report.try_build(run, cfg.source)
    assert outcome["status"] == "failed" and "Error" in outcome["error"]
    assert "curation report --run" in caplog.text


def test_thumbnails_of_webdataset_samples_are_read_per_shard(tmp_path):
    source_dir = tmp_path / "shards"
    source_dir.mkdir()
    images = [Path(p).read_bytes() for p in write_rgb_images(tmp_path / "img", 2)]
    with tarfile.open(source_dir / "shard.tar", "w") as tar:
        for key, data in (("a", images[0]), ("b", b"broken"), ("c", images[1])):
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    cfg = _config(tmp_path, str(source_dir), "source.format=webdataset")
    run = RunDirectory(cfg.output.uri, "shards")
    run.finish(Partition("p1", "webdataset", ("shard.tar",)), {})
    items = [{"id": key, "partition": "p1", "position": position} for key, position in (("a", 0), ("b", 1), ("c", 2))]
    items.append({"id": "renamed", "partition": "p1", "position": 2})  # the shard changed since the run
    shown = report.write_thumbnails(run, cfg.source, items, 64)
    assert shown[report.thumb_name(items[0])] == "" and shown[report.thumb_name(items[1])].startswith("not_an_image")
    assert "source changed" in shown[report.thumb_name(items[3])]
    with Image.open(Path(run.path("report", "thumbs", report.thumb_name(items[0])))) as thumb:
        assert thumb.size == (48, 48)  # never scaled up


def test_report_cli_on_s3_uses_environment_credentials(tmp_path, monkeypatch):
    from s3server import make_bucket, moto_s3

    with moto_s3() as s3:
        make_bucket(s3, "audit")
        local = _source(tmp_path / "src", 20)
        for file in local.iterdir():
            storage.write_bytes(f"s3://audit/src/{file.name}", file.read_bytes(), s3)
        options = json.dumps(s3)
        cfg = load_config(None, ["source.uri=s3://audit/src", "output.uri=s3://audit/out", "run_name=audit",
                                 "source.partition_size=8", DETECTORS, f"source.storage_options={options}",
                                 f"output.storage_options={options}"])
        write_run(cfg, FAILURES)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3["key"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3["secret"])
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3["endpoint_url"])
        assert cli.main(["report", "--run", "s3://audit/out/audit"]) == 0
        listed = storage.list_files("s3://audit/out/audit/report", s3)
        files = {f.removeprefix("s3://audit/out/audit/report/") for f in listed}
        page = storage.read_bytes("s3://audit/out/audit/report/index.html", s3).decode()
        config = storage.read_bytes("s3://audit/out/audit/report/config.yaml", s3).decode()
        report_json = storage.read_bytes("s3://audit/out/audit/report/report.json", s3).decode()
    sources = set(re.findall(r'<img src="([^"]+)"', page))
    assert sources and sources == {f for f in files if f.startswith("thumbs/")}
    assert {"index.html", "report.json", "config.yaml"} <= files
    assert "# left out (redacted in the run's record; set it in the environment or with --set): " \
           "source.storage_options.secret" in config
    assert all(s3["secret"] not in text for text in (page, config, report_json))
    assert "Download <code>report/config.yaml</code>" in page


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_curate_builds_the_report_and_the_cli_rebuilds_it(make_config, tmp_path):
    """A real parquet curate (hostile id, bad cells, a corrupt file): the report is built, logged to
    MLflow self-contained; `curation report` rebuilds the same page; a printed rescore command
    runs and removes what its row says (up to items within float16 distance of a threshold)."""
    import mlflow

    source = tmp_path / "parquet"
    source.mkdir()
    images = [Path(p).read_bytes() for p in write_rgb_images(tmp_path / "img", 10)] + [b"", b"garbage"]
    ids = [f"k{i}" for i in range(11)] + ['<script>alert("id")</script>']
    pq.write_table(pa.table({"key": ids, "image": images}), source / "part-0.parquet")
    (source / "part-1.parquet").write_bytes(b"PAR1 cut short")
    cfg = make_config(str(source), "source.format=parquet", "source.id_column=key", detectors=("neglabel", "mcm"))
    summary = workflow.curate(cfg)
    run_dir = tmp_path / "out" / "test"
    assert summary["report"]["status"] == "ok" and summary["tracking"]["status"] == "ok"
    assert json.loads((run_dir / "summary.json").read_text())["report"] == summary["report"]
    model = json.loads((run_dir / "report" / "report.json").read_text())
    assert [(g["kind"], g["items"], g["files"]) for g in model["failed"]] == [("corrupt", 0, 1), ("empty", 1, 0),
                                                                             ("not_an_image", 1, 0)]
    shown = [i for d in model["detectors"] for s in d["sheets"] for i in s["items"]]
    assert shown and all(i["unavailable"] == "" for i in shown)
    assert "&lt;script&gt;alert(&quot;id&quot;)&lt;/script&gt;" in (run_dir / "report" / "index.html").read_text()

    client = mlflow.MlflowClient(cfg.tracking.uri)
    logged = {a.path for a in client.list_artifacts(summary["mlflow_run_id"], "report")}
    assert {"report/index.html", "report/report.json", "report/thumbs"} <= logged
    inline = Path(client.download_artifacts(summary["mlflow_run_id"], "report/index.html", str(tmp_path))).read_text()
    assert inline.count('<img src="data:image/jpeg;base64,') == len(shown) and "thumbs/" not in inline

    original = (run_dir / "report").rename(tmp_path / "first-report")
    assert cli.main(["report", "--run", str(run_dir)]) == 0
    rebuilt = json.loads((run_dir / "report" / "report.json").read_text())
    first = json.loads((original / "report.json").read_text())
    same = lambda m: {k: v for k, v in m.items() if k not in ("run", "summary")}  # noqa: E731 - build time, tracking
    assert same(rebuilt) == same(first) and rebuilt["summary"]["total"] == first["summary"]["total"]
    assert rebuilt["summary"]["mlflow_run_id"] == summary["mlflow_run_id"]  # the first build preceded tracking
    assert sorted(p.name for p in (run_dir / "report" / "thumbs").iterdir()) == \
        sorted(p.name for p in (original / "thumbs").iterdir())

    row = next(r for r in model["detectors"][1]["thresholds"] if r["label"] == "current -0.01")
    assert cli.main(shlex.split(row["command"])[1:]) == 0
    rescored_name = shlex.split(row["command"])[-1].removeprefix("run_name=")
    rescored = json.loads((tmp_path / "out" / rescored_name / "summary.json").read_text())
    rows = _stored_rows(RunDirectory(str(tmp_path / "out"), "test"))
    near = sum(any(abs(r[f"score_{d['name']}"] - t) < 3e-3 for d, t in
                   zip(model["detectors"], (model["detectors"][0]["threshold"], row["threshold"]))) for r in rows)
    assert abs(rescored["total"]["removed"] - row["removed"]) <= near
    assert rescored["report"]["status"] == "ok"
