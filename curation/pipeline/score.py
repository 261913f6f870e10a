"""Turn image embeddings into decisions: every detector's unwanted score, then keep/remove.

An item is removed when any detector's score reaches that detector's threshold; `fired` names the
detectors that did. Pure numpy on arrays, shared by the curate stream and by rescoring stored
embeddings.
"""

from __future__ import annotations

import numpy as np

from curation.detectors.base import Detector


def decide(embeddings: np.ndarray, ok: np.ndarray, detectors: list[Detector],
           thresholds: dict[str, float]) -> dict[str, np.ndarray]:
    """Columns `score_<name>`, `decision` ("keep" | "remove" | "failed") and `fired` for a batch.

    embeddings [n, d]; ok [n] marks items that decoded (the rest get NaN scores, "failed").
    """
    n = len(ok)
    fired = [[] for _ in range(n)]
    columns: dict[str, np.ndarray] = {}
    for detector in detectors:
        scores = np.full(n, np.nan, np.float32)
        if ok.any():
            scores[ok] = detector.score(embeddings[ok])
        columns[f"score_{detector.name}"] = scores
        for i in np.flatnonzero(ok & (scores >= thresholds[detector.name])):
            fired[i].append(detector.name)
    decision = np.where(ok, np.where([bool(f) for f in fired], "remove", "keep"), "failed")
    columns["decision"] = decision.astype(object)
    columns["fired"] = np.array([",".join(f) for f in fired], dtype=object)
    return columns
