"""`devise catalog`: an image folder into a catalog parquet."""

from __future__ import annotations

import argparse


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("catalog", help="scan an image folder into a catalog parquet")
    p.add_argument("root", help="data folder: one sub-folder per class, or Tiny ImageNet")
    p.add_argument("--out", required=True, help="catalog parquet to write")
    p.add_argument(
        "--layout",
        default="auto",
        choices=["auto", "tiny-imagenet", "folder"],
        help="how root is organised (auto: detect)",
    )
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of images for test")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--holdout", default=None, help="comma-separated classes held out (unseen)")
    g.add_argument("--holdout-count", type=int, default=None, help="hold out N random classes")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and --holdout-count")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from devise.catalog import run_cli

    return run_cli(args)
