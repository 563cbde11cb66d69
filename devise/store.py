"""The embeddings folder: parquet schema, committed versions, their verification and readers,
staging, commit, garbage collection, and the lock that keeps one writer at a time. Nothing else
reads or writes EMB_DIR directly; `Store` is the API.

Layout of an embeddings folder (EMB_DIR)::

    EMB_DIR/CURRENT                      the committed version's name (replaced with os.replace)
    EMB_DIR/LOCK                         held by the one run writing EMB_DIR (pid, host, heartbeat)
    EMB_DIR/errors.parquet               the current version's errors (a hard link)
    EMB_DIR/versions/<seq>-<model_id>/   part-*.parquet, errors.parquet, removed.parquet,
                                         hashes.parquet (with --verify content) and manifest.json
                                         (written last: row counts, byte sizes and CRC-32 of every
                                         part); never changed once there
    EMB_DIR/staging/<model_id>/          the running job's finished chunks; a rerun skips them
    EMB_DIR/damaged/<version>-<time>/    versions found damaged by a repair, moved aside

A version is built in a temporary folder, renamed into place, then named by CURRENT: a reader
that follows CURRENT finds a complete version whatever a writer is doing. Readers verify a
version before use (the manifest, each part's size and row count; the CRC-32 as they read the
bytes) and fall back to the newest intact version, with a warning, when one is damaged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Self

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from devise.config import DEFAULT_CHUNK_ROWS, DEFAULT_KEEP_VERSIONS, DEFAULT_MAX_ERROR_FRACTION
from devise.errors import DeviseError
from devise.fsutil import atomic_dir, atomic_path, fsync_dir, printable

if TYPE_CHECKING:  # pandas is imported where a function needs it: search never does
    import pandas as pd

log = logging.getLogger(__name__)

FORMAT = 1
CURRENT_FILE = "CURRENT"
LOCK_FILE = "LOCK"
MANIFEST_FILE = "manifest.json"
ERRORS_FILE = "errors.parquet"
REMOVED_FILE = "removed.parquet"
HASHES_FILE = "hashes.parquet"
VERSIONS_DIR = "versions"
STAGING_DIR = "staging"
DAMAGED_DIR = "damaged"
MISSING_REASON = "file does not exist"
META_PREFIX = "devise."
# <seq>-<model_id>: nothing else (no "/", no "..") is ever taken for a version name.
VERSION_NAME = re.compile(r"[0-9]{1,12}-[0-9A-Za-z][0-9A-Za-z_-]*")

# Rows travel as (path, size, mtime): a file with the same three is the same input.
KEY_COLUMNS = ["path", "size_bytes", "mtime_ns"]
INPUT_COLUMNS = ["path", "label", "class_name", "size_bytes", "mtime_ns"]


class EmbedError(DeviseError, ValueError):
    """An embedding run or folder that cannot be used; str() says what to do."""


class LockHeldError(EmbedError):
    """Another live run holds EMB_DIR's lock (the command exits with EXIT_CODE)."""

    EXIT_CODE = 75  # EX_TEMPFAIL: nothing was written; a scheduler can treat the tick as skipped


class DamagedVersionError(EmbedError):
    """A committed version whose manifest or files do not match; names the file."""

    def __init__(self, store: Path, version: str, path: Path, problem: str) -> None:
        self.version, self.path = version, path
        super().__init__(f"Version {version} of {store} is damaged: {printable(path)} {problem}")


class TooManyErrorsError(EmbedError):
    """A run whose failed inputs exceed --max-error-fraction: nothing is committed."""


# ---------------------------------------------------------------------------------------------
# schemas and tables


