"""Batch embedding into versioned parquet: image paths -> Ray Data -> head embeddings, resumable,
incremental, committed atomically so readers only ever see complete versions.

The folder layout, the version readers and the lock live in devise.store; this module plans a
run, runs the model over chunks of rows into staging, and commits a new version.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from devise.console import progress
from devise.fsutil import atomic_path
from devise.store import (  # noqa: F401 -- re-exported: the public API of devise.embed
    CURRENT_FILE,
    DEFAULT_CHUNK_ROWS,
    DEFAULT_KEEP_VERSIONS,
    ERRORS_FILE,
    FORMAT,
    INPUT_COLUMNS,
    KEY_COLUMNS,
    LOCK_FILE,
    MANIFEST_FILE,
    META_PREFIX,
    MISSING_REASON,
    REMOVED_FILE,
    STAGING_DIR,
    VERSIONS_DIR,
    EmbedError,
    EmbedLock,
    LockHeldError,
    LockInfo,
    _seq,
    _strings,
    _write_atomic,
    _write_text_atomic,
    current_version,
    embedding_matrix,
    embedding_schema,
    error_schema,
    errors_to_table,
    list_versions,
    read_errors,
    read_manifest,
    read_parquet_meta,
    read_version,
    rows_to_table,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# inputs and the plan


def stat_paths(paths: Sequence[str], threads: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(size_bytes, mtime_ns) int64 arrays for paths; -1 where a path is missing or unreadable.

    Threads, since stat() waits on the file system (NFS) rather than the CPU.
    """

    def one(p: str) -> tuple[int, int]:
        try:
            st = os.stat(p)
        except OSError:
            return -1, -1
        return st.st_size, st.st_mtime_ns

    if len(paths) > 2000:
        with ThreadPoolExecutor(threads) as pool:
            stats = list(pool.map(one, paths, chunksize=512))
    else:
        stats = [one(p) for p in paths]
    arr = np.array(stats, dtype=np.int64).reshape(-1, 2)
    return arr[:, 0].copy(), arr[:, 1].copy()


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
        paths = sorted(
            os.path.abspath(p) for p in root.rglob("*") if is_image_path(p.name) and p.is_file()
        )
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


@dataclass
class Plan:
    """What a run does with each input row (every row lands in exactly one table)."""

    todo: pd.DataFrame  # to embed (INPUT_COLUMNS)
    keep: pd.DataFrame  # unchanged since the base version: reuse its row or error
    missing: pd.DataFrame  # no such file: an error without a decode
    removed: list[str]  # in the previous version, not in the input any more


def _keys(df: pd.DataFrame) -> pd.Series:
    """One hashable key per row: (path, size, mtime)."""
    return pd.Series(
        list(
            zip(
                df["path"].astype(str),
                df["size_bytes"].astype(np.int64),
                df["mtime_ns"].astype(np.int64),
            )
        ),
        index=df.index,
        dtype=object,
    )


def plan_run(
    table: pd.DataFrame, base: pd.DataFrame | None, previous_paths: Iterable[str] = ()
) -> Plan:
    """Split the input (INPUT_COLUMNS, stat'd; size -1 = missing) against the base version.

    base: (path, size_bytes, mtime_ns) of every row and error in the base version (same model),
    or None for a full run. A row is kept when its path, size and mtime all match the base;
    new or changed rows are embedded; removed = previous paths not in the input.
    """
    missing_mask = table["size_bytes"].to_numpy() < 0
    present = table[~missing_mask]
    if base is not None and len(base) and len(present):
        known = set(_keys(base[KEY_COLUMNS]))
        same = _keys(present).map(lambda k: k in known).to_numpy(dtype=bool)
    else:
        same = np.zeros(len(present), dtype=bool)
    inputs = set(table["path"])
    removed = sorted(p for p in set(previous_paths) if p not in inputs)
    return Plan(
        todo=present[~same].reset_index(drop=True),
        keep=present[same].reset_index(drop=True),
        missing=table[missing_mask].reset_index(drop=True),
        removed=removed,
    )


# ---------------------------------------------------------------------------------------------
# running the model: chunks of rows -> staged parts


