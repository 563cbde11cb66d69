"""Class names from Tiny ImageNet files and folder names, and their unit-length class vectors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from devise.labels import (
    ClassInfo,
    class_name,
    class_vectors,
    folder_classes,
    read_tiny_imagenet_classes,
)
from devise.vectors import WordVectors

WORDS = ["steel", "arch", "bridge", "goldfish", "ankle", "boot", "t-shirt", "dog"]


@pytest.fixture
def wv() -> WordVectors:
    rng = np.random.default_rng(0)
    return WordVectors(
        WORDS, rng.normal(size=(len(WORDS), 6)).astype(np.float32), vectors_id="tiny-6d"
    )


def vec(wv: WordVectors, word: str) -> np.ndarray:
    return np.asarray(wv.matrix[WORDS.index(word)], dtype=np.float64)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x)


@pytest.fixture
def tiny_root(tmp_path):
    (tmp_path / "wnids.txt").write_text("n01\nn02\nn03\nn04\n", encoding="utf-8")
    (tmp_path / "words.txt").write_text(
        "n00\tunused entry\n"
        "n01\tSteel arch bridge, bridge\n"
        "n02\tgoldfish, Carassius auratus\n"
        "n03\tqwzx, vrrpt\n"  # no vectors anywhere
        "n99\tdog\n",  # not a class: wnids.txt does not list it
        encoding="utf-8",
    )  # n04 has no line in words.txt at all
    return tmp_path


def test_read_tiny_imagenet_classes(tiny_root):
    classes = read_tiny_imagenet_classes(tiny_root)
    assert classes == [
        ClassInfo("n01", ["steel arch bridge", "bridge"]),
        ClassInfo("n02", ["goldfish", "carassius auratus"]),
        ClassInfo("n03", ["qwzx", "vrrpt"]),
        ClassInfo("n04", []),
    ]
    assert [class_name(c) for c in classes] == ["steel arch bridge", "goldfish", "qwzx", "n04"]


def test_missing_tiny_imagenet_file_is_named(tmp_path):
    (tmp_path / "wnids.txt").write_text("n01\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="words.txt"):
        read_tiny_imagenet_classes(tmp_path)


def test_class_vectors_exclude_classes_without_vectors_in_one_warning(tiny_root, wv):
    classes = read_tiny_imagenet_classes(tiny_root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cv = class_vectors(classes, wv)
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "Excluded 2" in msg and "n03 (qwzx)" in msg and "n04" in msg
    assert cv.keys == ["n01", "n02"]
    assert cv.names == ["steel arch bridge", "goldfish"]
    assert cv.missing == ["n03", "n04"]
    assert cv.matrix.shape == (2, 6) and cv.matrix.dtype == np.float32
    # n01: mean of the unit phrase vector (itself a mean of 3 words) and unit "bridge".
    phrase = (vec(wv, "steel") + vec(wv, "arch") + vec(wv, "bridge")) / 3
    want = unit(unit(phrase) + unit(vec(wv, "bridge")))
    np.testing.assert_allclose(cv.matrix[0], want, atol=1e-6)
    # n02: "carassius auratus" has no vector, so only "goldfish" counts.
    np.testing.assert_allclose(cv.matrix[1], unit(vec(wv, "goldfish")), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(cv.matrix, axis=1), 1.0, atol=1e-6)


def test_no_warning_when_every_class_has_a_vector(wv):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cv = class_vectors([ClassInfo("a", ["dog"]), ClassInfo("b", ["boot"])], wv)
    assert cv.missing == [] and len(cv) == 2


def test_no_class_with_a_vector_raises(wv):
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="None of the 2 classes"):
        class_vectors([ClassInfo("a", ["qwzx"]), ClassInfo("b", [])], wv)


def test_folder_classes_turn_underscores_into_spaces_and_keep_hyphens(wv):
    classes = folder_classes(["ankle_boot", "t-shirt", "Dog"])
    assert classes == [
        ClassInfo("ankle_boot", ["ankle boot"]),
        ClassInfo("t-shirt", ["t-shirt"]),
        ClassInfo("Dog", ["Dog"]),
    ]
    cv = class_vectors(classes, wv)
    assert cv.keys == ["ankle_boot", "t-shirt", "Dog"]
    assert cv.names == ["ankle boot", "t-shirt", "Dog"]
    np.testing.assert_allclose(
        cv.matrix[0], unit((vec(wv, "ankle") + vec(wv, "boot")) / 2), atol=1e-6
    )
    np.testing.assert_allclose(cv.matrix[1], unit(vec(wv, "t-shirt")), atol=1e-6)
    np.testing.assert_allclose(cv.matrix[2], unit(vec(wv, "dog")), atol=1e-6)


def test_each_wording_puts_a_class_into_words():
    from devise.labels import class_texts, describe

    (goldfish,) = describe([ClassInfo("n01443537", ["goldfish", "carassius auratus"])])
    assert class_texts(goldfish, "name") == ["goldfish"]
    assert class_texts(goldfish, "names") == ["goldfish", "carassius auratus"]
    assert class_texts(goldfish, "gloss")[0].startswith("goldfish: small golden or orange-red")
    assert class_texts(goldfish, "names-gloss")[0].startswith("goldfish, carassius auratus: small")
    assert class_texts(goldfish, "hypernyms-gloss")[0].startswith("goldfish (cyprinid, ")
    (dress,) = describe([ClassInfo("dress", ["dress"])])  # a folder name: WordNet's noun
    assert class_texts(dress, "gloss") == [
        "dress: a one-piece garment for a woman; has skirt and bodice"
    ]
    (odd,) = describe([ClassInfo("qwzx", ["qwzx"])])  # no WordNet noun: its name alone
    assert class_texts(odd, "gloss") == ["qwzx"]
    with pytest.raises(ValueError, match="wording"):
        class_texts(odd, "poem")


def test_a_class_text_file_replaces_wordnet_descriptions(tmp_path):
    from devise.labels import class_texts, describe, read_class_text

    f = tmp_path / "classes.tsv"
    f.write_text(
        "# class<TAB>description\nn01443537\ta small orange pond fish\n\nsandal\topen shoe\n"
    )
    texts = read_class_text(f)
    assert texts == {"n01443537": "a small orange pond fish", "sandal": "open shoe"}
    fish, sandal = describe([ClassInfo("n01443537", []), ClassInfo("x", ["sandal"])], texts)
    assert class_texts(fish, "gloss") == ["goldfish: a small orange pond fish"]
    assert class_texts(sandal, "gloss") == ["sandal: open shoe"]
    f.write_text("n01443537 no tab here\n")
    with pytest.raises(ValueError, match="Line 1 of class text file"):
        read_class_text(f)
