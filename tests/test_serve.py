"""The search service on a real local Ray Serve (one app for the whole module, two replicas):
the JSON API, one-line 4xx errors, thumbnails by id only, the page in a real headless Chromium,
and replicas switching to a newly committed version with no failed or mixed request."""

from __future__ import annotations

import io
import shutil
import socket
import threading
import time

import pytest
import requests
from index_data import make_searchable
from PIL import Image

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def ray_local():
    """Ray for this module. On a busy machine Ray's per-node agent can start more slowly than the
    raylet waits for it, and ray.init then fails at start-up: try again (at most 3 times)."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    for attempt in range(3):
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            break
        except Exception as e:  # only the start-up timeout is retried, below
            ray.shutdown()
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
    yield ray
    ray.shutdown()


POLL_S = 0.3
SWITCH_S = 10.0  # every replica has loaded a new version by then, even on a busy machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(ray_local, tmp_path_factory):
    from ray import serve

    from devise.config import ServiceConfig
    from devise.serve import start
    from devise.webapp import LOOPBACK_NAMES

    root = tmp_path_factory.mktemp("serve")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEVISE_HOME", str(root / "home"))
        data = make_searchable(root)
        config = ServiceConfig(
            embeddings=str(data["emb"]),
            poll_s=POLL_S,
            max_upload_mb=0.05,
            allowed_hosts=list(LOOPBACK_NAMES),
        )
        url = start(config, "127.0.0.1", _free_port(), replicas=2, cpus_per_replica=0.25)
        try:
            yield {**data, "url": url}
        finally:
            serve.shutdown()


def _get(service, path, **params):
    return requests.get(service["url"] + path, params=params, timeout=60)


def _png_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_api_answers_search_similar_image_info(service):
    info = _get(service, "/api/info").json()
    assert info["rows"] == 20 and info["dim"] == 8 and info["model_id"]
    assert _get(service, "/healthz").text == "ok"

    r = _get(service, "/api/search", q=["dog", "ship"], k=3)
    assert r.status_code == 200
    body = r.json()
    assert body["version"] == info["version"] and body["model_id"] == info["model_id"]
    results = body["results"]
    assert [(h["query"], h["rank"], h["label"]) for h in results] == [
        ("dog", 1, "dog"), ("dog", 2, "dog"), ("dog", 3, "dog"),
        ("ship", 1, "ship"), ("ship", 2, "ship"), ("ship", 3, "ship"),
    ]  # fmt: skip
    assert set(results[0]) == {"query", "rank", "id", "path", "label", "class_name", "score"}

    dog = results[0]
    similar = _get(service, f"/api/similar/{dog['id']}", k=3).json()["results"]
    assert dog["id"] not in [h["id"] for h in similar]
    assert [h["label"] for h in similar] == ["dog"] * 3

    thumb = _get(service, f"/api/image/{dog['id']}", size=16)
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 16

    car = next(p for p in service["paths"] if "/car/" in p)
    up = requests.post(
        service["url"] + "/api/search/image",
        files={"file": ("mine.png", _png_bytes(car), "image/png")},
        data={"k": "2"},
        timeout=120,
    )
    assert up.status_code == 200, up.text
    hits = up.json()["results"]
    assert hits[0]["path"] == car and [h["label"] for h in hits] == ["car", "car"]

    page = _get(service, "/")
    assert page.status_code == 200 and 'id="q"' in page.text
    assert "fetch(" in _get(service, "/app.js").text


def test_bad_requests_get_a_one_line_json_4xx(service):
    url = service["url"]
    noisy = io.BytesIO()  # ~0.5 MB of PNG: over the service's 0.05 MB upload limit
    Image.effect_noise((400, 400), 100).convert("RGB").save(noisy, format="PNG")
    cases = [
        ("search, empty q", requests.get(url + "/api/search", params={"q": ""}, timeout=60), 400),
        ("search, no q", requests.get(url + "/api/search", timeout=60), 400),
        ("search, 10k q", requests.get(url + "/api/search", params={"q": "a" * 10_000}, timeout=60), 400),
        ("search, k=0", requests.get(url + "/api/search", params={"q": "cat", "k": 0}, timeout=60), 400),
        ("search, k huge", requests.get(url + "/api/search", params={"q": "cat", "k": 10**9}, timeout=60), 400),
        ("search, k text", requests.get(url + "/api/search", params={"q": "cat", "k": "x"}, timeout=60), 400),
        ("search, unknown word", requests.get(url + "/api/search", params={"q": "kiten"}, timeout=60), 400),
        ("similar, unknown id", requests.get(url + "/api/similar/0123456789abcdef", timeout=60), 404),
        ("image, unknown id", requests.get(url + "/api/image/0123456789abcdef", timeout=60), 404),
        ("image, path as id", requests.get(url + "/api/image/..%2F..%2Fetc%2Fpasswd", timeout=60), 404),
        ("image, size 0", requests.get(url + "/api/image/x", params={"size": 0}, timeout=60), 400),
        ("upload, text", requests.post(url + "/api/search/image", files={"file": ("a.png", b"not an image")}, timeout=60), 415),
        ("upload, too big", requests.post(url + "/api/search/image", files={"file": ("b.png", noisy.getvalue())}, timeout=60), 413),
        ("upload, no file", requests.post(url + "/api/search/image", timeout=60), 400),
        ("no such page", requests.get(url + "/etc/passwd", timeout=60), 404),
    ]  # fmt: skip
    for name, r, status in cases:
        assert r.status_code == status, (name, r.status_code, r.text)
        body = r.json()
        assert list(body) == ["error"], name
        assert body["error"] and "\n" not in body["error"], name
    assert "kitten" in cases[6][1].json()["error"]  # the nearest spelling is suggested
    assert _get(service, "/healthz").text == "ok"  # still serving


def test_the_request_guard_works_behind_the_serve_proxy(service):
    """HEAD, Allow, the Host allow-list, the caps and an upload refused by its Content-Length
    before it is read, through Ray Serve's HTTP proxy (not only the app in-process)."""
    url = service["url"]
    head = requests.head(url + "/api/info", timeout=60)
    assert head.status_code == 200 and head.content == b""
    r = requests.post(url + "/api/info", timeout=60)
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "HEAD"}
    r = requests.get(url + "/api/info", headers={"Host": "rebound.example"}, timeout=60)
    assert r.status_code == 421 and list(r.json()) == ["error"]
    r = requests.get(url + "/api/search", params={"q": ["dog"] * 8000}, timeout=60)
    assert r.status_code == 400 and "at most" in r.json()["error"]
    info = requests.get(url + "/api/info", timeout=60).json()
    assert info["embeddings"] == "emb"
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(
            b"POST /api/search/image HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: multipart/form-data; boundary=x\r\n"
            b"Content-Length: 314572800\r\n\r\n"  # 300 MB announced, none of it sent
        )
        reply = s.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 413"), reply