@dataclass
class EmbedConfig:
    """One embedding run: model, inputs, output folder, resources (all flags)."""

    model_dir: str
    out: str
    catalog: str | None = None
    splits: list[str] | None = None
    images: str | None = None
    incremental: bool = False
    batch_size: int = 64
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    decode_cpus: float = 1.0
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    torch_threads: int | None = None
    local: bool = False  # run in this process, without Ray (small folders, tests)
    wait_lock_s: float = 0.0
    stale_lock_s: float = 600.0
    keep_versions: int = DEFAULT_KEEP_VERSIONS


@dataclass
class PartInfo:
    """A chunk committed to staging: its index, files and row counts."""

    index: int
    path: Path
    rows: int
    errors: int


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
    extra: dict = field(default_factory=dict)


Runner = Callable[[pd.DataFrame, object], Iterator[dict[str, np.ndarray]]]


def run_local(table: pd.DataFrame, config) -> Iterator[dict[str, np.ndarray]]:
    """The pipeline in this process, without Ray: same decode and model code, batch by batch."""
    from devise.pipeline import ModelActor, decode_batch

    actor = ModelActor(
        config.backbone,
        config.weights,
        config.head_dir,
        device="cuda" if config.use_gpu else "cpu",
        torch_threads=config.torch_threads,
    )
    cols = {c: table[c].to_numpy() for c in table.columns}
    for a in range(0, len(table), config.batch_size):
        batch = {c: v[a : a + config.batch_size] for c, v in cols.items()}
        yield actor(decode_batch(batch, config.backbone, config.image_size))


class _StagingWriter:
    """Buffers pipeline output and commits it to staging every `chunk_rows` rows.

    errors-N.parquet is written first, part-N.parquet last: a chunk whose part file exists is
    complete, so a rerun can trust it.
    """

    def __init__(
        self,
        folder: Path,
        todo: pd.DataFrame,
        schema: pa.Schema,
        model_id: str,
        chunk_rows: int,
        on_part: Callable[[PartInfo], None] | None,
    ) -> None:
        self.folder = folder
        self.todo = todo
        self.schema = schema
        self.model_id = model_id
        self.chunk_rows = max(1, chunk_rows)
        self.on_part = on_part
        self.index = _next_part_index(folder)
        self.rows: list[np.ndarray] = []
        self.embs: list[np.ndarray] = []
        self.errors: list[str] = []
        self.buffered = 0
        self.done = np.zeros(len(todo), dtype=bool)

    def add(self, batch: dict[str, np.ndarray]) -> None:
        rows = np.asarray(batch["row"], dtype=np.int64)
        if self.done[rows].any() or len(np.unique(rows)) != len(rows):
            raise EmbedError("The pipeline returned a row twice; refusing to write duplicates.")
        self.done[rows] = True
        self.rows.append(rows)
        self.embs.append(np.asarray(batch["embedding"], dtype=np.float32))
        self.errors.extend(str(e) for e in batch["error"])
        self.buffered += len(rows)
        if self.buffered >= self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        if not self.buffered:
            return
        rows = np.concatenate(self.rows)
        embs = np.concatenate(self.embs)
        reasons = np.asarray(self.errors, dtype=object)
        bad = reasons != ""
        meta = self.todo.iloc[rows]
        name = f"{self.index:05d}"
        _write_atomic(
            errors_to_table(meta[bad], reasons[bad].tolist(), self.model_id),
            self.folder / f"errors-{name}.parquet",
        )
        part = self.folder / f"part-{name}.parquet"
        _write_atomic(rows_to_table(meta[~bad], embs[~bad], self.model_id, self.schema), part)
        info = PartInfo(self.index, part, int((~bad).sum()), int(bad.sum()))
        self.index += 1
        self.rows, self.embs, self.errors, self.buffered = [], [], [], 0
        if self.on_part is not None:
            self.on_part(info)


def _next_part_index(folder: Path) -> int:
    indices = [int(p.stem.split("-")[1]) for p in folder.glob("part-*.parquet")]
    return max(indices, default=-1) + 1


