"""Workflow guards: quantile calibration needs enough images; the detector cache is content-keyed
and checked before reuse."""

import json
import logging
import re
import time
from pathlib import Path

import pytest

from curation import preflight, workflow
from curation.detectors import cache
from curation.thresholds import CalibrationError
from curation.detectors.base import ARTIFACT_JSON, ARTIFACT_TENSORS, detector_from_files
from images import write_rgb_images

pytestmark = pytest.mark.usefixtures("ray_local")


def test_quantile_threshold_is_not_calibrated_on_a_tiny_sample(make_config, tmp_path):
    source = tmp_path / "images"
    write_rgb_images(source / "a", 3, seed=11)
    quantile = "detectors.0.threshold={strategy: quantile, value: 0.3, sample_size: 64, min_sample: 5}"
    cfg = make_config(str(source), quantile, detectors=("mcm",))
    with pytest.raises(CalibrationError, match=r"at least 5 decodable images .* found 3 .*min_sample"):
        workflow.curate(cfg)
    stored = tmp_path / "out" / "test" / "_thresholds.json"
    assert "mcm" not in (json.loads(stored.read_text()) if stored.exists() else {})

    write_rgb_images(source / "b", 4, seed=12)
    summary = workflow.curate(cfg)
    assert summary["thresholds"]["mcm"]["sample"] == 7 and summary["this_run"]["items"] == 7
    assert json.loads(stored.read_text())["mcm"] == summary["thresholds"]["mcm"]


def test_corpus_edited_in_place_is_refitted(make_config, tmp_path):
    corpus = tmp_path / "words.txt"
    corpus.write_text("car\ntree\nhouse\nriver\ncloud\n")
    cfg = make_config(str(tmp_path / "unused"), f"cache_dir={tmp_path / 'cache'}", f"detectors.0.corpus={corpus}",
                      detectors=("hftt",))
    key = cache.detector_key(cfg.model, cfg.detectors[0])
    assert cache.fitted_detectors(cfg)[1] == {"hftt": False}
    assert cache.fitted_detectors(cfg)[1] == {"hftt": True}

    corpus.write_text("car\ntree\nhouse\nriver\nboat\n")  # same path, new words
    assert cache.detector_key(cfg.model, cfg.detectors[0]) != key
    artifacts, reused = cache.fitted_detectors(cfg)
    assert reused == {"hftt": False}
    assert json.loads(artifacts[0][ARTIFACT_JSON])["provenance"]["corpus"]["size"] == 5


NEGLABEL_PARAMS = "params: {ngroup: 5, noun_lexnames: [noun.shape], adj_lexnames: [adj.ppl]}"


def _detectors_sharing_corpora(words: Path) -> str:
    """Two NegLabels on WordNet, two HFTTs on one word list, one MCM (no corpus). The NegLabels
    come first: unchained, the test's two CPUs would start both at once."""
    hftt = f"corpus: {words}, params: {{templates: ['a photo of a {{}}.'], n_trainable: 3, batch_size: 8}}"
    fixed = "threshold: {strategy: fixed, value: 0.5}"
    return ("detectors=["
            f"{{kind: neglabel, name: food, task_texts: [apple, bread], {NEGLABEL_PARAMS}, {fixed}}}, "
            f"{{kind: neglabel, name: tools, task_texts: [hammer, saw], {NEGLABEL_PARAMS}, {fixed}}}, "
            f"{{kind: hftt, name: food-hftt, task_texts: [apple, bread], {hftt}, {fixed}}}, "
            f"{{kind: mcm, name: mcm, task_texts: [pear, plum], {fixed}}}, "
            f"{{kind: hftt, name: tools-hftt, task_texts: [hammer, saw], {hftt}, {fixed}}}]")


def _logged_step():
    """A task body that waits for the file `after` to exist, records its start in `log`, sleeps,
    fails if told to, and records its end (made here, nested: Ray ships it by value)."""

    def step(log: str, name: str, seconds: float = 0.3, fail: bool = False, after: str = "") -> str:
        import os
        import time

        while after and not os.path.exists(after):
            time.sleep(0.05)
        with open(log, "a") as f:
            f.write(f"start {name}\n")
        time.sleep(seconds)
        if fail:
            raise RuntimeError(f"{name} failed")
        with open(log, "a") as f:
            f.write(f"end {name}\n")
        return name

    return step


