"""Progress reporting: log lines off a terminal, a bar on one, and the long steps that use it
(text encoding, HFTT training, NegLabel mining, a curate run's fitting inside Ray workers)."""

import logging
import os
import re
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from curation.progress import Progress, Waiting, ensure_worker_logging, format_duration


@pytest.fixture
def progress_lines(caplog):
    """The `curation.progress` lines logged during the test, as (time, message)."""
    caplog.set_level(logging.INFO, logger="curation")
    return lambda: [(r.created, r.getMessage()) for r in caplog.records if r.name == "curation.progress"]


@pytest.fixture
def every_line(monkeypatch):
    """Reporters print from the start and often, so seconds-long work shows its lines."""
    monkeypatch.setenv("CURATION_PROGRESS_DELAY_S", "0")
    monkeypatch.setenv("CURATION_PROGRESS_INTERVAL_S", "0.05")


def test_log_lines_first_periodic_and_final_with_rate_and_time_left(progress_lines):
    interval = 0.3
    with Progress("encoding texts", 60, "texts", interval_s=interval, delay_s=0, cached_shards_skipped=2) as progress:
        for _ in range(30):
            time.sleep(0.04)
            progress.update(2, loss=torch.tensor(0.693147))
    lines = progress_lines()
    times, messages = [t for t, _ in lines], [m for _, m in lines]
    assert messages[0] == "encoding texts: started (60 texts to do), cached shards skipped 2"
    periodic = messages[1:-1]
    assert len(periodic) >= 2, messages
    assert all(re.search(r"\d+/60 texts \(\d+%\), [\d.]+ texts/s, [\d.]+ s left, cached shards skipped 2, "
                         r"loss 0.6931$", m) for m in periodic), periodic
    assert max(np.diff(times)) <= 2 * interval, "no gap longer than the interval (plus a timer tick, scheduling)"
    final = re.fullmatch(r"encoding texts: done, 60 texts in ([\d.]+) s \(([\d.]+) texts/s\), "
                         r"cached shards skipped 2, loss 0.6931", messages[-1])
    assert final, messages[-1]
    elapsed, rate = float(final[1]), float(final[2])
    assert 1.0 <= elapsed < 3.0 and rate == pytest.approx(60 / elapsed, rel=0.1)


def test_a_stall_keeps_printing_and_says_so_and_a_failure_says_stopped(progress_lines):
    with pytest.raises(RuntimeError):
        with Progress("reading WordNet", None, "synsets", interval_s=0.1, delay_s=0.05):
            time.sleep(0.5)
            raise RuntimeError("interrupted")
    messages = [m for _, m in progress_lines()]
    assert messages[0] == "reading WordNet: started"
    assert any("no update for" in m for m in messages[1:-1]), messages
    assert messages[-1].startswith("reading WordNet: stopped, 0 synsets in ")


def test_a_wait_with_nothing_to_count_says_how_long_it_has_run(progress_lines):
    with Waiting("loading model emoji-clip", interval_s=0.1, delay_s=0.1):
        time.sleep(0.45)
    messages = [m for _, m in progress_lines()]
    assert messages[0] == "loading model emoji-clip: started"
    assert re.fullmatch(r"loading model emoji-clip: 0\.\d s elapsed", messages[1]), messages
    assert re.fullmatch(r"loading model emoji-clip: done in 0\.\d s", messages[-1]), messages


def test_a_step_shorter_than_the_delay_prints_nothing(progress_lines):
    with Progress("encoding texts", 9, "texts", delay_s=1.0) as progress:
        progress.update(9)
    assert progress_lines() == []


def test_a_terminal_gets_a_bar_not_log_lines(progress_lines):
    master, slave = os.openpty()  # a new pty reports 0 columns, as some CI terminals do: the bar still shows
    with open(slave, "w") as terminal:
        with Progress("encoding texts", 50, "texts", delay_s=0, stream=terminal) as progress:
            for _ in range(5):
                progress.update(10, loss=0.5)
    shown = b""
    while chunk := _read_available(master):
        shown += chunk
    os.close(master)
    text = shown.decode()
    assert "encoding texts: 100%|" in text and "50/50" in text and "loss=0.5" in text, text
    assert progress_lines() == []


def _read_available(fd: int) -> bytes:
    """What the terminal received; b"" once drained (Linux answers EIO when the other end is closed)."""
    try:
        return os.read(fd, 65536)
    except OSError:
        return b""


def test_durations_read_like_a_person_would_say_them():
    assert [format_duration(s) for s in (3.25, 42, 276, 3900)] == ["3.2 s", "42 s", "4 min 36 s", "1 h 05 min"]


def test_cached_encoder_counts_every_batch_and_the_shards_it_skipped(tiny_encoder, tmp_path, progress_lines,
                                                                      every_line):
    from curation.text.cache import CachedTextEncoder

    texts = [f"a photo of item number {i}" for i in range(4000)]
    cache = CachedTextEncoder(tiny_encoder, tmp_path / "text", shard_size=1000)
    cache.encode_text(texts[:3000])
    first = [m for _, m in progress_lines()]
    assert first[0] == "encoding texts: started (3000 texts to do), cached shards skipped 0"
    assert first[-1].startswith("encoding texts: done, 3000 texts in ")
    counts = [int(m.split(": ")[1].split("/")[0]) for m in first[1:-1]]
    assert any(c % 1000 for c in counts), f"progress within a shard (per batch), not per shard: {counts}"

    done_before = len(first)
    again = cache.encode_text(texts)
    second = [m for _, m in progress_lines()][done_before:]
    assert second[0] == "encoding texts: started (1000 texts to do), cached shards skipped 3"
    assert second[-1].startswith("encoding texts: done, 1000 texts in ")
    assert second[-1].endswith("cached shards skipped 3")
    assert again.shape == (4000, tiny_encoder.dim)


