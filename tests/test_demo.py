"""`curation demo`, the README's main command: the emoji "food crawl" in three formats, curated with
the embedded default config (emoji-clip, local Ray, local MLflow)."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curation.demo import CORRUPT, FORMATS, build_demo_dataset, decisions_by_category

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def test_demo_dataset_has_every_format_category_and_broken_items(tmp_path):
    truth = build_demo_dataset(tmp_path / "data")
    assert set(truth) == set(FORMATS)
    for fmt, items in truth.items():
        counts = Counter(items.values())
        assert set(counts) == {"food & drink", "off-domain", "weapon", CORRUPT}, fmt
        assert counts[CORRUPT] >= 2 and counts["food & drink"] > counts["weapon"] > 0
    image_files = sorted(str(p.relative_to(tmp_path / "data" / "images"))
                         for p in (tmp_path / "data" / "images").rglob("*") if p.is_file())
    assert image_files == sorted(truth["images"])
    parquet = pq.read_table(tmp_path / "data" / "parquet")
    assert sorted(parquet.column("id").to_pylist()) == sorted(truth["parquet"])
    assert parquet.column_names == ["id", "image", "alt_text"]
    assert len(list((tmp_path / "data" / "webdataset").glob("*.tar"))) == 2
    again = build_demo_dataset(tmp_path / "again")
    assert again == truth
    first = sorted((tmp_path / "data/images").rglob("*.png"))[0]
    assert first.read_bytes() == (tmp_path / "again/images" / first.relative_to(tmp_path / "data/images")).read_bytes()


@pytest.mark.slow
def test_curation_demo_curates_each_format_and_removes_what_the_tasks_describe(tmp_path, shared_cache):
    import mlflow

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "CURATION_CACHE": str(shared_cache),
           "RAY_ADDRESS": "", "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    result = subprocess.run([str(VENV_BIN / "curation"), "demo", "--config", str(REPO / "configs/demo.yaml")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3000)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "mlflow ui --backend-store-uri sqlite:///" in result.stdout

    truth = json.loads((tmp_path / "demo/data/truth.json").read_text())
    totals = Counter()
    for fmt in FORMATS:
        run_dir = tmp_path / "demo/out" / f"demo-{fmt}"
        table = decisions_by_category(str(run_dir), truth[fmt])
        assert sum(sum(c.values()) for c in table.values()) == len(truth[fmt]), "every item decided once"
        assert table[CORRUPT] == Counter(failed=Counter(truth[fmt].values())[CORRUPT])
        for category, outcomes in table.items():
            totals.update({(category, k): v for k, v in outcomes.items()})
        assert json.loads((run_dir / "summary.json").read_text())["total"]["items"] == len(truth[fmt])

    def rate(category, outcome):
        n = sum(v for (c, _), v in totals.items() if c == category)
        return totals[(category, outcome)] / n

    # The model and thresholds are committed, so these rates are fixed numbers for this dataset;
    # the bounds leave room for kernel-level differences between machines.
    assert rate("food & drink", "kept") >= 0.80
    assert rate("off-domain", "removed") >= 0.70
    assert rate("weapon", "removed") >= 0.80

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")  # no global tracking URI for later tests
    experiment = client.get_experiment_by_name("curation-demo")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"demo-{fmt}" for fmt in sorted(FORMATS)]
