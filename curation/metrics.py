"""Detection metrics with the conventions of the published OOD tables.

Every function takes `labels` with 1 = positive and scores where higher = more positive; which
side is positive is the caller's statement (our default: unwanted = positive).
"""

from __future__ import annotations

import numpy as np


def _as_binary(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels differ in length: {scores.shape[0]} vs {labels.shape[0]}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 or 1 (1 = positive)")
    labels = labels.astype(bool)
    if labels.all() or not labels.any():
        raise ValueError("need at least one positive and one negative label")
    return scores, labels


def auroc(scores, labels) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks: ties count half)."""
    scores, labels = _as_binary(scores, labels)
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average rank per tie group
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    n_pos, n_neg = labels.sum(), (~labels).sum()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def fpr_at_tpr(scores, labels, tpr: float = 0.95) -> float:
    """False-positive rate at the operating point whose recall is closest to `tpr`.

    The routine both reference repositories share (Hendrycks' `fpr_and_fdr_at_recall`): thresholds
    at distinct scores, the curve truncated at the first point of full recall, reversed, with
    (recall 1, fp 0) appended; first point on ties. Kept exactly so numbers compare with papers.
    """
    scores, labels = _as_binary(scores, labels)
    order = np.argsort(scores, kind="mergesort")[::-1]
    scores, labels = scores[order], labels[order]
    threshold_idx = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tps = np.cumsum(labels)[threshold_idx]
    fps = 1 + threshold_idx - tps
    recall = tps / tps[-1]
    last = tps.searchsorted(tps[-1])
    recall = np.r_[recall[last::-1], 1.0]
    fps = np.r_[fps[last::-1], 0]
    cutoff = np.argmin(np.abs(recall - tpr))
    return float(fps[cutoff] / (~labels).sum())


def threshold_at_tpr(scores, labels, tpr: float = 0.95) -> float:
    """Smallest score threshold (score >= t is positive) that flags at least `tpr` of positives.

    Used by the `tpr` threshold strategy: with unwanted = positive, it removes at least `tpr` of
    the labelled unwanted images; `fpr_at_tpr` then tells the wanted images lost.
    """
    scores, labels = _as_binary(scores, labels)
    positives = np.sort(scores[labels])[::-1]
    needed = int(np.ceil(tpr * len(positives)))
    return float(positives[max(needed, 1) - 1])


def threshold_for_rate(scores, rate: float) -> float:
    """Smallest threshold (score >= t flagged) that flags at most `rate` of `scores` (ties are
    never split): the `quantile` threshold strategy, and the report's "what would remove 1%"."""
    ordered = np.sort(np.asarray(scores, dtype=np.float32).ravel())[::-1]
    allowed = int(np.floor(rate * len(ordered)))
    if allowed >= len(ordered):
        return float(ordered[-1]) if len(ordered) else 0.0
    return float(np.nextafter(np.float32(ordered[allowed]), np.float32(np.inf)))


class ScoreHistogram:
    """Counts of unwanted scores in `bins` equal bins over [0, 1], and how many reached `threshold`
    (exact, not from the bins). Mergeable: a run adds per-batch histograms instead of keeping every
    score, so the driver's memory does not grow with the dataset."""

    def __init__(self, threshold: float | None = None, bins: int = 50):
        self.threshold, self.bins = threshold, bins
        self.counts = np.zeros(bins, np.int64)
        self.flagged = 0

    @classmethod
    def of(cls, scores, threshold: float | None = None, bins: int = 50) -> "ScoreHistogram":
        return cls(threshold, bins).add(scores)

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(0.0, 1.0, self.bins + 1)

    def add(self, scores) -> "ScoreHistogram":
        scores = np.asarray(scores).ravel()
        scores = scores[np.isfinite(scores)]
        if self.threshold is not None:  # in the scores' own dtype, as `decide` compares them
            self.flagged += int((scores >= self.threshold).sum())
        self.counts += np.histogram(np.clip(scores.astype(np.float64), 0.0, 1.0), bins=self.bins, range=(0.0, 1.0))[0]
        return self

    def merge(self, other: "ScoreHistogram") -> "ScoreHistogram":
        if (other.bins, other.threshold) != (self.bins, self.threshold):
            raise ValueError("histograms with different bins or thresholds do not merge")
        self.counts += other.counts
        self.flagged += other.flagged
        return self

    def merge_counts(self, counts, flagged: int) -> "ScoreHistogram":
        """Merge bin counts and a flagged count computed elsewhere (e.g. in a Ray worker) with the
        same bins and threshold."""
        if len(counts) != self.bins:
            raise ValueError(f"{len(counts)} bin counts do not merge into {self.bins} bins")
        self.counts += np.asarray(counts, np.int64)
        self.flagged += int(flagged)
        return self

    @property
    def removal_rate(self) -> float:
        return self.flagged / self.n if self.n else 0.0


def score_histograms(thresholds: dict[str, float]) -> dict[str, ScoreHistogram]:
    """A run's empty histograms, one per detector at its threshold."""
    return {name: ScoreHistogram(value) for name, value in thresholds.items()}


def histogram_payload(scores: dict[str, np.ndarray], thresholds: dict[str, float]) -> dict[str, dict]:
    """Worker side of a run's histograms: per detector, the bin counts and exact flagged count of
    `scores[name]` (the decided items' scores), JSON-ready, for `merge_histogram_payload`."""
    out = {}
    for name, threshold in thresholds.items():
        histogram = ScoreHistogram.of(scores[name], threshold)
        out[name] = {"counts": histogram.counts.tolist(), "flagged": histogram.flagged}
    return out


def merge_histogram_payload(histograms: dict[str, ScoreHistogram], payload: dict[str, dict]) -> None:
    """Driver side: add a worker's `histogram_payload` into the run's histograms (in place)."""
    for name, part in payload.items():
        histograms[name].merge_counts(part["counts"], part["flagged"])
