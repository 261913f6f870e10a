"""MCM baseline: maximum softmax over the task labels' text embeddings (algorithms.md, "MCM")."""

from __future__ import annotations

from typing import Sequence

from curation.detectors.base import Detector, as_float_tensor
from curation.text.templates import MCM_TEMPLATE, fill


def mcm_scores(image_emb, label_emb, temperature: float = 0.01):
    """max_k softmax(x . E^T / T) per image [B]."""
    import torch

    image_emb = as_float_tensor(image_emb, "image_emb")
    label_emb = as_float_tensor(label_emb, "label_emb", image_emb.shape[1]).to(image_emb.dtype)
    return torch.softmax(image_emb @ label_emb.T / temperature, dim=1).amax(dim=1)


class MCM(Detector):
    """side="wanted": unwanted = 1 - max softmax over the wanted labels. side="unwanted": the task
    texts play the ID labels, as in the papers' hateful-image tables, and the unwanted score is the
    max softmax itself. A single label always gets softmax 1, so MCM needs at least two."""

    kind = "mcm"
    params = ("template", "temperature")

    def __init__(self, task_texts: Sequence[str], side: str = "wanted", name: str | None = None,
                 threshold: float | None = None, template: str = MCM_TEMPLATE, temperature: float = 0.01):
        super().__init__(task_texts, side, name, threshold)
        if len(self.task_texts) < 2:
            raise ValueError("MCM needs at least two task texts: with one, every image scores 1")
        self.template, self.temperature = template, temperature

    def fit(self, encoder, corpus=None) -> "MCM":
        """Task texts only (`corpus_kind` None)."""
        return self.fit_embeddings(encoder.encode_text(fill(self.template, self.task_texts)), encoder.identity)

    def fit_embeddings(self, label_emb, model_identity: str) -> "MCM":
        self.label_emb = as_float_tensor(label_emb, "label_emb").float()
        self.model_identity_ = model_identity
        return self

    def _tensors(self):
        return {"label_emb": self.label_emb}

    def _score(self, image_emb, state):
        top = mcm_scores(image_emb, state["label_emb"], self.temperature)
        return 1.0 - top if self.side == "wanted" else top
