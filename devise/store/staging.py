"""Staging: a run's pipeline output written as chunks a rerun can trust (StagingWriter), and a
new version assembled from the base version's rows and the staged chunks (Assembly)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from devise.fsutil import atomic_path
from devise.store.errors import EmbedError
from devise.store.format import (
    KEY_COLUMNS,
    _strings,
    error_schema,
    errors_to_table,
    row_keys,
    rows_to_table,
)
from devise.store.manifest import Part

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class PartInfo:
    """A chunk committed to staging: its index, files and row counts."""

    index: int
    path: Path
    rows: int
    errors: int


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link of src at dst (a version's files are never changed), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class Assembly:
    """The rows of a version being built: parts taken from the base and staging, each input
    key taken once, labels taken from the current input (a catalog may rename a class)."""

    def __init__(self, table: pd.DataFrame, schema: pa.Schema) -> None:
        self.labels = {
            p: (lab, cn) for p, lab, cn in zip(table["path"], table["label"], table["class_name"])
        }
        self.schema = schema
        self.seen: set = set()
        self.parts: list[Part] = []
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
            link_or_copy(src, dst)
        else:
            pq.write_table(relabelled.cast(self.schema), dst)
        self.parts.append(Part(dst.name, int(mask.sum())))

    def add_errors(self, src: Path, wanted: set) -> None:
        """Take the wanted rows of an errors file (written into the version's errors.parquet)."""
        errs = pq.read_table(src)
        if errs.num_rows == 0:
            return
        mask, keys = self._select(errs, wanted)
        self.seen.update(keys[mask])
        if mask.any():
            self.errors.append(self._relabel(errs.filter(pa.array(mask))).cast(error_schema()))

    def error_table(self, meta: dict) -> pa.Table:
        """Every error taken, as errors.parquet's table with the version's metadata."""
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
        """Buffer a pipeline batch (row, embedding, error); a full buffer is flushed."""
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
        """Write the buffered rows as the next chunk (errors file first, part file last)."""
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
