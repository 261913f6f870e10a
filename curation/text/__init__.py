"""Text side of the detectors: prompt templates, word corpora and the text-embedding cache."""
