"""Prompt templates: the CLIP ImageNet ensemble (HFTT), NegLabel's one-per-part-of-speech, and
prompt ensembling for detectors that take a list of templates (`encode_prompts`)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

NEGLABEL_NOUN_TEMPLATE = "the nice {}"
NEGLABEL_ADJ_TEMPLATE = "This is a {} photo"
HFTT_WORLD_TEMPLATE = "This is a photo of a {}."
MCM_TEMPLATE = "a photo of a {}."


def imagenet_templates() -> list[str]:
    """The 80 CLIP ImageNet templates, as format strings with one `{}`."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [template("{}") for template in OPENAI_IMAGENET_TEMPLATES]


def resolve_templates(templates: str | Sequence[str], field: str = "templates") -> list[str]:
    """`"imagenet80"`, a single template, or a list of them -> list of format strings. Errors
    name `field`, the parameter the templates came from."""
    if templates == "imagenet80":
        return imagenet_templates()
    if not isinstance(templates, (str, list, tuple)):
        raise TypeError(f"{field}: expected a template or a list of them, got {templates!r}")
    templates = [templates] if isinstance(templates, str) else list(templates)
    bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(f"{field}: each must contain exactly one '{{}}' (quote templates in YAML: "
                         f"'{{}} emoji'); got {bad or templates!r}")
    return templates


def checked_templates(templates: str | Sequence[str], field: str = "templates") -> str | list[str]:
    """Validate templates when a detector is built (at config load) and return them as given, for
    its params: `"imagenet80"` stays a name, neither expanded into 80 strings in every artifact
    and MLflow param nor importing open_clip before a model is needed (`resolve_templates` at fit)."""
    if templates == "imagenet80":
        return templates
    return resolve_templates(templates, field)


def fill(template: str, words: Sequence[str]) -> list[str]:
    return [template.format(word) for word in words]


def encode_prompts(encoder, templates: Sequence[str], words: Sequence[str]) -> np.ndarray:
    """Each word under every template -> float32 [n, d], CLIP's prompt ensembling: encode,
    normalise, average over templates, normalise (`hftt.task_embeddings`, here without holding all
    templates' rows at once, since NegLabel ensembles ~70k WordNet words). One `encode_text` call
    per template, so a text cache keeps each template's rows apart and reuses them across sets.

    With one template the encoder's rows come back unchanged (as float32, which encoders already
    return): a single-template detector (the reference NegLabel) computes exactly what it did
    before ensembles existed.
    """
    if len(templates) == 1:
        return np.asarray(encoder.encode_text(fill(templates[0], words)), dtype=np.float32)
    total = None
    for template in templates:
        rows = np.asarray(encoder.encode_text(fill(template, words)), dtype=np.float64)
        rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        total = rows if total is None else total + rows
    return (total / np.linalg.norm(total, axis=1, keepdims=True)).astype(np.float32)
