"""Install WordNet 3.0 for nltk from the Debian packages, with no network.

`nltk.download` needs the internet and returns False instead of raising when it cannot reach it,
so we build nltk's `corpora/wordnet.zip` ourselves from the files of the Debian packages
`wordnet-base` and `wordnet-sense-index` (WordNet 3.0, /usr/share/wordnet). nltk cannot read that
directory in place (it refuses corpus paths outside its data path) and Debian lacks the
`lexnames` file nltk needs, so we copy the files into a zip laid out as nltk's own
(`wordnet/<file>`) and add `lexnames`. The result is WordNet 3.0 as nltk ships it:
117,659 synsets, 82,115 of them nouns.

    python -m curation.text.wordnet_install [--source /usr/share/wordnet] [--dest DIR] [--force]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import zipfile
from pathlib import Path

DEFAULT_SOURCE = Path("/usr/share/wordnet")
APT_COMMAND = "apt-get install -y --no-install-recommends wordnet-base wordnet-sense-index"
EXPECTED_SYNSETS = 117659
EXPECTED_NOUN_SYNSETS = 82115

# The WordNet 3.0 lexicographer files, as lexnames(5WN): (number, name, syntactic category),
# category 1 noun, 2 verb, 3 adjective, 4 adverb. A synset's lex_filenum indexes this table.
LEXNAMES: tuple[tuple[int, str, int], ...] = (
    (0, "adj.all", 3),
    (1, "adj.pert", 3),
    (2, "adv.all", 4),
    (3, "noun.Tops", 1),
    (4, "noun.act", 1),
    (5, "noun.animal", 1),
    (6, "noun.artifact", 1),
    (7, "noun.attribute", 1),
    (8, "noun.body", 1),
    (9, "noun.cognition", 1),
    (10, "noun.communication", 1),
    (11, "noun.event", 1),
    (12, "noun.feeling", 1),
    (13, "noun.food", 1),
    (14, "noun.group", 1),
    (15, "noun.location", 1),
    (16, "noun.motive", 1),
    (17, "noun.object", 1),
    (18, "noun.person", 1),
    (19, "noun.phenomenon", 1),
    (20, "noun.plant", 1),
    (21, "noun.possession", 1),
    (22, "noun.process", 1),
    (23, "noun.quantity", 1),
    (24, "noun.relation", 1),
    (25, "noun.shape", 1),
    (26, "noun.state", 1),
    (27, "noun.substance", 1),
    (28, "noun.time", 1),
    (29, "verb.body", 2),
    (30, "verb.change", 2),
    (31, "verb.cognition", 2),
    (32, "verb.communication", 2),
    (33, "verb.competition", 2),
    (34, "verb.consumption", 2),
    (35, "verb.contact", 2),
    (36, "verb.creation", 2),
    (37, "verb.emotion", 2),
    (38, "verb.motion", 2),
    (39, "verb.perception", 2),
    (40, "verb.possession", 2),
    (41, "verb.social", 2),
    (42, "verb.stative", 2),
    (43, "verb.weather", 2),
    (44, "adj.ppl", 3),
)

# Files nltk's reader opens; the rest of the directory (cntlist, sents.vrb, ...) comes along too.
REQUIRED_FILES = tuple(
    f"{kind}.{pos}" for kind in ("index", "data") for pos in ("noun", "verb", "adj", "adv")
) + ("noun.exc", "verb.exc", "adj.exc", "adv.exc")

_ZIP_DATE = (2006, 12, 6, 0, 0, 0)  # fixed timestamps: the same inputs give the same zip bytes


def lexnames_text() -> str:
    """The `lexnames` file Debian leaves out, in WordNet's tab-separated format."""
    return "".join(f"{num:02d}\t{name}\t{cat}\n" for num, name, cat in LEXNAMES)


def default_dest() -> Path:
    """nltk searches `sys.prefix/nltk_data` with no environment variable.

    In a virtual environment sys.prefix is the venv ($VIRTUAL_ENV when it is activated); unlike
    $VIRTUAL_ENV it is also right when the venv's python runs without activation, or while a
    different venv is activated.
    """
    return Path(sys.prefix) / "nltk_data"


def zip_path(dest: Path) -> Path:
    return Path(dest) / "corpora" / "wordnet.zip"