def embedding_schema(dim: int, meta: dict[str, object] | None = None) -> pa.Schema:
    """Arrow schema of a part file: one row per embedded image, embedding fixed-size (D,)."""
    fields = [
        pa.field("path", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("class_name", pa.string()),
        pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("size_bytes", pa.int64()),
        pa.field("mtime_ns", pa.int64()),
    ]
    return pa.schema(fields, metadata=_kv(meta))


def error_schema(meta: dict[str, object] | None = None) -> pa.Schema:
    """Arrow schema of errors.parquet: one row per path that could not be embedded."""
    fields = [
        pa.field("path", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("class_name", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("model_id", pa.string()),
        pa.field("size_bytes", pa.int64()),
        pa.field("mtime_ns", pa.int64()),
    ]
    return pa.schema(fields, metadata=_kv(meta))


def _kv(meta: dict[str, object] | None) -> dict[bytes, bytes] | None:
    if not meta:
        return None
    return {f"{META_PREFIX}{k}".encode(): str(v).encode() for k, v in meta.items()}


def read_parquet_meta(path: str | os.PathLike) -> dict[str, str]:
    """The devise key-value metadata of a parquet file (model_id, dim, vectors, vectors_id)."""
    raw = pq.read_schema(path).metadata or {}
    n = len(META_PREFIX)
    return {
        k.decode()[n:]: v.decode() for k, v in raw.items() if k.startswith(META_PREFIX.encode())
    }


def _strings(values: Sequence) -> pa.Array:
    import pandas as pd

    return pa.array([None if v is None or pd.isna(v) else str(v) for v in values], pa.string())


def _ints(values: Sequence) -> pa.Array:
    arr = np.asarray(values, dtype=np.int64)
    return pa.array(arr, pa.int64(), mask=arr < 0)


def rows_to_table(
    rows: pd.DataFrame, embeddings: np.ndarray, model_id: str, schema: pa.Schema
) -> pa.Table:
    """rows (N, INPUT_COLUMNS) + embeddings (N, D) float32 -> an Arrow table in `schema`."""
    n, dim = len(rows), schema.field("embedding").type.list_size
    flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1), pa.float32())
    columns = [
        _strings(rows["path"].tolist()),
        _strings(rows["label"].tolist()),
        _strings(rows["class_name"].tolist()),
        pa.FixedSizeListArray.from_arrays(flat, dim),
        pa.array([model_id] * n, pa.string()),
        _ints(rows["size_bytes"]),
        _ints(rows["mtime_ns"]),
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def errors_to_table(rows: pd.DataFrame, reasons: Sequence[str], model_id: str) -> pa.Table:
    """rows (N, INPUT_COLUMNS) + one reason each -> an Arrow table in error_schema()."""
    columns = [
        _strings(rows["path"].tolist()),
        _strings(rows["label"].tolist()),
        _strings(rows["class_name"].tolist()),
        _strings(list(reasons)),
        pa.array([model_id] * len(rows), pa.string()),
        _ints(rows["size_bytes"]),
        _ints(rows["mtime_ns"]),
    ]
    return pa.Table.from_arrays(columns, schema=error_schema())


def embedding_matrix(table: pa.Table) -> np.ndarray:
    """The `embedding` column of a table as a (N, D) float32 array."""
    col = table.column("embedding")
    dim = col.type.list_size
    if table.num_rows == 0:
        return np.zeros((0, dim), dtype=np.float32)
    flat = col.combine_chunks().flatten()
    if flat.type == pa.float32() and flat.null_count == 0:
        # A view of the values buffer (no copy, like to_numpy's, which imports pandas: a
        # second of a cold search).
        values = np.frombuffer(flat.buffers()[1], np.float32, len(flat), flat.offset * 4)
    else:
        values = flat.to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.float32).reshape(-1, dim)


def row_keys(df: pd.DataFrame) -> pd.Series:
    """One hashable key per row: (path, size, mtime); nulls count as -1."""
    import pandas as pd

    df = df[KEY_COLUMNS].fillna(-1)
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


def check_failures(failed: int, total: int, max_fraction: float, detail: str, kept: str) -> None:
    """Refuse (TooManyErrorsError) when more than max_fraction of total inputs failed."""
    if total and failed > max_fraction * total:
        raise TooManyErrorsError(
            f"{failed} of {total} inputs failed ({detail}), more than --max-error-fraction "
            f"{max_fraction:g}; nothing was committed and {kept}. Check that the images are "
            "reachable, or pass a higher --max-error-fraction."
        )


@dataclass
class Base:
    """The committed version a run carries unchanged rows over from, and which of its files
    to take them from (a repair leaves out the damaged ones)."""

    version: str
    parts: list[Path]
    errors: Path | None
    hashes: dict[str, str] = field(default_factory=dict)


@dataclass
class Plan:
    """What a run does with each input row (every row lands in exactly one table), and the
    versions it builds on."""

    todo: pd.DataFrame  # to embed (INPUT_COLUMNS)
    keep: pd.DataFrame  # unchanged since the base version: reuse its row or error
    missing: pd.DataFrame  # no such file: an error without a decode
    removed: list[str]  # in the previous version, not in the input any more
    base: Base | None = None  # where kept rows come from
    previous: str | None = None  # the current version when the run started
    damaged: list[str] = field(default_factory=list)  # moved aside by a repair's commit


def plan_run(
    table: pd.DataFrame,
    base: pd.DataFrame | None,
    previous_paths: Iterable[str] = (),
    hashes: Sequence[str | None] | None = None,
    base_hashes: dict[str, str] | None = None,
) -> Plan:
    """Split the input (INPUT_COLUMNS, stat'd; size -1 = missing) against the base version.

    base: (path, size_bytes, mtime_ns) of every row and error in the base version (same model),
    or None for a full run. A row is kept when its path, size and mtime all match the base, and,
    when hashes (one per input row) are given, its content hash matches base_hashes too; new or
    changed rows are embedded; removed = previous paths not in the input.
    """
    missing_mask = table["size_bytes"].to_numpy() < 0
    present = table[~missing_mask]
    if base is not None and len(base) and len(present):
        known = set(row_keys(base[KEY_COLUMNS]))
        same = row_keys(present).map(lambda k: k in known).to_numpy(dtype=bool)
        if hashes is not None:
            want = base_hashes or {}
            now = np.asarray(hashes, dtype=object)[~missing_mask]
            same &= np.array([want.get(p) == h for p, h in zip(present["path"], now)], dtype=bool)
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


@dataclass
class PartInfo:
    """A chunk committed to staging: its index, files and row counts."""

    index: int
    path: Path
    rows: int
    errors: int


# ---------------------------------------------------------------------------------------------
# the store


def _seq(name: str) -> int:
    head = name.lstrip(".").split("-", 1)[0]
    return int(head) if head.isdigit() else -1


class Store:
    """One embeddings folder. Readers: versions(), current(), verify(), read(), errors(),
    latest(). Writers, under lock(): staging(), writer(), commit(), write_version(), gc(),
    quarantine()."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / VERSIONS_DIR

    @classmethod
    def open(cls, path: str | os.PathLike, create: bool = False) -> Store:
        """The store at path; create=True makes the folder (a writer). A path that is a file, or
        a folder that cannot be written when create is asked, is an EmbedError."""
        root = Path(path).expanduser()
        if root.exists() and not root.is_dir():
            raise EmbedError(f"{root} is a file, not an embeddings folder; give a folder path.")
        if create:
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise EmbedError(
                    f"Cannot create the embeddings folder {root}: {e.strerror}; give --out a "
                    "folder you can write."
                ) from None
            if not os.access(root, os.W_OK | os.X_OK):
                raise EmbedError(
                    f"Cannot write to the embeddings folder {root} (permission denied); give "
                    "--out a folder you can write."
                )
        return cls(root)

    def version_dir(self, name: str) -> Path:
        return self.versions_dir / name

    # -- reading ---------------------------------------------------------------------------

    def versions(self) -> list[str]:
        """Committed versions, oldest first (folders with a manifest and a valid name)."""
        if not self.versions_dir.is_dir():
            return []
        names = [
            d.name
            for d in self.versions_dir.iterdir()
            if VERSION_NAME.fullmatch(d.name) and (d / MANIFEST_FILE).is_file()
        ]
        return sorted(names, key=_seq)

    def check_name(self, name: str) -> str:
        """name when it is a committed version of this store, else an EmbedError."""
        if not VERSION_NAME.fullmatch(str(name)) or name not in self.versions():
            have = ", ".join(self.versions()[-5:]) or "none"
            raise EmbedError(
                f"{printable(str(name))!r} is not a version of {self.root} (versions: {have})."
            )
        return name

    def _named_current(self) -> str | None:
        """What CURRENT names, when it is text naming a version of this store; else None with a
        warning (a missing CURRENT is no warning: a commit may stop just before writing it)."""
        path = self.root / CURRENT_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("Cannot read %s (%s); using the newest intact version.", path, e.strerror)
            return None
        try:
            name = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            name = None
        if name and VERSION_NAME.fullmatch(name) and (self.versions_dir / name).is_dir():
            return name
        what = "is not text" if name is None else f"names no version ({printable(name[:40])!r})"
        log.warning("%s %s; using the newest intact version.", path, what)
        return None

    def current(self) -> str | None:
        """The version readers use: the one CURRENT names when it is intact, else the newest
        intact version (with a warning naming what is damaged); None when there is none."""
        name = self._named_current()
        if name is not None:
            try:
                self.verify(name)
                return name
            except DamagedVersionError as e:
                fallback = self.newest_intact(exclude={name})
                log.warning("%s; %s", e, _fallback_words(fallback))
                return fallback
            except FileNotFoundError:
                pass  # removed while we looked: the newest intact one is current now
        return self.newest_intact()

    def newest_intact(self, exclude: Iterable[str] = (), model_id: str | None = None) -> str | None:
        """The newest version that passes verify() (of model_id, when given)."""
        for name in reversed(self.versions()):
            if name in exclude or (model_id is not None and not name.endswith(f"-{model_id}")):
                continue
            try:
                self.verify(name)
                return name
            except (DamagedVersionError, FileNotFoundError):
                continue
        return None

    def _damaged(self, version: str, path: Path, problem: str) -> DamagedVersionError:
        return DamagedVersionError(self.root, version, path, problem)

    def verify(self, version: str, content: bool = False) -> dict:
        """The manifest of an intact version. Checks the manifest, every part's size and row
        count (its parquet footer) and errors.parquet; content=True also each part's CRC-32.
        DamagedVersionError names the first bad file; FileNotFoundError when the version is
        gone (removed by a writer's garbage collection)."""
        folder = self.version_dir(version)
        if not folder.is_dir():
            raise FileNotFoundError(folder)
        mpath = folder / MANIFEST_FILE
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
            parts = manifest["parts"]
            int(manifest["dim"]), str(manifest["model_id"]), int(manifest["errors"])
            for p in parts:
                if Path(p["file"]).name != p["file"] or int(p["rows"]) < 0:
                    raise ValueError(p)
        except FileNotFoundError:
            raise self._damaged(version, mpath, "is missing") from None
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            raise self._damaged(version, mpath, "is not a valid manifest") from None
        for p in parts:
            self._check_part(version, folder / p["file"], p, content)
        errors = folder / ERRORS_FILE
        self._check_part(version, errors, {"rows": int(manifest["errors"])}, False)
        return manifest

    def _check_part(self, version: str, path: Path, part: dict, content: bool) -> None:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise self._damaged(version, path, "is missing") from None
        if "bytes" in part and size != part["bytes"]:
            raise self._damaged(
                version, path, f"has {size} bytes where the manifest says {part['bytes']}"
            )
        try:
            rows = pq.read_metadata(path).num_rows
        except (pa.ArrowException, OSError):
            raise self._damaged(version, path, "is not a readable parquet file") from None
        if rows != part["rows"]:
            raise self._damaged(
                version, path, f"has {rows} rows where the manifest says {part['rows']}"
            )
        if content and "crc32" in part:
            self._load(version, path, part, columns=None)

    def _load(self, version: str, path: Path, part: dict, columns: list | None) -> pa.Table:
        """One part read in one pass: its bytes checked against the manifest CRC-32, then parsed."""
        data = path.read_bytes()
        if "crc32" in part and zlib.crc32(data) != part["crc32"]:
            raise self._damaged(version, path, "does not match its checksum in the manifest")
        try:
            # ParquetFile, not read_table: read_table loads pyarrow.dataset, and with it pandas
            # (a second of a cold search's start).
            return pq.ParquetFile(pa.BufferReader(data)).read(columns=columns)
        except (pa.ArrowException, OSError):
            raise self._damaged(version, path, "is not a readable parquet file") from None

    def _none_error(self) -> EmbedError:
        if not self.root.is_dir():
            return EmbedError(f"Embeddings folder {self.root} does not exist; run `devise embed`.")
        return EmbedError(
            f"{self.root} holds no intact embeddings version; run "
            f"`devise embed --out {self.root}` (add --repair to rebuild damaged versions)."
        )

    def manifest(self, version: str | None = None) -> dict:
        """The manifest of a version (default: the current one); EmbedError when there is none
        or it is damaged."""
        name = self.check_name(version) if version is not None else self.current()
        if name is None:
            raise self._none_error()
        return self.verify(name)

    def read(
        self, version: str | None = None, columns: Sequence[str] | None = None
    ) -> tuple[dict, pa.Table]:
        """(manifest, table of all its parts) for a version, default the current one. The
        default falls back to the newest intact version when a part turns out damaged."""
        cols = list(columns) if columns is not None else None
        if version is not None:
            return self._read(self.check_name(version), cols)
        tried: set[str] = set()
        name = self.current()
        while name is not None:
            try:
                return self._read(name, cols)
            except DamagedVersionError as e:
                tried.add(name)
                name = self.newest_intact(exclude=tried)
                log.warning("%s; %s", e, _fallback_words(name))
        raise self._none_error()

    def _read(self, name: str, cols: list | None) -> tuple[dict, pa.Table]:
        manifest = self.verify(name)
        folder = self.version_dir(name)
        tables = [self._load(name, folder / p["file"], p, cols) for p in manifest["parts"]]
        if not tables:
            schema = embedding_schema(int(manifest["dim"]))
            empty = schema if cols is None else pa.schema([schema.field(c) for c in cols])
            return manifest, empty.empty_table()
        return manifest, pa.concat_tables(tables)

    def errors(self, version: str | None = None) -> pd.DataFrame:
        """The errors table (path, label, class_name, reason, ...) of a version."""
        import pandas as pd

        manifest = self.manifest(version)
        return pd.read_parquet(self.version_dir(manifest["version"]) / ERRORS_FILE)

    def damaged(self) -> dict[str, DamagedVersionError]:
        """Every committed version that fails a full verify (CRC-32 included), by name."""
        out = {}
        for name in self.versions():
            try:
                self.verify(name, content=True)
            except DamagedVersionError as e:
                out[name] = e
            except FileNotFoundError:
                pass
        return out

    def base(self, version: str, salvage: bool = False) -> Base:
        """What a run can carry over from version: all its files, or with salvage=True (a
        repair) only the parts and errors file that pass a full check."""
        folder = self.version_dir(version)
        if not salvage:
            manifest = self.verify(version)
            parts = [folder / p["file"] for p in manifest["parts"]]
            return Base(version, parts, folder / ERRORS_FILE, self._hashes(folder))
        try:
            manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
            listed = [(folder / p["file"], p) for p in manifest["parts"]]
            errors = (folder / ERRORS_FILE, {"rows": int(manifest["errors"])})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return Base(version, [], None)  # no manifest to trust: nothing to salvage
        good = []
        for path, part in [*listed, errors]:
            try:
                self._check_part(version, path, part, content=True)
                good.append(path)
            except DamagedVersionError as e:
                log.warning("%s; its rows are embedded again.", e)
        err = errors[0] if errors[0] in good else None
        return Base(version, [p for p in good if p != errors[0]], err, self._hashes(folder))

    @staticmethod
    def _hashes(folder: Path) -> dict[str, str]:
        try:
            t = pq.read_table(folder / HASHES_FILE, columns=["path", "content_hash"])
        except (FileNotFoundError, pa.ArrowException, OSError):
            return {}
        return dict(zip(t.column("path").to_pylist(), t.column("content_hash").to_pylist()))

    def keys(self, base: Base) -> pd.DataFrame:
        """(path, size_bytes, mtime_ns) of the rows and errors a Base carries."""
        import pandas as pd

        files = [*base.parts, *([base.errors] if base.errors else [])]
        frames = [pq.read_table(f, columns=KEY_COLUMNS).to_pandas() for f in files]
        if not frames:
            return pd.DataFrame({"path": [], "size_bytes": [], "mtime_ns": []})
        df = pd.concat(frames, ignore_index=True)
        return df.fillna(-1).astype({"size_bytes": np.int64, "mtime_ns": np.int64})

    def paths(self, version: str) -> list[str]:
        """Every input path a version settled (rows and errors)."""
        _, rows = self._read(version, ["path"])
        errors = pq.read_table(self.version_dir(version) / ERRORS_FILE, columns=["path"])
        return rows.column("path").to_pylist() + errors.column("path").to_pylist()

    # -- writing ---------------------------------------------------------------------------

    def lock(self, wait_s: float = 0.0, stale_s: float = 600.0) -> EmbedLock:
        """The writers' lock (a context manager): one writer at a time."""
        return EmbedLock(self.root, wait_s, stale_s)

    @contextmanager
    def writing(self, wait_s: float = 0.0, stale_s: float = 600.0) -> Iterator[Self]:
        """Hold the lock for a run; a write that fails (disk full, permissions) becomes one
        EmbedError line, with CURRENT and the staged chunks left as they were."""
        with self.lock(wait_s, stale_s):
            try:
                yield self
            except OSError as e:
                raise EmbedError(
                    f"Cannot write {printable(e.filename or self.root)}: {e.strerror or e}; "
                    "nothing was committed (the current version and finished chunks are kept): "
                    "free space or fix permissions and rerun."
                ) from e

    def plan(
        self,
        table: pd.DataFrame,
        model_id: str,
        *,
        incremental: bool = False,
        repair: bool = False,
        hashes: Sequence[str | None] | None = None,
        max_error_fraction: float = DEFAULT_MAX_ERROR_FRACTION,
    ) -> Plan:
        """Plan a run of model_id over table (INPUT_COLUMNS, stat'd): full, incremental (rows
        unchanged since the newest intact version of the model are carried over) or a repair
        (damaged versions found, their intact parts salvaged). Refuses (TooManyErrorsError)
        when more than max_error_fraction of the inputs are missing or, incremental, of the
        previous version's paths are gone: an unmounted volume must not replace good data."""
        damaged = self.damaged() if repair else {}
        previous = self.current()
        old_paths: list[str] = []
        if previous is not None:
            try:
                old_paths = self.paths(previous)
            except DamagedVersionError as e:
                log.warning("%s; this run lists no removed paths.", e)
        base = None
        mine = [v for v in self.versions() if v.endswith(f"-{model_id}")]
        if repair and mine:
            base = self.base(mine[-1], salvage=mine[-1] in damaged)
        elif incremental:
            name = self.newest_intact(model_id=model_id)
            if mine and name != mine[-1]:
                log.warning(
                    "The newest version of this model, %s, is damaged; carrying rows over from "
                    "%s instead (`devise embed --repair` salvages its intact parts).",
                    mine[-1],
                    name or "none (a full run)",
                )
            base = self.base(name) if name else None
        keys = self.keys(base) if base is not None else None
        plan = plan_run(table, keys, old_paths, hashes, base.hashes if base else None)
        plan.base, plan.previous, plan.damaged = base, previous, list(damaged)
        kept = f"{previous} stays current" if previous else "no version exists yet"
        if len(plan.missing):
            detail = f"{len(plan.missing)} missing, e.g. {printable(plan.missing['path'].iloc[0])}"
            check_failures(len(plan.missing), len(table), max_error_fraction, detail, kept)
        if incremental and old_paths:
            old = set(old_paths)
            gone = [p for p in plan.missing["path"] if p in old] + list(plan.removed)
            if len(gone) > max_error_fraction * len(old):
                raise TooManyErrorsError(
                    f"{len(gone)} of the {len(old)} paths of {previous} are gone from the input "
                    f"(e.g. {printable(gone[0])}), more than --max-error-fraction "
                    f"{max_error_fraction:g}; nothing was committed and {kept}. If they were "
                    "deleted on purpose, rerun with a higher --max-error-fraction."
                )
        return plan

    def staging(self, name: str) -> Path:
        """The staging folder of a run (by model id), cleared of what an interrupted run left
        half-written; its finished chunks stay for the rerun."""
        folder = self.root / STAGING_DIR / name
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in folder.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)
        for errors in folder.glob("errors-*.parquet"):
            if not errors.with_name(errors.name.replace("errors-", "part-", 1)).exists():
                errors.unlink(missing_ok=True)  # its part was never written: not a chunk
        return folder

    @staticmethod
    def staged_parts(folder: Path) -> list[tuple[Path, Path]]:
        """(part, errors) files of the complete chunks in a staging folder, in index order."""
        return [
            (p, p.with_name(p.name.replace("part-", "errors-", 1)))
            for p in sorted(folder.glob("part-*.parquet"))
        ]

    def staged_keys(self, folder: Path) -> set:
        """(path, size, mtime) of every row the staged chunks already settled."""
        keys: set = set()
        for part, errors in self.staged_parts(folder):
            for f in (part, errors):
                if f.exists():
                    keys.update(row_keys(pq.read_table(f, columns=KEY_COLUMNS).to_pandas()))
        return keys

    def writer(
        self,
        folder: Path,
        todo: pd.DataFrame,
        schema: pa.Schema,
        model_id: str,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        on_part: Callable[[PartInfo], None] | None = None,
    ) -> StagingWriter:
        """A writer of pipeline batches (row, embedding, error) into staging chunks."""
        return StagingWriter(folder, todo, schema, model_id, chunk_rows, on_part)

    def commit(
        self,
        staging: Path,
        table: pd.DataFrame,
        plan: Plan,
        *,
        model_id: str,
        meta: dict,
        extra: dict | None = None,
        hashes: Sequence[str | None] | None = None,
        keep_versions: int = DEFAULT_KEEP_VERSIONS,
        max_error_fraction: float = DEFAULT_MAX_ERROR_FRACTION,
    ) -> tuple[str, dict]:
        """Assemble a version from base rows + staged chunks + missing-file errors, make it
        current, remove the staging folder and old versions. Every input row must land once.
        Refused (TooManyErrorsError, nothing changed, staging kept) when more than
        max_error_fraction of the inputs failed. hashes: a content hash per input row, kept in
        hashes.parquet for --verify content. Returns (version name, manifest)."""
        dim, base, previous = int(meta["dim"]), plan.base, plan.previous
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        seq = max((_seq(d.name) for d in self.versions_dir.iterdir()), default=0) + 1
        name = f"{seq:06d}-{model_id}"
        assembly = _Assembly(table, embedding_schema(dim, meta))
        with atomic_dir(self.version_dir(name)) as tmp:
            reused = 0
            if base is not None and len(plan.keep):
                keep = set(row_keys(plan.keep))
                for part in base.parts:
                    assembly.add_part(part, tmp, keep)
                if base.errors is not None:
                    assembly.add_errors(base.errors, keep)
                reused = len(assembly.seen)
            todo = set(row_keys(plan.todo))
            for part, errors in self.staged_parts(staging):
                if errors.exists():
                    assembly.add_errors(errors, todo)
                assembly.add_part(part, tmp, todo)
            if len(plan.missing):
                reasons = [MISSING_REASON] * len(plan.missing)
                assembly.errors.append(errors_to_table(plan.missing, reasons, model_id))
            errors = assembly.error_table(meta)
            n_rows = sum(p["rows"] for p in assembly.parts)
            settled = len(assembly.seen) + len(plan.missing)
            if settled != len(table) or n_rows + errors.num_rows != len(table):
                raise EmbedError(
                    f"Internal error: {settled} of {len(table)} input rows were settled; nothing "
                    f"was committed and the staged chunks in {staging} are kept for a rerun."
                )
            if errors.num_rows:
                reason = errors.column("reason")[0].as_py()
                example = f"e.g. {printable(errors.column('path')[0].as_py())}: {reason}"
                kept = f"{previous} stays current" if previous else "no version exists yet"
                check_failures(errors.num_rows, len(table), max_error_fraction, example, kept)
            pq.write_table(errors, tmp / ERRORS_FILE)
            removed = pa.table({"path": pa.array(plan.removed, pa.string())})
            pq.write_table(removed, tmp / REMOVED_FILE)
            # Kept rows keep the hash of the bytes they were embedded from; fresh hashes win.
            digests = {p: base.hashes[p] for p in plan.keep["path"] if base and p in base.hashes}
            if hashes is not None:
                digests.update((p, h) for p, h in zip(table["path"], hashes) if h is not None)
            if digests:
                hash_table = {"path": list(digests), "content_hash": list(digests.values())}
                pq.write_table(pa.table(hash_table), tmp / HASHES_FILE)
            for p in assembly.parts:
                data = (tmp / p["file"]).read_bytes()
                p["bytes"], p["crc32"] = len(data), zlib.crc32(data)
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
                "base_version": base.version if base is not None else None,
                "previous_version": previous,
                "content_hashes": len(digests),
                "parts": assembly.parts,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                **(extra or {}),
            }
            text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
            (tmp / MANIFEST_FILE).write_text(text, encoding="utf-8")
        # The switch: readers follow CURRENT, which now names a complete version.
        self._write_current(name)
        with atomic_path(self.root / ERRORS_FILE) as tmp_errors:
            _link_or_copy(self.version_dir(name) / ERRORS_FILE, tmp_errors)
        shutil.rmtree(staging, ignore_errors=True)
        for version in plan.damaged:
            if self.version_dir(version).is_dir():
                self.quarantine(version)
        self.gc(keep_versions)
        return name, manifest

    def _write_current(self, name: str) -> None:
        with atomic_path(self.root / CURRENT_FILE) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.root)

    def gc(self, keep: int = DEFAULT_KEEP_VERSIONS) -> None:
        """Delete leftovers of interrupted commits and all but the newest `keep` versions (0:
        keep all). Never the current version, nor the newest one that has rows: runs that embed
        nothing cannot push the last good version out."""
        for d in self.versions_dir.glob(".*"):
            shutil.rmtree(d, ignore_errors=True)
        names = self.versions()
        if keep <= 0 or len(names) <= keep:
            return
        keep_too = {self._named_current()}
        for name in reversed(names):
            try:
                if self.verify(name)["rows"] > 0:
                    keep_too.add(name)
                    break
            except (DamagedVersionError, FileNotFoundError):
                continue
        for old in names[: len(names) - keep]:
            if old not in keep_too:
                shutil.rmtree(self.version_dir(old), ignore_errors=True)

    def quarantine(self, version: str) -> Path:
        """Move a (damaged) version out of versions/ into damaged/, never deleting it."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        dest = self.root / DAMAGED_DIR / f"{version}-{stamp}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.version_dir(version), dest)
        log.warning("Moved the damaged version %s to %s.", version, dest)
        return dest

    def write_version(
        self,
        rows: pd.DataFrame,
        embeddings: np.ndarray,
        *,
        model_id: str,
        vectors: str = "",
        vectors_id: str = "",
        reasons: Sequence[str] | None = None,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        keep_versions: int = DEFAULT_KEEP_VERSIONS,
        max_error_fraction: float = 1.0,
        extra: dict | None = None,
    ) -> str:
        """Commit precomputed embeddings (N, D) for rows (path; optional label, class_name,
        size_bytes, mtime_ns) as a new current version, with the same lock and commit as a run.
        reasons: one per row, '' for an embedded row, else the row goes to errors.parquet.
        Returns the version name."""
        self.root.mkdir(parents=True, exist_ok=True)
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
        with self.lock():
            previous = self.current()
            gone = set(self.paths(previous)) - set(table["path"]) if previous else set()
            plan = Plan(table, table.iloc[:0], table.iloc[:0], sorted(gone), previous=previous)
            staging = self.staging(f"write-{uuid.uuid4().hex[:8]}")
            w = self.writer(staging, table, embedding_schema(dim, meta), model_id, chunk_rows)
            for a in range(0, max(1, len(table)), max(1, chunk_rows)):  # chunk_rows a part
                sl = slice(a, a + max(1, chunk_rows))
                w.add(
                    {
                        "row": np.arange(len(table))[sl],
                        "embedding": embeddings[sl],
                        "error": errors[sl],
                    }
                )
            w.flush()
            name, _ = self.commit(
                staging,
                table,
                plan,
                model_id=model_id,
                meta=meta,
                extra=extra,
                keep_versions=keep_versions,
                max_error_fraction=max_error_fraction,
            )
        return name


def _fallback_words(fallback: str | None) -> str:
    """What a reader does instead of a damaged version, in words."""
    if fallback is None:
        return "no intact version is left (`devise embed --repair` rebuilds it)."
    return f"using version {fallback} (`devise embed --repair` rebuilds it)."


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class _Assembly:
    """The rows of a version being built: parts taken from the base and staging, each input
    key taken once, labels taken from the current input (a catalog may rename a class)."""

    def __init__(self, table: pd.DataFrame, schema: pa.Schema) -> None:
        self.labels = {
            p: (lab, cn) for p, lab, cn in zip(table["path"], table["label"], table["class_name"])
        }
        self.schema = schema
        self.seen: set = set()
        self.parts: list[dict] = []
        self.errors: list[pa.Table] = []

    def _select(self, table: pa.Table, wanted: set) -> tuple[np.ndarray, pd.Series]:
        keys = row_keys(table.select(KEY_COLUMNS).to_pandas())
        mask = np.array([k in wanted and k not in self.seen for k in keys], dtype=bool)
        mask &= ~keys.duplicated().to_numpy()  # the same key twice in one file: never write it
        return mask, keys

    def _relabel(self, table: pa.Table) -> pa.Table:
        paths = table.column("path").to_pylist()
        label = _strings([self.labels[p][0] for p in paths])
        name = _strings([self.labels[p][1] for p in paths])
        table = table.set_column(table.schema.get_field_index("label"), "label", label)
        return table.set_column(table.schema.get_field_index("class_name"), "class_name", name)

    def add_part(self, src: Path, folder: Path, wanted: set) -> None:
        """Take the wanted rows of src into folder; a file kept whole with unchanged labels is
        hard-linked, not rewritten."""
        table = pq.read_table(src)
        if table.num_rows == 0:
            return
        mask, keys = self._select(table, wanted)
        if not mask.any():
            return
        self.seen.update(keys[mask])
        kept = table.filter(pa.array(mask)) if not mask.all() else table
        relabelled = self._relabel(kept)
        dst = folder / f"part-{len(self.parts):05d}.parquet"
        if mask.all() and relabelled.equals(table):
            _link_or_copy(src, dst)
        else:
            pq.write_table(relabelled.cast(self.schema), dst)
        self.parts.append({"file": dst.name, "rows": int(mask.sum())})

    def add_errors(self, src: Path, wanted: set) -> None:
        errs = pq.read_table(src)
        if errs.num_rows == 0:
            return
        mask, keys = self._select(errs, wanted)
        self.seen.update(keys[mask])
        if mask.any():
            self.errors.append(self._relabel(errs.filter(pa.array(mask))).cast(error_schema()))

    def error_table(self, meta: dict) -> pa.Table:
        table = pa.concat_tables(self.errors) if self.errors else error_schema().empty_table()
        return table.replace_schema_metadata(error_schema(meta).metadata)


class StagingWriter:
    """Buffers pipeline output and commits it to staging every `chunk_rows` rows.

    errors-N.parquet is written first, part-N.parquet last: a chunk whose part file exists is
    complete, so a rerun can trust it; an interrupted flush leaves neither.
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
        indices = [int(p.stem.split("-")[1]) for p in folder.glob("part-*.parquet")]
        self.index = max(indices, default=-1) + 1
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
        errors = self.folder / f"errors-{name}.parquet"
        part = self.folder / f"part-{name}.parquet"
        try:
            with atomic_path(errors) as tmp:
                pq.write_table(
                    errors_to_table(meta[bad], reasons[bad].tolist(), self.model_id), tmp
                )
            with atomic_path(part) as tmp:
                pq.write_table(
                    rows_to_table(meta[~bad], embs[~bad], self.model_id, self.schema), tmp
                )
        except BaseException:
            if not part.exists():
                errors.unlink(missing_ok=True)
            raise
        info = PartInfo(self.index, part, int((~bad).sum()), int(bad.sum()))
        self.index += 1
        self.rows, self.embs, self.errors, self.buffered = [], [], [], 0
        if self.on_part is not None:
            self.on_part(info)


