"""The search service's HTTP side, without Ray: the FastAPI app (the page, one-line JSON errors,
the request guard), the per-request limits, and what a replica answers with (SearchReplica over
an IndexFollower). devise.serve binds SearchReplica's replies to routes on Ray Serve.

Endpoints (all answers JSON unless said; every error is 4xx with {"error": "one sentence"}):

    GET  /                       the search page (devise/web/index.html)
    GET  /api/search?q=..&k=..   text search; several q answered together
    POST /api/search/image       multipart upload `file` (+ k): images nearest to it
    GET  /api/similar/{id}?k=..  images nearest to an indexed one (itself left out)
    GET  /api/image/{id}?size=N  a JPEG thumbnail of an indexed image, found by id only
    GET  /api/info               version, rows, model id, text space
    GET  /healthz                "ok" once an index is loaded and its text encoder is warm

Every GET route answers HEAD too; a 405 names the allowed methods (Allow). One request cannot
hold the others up: at most MAX_QUERIES queries and MAX_RESULTS results (queries x k) a
request, replies of at most MAX_REPLY_MB, uploads refused by their Content-Length before they
are read, MAX_DECODES image decodes at a time per replica with at most MAX_UPLOAD_PIXELS each,
and text encoded on threads (never on the event loop), queries found in the encoding cache
answered apart from those that need the encoder. Bound to a loopback address, the service
answers only requests whose Host is a loopback name (a DNS-rebinding page cannot read it).
Replies name no server folder unless the service was started with --show-paths.

This module imports FastAPI only when an app is built (`devise --help` reads its limits).
"""

import asyncio
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from devise.config import ServiceConfig
from devise.errors import DeviseError

if TYPE_CHECKING:
    from devise.api import Index

log = logging.getLogger(__name__)

THUMB_SIZES = (16, 512)  # smallest and largest thumbnail edge served
# The page's files, by the only names a request can ask for.
WEB_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}

# Per-request limits: one request must not hold the others up.
MAX_QUERIES = 64  # q parameters in one /api/search
MAX_RESULTS = 5000  # queries x k in one /api/search
MAX_REPLY_MB = 8.0  # the JSON of one answer
MAX_UPLOAD_PIXELS = 40_000_000  # decoded pixels of one uploaded image
MAX_DECODES = 2  # uploads decoded at once by one replica (memory: ~MAX_UPLOAD_PIXELS x 4 B each)
# Multipart framing around an upload: Content-Length may exceed --max-upload-mb by this much.
UPLOAD_OVERHEAD = 64 * 1024
SMALL_SEARCH = 100  # queries x k of a request batched with the others; larger ones go alone
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    """Whether a listen address is loopback only (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class IndexFollower:
    """Holds the Index of the version CURRENT names and swaps in a new one, fully loaded, when
    CURRENT moves. A request takes `.index` once and uses only that object, so it sees one
    version from start to end; loading happens on a background thread, never in a request."""

    def __init__(self, config: ServiceConfig) -> None:
        from devise.api import Index

        self.config = config
        self._index = Index.open(config.embeddings, vectors=config.vectors, model=config.model)
        try:  # the first query must not wait for the text encoder to load
            self._index.warm()
        except DeviseError as e:  # image and similar-image searches still work
            log.warning("Text queries will fail: %s", e)
        self._last_problem: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="devise-follow", daemon=True)
        self._thread.start()

    @property
    def index(self) -> "Index":
        return self._index

    def refresh(self) -> bool:
        """Load the current version if it changed; True when a new one was swapped in."""
        new = self._index.reopen()
        if new is self._index:
            return False
        new.warm()
        self._index = new  # one reference assignment: a request sees the old or the new index
        log.info("Serving %s version %s (%d rows).", new.emb_dir, new.version, len(new))
        return True

    def _poll(self) -> None:
        while not self._stop.wait(self.config.poll_s):
            try:
                self.refresh()
                self._last_problem = None
            except Exception as e:  # noqa: BLE001 -- a half-written folder must not stop serving
                problem = str(e)
                if problem != self._last_problem:  # said once, not at every poll
                    log.warning("Keeping version %s: %s", self._index.version, problem)
                self._last_problem = problem

    def close(self) -> None:
        self._stop.set()


def read_web_file(name: str) -> bytes:
    """One of the page's packaged files (devise/web/NAME)."""
    return resources.files("devise").joinpath("web", name).read_bytes()


