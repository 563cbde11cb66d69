"""`devise serve`: the search service. A Ray Serve deployment with a FastAPI ingress answers
/api/* from `devise.Index`, serves the page in devise/web/ at `/`, and follows CURRENT so that a
newly committed embeddings version replaces the old one between requests.

Endpoints (all answers JSON unless said; every error is 4xx with {"error": "one sentence"}):

    GET  /                       the search page (devise/web/index.html)
    GET  /api/search?q=..&k=..   text search; several q answered together
    POST /api/search/image       multipart upload `file` (+ k): images nearest to it
    GET  /api/similar/{id}?k=..  images nearest to an indexed one (itself left out)
    GET  /api/image/{id}?size=N  a JPEG thumbnail of an indexed image, found by id only
    GET  /api/info               version, rows, model id, text space
    GET  /healthz                "ok" once an index is loaded

This module imports neither Ray nor FastAPI until a service is built.
"""

import argparse
import logging
import threading
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

if TYPE_CHECKING:
    from devise.api import Index


from devise.commands.serve import DEFAULT_HOST, DEFAULT_MAX_UPLOAD_MB, DEFAULT_PORT
from devise.errors import DeviseError

log = logging.getLogger(__name__)

THUMB_SIZES = (16, 512)  # smallest and largest thumbnail edge served
# The page's files, by the only names a request can ask for.
WEB_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}


@dataclass
class ServiceConfig:
    """What one replica serves and how it follows the embeddings folder."""

    embeddings: str
    poll_s: float = 2.0  # how often a replica checks CURRENT for a new version
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    vectors: str | None = None
    model: str | None = None


class IndexFollower:
    """Holds the Index of the version CURRENT names and swaps in a new one, fully loaded, when
    CURRENT moves. A request takes `.index` once and uses only that object, so it sees one
    version from start to end; loading happens on a background thread, never in a request."""

    def __init__(self, config: ServiceConfig) -> None:
        from devise.api import Index

        self.config = config
        self._index = Index.open(config.embeddings, vectors=config.vectors, model=config.model)
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
        self._index = new  # one reference assignment: a request sees the old or the new index
        log.info("Serving %s version %s (%d rows).", new.emb_dir, new.version, len(new))
        return True

    def _poll(self) -> None:
        while not self._stop.wait(self.config.poll_s):
            try:
                self.refresh()
            except Exception as e:  # noqa: BLE001 -- a half-written folder must not stop serving
                log.warning("Keeping version %s: %s", self._index.version, e)

    def close(self) -> None:
        self._stop.set()


def read_web_file(name: str) -> bytes:
    """One of the page's packaged files (devise/web/NAME)."""
    return resources.files("devise").joinpath("web", name).read_bytes()


def _error(status: int, message: str):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


