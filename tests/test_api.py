"""The Python API (`from devise import Index`): records, ids, text/image/similar search, bad
input, version following, and imports that stay light until a query needs a model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest
from index_data import make_searchable
from PIL import Image

from devise.search import SearchError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEVISE_HOME", str(root / "home"))
        yield make_searchable(root)


def test_text_search_returns_ranked_records_of_the_right_class(data):
    from devise import Index

    index = Index.open(data["emb"])
    hits = index.search("dog", k=4)
    assert [h["rank"] for h in hits] == [1, 2, 3, 4]
    assert set(hits[0]) == {"rank", "id", "path", "label", "class_name", "score"}
    assert [h["label"] for h in hits] == ["dog"] * 4
    assert hits[0]["score"] >= hits[-1]["score"]
    both = index.search(["car", "ship"], k=2)
    assert [[h["label"] for h in row] for row in both] == [["car", "car"], ["ship", "ship"]]
    info = index.info()
    assert info["rows"] == 20 and info["version"] == index.version and info["dim"] == 8
    assert info["model_id"] == index.model_id


def test_image_search_and_similar_leave_the_query_out(data):
    from devise import Index

    index = Index.open(data["emb"])
    query = data["paths"][5]  # a car image
    own = index.search_image(query, k=3, include_self=True)
    assert own[0]["path"] == query and own[0]["score"] == pytest.approx(1.0, abs=1e-4)
    hits = index.search_image(query, k=3)
    assert query not in [h["path"] for h in hits] and len(hits) == 3
    assert [h["label"] for h in hits] == ["car"] * 3
    # A PIL image and encoded bytes work too.
    pil = index.search_image(Image.open(query), k=1, include_self=True)
    with open(query, "rb") as f:
        raw = index.search_image(f.read(), k=1)
    assert pil[0]["path"] == raw[0]["path"] == query
    similar = index.similar(own[0]["id"], k=3)
    assert own[0]["id"] not in [h["id"] for h in similar]
    assert [h["label"] for h in similar] == ["car"] * 3
    assert str(index.path_of(own[0]["id"])) == query


def test_bad_queries_are_one_clear_error(data, tmp_path):
    from devise import Index
    from devise.images import ImageDecodeError
    from devise.vectors import UnknownWordError

    index = Index.open(data["emb"])
    for bad in ["", "   ", "x" * 10_000]:
        with pytest.raises(SearchError):
            index.search(bad)
    for k in [0, -1, 10**9, 2.5]:
        with pytest.raises(SearchError, match="k must be"):
            index.search("cat", k=k)
    with pytest.raises(UnknownWordError, match="kitten"):
        index.search("kiten")
    with pytest.raises(KeyError, match="No image with id"):
        index.similar("0123456789abcdef")
    with pytest.raises(KeyError):
        index.path_of("../../etc/passwd")
    with pytest.raises(ImageDecodeError, match="not an image"):
        index.search_image(b"this is text, not an image")


def test_reopen_follows_current_and_keeps_loaded_encoders(data, tmp_path):
    from devise import Index
    from devise.store import Store

    emb = tmp_path / "emb"
    shutil.copytree(data["emb"], emb)
    index = Index.open(emb)
    index.search("cat")
    assert index.reopen() is index
    old = Index.open(emb)
    m = old._base.manifest
    Store.open(emb, create=True).write_version(
        pd.DataFrame({"path": data["paths"][:3], "label": ["cat"] * 3}),
        old._base.matrix[:3],
        model_id=m.model_id,
        vectors=m.vectors,
        vectors_id=m.vectors_id,
        extra={"model_dir": m.model_dir},
    )
    new = index.reopen()
    assert new is not index and len(new) == 3 and new.version != index.version
    assert new._word_vectors is index._word_vectors  # same vectors: not loaded again
    assert len(index) == 20  # the old object still answers from its own version
    pinned = Index.open(emb, version=index.version)
    assert pinned.reopen() is pinned


def test_import_and_open_load_neither_ray_nor_torch(data):
    """Opening an index and a text search with a word table load neither Ray nor torch, nor
    pandas (a second of a cold `devise search` on a small machine)."""
    code = (
        "import sys, json\n"
        "from devise import Index\n"
        f"index = Index.open({str(data['emb'])!r})\n"
        "index.info()\n"
        "assert index.search('dog', k=2)[0]['label'] == 'dog'\n"
        "print(json.dumps([m for m in ('torch', 'ray', 'pandas') if m in sys.modules]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(out.stdout) == []


def test_batched_search_answers_each_request_as_alone(data):
    """The service answers concurrent /api/search requests as one batch: each request gets what
    a search of its own would give (its own k), and a bad request fails alone."""
    from devise import Index
    from devise.search import SearchError
    from devise.vectors import UnknownWordError
    from devise.webapp import search_many

    index = Index.open(data["emb"])
    requests = [(["dog"], 2), (["car", "ship"], 4), (["cat"], 1)]
    found = search_many(index, requests)
    assert found == [index.search(q, k) for q, k in requests]
    assert [len(hits) for hits in found[1]] == [4, 4] and len(found[2][0]) == 1
    bad = search_many(
        index, [(["dog"], 3), ([""], 3), (["kiten"], 3), (["ship"], 0), (["ship"], 2.5)]
    )
    assert bad[0] == index.search(["dog"], 3)
    assert isinstance(bad[1], SearchError) and isinstance(bad[2], UnknownWordError)
    assert isinstance(bad[3], SearchError) and "k must be" in str(bad[3])
    assert isinstance(bad[4], SearchError) and "whole number" in str(bad[4])


def test_the_service_routes_answer_without_ray(data):
    """The service's FastAPI app run in-process (serve.local_app under uvicorn): the same routes
    the Serve deployment uses, checked where Ray is not needed."""
    import requests

    from devise.config import ServiceConfig
    from devise.serve import serve_locally

    with serve_locally(ServiceConfig(embeddings=str(data["emb"]), poll_s=60)) as url:
        body = requests.get(f"{url}/api/search", params={"q": "ship", "k": 2}, timeout=60).json()
        assert [h["label"] for h in body["results"]] == ["ship", "ship"]
        first = body["results"][0]["id"]
        similar = requests.get(f"{url}/api/similar/{first}", params={"k": 2}, timeout=60).json()
        assert first not in [h["id"] for h in similar["results"]]
        thumb = requests.get(f"{url}/api/image/{first}", params={"size": 32}, timeout=60)
        assert thumb.headers["content-type"] == "image/jpeg"
        bad = requests.get(f"{url}/api/search", params={"q": "cat", "k": 0}, timeout=60)
        assert bad.status_code == 400 and list(bad.json()) == ["error"]
        assert requests.get(f"{url}/api/image/nope", timeout=60).status_code == 404
        assert 'id="q"' in requests.get(f"{url}/", timeout=60).text
        # Without k, the routes answer the same number of results as the CLI and Index.search.
        from devise.config import DEFAULT_K

        paths = requests.get(f"{url}/api/openapi", timeout=60).json()["paths"]
        for route in ("/api/search", "/api/similar/{id}"):
            (k,) = [x for x in paths[route]["get"]["parameters"] if x["name"] == "k"]
            assert k["schema"]["default"] == DEFAULT_K, route