def _error(status: int, message: str, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    text = " ".join(str(message).split())
    return JSONResponse({"error": text}, status_code=status, headers=headers)


def _json_error(status: int, message: str) -> tuple[int, list, bytes]:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return status, headers, body


class RequestGuard:
    """ASGI middleware run before routing and before any body is read: a Host allow-list,
    HEAD answered as GET without a body, and uploads refused by their Content-Length."""

    def __init__(self, app, config: ServiceConfig) -> None:
        self.app = app
        self.allowed = None
        if config.allowed_hosts is not None:
            self.allowed = {h.lower().strip("[]") for h in config.allowed_hosts}
        self.max_body = int(config.max_upload_mb * (1 << 20)) + UPLOAD_OVERHEAD
        self.max_upload_mb = config.max_upload_mb

    def _refuse(self, scope) -> tuple[int, list, bytes] | None:
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if self.allowed is not None:
            host = headers.get(b"host", b"").decode("latin-1").strip().lower()
            name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
            name = name.split("]")[0].strip("[") if name.startswith("[") else name
            if name not in self.allowed:
                return _json_error(
                    421, f"This service answers only requests to {', '.join(sorted(self.allowed))}."
                )
        if scope["method"] == "POST" and scope["path"] == "/api/search/image":
            length = headers.get(b"content-length")
            if length is None:
                return _json_error(411, "An upload needs a Content-Length header.")
            try:
                size = int(length)
            except ValueError:
                return _json_error(400, "The Content-Length header is not a number.")
            if size > self.max_body:
                return _json_error(413, f"The upload is over the {self.max_upload_mb:g} MB limit.")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refused = self._refuse(scope)
        if refused is not None:
            status, headers, body = refused
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        if scope["method"] == "HEAD":  # answered as GET, headers only
            scope = {**scope, "method": "GET"}
            inner_send = send

            async def send(message):
                if message["type"] == "http.response.body":
                    message = {**message, "body": b""}
                await inner_send(message)

        return await self.app(scope, receive, send)


def create_api(config: ServiceConfig | None = None):
    """The FastAPI app without its search routes: one-line JSON errors, the page's files and
    the request guard (RequestGuard). The deployment class adds the routes that need the
    replica's index."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response
    from starlette.exceptions import HTTPException

    api = FastAPI(title="devise", docs_url="/api/docs", redoc_url=None, openapi_url="/api/openapi")
    api.add_middleware(RequestGuard, config=config or ServiceConfig(embeddings=""))

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body"))
            parts.append(f"{where or 'request'}: {err.get('msg', 'invalid')}")
        return _error(400, "Bad request: " + "; ".join(parts) + ".")

    @api.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        if exc.status_code == 404:
            return _error(404, f"No such page: {request.url.path}.")
        headers = getattr(exc, "headers", None)  # a 405's Allow
        if exc.status_code == 405 and headers and "Allow" in headers:
            allow = headers["Allow"]
            if "GET" in allow.split(", ") and "HEAD" not in allow:
                headers = {**headers, "Allow": allow + ", HEAD"}
            return _error(405, f"Method not allowed here; use {headers['Allow']}.", headers)
        detail = exc.detail if isinstance(exc.detail, str) else str(exc)
        return _error(exc.status_code, detail, headers)

    for route, (name, media) in WEB_FILES.items():

        def page(name: str = name, media: str = media) -> Response:
            return Response(read_web_file(name), media_type=media)

        api.add_api_route(route, page, methods=["GET"], include_in_schema=False)
    return api


def _answer(index: "Index", results: list[dict]) -> dict:
    return {"version": index.version, "model_id": index.model_id, "results": results}


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


@lru_cache(maxsize=4096)
def _thumbnail(path: str, size: int, mtime_ns: int) -> bytes:
    from devise.api import thumbnail

    return thumbnail(path, size)


def search_many(index: "Index", requests: list[tuple[list[str], int]]) -> list:
    """Several text-search requests against one index version: for each request its per-query
    hits, or the exception that request alone earns (a bad query, or anything else that fails
    while answering it, never fails the others)."""
    from devise.api import check_k

    if len(requests) > 1:
        try:
            for _, k in requests:
                check_k(k)
            found = iter(
                index.search([t for q, _ in requests for t in q], max(k for _, k in requests))
            )
            return [[next(found)[:k] for _ in q] for q, k in requests]
        except Exception:  # noqa: BLE001, S110 -- answer each alone, so only the bad one fails
            pass
    out: list = []
    for q, k in requests:
        try:
            out.append(index.search(q, k))
        except Exception as e:  # noqa: BLE001 -- that request's own answer
            out.append(e)
    return out


def check_search_size(queries: int, k: int) -> str | None:
    """Why a search of `queries` queries at k is too large for one request, or None."""
    if queries > MAX_QUERIES or queries * k > MAX_RESULTS:
        return (
            f"A search may ask at most {MAX_QUERIES} queries and {MAX_RESULTS} results "
            f"(queries x k); this one asks {queries} x k={k}."
        )
    return None


def scrub(message: str, index: "Index", config: ServiceConfig) -> str:
    """An error message without the server's embeddings folder (unless --show-paths)."""
    if config.show_paths:
        return message
    return message.replace(str(index.emb_dir), index.emb_dir.name)


def _encodes_quickly(index: "Index", queries: list[str]) -> bool:
    """index.encodes_quickly, False when it cannot tell (a text space that failed to load:
    the request then earns its own error on a thread)."""
    try:
        return index.encodes_quickly(queries)
    except Exception:  # noqa: BLE001
        return False


def _lower_priority() -> None:
    """Run this thread at a lower CPU priority (nice +10), where the platform allows it."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + 10))
    except (AttributeError, OSError):
        pass


class SearchReplica:
    """What one replica answers, route by route, without FastAPI's routing or Ray: it holds the
    replica's IndexFollower and a few low-priority threads for heavy work (large searches,
    encodings, image decodes), which queue behind each other and yield the CPU to small
    searches. devise.serve binds each *_reply to its route."""

    def __init__(self, config: dict) -> None:
        self.follower = IndexFollower(ServiceConfig(**config))
        self.config = self.follower.config
        self.max_upload = int(self.config.max_upload_mb * (1 << 20))
        self.heavy = ThreadPoolExecutor(
            MAX_DECODES, thread_name_prefix="devise-heavy", initializer=_lower_priority
        )

    async def _heavy(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.heavy, fn, *args)

    def check_health(self) -> None:
        self.follower.index  # noqa: B018 -- fails the replica if no index is loaded

    async def _answer_searches(self, requests: list[tuple[list[str], int]]) -> list:
        """(index, hits or exception) for each (queries, k) request, all on one version."""
        import anyio

        index = self.follower.index  # one version for all of them
        # Requests whose queries need the encoder (not in its cache), or that ask many
        # results, are answered on their own thread, so that a slow encoding or a large
        # search never holds the small cached ones up.
        slow = [
            i
            for i, (q, k) in enumerate(requests)
            if len(q) * k > SMALL_SEARCH or not _encodes_quickly(index, q)
        ]
        fast = [i for i in range(len(requests)) if i not in set(slow)]
        found: list = [None] * len(requests)

        async def answer(ids: list[int], heavy: bool) -> None:
            batch = [requests[i] for i in ids]
            if heavy:
                got = await self._heavy(search_many, index, batch)
            else:
                got = await anyio.to_thread.run_sync(search_many, index, batch)
            for i, f in zip(ids, got):
                found[i] = f

        async with anyio.create_task_group() as tg:
            for ids, heavy in ((fast, False), (slow, True)):
                if ids:
                    tg.start_soon(answer, ids, heavy)
        return [(index, f) for f in found]

    async def _search_alone(self, request: tuple[list[str], int]) -> tuple:
        return (await self._answer_searches([request]))[0]

    # One request's (index, hits); a Serve replica answers concurrent ones together instead.
    _search_batch = _search_alone

    def info_reply(self) -> dict:
        """/api/info: the index's description and this service's limits."""
        from devise.api import MAX_K

        cfg = self.config
        info = self.follower.index.info()
        if not cfg.show_paths:
            info["embeddings"] = Path(info["embeddings"]).name
        return {
            **info,
            "max_k": MAX_K,
            "max_upload_mb": cfg.max_upload_mb,
            "max_queries": MAX_QUERIES,
            "max_results": MAX_RESULTS,
        }

    async def search_reply(self, q: list[str], k: int):
        """/api/search: the hits of every query, or a one-line error."""
        from fastapi.responses import Response

        from devise.api import MAX_K

        too_big = check_search_size(len(q), k) if 1 <= k <= MAX_K else None
        if too_big:
            return _error(400, too_big)
        index, found = await self._search_batch((list(q), k))
        if isinstance(found, DeviseError):
            return _error(400, scrub(str(found), index, self.config))
        if isinstance(found, BaseException):  # that request alone fails
            log.error("A search failed: %s: %s", type(found).__name__, found)
            return _error(500, "The search failed on the server; try again.")

        def encode() -> bytes:  # a large answer's JSON is built off the event loop
            hits = [{"query": t, **r} for t, hits in zip(q, found) for r in hits]
            return json.dumps(_answer(index, hits), separators=(",", ":")).encode()

        body = await self._heavy(encode) if len(q) * k > SMALL_SEARCH else encode()
        if len(body) > MAX_REPLY_MB * (1 << 20):
            return _error(
                400,
                f"The answer would be {len(body) / (1 << 20):.1f} MB, over the "
                f"{MAX_REPLY_MB:g} MB limit of one reply; ask fewer queries or a smaller k.",
            )
        return Response(body, media_type="application/json")

    def similar_reply(self, id: str, k: int):
        """/api/similar/{id}: the images nearest to an indexed one."""
        from devise.search import SearchError

        index = self.follower.index
        try:
            hits = index.similar(id, k)
        except KeyError as e:
            return _error(404, scrub(e.args[0], index, self.config))
        except SearchError as e:
            return _error(400, scrub(str(e), index, self.config))
        return _answer(index, [{"query": id, **r} for r in hits])

    async def image_search_reply(self, file, k: int):
        """/api/search/image: the images nearest to an uploaded one (a fastapi UploadFile)."""
        from devise.images import ImageDecodeError, decode_image
        from devise.search import SearchError

        data = await file.read(self.max_upload + 1)
        if len(data) > self.max_upload:
            return _error(413, f"The upload is over the {self.config.max_upload_mb:g} MB limit.")
        index = self.follower.index

        def answer() -> list[dict]:
            try:  # at most MAX_UPLOAD_PIXELS decoded, MAX_DECODES at a time (self.heavy)
                image = decode_image(data, max_pixels=MAX_UPLOAD_PIXELS)
            except ImageDecodeError as e:
                raise ImageDecodeError(f"Cannot use the uploaded image: {e}.") from None
            return index.search_image(image, k)

        try:
            hits = await self._heavy(answer)
        except ImageDecodeError as e:
            return _error(415, str(e))
        except SearchError as e:
            return _error(400, scrub(str(e), index, self.config))
        return _answer(index, [{"query": file.filename or "upload", **r} for r in hits])

    def thumbnail_reply(self, id: str, size: int):
        """/api/image/{id}: a JPEG thumbnail of an indexed image, found by its id only."""
        from fastapi.responses import Response

        from devise.images import ImageDecodeError

        lo, hi = THUMB_SIZES
        if not lo <= size <= hi:
            return _error(400, f"size must be from {lo} to {hi} pixels, not {size}.")
        index = self.follower.index
        try:
            path = index.path_of(id)  # only ids of the served version lead to a file
        except KeyError as e:
            return _error(404, scrub(e.args[0], index, self.config))
        try:
            body = _thumbnail(str(path), size, _mtime(path))
        except (ImageDecodeError, OSError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            if not self.config.show_paths:
                reason = reason.replace(str(path), path.name)
            return _error(404, f"Image {id} ({path.name}) cannot be read: {reason}")
        return Response(body, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})