def _staged_parts(folder: Path) -> list[tuple[Path, Path]]:
    """(part, errors) files of the complete chunks in a staging folder, in index order."""
    out = []
    for part in sorted(folder.glob("part-*.parquet")):
        errors = folder / part.name.replace("part-", "errors-", 1)
        out.append((part, errors))
    return out


def _staged_keys(folder: Path) -> set:
    """(path, size, mtime) of every row the staged chunks already settled (embedded or error)."""
    keys: set = set()
    for part, errors in _staged_parts(folder):
        for f in (part, errors):
            if f.exists():
                df = pq.read_table(f, columns=KEY_COLUMNS).to_pandas()
                keys.update(_keys(df.fillna(-1)))
    return keys


# ---------------------------------------------------------------------------------------------
# committing a version


def _base_keys(emb_dir: Path, version: str | None) -> pd.DataFrame | None:
    """(path, size_bytes, mtime_ns) of a version's rows and errors; None without a version."""
    if version is None:
        return None
    _, rows = read_version(emb_dir, version, columns=KEY_COLUMNS)
    errors = pq.read_table(
        emb_dir / VERSIONS_DIR / version / ERRORS_FILE, columns=["path", "size_bytes", "mtime_ns"]
    )
    df = pd.concat([rows.to_pandas(), errors.to_pandas()], ignore_index=True)
    return df.fillna(-1).astype({"size_bytes": np.int64, "mtime_ns": np.int64})


def _previous_paths(emb_dir: Path, version: str | None) -> list[str]:
    if version is None:
        return []
    _, rows = read_version(emb_dir, version, columns=["path"])
    errors = pq.read_table(emb_dir / VERSIONS_DIR / version / ERRORS_FILE, columns=["path"])
    return rows.column("path").to_pylist() + errors.column("path").to_pylist()


def _relabel(table: pa.Table, labels: dict[str, tuple]) -> pa.Table:
    """Take label and class_name from the current input (a catalog may rename a class)."""
    paths = table.column("path").to_pylist()
    label = _strings([labels[p][0] for p in paths])
    name = _strings([labels[p][1] for p in paths])
    table = table.set_column(table.schema.get_field_index("label"), "label", label)
    return table.set_column(table.schema.get_field_index("class_name"), "class_name", name)