# ---------------------------------------------------------------------------------------------
# plain readers (search and evaluation)


def list_versions(emb_dir: str | os.PathLike) -> list[str]:
    """Committed versions in EMB_DIR, oldest first."""
    return Store.open(emb_dir).versions()


def current_version(emb_dir: str | os.PathLike) -> str | None:
    """The version readers use (see Store.current); None when nothing intact is committed."""
    return Store.open(emb_dir).current()


def read_manifest(emb_dir: str | os.PathLike, version: str | None = None) -> dict:
    """The manifest of a version (default: the current one); EmbedError when there is none."""
    return Store.open(emb_dir).manifest(version)


def read_version(
    emb_dir: str | os.PathLike, version: str | None = None, columns: Sequence[str] | None = None
) -> tuple[dict, pa.Table]:
    """(manifest, table of all its parts) for a version (default: the current one)."""
    return Store.open(emb_dir).read(version, columns)


def read_rows(
    emb_dir: str | os.PathLike, manifest: dict, rows: Sequence[int], columns: Sequence[str]
) -> dict[str, list]:
    """{column: values} of the given rows (positions in the version, its parts in manifest
    order; sorted, unique), reading only those columns of only the parts that hold the rows.

    The parts' sizes and row counts were checked when the manifest was read (Store.manifest);
    their CRC-32 covers whole files, so it is not read here: a search with an index answers
    from a few rows without reading the version's gigabytes."""
    folder = Store.open(emb_dir).version_dir(manifest["version"])
    bounds = np.cumsum([0] + [int(p["rows"]) for p in manifest["parts"]])
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) and (rows[0] < 0 or rows[-1] >= bounds[-1]):
        raise EmbedError(f"Rows {rows[0]}..{rows[-1]} lie outside {folder} ({bounds[-1]} rows).")
    which = np.searchsorted(bounds, rows, side="right") - 1
    out: dict[str, list] = {c: [] for c in columns}
    for part in np.unique(which):
        local = (rows[which == part] - bounds[part]).tolist()
        path = folder / manifest["parts"][part]["file"]
        try:
            table = pq.ParquetFile(path).read(columns=list(columns))
        except (pa.ArrowException, OSError) as e:
            raise EmbedError(
                f"{path} is not a readable parquet file ({e}); run `devise embed --repair`."
            ) from None
        for c in columns:
            # to_pylist, not Table.take: take imports pandas (a second of a cold search).
            values = table.column(c).to_pylist()
            out[c] += [values[i] for i in local]
    return out


