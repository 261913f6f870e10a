"""The detector contract shared by HFTT, NegLabel and MCM, and its JSON + safetensors artifact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

SIDES = ("wanted", "unwanted")
ARTIFACT_JSON = "detector.json"
ARTIFACT_TENSORS = "tensors.safetensors"


def validate_task_texts(texts: Sequence[str]) -> list[str]:
    """Task texts must be a non-empty list of distinct, non-blank strings."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"task_texts must be a list of strings, got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise ValueError("task_texts is empty: give at least one wanted label or unwanted concept")
    blank = [i for i, text in enumerate(texts) if not isinstance(text, str) or not text.strip()]
    if blank:
        raise ValueError(f"task_texts has blank or non-string entries at positions {blank}")
    seen, dupes = set(), []
    for text in texts:
        key = text.strip().lower()
        if key in seen:
            dupes.append(text)
        seen.add(key)
    if dupes:
        raise ValueError(f"task_texts has duplicate labels: {sorted(set(dupes))}")
    return [text.strip() for text in texts]


def as_float_tensor(array, name: str, dim: int | None = None) -> "torch.Tensor":
    """numpy or torch [n, d] -> torch tensor, keeping float32/float64 (ints become float32)."""
    import torch

    tensor = torch.as_tensor(array)
    if not tensor.is_floating_point():
        tensor = tensor.float()
    if tensor.ndim != 2:
        raise ValueError(f"{name} must have shape [n, d], got {tuple(tensor.shape)}")
    if dim is not None and tensor.shape[1] != dim:
        raise ValueError(f"{name} has dimension {tensor.shape[1]} but the detector was fitted on "
                         f"{dim}-d embeddings: they come from a different model")
    return tensor