def _filter_file(
    src: Path,
    dst: Path,
    wanted: set,
    labels: dict[str, tuple],
    seen: set,
    schema: pa.Schema,
    move: bool,
) -> int:
    """Copy the rows of src whose (path, size, mtime) key is wanted and not yet seen into dst.

    A file whose every row is kept with unchanged labels is moved or hard-linked, not rewritten.
    Returns the rows written (0: nothing written).
    """
    table = pq.read_table(src)
    if table.num_rows == 0:
        return 0
    keys = _keys(table.select(KEY_COLUMNS).to_pandas().fillna(-1))
    mask = np.array([k in wanted and k not in seen for k in keys], dtype=bool)
    # The same key twice in one file (it cannot happen, but never write it twice).
    mask &= ~keys.duplicated().to_numpy()
    if not mask.any():
        return 0
    seen.update(keys[mask])
    kept = table.filter(pa.array(mask)) if not mask.all() else table
    relabelled = _relabel(kept, labels)
    if mask.all() and relabelled.equals(table):
        if move:
            os.replace(src, dst)
        else:
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
    else:
        pq.write_table(relabelled.cast(schema), dst)
    return int(mask.sum())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _commit(
    emb_dir: Path,
    staging: Path,
    table: pd.DataFrame,
    plan: Plan,
    base_version: str | None,
    previous_version: str | None,
    manifest_extra: dict,
    model_id: str,
    dim: int,
    meta: dict,
    keep_versions: int,
) -> tuple[str, dict]:
    """Assemble a version from base rows + staged chunks + errors and make it current."""
    versions = emb_dir / VERSIONS_DIR
    versions.mkdir(parents=True, exist_ok=True)
    seq = max((_seq(d.name.removeprefix(".tmp-")) for d in versions.iterdir()), default=0) + 1
    name = f"{seq:06d}-{model_id}"
    tmp = versions / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    schema = embedding_schema(dim, meta)
    labels = {
        p: (lab, cn) for p, lab, cn in zip(table["path"], table["label"], table["class_name"])
    }
    seen: set = set()
    parts: list[dict] = []
    error_tables: list[pa.Table] = []

    def add_part(src: Path, move: bool, wanted: set) -> None:
        dst = tmp / f"part-{len(parts):05d}.parquet"
        n = _filter_file(src, dst, wanted, labels, seen, schema, move)
        if n:
            parts.append({"file": dst.name, "rows": n})

    def add_errors(src: Path, wanted: set) -> None:
        errs = pq.read_table(src)
        if errs.num_rows == 0:
            return
        keys = _keys(errs.select(KEY_COLUMNS).to_pandas().fillna(-1))
        mask = np.array([k in wanted and k not in seen for k in keys], dtype=bool)
        mask &= ~keys.duplicated().to_numpy()
        seen.update(keys[mask])
        if mask.any():
            error_tables.append(_relabel(errs.filter(pa.array(mask)), labels).cast(error_schema()))

    reused = 0
    if base_version is not None and len(plan.keep):
        keep = set(_keys(plan.keep))
        base_manifest = read_manifest(emb_dir, base_version)
        base_dir = versions / base_version
        for p in base_manifest["parts"]:
            add_part(base_dir / p["file"], move=False, wanted=keep)
        add_errors(base_dir / ERRORS_FILE, keep)
        reused = len(seen)
    todo = set(_keys(plan.todo))
    for part, errors in _staged_parts(staging):
        if errors.exists():
            add_errors(errors, todo)
        add_part(part, move=True, wanted=todo)
    if len(plan.missing):
        error_tables.append(
            errors_to_table(plan.missing, [MISSING_REASON] * len(plan.missing), model_id)
        )
    errors = (
        pa.concat_tables(error_tables) if error_tables else error_schema().empty_table()
    ).replace_schema_metadata(error_schema(meta).metadata)
    n_rows = sum(p["rows"] for p in parts)
    # Every input row must land exactly once, as a row or as an error.
    settled = len(seen) + len(plan.missing)
    if settled != len(table) or n_rows + errors.num_rows != len(table):
        shutil.rmtree(tmp, ignore_errors=True)
        raise EmbedError(
            f"Internal error: {settled} of {len(table)} input rows were settled; nothing was "
            f"committed and the staged chunks in {staging} are kept for a rerun."
        )
    pq.write_table(errors, tmp / ERRORS_FILE)
    pq.write_table(pa.table({"path": pa.array(plan.removed, pa.string())}), tmp / REMOVED_FILE)
    manifest = {
        "format": FORMAT,
        "version": name,
        "model_id": model_id,
        "dim": dim,
        **{k: v for k, v in meta.items() if k not in ("model_id", "dim")},
        "rows": n_rows,
        "errors": errors.num_rows,
        "removed": len(plan.removed),
        "embedded": len(plan.todo),
        "reused": reused,
        "base_version": base_version,
        "previous_version": previous_version,
        "parts": parts,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **manifest_extra,
    }
    _write_text_atomic(tmp / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    _fsync_dir(tmp)
    os.rename(tmp, versions / name)
    _fsync_dir(versions)
    # The switch: readers follow CURRENT, which now names a complete version.
    _write_text_atomic(emb_dir / CURRENT_FILE, name + "\n")
    _link_errors(emb_dir, versions / name / ERRORS_FILE)
    shutil.rmtree(staging, ignore_errors=True)
    _gc_versions(emb_dir, name, keep_versions)
    return name, manifest


def _link_errors(emb_dir: Path, src: Path) -> None:
    """EMB_DIR/errors.parquet: the current version's errors, replaced atomically."""
    with atomic_path(emb_dir / ERRORS_FILE) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)


