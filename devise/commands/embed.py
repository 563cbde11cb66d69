"""`devise embed` (and jobs/embed.py): images into the versioned parquet embeddings store."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from devise.commands.common import LOCAL_HELP, add_ray_args, resources_from_args
from devise.config import EmbedConfig
from devise.runtime import preflight

_D = EmbedConfig  # every default below is the config's


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
        default=_D.verify,
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
        default=_D.max_error_fraction,
        metavar="F",
        help="commit nothing when more than this share of the inputs fail (missing or "
        "unreadable files; with --incremental also paths gone since the last version); "
        "default %(default)s",
    )
    _add_run_args(p)
    add_ray_args(
        p,
        workers_help="model actors",
        defaults=_D.resources,
        local_help=LOCAL_HELP + "; the same as --executor local",
    )
    p.set_defaults(func=run)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """Batches, chunks, the executor, the lock and old versions."""
    p.add_argument(
        "--batch-size", type=int, default=_D.resources.batch_size, help="images per model batch"
    )
    p.add_argument(
        "--chunk-rows",
        type=int,
        default=_D.chunk_rows,
        help="rows per committed chunk: what a killed run loses at most",
    )
    p.add_argument(
        "--decode-cpus", type=float, default=_D.resources.decode_cpus, help="CPUs per decode task"
    )
    p.add_argument(
        "--torch-threads", type=int, default=_D.torch_threads, help="CPU threads per model worker"
    )
    p.add_argument(
        "--executor",
        choices=("auto", "ray", "local"),
        default=_D.executor,
        help="ray: Ray Data on the cluster; local: this process with decode workers; auto "
        "(default): local unless a Ray cluster is given (--address, RAY_ADDRESS, `ray start`) "
        "or several GPU workers are asked for; the choice is printed",
    )
    p.add_argument(
        "--wait-lock",
        type=float,
        default=_D.wait_lock_s,
        metavar="SECONDS",
        help="wait this long for another run writing EMB_DIR (0: exit at once)",
    )
    p.add_argument(
        "--keep-versions",
        type=int,
        default=_D.keep_versions,
        help="committed versions to keep (0: all)",
    )


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so the run unwinds like Ctrl-C (lock released,
    finished chunks kept) instead of dying mid-write."""


@contextmanager
def _sigterm_unwinds() -> Iterator[Callable[[], None]]:
    """SIGTERM raises Terminated (once) while the block runs; yields a function that installs
    the handler again (Ray's start-up installs its own)."""

    def handler(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # we are already stopping
        raise Terminated()

    old = signal.getsignal(signal.SIGTERM)
    arm = lambda: signal.signal(signal.SIGTERM, handler)
    arm()
    try:
        yield arm
    finally:
        signal.signal(signal.SIGTERM, old)


def _parse_splits(text: str | None) -> list[str] | None:
    if text is None or text.strip().lower() == "all":
        return None
    return [s.strip() for s in text.split(",") if s.strip()]


def _executor_choice(config: EmbedConfig):
    """The executor for the run: --local/--executor, else Ray when a cluster is named
    (--address, RAY_ADDRESS, a cluster `ray start` recorded) or several GPU workers."""
    from devise.executors import choose_executor
    from devise.runtime import ray_address

    requested, res = config.executor, config.resources
    address = config.address or (ray_address(None)[0] if requested == "auto" else None)
    return choose_executor(requested, address=address, use_gpu=res.use_gpu, workers=res.num_workers)


def run(args: argparse.Namespace) -> int:
    """`devise embed`. SIGTERM or Ctrl-C stops the run with one line (exit 143 or 130),
    finished chunks kept for the rerun."""
    from devise.embed import EmbedError, embed
    from devise.runtime import init_ray
    from devise.store import ERRORS_FILE, STAGING_DIR

    if args.splits is not None and args.catalog is None:
        raise EmbedError("--splits applies to --catalog only.")
    # A bad width or bound is one sentence (the config's checks) before anything starts.
    config = EmbedConfig(
        model_dir=args.model,
        out=args.out,
        catalog=args.catalog,
        splits=_parse_splits(args.splits),
        images=args.images,
        incremental=args.incremental or args.repair,
        verify=args.verify,
        repair=args.repair,
        max_error_fraction=args.max_error_fraction,
        chunk_rows=args.chunk_rows,
        resources=resources_from_args(args),
        torch_threads=args.torch_threads,
        executor="local" if args.local else args.executor,
        address=args.address,
        wait_lock_s=args.wait_lock,
        keep_versions=args.keep_versions,
    )
    if config.executor != "local":
        preflight(args.address)  # a dead cluster is named before the stage loads
    staging = Path(args.out).expanduser() / STAGING_DIR
    try:
        with _sigterm_unwinds() as rearm:
            choice = _executor_choice(config)
            print(choice.line(), flush=True)
            if choice.name == "ray":
                init_ray(args.address)
                rearm()
            r = embed(replace(config, executor=choice.name))
    except (Terminated, KeyboardInterrupt) as e:
        code, what = (143, "terminated") if isinstance(e, Terminated) else (130, "interrupted")
        print(
            f"devise embed: {what}; nothing was committed and the finished chunks in {staging} "
            "are kept: rerun the same command to resume.",
            file=sys.stderr,
            flush=True,
        )
        # Unwinding released the lock and kept the chunks; the interpreter's teardown (torch,
        # Ray) can outlast a scheduler's grace period on a busy node, so leave at once.
        sys.stdout.flush()
        os._exit(code)
    print(
        f"Committed {r.version} to {r.emb_dir}: {r.rows} images embedded, {r.errors} errors "
        f"(this run: {r.embedded} embedded, {r.resumed} resumed, {r.reused} unchanged, "
        f"{r.removed} removed) in {r.seconds:.1f}s."
    )
    if r.index:
        print(r.index)
    if r.repaired:
        print(f"Repaired: moved {', '.join(r.repaired)} to {r.emb_dir / 'damaged'}.")
    if r.errors:
        print(f"Files that could not be embedded, with reasons: {r.emb_dir / ERRORS_FILE}")
    return 0
