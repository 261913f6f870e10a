"""NegLabel: zero-shot detection with mined negative labels (algorithms.md, "NegLabel").

NegMining keeps the WordNet words least similar to the wanted labels (by the 95th percentile of
their similarities); an image is scored by the softmax mass on the wanted labels against groups
of negatives. Grouping uses a seeded CPU permutation so scores do not depend on the device.
"""

from __future__ import annotations

import json
import logging
import math
from typing import TYPE_CHECKING, Callable, Sequence

from curation.detectors.base import Detector, as_float_tensor
from curation.progress import Progress
from curation.text.templates import (NEGLABEL_ADJ_TEMPLATE, NEGLABEL_NOUN_TEMPLATE, checked_templates, encode_prompts,
                                     resolve_templates)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from curation.text.corpora import WordNetCorpus

log = logging.getLogger("curation.detectors")
_QUANTILE_ROWS = 8192  # torch.quantile refuses inputs over 2**24 elements


def _percentile_similarity(candidates: "torch.Tensor", id_emb: "torch.Tensor", percentile: float,
                           on_rows: Callable[[int], None] | None = None):
    import torch

    out = []
    for chunk in candidates.split(_QUANTILE_ROWS):
        out.append(torch.quantile(chunk @ id_emb.T, percentile, dim=1, interpolation="linear"))
        if on_rows is not None:
            on_rows(len(chunk))
    return torch.cat(out)


def _select_farthest(candidates, id_emb, percentile: float, fraction: float,
                     on_rows: Callable[[int], None] | None = None) -> "torch.Tensor":
    import torch

    if len(candidates) == 0:
        return torch.zeros(0, dtype=torch.long)
    distance = _percentile_similarity(candidates, id_emb, percentile, on_rows)
    return torch.argsort(distance, stable=True)[: math.floor(fraction * len(candidates))]


def mine_negatives(id_emb, noun_emb, adj_emb, percentile: float = 0.95, fraction: float = 0.15,
                   on_rows: Callable[[int], None] | None = None):
    """NegMining -> (noun_idx, adj_idx), each in selection order (ascending percentile similarity).

    id_emb [K, d], noun_emb [Nn, d], adj_emb [Na, d]; keeps floor(fraction * n) of each part of speech.
    `on_rows(n)` is called as each chunk of n candidates is measured (progress of a long mining).
    """
    id_emb = as_float_tensor(id_emb, "id_emb")
    dim = id_emb.shape[1]
    noun_emb = as_float_tensor(noun_emb, "noun_emb", dim).to(id_emb.dtype)
    adj_emb = as_float_tensor(adj_emb, "adj_emb", dim).to(id_emb.dtype)
    if not 0.0 <= percentile <= 1.0 or not 0.0 < fraction <= 1.0:
        raise ValueError(f"percentile must be in [0, 1] and fraction in (0, 1], got {percentile}, {fraction}")
    return (_select_farthest(noun_emb, id_emb, percentile, fraction, on_rows),
            _select_farthest(adj_emb, id_emb, percentile, fraction, on_rows))


def group_permutation(n_negatives: int, ngroup: int, seed: int = 0) -> "torch.Tensor":
    """Indices of the negatives used, permuted and laid out as [ngroup, n_negatives // ngroup]."""
    import torch

    if ngroup < 1 or n_negatives < ngroup:
        raise ValueError(f"need at least ngroup={ngroup} negatives, got {n_negatives}")
    used = n_negatives - n_negatives % ngroup
    return torch.randperm(used, generator=torch.Generator().manual_seed(seed)).view(ngroup, -1)


def neglabel_scores(image_emb, id_emb, neg_emb, temperature: float = 0.01, ngroup: int = 100,
                    seed: int = 0) -> "torch.Tensor":
    """ID-ness [B] in [0, 1]: mean over negative groups of the softmax mass on the ID labels."""
    import torch

    image_emb = as_float_tensor(image_emb, "image_emb")
    dim = image_emb.shape[1]
    id_emb = as_float_tensor(id_emb, "id_emb", dim).to(image_emb.dtype)
    neg_emb = as_float_tensor(neg_emb, "neg_emb", dim).to(image_emb.dtype)
    groups = group_permutation(len(neg_emb), ngroup, seed).to(neg_emb.device)
    pos_lse = torch.logsumexp(image_emb @ id_emb.T / temperature, dim=1)  # [B]
    neg_logits = image_emb @ neg_emb.T / temperature  # [B, M]
    neg_lse = torch.logsumexp(neg_logits[:, groups], dim=2)  # [B, ngroup]
    id_mass = (pos_lse[:, None] - torch.logaddexp(pos_lse[:, None], neg_lse)).exp()
    return id_mass.mean(dim=1)