def _gc_versions(emb_dir: Path, current: str, keep: int) -> None:
    """Delete all but the newest `keep` versions (never the current one) and leftovers of
    interrupted commits. Older versions stay a while so a reader that opened one finishes."""
    versions = emb_dir / VERSIONS_DIR
    for d in versions.glob(".tmp-*"):
        shutil.rmtree(d, ignore_errors=True)
    if keep <= 0:
        return
    names = list_versions(emb_dir)
    for old in names[: max(0, len(names) - keep)]:
        if old != current:
            shutil.rmtree(versions / old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# the job


def latest_version_of_model(emb_dir: str | os.PathLike, model_id: str) -> str | None:
    """The newest committed version embedded with model_id (the base of an incremental run)."""
    for name in reversed(list_versions(emb_dir)):
        if name.endswith(f"-{model_id}"):
            return name
    return None


def embed(
    config: EmbedConfig,
    on_part: Callable[[PartInfo], None] | None = None,
    runner: Runner | None = None,
) -> EmbedResult:
    """Embed the configured images into a new version of config.out and make it current.

    Full run: every input path goes through the model. Incremental: only paths new or changed
    (size or mtime) since the newest version of the same model; the rest is carried over.
    Chunks finished by an interrupted run of the same model are reused, not recomputed.
    on_part is called after each chunk is committed to staging (progress; tests inject faults).
    """
    from devise.model import load_spec
    from devise.model import model_id as compute_model_id
    from devise.pipeline import PipelineConfig, run_images

    t0 = time.perf_counter()
    model_dir = Path(config.model_dir).expanduser()
    spec = load_spec(model_dir)
    mid = compute_model_id(model_dir)
    table = input_table(config.catalog, config.splits, config.images)
    emb_dir = Path(config.out).expanduser()
    emb_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "model_id": mid,
        "dim": spec.out_dim,
        "vectors": spec.vectors,
        "vectors_id": spec.vectors_id,
        "backbone": spec.backbone,
        "image_size": spec.image_size,
        "format": FORMAT,
    }
    with EmbedLock(emb_dir, config.wait_lock_s, config.stale_lock_s):
        sizes, mtimes = stat_paths(table["path"].tolist())
        table["size_bytes"], table["mtime_ns"] = sizes, mtimes
        previous = current_version(emb_dir)
        base = latest_version_of_model(emb_dir, mid) if config.incremental else None
        plan = plan_run(table, _base_keys(emb_dir, base), _previous_paths(emb_dir, previous))
        staging = emb_dir / STAGING_DIR / mid
        staging.mkdir(parents=True, exist_ok=True)
        for leftover in staging.glob(".*.tmp"):  # a chunk half-written when a run was killed
            leftover.unlink(missing_ok=True)
        staged = _staged_keys(staging)
        todo_keys = _keys(plan.todo) if len(plan.todo) else pd.Series([], dtype=object)
        fresh = ~todo_keys.map(lambda k: k in staged).to_numpy(dtype=bool)
        resumed = int(len(plan.todo) - fresh.sum())
        run_table = plan.todo[fresh].reset_index(drop=True)
        log.info(
            "%s: %d inputs, %d to embed (%d already staged), %d unchanged, %d missing, %d removed.",
            emb_dir,
            len(table),
            len(run_table),
            resumed,
            len(plan.keep),
            len(plan.missing),
            len(plan.removed),
        )
        if len(run_table):
            pconfig = PipelineConfig(
                backbone=spec.backbone,
                weights=spec.backbone_weights,
                image_size=spec.image_size,
                head_dir=str(model_dir),
                batch_size=config.batch_size,
                num_workers=config.num_workers,
                cpus_per_worker=config.cpus_per_worker,
                decode_cpus=config.decode_cpus,
                use_gpu=config.use_gpu,
                gpus_per_worker=config.gpus_per_worker,
                torch_threads=config.torch_threads,
            )
            run = runner or (run_local if config.local else run_images)
            writer = _StagingWriter(
                staging,
                run_table,
                embedding_schema(spec.out_dim, meta),
                mid,
                config.chunk_rows,
                on_part,
            )
            feed = pd.DataFrame({"path": run_table["path"], "row": np.arange(len(run_table))})
            for batch in progress(run(feed, pconfig), len(feed), "embedding"):
                writer.add(batch)
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
        }
        name, manifest = _commit(
            emb_dir,
            staging,
            table,
            plan,
            base,
            previous,
            extra,
            mid,
            spec.out_dim,
            meta,
            config.keep_versions,
        )
    return EmbedResult(
        emb_dir=emb_dir,
        version=name,
        model_id=mid,
        rows=manifest["rows"],
        errors=manifest["errors"],
        embedded=len(run_table),
        resumed=resumed,
        reused=manifest["reused"],
        removed=len(plan.removed),
        seconds=time.perf_counter() - t0,
        base_version=base,
    )


