"""The emoji catalogue: names and groups from Unicode's emoji-test.txt, keywords from CLDR.

Both come from Debian packages (`unicode-data`, `unicode-cldr-core`), so the demo world needs no
network. An emoji's id is its code point sequence as emoji-test.txt writes it (upper-case hex, at least four
digits) joined by "-" ("1F52B", "00A9-FE0F",
"1F468-200D-1F469-200D-1F467"): stable across releases, usable in file names and committed lists.

Skin-tone variants (sequences with a Fitzpatrick modifier) are left out by default: they repeat
their base emoji's shape and name, so keeping them would let one concept dominate and would leak
held-out emoji into training through a sibling.
"""

from __future__ import annotations

import hashlib
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

EMOJI_TEST = Path(os.environ.get("CURATION_EMOJI_TEST", "/usr/share/unicode/emoji/emoji-test.txt"))
CLDR_COMMON = Path(os.environ.get("CURATION_CLDR_COMMON", "/usr/share/unicode/cldr/common"))
WEAPONS_FILE = Path(__file__).parent / "weapons.txt"
HOLDOUT_FRACTION = 0.15
SKIN_TONES = frozenset(range(0x1F3FB, 0x1F400))
_VS16 = 0xFE0F
_LINE = re.compile(r"^([0-9A-F ]+?)\s*;\s*([a-z-]+)\s*#\s*\S+\s+E\d+\.\d+\s+(.+)$")


@dataclass(frozen=True)
class Emoji:
    """One fully-qualified emoji. `keywords` are CLDR's, lower-case, without the name itself."""

    id: str
    name: str
    group: str
    subgroup: str
    keywords: tuple[str, ...] = ()

    @property
    def codepoints(self) -> tuple[int, ...]:
        return tuple(int(part, 16) for part in self.id.split("-"))

    @property
    def text(self) -> str:
        """The emoji as a string, ready to render."""
        return "".join(map(chr, self.codepoints))


def emoji_id(codepoints: Iterable[int]) -> str:
    return "-".join(f"{cp:04X}" for cp in codepoints)


def _missing(path: Path, package: str) -> FileNotFoundError:
    return FileNotFoundError(f"{path} not found: install the Debian package `{package}` "
                             "(.ci/setup does), or point the CURATION_* variable at a copy")


def parse_emoji_test(path: Path = EMOJI_TEST, skin_tones: bool = False) -> list[Emoji]:
    """Fully-qualified emoji in file (CLDR) order, with their group and subgroup."""
    if not Path(path).is_file():
        raise _missing(Path(path), "unicode-data")
    group = subgroup = ""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif (match := _LINE.match(line)) and match.group(2) == "fully-qualified":
            codepoints = [int(part, 16) for part in match.group(1).split()]
            if skin_tones or not SKIN_TONES.intersection(codepoints):
                out.append(Emoji(emoji_id(codepoints), match.group(3).strip(), group, subgroup))
    return out


def _annotation_key(text: str) -> str:
    """CLDR keys annotations by the emoji without variation selectors."""
    return text.replace(chr(_VS16), "")


def parse_cldr_annotations(paths: Sequence[Path] | None = None) -> dict[str, tuple[str, ...]]:
    """Map emoji text (FE0F removed) -> keywords, from CLDR annotations and derived annotations."""
    paths = paths or [CLDR_COMMON / "annotations" / "en.xml", CLDR_COMMON / "annotationsDerived" / "en.xml"]
    keywords: dict[str, tuple[str, ...]] = {}
    for path in paths:
        if not Path(path).is_file():
            raise _missing(Path(path), "unicode-cldr-core")
        for node in ET.parse(path).getroot().iter("annotation"):
            if node.get("type") != "tts" and node.text:
                words = tuple(w.strip().lower() for w in node.text.split("|") if w.strip())
                keywords.setdefault(_annotation_key(node.get("cp", "")), words)
    return keywords


def load_catalog(skin_tones: bool = False, emoji_test: Path = EMOJI_TEST,
                 annotations: Sequence[Path] | None = None) -> list[Emoji]:
    """Every fully-qualified emoji with its CLDR keywords (empty when CLDR predates the emoji)."""
    keywords = parse_cldr_annotations(annotations)
    out = []
    for emoji in parse_emoji_test(emoji_test, skin_tones):
        words = keywords.get(_annotation_key(emoji.text), ())
        extra = tuple(w for w in words if w != emoji.name.lower())
        out.append(Emoji(emoji.id, emoji.name, emoji.group, emoji.subgroup, extra))
    return out


def _stable_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "little")


def holdout_split(emojis: Sequence[Emoji], fraction: float = HOLDOUT_FRACTION,
                  seed: int = 0) -> tuple[list[Emoji], list[Emoji]]:
    """Split into (trained, held_out), stratified by subgroup.

    Each subgroup holds out floor(fraction * n) emoji plus one more for the subgroups with the
    largest remainders, so the total is round(fraction * N) exactly. Which emoji, and which
    subgroups get the extra one, depends only on `seed` and the ids (not on input order or Python's
    hash seed). Returns both lists in input order.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    by_subgroup: dict[str, list[Emoji]] = {}
    for emoji in emojis:
        by_subgroup.setdefault(f"{emoji.group}/{emoji.subgroup}", []).append(emoji)
    quotas = _allocate(by_subgroup, fraction, seed)
    held: set[str] = set()
    for key, members in by_subgroup.items():
        ids = sorted(e.id for e in members)
        order = np.random.default_rng(_stable_seed(seed, key)).permutation(len(ids))
        held.update(ids[i] for i in order[:quotas[key]])
    return [e for e in emojis if e.id not in held], [e for e in emojis if e.id in held]


def _allocate(by_subgroup: dict[str, list[Emoji]], fraction: float, seed: int) -> dict[str, int]:
    """Largest-remainder allocation of round(fraction * N) hold-outs over subgroups."""
    keys = sorted(by_subgroup)
    exact = np.array([fraction * len(by_subgroup[k]) for k in keys])
    quotas = np.floor(exact).astype(int)
    extra = int(round(exact.sum())) - int(quotas.sum())
    tiebreak = np.random.default_rng(_stable_seed(seed, "allocate")).random(len(keys))
    order = np.lexsort((tiebreak, -(exact - quotas)))
    quotas[order[:extra]] += 1
    return dict(zip(keys, quotas.tolist()))


def read_id_list(path: Path) -> list[str]:
    """Ids from a committed list: one per line, `#` starts a comment."""
    ids = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if token := line.split("#", 1)[0].strip():
            ids.append(token.upper())
    return ids


def weapon_ids() -> list[str]:
    """Ground truth of the demo's unwanted-concept task (see weapons.txt for how it was chosen)."""
    return read_id_list(WEAPONS_FILE)
