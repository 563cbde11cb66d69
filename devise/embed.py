"""Batch embedding into versioned parquet: image paths -> Ray Data (decode, ModelActor) ->
devise.store's staging writer -> a committed version. Resumable (finished chunks are reused),
incremental (only new or changed files), guarded (a run whose inputs mostly failed commits
nothing), and able to rebuild damaged versions (--repair).

The folder layout, verification, commit and lock live in devise.store.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from devise.config import EmbedConfig, PipelineConfig
from devise.console import progress
from devise.fsutil import hash_paths, name_problem, stat_paths
from devise.store import (
    FORMAT,
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
    from devise.ann import carry_index  # a no-op unless the previous version had an index
    from devise.model import load_spec
    from devise.model import model_id as compute_model_id

    t0 = time.perf_counter()
    model_dir = Path(config.model_dir).expanduser()
    spec = load_spec(model_dir)
    mid = compute_model_id(model_dir)
    table = input_table(config.catalog, config.splits, config.images)
    store = Store.open(config.out, create=True)
    meta = {"model_id": mid, "dim": spec.out_dim, "vectors": spec.vectors,
            "vectors_id": spec.vectors_id, "backbone": spec.backbone,
            "image_size": spec.image_size, "format": FORMAT}  # fmt: skip
    with store.writing(config.wait_lock_s, config.stale_lock_s):
        plan, hashes = _plan(config, store, table, mid)
        staging = store.staging(mid)
        run_table, resumed = _still_to_embed(store, staging, plan)
        log.info(
            f"{store.root}: {len(table)} inputs, {len(run_table)} to embed ({resumed} already "
            f"staged), {len(plan.keep)} unchanged, {len(plan.missing)} missing, "
            f"{len(plan.removed)} removed."
        )
        nodes: dict[str, int] = {}
        if len(run_table):
            writer = store.writer(
                staging, run_table, embedding_schema(spec.out_dim, meta), mid, config.chunk_rows,
                on_part,
            )  # fmt: skip
            nodes = _run_model(config, spec, model_dir, run_table, writer, runner)
            if not writer.done.all():
                raise EmbedError(
                    f"The pipeline returned {int(writer.done.sum())} of {len(run_table)} rows; "
                    f"rerun to finish (finished chunks in {staging} are kept)."
                )
        name, manifest = store.commit(
            staging,
            table,
            plan,
            model_id=mid,
            meta=meta,
            extra=_provenance(config, model_dir, spec, resumed, nodes),
            hashes=hashes,
            keep_versions=0,  # old versions go after the index is carried (below), not before
            max_error_fraction=config.max_error_fraction,
        )
        index_line = carry_index(store.root, name, manifest)
        store.gc(config.keep_versions)
    return EmbedResult(
        emb_dir=store.root,
        version=name,
        model_id=mid,
        rows=manifest.rows,
        errors=manifest.errors,
        embedded=len(run_table),
        resumed=resumed,
        reused=manifest.reused,
        removed=len(plan.removed),
        seconds=time.perf_counter() - t0,
        base_version=plan.base.version if plan.base is not None else None,
        repaired=tuple(plan.damaged),
        index=index_line,
        nodes=nodes,
    )


def _plan(config: EmbedConfig, store: Store, table: pd.DataFrame, mid: str):
    """What this run embeds, keeps and drops (Store.plan), from each file's size and mtime (and
    with verify="content" a hash of its bytes); (the plan, the hashes or None)."""
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
    return plan, hashes


def _still_to_embed(store: Store, staging, plan) -> tuple[pd.DataFrame, int]:
    """The plan's rows not staged yet by an interrupted run; (those rows, rows resumed)."""
    staged = store.staged_keys(staging)
    fresh = ~row_keys(plan.todo).map(lambda k: k in staged).to_numpy(dtype=bool)
    return plan.todo[fresh].reset_index(drop=True), int(len(plan.todo) - fresh.sum())


def _run_model(config: EmbedConfig, spec, model_dir: Path, run_table, writer, runner) -> dict:
    """run_table's images through the model into the staging writer; rows per Ray node."""
    from devise.executors import pick_runner

    res = config.resources
    pconfig = PipelineConfig(
        backbone=spec.backbone,
        weights=spec.backbone_weights,
        image_size=spec.image_size,
        head_dir=str(model_dir),
        resources=res,
        torch_threads=config.torch_threads,
    )
    executor = "local" if config.local else config.executor
    run = runner or pick_runner(
        executor, len(run_table), config.address, res.use_gpu, res.num_workers
    )
    nodes: dict[str, int] = {}
    feed = pd.DataFrame({"path": run_table["path"], "row": np.arange(len(run_table))})
    for batch in progress(run(feed, pconfig), len(feed), "embedding"):
        writer.add(batch)
        if "node" in batch:
            for node, n in zip(*np.unique(batch["node"], return_counts=True)):
                nodes[str(node)] = nodes.get(str(node), 0) + int(n)
    writer.flush()
    return nodes


def _provenance(config: EmbedConfig, model_dir: Path, spec, resumed: int, nodes: dict) -> dict:
    """What the manifest records of the run beyond its rows."""
    return {
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
