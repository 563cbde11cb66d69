"""Export: a committed version as one flat parquet file for DuckDB, pandas, faiss and friends."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from devise.store.format import META_PREFIX, row_id
from devise.store.store import Store


def export_schema(dim: int, meta: dict[str, str] | None = None) -> pa.Schema:
    """id (the 16-hex id search returns), row (the row number in the version), path, label,
    class_name, embedding float32[dim]."""
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("row", pa.int64(), nullable=False),
            pa.field("path", pa.string(), nullable=False),
            pa.field("label", pa.string()),
            pa.field("class_name", pa.string()),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
        ],
        metadata={f"{META_PREFIX}{k}".encode(): str(v).encode() for k, v in (meta or {}).items()},
    )


def export_parquet(
    emb_dir: str | os.PathLike, out: str | os.PathLike, version: str | None = None
) -> tuple[Path, int]:
    """Write the current (or named) version as one parquet file, part by part (memory stays one
    part), under a temporary name renamed into place. Returns (path, rows)."""
    from devise.fsutil import atomic_path, check_output_file

    out = check_output_file(out, "--to")
    v = Store.open(emb_dir).version(version)
    meta = {
        "version": v.name,
        "model_id": v.manifest.model_id,
        "vectors_id": v.manifest.vectors_id or "",
        "dim": v.dim,
    }
    schema = export_schema(v.dim, meta)
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for path, start, _ in v.parts:
            t = pq.read_table(path, columns=["path", "label", "class_name", "embedding"])
            ids = pa.array([row_id(p) for p in t.column("path").to_pylist()], pa.string())
            rows = pa.array(np.arange(start, start + t.num_rows, dtype=np.int64))
            writer.write_table(
                pa.Table.from_arrays([ids, rows, *t.columns], schema=schema),
                row_group_size=65536,
            )
    return out, v.rows
