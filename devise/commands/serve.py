"""`devise serve`: the search service (Ray Serve + FastAPI) and its page."""

from __future__ import annotations

import argparse

# The module holds no heavy import at its top (stdlib and devise.errors only).
from devise.commands.common import add_address_arg
from devise.config import DEFAULT_HOST, DEFAULT_MAX_UPLOAD_MB, DEFAULT_PORT


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
    p.add_argument("--replicas", type=int, default=1, help="search replicas")
    p.add_argument(
        "--cpus-per-replica",
        type=float,
        default=0.5,
        help="CPUs each replica asks Ray for",
    )
    p.add_argument(
        "--poll-seconds",
        type=float,
        default=2.0,
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


def run(args: argparse.Namespace) -> int:
    from devise.serve import run_cli

    return run_cli(args)
