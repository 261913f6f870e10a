"""Deterministic emoji images in designer-drawn styles, with augmentation, and their captions.

Classic styles (the demo's images and emoji-clip v1's training world):
- "noto": Google's Noto Color Emoji (Debian `fonts-noto-color-emoji`), a bitmap font drawn at 109 px.
- "twemoji": Twitter's Twemoji 64 px PNGs from the npm package `emoji-datasource-twitter`
  (graphics CC-BY 4.0 by Twitter/X and contributors, package code MIT), installed outside the
  repository under `$CURATION_NPM_PREFIX` (default ~/.cache/curation/npm).
- "symbola": George Douros's Symbola (Debian `fonts-symbola`), monochrome outlines; single code
  points only (no ZWJ sequences, flags or keycaps), recoloured at random.

Iconify styles (`ICONIFY_STYLES`, emoji-clip v2 trains on all but `HELD_OUT_STYLE`): the emoji
sets of `curation.emoji.iconify`, SVGs rasterised by resvg, mapped onto the Unicode catalogue.

Every image is a pure function of (emoji, style, seed, index): the same arguments give the same
pixels on any machine with the same font files and packages.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

from curation.emoji import iconify
from curation.emoji.catalog import Emoji, load_catalog
from curation.progress import Progress

STYLES = ("noto", "twemoji", "symbola")
ICONIFY_STYLES = tuple(iconify.EMOJI_SETS)
ALL_STYLES = STYLES + ICONIFY_STYLES  # a style's position seeds its renders: append, never reorder
HELD_OUT_STYLE = "noto-v1"  # never trained on by emoji-clip v2: measures transfer to an unseen style
NOTO_FONT = Path(os.environ.get("CURATION_NOTO_FONT", "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"))
SYMBOLA_FONT = Path(os.environ.get("CURATION_SYMBOLA_FONT",
                                   "/usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf"))
TWEMOJI_NPM_PACKAGE = "emoji-datasource-twitter"
TWEMOJI_NPM_VERSION = "16.0.0"
NPM_PREFIX = iconify.NPM_PREFIX  # npm packages live outside the repository ($CURATION_NPM_PREFIX)
TWEMOJI_DIR = Path(os.environ.get(
    "CURATION_TWEMOJI_DIR", NPM_PREFIX / "node_modules" / TWEMOJI_NPM_PACKAGE / "img" / "twitter" / "64"))
NOTO_SIZE = 109  # the only size the CBDT bitmap font has
SYMBOLA_SIZE = 96
GLYPH_SIZE = 96  # longest side of a cached base glyph, px
IMAGE_SIZE = 64
_SOURCES = {
    "noto": (NOTO_FONT, "Debian package fonts-noto-color-emoji"),
    "symbola": (SYMBOLA_FONT, "Debian package fonts-symbola"),
    "twemoji": (TWEMOJI_DIR,
                f"npm install --prefix {NPM_PREFIX} --save-exact {TWEMOJI_NPM_PACKAGE}@{TWEMOJI_NPM_VERSION}"),
}


def check_style(style: str) -> None:
    """Fail early, naming what to install, when a style's files are missing."""
    if style not in ALL_STYLES:
        raise ValueError(f"unknown emoji style {style!r}. Available: {ALL_STYLES}")
    if style in ICONIFY_STYLES:
        iconify.load_set(style)  # raises with the npm command
        return
    path, how = _SOURCES[style]
    if not path.exists():
        raise FileNotFoundError(f"emoji style {style!r} needs {path}: install it with `{how}`")


# ---------------------------------------------------------------------------------------------- glyphs

@lru_cache(maxsize=None)
def _font(style: str) -> ImageFont.FreeTypeFont:
    check_style(style)
    return ImageFont.truetype(str(_SOURCES[style][0]), NOTO_SIZE if style == "noto" else SYMBOLA_SIZE)


def _symbola_mask(char: str) -> Image.Image:
    font = _font("symbola")
    left, top, right, bottom = font.getbbox(char)
    mask = Image.new("L", (max(1, right - left), max(1, bottom - top)), 0)
    ImageDraw.Draw(mask).text((-left, -top), char, font=font, fill=255)
    return mask


@lru_cache(maxsize=None)
def _symbola_notdef() -> bytes:
    return _symbola_mask(chr(0xE000)).tobytes()  # a private-use code point: Symbola draws .notdef


def _crop_to_content(image: Image.Image) -> Image.Image | None:
    box = image.getchannel("A").getbbox()
    if box is None:
        return None
    image = image.crop(box)
    scale = GLYPH_SIZE / max(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.LANCZOS)
    return image


