"""`devise index` (and jobs/index.py): a faiss index committed inside an embeddings version."""

from __future__ import annotations

import argparse

from devise.commands.common import LOCAL_HELP, add_address_arg
from devise.config import INDEX_KINDS, IndexConfig


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
    p.add_argument(
        "--kind", default=IndexConfig.kind, choices=["auto", *INDEX_KINDS], help="index kind"
    )
    p.add_argument(
        "--target-recall",
        type=float,
        default=IndexConfig.target_recall,
        help="recall@10 the search parameters must reach on held-out rows",
    )
    p.add_argument("--version", help="index this version instead of the current one")
    p.add_argument(
        "--queries",
        type=int,
        default=IndexConfig.queries,
        help="held-out rows that measure recall",
    )
    p.add_argument(
        "--local", action="store_true", help=LOCAL_HELP + "; the parts are added one after another"
    )
    p.add_argument(
        "--num-tasks",
        type=int,
        default=IndexConfig.num_tasks,
        help="parallel Ray tasks adding vectors",
    )
    p.add_argument(
        "--cpus-per-task",
        type=float,
        default=IndexConfig.cpus_per_task,
        help="CPUs each task asks for",
    )
    add_address_arg(p)
    p.add_argument(
        "--wait-lock",
        type=float,
        default=IndexConfig.wait_lock_s,
        metavar="SECONDS",
        help="wait this long for an embedding run or index build writing EMB_DIR to finish "
        "(0: exit at once)",
    )
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> IndexConfig:
    """The IndexConfig named by `devise index`'s flags."""
    return IndexConfig(
        embeddings=args.embeddings,
        kind=args.kind,
        target_recall=args.target_recall,
        version=args.version,
        queries=args.queries,
        num_tasks=args.num_tasks,
        cpus_per_task=args.cpus_per_task,
        address=args.address,
        local=args.local,
        wait_lock_s=args.wait_lock,
    )


def run(args: argparse.Namespace) -> int:
    """Build the index, then say what was built in one line."""
    from devise.ann import index_embeddings

    r = index_embeddings(config_from_args(args))
    recall = "n/a" if r.recall is None else f"{r.recall:.3f}"
    print(
        f"Indexed {r.rows} rows of {r.meta['version']} as {r.kind}"
        + (f" {r.params}" if r.params else "")
        + f" in {r.seconds:.1f}s: recall@10 {recall} on {r.meta['recall_queries']} held-out rows, "
        f"{r.bytes_per_vector:.0f} bytes a vector -> {r.folder}"
    )
    return 0
