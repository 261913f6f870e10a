"""Fit, save, load and score every detector end to end with the tiny open_clip model."""

import json

import numpy as np
import pytest
import torch

from curation.detectors import load_detector
from curation.detectors.hftt import HFTT
from curation.detectors.mcm import MCM
from curation.detectors.neglabel import NegLabel
from curation.text.corpora import WordNetCorpus, load_word_corpus

WANTED = ["apple", "banana", "bread", "cheese"]


@pytest.fixture(scope="module")
def world_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "words.txt"
    path.write_text("\n".join(["car", "tree", "house", "gun", "river", "cloud", "shoe", "lamp"] * 1) + "\n")
    return load_word_corpus(str(path))


def fitted(kind, cached_tiny, world_corpus, side="wanted"):
    if kind == "hftt":
        return HFTT(WANTED, side=side, templates=["a photo of a {}.", "a drawing of a {}."],
                    n_trainable=3, batch_size=4).fit(cached_tiny, world_corpus)
    if kind == "neglabel":
        return NegLabel(WANTED, side=side, ngroup=4, noun_lexnames=["noun.shape"],
                        adj_lexnames=["adj.ppl"]).fit(cached_tiny, WordNetCorpus())
    return MCM(WANTED, side=side).fit(cached_tiny)


@pytest.mark.parametrize("kind", ["hftt", "neglabel", "mcm"])
def test_fit_save_load_score_round_trip(kind, cached_tiny, world_corpus, tiny_encoder, tmp_path):
    detector = fitted(kind, cached_tiny, world_corpus)
    images = tiny_encoder.encode_pixels(torch.rand(6, 3, 32, 32))
    scores = detector.score(images, model_identity=tiny_encoder.identity)
    assert scores.shape == (6,) and ((scores >= 0) & (scores <= 1)).all()

    detector.threshold = 0.4
    detector.save(tmp_path / kind)
    assert sorted(p.name for p in (tmp_path / kind).iterdir()) == ["detector.json", "tensors.safetensors"]
    meta = json.loads((tmp_path / kind / "detector.json").read_text())
    assert meta["kind"] == kind and meta["side"] == "wanted" and meta["task_texts"] == WANTED
    assert meta["model_identity"] == tiny_encoder.identity and meta["threshold"] == 0.4

    loaded = load_detector(tmp_path / kind, model_identity=tiny_encoder.identity)
    assert type(loaded) is type(detector) and loaded.threshold == 0.4
    assert np.allclose(loaded.score(images), scores, atol=1e-7)


def test_hftt_records_its_corpus(cached_tiny, world_corpus):
    detector = fitted("hftt", cached_tiny, world_corpus)
    assert detector.provenance_["corpus"] == world_corpus.provenance()
    assert detector.provenance_["corpus"]["size"] == 8


def test_neglabel_keeps_its_negative_labels(cached_tiny, world_corpus):
    detector = fitted("neglabel", cached_tiny, world_corpus)
    n_nouns = detector.provenance_["n_candidates"]["nouns"]
    n_adjs = detector.provenance_["n_candidates"]["adjectives"]
    assert len(detector.negative_labels_) == int(0.15 * n_nouns) + int(0.15 * n_adjs)
    assert detector.neg_emb.shape == (len(detector.negative_labels_), 32)


def test_float64_embeddings_give_float64_scores(cached_tiny, world_corpus, tiny_encoder):
    detector = fitted("mcm", cached_tiny, world_corpus)
    images = tiny_encoder.encode_pixels(torch.rand(3, 3, 32, 32)).astype(np.float64)
    assert detector.score(images).dtype == np.float64


@pytest.mark.parametrize("texts, message", [
    ([], "empty"),
    (["apple", "  "], "blank"),
    (["apple", "Apple"], "duplicate"),
    ("apple", "list of strings"),
])
def test_bad_task_texts(texts, message):
    with pytest.raises((ValueError, TypeError), match=message):
        NegLabel(texts)


def test_bad_side_and_mcm_with_one_label():
    with pytest.raises(ValueError, match="side must be one of"):
        MCM(WANTED, side="maybe")
    with pytest.raises(ValueError, match="at least two"):
        MCM(["gun"], side="unwanted")


def test_scoring_refuses_other_models_embeddings(cached_tiny, world_corpus, tmp_path):
    detector = fitted("mcm", cached_tiny, world_corpus)
    with pytest.raises(ValueError, match="dimension 16 .* 32-d"):
        detector.score(np.zeros((2, 16), np.float32))
    with pytest.raises(ValueError, match="fitted with model"):
        detector.score(np.zeros((2, 32), np.float32), model_identity="ViT-B-16/openai")
    detector.save(tmp_path / "d")
    with pytest.raises(ValueError, match="refit it for this model"):
        load_detector(tmp_path / "d", model_identity="ViT-B-16/openai")


def test_unfitted_and_non_artifact_directories(tmp_path):
    with pytest.raises(RuntimeError, match="not fitted"):
        MCM(WANTED).score(np.zeros((1, 32)))
    with pytest.raises(FileNotFoundError, match="detector.json is missing"):
        load_detector(tmp_path)