class Detector:
    """Estimator contract: `__init__` stores arguments, `fit` learns from text, `score` returns an
    unwanted score in [0, 1] per image embedding row.

    Subclasses set `kind`, list their hyper-parameters in `params`, say which text besides the task
    texts they learn from in `corpus_kind`, implement `fit`, `_score` (the raw math on a tensor)
    and `_tensors` (fitted state to persist).

    Every kind is fitted the same way, `fit(encoder, corpus)`, where the job hands in the corpus
    `curation.text.corpora.load_corpus(corpus_kind, ...)` returns: None, a `WordCorpus` (the word
    list that `DetectorConfig.corpus` names) or the `WordNetCorpus`. A detector reads no text
    source itself, so the job and the artifact cache treat all kinds alike.
    """

    kind: ClassVar[str]
    version: ClassVar[int] = 1
    params: ClassVar[tuple[str, ...]] = ()
    corpus_kind: ClassVar[str | None] = None  # None, "word_list" or "wordnet"
    registry: ClassVar[dict[str, type["Detector"]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Detector.registry[cls.kind] = cls

    def __init__(self, task_texts: Sequence[str], side: str = "wanted", name: str | None = None,
                 threshold: float | None = None):
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        self.task_texts = validate_task_texts(task_texts)
        self.side = side
        self.name = name or self.kind
        self.threshold = threshold
        self.model_identity_: str | None = None
        self.provenance_: dict[str, Any] = {}

    def fit(self, encoder, corpus=None) -> "Detector":
        """Learn from the task texts (and `corpus`, see `corpus_kind`) encoded by `encoder`."""
        raise NotImplementedError

    def corpus_source(self, corpus: str) -> tuple | None:
        """What fixes the corpus texts `fit` encodes besides the task texts (None: it encodes none),
        given `DetectorConfig.corpus`. Detectors with equal sources encode identical corpus shards,
        so the job fits them one after the other and the later ones read the shards from the text
        cache (`detectors.cache.fit_chains`). A word list is named by the config; kinds whose
        corpus texts depend on their params say so by overriding this."""
        return None if self.corpus_kind is None else (self.corpus_kind, corpus)

    # -- fitted state -------------------------------------------------------------------------
    def _tensors(self) -> dict[str, "torch.Tensor"]:
        raise NotImplementedError

    def _set_tensors(self, tensors: dict[str, "torch.Tensor"]) -> None:
        for key, value in tensors.items():
            setattr(self, key, value)

    def _check_fitted(self) -> None:
        if self.model_identity_ is None:
            raise RuntimeError(f"{type(self).__name__} {self.name!r} is not fitted: call fit() or load()")

    @property
    def dim_(self) -> int:
        self._check_fitted()
        return int(next(iter(self._tensors().values())).shape[1])

    # -- scoring ------------------------------------------------------------------------------
    def _score(self, image_emb: "torch.Tensor", state: dict[str, "torch.Tensor"]) -> "torch.Tensor":
        """Unwanted score from embeddings and fitted tensors, both in the input's dtype."""
        raise NotImplementedError

    def score(self, image_embeddings, model_identity: str | None = None) -> np.ndarray:
        """Unwanted score in [0, 1] for image embeddings [n, d] (higher = remove).

        Pass `model_identity` to refuse embeddings from an encoder other than the one fitted on.
        """
        self._check_fitted()
        if model_identity is not None and model_identity != self.model_identity_:
            raise ValueError(f"detector {self.name!r} was fitted with model {self.model_identity_!r}, "
                             f"embeddings come from {model_identity!r}")
        emb = as_float_tensor(image_embeddings, "image_embeddings", self.dim_)
        state = {k: v.to(emb.dtype) for k, v in self._tensors().items()}
        return self._score(emb, state).clamp(0.0, 1.0).cpu().numpy()

    # -- artifact -----------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "version": self.version, "name": self.name, "side": self.side,
            "task_texts": self.task_texts, "threshold": self.threshold,
            "params": {p: getattr(self, p) for p in self.params},
            "model_identity": self.model_identity_, "provenance": self.provenance_,
        }

    def save(self, directory: str | Path) -> Path:
        """Write `detector.json` + `tensors.safetensors` (never pickle) into `directory`."""
        from safetensors.torch import save_file

        self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self._tensors().items()}
        save_file(tensors, str(directory / ARTIFACT_TENSORS))
        (directory / ARTIFACT_JSON).write_text(json.dumps(self.to_json(), indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path, model_identity: str | None = None) -> "Detector":
        return load_detector(directory, model_identity)


def load_detector(directory: str | Path, model_identity: str | None = None) -> Detector:
    """Rebuild a detector from its artifact; refuse one fitted on another model."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path = directory / ARTIFACT_JSON
    if not meta_path.exists():
        raise FileNotFoundError(f"{directory} is not a detector artifact: {ARTIFACT_JSON} is missing")
    meta = json.loads(meta_path.read_text())
    kind = meta.get("kind")
    if kind not in Detector.registry:
        raise ValueError(f"{meta_path}: unknown detector kind {kind!r}; known: {sorted(Detector.registry)}")
    if model_identity is not None and meta["model_identity"] != model_identity:
        raise ValueError(f"{directory} holds a detector fitted with model {meta['model_identity']!r}, "
                         f"not {model_identity!r}: refit it for this model")
    detector = Detector.registry[kind](meta["task_texts"], side=meta["side"], name=meta["name"],
                                       threshold=meta["threshold"], **meta["params"])
    detector._set_tensors(load_file(str(directory / ARTIFACT_TENSORS)))
    detector.model_identity_ = meta["model_identity"]
    detector.provenance_ = meta.get("provenance", {})
    return detector


def detector_to_files(detector: Detector) -> dict[str, bytes]:
    """The artifact as {file name: bytes}: how fitted detectors travel between Ray workers."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        detector.save(tmp)
        return {name: (Path(tmp) / name).read_bytes() for name in (ARTIFACT_JSON, ARTIFACT_TENSORS)}


def artifact_checksums(files: dict[str, bytes]) -> dict[str, str]:
    """{file name: sha256} of an artifact: what the detector cache and the Model Registry check
    an artifact against before trusting it."""
    import hashlib

    return {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}


def detector_from_files(files: dict[str, bytes], model_identity: str | None = None) -> Detector:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        return load_detector(tmp, model_identity)