class NegLabel(Detector):
    """NegLabel detector. side="wanted": task texts are the ID labels, unwanted = 1 - ID-ness.
    side="unwanted": task texts describe the concept to remove, unwanted = its ID-ness.

    `noun_templates` (ID labels and negative nouns) and `adj_templates` (negative adjectives)
    default to the reference's one template each ("the nice {}", "This is a {} photo"). A list
    ensembles the templates (`encode_prompts`): for images that are not photos, prompts in the
    words the model was trained on measure better (README, "emoji-clip v2", Prompts: the emoji
    evaluation configs)."""

    kind = "neglabel"
    corpus_kind = "wordnet"
    params = ("percentile", "fraction", "temperature", "ngroup", "seed", "noun_lexnames", "adj_lexnames",
              "noun_templates", "adj_templates")

    def __init__(self, task_texts: Sequence[str], side: str = "wanted", name: str | None = None,
                 threshold: float | None = None, percentile: float = 0.95, fraction: float = 0.15,
                 temperature: float = 0.01, ngroup: int = 100, seed: int = 0,
                 noun_lexnames: Sequence[str] | None = None, adj_lexnames: Sequence[str] | None = None,
                 noun_templates: str | Sequence[str] = NEGLABEL_NOUN_TEMPLATE,
                 adj_templates: str | Sequence[str] = NEGLABEL_ADJ_TEMPLATE):
        super().__init__(task_texts, side, name, threshold)
        self.percentile, self.fraction, self.temperature = percentile, fraction, temperature
        self.ngroup, self.seed = ngroup, seed
        self.noun_lexnames = list(noun_lexnames) if noun_lexnames is not None else None
        self.adj_lexnames = list(adj_lexnames) if adj_lexnames is not None else None
        self.noun_templates = checked_templates(noun_templates, "noun_templates")
        self.adj_templates = checked_templates(adj_templates, "adj_templates")

    def corpus_source(self, corpus: str) -> tuple:
        """WordNet is the one corpus (`corpus` is not read); the candidates follow the lexnames as
        `fit` resolves them, the prompts the templates."""
        nouns, adjs = self._lexnames()
        return (self.corpus_kind, nouns, adjs, json.dumps([self.noun_templates, self.adj_templates]))

    def _lexnames(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(noun, adjective) lexicographer files: the defaults unless given (no adjectives: [])."""
        from curation.text import corpora

        return (tuple(self.noun_lexnames or corpora.DEFAULT_NOUN_LEXNAMES),
                tuple(self.adj_lexnames if self.adj_lexnames is not None else corpora.DEFAULT_ADJ_LEXNAMES))

    def fit(self, encoder, corpus: "WordNetCorpus") -> "NegLabel":
        """Encode ID labels and the WordNet candidates this detector's lexnames select from
        `corpus` with `encoder`, then mine the negatives."""
        nouns, adjs = corpus.candidates(*self._lexnames())
        noun_templates = resolve_templates(self.noun_templates, "noun_templates")
        adj_templates = resolve_templates(self.adj_templates, "adj_templates")
        log.info("NegLabel detector %r: encoding %d labels, %d WordNet nouns (%d templates) and %d "
                 "adjectives (%d templates)", self.name, len(self.task_texts), len(nouns),
                 len(noun_templates), len(adjs), len(adj_templates))
        return self.fit_embeddings(
            encode_prompts(encoder, noun_templates, self.task_texts),
            encode_prompts(encoder, noun_templates, nouns),
            encode_prompts(encoder, adj_templates, adjs) if adjs else [],
            nouns, adjs, encoder.identity)

    def fit_embeddings(self, id_emb, noun_emb, adj_emb, nouns: Sequence[str], adjs: Sequence[str],
                       model_identity: str) -> "NegLabel":
        """Mine negatives from precomputed prompt embeddings of `model_identity`."""
        import torch

        id_emb = as_float_tensor(id_emb, "id_emb")
        dim = id_emb.shape[1]
        noun_emb = as_float_tensor(noun_emb, "noun_emb", dim)
        adj_emb = as_float_tensor(adj_emb, "adj_emb", dim) if len(adj_emb) else id_emb.new_zeros(0, dim)
        with Progress(f"mining NegLabel negatives for {self.name!r}", len(noun_emb) + len(adj_emb),
                      "candidates") as progress:
            noun_idx, adj_idx = mine_negatives(id_emb, noun_emb, adj_emb, self.percentile, self.fraction,
                                               progress.update)
        self.id_emb = id_emb.float()
        self.neg_emb = torch.cat([noun_emb[noun_idx], adj_emb[adj_idx]]).float()
        group_permutation(len(self.neg_emb), self.ngroup, self.seed)  # fail at fit, not at score
        self.negative_labels_ = [nouns[i] for i in noun_idx.tolist()] + [adjs[i] for i in adj_idx.tolist()]
        self.model_identity_ = model_identity
        self.provenance_ = {"n_candidates": {"nouns": len(nouns), "adjectives": len(adjs)},
                            "n_negatives": len(self.negative_labels_),
                            "negative_labels": self.negative_labels_}
        return self

    def _tensors(self):
        return {"id_emb": self.id_emb, "neg_emb": self.neg_emb}

    def _score(self, image_emb, state):
        id_ness = neglabel_scores(image_emb, state["id_emb"], state["neg_emb"], self.temperature,
                                  self.ngroup, self.seed)
        return 1.0 - id_ness if self.side == "wanted" else id_ness
