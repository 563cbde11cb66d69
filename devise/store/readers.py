"""Plain readers of an embeddings folder by path, for search and evaluation: its versions, the
current one, a version's manifest and table, and a few rows read without the whole version."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from devise.store.errors import EmbedError
from devise.store.manifest import Manifest
from devise.store.store import Store


def list_versions(emb_dir: str | os.PathLike) -> list[str]:
    """Committed versions in EMB_DIR, oldest first."""
    return Store.open(emb_dir).versions()


def current_version(emb_dir: str | os.PathLike) -> str | None:
    """The version readers use (see Store.current); None when nothing intact is committed."""
    return Store.open(emb_dir).current()


def read_manifest(emb_dir: str | os.PathLike, version: str | None = None) -> Manifest:
    """The manifest of a version (default: the current one); EmbedError when there is none."""
    return Store.open(emb_dir).manifest(version)


def read_version(
    emb_dir: str | os.PathLike, version: str | None = None, columns: Sequence[str] | None = None
) -> tuple[Manifest, pa.Table]:
    """(manifest, table of all its parts) for a version (default: the current one)."""
    return Store.open(emb_dir).read(version, columns)


def read_rows(
    emb_dir: str | os.PathLike, manifest: Manifest, rows: Sequence[int], columns: Sequence[str]
) -> dict[str, list]:
    """{column: values} of the given rows (positions in the version, its parts in manifest
    order; sorted, unique), reading only those columns of only the parts that hold the rows.

    The parts' sizes and row counts were checked when the manifest was read (Store.manifest);
    their CRC-32 covers whole files, so it is not read here: a search with an index answers
    from a few rows without reading the version's gigabytes."""
    folder = Store.open(emb_dir).version_dir(manifest.version)
    bounds = np.cumsum([0] + [p.rows for p in manifest.parts])
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) and (rows[0] < 0 or rows[-1] >= bounds[-1]):
        raise EmbedError(f"Rows {rows[0]}..{rows[-1]} lie outside {folder} ({bounds[-1]} rows).")
    which = np.searchsorted(bounds, rows, side="right") - 1
    out: dict[str, list] = {c: [] for c in columns}
    for part in np.unique(which):
        local = (rows[which == part] - bounds[part]).tolist()
        path = folder / manifest.parts[part].file
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
