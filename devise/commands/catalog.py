"""`devise catalog`: an image folder into a catalog parquet."""

from __future__ import annotations

import argparse
from pathlib import Path


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
    """`devise catalog`: scan, split, write the parquet and say what was held out or skipped."""
    from devise.catalog import SPLITS, build_catalog, check_out, write_catalog, write_skipped
    from devise.fsutil import printable

    holdout = [h for h in args.holdout.split(",") if h.strip()] if args.holdout else None
    check_out(Path(args.out))
    skipped: list[tuple[str, str]] = []
    df = build_catalog(
        args.root, args.layout, args.test_fraction, holdout, args.holdout_count, args.seed, skipped
    )
    out = write_catalog(df, args.out)
    counts = df["split"].value_counts().reindex(list(SPLITS), fill_value=0)
    print(
        f"Wrote {out}: {len(df)} images, {df['label'].nunique()} classes "
        f"(train {counts['train']}, test {counts['test']}, unseen {counts['unseen']})."
    )
    held = sorted(df.loc[df["split"] == "unseen", "class_name"].unique())
    if held:
        print("Held out (unseen): " + ", ".join(printable(h) for h in held))
    if skipped:
        listing = write_skipped(skipped, args.out)
        path, reason = skipped[0]
        print(
            f"Skipped {len(skipped)} file(s) whose names cannot be catalogued (e.g. "
            f"{printable(path)}: {reason}); the list is in {listing}."
        )
    return 0
