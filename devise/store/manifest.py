"""A committed version's manifest.json as a typed record, and a version as its row readers see
it (folder, manifest, parts in row order)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from devise.store.format import FORMAT, KEY_COLUMNS, part_embeddings


@dataclass
class Part:
    """One part file of a version: its name in the version folder, rows, and (written by every
    commit) its byte size and CRC-32, which readers check."""

    file: str
    rows: int
    bytes: int | None = None
    crc32: int | None = None

    @classmethod
    def from_dict(cls, data: dict) -> Part:
        """A part entry of manifest.json; ValueError when its file is not a plain name or its
        row count is negative."""
        part = cls(str(data["file"]), int(data["rows"]), data.get("bytes"), data.get("crc32"))
        if Path(part.file).name != part.file or part.rows < 0:
            raise ValueError(data)
        return part

    def to_dict(self) -> dict:
        out: dict = {"file": self.file, "rows": self.rows}
        if self.bytes is not None:
            out["bytes"] = self.bytes
        if self.crc32 is not None:
            out["crc32"] = self.crc32
        return out


# The keys of manifest.json that a Manifest holds as fields; every other key a writer recorded
# (backbone, image_size, model_dir, source, config, host, nodes, ...) is kept in `details`.
_OPTIONAL = ("vectors", "vectors_id")


@dataclass
class Manifest:
    """What a commit wrote about a version (manifest.json, written last).

    rows / errors: rows in its parts / in errors.parquet; removed: paths of the previous version
    gone from the input; embedded / reused: rows this run embedded / carried over unchanged from
    base_version; previous_version: the current version when the run started; content_hashes:
    rows with a content hash (--verify content); details: everything else the writer recorded
    about the run, written at the top level of the file as before.
    """

    version: str
    model_id: str
    dim: int
    rows: int
    errors: int
    parts: list[Part]
    format: int = FORMAT
    vectors: str | None = None  # the word vectors the model maps onto (path or text space)
    vectors_id: str | None = None  # the id of their content
    removed: int = 0
    embedded: int = 0
    reused: int = 0
    base_version: str | None = None
    previous_version: str | None = None
    content_hashes: int = 0
    created: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        """The manifest in a parsed manifest.json; ValueError, KeyError or TypeError when a
        required field is missing or of the wrong type."""
        if not isinstance(data, dict):
            raise TypeError("a manifest is a JSON object")
        names = {f.name for f in fields(cls)} - {"details"}
        known = {k: v for k, v in data.items() if k in names}
        known["parts"] = [Part.from_dict(p) for p in data["parts"]]
        for key, kind in (("dim", int), ("rows", int), ("errors", int), ("model_id", str)):
            known[key] = kind(data[key])
        known["version"] = str(data["version"])
        details = {k: v for k, v in data.items() if k not in names}
        return cls(**known, details=details)

    @classmethod
    def read(cls, path: str | Path) -> Manifest:
        """The manifest in a manifest.json file (errors as from_dict, OSError, or ValueError
        when it is not JSON)."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def to_dict(self) -> dict:
        """The JSON object written to manifest.json (details at the top level; vectors and
        vectors_id only when recorded)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "details"}
        out["parts"] = [p.to_dict() for p in self.parts]
        for key in _OPTIONAL:
            if out[key] is None:
                del out[key]
        return {**out, **self.details}

    def to_json(self) -> str:
        """manifest.json's text: sorted keys, two-space indent, a final newline."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @property
    def model_dir(self) -> str | None:
        """The model folder an embedding run used (None for versions written directly)."""
        return self.details.get("model_dir")


@dataclass(frozen=True)
class Version:
    """A committed version as readers of its rows see it: the folder, its manifest, and its
    parts with the row id of their first row (row ids are positions in the parts concatenated
    in manifest order, the same in exact search and an index)."""

    folder: Path
    manifest: Manifest

    @property
    def name(self) -> str:
        return self.manifest.version

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.manifest.parts)

    @property
    def parts(self) -> list[tuple[Path, int, int]]:
        """(part file, first row id, rows) of each part, in row-id order."""
        out, start = [], 0
        for p in self.manifest.parts:
            out.append((self.folder / p.file, start, p.rows))
            start += p.rows
        return out

    def input_keys(self) -> list[tuple]:
        """(path, size_bytes, mtime_ns) of every row, in row-id order: what identifies a row's
        input across versions (a file changed in place gets a new key)."""
        keys: list[tuple] = []
        for path, _, _ in self.parts:
            t = pq.read_table(path, columns=KEY_COLUMNS).to_pydict()
            keys += list(zip(*(t[c] for c in KEY_COLUMNS)))
        return keys

    def embeddings_at(self, wanted: np.ndarray) -> np.ndarray:
        """The (len(wanted), D) embeddings of row ids `wanted` (sorted), reading only the parts
        that hold them."""
        out = [np.zeros((0, self.dim), np.float32)]
        for path, start, n in self.parts:
            local = wanted[(wanted >= start) & (wanted < start + n)] - start
            if len(local):
                out.append(part_embeddings(path)[local])
        return np.concatenate(out)
