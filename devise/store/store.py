"""The Store: one embeddings folder, its readers (StoreReader) and its writers: the lock, run
planning, staging, the commit that makes a version current, garbage collection, quarantine."""

from __future__ import annotations

import logging
import os
import shutil
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Self

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from devise.config import DEFAULT_CHUNK_ROWS, DEFAULT_KEEP_VERSIONS, DEFAULT_MAX_ERROR_FRACTION
from devise.fsutil import atomic_dir, atomic_path, fsync_dir, printable
from devise.store.errors import DamagedVersionError, EmbedError, TooManyErrorsError
from devise.store.format import (
    CURRENT_FILE,
    DAMAGED_DIR,
    ERRORS_FILE,
    FORMAT,
    HASHES_FILE,
    INPUT_COLUMNS,
    KEY_COLUMNS,
    MANIFEST_FILE,
    MISSING_REASON,
    REMOVED_FILE,
    STAGING_DIR,
    embedding_schema,
    errors_to_table,
    row_keys,
)
from devise.store.lock import EmbedLock
from devise.store.manifest import Manifest
from devise.store.plan import Plan, check_failures, plan_run
from devise.store.reading import StoreReader, version_seq
from devise.store.staging import Assembly, PartInfo, StagingWriter, link_or_copy

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


class Store(StoreReader):
    """One embeddings folder. Readers (StoreReader): versions(), current(), verify(), manifest(),
    version(), read(), errors(). Writers, under lock(): plan(), staging(), writer(), commit(),
    write_version(), gc(), quarantine()."""

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

    def lock(
        self, wait_s: float = 0.0, stale_s: float = 600.0, command: str = "devise embed"
    ) -> EmbedLock:
        """The writers' lock (a context manager): one writer at a time, whether it embeds or
        builds an index; command names the holder in the error a second writer gets."""
        return EmbedLock(self.root, wait_s, stale_s, command)

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
    ) -> tuple[str, Manifest]:
        """Assemble a version from base rows + staged chunks + missing-file errors, make it
        current, remove the staging folder and old versions. Every input row must land once.
        Refused (TooManyErrorsError, nothing changed, staging kept) when more than
        max_error_fraction of the inputs failed. hashes: a content hash per input row, kept in
        hashes.parquet for --verify content. Returns (version name, manifest)."""
        dim = int(meta["dim"])
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        seq = max((version_seq(d.name) for d in self.versions_dir.iterdir()), default=0) + 1
        name = f"{seq:06d}-{model_id}"
        assembly = Assembly(table, embedding_schema(dim, meta))
        with atomic_dir(self.version_dir(name)) as tmp:
            reused = self._assemble(assembly, tmp, staging, plan, model_id)
            errors = assembly.error_table(meta)
            self._check_settled(assembly, errors, table, plan, staging, max_error_fraction)
            digests = self._write_tables(tmp, errors, table, plan, hashes)
            for p in assembly.parts:
                data = (tmp / p.file).read_bytes()
                p.bytes, p.crc32 = len(data), zlib.crc32(data)
            manifest = Manifest.from_dict(
                {
                    "format": FORMAT,
                    "version": name,
                    "model_id": model_id,
                    "dim": dim,
                    **{k: v for k, v in meta.items() if k not in ("model_id", "dim")},
                    "rows": sum(p.rows for p in assembly.parts),
                    "errors": errors.num_rows,
                    "removed": len(plan.removed),
                    "embedded": len(plan.todo),
                    "reused": reused,
                    "base_version": plan.base.version if plan.base is not None else None,
                    "previous_version": plan.previous,
                    "content_hashes": len(digests),
                    "parts": [p.to_dict() for p in assembly.parts],
                    "created": datetime.now(UTC).isoformat(timespec="seconds"),
                    **(extra or {}),
                }
            )
            (tmp / MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")
        self._switch(name, staging, plan, keep_versions)
        return name, manifest

    def _assemble(
        self, assembly: Assembly, tmp: Path, staging: Path, plan: Plan, model_id: str
    ) -> int:
        """Gather a version's rows into tmp: the kept rows from the base version, the staged
        chunks' rows and errors, an error for each missing file. Returns the rows reused."""
        base, reused = plan.base, 0
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
        return reused

    @staticmethod
    def _check_settled(
        assembly: Assembly,
        errors: pa.Table,
        table: pd.DataFrame,
        plan: Plan,
        staging: Path,
        max_error_fraction: float,
    ) -> None:
        """Every input row landed exactly once, and few enough of them failed."""
        n_rows = sum(p.rows for p in assembly.parts)
        settled = len(assembly.seen) + len(plan.missing)
        if settled != len(table) or n_rows + errors.num_rows != len(table):
            raise EmbedError(
                f"Internal error: {settled} of {len(table)} input rows were settled; nothing "
                f"was committed and the staged chunks in {staging} are kept for a rerun."
            )
        if errors.num_rows:
            reason = errors.column("reason")[0].as_py()
            example = f"e.g. {printable(errors.column('path')[0].as_py())}: {reason}"
            previous = plan.previous
            kept = f"{previous} stays current" if previous else "no version exists yet"
            check_failures(errors.num_rows, len(table), max_error_fraction, example, kept)

    @staticmethod
    def _write_tables(
        tmp: Path,
        errors: pa.Table,
        table: pd.DataFrame,
        plan: Plan,
        hashes: Sequence[str | None] | None,
    ) -> dict[str, str]:
        """errors.parquet, removed.parquet and hashes.parquet (when any row has a content hash)
        of a version being built. Returns the content hashes by path."""
        pq.write_table(errors, tmp / ERRORS_FILE)
        removed = pa.table({"path": pa.array(plan.removed, pa.string())})
        pq.write_table(removed, tmp / REMOVED_FILE)
        # Kept rows keep the hash of the bytes they were embedded from; fresh hashes win.
        base = plan.base
        digests = {p: base.hashes[p] for p in plan.keep["path"] if base and p in base.hashes}
        if hashes is not None:
            digests.update((p, h) for p, h in zip(table["path"], hashes) if h is not None)
        if digests:
            hash_table = {"path": list(digests), "content_hash": list(digests.values())}
            pq.write_table(pa.table(hash_table), tmp / HASHES_FILE)
        return digests

    def _switch(self, name: str, staging: Path, plan: Plan, keep_versions: int) -> None:
        """Make a complete version current, then tidy: errors.parquet, staging, the versions a
        repair found damaged (quarantined), old versions (gc)."""
        # The switch: readers follow CURRENT, which now names a complete version.
        self._write_current(name)
        with atomic_path(self.root / ERRORS_FILE) as tmp_errors:
            link_or_copy(self.version_dir(name) / ERRORS_FILE, tmp_errors)
        shutil.rmtree(staging, ignore_errors=True)
        for version in plan.damaged:
            if self.version_dir(version).is_dir():
                self.quarantine(version)
        self.gc(keep_versions)

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
                if self.verify(name).rows > 0:
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
