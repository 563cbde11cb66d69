"""`devise demo`: the embedded default end to end."""

from __future__ import annotations

import argparse

from devise.commands.train import DEFAULT_HEAD
from devise.runtime import add_ray_args, preflight

DEFAULT_HOLDOUT = ("sandal", "pullover")  # the demo module's; a test keeps them equal


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the whole pipeline on the embedded default data")
    p.add_argument("--out", default="runs/demo", help="folder for every output")
    p.add_argument("--per-class", type=int, default=500, help="Fashion-MNIST images per class")
    p.add_argument("--all", action="store_true", help="all 70,000 Fashion-MNIST images")
    p.add_argument(
        "--holdout",
        type=_names,
        default=list(DEFAULT_HOLDOUT),
        help="comma-separated classes held out of training",
    )
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of images for test")
    p.add_argument("--image-size", type=int, default=64, help="backbone input size")
    p.add_argument("--head", default=DEFAULT_HEAD, choices=("linear", "mlp"), help="head kind")
    p.add_argument("--epochs", type=int, default=15, help="training epochs")
    p.add_argument("--batch-size", type=int, default=128, help="training batch per worker")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    p.add_argument("-k", type=int, default=10, help="results per search")
    p.add_argument("--vectors", default="minilm", help="text space to train and search with")
    p.add_argument(
        "--compare",
        type=_names,
        default=["glove-100d"],
        help="text spaces trained on the same cached features for the comparison table "
        "(comma list; empty for none)",
    )
    add_ray_args(p, workers_help="Ray Train workers, and model actors of each Ray Data stage")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    preflight(args.address)  # a dead cluster is named before the demo starts
    from devise.demo import run_demo

    return 0 if run_demo(args) else 1
