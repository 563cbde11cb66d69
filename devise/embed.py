"""Batch embedding into versioned parquet: image paths -> Ray Data (decode, ModelActor) ->
devise.store's staging writer -> a committed version. Resumable (finished chunks are reused),
incremental (only new or changed files), guarded (a run whose inputs mostly failed commits
nothing), and able to rebuild damaged versions (--repair).

The folder layout, verification, commit and lock live in devise.store.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from devise.config import EmbedConfig
from devise.console import progress
from devise.fsutil import hash_paths, name_problem, stat_paths
from devise.store import (
    ERRORS_FILE,
    FORMAT,
    STAGING_DIR,
    EmbedError,
    PartInfo,
    Store,
    embedding_schema,
    row_keys,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# inputs and the plan


def input_table(
    catalog: str | os.PathLike | None = None,
    splits: Iterable[str] | None = None,
    images: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """The paths to embed (path, label, class_name), from a catalog or an image folder.

    Paths are kept as the catalog gives them (absolute); a folder's are made absolute. Labels
    are null for a folder. Repeated paths are kept once.
    """
    from devise.images import is_image_path

    if (catalog is None) == (images is None):
        raise EmbedError("Give exactly one of --catalog CATALOG or --images FOLDER.")
    if catalog is not None:
        from devise.catalog import read_catalog

        df = read_catalog(catalog, splits)
        if "class_name" not in df.columns:
            df["class_name"] = None
        df = df[["path", "label", "class_name"]].astype(object)
        source = f"catalog {catalog}"
    else:
        root = Path(images).expanduser()
        if not root.is_dir():
            raise EmbedError(f"Image folder {root} does not exist or is not a folder.")
        found = [os.path.abspath(p) for p in root.rglob("*") if is_image_path(p.name)]
        paths = sorted(p for p in found if name_problem(p) is None and os.path.isfile(p))
        if len(paths) < len(found):
            log.warning("Skipped files under %s whose names are not plain UTF-8 text.", root)
        df = pd.DataFrame({"path": paths, "label": None, "class_name": None}, dtype=object)
        source = f"folder {root}"
    if df.empty:
        raise EmbedError(f"No images to embed in the {source}.")
    df["path"] = df["path"].astype(str)
    dups = int(df["path"].duplicated().sum())
    if dups:
        log.warning("%d repeated paths in the %s: each is embedded once.", dups, source)
        df = df.drop_duplicates("path", keep="first")
    return df.reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class EmbedResult:
    """What a run did; counts add up to the input rows (rows + errors)."""

    emb_dir: Path
    version: str
    model_id: str
    rows: int  # embedded rows in the version
    errors: int  # rows in errors.parquet
    embedded: int  # images run through the model by this run
    resumed: int  # rows taken from an interrupted run's staged chunks
    reused: int  # rows (and errors) carried over from the base version unchanged
    removed: int
    seconds: float
    base_version: str | None = None
    repaired: tuple[str, ...] = ()  # damaged versions moved to EMB_DIR/damaged
    index: str | None = None  # the approximate index carried from the previous version
    nodes: dict[str, int] | None = None  # rows this run embedded on each Ray node


# EmbedConfig fields passed on to the pipeline as they are.
PIPELINE_FIELDS = (
    "batch_size",
    "num_workers",
    "cpus_per_worker",
    "decode_cpus",
    "use_gpu",
    "gpus_per_worker",
    "torch_threads",
    "engine",
)
Runner = Callable[[pd.DataFrame, object], Iterator[dict[str, np.ndarray]]]


def embed(
    config: EmbedConfig,
    on_part: Callable[[PartInfo], None] | None = None,
    runner: Runner | None = None,
) -> EmbedResult:
    """Embed the configured images into a new version of config.out and make it current.

    Full run: every input path goes through the model. Incremental: only paths new or changed
    (size or mtime; with verify="content" also the bytes) since the newest intact version of the
    same model; the rest is carried over. Repair: damaged versions are moved aside and the rows
    they lost are embedded again. Chunks finished by an interrupted run of the same model are
    reused, not recomputed. on_part is called after each chunk is staged (progress; tests).
    """
    from devise.executors import pick_runner
    from devise.model import load_spec
    from devise.model import model_id as compute_model_id
    from devise.pipeline import PipelineConfig

    t0 = time.perf_counter()
    model_dir = Path(config.model_dir).expanduser()
    spec = load_spec(model_dir)
    mid = compute_model_id(model_dir)
    table = input_table(config.catalog, config.splits, config.images)
    store = Store.open(config.out, create=True)
    meta = {
        "model_id": mid,
        "dim": spec.out_dim,
        "vectors": spec.vectors,
        "vectors_id": spec.vectors_id,
        "backbone": spec.backbone,
        "image_size": spec.image_size,
        "format": FORMAT,
    }
    with store.writing(config.wait_lock_s, config.stale_lock_s):
        sizes, mtimes = stat_paths(table["path"].tolist())
        table["size_bytes"], table["mtime_ns"] = sizes, mtimes
        hashes = hash_paths(table["path"].tolist()) if config.verify == "content" else None
        plan = store.plan(
            table,
            mid,
            incremental=config.incremental,
            repair=config.repair,
            hashes=hashes,
            max_error_fraction=config.max_error_fraction,
        )
        staging = store.staging(mid)
        staged = store.staged_keys(staging)
        fresh = ~row_keys(plan.todo).map(lambda k: k in staged).to_numpy(dtype=bool)
        resumed = int(len(plan.todo) - fresh.sum())
        run_table = plan.todo[fresh].reset_index(drop=True)
        nodes: dict[str, int] = {}
        log.info(
            f"{store.root}: {len(table)} inputs, {len(run_table)} to embed ({resumed} already "
            f"staged), {len(plan.keep)} unchanged, {len(plan.missing)} missing, "
            f"{len(plan.removed)} removed."
        )
        if len(run_table):
            pconfig = PipelineConfig(
                backbone=spec.backbone,
                weights=spec.backbone_weights,
                image_size=spec.image_size,
                head_dir=str(model_dir),
                **{k: getattr(config, k) for k in PIPELINE_FIELDS},
            )
            run = runner or pick_runner(
                "local" if config.local else config.executor,
                len(run_table),
                config.address,
                config.use_gpu,
                config.num_workers,
            )
            schema = embedding_schema(spec.out_dim, meta)
            writer = store.writer(staging, run_table, schema, mid, config.chunk_rows, on_part)
            feed = pd.DataFrame({"path": run_table["path"], "row": np.arange(len(run_table))})
            for batch in progress(run(feed, pconfig), len(feed), "embedding"):
                writer.add(batch)
                if "node" in batch:
                    for node, n in zip(*np.unique(batch["node"], return_counts=True)):
                        nodes[str(node)] = nodes.get(str(node), 0) + int(n)
            writer.flush()
            if not writer.done.all():
                raise EmbedError(
                    f"The pipeline returned {int(writer.done.sum())} of {len(run_table)} rows; "
                    f"rerun to finish (finished chunks in {staging} are kept)."
                )
        extra = {
            "model_dir": str(model_dir.resolve()),
            "backbone_weights": spec.backbone_weights,
            "incremental": config.incremental,
            "source": {"catalog": config.catalog, "images": config.images, "splits": config.splits},
            "config": {
                k: v
                for k, v in asdict(config).items()
                if k not in ("model_dir", "out", "catalog", "images", "splits", "incremental")
            },
            "host": socket.gethostname(),
            "resumed": resumed,
            "nodes": nodes,  # rows this run embedded on each Ray node (empty: none or local)
        }
        name, manifest = store.commit(
            staging,
            table,
            plan,
            model_id=mid,
            meta=meta,
            extra=extra,
            hashes=hashes,
            keep_versions=0,  # old versions go after the index is carried (below), not before
            max_error_fraction=config.max_error_fraction,
        )
        from devise.ann import carry_index  # a no-op unless the previous version had an index

        index_line = carry_index(store.root, name, manifest)
        store.gc(config.keep_versions)
    return EmbedResult(
        emb_dir=store.root,
        version=name,
        model_id=mid,
        rows=manifest["rows"],
        errors=manifest["errors"],
        embedded=len(run_table),
        resumed=resumed,
        reused=manifest["reused"],
        removed=len(plan.removed),
        seconds=time.perf_counter() - t0,
        base_version=plan.base.version if plan.base is not None else None,
        repaired=tuple(plan.damaged),
        index=index_line,
        nodes=nodes,
    )


# ---------------------------------------------------------------------------------------------
# CLI


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


def _executor_choice(args: argparse.Namespace):
    """The executor for `devise embed`'s flags: --local/--executor, else Ray when a cluster is
    named (--address, RAY_ADDRESS, a cluster `ray start` recorded) or several GPU workers."""
    from devise.executors import choose_executor
    from devise.runtime import ray_address

    requested = "local" if args.local else args.executor
    address = args.address or (ray_address(None)[0] if requested == "auto" else None)
    return choose_executor(
        requested, address=address, use_gpu=args.use_gpu, workers=args.num_workers
    )


def run_cli(args: argparse.Namespace) -> int:
    """`devise embed` (flags: devise/commands/embed.py). SIGTERM or Ctrl-C stops the run with
    one line (exit 143 or 130), finished chunks kept for the rerun."""
    from devise.commands.common import resources_from_args
    from devise.runtime import init_ray, resolve_resources

    if args.splits is not None and args.catalog is None:
        raise EmbedError("--splits applies to --catalog only.")
    for flag in ("batch_size", "chunk_rows", "num_workers"):
        if getattr(args, flag) < 1:
            raise EmbedError(f"--{flag.replace('_', '-')} must be at least 1.")
    if not 0.0 <= args.max_error_fraction <= 1.0:
        raise EmbedError("--max-error-fraction must be between 0 and 1.")
    staging = Path(args.out).expanduser() / STAGING_DIR
    try:
        with _sigterm_unwinds() as rearm:
            choice = _executor_choice(args)
            print(choice.line(), flush=True)
            if choice.name == "ray":
                init_ray(args.address)
                rearm()
            res = resolve_resources(resources_from_args(args))
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
                **res.as_kwargs(),
                torch_threads=args.torch_threads,
                executor=choice.name,
                address=args.address,
                wait_lock_s=args.wait_lock,
                keep_versions=args.keep_versions,
            )
            r = embed(config)
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
