"""`devise embed` (and jobs/embed.py): images into the versioned parquet embeddings store."""

from __future__ import annotations

import argparse

from devise.commands.common import LOCAL_HELP, add_ray_args
from devise.config import DEFAULT_CHUNK_ROWS, DEFAULT_KEEP_VERSIONS, DEFAULT_MAX_ERROR_FRACTION
from devise.runtime import preflight


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "embed",
        help="embed images with a trained model into versioned parquet",
        description="Embed images into EMB_DIR/versions/<version>/part-*.parquet; "
        "bad files go to EMB_DIR/errors.parquet. Resumable: a rerun skips finished chunks.",
    )
    p.add_argument("--model", required=True, help="the RUN_DIR/model folder of `devise train`")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--catalog", help="catalog parquet from `devise catalog`")
    src.add_argument("--images", help="a folder of images (searched recursively; no labels)")
    p.add_argument(
        "--splits", default=None, help="with --catalog: comma-separated splits, or all (default)"
    )
    p.add_argument("--out", required=True, help="embeddings folder (EMB_DIR)")
    p.add_argument(
        "--incremental",
        action="store_true",
        help="embed only new or changed files (size, mtime) since the last version of this model",
    )
    p.add_argument(
        "--verify",
        choices=["stat", "content"],
        default="stat",
        help="how --incremental detects a changed file: stat (default) compares size and "
        "modification time; content also compares a hash of the bytes (reads every file)",
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="check every version's checksums, move damaged ones to EMB_DIR/damaged and embed "
        "again only the rows they lost (implies --incremental)",
    )
    p.add_argument(
        "--max-error-fraction",
        type=float,
        default=DEFAULT_MAX_ERROR_FRACTION,
        metavar="F",
        help="commit nothing when more than this share of the inputs fail (missing or "
        "unreadable files; with --incremental also paths gone since the last version); "
        "default %(default)s",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per model batch")
    p.add_argument(
        "--chunk-rows",
        type=int,
        default=DEFAULT_CHUNK_ROWS,
        help="rows per committed chunk: what a killed run loses at most",
    )
    p.add_argument("--decode-cpus", type=float, default=None, help="CPUs per decode task")
    p.add_argument("--torch-threads", type=int, default=None, help="CPU threads per model worker")
    p.add_argument(
        "--executor",
        choices=("auto", "ray", "local"),
        default="auto",
        help="ray: Ray Data on the cluster; local: this process with decode workers; auto "
        "(default): local unless a Ray cluster is given (--address, RAY_ADDRESS, `ray start`) "
        "or several GPU workers are asked for; the choice is printed",
    )
    p.add_argument(
        "--wait-lock",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long for another run writing EMB_DIR (0: exit at once)",
    )
    p.add_argument(
        "--keep-versions",
        type=int,
        default=DEFAULT_KEEP_VERSIONS,
        help="committed versions to keep (0: all)",
    )
    add_ray_args(
        p,
        workers_help="model actors",
        local_help=LOCAL_HELP + "; the same as --executor local",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not getattr(args, "local", False) and args.executor != "local":
        preflight(args.address)  # a dead cluster is named before the stage loads
    from devise.embed import run_cli

    return run_cli(args)
