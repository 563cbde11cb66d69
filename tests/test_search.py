"""Search on embeddings folders written without Ray: top-k, CLI output, errors, montage, image
queries (the in-process runner), and readers seeing only committed versions."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from devise import cli
from devise.config import EmbedConfig
from devise.embed import embed
from devise.model import DeviseHead, HeadSpec, save_model
from devise.search import EmbeddingIndex, montage, query_vector, search_text
from devise.similarity import top_k
from devise.store import CURRENT_FILE, STAGING_DIR, VERSIONS_DIR, Store
from devise.vectors import load_vectors

WORDS = ["cat", "dog", "car", "ship", "ankle", "boot", "shoe", "bridge", "kitten", "the"]


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    # Word-vector caches go under the test's folder, not the user's.
    monkeypatch.setenv("DEVISE_HOME", str(tmp_path / "home"))


@pytest.fixture
def word_vectors(vec_file):
    return load_vectors(vec_file)


def _unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture
def emb_dir(tmp_path, vec_file, word_vectors):
    """A committed version: for each of cat, dog, car, ship, three images whose embeddings are
    that word's vector plus growing noise (so rank order within a class is known)."""
    rng = np.random.default_rng(0)
    rows, embs = [], []
    for w in ["cat", "dog", "car", "ship"]:
        for j, noise in enumerate([0.05, 0.3, 0.6]):
            path = tmp_path / "img" / f"{w}_{j}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(path)
            v = _unit(word_vectors.lookup(w))
            rows.append({"path": str(path), "label": w, "class_name": w})
            embs.append(_unit(v + noise * _unit(rng.normal(size=v.shape))))
    import pandas as pd

    out = tmp_path / "emb"
    Store.open(out, create=True).write_version(
        pd.DataFrame(rows),
        np.stack(embs),
        model_id="synthetic",
        vectors=str(vec_file),
        vectors_id=word_vectors.vectors_id,
        chunk_rows=5,
    )
    return out


def test_top_k_equals_a_full_sort():
    rng = np.random.default_rng(1)
    m = _unit(rng.normal(size=(500, 16)))
    q = _unit(rng.normal(size=(7, 16)))
    full = q @ m.T
    expected = np.argsort(-full, axis=1)[:, :10]
    scores, idx = top_k(m, q, 10)
    assert idx.shape == (7, 10) and scores.dtype == np.float32
    assert np.array_equal(idx, expected)
    assert np.allclose(scores, np.take_along_axis(full, expected, axis=1))
    # Query blocks (a small memory budget) give the same answer.
    s2, i2 = top_k(m, q, 10, block_bytes=4 * 500 * 2)
    assert np.array_equal(i2, idx) and np.allclose(s2, scores)
    # k larger than the table: everything, sorted.
    s3, i3 = top_k(m[:4], q[0], 10)
    assert i3.shape == (1, 4) and np.all(np.diff(s3[0]) <= 0)


def test_index_opens_the_current_version(emb_dir, word_vectors):
    index = EmbeddingIndex.open(emb_dir)
    assert len(index) == 12 and index.dim == 8 and index.model_id == "synthetic"
    assert index.matrix.dtype == np.float32
    assert np.allclose(np.linalg.norm(index.matrix, axis=1), 1.0, atol=1e-5)
    hits = search_text(index, ["cat", "ship"], word_vectors, k=3)
    assert [h.path.rsplit("/", 1)[1] for h in hits[0]] == ["cat_0.png", "cat_1.png", "cat_2.png"]
    assert [h.label for h in hits[1]] == ["ship"] * 3
    assert hits[0][0].score > hits[0][1].score > hits[0][2].score
    v = query_vector("cat", word_vectors)
    assert v.shape == (8,) and np.isclose(np.linalg.norm(v), 1.0)