def test_task_chains_run_side_by_side_each_one_after_the_other(tmp_path):
    from curation.pipeline.ray_data import run_task_chains

    logs = [str(tmp_path / f"chain{c}.log") for c in range(3)]
    chains = [[(logs[0], "a1"), (logs[0], "a2"), (logs[0], "a3")], [], [(logs[2], "c1")]]
    finished = list(run_task_chains(_logged_step(), chains, num_cpus=0.5))
    assert sorted(finished) == [(0, 0, "a1"), (0, 1, "a2"), (0, 2, "a3"), (2, 0, "c1")]
    assert [f[2] for f in finished if f[0] == 0] == ["a1", "a2", "a3"]
    assert Path(logs[0]).read_text().split("\n")[:-1] == [f"{e} a{i}" for i in (1, 2, 3) for e in ("start", "end")]
    assert list(run_task_chains(_logged_step(), [[], []])) == []

    failing = [[(logs[1], "b1", 0.3, True), (logs[1], "b2")]]
    with pytest.raises(RuntimeError, match="b1 failed"):
        list(run_task_chains(_logged_step(), failing, num_cpus=0.5))
    time.sleep(1.0)  # time enough for a wrongly started b2 to write its start
    assert Path(logs[1]).read_text() == "start b1\n"  # the chain stopped: b2 never started


def test_task_chains_cancel_running_tasks_when_the_caller_stops_early(tmp_path):
    from curation.pipeline.ray_data import run_task_chains

    slow, quick = str(tmp_path / "slow.log"), str(tmp_path / "quick.log")
    # q1 waits for s1's log, so s1 is running when the caller stops
    chains = [[(slow, "s1", 5.0), (slow, "s2", 0.0)], [(quick, "q1", 0.0, False, slow)]]
    finished = run_task_chains(_logged_step(), chains, num_cpus=0.5)
    assert next(finished) == (1, 0, "q1")
    finished.close()  # the caller stops while s1 sleeps
    time.sleep(7.0)  # time enough for s1 to end, and s2 to start, had s1 not been cancelled
    assert Path(slow).read_text() == "start s1\n"


def test_detectors_encoding_one_corpus_are_chained(make_config, tmp_path):
    words = tmp_path / "words.txt"
    cfg = make_config("unused", _detectors_sharing_corpora(words))
    assert cache.fit_chains(cfg.detectors) == [[0, 1], [2, 4], [3]]
    other = make_config("unused", _detectors_sharing_corpora(words), f"detectors.4.corpus={tmp_path / 'other.txt'}",
                        "detectors.1.params.adj_lexnames=[adj.all]")
    assert cache.fit_chains(other.detectors) == [[0], [1], [2], [3], [4]]  # other candidates, another list
    templates = make_config("unused", _detectors_sharing_corpora(words), "detectors.1.params.noun_templates=['{} icon']")
    assert cache.fit_chains(templates.detectors) == [[0], [1], [2, 4], [3]]
    assert cache.fit_chains([]) == []


def test_detectors_reading_one_corpus_encode_its_shards_once(make_config, tmp_path, caplog):
    """Fitted in parallel, the second NegLabel (and HFTT) would miss the text cache and encode the
    first's corpus shards again; chained after it, it reads them and encodes only its own labels."""
    words = tmp_path / "words.txt"
    words.write_text("car\ntree\nhouse\nriver\ncloud\nboat\n")
    cfg = make_config("unused", f"cache_dir={tmp_path / 'cache'}", _detectors_sharing_corpora(words))
    with caplog.at_level(logging.INFO, logger="curation"):
        cache.fitted_detectors(cfg)
    shards = {m.group(1): (int(m.group(2)), int(m.group(3))) for m in re.finditer(
        r"fitted (\S+): (\d+) text shards encoded, (\d+) read from the text cache", caplog.text)}
    assert shards["food"] == (3, 0)  # labels, WordNet nouns, WordNet adjectives
    assert shards["tools"] == (1, 2)  # its labels; both WordNet shards from the cache
    assert shards["food-hftt"][1] == 0 and shards["tools-hftt"][1] >= 1  # the word list, cached
    assert shards["mcm"] == (1, 0)


