"""Word corpora: the world vocabulary HFTT trains against and NegLabel's candidate negatives.

Every corpus carries a content hash, so an artifact built from it can name exactly which words it
saw (the text cache keys embeddings by content too). Built-in corpora come from Debian packages,
not downloads: nothing here needs the network.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from curation.progress import Progress
from curation.text.wordnet_install import LEXNAMES

DICT_DIR = Path("/usr/share/dict")
DEBIAN_LISTS = {  # built-in name -> (file under /usr/share/dict, Debian package)
    "wamerican-huge": ("american-english-huge", "wamerican-huge"),
    "wamerican-insane": ("american-english-insane", "wamerican-insane"),
}
BUILTIN_CORPORA = (*DEBIAN_LISTS, "wordnet")

KNOWN_LEXNAMES = tuple(name for _, name, _ in LEXNAMES)
# NegLabel's 24 noun files (no noun.animal, no noun.food) and 3 adjective files,
# in algorithms.md order.
DEFAULT_NOUN_LEXNAMES = tuple(f"noun.{name}" for name in (
    "Tops act artifact attribute body cognition communication event feeling group location motive "
    "object person phenomenon plant possession process quantity relation shape state substance "
    "time").split())
DEFAULT_ADJ_LEXNAMES = ("adj.all", "adj.pert", "adj.ppl")

INSTALL_HINT = "WordNet is not installed for nltk; run `python -m curation.text.wordnet_install`"


@dataclass(frozen=True)
class WordCorpus:
    """A named, ordered, duplicate-free word list and the sha256 of its content."""

    name: str
    words: tuple[str, ...]
    sha256: str

    @classmethod
    def from_words(cls, name: str, words: Iterable[str]) -> "WordCorpus":
        words = tuple(words)
        return cls(name, words, hashlib.sha256("\n".join(words).encode("utf-8")).hexdigest())

    @property
    def size(self) -> int:
        return len(self.words)

    def provenance(self) -> dict:
        """What an artifact records so its corpus can be checked later."""
        return {"name": self.name, "sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class WordNetCorpus:
    """WordNet 3.0 through nltk, as NegLabel learns from it: candidate words selected by
    lexicographer file (the detector's own params). Holds nothing: WordNet is read on first use."""

    name: str = "wordnet"

    def candidates(self, noun_lexnames: Iterable[str], adj_lexnames: Iterable[str]) -> tuple[list[str], list[str]]:
        return wordnet_candidates(noun_lexnames, adj_lexnames)


CORPUS_KINDS = (None, "word_list", "wordnet")


def load_corpus(kind: str | None, word_list: str | None = None,
                storage_options: dict | None = None) -> "WordCorpus | WordNetCorpus | None":
    """The corpus a detector kind learns from (`Detector.corpus_kind`): nothing, the word list
    `word_list` names (`load_word_corpus`), or WordNet."""
    if kind not in CORPUS_KINDS:
        raise ValueError(f"unknown corpus kind {kind!r}; known: {CORPUS_KINDS}")
    if kind == "word_list":
        return load_word_corpus(word_list, storage_options)
    return WordNetCorpus() if kind == "wordnet" else None


def dedup(words: Iterable[str]) -> list[str]:
    """Keep the first occurrence of each word, in order (dict keys keep insertion order)."""
    return list(dict.fromkeys(words))


def load_word_corpus(source: str, storage_options: dict | None = None) -> WordCorpus:
    """A built-in name (see BUILTIN_CORPORA), a local text file, or an fsspec URI (s3://...).

    Text files hold one word or phrase per line; blank lines and lines starting with '#' are
    skipped, surrounding whitespace stripped, and duplicates dropped (first one kept).
    """
    source = str(source)
    if source in BUILTIN_CORPORA:
        words = _BUILTIN_LOADERS[source]()
    elif "://" in source:
        words = _read_uri(source, storage_options or {})
    else:
        words = _read_local(source)
    if not words:
        raise ValueError(f"word corpus {source!r} is empty after cleaning")
    return WordCorpus.from_words(source, words)


def clean_lines(lines: Iterable[str]) -> list[str]:
    """Strip, skip blanks and '#' comments, dedup."""
    stripped = (line.strip() for line in lines)
    return dedup(line for line in stripped if line and not line.startswith("#"))


def _read_local(source: str) -> list[str]:
    path = Path(source)
    if path.is_file():
        with open(path, encoding="utf-8") as handle:
            return clean_lines(handle)
    if any(sep in source for sep in "/\\.") or path.exists():
        raise FileNotFoundError(f"word corpus file not found: {source}")
    raise ValueError(f"unknown word corpus {source!r}: not a file, and not a built-in corpus; "
                     f"available: {', '.join(BUILTIN_CORPORA)}")


def _read_uri(uri: str, storage_options: dict) -> list[str]:
    import fsspec

    try:
        with fsspec.open(uri, "rt", encoding="utf-8", **storage_options) as handle:
            return clean_lines(handle)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"word corpus file not found: {uri}") from error