def _noto_glyph(emoji: Emoji) -> Image.Image | None:
    font = _font("noto")
    left, top, right, bottom = font.getbbox(emoji.text)
    if right - left > 1.5 * NOTO_SIZE:  # not one ligature: the font (or raqm) lacks the sequence
        return None
    canvas = Image.new("RGBA", (right + 8, bottom + 8), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((4, 4), emoji.text, font=font, embedded_color=True)
    return _crop_to_content(canvas)


def _twemoji_glyph(emoji: Emoji) -> Image.Image | None:
    check_style("twemoji")
    for name in (emoji.id.lower(), "-".join(p for p in emoji.id.lower().split("-") if p != "fe0f")):
        path = TWEMOJI_DIR / f"{name}.png"
        if path.is_file():
            with Image.open(path) as image:
                return _crop_to_content(image.convert("RGBA"))
    return None


def _symbola_glyph(emoji: Emoji) -> Image.Image | None:
    codepoints = [cp for cp in emoji.codepoints if cp != 0xFE0F]
    if len(codepoints) != 1:
        return None
    alpha = _symbola_mask(chr(codepoints[0]))
    if alpha.tobytes() == _symbola_notdef():
        return None
    glyph = Image.new("RGBA", alpha.size, (0, 0, 0, 255))
    glyph.putalpha(alpha)
    return _crop_to_content(glyph)


@lru_cache(maxsize=None)
def _iconify_glyphs(style: str) -> dict[str, np.ndarray]:
    """emoji id -> cropped RGBA glyph of every catalogue emoji an Iconify set draws (one cached
    rasterisation of the whole set)."""
    names = iconify.emoji_icon_names(iconify.load_set(style), list(_catalog_by_id().values()))
    bank = iconify.glyph_bank([(style, name) for name in names.values()])
    return {emoji_id: bank[(style, name)] for emoji_id, name in names.items() if (style, name) in bank}


def _iconify_glyph(emoji: Emoji, style: str) -> Image.Image | None:
    pixels = _iconify_glyphs(style).get(emoji.id)
    return None if pixels is None else Image.fromarray(pixels, "RGBA")


_GLYPHS = {"noto": _noto_glyph, "twemoji": _twemoji_glyph, "symbola": _symbola_glyph}


def is_monochrome(style: str) -> bool:
    """Styles drawn in one colour (recoloured at random by the augmentation)."""
    return style == "symbola" or style in iconify.MONOCHROME_EMOJI_SETS


@lru_cache(maxsize=None)
def render_glyph(emoji: Emoji, style: str) -> Image.Image | None:
    """The emoji's base glyph (RGBA, cropped, longest side <= GLYPH_SIZE), or None when the style
    has no drawing of it. Cached per process; treat the image as read-only."""
    check_style(style)
    if style in ICONIFY_STYLES:
        return _iconify_glyph(emoji, style)
    return _GLYPHS[style](emoji)


# ------------------------------------------------------------------------------------- augmentation

@dataclass(frozen=True)
class Augment:
    """Probabilities and ranges of the augmentations (scales are fractions of the image side)."""

    scale: tuple[float, float] = (0.45, 0.95)
    rotate_p: float = 0.5
    rotate_deg: float = 25.0
    pair_p: float = 0.12
    recolour_p: float = 0.5  # monochrome glyphs only
    grayscale_p: float = 0.12
    posterize_p: float = 0.08
    edges_p: float = 0.08
    blur_p: float = 0.15
    noise_p: float = 0.2
    crop_p: float = 0.12  # show only 65-90% of the glyph's width and height


EVAL_AUGMENT = Augment(pair_p=0.0)


def _colour(rng: np.random.Generator, low: int = 0, high: int = 256) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(low, high, 3))


def _background(rng: np.random.Generator, size: int, light: bool) -> Image.Image:
    """White, grey, a solid colour, a two-colour gradient or smooth noise; `light` keeps it bright
    enough for a dark monochrome glyph to stay visible."""
    low = 150 if light else 0
    kind = rng.choice(5, p=[0.3, 0.15, 0.25, 0.18, 0.12])
    if kind == 0:
        return Image.new("RGB", (size, size), (255, 255, 255))
    if kind == 1:
        return Image.new("RGB", (size, size), (int(rng.integers(max(low, 180), 245)),) * 3)
    if kind == 2:
        return Image.new("RGB", (size, size), _colour(rng, low))
    if kind == 3:
        t = np.linspace(0.0, 1.0, size)[:, None, None]
        a, b = np.array(_colour(rng, low)), np.array(_colour(rng, low))
        grad = np.broadcast_to(a + (b - a) * t, (size, size, 3))
        return Image.fromarray(grad.astype(np.uint8)).rotate(float(rng.choice([0, 90])))
    coarse = rng.integers(low, 256, (4, 4, 3)).astype(np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.BICUBIC)


