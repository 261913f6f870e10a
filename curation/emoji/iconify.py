"""Iconify icon sets (npm `@iconify-json/*`) as emoji-clip v2's training world: more styles of the
same emoji, and many more named concepts (captioned from icon names, aliases and categories).

Every set is an npm package installed by `.ci/setup` outside the repository, under
`$CURATION_NPM_PREFIX/node_modules/@iconify-json/<prefix>/` (`icons.json`: SVG bodies keyed by
name; `chars.json`: code points -> name for some emoji sets; `metadata.json`: categories and
variant suffixes). SVGs are rasterised in process by resvg (`resvg-py`), without system fonts, so
the same package versions give the same pixels on any machine.

Emoji sets are mapped onto the Unicode catalogue (code points from `chars.json`, else the CLDR
name written as Iconify writes names: "grinning face" -> "grinning-face"); icons that match no
catalogue emoji are not used, so a held-out emoji cannot enter training under another name.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from curation.emoji.catalog import Emoji

ICONIFY_SCOPE = "@iconify-json"
EMOJI_SETS = {  # prefix -> pinned npm version
    "fluent-emoji": "1.2.7", "fluent-emoji-flat": "1.2.6", "fluent-emoji-high-contrast": "1.2.6",
    "emojione": "1.2.3", "emojione-v1": "1.2.3", "noto-v1": "1.2.5", "streamline-emojis": "1.2.4",
}
ICON_SETS = {
    "mdi": "1.2.3", "tabler": "1.2.41", "game-icons": "1.2.4", "ph": "1.2.2", "lucide": "1.2.137",
    "material-symbols": "1.2.98", "healthicons": "1.2.13", "icon-park": "1.2.4", "fa6-solid": "1.2.4",
}
MONOCHROME_EMOJI_SETS = frozenset({"fluent-emoji-high-contrast"})
GLYPH_SIZE = 72  # rasterised side, px: the 64-px training canvas never shows a glyph larger
# Variant words that name a drawing style of one concept ("bell-outline", "heart-fill", "ph:cat-bold").
VARIANT_SUFFIXES = ("outline-rounded", "outline-sharp", "outline", "outlined", "rounded", "sharp", "filled",
                    "fill", "solid", "bold", "thin", "light", "duotone", "negative", "24px", "regular")
_NUMBERED = re.compile(r"-(\d+|one|two|three|alt)$")


NPM_PREFIX = Path(os.environ.get("CURATION_NPM_PREFIX", Path.home() / ".cache" / "curation" / "npm"))


def iconify_dir() -> Path:
    return NPM_PREFIX / "node_modules" / ICONIFY_SCOPE


def npm_specs(prefixes: Iterable[str] | None = None) -> list[str]:
    """Pinned npm package specs ("@iconify-json/mdi@1.2.3"), every set by default."""
    pins = {**EMOJI_SETS, **ICON_SETS}
    return [f"{ICONIFY_SCOPE}/{p}@{pins[p]}" for p in (pins if prefixes is None else prefixes)]


def missing_specs() -> list[str]:
    """The specs of the sets not installed at their pinned version (what `.ci/setup` installs)."""
    missing = []
    for prefix, version in {**EMOJI_SETS, **ICON_SETS}.items():
        package = iconify_dir() / prefix / "package.json"
        if not package.is_file() or json.loads(package.read_text()).get("version") != version:
            missing.extend(npm_specs([prefix]))
    return missing


def npm_install_command(prefixes: Iterable[str] | None = None) -> str:
    """The install command for error messages and the README."""
    return f"npm install --prefix {NPM_PREFIX} --no-audit --no-fund --save-exact {' '.join(npm_specs(prefixes))}"


@dataclass(frozen=True)
class IconSet:
    """One Iconify JSON package, as read from disk."""

    prefix: str
    version: str
    license: str
    width: int
    height: int
    icons: dict = field(repr=False)  # name -> {"body", optional "width"/"height"/"left"/"top"}
    aliases: dict = field(repr=False)  # alias -> parent name (aliases with flips/rotations left out)
    chars: dict = field(repr=False)  # lower-case hex code points joined by "-" -> name
    categories: dict = field(repr=False)  # name -> tuple of category titles

    def svg(self, name: str) -> str:
        """A standalone SVG document for an icon or a plain alias."""
        icon = self.icons[self.aliases.get(name, name)]
        left, top = icon.get("left", 0), icon.get("top", 0)
        width, height = icon.get("width", self.width), icon.get("height", self.height)
        return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
                f'viewBox="{left} {top} {width} {height}">{icon["body"]}</svg>')


def _package_dir(prefix: str) -> Path:
    directory = iconify_dir() / prefix
    if not (directory / "icons.json").is_file():
        raise FileNotFoundError(f"icon set {prefix!r} not installed at {directory}: run "
                                f"`{npm_install_command([prefix])}` (.ci/setup does)")
    return directory


@lru_cache(maxsize=None)
def load_set(prefix: str) -> IconSet:
    if prefix not in EMOJI_SETS and prefix not in ICON_SETS:
        raise ValueError(f"unknown icon set {prefix!r}. Available: {sorted({**EMOJI_SETS, **ICON_SETS})}")
    directory = _package_dir(prefix)
    data = json.loads((directory / "icons.json").read_text(encoding="utf-8"))
    info = json.loads((directory / "info.json").read_text(encoding="utf-8"))
    version = json.loads((directory / "package.json").read_text(encoding="utf-8"))["version"]
    aliases = {name: alias["parent"] for name, alias in data.get("aliases", {}).items()
               if set(alias) == {"parent"} and alias["parent"] in data["icons"]}
    chars_path, meta_path = directory / "chars.json", directory / "metadata.json"
    chars = json.loads(chars_path.read_text()) if chars_path.is_file() else {}
    categories: dict[str, list[str]] = {}
    if meta_path.is_file():
        for title, names in json.loads(meta_path.read_text()).get("categories", {}).items():
            for name in names:
                categories.setdefault(name, []).append(title)
    return IconSet(prefix, version, info.get("license", {}).get("spdx", "?"), data.get("width", 16),
                   data.get("height", 16), data["icons"], aliases, {k.lower(): v for k, v in chars.items()},
                   {k: tuple(v) for k, v in categories.items()})


# ------------------------------------------------------------------------------------- emoji sets

def slug(name: str) -> str:
    """A CLDR name as Iconify spells icon names: "flag: Côte d’Ivoire" -> "flag-cote-d-ivoire"."""
    import unicodedata

    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")


def emoji_icon_names(iconset: IconSet, emojis: Sequence[Emoji]) -> dict[str, str]:
    """emoji id -> icon name in an emoji set, for the catalogue emoji the set draws.

    Code points first (`chars.json`, with and without FE0F), then the CLDR name's slug (icons and
    plain aliases). Skin-tone and other unmatched icons are never returned.
    """
    out = {}
    for emoji in emojis:
        keys = (emoji.id.lower(), "-".join(p for p in emoji.id.lower().split("-") if p != "fe0f"))
        name = next((iconset.chars[k] for k in keys if k in iconset.chars), None)
        if name is None or (name not in iconset.icons and name not in iconset.aliases):
            candidate = slug(emoji.name)
            name = candidate if candidate in iconset.icons or candidate in iconset.aliases else None
        if name is not None:
            out[emoji.id] = name
    return out


# ------------------------------------------------------------------------------------- icon concepts

@dataclass(frozen=True)
class IconConcept:
    """One named concept drawn by one or more icons (several sets, several weights of one set)."""

    name: str  # words, e.g. "food apple"
    sources: tuple[tuple[str, str], ...]  # (set prefix, icon name), sorted
    aliases: tuple[str, ...] = ()  # other names of the same drawings, as words
    categories: tuple[str, ...] = ()


def concept_name(icon_name: str) -> str | None:
    """Icon name -> concept words, variant and numbering suffixes removed ("bell-outline" -> "bell",
    "abstract-094" -> "abstract"); None for names without a word of three letters ("a-b", "10k")."""
    name = icon_name
    changed = True
    while changed:
        changed = False
        for suffix in VARIANT_SUFFIXES:
            if name.endswith("-" + suffix):
                name, changed = name[: -len(suffix) - 1], True
        if (stripped := _NUMBERED.sub("", name)) != name:
            name, changed = stripped, True
    words = name.split("-")
    if not any(len(w) >= 3 and w.isalpha() for w in words):
        return None
    return " ".join(words)


def icon_concepts(prefixes: Sequence[str] = tuple(ICON_SETS)) -> list[IconConcept]:
    """Every concept of the icon sets, merged across sets by concept name, in name order."""
    sources: dict[str, set] = {}
    aliases: dict[str, set] = {}
    categories: dict[str, set] = {}
    for prefix in prefixes:
        iconset = load_set(prefix)
        for name in iconset.icons:
            concept = concept_name(name)
            if concept is None:
                continue
            sources.setdefault(concept, set()).add((prefix, name))
            categories.setdefault(concept, set()).update(iconset.categories.get(name, ()))
        for alias, parent in iconset.aliases.items():
            concept, alias_words = concept_name(parent), concept_name(alias)
            if concept in sources and alias_words and alias_words != concept:
                aliases.setdefault(concept, set()).add(alias_words)
    return [IconConcept(name, tuple(sorted(sources[name])), tuple(sorted(aliases.get(name, ()))),
                        tuple(sorted(categories.get(name, ())))) for name in sorted(sources)]


# ------------------------------------------------------------------------------------- rasterising

def rasterize(svg: str, size: int = GLYPH_SIZE) -> np.ndarray:
    """SVG -> RGBA uint8 (h, w, 4), longest side `size`, no system fonts (deterministic)."""
    import resvg_py
    from PIL import Image

    png = resvg_py.svg_to_bytes(svg_string=svg, width=size, skip_system_fonts=True)
    with Image.open(io.BytesIO(bytes(png))) as image:
        image = image.convert("RGBA")
        if max(image.size) != size:  # a tall icon: width-scaled would exceed `size`
            scale = size / max(image.size)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.LANCZOS)
        return np.asarray(image)


def crop_to_content(pixels: np.ndarray) -> np.ndarray | None:
    """Crop an RGBA array to its non-transparent box (None when fully transparent)."""
    rows, cols = np.nonzero(pixels[..., 3])
    if rows.size == 0:
        return None
    return pixels[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def glyph_cache_key(sources: Sequence[tuple[str, str]], size: int) -> str:
    """Identity of a rasterised glyph bank: the sources, their package versions, size, renderer."""
    from importlib import metadata

    versions = {p: load_set(p).version for p in sorted({p for p, _ in sources})}
    payload = json.dumps([sorted(sources), versions, size, metadata.version("resvg-py")])
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def glyph_bank(sources: Sequence[tuple[str, str]], size: int = GLYPH_SIZE,
               cache_dir: Path | None = None) -> dict[tuple[str, str], np.ndarray]:
    """(set, icon) -> cropped RGBA glyph, rasterised once and cached as one .npz under the cache.

    Monochrome sets keep only their alpha channel drawn black, so they are stored as alpha and
    rebuilt here. Fully transparent icons are left out.
    """
    from curation.progress import Progress
    from curation.storage import cache_home

    sources = sorted(set(sources))
    directory = Path(cache_dir) if cache_dir else cache_home() / "emoji"
    path = directory / f"iconify-glyphs-{glyph_cache_key(sources, size)}.npz"
    if path.is_file():
        with np.load(path) as stored:
            return _unpack(stored, sources)
    glyphs: dict[tuple[str, str], np.ndarray] = {}
    with Progress("rasterising icons", len(sources), "icons") as progress:
        for prefix, name in sources:
            pixels = crop_to_content(rasterize(load_set(prefix).svg(name), size))
            if pixels is not None:
                glyphs[(prefix, name)] = pixels
            progress.update(1)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **_pack(glyphs, sources))
    tmp.replace(path)
    return glyphs


def _is_monochrome(prefix: str) -> bool:
    return prefix in ICON_SETS or prefix in MONOCHROME_EMOJI_SETS


def _pack(glyphs: dict, sources: list) -> dict[str, np.ndarray]:
    """One flat byte array plus (offset, h, w, channels) per source (channels 0: not drawn)."""
    index = np.zeros((len(sources), 4), np.int64)
    chunks, offset = [], 0
    for i, key in enumerate(sources):
        pixels = glyphs.get(key)
        if pixels is None:
            continue
        data = pixels[..., 3] if _is_monochrome(key[0]) else pixels
        channels = 1 if data.ndim == 2 else 4
        index[i] = (offset, data.shape[0], data.shape[1], channels)
        chunks.append(data.reshape(-1))
        offset += data.size
    flat = np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)
    return {"index": index, "data": flat}


def _unpack(stored, sources: list) -> dict[tuple[str, str], np.ndarray]:
    index, data = stored["index"], stored["data"]
    out = {}
    for key, (offset, h, w, channels) in zip(sources, index.tolist()):
        if channels == 0:
            continue
        block = data[offset:offset + h * w * channels]
        if channels == 1:
            rgba = np.zeros((h, w, 4), np.uint8)
            rgba[..., 3] = block.reshape(h, w)
            out[key] = rgba
        else:
            out[key] = block.reshape(h, w, 4)
    return out


if __name__ == "__main__":  # `.ci/setup`: print the specs still to install, one per line
    import sys

    if sys.argv[1:] != ["--missing"]:
        raise SystemExit("usage: python -m curation.emoji.iconify --missing")
    for spec in missing_specs():
        print(spec)
