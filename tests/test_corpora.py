import hashlib
import zipfile
from pathlib import Path

import pytest

from curation.text import corpora, wordnet_install
from curation.text.corpora import (
    DEFAULT_ADJ_LEXNAMES,
    DEFAULT_NOUN_LEXNAMES,
    WordCorpus,
    load_word_corpus,
    wordnet_candidates,
)

# Measured on WordNet 3.0 (Debian wordnet-base, zipped by wordnet_install) with nltk 3.10.4.
NOUNS, ADJS = 58514, 12280
ALL_LEMMA_NOUNS, ALL_LEMMA_ADJS = 101807, 18462


@pytest.fixture(scope="module")
def wn():
    try:
        return corpora.load_wordnet()
    except LookupError as error:
        pytest.skip(str(error))


def needs_dict(name):
    filename, _ = corpora.DEBIAN_LISTS[name]
    return pytest.mark.skipif(not (corpora.DICT_DIR / filename).is_file(),
                              reason=f"Debian package {name} not installed")


# --- WordCorpus ---------------------------------------------------------------------------------

def test_hash_is_sha256_of_joined_words_and_stable():
    corpus = WordCorpus.from_words("x", ["cat", "dog"])
    assert corpus.sha256 == hashlib.sha256(b"cat\ndog").hexdigest()
    assert WordCorpus.from_words("other name", ("cat", "dog")).sha256 == corpus.sha256
    assert corpus.size == 2
    assert corpus.provenance() == {"name": "x", "sha256": corpus.sha256, "size": 2}


def test_hash_changes_with_content_and_order():
    base = WordCorpus.from_words("x", ["cat", "dog"]).sha256
    assert WordCorpus.from_words("x", ["dog", "cat"]).sha256 != base
    assert WordCorpus.from_words("x", ["cat", "dogs"]).sha256 != base
    assert WordCorpus.from_words("x", ["cat dog"]).sha256 != base



# --- files and URIs -----------------------------------------------------------------------------