def check_source(source: Path) -> list[Path]:
    """The source's files, or an actionable error naming the apt packages."""
    source = Path(source)
    missing = [name for name in REQUIRED_FILES if not (source / name).is_file()]
    if not source.is_dir() or missing:
        what = f"{source} does not exist" if not source.is_dir() else f"{source} lacks {missing}"
        raise FileNotFoundError(
            f"WordNet 3.0 source not found: {what}. Install it with `{APT_COMMAND}` "
            "or pass --source DIR."
        )
    return sorted(p for p in source.iterdir() if p.is_file() and p.name != "lexnames")


def build_zip(source: Path, target: Path) -> Path:
    """Write `target`: the source files and `lexnames` under `wordnet/`, as nltk's own zip."""
    files = check_source(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(zipfile.ZipInfo("wordnet/", _ZIP_DATE), b"")
        for path in files:
            _add(archive, f"wordnet/{path.name}", path.read_bytes())
        _add(archive, "wordnet/lexnames", lexnames_text().encode())
    return target


def _add(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, _ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    archive.writestr(info, data)


def open_reader(target: Path):
    """nltk's own WordNet reader on this zip file, wherever it lies.

    nltk 3.10 refuses files outside its data path, so a --dest it does not search is added to
    this process's path (users of that dest set NLTK_DATA, as `main` tells them).
    """
    import warnings

    import nltk
    from nltk.corpus.reader import WordNetCorpusReader
    from nltk.data import ZipFilePathPointer

    if not on_nltk_path(target.parent.parent):
        nltk.data.path.append(str(target.parent.parent))
    with warnings.catch_warnings():  # no Open Multilingual WordNet here, on purpose
        warnings.simplefilter("ignore", UserWarning)
        return WordNetCorpusReader(ZipFilePathPointer(str(target), "wordnet/"), None)


def verify(target: Path) -> None:
    """Raise unless nltk reads exactly WordNet 3.0 from `target` (every synset parsed: ~10 s)."""
    reader = open_reader(target)
    counts = sum(1 for _ in reader.all_synsets()), sum(1 for _ in reader.all_synsets("n"))
    if counts != (EXPECTED_SYNSETS, EXPECTED_NOUN_SYNSETS):
        raise RuntimeError(
            f"{target}: nltk reads {counts[0]} synsets ({counts[1]} nouns), expected "
            f"{EXPECTED_SYNSETS} ({EXPECTED_NOUN_SYNSETS}); is the source WordNet 3.0?"
        )


def is_installed(target: Path) -> bool:
    """True when `target`'s members are intact and nltk loads it as WordNet 3.0 (~4 s).

    Cheaper than `verify`, which already ran when the zip was built: a re-run only has to
    catch a truncated, damaged or foreign file.
    """
    if not target.is_file():
        return False
    try:
        with zipfile.ZipFile(target) as archive:
            if archive.testzip() is not None:
                return False
        return open_reader(target).get_version() == "3.0"
    except Exception:  # anything unreadable is rebuilt
        return False


def on_nltk_path(dest: Path) -> bool:
    import nltk

    return any(Path(p).resolve() == Path(dest).resolve() for p in nltk.data.path if p)


def install(source: Path = DEFAULT_SOURCE, dest: Path | None = None, force: bool = False) -> Path:
    """Build and verify `<dest>/corpora/wordnet.zip`; skip when a good one is already there."""
    target = zip_path(dest or default_dest())
    if not force and is_installed(target):
        print(f"WordNet already installed: {target}")
        return target
    # Built and verified in a staging data dir, so a reader never sees a half-built zip. It must
    # be called `corpora/wordnet.zip` there: nltk's reader looks up the corpus named "wordnet"
    # on its data path while it is being constructed.
    staging = target.parent.parent / ".wordnet-staging"
    partial = staging / "corpora" / "wordnet.zip"
    try:
        verify(build_zip(Path(source), partial))
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"Installed WordNet 3.0 ({EXPECTED_SYNSETS} synsets) at {target}")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="Debian WordNet dir")
    parser.add_argument("--dest", type=Path, default=None, help="nltk data dir (default: %s)"
                        % default_dest())
    parser.add_argument("--force", action="store_true", help="rebuild even if installed")
    args = parser.parse_args(argv)
    dest = args.dest or default_dest()
    searched = on_nltk_path(dest)  # before `install` adds it to this process's path
    try:
        install(args.source, dest, args.force)
    except (FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if not searched:
        print(f"note: nltk does not search {dest}; set NLTK_DATA={dest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