def _prepare(glyph: Image.Image, monochrome: bool, side: int, rng: np.random.Generator,
             aug: Augment) -> Image.Image:
    """Maybe cut to a part, recolour (monochrome), resize to `side` px on its longest side,
    maybe rotate."""
    if rng.random() < aug.crop_p:
        w, h = glyph.size
        cw, ch = int(w * rng.uniform(0.65, 0.9)), int(h * rng.uniform(0.65, 0.9))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        glyph = glyph.crop((x, y, x + cw, y + ch))
    if monochrome and rng.random() < aug.recolour_p:
        tinted = Image.new("RGBA", glyph.size, _colour(rng, 0, 140) + (255,))
        tinted.putalpha(glyph.getchannel("A"))
        glyph = tinted
    scale = side / max(glyph.size)
    glyph = glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))),
                         Image.LANCZOS)
    if rng.random() < aug.rotate_p:
        angle = float(np.clip(rng.normal(0.0, aug.rotate_deg / 2), -aug.rotate_deg, aug.rotate_deg))
        glyph = glyph.rotate(angle, resample=Image.BICUBIC, expand=True)
    return glyph


def _paste(canvas: Image.Image, glyph: Image.Image, box: tuple[int, int, int, int],
           rng: np.random.Generator) -> None:
    """Paste at a random position whose centre lies inside `box` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    cx = int(rng.integers(x0, max(x0 + 1, x1)))
    cy = int(rng.integers(y0, max(y0 + 1, y1)))
    canvas.paste(glyph, (cx - glyph.width // 2, cy - glyph.height // 2), glyph)


def _layout(n: int, size: int, rng: np.random.Generator, aug: Augment) -> list[tuple[int, tuple]]:
    """(side, centre box) per glyph: one glyph anywhere it mostly fits, or two side by side."""
    if n == 1:
        side = int(size * rng.uniform(*aug.scale))
        margin = max(0, (size - side) // 2) + side // 10
        return [(side, (size // 2 - margin, size // 2 - margin, size // 2 + margin + 1, size // 2 + margin + 1))]
    side = int(size * rng.uniform(0.38, 0.52))
    half = size // 2
    if rng.random() < 0.5:  # left | right
        return [(side, (half // 2 - 2, half - side // 2, half // 2 + 3, half + side // 2 + 1)),
                (side, (half + half // 2 - 2, half - side // 2, half + half // 2 + 3, half + side // 2 + 1))]
    return [(side, (half - side // 2, half // 2 - 2, half + side // 2 + 1, half // 2 + 3)),
            (side, (half - side // 2, half + half // 2 - 2, half + side // 2 + 1, half + half // 2 + 3))]


def _effects(image: Image.Image, rng: np.random.Generator, aug: Augment) -> Image.Image:
    """Style perturbations: grayscale, posterise, edges, blur, pixel noise."""
    size = image.width
    if rng.random() < aug.grayscale_p:
        image = ImageOps.grayscale(image).convert("RGB")
    if rng.random() < aug.posterize_p:
        image = ImageOps.posterize(image, int(rng.integers(2, 4)))
    if rng.random() < aug.edges_p:
        image = image.filter(ImageFilter.CONTOUR if rng.random() < 0.5 else ImageFilter.FIND_EDGES)
    if rng.random() < aug.blur_p:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.4, 1.3))))
    if rng.random() < aug.noise_p:
        pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, rng.uniform(3, 14), (size, size, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image


def compose(glyphs: Sequence[tuple[Image.Image, bool]], rng: np.random.Generator,
            size: int = IMAGE_SIZE, aug: Augment = Augment()) -> np.ndarray:
    """One augmented image of one or two glyphs -> uint8 array of shape (size, size, 3).

    `glyphs` holds (base glyph, is_monochrome) pairs from `render_glyph`.
    """
    light = any(mono for _, mono in glyphs)
    canvas = _background(rng, size, light).convert("RGBA")
    for (glyph, mono), (side, box) in zip(glyphs, _layout(len(glyphs), size, rng, aug)):
        _paste(canvas, _prepare(glyph, mono, side, rng, aug), box, rng)
    return np.asarray(_effects(canvas.convert("RGB"), rng, aug))


# ----------------------------------------------------------------------------------------- captions

def display_name(emoji: Emoji) -> str:
    """The CLDR name made readable in a sentence ("flag: Japan" -> "flag of Japan")."""
    head, sep, tail = emoji.name.partition(": ")
    if not sep:
        return emoji.name
    if head == "flag":
        return f"flag of {tail}"
    if head == "keycap":
        return f"keycap {tail}"
    return f"{head} with {tail}" if head in ("man", "woman", "person") else f"{head}, {tail}"


def _article(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" else "a"


NAME_TEMPLATES = ("an emoji of {a} {name}", "{name}", "{a} {name}", "a picture of {a} {name}",
                  "an icon of {a} {name}", "{name} emoji")
KEYWORD_TEMPLATES = ("{keyword}", "an emoji of {a} {keyword}", "{name}, {keyword}")


def name_captions(emoji: Emoji) -> list[str]:
    name = display_name(emoji)
    return [t.format(a=_article(name), name=name) for t in NAME_TEMPLATES]


def keyword_captions(emoji: Emoji) -> list[str]:
    """One caption per CLDR keyword (template chosen by position, so the list is deterministic)."""
    name = display_name(emoji)
    return [KEYWORD_TEMPLATES[i % len(KEYWORD_TEMPLATES)].format(keyword=k, a=_article(k), name=name)
            for i, k in enumerate(emoji.keywords)]


ICON_NAME_TEMPLATES = ("an icon of {a} {name}", "{name}", "a picture of {a} {name}")
ICON_KEYWORDS_MAX = 4  # aliases and categories per icon concept: a few, not mdi's dozens


def icon_name_captions(concept: iconify.IconConcept) -> list[str]:
    return [t.format(a=_article(concept.name), name=concept.name) for t in ICON_NAME_TEMPLATES]


def icon_keyword_captions(concept: iconify.IconConcept) -> list[str]:
    """Aliases as they are, then "<name>, <category>" (the category's last part, lower-case)."""
    categories = [c.split("/")[-1].strip().lower() for c in concept.categories]
    texts = list(concept.aliases) + [f"{concept.name}, {c}" for c in categories if c and c != concept.name]
    return texts[:ICON_KEYWORDS_MAX]


def captions(emoji: Emoji) -> list[str]:
    """Generic captions from the name and CLDR keywords only (nothing about any demo task)."""
    return name_captions(emoji) + keyword_captions(emoji)


# ------------------------------------------------------------------------------------- evaluation set

@lru_cache(maxsize=1)
def _catalog_by_id() -> dict[str, Emoji]:
    return {e.id: e for e in load_catalog(skin_tones=True)}


def lookup(emoji_ids: Iterable[str]) -> list[Emoji]:
    """Catalog entries for ids, failing on unknown ones."""
    by_id = _catalog_by_id()
    unknown = [i for i in emoji_ids if i not in by_id]
    if unknown:
        raise KeyError(f"unknown emoji ids {unknown[:5]} (ids are code points joined by '-', e.g. 1F52B)")
    return [by_id[i] for i in emoji_ids]


def render_image(emoji: Emoji, style: str, seed: int, index: int, size: int = IMAGE_SIZE,
                 aug: Augment = EVAL_AUGMENT) -> np.ndarray | None:
    """One augmented single-emoji image, a pure function of its arguments (None: no such glyph)."""
    glyph = render_glyph(emoji, style)
    if glyph is None:
        return None
    rng = np.random.default_rng([seed, index, ALL_STYLES.index(style), *emoji.codepoints])
    return compose([(glyph, is_monochrome(style))], rng, size, aug)


def write_eval_set(directory: str | Path, emoji_ids: Sequence[str], style: str, n_per_emoji: int,
                   seed: int, size: int = IMAGE_SIZE) -> list[Path]:
    """Write `n_per_emoji` fresh augmented renders (no pairs) of each emoji as PNG files.

    `style` is one of ALL_STYLES or "mixed" (render k uses classic style k mod 3, skipping styles
    that lack the emoji). Emoji a style cannot draw are skipped. Files are named
    `<emoji id>_<style>_<k>.png`; returns their paths in order.
    """
    styles = STYLES if style == "mixed" else (style,)
    for name in styles:
        check_style(name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    emojis = lookup(emoji_ids)
    with Progress(f"rendering {directory}", len(emojis), "emoji") as progress:
        for emoji in emojis:
            usable = [s for s in styles if render_glyph(emoji, s) is not None]
            for k in range(n_per_emoji if usable else 0):
                chosen = usable[k % len(usable)]
                pixels = render_image(emoji, chosen, seed, k, size)
                path = directory / f"{emoji.id}_{chosen}_{k:03d}.png"
                Image.fromarray(pixels).save(path)
                written.append(path)
            progress.update(1, images=len(written))
    return written
