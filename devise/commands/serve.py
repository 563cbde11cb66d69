"""`devise serve`: the search service (Ray Serve + FastAPI) and its page."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

# The module holds no heavy import at its top (stdlib and devise.config only): the service's
# modules load when the command runs.
from devise.commands.common import add_address_arg
from devise.config import (
    DEFAULT_CPUS_PER_REPLICA,
    DEFAULT_HOST,
    DEFAULT_MAX_UPLOAD_MB,
    DEFAULT_PORT,
    DEFAULT_REPLICAS,
    ServiceConfig,
)


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve search over HTTP (Ray Serve): a page at / and a JSON API under /api",
        description="Serve an embeddings folder with Ray Serve and FastAPI, following new "
        "versions as they are committed.",
    )
    p.add_argument("--embeddings", required=True, help="embeddings folder (EMB_DIR)")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to listen on")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port")
    p.add_argument("--replicas", type=int, default=DEFAULT_REPLICAS, help="search replicas")
    p.add_argument(
        "--cpus-per-replica",
        type=float,
        default=DEFAULT_CPUS_PER_REPLICA,
        help="CPUs each replica asks Ray for",
    )
    p.add_argument(
        "--poll-seconds",
        type=float,
        default=ServiceConfig.poll_s,
        help="how often replicas look for a newly committed version (at least 0.05)",
    )
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=DEFAULT_MAX_UPLOAD_MB,
        help="largest image upload accepted",
    )
    p.add_argument("--vectors", help="word vectors (default: those named in the model spec)")
    p.add_argument("--model", help="model folder for image queries (default: the one embedded)")
    add_address_arg(p)
    p.add_argument(
        "--show-paths",
        action="store_true",
        help="name the server's embeddings folder in /api/info and in error replies",
    )
    p.set_defaults(func=run)


def check_flags(args: argparse.Namespace) -> None:
    """The `devise serve` flags that are not the ServiceConfig's (whose own checks hold its
    bounds), checked before anything starts (ServeError, one sentence)."""
    from devise.serve import ServeError

    if args.replicas < 1:
        raise ServeError(f"--replicas must be at least 1, not {args.replicas}.")
    if not 0 < args.port < 65536:
        raise ServeError(f"--port must be from 1 to 65535, not {args.port}.")
    if not math.isfinite(args.cpus_per_replica) or args.cpus_per_replica < 0.001:
        raise ServeError(
            f"--cpus-per-replica must be a number of at least 0.001, not {args.cpus_per_replica:g}."
        )
    if not args.host or any(c.isspace() for c in args.host):
        raise ServeError(f"--host {args.host!r} is not an address to listen on.")
    if args.vectors is not None:
        from devise.text import TEXT_SPACES

        named = [k for k, v in TEXT_SPACES.items() if v.matches is None]
        if args.vectors not in named and not Path(args.vectors).expanduser().exists():
            raise ServeError(
                f"--vectors {args.vectors} does not exist and is not a known text space "
                f"({', '.join(named)})."
            )
    if args.model is not None and not Path(args.model).expanduser().is_dir():
        raise ServeError(f"--model {args.model} is not a model folder.")


def check_port_free(host: str, port: int) -> None:
    """ServeError at once when host:port cannot be listened on (taken, or not this machine's
    address), instead of Ray Serve's proxy failing after its start-up timeout."""
    import errno
    import socket

    from devise.serve import ServeError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ServeError(f"--host {host} cannot be resolved ({e.strerror}).") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ServeError(
                    f"Port {port} on {host} is already in use; stop what listens there or pass "
                    "another --port."
                ) from None
            raise ServeError(f"Cannot listen on {host}:{port}: {e.strerror}.") from None


def config_from_args(args: argparse.Namespace) -> ServiceConfig:
    """The ServiceConfig the flags name (check_flags first)."""
    from devise.webapp import LOOPBACK_NAMES, is_loopback

    return ServiceConfig(
        embeddings=str(Path(args.embeddings).expanduser().resolve()),
        poll_s=args.poll_seconds,
        max_upload_mb=args.max_upload_mb,
        vectors=args.vectors,
        model=args.model,
        # Bound to loopback, only loopback names: a DNS-rebinding page cannot read the API.
        allowed_hosts=list(LOOPBACK_NAMES) if is_loopback(args.host) else None,
        show_paths=getattr(args, "show_paths", False),
    )


def run(args: argparse.Namespace) -> int:
    """`devise serve`: check the flags, open the index, start Ray Serve and serve until Ctrl-C."""
    from devise.serve import ServeError, start

    check_flags(args)
    config = config_from_args(args)
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
    check_port_free(args.host, args.port)
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
