"""A fair service, checked on the service's FastAPI app in this process (no Ray): per-request
caps, uploads refused by Content-Length and by decoded pixels, HEAD and Allow, the Host
allow-list, no server folders in replies, one failing request never failing its batch, cached
queries answered apart from slow encodings, the damaged-version warning said once, and every
`devise serve` flag checked in one line before anything starts."""

from __future__ import annotations

import io
import logging
import socket
import threading
import time
from dataclasses import asdict

import pytest
import requests
from index_data import make_searchable
from PIL import Image

from devise.cli import main as cli_main

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("guard")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEVISE_HOME", str(root / "home"))
        yield make_searchable(root)


@pytest.fixture(scope="module")
def url(data):
    from devise.config import ServiceConfig
    from devise.serve import serve_locally
    from devise.webapp import LOOPBACK_NAMES

    config = ServiceConfig(
        embeddings=str(data["emb"]),
        poll_s=60,
        max_upload_mb=1.0,
        allowed_hosts=list(LOOPBACK_NAMES),
    )
    with serve_locally(config) as url:
        yield url


def _one_line_error(r, status: int, *words: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert list(body) == ["error"] and "\n" not in body["error"], body
    for w in words:
        assert w in body["error"], body
    return body["error"]


def test_query_count_results_and_reply_size_are_capped(url):
    from devise.webapp import MAX_QUERIES, MAX_RESULTS

    r = requests.get(f"{url}/api/search", params={"q": ["ship"] * 8000}, timeout=60)
    _one_line_error(r, 400, str(MAX_QUERIES), str(MAX_RESULTS), "8000")
    r = requests.get(f"{url}/api/search", params={"q": ["ship"] * 10, "k": 1000}, timeout=60)
    _one_line_error(r, 400, str(MAX_RESULTS), "k=1000")
    ok = requests.get(f"{url}/api/search", params={"q": ["ship"] * MAX_QUERIES, "k": 2}, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["results"]) == 2 * MAX_QUERIES


def test_reply_size_cap_names_the_limit(url, monkeypatch):
    import devise.webapp

    monkeypatch.setattr(devise.webapp, "MAX_REPLY_MB", 0.0001)
    r = requests.get(f"{url}/api/search", params={"q": ["ship"] * 4, "k": 5}, timeout=60)
    _one_line_error(r, 400, "MB limit of one reply")


def test_an_upload_is_refused_by_its_content_length_before_it_is_read(url):
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST /api/search/image HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: multipart/form-data; boundary=x\r\n"
            b"Content-Length: 314572800\r\n\r\n"  # 300 MB announced, none of it sent
        )
        reply = s.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 413"), reply
    assert '"error"' in reply and "1 MB limit" in reply


def test_an_upload_over_the_pixel_budget_is_refused_and_a_good_one_answers(url, data):
    from devise.webapp import MAX_UPLOAD_PIXELS

    big = io.BytesIO()  # 50 megapixels of one colour: a ~50 KB PNG
    Image.new("L", (7100, 7100), 255).save(big, format="PNG")
    assert len(big.getvalue()) < 1 << 20
    r = requests.post(
        f"{url}/api/search/image", files={"file": ("big.png", big.getvalue())}, timeout=60
    )
    _one_line_error(r, 415, "too large", str(MAX_UPLOAD_PIXELS))
    car = next(p for p in data["paths"] if "/car/" in p)
    with open(car, "rb") as f:
        r = requests.post(
            f"{url}/api/search/image", files={"file": ("c.png", f.read())}, timeout=60
        )
    assert r.status_code == 200 and r.json()["results"][0]["label"] == "car"


