import numpy as np
import pytest

from curation.metrics import auroc, fpr_at_tpr, threshold_at_tpr

LABELS = [1, 1, 1, 1, 0, 1, 0, 0, 1, 0]
SCORES = [.9, .8, .8, .7, .7, .6, .5, .4, .3, .1]


def test_reference_fpr_check_from_algorithms_md():
    assert fpr_at_tpr(SCORES, LABELS, 0.95) == pytest.approx(0.75)
    assert auroc(SCORES, LABELS) == pytest.approx(0.8125)


def test_auroc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 200).astype(float)  # many ties
    labels = rng.integers(0, 2, 200)
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert auroc(scores, labels) == pytest.approx(pairwise)


def test_perfect_and_inverted_separation():
    labels = [0, 0, 1, 1]
    assert auroc([0.1, 0.2, 0.8, 0.9], labels) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], labels) == 0.0
    assert fpr_at_tpr([0.1, 0.2, 0.8, 0.9], labels) == 0.0
    assert fpr_at_tpr([0.9, 0.8, 0.2, 0.1], labels) == 1.0


def test_threshold_at_tpr_flags_requested_share_of_positives():
    scores = np.arange(10) / 10.0
    labels = [0] * 5 + [1] * 5  # positives score .5 .. .9
    t = threshold_at_tpr(scores, labels, 0.8)
    assert t == pytest.approx(0.6)
    assert (scores[5:] >= t).mean() >= 0.8


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0, 0]])
def test_single_class_is_an_error(labels):
    with pytest.raises(ValueError, match="positive and one negative"):
        auroc([0.1, 0.2, 0.3], labels)


def test_length_mismatch_and_bad_labels():
    with pytest.raises(ValueError, match="differ in length"):
        auroc([0.1, 0.2], [0, 1, 1])
    with pytest.raises(ValueError, match="0 or 1"):
        fpr_at_tpr([0.1, 0.2], [0, 2])