def row_id(path: str) -> str:
    """The id of an indexed image: a short hash of its path, the same in every version."""
    return hashlib.blake2b(path.encode("utf-8"), digest_size=8).hexdigest()


# ---------------------------------------------------------------------------------------------
# the lock


@dataclass
class LockInfo:
    pid: int
    host: str
    token: str
    started: str
    command: str = ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class EmbedLock:
    """One writer per EMB_DIR: LOCK created with O_EXCL, holding pid, host and a token.

    A holder refreshes the file's mtime every `stale_s / 4` seconds. A lock is stale when its
    process is gone (same host) or its heartbeat is older than `stale_s` (any host); a stale
    lock is broken. A live one makes acquire() wait up to `wait_s`, then raise LockHeldError.
    """

    def __init__(self, emb_dir: str | os.PathLike, wait_s: float = 0.0, stale_s: float = 600.0):
        self.path = Path(emb_dir) / LOCK_FILE
        self.wait_s = wait_s
        self.stale_s = stale_s
        self.info: LockInfo | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> tuple[LockInfo | None, float | None]:
        try:
            st = self.path.stat()
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return LockInfo(**data), st.st_mtime
        except FileNotFoundError:
            return None, None
        except (ValueError, TypeError, OSError):
            try:
                return None, self.path.stat().st_mtime
            except OSError:
                return None, None

    def _stale(self, info: LockInfo | None, mtime: float) -> bool:
        age = time.time() - mtime
        if info is None:  # a holder killed between create and write: give it a moment
            return age > 30.0
        if info.host == socket.gethostname() and not _pid_alive(info.pid):
            return True
        return age > self.stale_s

    def _break(self, info: LockInfo | None) -> None:
        """Remove a stale lock; only the one that renames it wins, and a lock that turns out to
        be someone else's fresh one is put back."""
        aside = self.path.with_name(f".{LOCK_FILE}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = LockInfo(**json.loads(aside.read_text(encoding="utf-8")))
        except (ValueError, TypeError, OSError):
            moved = None
        if info is not None and moved is not None and moved.token != info.token:
            try:
                os.link(aside, self.path)  # fails if yet another run took the lock meanwhile
            except OSError:
                pass
        aside.unlink(missing_ok=True)
        log.warning("Broke a stale lock on %s (%s).", self.path.parent, info)

    def acquire(self) -> LockInfo:
        deadline = time.monotonic() + self.wait_s
        me = LockInfo(
            pid=os.getpid(),
            host=socket.gethostname(),
            token=uuid.uuid4().hex,
            started=datetime.now(UTC).isoformat(timespec="seconds"),
            command="devise embed",
        )
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                fd = None
            except OSError as e:
                raise EmbedError(
                    f"Cannot create the lock file {self.path}: {e.strerror}; give --out a folder "
                    "you can write."
                ) from None
            if fd is None:
                info, mtime = self._read()
                if mtime is None:
                    continue  # released meanwhile
                if self._stale(info, mtime):
                    self._break(info)
                    continue
                if time.monotonic() >= deadline:
                    who = f"pid {info.pid} on {info.host}, since {info.started}" if info else "?"
                    raise LockHeldError(
                        f"Another run ({who}) is writing {self.path.parent}; wait for it to "
                        f"finish or pass --wait-lock SECONDS (its lock file is {self.path})."
                    ) from None
                time.sleep(min(2.0, max(0.05, deadline - time.monotonic())))
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(asdict(me), f)
                f.flush()
                os.fsync(f.fileno())
            self.info = me
            self._stop.clear()
            self._thread = threading.Thread(target=self._heartbeat, daemon=True)
            self._thread.start()
            return me

    def _heartbeat(self) -> None:
        while not self._stop.wait(max(1.0, self.stale_s / 4)):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        info, _ = self._read()
        if self.info is not None and info is not None and info.token == self.info.token:
            self.path.unlink(missing_ok=True)
        self.info = None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