def test_head_answers_get_routes_and_405_names_the_allowed_methods(url):
    for path in ("/", "/api/info", "/healthz", "/api/search?q=ship"):
        got, head = requests.get(url + path, timeout=60), requests.head(url + path, timeout=60)
        assert head.status_code == 200 == got.status_code, path
        assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"]
    r = requests.post(f"{url}/api/info", timeout=60)
    _one_line_error(r, 405, "GET")
    assert set(r.headers["allow"].split(", ")) == {"GET", "HEAD"}
    r = requests.delete(f"{url}/api/search/image", timeout=60)
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_a_loopback_service_answers_only_loopback_host_names(url):
    port = url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.2", "localhost.evil.example"):
        r = requests.get(f"{url}/api/info", headers={"Host": host}, timeout=60)
        _one_line_error(r, 421, "localhost")
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost"):
        assert requests.get(f"{url}/api/info", headers={"Host": host}, timeout=60).ok, host


def test_replies_name_no_server_folder(url, data):
    root = str(data["emb"].parent)
    info = requests.get(f"{url}/api/info", timeout=60).json()
    assert info["embeddings"] == "emb" and info["max_queries"] and info["max_results"]
    for path in ("/api/similar/0123456789abcdef", "/api/image/0123456789abcdef"):
        assert root not in _one_line_error(requests.get(url + path, timeout=60), 404)


def test_one_failing_request_never_fails_the_others_in_its_batch(data):
    from devise.api import Index
    from devise.search import SearchError
    from devise.webapp import search_many

    index = Index.open(data["emb"])
    real = index.search

    def flaky(queries, k=10):  # as a damaged index might, for one query only
        if "ship" in queries:
            raise IndexError("index 987654321 is out of bounds for axis 0")
        return real(queries, k)

    index.search = flaky
    got = search_many(index, [(["dog"], 2), (["ship"], 2), (["car"], 2), (["kiten"], 2)])
    assert [h["label"] for h in got[0][0]] == ["dog", "dog"]
    assert isinstance(got[1], IndexError)
    assert [h["label"] for h in got[2][0]] == ["car", "car"]
    assert isinstance(got[3], SearchError | LookupError)


def test_cached_queries_are_answered_apart_from_a_slow_encoding(data):
    """The slow request waits until the fast one in the same batch has its answer: answered
    together, it would wait out its 20 s and see no answer."""
    import anyio

    from devise.config import ServiceConfig
    from devise.serve import _service_class
    from devise.webapp import create_api

    config = ServiceConfig(embeddings=str(data["emb"]), poll_s=60)
    service = _service_class(create_api(config))(asdict(config))
    index = service.follower.index
    real = index.search
    fast_done = threading.Event()
    seen = {}

    def search(queries, k=10):
        if "boot" in queries:  # the slow encoding
            seen["fast answered first"] = fast_done.wait(20)
        out = real(queries, k)
        if "boot" not in queries:
            fast_done.set()
        return out

    index.search = search
    index.encodes_quickly = lambda queries: "boot" not in queries
    found = anyio.run(service._answer_searches, [(["boot"], 1), (["ship"], 1)])
    assert seen == {"fast answered first": True}
    assert found[1][1][0][0]["label"] == "ship"
    service.follower.close()


