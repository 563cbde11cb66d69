"""`devise demo`: the embedded default end to end."""

from __future__ import annotations

import argparse

from devise.commands.common import add_ray_args
from devise.config import DEFAULT_HEAD, DEFAULT_HOLDOUT, DEFAULT_TEXT_SPACE, HEADS
from devise.runtime import preflight


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="the whole pipeline on the embedded default data, or on --data PATH"
    )
    p.add_argument("--out", default="runs/demo", help="folder for every output")
    p.add_argument(
        "--data",
        default=None,
        help="your own images instead of Fashion-MNIST: a Tiny ImageNet folder (wnids.txt, "
        "words.txt, train/, val/) or one sub-folder per class",
    )
    p.add_argument("--per-class", type=int, default=500, help="Fashion-MNIST images per class")
    p.add_argument("--all", action="store_true", help="all 70,000 Fashion-MNIST images")
    p.add_argument(
        "--holdout",
        type=_names,
        default=list(DEFAULT_HOLDOUT),
        help="comma-separated classes held out of training (default with --data: "
        "--holdout-count 20%% of the classes)",
    )
    p.add_argument(
        "--holdout-count", type=int, default=None, help="hold out this many random classes instead"
    )
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of images for test")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="backbone input size (default: 64 for Fashion-MNIST, the backbone's own 224 for "
        "--data: real photos need it)",
    )
    p.add_argument("--head", default=DEFAULT_HEAD, choices=HEADS, help="head kind")
    p.add_argument("--epochs", type=int, default=15, help="training epochs")
    p.add_argument("--batch-size", type=int, default=128, help="training batch per worker")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    p.add_argument("-k", type=int, default=10, help="results per search")
    p.add_argument(
        "--vectors", default=DEFAULT_TEXT_SPACE, help="text space to train and search with"
    )
    p.add_argument(
        "--compare",
        type=_names,
        default=None,
        help="text spaces trained on the same cached features for the comparison table "
        "(comma list; empty for none; default glove-100d, none with --data)",
    )
    add_ray_args(p, workers_help="Ray Train workers, and model actors of each Ray Data stage")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    preflight(args.address)  # a dead cluster is named before the demo starts
    if args.compare is None:
        args.compare = [] if args.data else ["glove-100d"]
    if args.data and args.holdout == list(DEFAULT_HOLDOUT):
        args.holdout = []
        if args.holdout_count is None:
            from devise.catalog import count_classes

            args.holdout_count = max(1, round(0.2 * count_classes(args.data)))
    from devise.demo import run_demo

    return 0 if run_demo(args) else 1
