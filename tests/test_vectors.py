"""Word-vector files, the binary cache, phrase lookup and nearest words, on tiny generated tables."""

from __future__ import annotations

import gzip
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from devise import vector_files
from devise.vectors import (
    UnknownWordError,
    VectorFileError,
    WordVectors,
    convert_to_cache,
    default_cache_dir,
    load_vectors,
    read_wink_json,
)

WORDS = ["the", "ankle", "boot", "t", "shirt", "steel", "arch", "bridge", "Paris", "paris", "dog"]


def table(words=WORDS, dim=8, seed=0) -> np.ndarray:
    # Values with 4 decimals survive the text round trip exactly enough for atol=1e-6.
    rng = np.random.default_rng(seed)
    return np.round(rng.normal(size=(len(words), dim)), 4).astype(np.float32)


def write_text(path: Path, words, mat, header: bool) -> Path:
    lines = [f"{len(words)} {mat.shape[1]}"] if header else []
    # fastText writes a trailing space after the last number; keep that quirk in the fixture.
    lines += [w + " " + " ".join(f"{x:.4f}" for x in row) + " " for w, row in zip(words, mat)]
    data = "\n".join(lines) + "\n"
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def write_wink(path: Path, words, mat) -> Path:
    dim = mat.shape[1]
    vecs = {
        w: [float(x) for x in row] + [float(np.linalg.norm(row)), i]
        for i, (w, row) in enumerate(zip(words, mat))
    }
    doc = {
        "precision": 8,
        "l2NormIndex": dim,
        "wordIndex": dim + 1,
        "size": len(words),
        "dimensions": dim,
        "words": list(words),
        "vectors": vecs,
        "unkVector": [0.0] * dim + [0, -1],
    }
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


@pytest.fixture
def vec_file(tmp_path) -> Path:
    return write_text(tmp_path / "tiny.vec", WORDS, table(), header=True)


@pytest.fixture
def wv(vec_file, tmp_path) -> WordVectors:
    return load_vectors(vec_file, cache_dir=tmp_path / "cache")


def row(word: str) -> np.ndarray:
    return table()[WORDS.index(word)]


# -- formats ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, header",
    [("tiny.vec", True), ("tiny.txt", False), ("tiny.vec.gz", True), ("tiny.txt.gz", False)],
)
def test_text_formats_round_trip(tmp_path, name, header):
    mat = table()
    path = write_text(tmp_path / name, WORDS, mat, header=header)
    wv = load_vectors(path, cache_dir=tmp_path / "cache")
    assert list(wv.words) == WORDS
    assert len(wv) == len(WORDS) and wv.dim == 8
    assert wv.matrix.dtype == np.float32 and isinstance(wv.matrix, np.memmap)
    np.testing.assert_allclose(wv.matrix, mat, atol=1e-6)
    assert wv.skipped_lines == 0
    assert wv.vectors_id.startswith("tiny-") and len(wv.vectors_id) > len("tiny-")


def test_wink_json(tmp_path):
    mat = table(dim=5)
    path = write_wink(tmp_path / "wink-embeddings-sg-5d.json", WORDS, mat)
    words, got = read_wink_json(path)
    assert words == WORDS
    assert got.shape == (len(WORDS), 5) and got.dtype == np.float32
    np.testing.assert_allclose(got, mat, atol=1e-6)  # the norm and index columns are dropped
    wv = load_vectors(path, cache_dir=tmp_path / "cache")
    np.testing.assert_allclose(wv.lookup("steel"), mat[WORDS.index("steel")], atol=1e-6)


def test_words_with_spaces_take_everything_before_the_last_d_fields(tmp_path):
    mat = table(["new york", "the"], dim=3)
    path = write_text(tmp_path / "spaces.txt", ["new york", "the"], mat, header=False)
    wv = load_vectors(path, cache_dir=tmp_path / "cache")
    assert list(wv.words) == ["new york", "the"]
    np.testing.assert_allclose(wv.lookup("New York"), mat[0], atol=1e-6)


# -- the cache --------------------------------------------------------------------------------