def create_api():
    """The FastAPI app without its search routes: one-line JSON errors and the page's files.
    The deployment class adds the routes that need the replica's index."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response
    from starlette.exceptions import HTTPException

    api = FastAPI(title="devise", docs_url="/api/docs", redoc_url=None, openapi_url="/api/openapi")

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
        return _error(exc.status_code, exc.detail if isinstance(exc.detail, str) else str(exc))

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


# Concurrent /api/search requests on one replica are answered together (Ray Serve's dynamic
# batching): one text encoding and one matrix product for the batch instead of one per request.
MAX_BATCH = 16
BATCH_WAIT_S = 0.002
MAX_ONGOING = 4 * MAX_BATCH  # requests a replica takes at once (Serve's default, 5, caps batches)


def search_many(index: "Index", requests: list[tuple[list[str], int]]) -> list:
    """Several text-search requests against one index version: for each request its per-query
    hits, or the SearchError/UnknownWordError that request alone earns (a bad query in one
    request never fails the others)."""
    from devise.api import check_k
    from devise.search import SearchError
    from devise.vectors import UnknownWordError

    if len(requests) > 1:
        try:
            for _, k in requests:
                check_k(k)
            found = iter(
                index.search([t for q, _ in requests for t in q], max(k for _, k in requests))
            )
            return [[next(found)[:k] for _ in q] for q, k in requests]
        except (SearchError, UnknownWordError):
            pass  # answer each request alone, so only the bad one fails
    out: list = []
    for q, k in requests:
        try:
            out.append(index.search(q, k))
        except (SearchError, UnknownWordError) as e:
            out.append(e)
    return out


def _service_class(api):
    """The class whose methods answer /api/* on `api`: one instance per replica, holding the
    replica's IndexFollower."""
    import anyio
    from fastapi import File, Form, Query, UploadFile
    from fastapi.responses import PlainTextResponse, Response
    from ray import serve
    from ray.serve.exceptions import RayServeException

    from devise.api import MAX_K
    from devise.images import ImageDecodeError
    from devise.search import SearchError
    from devise.vectors import UnknownWordError

    KQuery = Annotated[int, Query(description=f"results per query, 1..{MAX_K}")]

    class SearchService:
        def __init__(self, config: dict) -> None:
            self.follower = IndexFollower(ServiceConfig(**config))
            self.max_upload = int(self.follower.config.max_upload_mb * (1 << 20))
            try:
                serve.get_replica_context()
            except RayServeException:  # not a Serve replica (local_app): answer each request alone
                self._search_batch = self._search_alone

        def check_health(self) -> None:
            self.follower.index  # noqa: B018 -- fails the replica if no index is loaded

        @api.get("/healthz", response_class=PlainTextResponse)
        def healthz(self) -> str:
            return "ok"

        @api.get("/api/info")
        def info(self) -> dict:
            cfg = self.follower.config
            return {
                **self.follower.index.info(),
                "max_k": MAX_K,
                "max_upload_mb": cfg.max_upload_mb,
            }

        async def _answer_searches(self, requests: list[tuple[list[str], int]]) -> list:
            index = self.follower.index  # one version for all of them
            found = await anyio.to_thread.run_sync(search_many, index, requests)
            return [(index, f) for f in found]

        @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=BATCH_WAIT_S)
        async def _search_batch(self, requests: list[tuple[list[str], int]]) -> list:
            return await self._answer_searches(requests)

        async def _search_alone(self, request: tuple[list[str], int]) -> tuple:
            return (await self._answer_searches([request]))[0]

        @api.get("/api/search")
        async def search(self, q: Annotated[list[str], Query()], k: KQuery = 10):
            index, found = await self._search_batch((list(q), k))
            if isinstance(found, SearchError | UnknownWordError):
                return _error(400, str(found))
            return _answer(index, [{"query": t, **r} for t, hits in zip(q, found) for r in hits])

        @api.get("/api/similar/{id}")
        def similar(self, id: str, k: KQuery = 10):
            index = self.follower.index
            try:
                hits = index.similar(id, k)
            except KeyError as e:
                return _error(404, e.args[0])
            except SearchError as e:
                return _error(400, str(e))
            return _answer(index, [{"query": id, **r} for r in hits])

        @api.post("/api/search/image")
        async def search_image(
            self, file: Annotated[UploadFile, File()], k: Annotated[int, Form()] = 10
        ):
            data = await file.read(self.max_upload + 1)
            if len(data) > self.max_upload:
                mb = self.follower.config.max_upload_mb
                return _error(413, f"The upload is over the {mb:g} MB limit.")
            index = self.follower.index
            try:
                hits = await anyio.to_thread.run_sync(lambda: index.search_image(data, k))
            except ImageDecodeError as e:
                return _error(415, str(e))
            except SearchError as e:
                return _error(400, str(e))
            return _answer(index, [{"query": file.filename or "upload", **r} for r in hits])

        @api.get("/api/image/{id}")
        def image(self, id: str, size: int = 256):
            lo, hi = THUMB_SIZES
            if not lo <= size <= hi:
                return _error(400, f"size must be from {lo} to {hi} pixels, not {size}.")
            index = self.follower.index
            try:
                path = index.path_of(id)  # only ids of the served version lead to a file
            except KeyError as e:
                return _error(404, e.args[0])
            try:
                body = _thumbnail(str(path), size, _mtime(path))
            except (ImageDecodeError, OSError) as e:
                return _error(404, f"Image {id} ({path.name}) cannot be read: {e}")
            return Response(
                body, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"}
            )

    return SearchService


def build_app(config: ServiceConfig, replicas: int = 1, cpus_per_replica: float = 0.5):
    """The Ray Serve application: `replicas` copies of the ingress deployment, each holding the
    version CURRENT names in memory and following it."""
    from ray import serve

    api = create_api()
    deployment = serve.deployment(
        name="devise",
        num_replicas=replicas,
        max_ongoing_requests=MAX_ONGOING,
        ray_actor_options={"num_cpus": cpus_per_replica},
        health_check_period_s=10,
    )(serve.ingress(api)(_service_class(api)))
    return deployment.bind(asdict(config))


def local_app(config: ServiceConfig):
    """The same FastAPI app in this process, without Ray (one replica; for development tools
    such as the page screenshot, e.g. under `uvicorn`)."""
    api = create_api()
    cls = _service_class(api)
    service = cls(asdict(config))
    for route in list(api.routes):
        endpoint = getattr(route, "endpoint", None)
        if endpoint is not None and endpoint.__qualname__.startswith(cls.__qualname__ + "."):
            api.router.routes.remove(route)
            api.add_api_route(
                route.path,
                getattr(service, endpoint.__name__),
                methods=list(route.methods),
                response_class=route.response_class,
            )
    return api


def app_builder(args: dict):
    """Entry point for `serve run` / `serve deploy` configs: import_path devise.serve:app_builder,
    args {embeddings, replicas, cpus_per_replica, poll_s, max_upload_mb, vectors, model}."""
    args = dict(args)
    replicas = int(args.pop("replicas", 1))
    cpus = float(args.pop("cpus_per_replica", 0.5))
    return build_app(ServiceConfig(**args), replicas, cpus)


def start(
    config: ServiceConfig,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    replicas: int = 1,
    cpus_per_replica: float = 0.5,
    name: str = "devise",
) -> str:
    """Start Serve's HTTP proxy on host:port (Ray must be initialised) and deploy the app;
    returns the base URL once the app is running."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(config, replicas, cpus_per_replica), name=name, route_prefix="/")
    return f"http://{host}:{port}"


# ---------------------------------------------------------------------------------------------
# CLI


class ServeError(DeviseError, ValueError):
    """A service that cannot start (folder, port); str() says what to do."""


def run_cli(args: argparse.Namespace) -> int:
    """`devise serve` (flags: devise/commands/serve.py)."""
    if args.replicas < 1:
        raise ServeError("--replicas must be at least 1.")
    if not 0 < args.port < 65536:
        raise ServeError(f"--port must be from 1 to 65535, not {args.port}.")
    config = ServiceConfig(
        embeddings=str(Path(args.embeddings).expanduser().resolve()),
        poll_s=args.poll_seconds,
        max_upload_mb=args.max_upload_mb,
        vectors=args.vectors,
        model=args.model,
    )
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401
        import ray.serve  # noqa: F401
    except ImportError as e:
        raise ServeError(
            f"devise serve needs the `serve` extra ({e.name} is missing): "
            "pip install 'devise[serve]'."
        ) from None
    from devise.api import Index

    index = Index.open(config.embeddings, vectors=config.vectors, model=config.model)
    print(f"Serving {index.emb_dir} version {index.version} ({len(index)} images)...", flush=True)
    from devise.runtime import init_ray

    init_ray(args.address)
    url = start(config, args.host, args.port, args.replicas, args.cpus_per_replica)
    print(f"Open {url}/ (API: {url}/api/search?q=WORDS). Ctrl-C stops it.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()
    return 0
