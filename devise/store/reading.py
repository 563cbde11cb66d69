"""Reading committed versions: which versions exist, which one is current, verifying one before
use (falling back to the newest intact one), and reading its rows, errors and keys."""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from devise.fsutil import printable
from devise.store.errors import DamagedVersionError, EmbedError
from devise.store.format import (
    CURRENT_FILE,
    ERRORS_FILE,
    HASHES_FILE,
    KEY_COLUMNS,
    MANIFEST_FILE,
    VERSION_NAME,
    VERSIONS_DIR,
    embedding_schema,
)
from devise.store.manifest import Manifest, Part, Version
from devise.store.plan import Base

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


def version_seq(name: str) -> int:
    """The sequence number that starts a version's name (-1 when it has none)."""
    head = name.lstrip(".").split("-", 1)[0]
    return int(head) if head.isdigit() else -1


def _fallback_words(fallback: str | None) -> str:
    """What a reader does instead of a damaged version, in words."""
    if fallback is None:
        return "no intact version is left (`devise embed --repair` rebuilds it)."
    return f"using version {fallback} (`devise embed --repair` rebuilds it)."


class StoreReader:
    """The reading side of an embeddings folder (Store adds the writers): versions(), current(),
    verify(), manifest(), version(), read(), errors(), and what a run builds on (base, keys)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / VERSIONS_DIR

    def version_dir(self, name: str) -> Path:
        """The folder of a version (it may not exist)."""
        return self.versions_dir / name

    def versions(self) -> list[str]:
        """Committed versions, oldest first (folders with a manifest and a valid name)."""
        if not self.versions_dir.is_dir():
            return []
        names = [
            d.name
            for d in self.versions_dir.iterdir()
            if VERSION_NAME.fullmatch(d.name) and (d / MANIFEST_FILE).is_file()
        ]
        return sorted(names, key=version_seq)

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

    def verify(self, version: str, content: bool = False) -> Manifest:
        """The manifest of an intact version. Checks the manifest, every part's size and row
        count (its parquet footer) and errors.parquet; content=True also each part's CRC-32.
        DamagedVersionError names the first bad file; FileNotFoundError when the version is
        gone (removed by a writer's garbage collection)."""
        folder = self.version_dir(version)
        if not folder.is_dir():
            raise FileNotFoundError(folder)
        mpath = folder / MANIFEST_FILE
        try:
            manifest = Manifest.read(mpath)
        except FileNotFoundError:
            raise self._damaged(version, mpath, "is missing") from None
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            raise self._damaged(version, mpath, "is not a valid manifest") from None
        for p in manifest.parts:
            self._check_part(version, folder / p.file, p, content)
        self._check_part(version, folder / ERRORS_FILE, Part(ERRORS_FILE, manifest.errors), False)
        return manifest

    def _check_part(self, version: str, path: Path, part: Part, content: bool) -> None:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise self._damaged(version, path, "is missing") from None
        if part.bytes is not None and size != part.bytes:
            raise self._damaged(
                version, path, f"has {size} bytes where the manifest says {part.bytes}"
            )
        try:
            rows = pq.read_metadata(path).num_rows
        except (pa.ArrowException, OSError):
            raise self._damaged(version, path, "is not a readable parquet file") from None
        if rows != part.rows:
            raise self._damaged(
                version, path, f"has {rows} rows where the manifest says {part.rows}"
            )
        if content and part.crc32 is not None:
            self._load(version, path, part, columns=None)

    def _load(self, version: str, path: Path, part: Part, columns: list | None) -> pa.Table:
        """One part read in one pass: its bytes checked against the manifest CRC-32, then parsed."""
        data = path.read_bytes()
        if part.crc32 is not None and zlib.crc32(data) != part.crc32:
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

    def manifest(self, version: str | None = None) -> Manifest:
        """The manifest of a version (default: the current one); EmbedError when there is none
        or it is damaged."""
        name = self.check_name(version) if version is not None else self.current()
        if name is None:
            raise self._none_error()
        return self.verify(name)

    def version(self, version: str | None = None) -> Version:
        """A version (default: the current one) as its row readers see it: folder, manifest,
        parts in row order; EmbedError as manifest()."""
        manifest = self.manifest(version)
        return Version(self.version_dir(manifest.version), manifest)

    def read(
        self, version: str | None = None, columns: Sequence[str] | None = None
    ) -> tuple[Manifest, pa.Table]:
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

    def _read(self, name: str, cols: list | None) -> tuple[Manifest, pa.Table]:
        manifest = self.verify(name)
        folder = self.version_dir(name)
        tables = [self._load(name, folder / p.file, p, cols) for p in manifest.parts]
        if not tables:
            schema = embedding_schema(manifest.dim)
            empty = schema if cols is None else pa.schema([schema.field(c) for c in cols])
            return manifest, empty.empty_table()
        return manifest, pa.concat_tables(tables)

    def errors(self, version: str | None = None) -> pd.DataFrame:
        """The errors table (path, label, class_name, reason, ...) of a version."""
        import pandas as pd

        manifest = self.manifest(version)
        return pd.read_parquet(self.version_dir(manifest.version) / ERRORS_FILE)

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
            parts = [folder / p.file for p in manifest.parts]
            return Base(version, parts, folder / ERRORS_FILE, self._hashes(folder))
        try:
            manifest = Manifest.read(folder / MANIFEST_FILE)
            listed = [(folder / p.file, p) for p in manifest.parts]
            errors = (folder / ERRORS_FILE, Part(ERRORS_FILE, manifest.errors))
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
