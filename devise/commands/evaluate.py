"""`devise evaluate` (and jobs/evaluate.py): paper-style tables for a trained model."""

from __future__ import annotations

import argparse

from devise.commands.common import LOCAL_HELP, add_ray_args
from devise.runtime import check_local, preflight


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="paper-style tables: flat and zero-shot hit@k, GZSL, retrieval"
    )
    p.add_argument("--model", required=True, help="RUN_DIR/model written by `devise train`")
    p.add_argument("--catalog", required=True, help="catalog parquet with test/unseen splits")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--feature-cache", default=None, help="default: $DEVISE_HOME/features")
    p.add_argument("--conse-top", type=int, default=10, help="ConSE's T")
    p.add_argument(
        "--pseudo-unseen",
        type=int,
        default=None,
        help="training classes held out per calibration draw (default: a fifth of them)",
    )
    p.add_argument(
        "--calibration-draws",
        type=int,
        default=5,
        help="pseudo-unseen draws whose H curves are averaged to choose γ",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per backbone batch")
    p.add_argument("--decode-cpus", type=float, default=None, help="CPUs per decode task")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    add_ray_args(
        p,
        workers_help="backbone actors (feature extraction)",
        num_workers=1,
        local_help=LOCAL_HELP + "; features by the local executor (decode processes + the "
        "backbone here, as `devise embed --local`)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_local(args.local, args.address)
    if not args.local:
        preflight(args.address)  # a dead cluster is named before the stage loads
    from devise.evaluate import run_cli

    return run_cli(args)
