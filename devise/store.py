"""The embeddings folder: parquet schema, committed versions and their readers, and the lock
that keeps one writer at a time.

Layout of an embeddings folder (EMB_DIR)::

    EMB_DIR/CURRENT                      the committed version's name (replaced with os.replace)
    EMB_DIR/LOCK                         held by the one run writing EMB_DIR (pid, host, heartbeat)
    EMB_DIR/errors.parquet               the current version's errors (a hard link)
    EMB_DIR/versions/<seq>-<model_id>/   part-*.parquet, errors.parquet, removed.parquet and
                                         manifest.json (written last); never changed once there
    EMB_DIR/staging/<model_id>/          the running job's finished chunks; a rerun skips them

A version is built under versions/.tmp-*, renamed into place, then named by CURRENT: a reader that
follows CURRENT finds a complete version whatever a writer is doing.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Self

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from devise.errors import DeviseError
from devise.fsutil import atomic_path

log = logging.getLogger(__name__)

FORMAT = 1
CURRENT_FILE = "CURRENT"
LOCK_FILE = "LOCK"
MANIFEST_FILE = "manifest.json"
ERRORS_FILE = "errors.parquet"
REMOVED_FILE = "removed.parquet"
VERSIONS_DIR = "versions"
STAGING_DIR = "staging"
DEFAULT_CHUNK_ROWS = 4096
DEFAULT_KEEP_VERSIONS = 3
MISSING_REASON = "file does not exist"
META_PREFIX = "devise."

# Rows travel as (path, size, mtime): a file with the same three is the same input.
KEY_COLUMNS = ["path", "size_bytes", "mtime_ns"]
INPUT_COLUMNS = ["path", "label", "class_name", "size_bytes", "mtime_ns"]


class EmbedError(DeviseError, ValueError):
    """An embedding run or folder that cannot be used; str() says what to do."""


class LockHeldError(EmbedError):
    """Another live run holds EMB_DIR's lock (the command exits with EXIT_CODE)."""

    EXIT_CODE = 75  # EX_TEMPFAIL: nothing was written; a scheduler can treat the tick as skipped


# ---------------------------------------------------------------------------------------------
# schemas


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


def _write_atomic(table: pa.Table, path: Path) -> None:
    """Write a parquet file under a temporary name and rename it into place."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# reading committed versions (used by search and evaluation)


def _seq(name: str) -> int:
    head = name.split("-", 1)[0]
    return int(head) if head.isdigit() else -1


def list_versions(emb_dir: str | os.PathLike) -> list[str]:
    """Committed versions in EMB_DIR, oldest first (folders with a manifest)."""
    root = Path(emb_dir) / VERSIONS_DIR
    if not root.is_dir():
        return []
    names = [
        d.name
        for d in root.iterdir()
        if not d.name.startswith(".") and (d / MANIFEST_FILE).is_file() and _seq(d.name) >= 0
    ]
    return sorted(names, key=_seq)


def current_version(emb_dir: str | os.PathLike) -> str | None:
    """The version CURRENT names (the newest complete one); None when nothing is committed."""
    emb_dir = Path(emb_dir)
    try:
        name = (emb_dir / CURRENT_FILE).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        name = ""
    if name and (emb_dir / VERSIONS_DIR / name / MANIFEST_FILE).is_file():
        return name
    versions = list_versions(emb_dir)
    return versions[-1] if versions else None


def read_manifest(emb_dir: str | os.PathLike, version: str | None = None) -> dict:
    """The manifest of a version (default: the current one); EmbedError when there is none."""
    emb_dir = Path(emb_dir)
    version = version or current_version(emb_dir)
    if version is None:
        if not emb_dir.is_dir():
            raise EmbedError(f"Embeddings folder {emb_dir} does not exist; run `devise embed`.")
        raise EmbedError(
            f"{emb_dir} holds no complete embeddings version; run `devise embed --out {emb_dir}`."
        )
    path = emb_dir / VERSIONS_DIR / version / MANIFEST_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EmbedError(f"Version {version!r} does not exist in {emb_dir}.") from None


def read_version(
    emb_dir: str | os.PathLike, version: str | None = None, columns: Sequence[str] | None = None
) -> tuple[dict, pa.Table]:
    """(manifest, table of all its parts) for a version (default: the current one)."""
    manifest = read_manifest(emb_dir, version)
    folder = Path(emb_dir) / VERSIONS_DIR / manifest["version"]
    schema = embedding_schema(int(manifest["dim"]))
    cols = list(columns) if columns is not None else None
    tables = [pq.read_table(folder / p["file"], columns=cols) for p in manifest["parts"]]
    if not tables:
        empty = schema if cols is None else pa.schema([schema.field(c) for c in cols])
        return manifest, empty.empty_table()
    return manifest, pa.concat_tables(tables)


def read_errors(emb_dir: str | os.PathLike, version: str | None = None) -> pd.DataFrame:
    """The errors table (path, label, class_name, reason, ...) of a version."""
    manifest = read_manifest(emb_dir, version)
    return pd.read_parquet(Path(emb_dir) / VERSIONS_DIR / manifest["version"] / ERRORS_FILE)


def embedding_matrix(table: pa.Table) -> np.ndarray:
    """The `embedding` column of a table as a (N, D) float32 array."""
    col = table.column("embedding")
    dim = col.type.list_size
    if table.num_rows == 0:
        return np.zeros((0, dim), dtype=np.float32)
    flat = col.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.float32).reshape(-1, dim)


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
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
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
