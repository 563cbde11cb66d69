"""`devise index` (and jobs/index.py): a faiss index committed inside an embeddings version."""

from __future__ import annotations

import argparse

from devise.commands.common import LOCAL_HELP, add_address_arg
from devise.config import DEFAULT_QUERIES, INDEX_KINDS


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "index",
        help="build an approximate index (faiss) for the current embeddings version",
        description="Build a faiss index for the current version of an embeddings folder and "
        "commit it inside the version (versions/<v>/index/). Search uses it when it exists "
        "(`devise search --exact` does not); `auto` keeps exact search below 10^6 rows. Needs "
        "the index extra: pip install 'devise[index]'.",
    )
    p.add_argument("embeddings", metavar="EMB", help="embeddings folder (EMB_DIR)")
    p.add_argument("--kind", default="auto", choices=["auto", *INDEX_KINDS], help="index kind")
    p.add_argument(
        "--target-recall",
        type=float,
        default=0.95,
        help="recall@10 the search parameters must reach on held-out rows",
    )
    p.add_argument("--version", help="index this version instead of the current one")
    p.add_argument(
        "--queries",
        type=int,
        default=DEFAULT_QUERIES,
        help="held-out rows that measure recall",
    )
    p.add_argument(
        "--local", action="store_true", help=LOCAL_HELP + "; the parts are added one after another"
    )
    p.add_argument("--num-tasks", type=int, default=4, help="parallel Ray tasks adding vectors")
    p.add_argument("--cpus-per-task", type=float, default=1.0, help="CPUs each task asks for")
    add_address_arg(p)
    p.add_argument(
        "--wait-lock",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long for a run writing EMB_DIR to finish (0: exit at once)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from devise.ann import run_cli_index

    return run_cli_index(args)