def test_the_damaged_version_warning_is_said_once_not_at_every_poll(data, caplog):
    from devise.config import ServiceConfig
    from devise.store import EmbedError
    from devise.webapp import IndexFollower

    follower = IndexFollower(ServiceConfig(embeddings=str(data["emb"]), poll_s=0.05))
    calls = []

    def damaged():
        calls.append(1)
        raise EmbedError("Version 000002-x is damaged: part-00000.parquet fails its checksum.")

    with caplog.at_level(logging.WARNING, logger="devise.webapp"):
        follower._index.reopen = damaged
        deadline = time.monotonic() + 30
        while len(calls) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
    follower.close()
    assert len(calls) >= 8
    said = [r for r in caplog.records if "Keeping version" in r.getMessage()]
    assert len(said) == 1 and "damaged" in said[0].getMessage()


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--poll-seconds", "0"], "--poll-seconds"),
        (["--poll-seconds", "nan"], "--poll-seconds"),
        (["--max-upload-mb", "-1"], "--max-upload-mb"),
        (["--max-upload-mb", "0"], "--max-upload-mb"),
        (["--cpus-per-replica", "0"], "--cpus-per-replica"),
        (["--replicas", "0"], "--replicas"),
        (["--port", "70000"], "--port"),
        (["--vectors", "/nonexistent/v.vec"], "--vectors"),
        (["--model", "/nonexistent/model"], "--model"),
    ],
)
def test_every_serve_flag_is_checked_in_one_line(data, capsys, flags, words):
    code = cli_main(["serve", "--embeddings", str(data["emb"]), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and words in err, err


def test_the_service_configs_bounds_and_defaults_are_the_flags(data):
    """A ServiceConfig from Python or a serve config's args is held to the flags' bounds, and
    the flags default to the config's and the service's own defaults."""
    import inspect

    from devise import serve
    from devise.cli import build_parser
    from devise.config import ServiceConfig
    from devise.errors import DeviseError

    emb = str(data["emb"])
    with pytest.raises(DeviseError, match=r"^--poll-seconds must be a number of at least 0\.05"):
        serve.app_builder({"embeddings": emb, "poll_s": 0.0})
    with pytest.raises(DeviseError, match=r"^--max-upload-mb must be at most 1024, not 2000\.$"):
        ServiceConfig(embeddings=emb, max_upload_mb=2000.0)
    p = build_parser("devise", "serve")
    assert p.get_default("poll_seconds") == ServiceConfig.poll_s
    assert p.get_default("max_upload_mb") == ServiceConfig.max_upload_mb
    for fn in (serve.start, serve.build_app):
        params = inspect.signature(fn).parameters
        assert p.get_default("replicas") == params["replicas"].default, fn
        assert p.get_default("cpus_per_replica") == params["cpus_per_replica"].default, fn


def test_a_port_in_use_is_one_line_before_ray_starts(data, capsys, monkeypatch):
    import devise.runtime

    started = []  # Ray may already run in this test session: watch for a start attempt instead
    monkeypatch.setattr(devise.runtime, "init_ray", lambda *a, **k: started.append(a))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = cli_main(["serve", "--embeddings", str(data["emb"]), "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"Port {port} on 127.0.0.1 is already in use" in err
    assert started == []


def test_query_bytes_that_are_not_utf8_get_an_answer_not_a_500(url):
    r = requests.get(f"{url}/api/search?q=sho%FFe&k=2", timeout=60)
    assert r.status_code in (200, 400), r.text
    assert r.status_code == 200 or list(r.json()) == ["error"]


def test_a_replica_starts_and_searches_exactly_over_a_damaged_index(data, tmp_path, caplog):
    import shutil

    pytest.importorskip("faiss")
    from devise import ann
    from devise.config import ServiceConfig
    from devise.webapp import IndexFollower

    emb = tmp_path / "emb"
    shutil.copytree(data["emb"], emb)
    r = ann.build_index(emb, kind="flat", local=True, queries=5)
    for garbage in ("{}", "", "{not json", '{"kind": "flat", "params": {"efSearch": "x"}}'):
        (r.folder / ann.INDEX_META).write_text(garbage)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            follower = IndexFollower(ServiceConfig(embeddings=str(emb), poll_s=60))
        follower.close()
        assert follower.index.info()["search"] == "exact"
        assert [h["label"] for h in follower.index.search("ship", 2)] == ["ship", "ship"]
        assert sum("Searching exactly" in rec.getMessage() for rec in caplog.records) == 1


def test_a_replica_warms_the_text_encoder_before_it_answers(data, monkeypatch):
    """The replica's constructor (and so /healthz and Serve's readiness) waits for the encoder:
    the first query never pays for loading it."""
    from devise.api import Index
    from devise.config import ServiceConfig
    from devise.webapp import IndexFollower

    loaded = []

    class Space:  # an encoder that loads on first use, as a sentence encoder does
        open_vocabulary = True

        def warm(self):
            loaded.append(time.monotonic())

    monkeypatch.setattr(Index, "_text_space", lambda self: Space())
    follower = IndexFollower(ServiceConfig(embeddings=str(data["emb"]), poll_s=60))
    follower.close()
    assert len(loaded) == 1