def write_version(
    emb_dir: str | os.PathLike,
    rows: pd.DataFrame,
    embeddings: np.ndarray,
    *,
    model_id: str,
    vectors: str = "",
    vectors_id: str = "",
    reasons: Sequence[str] | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    keep_versions: int = DEFAULT_KEEP_VERSIONS,
    extra: dict | None = None,
) -> str:
    """Commit precomputed embeddings (N, D) for rows (path; optional label, class_name,
    size_bytes, mtime_ns) as a new current version, with the same layout, lock and commit as a
    run. reasons: one per row, '' for an embedded row, else the row goes to errors.parquet.
    Returns the version name."""
    emb_dir = Path(emb_dir)
    emb_dir.mkdir(parents=True, exist_ok=True)
    table = rows.copy()
    for col in INPUT_COLUMNS:
        if col not in table.columns:
            table[col] = -1 if col in ("size_bytes", "mtime_ns") else None
    table = table[INPUT_COLUMNS].reset_index(drop=True)
    table["path"] = table["path"].astype(str)
    if table["path"].duplicated().any():
        raise EmbedError("write_version: repeated paths.")
    embeddings = np.asarray(embeddings, dtype=np.float32)
    dim = int(embeddings.shape[1])
    meta = {"model_id": model_id, "dim": dim, "vectors": vectors, "vectors_id": vectors_id}
    meta["format"] = FORMAT
    errors = np.asarray(reasons if reasons is not None else [""] * len(table), dtype=object)
    with EmbedLock(emb_dir):
        previous = current_version(emb_dir)
        plan = plan_run(table.assign(size_bytes=0), None, _previous_paths(emb_dir, previous))
        plan.todo = table
        staging = emb_dir / STAGING_DIR / f"write-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        writer = _StagingWriter(
            staging, table, embedding_schema(dim, meta), model_id, chunk_rows, None
        )
        writer.add({"row": np.arange(len(table)), "embedding": embeddings, "error": errors})
        writer.flush()
        name, _ = _commit(
            emb_dir,
            staging,
            table,
            plan,
            None,
            previous,
            dict(extra or {}),
            model_id,
            dim,
            meta,
            keep_versions,
        )
    return name


# ---------------------------------------------------------------------------------------------
# CLI


def _parse_splits(text: str | None) -> list[str] | None:
    if text is None or text.strip().lower() == "all":
        return None
    return [s.strip() for s in text.split(",") if s.strip()]


def run_cli(args: argparse.Namespace) -> int:
    """`devise embed` (flags: devise/commands/embed.py)."""
    from devise.runtime import init_ray, resolve_resources, resources_from_args

    if args.splits is not None and args.catalog is None:
        raise EmbedError("--splits applies to --catalog only.")
    for flag in ("batch_size", "chunk_rows", "num_workers"):
        if getattr(args, flag) < 1:
            raise EmbedError(f"--{flag.replace('_', '-')} must be at least 1.")
    if not args.local:
        init_ray(args.address)
    res = resolve_resources(resources_from_args(args))
    config = EmbedConfig(
        model_dir=args.model,
        out=args.out,
        catalog=args.catalog,
        splits=_parse_splits(args.splits),
        images=args.images,
        incremental=args.incremental,
        chunk_rows=args.chunk_rows,
        **res.as_kwargs(),
        torch_threads=args.torch_threads,
        local=args.local,
        wait_lock_s=args.wait_lock,
        keep_versions=args.keep_versions,
    )
    r = embed(config)
    print(
        f"Committed {r.version} to {r.emb_dir}: {r.rows} images embedded, {r.errors} errors "
        f"(this run: {r.embedded} embedded, {r.resumed} resumed, {r.reused} unchanged, "
        f"{r.removed} removed) in {r.seconds:.1f}s."
    )
    if r.errors:
        print(f"Files that could not be embedded, with reasons: {r.emb_dir / ERRORS_FILE}")
    return 0