def test_file_corpus_strips_dedups_skips_blanks_and_comments(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("# header\n  cat \n\ndog\ncat\n   \n#dog\nhot dog\n", encoding="utf-8")
    corpus = load_word_corpus(str(path))
    assert corpus.words == ("cat", "dog", "hot dog")
    assert corpus.name == str(path)


def test_fsspec_uri_reads_like_a_file(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("b\na\nb\n", encoding="utf-8")
    assert load_word_corpus(f"file://{path}").words == ("b", "a")
    memory = "memory://corpora/words.txt"
    import fsspec

    with fsspec.open(memory, "wt") as handle:
        handle.write("x\n# c\ny\n")
    assert load_word_corpus(memory, storage_options={}).words == ("x", "y")


def test_empty_file_raises_with_path(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("# only a comment\n\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.txt"):
        load_word_corpus(str(path))


def test_missing_file_raises_with_path(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_word_corpus(str(path))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_word_corpus(f"file://{path}")


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        load_word_corpus("words_alpha")
    for name in ("wamerican-huge", "wamerican-insane", "wordnet"):
        assert name in str(info.value)


# --- Debian word lists --------------------------------------------------------------------------

@needs_dict("wamerican-huge")
def test_wamerican_huge_is_lowercase_alpha():
    corpus = load_word_corpus("wamerican-huge")
    assert corpus.size == 277646
    assert all(w.isascii() and w.isalpha() and w.islower() for w in corpus.words)
    assert len(set(corpus.words)) == corpus.size
    assert corpus.words[:3] == ("a", "aa", "aaa")


@needs_dict("wamerican-insane")
def test_wamerican_insane_is_bigger():
    corpus = load_word_corpus("wamerican-insane")
    assert corpus.size == 490402
    assert all(w.isascii() and w.isalpha() and w.islower() for w in corpus.words)


def test_missing_debian_list_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(corpora, "DICT_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install .*wamerican-huge"):
        load_word_corpus("wamerican-huge")


# --- WordNet ------------------------------------------------------------------------------------

def test_default_lexnames():
    assert len(DEFAULT_NOUN_LEXNAMES) == 24 and DEFAULT_NOUN_LEXNAMES[0] == "noun.Tops"
    assert "noun.animal" not in DEFAULT_NOUN_LEXNAMES and "noun.food" not in DEFAULT_NOUN_LEXNAMES
    assert set(DEFAULT_NOUN_LEXNAMES + DEFAULT_ADJ_LEXNAMES) <= set(corpora.KNOWN_LEXNAMES)


def test_wordnet_zip_nltk_uses_is_wordnet_30(wn):
    assert wn.get_version() == "3.0"
    assert ".zip" in str(wn.root)
    assert sum(1 for _ in wn.all_synsets()) == wordnet_install.EXPECTED_SYNSETS == 117659
    assert sum(1 for _ in wn.all_synsets("n")) == 82115


def test_lexnames_table_matches_wordnet(wn):
    lines = wordnet_install.lexnames_text().splitlines()
    assert len(lines) == 45 and lines[0] == "00\tadj.all\t3" and lines[44] == "44\tadj.ppl\t3"
    assert wn.synset("dog.n.01").lexname() == "noun.animal"
    assert wn.synset("run.v.01").lexname() == "verb.motion"
    assert wn.synset("solar.a.01").lexname() == "adj.pert"


def test_candidates_defaults(wn):
    nouns, adjs = wordnet_candidates()
    assert (len(nouns), len(adjs)) == (NOUNS, ADJS)
    assert len(set(nouns)) == NOUNS and len(set(adjs)) == ADJS
    assert not set(nouns) & set(adjs)  # nouns first: a word seen as a noun is no adjective
    assert nouns[:3] == ["entity", "physical entity", "abstraction"]
    assert adjs[:3] == ["able", "unable", "abaxial"]
    assert all(w == w.lower() and "_" not in w for w in nouns + adjs)
    assert "de kooning" in nouns and "eleven" in nouns and "eleven" not in adjs
    assert "golden retriever" not in nouns and "pizza" not in nouns  # no noun.animal, noun.food
    assert "dog" in nouns  # still there: dog.n.03 ("informal term for a man") is noun.person


def test_candidates_are_copies_and_cached(wn):
    nouns, _ = wordnet_candidates()
    nouns.clear()
    assert len(wordnet_candidates(list(DEFAULT_NOUN_LEXNAMES))[0]) == NOUNS


def test_candidates_all_lemmas(wn):
    nouns, adjs = wordnet_candidates(all_lemmas=True)
    assert (len(nouns), len(adjs)) == (ALL_LEMMA_NOUNS, ALL_LEMMA_ADJS)
    assert not set(nouns) & set(adjs)


def test_candidates_custom_lexnames(wn):
    nouns, adjs = wordnet_candidates(("noun.plant",), ())
    assert adjs == [] and 0 < len(nouns) < NOUNS
    assert "bloodroot" in nouns and "entity" not in nouns
    with_animals, _ = wordnet_candidates(DEFAULT_NOUN_LEXNAMES + ("noun.animal",))
    assert "golden retriever" in with_animals and len(with_animals) > NOUNS


def test_candidates_order_follows_lexname_order(wn):
    plant_first, _ = wordnet_candidates(("noun.plant", "noun.Tops"), ())
    tops_first, _ = wordnet_candidates(("noun.Tops", "noun.plant"), ())
    assert sorted(plant_first) == sorted(tops_first) and plant_first != tops_first
    assert tops_first[0] == "entity"


@pytest.mark.parametrize("nouns, adjs", [(("noun.animals",), ()), (("adj.all",), ()),
                                         ((), ("noun.Tops",)), ((), ("adj.bogus",))])
def test_bad_lexname_raises_listing_valid(nouns, adjs):
    with pytest.raises(ValueError, match="available") as info:
        wordnet_candidates(nouns, adjs)
    assert "noun.artifact" in str(info.value) or "adj.pert" in str(info.value)


def test_wordnet_lemma_corpus(wn):
    corpus = load_word_corpus("wordnet")
    assert corpus.size == 147306
    assert "hot dog" in corpus.words and all("_" not in w for w in corpus.words)


def test_missing_wordnet_says_how_to_install(monkeypatch):
    from nltk.corpus import wordnet

    def missing():
        raise LookupError("Resource wordnet not found.")

    monkeypatch.setattr(wordnet, "ensure_loaded", missing)
    with pytest.raises(LookupError, match="curation.text.wordnet_install"):
        corpora.load_wordnet()


# --- the installer ------------------------------------------------------------------------------

def test_installer_names_apt_command_when_source_missing(tmp_path):
    apt = "apt-get install .*wordnet-base wordnet-sense-index"
    with pytest.raises(FileNotFoundError, match=apt):
        wordnet_install.install(source=tmp_path / "absent", dest=tmp_path / "nltk_data", force=True)
    assert wordnet_install.main(["--source", str(tmp_path / "absent"), "--dest", str(tmp_path),
                                 "--force"]) == 1


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").is_file(),
                    reason="Debian wordnet-base not installed")
def test_installer_builds_nltk_layout_and_is_idempotent(tmp_path):
    target = wordnet_install.install(dest=tmp_path)
    assert target == tmp_path / "corpora" / "wordnet.zip"
    names = zipfile.ZipFile(target).namelist()
    assert "wordnet/lexnames" in names and "wordnet/data.noun" in names
    assert all(name.startswith("wordnet/") for name in names)
    built = target.stat().st_mtime_ns
    assert wordnet_install.install(dest=tmp_path) == target
    assert target.stat().st_mtime_ns == built  # already there: not rebuilt