def test_hftt_training_reports_steps_epochs_and_loss(progress_lines, every_line):
    from curation.detectors.hftt import HFTT

    rng = np.random.default_rng(0)
    unit = lambda *shape: F.normalize(torch.from_numpy(rng.standard_normal(shape)).float(), dim=-1)
    detector = HFTT(["apple", "pear"], name="fruit", templates=["a photo of a {}."], n_trainable=3, batch_size=64,
                    epochs=2)
    detector.fit_embeddings(unit(2, 1, 16), unit(640, 16), "test-model")
    messages = [m for _, m in progress_lines()]
    assert messages[0] == "training HFTT detector 'fruit': started (20 steps to do), epoch 1/2"
    assert re.fullmatch(r"training HFTT detector 'fruit': done, 20 steps in .*, epoch 2/2, mean loss [\d.]+",
                        messages[-1]), messages


def test_neglabel_mining_reports_the_candidates_measured(progress_lines, every_line):
    from curation.detectors.neglabel import NegLabel

    rng = np.random.default_rng(0)
    unit = lambda *shape: F.normalize(torch.from_numpy(rng.standard_normal(shape)).float(), dim=-1)
    nouns, adjs = [f"noun{i}" for i in range(9000)], [f"adj{i}" for i in range(100)]
    detector = NegLabel(["apple"], name="fruit", ngroup=2)
    detector.fit_embeddings(unit(1, 8), unit(9000, 8), unit(100, 8), nouns, adjs, "test-model")
    messages = [m for _, m in progress_lines()]
    assert messages[0] == "mining NegLabel negatives for 'fruit': started (9100 candidates to do)"
    assert messages[-1].startswith("mining NegLabel negatives for 'fruit': done, 9100 candidates in ")


def test_worker_logging_is_configured_in_ray_workers_only(ray_local):
    import ray

    @ray.remote
    def handlers_after_setup() -> int:
        ensure_worker_logging()
        ensure_worker_logging()  # once per process, however often it is called
        return len(logging.getLogger("curation").handlers)

    before = list(logging.getLogger("curation").handlers)
    assert ray.get(handlers_after_setup.remote()) == 1
    ensure_worker_logging()
    assert logging.getLogger("curation").handlers == before, "the driver's logging is its own business"


@pytest.mark.slow
def test_curate_output_shows_fitting_inside_ray_workers_and_the_stream(tmp_path, world_file):
    """`curation curate` with stderr piped (a cron job's view): progress lines from the detector
    fit, which runs in Ray workers, reach the driver's output once each; so do the calibration
    sample's, the stream's and the writers'; third-party INFO noise does not."""
    import subprocess
    import sys
    from pathlib import Path

    from images import write_rgb_images

    write_rgb_images(tmp_path / "images", 20)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "",
           "CURATION_CACHE": str(tmp_path / "cache"), "CURATION_PROGRESS_DELAY_S": "0",
           "CURATION_PROGRESS_INTERVAL_S": "1", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    hftt = (f"[{{kind: hftt, name: hftt, task_texts: [apple, banana], corpus: {world_file}, "
            "params: {templates: ['a photo of a {}.'], n_trainable: 3, batch_size: 8, epochs: 2}, "
            "threshold: {strategy: quantile, value: 0.3, sample_size: 64, min_sample: 2}}]")
    overrides = [f"source.uri={tmp_path / 'images'}", f"output.uri={tmp_path / 'out'}", "run_name=progress",
                 f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"cache_dir={tmp_path / 'cache'}",
                 "source.partition_size=8", "model.batch_size=8", f"detectors={hftt}"]
    result = subprocess.run([str(bin_dir / "curation"), "curate", *[a for o in overrides for a in ("--set", o)]],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in result.stderr.splitlines()]  # Ray colours prefixes
    worker = [line.split(") ", 1)[1] for line in lines if re.match(r"\((fit_detector|_encode_shard) pid=\d+\) ", line)]
    assert any(line.endswith("curation INFO fitting hftt detector 'hftt'") for line in worker), lines
    assert any(" curation.progress INFO encoding text shard 1 of 1: done, 18 texts in " in line for line in worker)
    trained = [line for line in worker if "training HFTT detector 'hftt': done, 6 steps in " in line]
    assert len(trained) == 1 and re.search(r"epoch 2/2, mean loss [\d.]+$", trained[0]), worker
    ours = [line for line in worker if "curation" in line]
    assert len(ours) == len(set(ours)), "each worker line once (not also through the root logger)"
    driver = [line for line in lines if " curation.progress INFO " in line and not line.startswith("(")]
    assert any(line.endswith("scoring a sample for quantile thresholds: started (20 images to do), items 0, failed 0")
               for line in driver), driver
    assert sum(line.endswith("curating: started (20 images to do), items 0, kept 0, removed 0, failed 0")
               for line in driver) == 1, driver
    curated = [line for line in driver if "curating: done, 20 images in " in line]
    assert len(curated) == 1 and re.search(r"items 20, kept \d+, removed \d+, failed 0$", curated[0]), driver
    assert any("writing partitions: " in line for line in driver), driver
    noise = [line for line in lines
             if re.search(r"alembic|font_manager|logging_progress|Creating initial MLflow database tables", line)]
    assert not noise, noise
