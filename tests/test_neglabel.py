import numpy as np
import pytest
import torch
import torch.nn.functional as F

from curation.detectors.neglabel import NegLabel, group_permutation, mine_negatives, neglabel_scores


def unit(rng, *shape):
    return F.normalize(torch.from_numpy(rng.standard_normal(shape)), dim=-1)


def angles(*degrees):
    rad = np.deg2rad(degrees)
    return torch.from_numpy(np.stack([np.cos(rad), np.sin(rad)], 1))


def test_mining_keeps_the_farthest_fraction_in_ascending_order():
    id_emb = angles(0)
    nouns = angles(10, 170, 90, 120, 30)  # similarity to ID: cos of the angle
    adjs = angles(60, 180, 5, 100)
    noun_idx, adj_idx = mine_negatives(id_emb, nouns, adjs, percentile=0.95, fraction=0.5)
    assert noun_idx.tolist() == [1, 3]  # floor(0.5 * 5) = 2: 170 deg, then 120 deg
    assert adj_idx.tolist() == [1, 3]  # 180 deg, then 100 deg


def test_percentile_is_linear_interpolation_over_id_labels():
    rng = np.random.default_rng(0)
    id_emb, nouns = unit(rng, 7, 16), unit(rng, 40, 16)
    noun_idx, _ = mine_negatives(id_emb, nouns, nouns[:0], percentile=0.95, fraction=0.25)
    distance = np.percentile((nouns @ id_emb.T).numpy(), 95, axis=1)  # numpy's default is linear
    assert noun_idx.tolist() == np.argsort(distance, kind="stable")[:10].tolist()


def test_grouping_drops_remainder_and_uses_seeded_cpu_permutation():
    groups = group_permutation(10, ngroup=3, seed=0)
    expected = torch.randperm(9, generator=torch.Generator().manual_seed(0)).view(3, 3)
    assert torch.equal(groups, expected)
    with pytest.raises(ValueError, match="at least ngroup=4"):
        group_permutation(3, ngroup=4)


def test_scores_match_explicit_group_loop():
    rng = np.random.default_rng(1)
    images, id_emb, neg = unit(rng, 5, 8), unit(rng, 3, 8), unit(rng, 11, 8)
    t = 0.05
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    expected = []
    for chunk in neg[perm].chunk(2):
        probs = torch.softmax(torch.cat([images @ id_emb.T, images @ chunk.T], 1) / t, 1)
        expected.append(probs[:, :3].sum(1))
    expected = torch.stack(expected).mean(0)
    assert torch.allclose(neglabel_scores(images, id_emb, neg, t, ngroup=2, seed=3), expected, atol=1e-12)


def test_one_group_is_plain_sum_softmax_not_logit_sums():
    rng = np.random.default_rng(2)
    images, id_emb, neg = unit(rng, 4, 8), unit(rng, 2, 8), unit(rng, 6, 8)
    probs = torch.softmax(torch.cat([images @ id_emb.T, images @ neg.T], 1) / 0.01, 1)
    scores = neglabel_scores(images, id_emb, neg, ngroup=1)
    assert torch.allclose(scores, probs[:, :2].sum(1), atol=1e-12)
    assert ((scores >= 0) & (scores <= 1)).all()


def test_detector_scores_images_near_id_labels_as_wanted():
    rng = np.random.default_rng(3)
    id_emb = unit(rng, 4, 32)
    nouns, adjs = unit(rng, 400, 32), unit(rng, 100, 32)
    detector = NegLabel(["a", "b", "c", "d"], side="wanted", ngroup=10).fit_embeddings(
        id_emb, nouns, adjs, [f"n{i}" for i in range(400)], [f"j{i}" for i in range(100)], "synthetic")
    assert len(detector.negative_labels_) == 60 + 15
    near = F.normalize(id_emb.repeat(5, 1) + 0.1 * unit(rng, 20, 32), dim=-1)
    far = detector.neg_emb[:20].double()
    assert detector.score(near).mean() < 0.2 < 0.8 < detector.score(far).mean()


