"""`devise demo`: the embedded default end to end."""

from __future__ import annotations

import argparse

from devise.commands.common import add_ray_args, resources_from_args
from devise.config import HEADS, DemoConfig
from devise.runtime import preflight

DEFAULTS = DemoConfig()


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="the whole pipeline on the embedded default data, or on --data PATH"
    )
    p.add_argument("--out", default=DEFAULTS.out, help="folder for every output")
    p.add_argument(
        "--data",
        default=None,
        help="your own images instead of Fashion-MNIST: a Tiny ImageNet folder (wnids.txt, "
        "words.txt, train/, val/) or one sub-folder per class",
    )
    p.add_argument(
        "--per-class", type=int, default=DEFAULTS.per_class, help="Fashion-MNIST images per class"
    )
    p.add_argument("--all", action="store_true", help="all 70,000 Fashion-MNIST images")
    p.add_argument(
        "--holdout",
        type=_names,
        default=list(DEFAULTS.holdout),
        help="comma-separated classes held out of training (default with --data: "
        "--holdout-count 20%% of the classes)",
    )
    p.add_argument(
        "--holdout-count", type=int, default=None, help="hold out this many random classes instead"
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        default=DEFAULTS.test_fraction,
        help="share of images for test",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="backbone input size (default: 64 for Fashion-MNIST, the backbone's own 224 for "
        "--data: real photos need it)",
    )
    p.add_argument("--head", default=DEFAULTS.head, choices=HEADS, help="head kind")
    p.add_argument("--epochs", type=int, default=DEFAULTS.epochs, help="training epochs")
    p.add_argument(
        "--batch-size", type=int, default=DEFAULTS.batch_size, help="training batch per worker"
    )
    p.add_argument("--lr", type=float, default=DEFAULTS.lr, help="learning rate")
    p.add_argument("-k", type=int, default=DEFAULTS.k, help="results per search")
    p.add_argument(
        "--vectors", default=DEFAULTS.vectors, help="text space to train and search with"
    )
    p.add_argument(
        "--compare",
        type=_names,
        default=None,
        help="text spaces trained on the same cached features for the comparison table "
        f"(comma list; empty for none; default {','.join(DEFAULTS.compare)}, none with --data)",
    )
    add_ray_args(
        p,
        workers_help="Ray Train workers, and model actors of each Ray Data stage",
        defaults=DEFAULTS.resources,
    )
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """The DemoConfig the flags name; with --data, no Fashion-MNIST class is held out (20% of
    the folder's classes, at random, unless --holdout or --holdout-count says otherwise) and no
    other text space is compared unless --compare names one."""
    holdout, holdout_count = args.holdout, args.holdout_count
    if args.data and holdout == list(DEFAULTS.holdout):
        holdout = []
        if holdout_count is None:
            from devise.catalog import count_classes

            holdout_count = max(1, round(0.2 * count_classes(args.data)))
    compare = args.compare
    if compare is None:
        compare = [] if args.data else list(DEFAULTS.compare)
    return DemoConfig(
        out=args.out,
        data=args.data,
        per_class=None if args.all else args.per_class,
        holdout=tuple(holdout),
        holdout_count=holdout_count,
        test_fraction=args.test_fraction,
        image_size=args.image_size,
        head=args.head,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        k=args.k,
        vectors=args.vectors,
        compare=tuple(compare),
        address=args.address,
        # --batch-size is the training batch; the image passes keep their own model batch.
        resources=resources_from_args(args, batch_size=DEFAULTS.resources.batch_size),
    )


def run(args: argparse.Namespace) -> int:
    preflight(args.address)  # a dead cluster is named before the demo starts
    config = config_from_args(args)
    from devise.demo import run_demo

    return 0 if run_demo(config) else 1