def _read_debian_list(name: str) -> list[str]:
    """A Debian /usr/share/dict list cleaned like dwyl's words_alpha.txt (HFTT's corpus):
    lowercase, purely alphabetic ASCII words only, first occurrence kept."""
    filename, package = DEBIAN_LISTS[name]
    path = DICT_DIR / filename
    if not path.is_file():
        raise FileNotFoundError(f"word corpus {name!r} needs {path}; install it with "
                                f"`apt-get install -y --no-install-recommends {package}`")
    with open(path, encoding="utf-8") as handle:
        lowered = (line.strip().lower() for line in handle)
        return dedup(word for word in lowered if word.isascii() and word.isalpha())


def _read_wordnet_lemmas() -> list[str]:
    """Every WordNet lemma name (all parts of speech), underscores as spaces, lowercase."""
    wn = load_wordnet()
    return dedup(name.replace("_", " ").lower() for name in wn.all_lemma_names())


_BUILTIN_LOADERS: dict[str, Callable[[], list[str]]] = {
    **{name: functools.partial(_read_debian_list, name) for name in DEBIAN_LISTS},
    "wordnet": _read_wordnet_lemmas,
}


def load_wordnet():
    """nltk's WordNet reader, loaded; an actionable error when the data is missing."""
    from nltk.corpus import wordnet as wn

    try:
        wn.ensure_loaded()
    except LookupError as error:
        raise LookupError(INSTALL_HINT) from error
    return wn


def check_lexnames(lexnames: Iterable[str], prefix: str) -> tuple[str, ...]:
    """Validate lexicographer file names against WordNet 3.0's 45 (one part of speech each)."""
    lexnames = (lexnames,) if isinstance(lexnames, str) else tuple(lexnames)
    valid = [name for name in KNOWN_LEXNAMES if name.startswith(prefix)]
    bad = [name for name in lexnames if name not in valid]
    if bad:
        raise ValueError(f"unknown {prefix}* lexicographer files {bad}; available: {valid}")
    return lexnames


def wordnet_candidates(noun_lexnames: Iterable[str] = DEFAULT_NOUN_LEXNAMES,
                       adj_lexnames: Iterable[str] = DEFAULT_ADJ_LEXNAMES,
                       all_lemmas: bool = False) -> tuple[list[str], list[str]]:
    """NegLabel's candidate negative words: (nouns, adjectives), each list in a fixed order.

    One word per synset, its name's lemma (WordNet's first lemma, lowercased), underscores as
    spaces: that is what the reference's word files hold (58,514 nouns + 12,280 adjectives with
    the defaults, the ≈58.5k/≈70k of algorithms.md; all lemmas would be 102,898 + 18,610).
    `all_lemmas=True` takes every lemma instead, lowercased too (CLIP's tokenizer lowercases).
    Lexnames in the given order, synsets by file offset inside each; deduplicated globally,
    first occurrence wins, nouns before adjectives. Cached per process (the first call parses
    every noun and adjective synset: seconds).
    """
    nouns = check_lexnames(noun_lexnames, "noun.")
    adjs = check_lexnames(adj_lexnames, "adj.")
    noun_words, adj_words = _candidates(nouns, adjs, bool(all_lemmas))
    return list(noun_words), list(adj_words)


@functools.lru_cache(maxsize=8)
def _candidates(nouns: tuple[str, ...], adjs: tuple[str, ...],
                all_lemmas: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    by_lexname = _synsets_by_lexname()
    words = functools.partial(_synset_words, all_lemmas=all_lemmas)
    noun_words = dedup(w for name in nouns for synset in by_lexname[name] for w in words(synset))
    seen = set(noun_words)
    adj_words = dedup(w for name in adjs for synset in by_lexname[name] for w in words(synset)
                      if w not in seen)
    return tuple(noun_words), tuple(adj_words)


def _synset_words(synset, all_lemmas: bool) -> list[str]:
    if all_lemmas:
        return [name.replace("_", " ").lower() for name in synset.lemma_names()]
    return [synset.lemma_names()[0].replace("_", " ").lower()]  # the synset name's lemma


@functools.lru_cache(maxsize=1)
def _synsets_by_lexname() -> dict[str, list]:
    """Noun and adjective synsets grouped by lexicographer file, in file-offset order (~100k
    synsets: 10-20 s on a small CPU, so it reports progress)."""
    groups: dict[str, list] = {name: [] for name in KNOWN_LEXNAMES}
    with Progress("reading WordNet noun and adjective synsets", None, "synsets") as progress:
        wn = load_wordnet()
        for pos in ("n", "a"):  # "a" yields the satellites too: all of data.adj
            for synset in wn.all_synsets(pos):
                groups[synset.lexname()].append(synset)
                progress.update()
    return groups