def test_float64_in_float64_math():
    rng = np.random.default_rng(4)
    out = neglabel_scores(unit(rng, 2, 4), unit(rng, 1, 4), unit(rng, 3, 4), ngroup=1)
    assert out.dtype == torch.float64


class RecordingEncoder:
    """Text -> a fixed random unit vector per text (seeded by the text), remembering every call."""

    identity = "recording"

    def __init__(self, dim=16):
        self.dim, self.calls = dim, []

    def encode_text(self, texts):
        self.calls.append(list(texts))
        rows = [np.random.default_rng(list(t.encode())).standard_normal(self.dim) for t in texts]
        return F.normalize(torch.tensor(np.array(rows)), dim=-1).numpy().astype(np.float32)


def test_prompt_ensemble_is_hftts_class_embedding_and_one_template_is_untouched():
    from curation.detectors.hftt import task_embeddings
    from curation.text.templates import encode_prompts

    encoder, words, templates = RecordingEncoder(), ["cat", "hot dog", "sword"], ["an emoji of a {}", "{}", "{} emoji"]
    per_template = torch.stack([torch.from_numpy(encoder.encode_text([t.format(w) for t in templates]))
                                for w in words])  # [K, T, d]
    ensembled = encode_prompts(encoder, templates, words)
    assert ensembled.dtype == np.float32
    assert np.allclose(ensembled, task_embeddings(per_template).numpy(), atol=1e-6)
    assert not np.allclose(ensembled, encoder.encode_text(words), atol=1e-2)
    single = encode_prompts(encoder, ["the nice {}"], words)
    assert np.array_equal(single, encoder.encode_text([f"the nice {w}" for w in words]))


class TwoWordCorpus:
    def candidates(self, noun_lexnames, adj_lexnames):
        return [f"noun{i}" for i in range(40)], [f"adj{i}" for i in range(20)]


def test_fit_prompts_labels_and_nouns_with_noun_templates_and_adjectives_with_adj_templates():
    default = RecordingEncoder()
    NegLabel(["red apple", "pear"], ngroup=2).fit(default, TwoWordCorpus())
    assert default.calls[0] == ["the nice red apple", "the nice pear"]  # the reference's prompts
    assert default.calls[1][0] == "the nice noun0" and default.calls[2][0] == "This is a adj0 photo"

    emoji = RecordingEncoder()
    detector = NegLabel(["red apple", "pear"], ngroup=2, noun_templates=["an emoji of a {}", "{}"],
                        adj_templates="{} emoji").fit(emoji, TwoWordCorpus())
    firsts = [call[0] for call in emoji.calls]
    assert firsts == ["an emoji of a red apple", "red apple", "an emoji of a noun0", "noun0", "adj0 emoji"]
    assert detector.to_json()["params"]["noun_templates"] == ["an emoji of a {}", "{}"]
    assert detector.to_json()["params"]["adj_templates"] == ["{} emoji"]


def test_templates_without_one_placeholder_are_refused_naming_the_parameter():
    with pytest.raises(ValueError,
                       match=r"adj_templates: each must contain exactly one '\{\}' .*; got \['\{\} \{\}'\]"):
        NegLabel(["a"], adj_templates=["{}", "{} {}"])
    with pytest.raises(ValueError, match="noun_templates"):
        NegLabel(["a"], noun_templates=[])
    with pytest.raises(TypeError, match="noun_templates: expected a template or a list of them, got None"):
        NegLabel(["a"], noun_templates=None)


def test_a_named_template_set_stays_a_name_until_fit():
    detector = NegLabel(["a"], noun_templates="imagenet80", ngroup=2)
    assert detector.to_json()["params"]["noun_templates"] == "imagenet80"  # not 80 strings in every artifact
    encoder = RecordingEncoder()
    detector.fit(encoder, TwoWordCorpus())
    assert len(encoder.calls) == 80 + 80 + 1 and encoder.calls[0] == ["a bad photo of a a."]
