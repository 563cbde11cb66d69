"""`devise serve`'s service on Ray Serve: a deployment whose FastAPI ingress binds the replies
of devise.webapp.SearchReplica to their routes (concurrent text searches answered together),
the app for `serve run` / `serve deploy` configs, the same app in one process, and `start`.

This module imports neither Ray nor FastAPI until a service is built.
"""

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Annotated

from devise.config import (
    DEFAULT_CPUS_PER_REPLICA,
    DEFAULT_HOST,
    DEFAULT_K,
    DEFAULT_PORT,
    DEFAULT_REPLICAS,
    ServiceConfig,
)
from devise.errors import DeviseError
from devise.webapp import SearchReplica, create_api

# Concurrent /api/search requests on one replica are answered together (Ray Serve's dynamic
# batching): one text encoding and one matrix product for the batch instead of one per request.
MAX_BATCH = 16
BATCH_WAIT_S = 0.002
MAX_ONGOING = 4 * MAX_BATCH  # requests a replica takes at once (Serve's default, 5, caps batches)
MAX_CONCURRENT_BATCHES = 4  # batches answered at once: a slow one does not hold the next


class ServeError(DeviseError, ValueError):
    """A service that cannot start (folder, port, a missing extra); str() says what to do."""


def _service_class(api):
    """The deployment class: a SearchReplica (one per replica) whose replies answer the routes
    of /api/* on `api`."""
    from fastapi import File, Form, Query, UploadFile
    from fastapi.responses import PlainTextResponse
    from ray import serve
    from ray.serve.exceptions import RayServeException

    from devise.api import MAX_K

    KQuery = Annotated[int, Query(description=f"results per query, 1..{MAX_K}")]

    class SearchService(SearchReplica):
        def __init__(self, config: dict) -> None:
            super().__init__(config)
            try:
                serve.get_replica_context()
            except RayServeException:  # not a Serve replica (local_app): answer each request alone
                self._search_batch = self._search_alone

        @serve.batch(
            max_batch_size=MAX_BATCH,
            batch_wait_timeout_s=BATCH_WAIT_S,
            max_concurrent_batches=MAX_CONCURRENT_BATCHES,
        )
        async def _search_batch(self, requests: list[tuple[list[str], int]]) -> list:
            return await self._answer_searches(requests)

        @api.get("/healthz", response_class=PlainTextResponse)
        def healthz(self) -> str:
            return "ok"

        @api.get("/api/info")
        def info(self) -> dict:
            return self.info_reply()

        @api.get("/api/search")
        async def search(self, q: Annotated[list[str], Query()], k: KQuery = DEFAULT_K):
            return await self.search_reply(q, k)

        @api.get("/api/similar/{id}")
        def similar(self, id: str, k: KQuery = DEFAULT_K):
            return self.similar_reply(id, k)

        @api.post("/api/search/image")
        async def search_image(
            self, file: Annotated[UploadFile, File()], k: Annotated[int, Form()] = DEFAULT_K
        ):
            return await self.image_search_reply(file, k)

        @api.get("/api/image/{id}")
        def image(self, id: str, size: int = 256):
            return self.thumbnail_reply(id, size)

    return SearchService


def build_app(
    config: ServiceConfig,
    replicas: int = DEFAULT_REPLICAS,
    cpus_per_replica: float = DEFAULT_CPUS_PER_REPLICA,
):
    """The Ray Serve application: `replicas` copies of the ingress deployment, each holding the
    version CURRENT names in memory and following it."""
    from ray import serve

    api = create_api(config)
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
    api = create_api(config)
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


@contextmanager
def serve_locally(config: ServiceConfig, host: str = "127.0.0.1") -> Iterator[str]:
    """local_app under uvicorn on a thread of this process, on a free port; yields its URL and
    stops the server when the block ends (development tools, tests, benchmarks)."""
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(local_app(config), host=host, port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise ServeError(f"The local server on {host}:{port} stopped before it started.")
            time.sleep(0.05)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def app_builder(args: dict):
    """Entry point for `serve run` / `serve deploy` configs: import_path devise.serve:app_builder,
    args {embeddings, replicas, cpus_per_replica, poll_s, max_upload_mb, vectors, model}."""
    args = dict(args)
    replicas = int(args.pop("replicas", DEFAULT_REPLICAS))
    cpus = float(args.pop("cpus_per_replica", DEFAULT_CPUS_PER_REPLICA))
    return build_app(ServiceConfig(**args), replicas, cpus)


def start(
    config: ServiceConfig,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    replicas: int = DEFAULT_REPLICAS,
    cpus_per_replica: float = DEFAULT_CPUS_PER_REPLICA,
    name: str = "devise",
) -> str:
    """Start Serve's HTTP proxy on host:port (Ray must be initialised) and deploy the app;
    returns the base URL once the app is running."""
    from ray import serve

    from devise import console

    # Ray Serve's per-request access lines and INFO lines only with -v.
    verbose = console.verbose()
    logging_config = {"enable_access_log": verbose, "log_level": "INFO" if verbose else "WARNING"}
    if not verbose:  # the driver's own "Started Serve", "Application ... is ready" lines
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options={"host": host, "port": port}, logging_config=logging_config)
    serve.run(
        build_app(config, replicas, cpus_per_replica),
        name=name,
        route_prefix="/",
        logging_config=logging_config,
    )
    return f"http://{host}:{port}"
