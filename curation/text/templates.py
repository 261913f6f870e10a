"""Prompt templates: the CLIP ImageNet ensemble (HFTT) and NegLabel's one-per-part-of-speech."""

from __future__ import annotations

from typing import Sequence

NEGLABEL_NOUN_TEMPLATE = "the nice {}"
NEGLABEL_ADJ_TEMPLATE = "This is a {} photo"
HFTT_WORLD_TEMPLATE = "This is a photo of a {}."
MCM_TEMPLATE = "a photo of a {}."


def imagenet_templates() -> list[str]:
    """The 80 CLIP ImageNet templates, as format strings with one `{}`."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [template("{}") for template in OPENAI_IMAGENET_TEMPLATES]


def resolve_templates(templates: str | Sequence[str]) -> list[str]:
    """`"imagenet80"`, a single template, or a list of them -> list of format strings."""
    if templates == "imagenet80":
        return imagenet_templates()
    templates = [templates] if isinstance(templates, str) else list(templates)
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(f"templates: each must contain exactly one '{{}}'; got {bad or templates!r}")
    return templates


def fill(template: str, words: Sequence[str]) -> list[str]:
    return [template.format(word) for word in words]