def test_cache_is_built_once_and_reused(vec_file, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load_vectors(vec_file, cache_dir=cache)
    folders = [p for p in cache.iterdir()]
    assert len(folders) == 1
    assert {p.name for p in folders[0].iterdir()} == {
        "matrix.npy",
        "words.txt",
        "meta.json",
        "order.npy",
        "order_folded.npy",
    }
    meta = json.loads((folders[0] / "meta.json").read_text())
    assert meta["count"] == len(WORDS) and meta["dim"] == 8
    assert meta["vectors_id"] == first.vectors_id

    def no_parse(*args, **kwargs):
        raise AssertionError("the source file was parsed again")

    monkeypatch.setattr(vector_files, "_iter_text_chunks", no_parse)
    monkeypatch.setattr(vector_files, "_read_wink", no_parse)
    second = load_vectors(vec_file, cache_dir=cache)
    assert second.vectors_id == first.vectors_id
    np.testing.assert_array_equal(second.matrix, first.matrix)
    assert convert_to_cache(vec_file, cache) == folders[0]
    # A cache folder can also be loaded directly (e.g. shipped to a cluster).
    assert list(load_vectors(folders[0]).words) == WORDS


def test_changed_file_is_converted_again(vec_file, tmp_path):
    cache = tmp_path / "cache"
    before = load_vectors(vec_file, cache_dir=cache)
    write_text(vec_file, WORDS, table(seed=1), header=True)
    after = load_vectors(vec_file, cache_dir=cache)
    np.testing.assert_allclose(after.lookup("dog"), table(seed=1)[WORDS.index("dog")], atol=1e-6)
    assert after.vectors_id != before.vectors_id  # the id follows the content


def test_leftover_temp_folder_is_ignored(vec_file, tmp_path):
    cache = tmp_path / "cache"
    final = convert_to_cache(vec_file, cache)
    wv = load_vectors(vec_file, cache_dir=cache)
    # A conversion that died halfway: a temp folder with a truncated matrix and no meta.json.
    shutil.rmtree(final)
    junk = cache / f".tmp-{final.name}-999-deadbeef"
    junk.mkdir()
    (junk / "matrix.npy").write_bytes(b"\x93NUMPY garbage")
    again = load_vectors(vec_file, cache_dir=cache)
    np.testing.assert_array_equal(again.matrix, wv.matrix)


def test_interrupted_conversion_leaves_nothing_that_loads(vec_file, tmp_path, monkeypatch):
    cache = tmp_path / "cache"

    def crash(self):
        raise RuntimeError("power cut")

    monkeypatch.setattr(vector_files._CacheWriter, "finish", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        load_vectors(vec_file, cache_dir=cache)
    assert list(cache.iterdir()) == []  # the temp folder was removed, no final folder exists
    monkeypatch.undo()
    assert list(load_vectors(vec_file, cache_dir=cache).words) == WORDS


def test_max_words_keeps_the_first_rows_in_its_own_cache(vec_file, tmp_path):
    cache = tmp_path / "cache"
    small = load_vectors(vec_file, cache_dir=cache, max_words=3)
    assert list(small.words) == WORDS[:3]
    np.testing.assert_allclose(small.matrix, table()[:3], atol=1e-6)
    full = load_vectors(vec_file, cache_dir=cache)
    assert len(full) == len(WORDS)
    assert len(list(cache.iterdir())) == 2


def test_default_cache_dir_reads_devise_home_at_call_time(tmp_path, monkeypatch):
    monkeypatch.setenv("DEVISE_HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / "vectors"
    monkeypatch.delenv("DEVISE_HOME")
    assert default_cache_dir() == Path("~/.cache/devise/vectors").expanduser()


# -- bad input --------------------------------------------------------------------------------


def test_malformed_lines_are_skipped_and_counted(tmp_path, caplog):
    good = table(["ankle", "boot", "dog"], dim=3)
    lines = [
        "ankle " + " ".join(f"{x:.4f}" for x in good[0]),
        "short 1.0 2.0",  # too few fields
        "boot " + " ".join(f"{x:.4f}" for x in good[1]),
        "word 1.0 abc 2.0",  # not a number
        "",  # a blank line is not data and not counted
        "nanny nan 1.0 2.0",  # non-finite values would poison norms
        "dog " + " ".join(f"{x:.4f}" for x in good[2]),
        "ankle 9 9 9",  # a repeat: the first one is kept
    ]
    path = tmp_path / "messy.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="devise.vector_files"):
        wv = load_vectors(path, cache_dir=tmp_path / "cache")
    assert list(wv.words) == ["ankle", "boot", "dog"]
    np.testing.assert_allclose(wv.matrix, good, atol=1e-6)
    assert wv.skipped_lines == 3
    assert "Skipped 3 malformed lines" in caplog.text
    assert load_vectors(path, cache_dir=tmp_path / "cache").skipped_lines == 3  # from meta.json


@pytest.mark.parametrize("content", ["", "\n\n", "3 4\nonly words here\nand more junk\n"])
def test_file_without_a_valid_line_raises(tmp_path, content):
    path = tmp_path / "bad.vec"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(VectorFileError, match="bad.vec"):
        load_vectors(path, cache_dir=tmp_path / "cache")
    cache = tmp_path / "cache"
    assert not cache.exists() or list(cache.iterdir()) == []


def test_missing_file_says_what_to_pass(tmp_path):
    with pytest.raises(VectorFileError) as err:
        load_vectors(tmp_path / "nope.vec", cache_dir=tmp_path / "cache")
    assert "nope.vec" in str(err.value) and "glove-100d" in str(err.value)


# -- lookup -----------------------------------------------------------------------------------


def test_phrase_is_the_mean_of_its_words(wv):
    expected = (row("ankle") + row("boot")) / 2
    np.testing.assert_allclose(wv.lookup("ankle boot"), expected, atol=1e-6)
    np.testing.assert_allclose(wv.lookup("  ankle_boot "), expected, atol=1e-6)
    three = (row("steel") + row("arch") + row("bridge")) / 3
    np.testing.assert_allclose(wv.lookup("steel arch bridge"), three, atol=1e-6)
    assert wv.has_vector("ankle boot")
    assert wv.lookup("ankle boot").dtype == np.float32


def test_missing_words_in_a_phrase_are_left_out(wv):
    np.testing.assert_allclose(wv.lookup("ankle qzxv"), row("ankle"), atol=1e-6)


def test_hyphenated_word_split_only_when_missing_as_a_whole(tmp_path):
    mat = table()
    split = write_text(tmp_path / "split.vec", WORDS, mat, header=True)
    wv = load_vectors(split, cache_dir=tmp_path / "c1")
    assert "t-shirt" not in wv
    np.testing.assert_allclose(wv.lookup("t-shirt"), (row("t") + row("shirt")) / 2, atol=1e-6)

    words = WORDS + ["t-shirt"]
    mat2 = table(words)
    whole = write_text(tmp_path / "whole.vec", words, mat2, header=True)
    wv2 = load_vectors(whole, cache_dir=tmp_path / "c2")
    assert "t-shirt" in wv2
    np.testing.assert_allclose(wv2.lookup("T-Shirt"), mat2[-1], atol=1e-6)


def test_case_folding_exact_then_lower_then_any_case(wv):
    np.testing.assert_allclose(wv.lookup("Paris"), row("Paris"), atol=1e-6)
    np.testing.assert_allclose(wv.lookup("paris"), row("paris"), atol=1e-6)
    np.testing.assert_allclose(wv.lookup("PARIS"), row("paris"), atol=1e-6)
    np.testing.assert_allclose(wv.lookup("DOG"), row("dog"), atol=1e-6)
    assert "Dog" in wv and "cat" not in wv
    cased = WordVectors(["Berlin"], np.ones((1, 2), np.float32), vectors_id="t")
    np.testing.assert_allclose(cased.lookup("berlin"), [1.0, 1.0])


def test_unknown_word_error_names_the_query_and_a_close_spelling(wv):
    with pytest.raises(UnknownWordError) as err:
        wv.lookup("ankel")
    e = err.value
    assert isinstance(e, KeyError)
    assert e.query == "ankel" and "ankle" in e.suggestions
    msg = str(e)
    assert msg.startswith("No word vector for")  # not KeyError's quoted repr
    assert '"ankel"' in msg and '"ankle"' in msg
    assert not wv.has_vector("ankel")
    with pytest.raises(UnknownWordError, match="qzxv"):
        wv.lookup_many(["dog", "qzxv"])


def test_lookup_many_stacks_rows(wv):
    got = wv.lookup_many(["dog", "ankle boot"])
    assert got.shape == (2, 8) and got.dtype == np.float32
    np.testing.assert_allclose(got[0], row("dog"), atol=1e-6)


def test_nearest_finds_the_word_itself_first(wv):
    for word in ["dog", "bridge", "the"]:
        hits = wv.nearest(wv.lookup(word), k=3)
        assert hits[0][0] == word and hits[0][1] == pytest.approx(1.0, abs=1e-5)
        scores = [s for _, s in hits]
        assert scores == sorted(scores, reverse=True) and len(hits) == 3
    hits = wv.nearest(wv.lookup("dog"), k=len(WORDS), exclude=["DOG"])
    assert "dog" not in [w for w, _ in hits] and len(hits) == len(WORDS) - 1


def test_nearest_cosine_matches_a_direct_computation(wv):
    q = row("steel") + row("arch")
    m = table()
    cos = m @ q / (np.linalg.norm(m, axis=1) * np.linalg.norm(q))
    best = [WORDS[i] for i in np.argsort(-cos)[:4]]
    assert [w for w, _ in wv.nearest(q, k=4)] == best


def test_nearest_can_be_limited_to_the_most_frequent_rows(wv):
    last = WORDS[-1]
    assert wv.nearest(wv.lookup(last), k=1)[0][0] == last
    limited = wv.nearest(wv.lookup(last), k=3, top_words=3)
    assert {w for w, _ in limited} == set(WORDS[:3])


def test_suggest_ranks_close_spellings(wv):
    assert wv.suggest("brige")[0] == "bridge"
    assert wv.suggest("zzzzzzzzzz") == []


def test_in_memory_table_with_repeated_words_uses_the_first():
    mat = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], dtype=np.float32)
    wv = WordVectors(["Cat", "cat", "cat"], mat, vectors_id="mem")
    np.testing.assert_allclose(wv.lookup("cat"), [0.0, 1.0])
    np.testing.assert_allclose(wv.lookup("Cat"), [1.0, 0.0])
    np.testing.assert_allclose(wv.lookup("CAT"), [0.0, 1.0])  # lower-case before any-case