def test_search_cli_prints_rank_score_label_path_and_json(emb_dir, capsys):
    assert cli.main(["search", "dog", "--embeddings", str(emb_dir), "-k", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["rank", "score", "class", "path"]
    assert out[2].split()[0] == "1" and out[2].split()[2] == "dog"
    assert out[2].split()[3].endswith("dog_0.png")

    assert cli.main(["search", "car", "ship", "--embeddings", str(emb_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data) == 20  # 10 per query
    first = data[0]
    assert {"rank", "path", "label", "score"} <= set(first)
    assert first["rank"] == 1 and first["label"] == "car" and first["query"] == "car"
    assert data[10]["label"] == "ship"


def test_montage_draws_one_row_per_query(emb_dir, word_vectors, tmp_path, capsys):
    out = tmp_path / "m.png"
    rc = cli.main(["search", "cat", "dog", "--embeddings", str(emb_dir), "-k", "3"])
    assert rc == 0
    rc = cli.main(
        ["search", "cat", "dog", "--embeddings", str(emb_dir), "-k", "3", "--montage", str(out)]
    )
    assert rc == 0 and out.exists()
    w, h = Image.open(out).size
    assert w > 3 * 128 and h > 2 * 128
    # An image deleted after embedding becomes a grey tile, not a crash.
    index = EmbeddingIndex.open(emb_dir)
    hits = search_text(index, ["cat"], word_vectors, k=2)
    os.remove(hits[0][0].path)
    assert montage(hits, tmp_path / "m2.png").exists()


@pytest.mark.parametrize("name", ["folder", "montage", "afile/m.png"])
def test_bad_montage_names_fail_in_one_line_before_searching(emb_dir, tmp_path, capsys, name):
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("x")
    rc = cli.main(
        ["search", "cat", "--embeddings", str(emb_dir), "--montage", str(tmp_path / name)]
    )
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "--montage" in err and "Traceback" not in err
    assert (tmp_path / "afile").read_text() == "x" and not list((tmp_path / "folder").iterdir())


def test_unknown_word_is_one_line_with_spellings(emb_dir, capsys):
    rc = cli.main(["search", "kiten", "--embeddings", str(emb_dir)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith("devise search: error:") and '"kitten"' in err


def test_mismatched_vectors_are_refused(emb_dir, tmp_path, capsys):
    from conftest import write_vec

    wide = tmp_path / "wide.vec"
    write_vec(wide, WORDS, dim=16, seed=1)
    rc = cli.main(["search", "cat", "--embeddings", str(emb_dir), "--vectors", str(wide)])
    err = capsys.readouterr().err.strip()  # after a line saying the new table is converted
    assert rc == 2 and err.splitlines()[-1].startswith("devise search: error:")
    assert err.count("error:") == 1 and "8-d" in err and "16-d" in err
    other = tmp_path / "other.vec"
    write_vec(other, WORDS, dim=8, seed=7)
    rc = cli.main(["search", "cat", "--embeddings", str(emb_dir), "--vectors", str(other)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "was embedded for text space" in err


def test_missing_folder_is_one_clear_error(tmp_path, capsys):
    rc = cli.main(["search", "cat", "--embeddings", str(tmp_path / "nope")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "does not exist" in err and "devise embed" in err


@pytest.mark.parametrize("k", ["0", "1001"])
def test_k_out_of_bounds_is_the_apis_sentence_before_anything_opens(tmp_path, capsys, k):
    """-k is held to Index's own bounds (1..MAX_K), said before the folder is even looked at."""
    rc = cli.main(["search", "cat", "--embeddings", str(tmp_path / "nope"), "-k", k])
    err = capsys.readouterr().err
    assert rc == 2 and err == (
        f"devise search: error: k must be a whole number from 1 to 1000, not {k}.\n"
    )


def test_readers_never_see_staged_or_uncommitted_data(emb_dir, word_vectors):
    """A writer mid-commit leaves staging parts and a .tmp version; readers follow CURRENT."""
    before = EmbeddingIndex.open(emb_dir)
    staging = emb_dir / STAGING_DIR / "othermodel"
    staging.mkdir(parents=True)
    (staging / "part-00000.parquet").write_bytes(b"half")
    tmp_version = emb_dir / VERSIONS_DIR / ".tmp-000002-othermodel-abcd"
    tmp_version.mkdir()
    (tmp_version / "part-00000.parquet").write_bytes(b"half")
    no_manifest = emb_dir / VERSIONS_DIR / "000003-othermodel"
    no_manifest.mkdir()
    after = EmbeddingIndex.open(emb_dir)
    assert after.version == before.version and len(after) == len(before)
    # A second commit switches readers to it as a whole; the first version stays readable.
    import pandas as pd

    Store.open(emb_dir).write_version(
        pd.DataFrame({"path": ["/x/a.png", "/x/b.png"]}),
        _unit(np.ones((2, 8))),
        model_id="m2",
        vectors_id=word_vectors.vectors_id,
    )
    assert (emb_dir / CURRENT_FILE).read_text().strip().endswith("-m2")
    assert len(EmbeddingIndex.open(emb_dir)) == 2
    assert len(EmbeddingIndex.open(emb_dir, version=before.version)) == 12


def test_image_query_finds_itself_and_nearest_labels(tmp_path, image_tree, vec_file, capsys):
    """Embed in-process (no Ray), then search with one of the images."""
    wv = load_vectors(vec_file)
    torch.manual_seed(0)
    spec = HeadSpec(
        in_dim=64, out_dim=8, backbone="tiny", image_size=32, vectors=str(vec_file),
        vectors_id=wv.vectors_id, class_names=["cat", "dog", "car", "ship", "ankle boot"],
    )  # fmt: skip
    save_model(tmp_path / "model", DeviseHead(spec).eval())
    out = tmp_path / "emb"
    embed(
        EmbedConfig(
            model_dir=str(tmp_path / "model"), out=str(out), images=str(image_tree), local=True
        )
    )
    query = image_tree / "dog" / "img_3.png"
    rc = cli.main(
        ["search", "--image", str(query), "--embeddings", str(out), "-k", "3", "--json"]
    )  # fmt: skip
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    # The query image itself is left out by default, and no labels are printed unless asked.
    assert len(data["images"]) == 3 and str(query) not in [h["path"] for h in data["images"]]
    assert data["labels"] == []
    rc = cli.main(
        ["search", "--image", str(query), "--embeddings", str(out), "-k", "3", "--words", "4",
         "--include-self", "--json"]
    )  # fmt: skip
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert data["images"][0]["path"] == str(query)
    assert data["images"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    # Nearest labels come from the label vocabulary: by default the model's classes.
    classes = set(spec.class_names)
    assert len(data["labels"]) == 4 and all(w["label"] in classes for w in data["labels"])
    scores = [w["score"] for w in data["labels"]]
    assert scores == sorted(scores, reverse=True)
    vocab = tmp_path / "labels.txt"
    vocab.write_text("kitten\nshoe\n\nbridge\nshoe\n", encoding="utf-8")
    rc = cli.main(
        ["search", "--image", str(query), "--embeddings", str(out), "--words", "5",
         "--vocabulary", str(vocab), "--json"]
    )  # fmt: skip
    assert rc == 0
    got = [w["label"] for w in json.loads(capsys.readouterr().out)["labels"]]
    assert sorted(got) == ["bridge", "kitten", "shoe"]
    rc = cli.main(
        ["search", "--image", str(query), "--embeddings", str(out), "--words", "3",
         "--vocabulary", str(tmp_path / "none.txt")]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "none.txt" in err and len(err.splitlines()) == 1
    # Another model than the one that embedded the folder is refused.
    torch.manual_seed(1)
    save_model(tmp_path / "model2", DeviseHead(spec).eval())
    rc = cli.main(
        ["search", "--image", str(query), "--embeddings", str(out), "--model",
         str(tmp_path / "model2")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "was embedded with model" in err


def test_results_name_a_class_the_way_people_do_and_keep_its_id(tmp_path, vec_file, capsys):
    """A Tiny ImageNet store labels rows by wnid: the table, --json and the API show the class
    name ("ship"), and --json keeps the id as `label`."""
    import pandas as pd

    from devise.api import Index
    from devise.vectors import load_vectors

    wv = load_vectors(vec_file)
    rows, embs = [], []
    for j, (wnid, name) in enumerate([("n04194289", "ship"), ("n02084071", "dog")]):
        path = tmp_path / "img" / f"{j}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(path)
        rows.append({"path": str(path), "label": wnid, "class_name": name})
        embs.append(_unit(wv.lookup(name)))
    out = tmp_path / "emb"
    Store.open(out, create=True).write_version(
        pd.DataFrame(rows), np.stack(embs), model_id="synthetic", vectors=str(vec_file),
        vectors_id=wv.vectors_id,
    )  # fmt: skip
    assert cli.main(["search", "ship", "--embeddings", str(out), "-k", "1"]) == 0
    line = capsys.readouterr().out.splitlines()[2].split()
    assert line[2] == "ship" and "n04194289" not in line
    assert cli.main(["search", "ship", "--embeddings", str(out), "-k", "1", "--json"]) == 0
    (hit,) = json.loads(capsys.readouterr().out)
    assert (hit["label"], hit["class_name"]) == ("n04194289", "ship")
    (api_hit,) = Index.open(out).search("ship", k=1)
    assert (api_hit["label"], api_hit["class_name"]) == ("n04194289", "ship")
