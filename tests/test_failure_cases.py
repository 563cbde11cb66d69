"""Hostile-input cases that once gave a traceback, a hang or a wrong sentence: each is now one
line with the right exit code (or one warning), checked here without Ray."""

from __future__ import annotations

import logging
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from devise.cli import main as cli_main
from devise.store import Store

pytestmark = pytest.mark.timeout(120)  # a hang (a FIFO read) fails instead of waiting forever


@pytest.fixture
def emb(tmp_path, vec_file):
    """One committed version of 8 real images, embedded for the tiny word vectors."""
    from devise.vectors import load_vectors

    wv = load_vectors(vec_file)
    rng = np.random.default_rng(0)
    rows, x = [], []
    for i in range(8):
        path = tmp_path / "img" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
        rows.append({"path": str(path), "label": "cat"})
        x.append(rng.normal(size=wv.dim))
    x = np.asarray(x, np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    out = tmp_path / "emb"
    Store.open(out, create=True).write_version(
        pd.DataFrame(rows),
        x,
        model_id="synthetic",
        vectors=str(vec_file),
        vectors_id=wv.vectors_id,
    )
    return out


def _one_line(capsys, code: int, *words: str) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "Traceback" not in err and captured.out == ""
    for w in words:
        assert w in err, err
    return err


@pytest.mark.parametrize("query", [os.fsdecode(b"sho\xffe"), "sho\ud800e"])
def test_a_query_that_is_not_utf8_is_one_line(emb, capsys, query):
    from devise.api import Index
    from devise.search import SearchError

    code = cli_main(["search", query, "--embeddings", str(emb)])
    _one_line(capsys, code, "valid UTF-8")
    with pytest.raises(SearchError, match="valid UTF-8"):
        Index.open(emb).search(query)


def test_search_image_on_a_fifo_is_one_line_not_a_hang(emb, tmp_path, capsys):
    fifo = tmp_path / "photo.png"
    os.mkfifo(fifo)
    code = cli_main(["search", "--embeddings", str(emb), "--image", str(fifo)])
    _one_line(capsys, code, "not a regular file")


def test_a_fifo_among_the_stores_images_gives_no_thumbnail_and_no_hang(tmp_path):
    from devise.api import thumbnail
    from devise.images import ImageDecodeError

    fifo = tmp_path / "indexed.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageDecodeError, match="not a regular file"):
        thumbnail(fifo, 64)


def test_image_that_is_not_an_image_is_said_before_the_model_loads(
    emb, tmp_path, capsys, monkeypatch
):
    import devise.api

    def no_model(*a, **kw):
        raise AssertionError("the model was loaded for a file that is no image")

    monkeypatch.setattr(devise.api, "_ImageEncoder", no_model)
    bad = tmp_path / "notimg.png"
    bad.write_text("hello")
    code = cli_main(["search", "--embeddings", str(emb), "--image", str(bad)])
    _one_line(capsys, code, "Cannot use", "notimg.png", "not an image")


def test_a_damaged_only_version_never_says_version_none(emb, caplog):
    store = Store.open(emb)
    version = store.current()
    part = next((emb / "versions" / version).glob("part-*.parquet"))
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert Store.open(emb).current() is None
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "no intact version is left" in said and "None" not in said


def test_vectors_that_name_a_folder_say_what_the_folder_lacks(tmp_path):
    from devise.text import TextSpaceError, load_text_space

    folder = tmp_path / "some-folder"
    folder.mkdir()
    with pytest.raises(TextSpaceError, match="is a folder that holds neither") as e:
        load_text_space(folder)
    assert "does not exist" not in str(e.value)


def test_a_failed_ray_start_with_address_local_does_not_suggest_address_local(monkeypatch):
    import ray

    from devise import runtime
    from devise.errors import DeviseError

    monkeypatch.setattr(runtime, "_ray_initialized", lambda: False)

    def fail(**kwargs):
        raise RuntimeError("the raylet did not start in time")

    monkeypatch.setattr(ray, "init", fail)
    with pytest.raises(DeviseError) as local:
        runtime.init_ray("local")
    assert "start a local Ray" in str(local.value) and "--address local" not in str(local.value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(runtime, "ray_address", lambda flag: (None, "no cluster recorded"))
    with pytest.raises(DeviseError, match="--address local for a fresh local Ray"):
        runtime.init_ray(None)
