"""Text-only detectors of unwanted images: HFTT, NegLabel and the MCM baseline.

Each follows a small estimator contract (see `base.Detector`): fit from text through an encoder
passed in by the caller, `score(image_embeddings)` -> unwanted score in [0, 1], `save`/`load`
as JSON + safetensors.
"""

from curation.detectors.base import Detector, load_detector
from curation.detectors.hftt import HFTT
from curation.detectors.mcm import MCM
from curation.detectors.neglabel import NegLabel

__all__ = ["Detector", "HFTT", "MCM", "NegLabel", "load_detector"]