def test_page_in_a_real_browser(service, tmp_path):
    exe = next(
        (shutil.which(b) for b in ("chromium-headless-shell", "chromium") if shutil.which(b)),
        None,
    )
    if exe is None:
        pytest.skip("no chromium; scripts/install_browser.sh installs it (as root)")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1000, "height": 700})
        page.goto(service["url"] + "/")
        expect(page.locator("#info")).to_contain_text("20 images")
        page.fill("#q", "ship")
        page.fill("#k", "4")
        page.press("#q", "Enter")
        cards = page.locator("#grid .card")
        expect(cards).to_have_count(4)
        assert page.locator("#grid .card .label").all_inner_texts() == ["ship"] * 4
        assert "q=ship" in page.url and "k=4" in page.url
        assert page.locator("#status").inner_text().startswith('"ship"')
        # Every thumbnail loaded (a broken image has naturalWidth 0).
        page.wait_for_function(
            "[...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)"
        )
        first_file = page.locator("#grid .card .file").first.inner_text()
        page.screenshot(path=str(tmp_path / "search.png"))

        cards.first.click()
        expect(page.locator("#status")).to_contain_text("similar to " + first_file)
        expect(cards).to_have_count(4)
        assert page.locator("#grid .card .label").all_inner_texts()[:3] == ["ship"] * 3
        assert first_file not in page.locator("#grid .card .file").all_inner_texts()
        assert "similar=" in page.url
        page.screenshot(path=str(tmp_path / "similar.png"))

        # A shared URL reproduces the search; the back button returns to it.
        page.go_back()
        expect(page.locator("#status")).to_contain_text('"ship"')
        page.goto(service["url"] + "/?q=kiten")
        expect(page.locator("#error")).to_contain_text("kitten")
        browser.close()
    assert (tmp_path / "search.png").stat().st_size > 1000


def test_replicas_switch_to_a_new_version_without_failed_or_mixed_requests(service):
    """A bounded request loop runs while a new version is committed: zero errors, every answer
    from one whole version, and the answers after the switch from the new one."""
    import pandas as pd

    from devise import Index
    from devise.store import Store

    old = Index.open(service["emb"])
    new_paths = [p for p in service["paths"] if "/dog/" in p or "/cat/" in p]  # 8 rows
    m = old._base.manifest
    rows = {p: i for i, p in enumerate(old._base.paths)}
    sizes: dict[str, int] = {old.version: len(old)}
    seen: list[tuple[float, str, int, set]] = []
    errors: list[str] = []
    stop = threading.Event()

    def loop() -> None:
        with requests.Session() as s:
            while not stop.is_set():
                try:
                    r = s.get(
                        service["url"] + "/api/search", params={"q": "dog", "k": 20}, timeout=60
                    )
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.text}")
                        continue
                    body = r.json()
                    paths = {h["path"] for h in body["results"]}
                    seen.append((time.monotonic(), body["version"], len(paths), paths))
                except requests.RequestException as e:
                    errors.append(repr(e))

    clients = [threading.Thread(target=loop) for _ in range(4)]
    for t in clients:
        t.start()
    time.sleep(2.0)
    new_version = Store.open(service["emb"], create=True).write_version(
        pd.DataFrame({"path": new_paths, "label": [p.split("/")[-2] for p in new_paths]}),
        old._base.matrix[[rows[p] for p in new_paths]],
        model_id=m.model_id,
        vectors=m.vectors,
        vectors_id=m.vectors_id,
        extra={"model_dir": m.model_dir},
    )
    committed = time.monotonic()
    sizes[new_version] = len(new_paths)
    deadline = committed + 60
    while time.monotonic() < deadline:
        time.sleep(0.5)
        recent = [v for t, v, _, _ in seen if t > committed + SWITCH_S]
        if len(recent) >= 20 and set(recent) == {new_version}:
            break
    stop.set()
    for t in clients:
        t.join(timeout=120)

    assert errors == []
    assert {v for _, v, _, _ in seen} == {old.version, new_version}
    for _, version, n, paths in seen:  # each answer is one whole version, never a mix
        assert n == sizes[version]
        assert version == old.version or paths <= set(new_paths)
    after = [v for t, v, _, _ in seen if t > committed + SWITCH_S]
    assert after and set(after) == {new_version}
    assert _get(service, "/api/info").json()["version"] == new_version
