"""Text-only detectors of unwanted images: HFTT, NegLabel and the MCM baseline.

Each follows a small estimator contract (see `base.Detector`): fit from text through an encoder
passed in by the caller, `score(image_embeddings)` -> unwanted score in [0, 1], `save`/`load`
as JSON + safetensors.
"""

from curation.detectors.base import Detector, load_detector

__all__ = ["Detector", "load_detector"]