def _rewrite_identity(entry: Path) -> None:
    """A well-formed entry with consistent checksums, but fitted for another model."""
    meta = json.loads((entry / ARTIFACT_JSON).read_text())
    meta["model_identity"] = "ViT-B-16/openai"
    cache.cache_artifact(entry, {ARTIFACT_JSON: json.dumps(meta).encode(),
                                 ARTIFACT_TENSORS: (entry / ARTIFACT_TENSORS).read_bytes()})


DAMAGE = {
    "truncated tensors": lambda entry: (entry / ARTIFACT_TENSORS).write_bytes((entry / ARTIFACT_TENSORS).read_bytes()[:40]),
    "garbage detector.json": lambda entry: (entry / ARTIFACT_JSON).write_text("{not json"),
    "no completion record": lambda entry: (entry / cache.CACHE_RECORD).unlink(),
    "another model": _rewrite_identity,
}


def test_damaged_cache_entries_are_refitted_not_used(make_config, tmp_path, caplog):
    cfg = make_config(str(tmp_path / "unused"), f"cache_dir={tmp_path / 'cache'}", detectors=("mcm",))
    entry = tmp_path / "cache" / "detectors" / cache.detector_key(cfg.model, cfg.detectors[0])
    good, reused = cache.fitted_detectors(cfg)
    assert reused == {"mcm": False} and sorted(good[0]) == [ARTIFACT_JSON, ARTIFACT_TENSORS]
    for what, damage in DAMAGE.items():
        damage(entry)
        with caplog.at_level(logging.WARNING, logger="curation"):
            artifacts, reused = cache.fitted_detectors(cfg)
        assert reused == {"mcm": False}, what
        assert "refitting" in caplog.text, what
        caplog.clear()
        detector_from_files(artifacts[0], "tiny-clip/random-seed0")  # a usable artifact came back
        assert artifacts[0][ARTIFACT_TENSORS] == good[0][ARTIFACT_TENSORS], what
    assert cache.fitted_detectors(cfg)[1] == {"mcm": True}, "the refit repaired the cache entry"


def test_local_paths_are_refused_on_a_multi_node_cluster_unless_declared_shared(make_config, tmp_path):
    cfg = make_config(tmp_path / "images", f"evaluation.wanted_uri={tmp_path / 'wanted'}", detectors=("mcm",))
    preflight.check_local_paths_on_cluster(cfg, nodes=1)  # one node: its disk is everybody's
    with pytest.raises(preflight.ClusterPathError) as refused:
        preflight.check_local_paths_on_cluster(cfg, nodes=3)
    message = str(refused.value)
    assert "3 nodes" in message and "compute.shared_filesystem: true" in message
    assert all(f"{field}=" in message for field in ("source.uri", "output.uri", "evaluation.wanted_uri"))
    preflight.check_local_paths_on_cluster(make_config(tmp_path / "images", "compute.shared_filesystem=true",
                                                       detectors=("mcm",)), nodes=3)
    s3 = make_config("s3://bucket/images", "output.uri=s3://bucket/out", detectors=("mcm",))
    preflight.check_local_paths_on_cluster(s3, nodes=3)


def test_text_and_detector_caches_can_be_shared_on_s3(make_config, tmp_path):
    """cache_dir on S3 (read with output.storage_options): every node of a cluster would find the
    corpus embeddings and the fitted detector there instead of encoding again."""
    from s3server import make_bucket, moto_s3

    from curation import storage

    with moto_s3() as options:
        make_bucket(options, "cache")
        cfg = make_config(str(tmp_path / "unused"), "cache_dir=s3://cache/shared",
                          f"output.storage_options={json.dumps(options)}", detectors=("hftt",))
        artifacts, reused = cache.fitted_detectors(cfg)
        assert reused == {"hftt": False}
        files = storage.list_files("s3://cache/shared", options)
        assert any("/text/" in f for f in files)
        assert any(f.endswith(f"/detectors/{cache.detector_key(cfg.model, cfg.detectors[0])}/{cache.CACHE_RECORD}")
                   for f in files)
        again, reused = cache.fitted_detectors(cfg)
        assert reused == {"hftt": True} and again[0][ARTIFACT_TENSORS] == artifacts[0][ARTIFACT_TENSORS]
