"""The parquet side of an embeddings folder: file names, part and error schemas, the tables a
run writes, and the keys and ids that name a row."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:  # pandas is imported where a function needs it: search never does
    import pandas as pd

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


def part_embeddings(path: str | os.PathLike) -> np.ndarray:
    """One part file -> its (n, D) float32 embeddings (reading only that column)."""
    return embedding_matrix(pq.read_table(Path(path), columns=["embedding"]))


def row_id(path: str) -> str:
    """The id of an indexed image: a short hash of its path, the same in every version."""
    return hashlib.blake2b(path.encode("utf-8"), digest_size=8).hexdigest()
