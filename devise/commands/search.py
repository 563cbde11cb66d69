"""`devise search`: words, phrases or an image against the embeddings store."""

from __future__ import annotations

import argparse


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "search",
        help="search embedded images by words, phrases or an image",
        description="Cosine top-k over the current version of an embeddings folder: exact, or "
        "through the version's index when `devise index` built one (candidates re-scored "
        "exactly; --exact scores every row).",
    )
    p.add_argument(
        "queries", nargs="*", metavar="QUERY", help="words or phrases (any phrase with an encoder)"
    )
    p.add_argument("--embeddings", required=True, help="embeddings folder (EMB_DIR)")
    p.add_argument("-k", type=int, default=10, help="results per query")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--montage", metavar="OUT.png", help="also write a PNG strip of the results")
    p.add_argument("--image", help="search with an image instead of words")
    p.add_argument(
        "--include-self",
        action="store_true",
        help="with --image: keep the query image in the results when it is indexed itself",
    )
    p.add_argument(
        "--words",
        type=int,
        default=0,
        metavar="N",
        help="with --image: also show the N class names nearest to the image",
    )
    p.add_argument(
        "--vocabulary",
        default="classes",
        help="with --words: labels to name the image with: classes (the model's and the "
        "folder's), imagenet (1,000 ImageNet names) or a FILE with one label a line",
    )
    p.add_argument("--model", help="with --image: the model folder (default: the one embedded)")
    p.add_argument("--vectors", help="text space (default: the one named in the model spec)")
    p.add_argument("--version", help="search this version instead of the current one")
    p.add_argument(
        "--exact", action="store_true", help="exact search even when the version has an index"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from devise.search import run_cli

    return run_cli(args)
