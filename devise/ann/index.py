"""A built index: AnnIndex (search with exact re-ranking), and its files inside a version:
checked loading, and the commit that renames a complete index into place."""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from devise.ann.kinds import (
    INDEX_DIR,
    INDEX_FILE,
    INDEX_META,
    KINDS,
    VECTORS_FILE,
    IndexBuildError,
    _faiss,
    apply_params,
)
from devise.fsutil import fsync_dir
from devise.store import Version


class AnnIndex:
    """A built index, ready to search: base (a faiss index over row ids), optionally the rows'
    exact vectors (a read-only memory map, row-id order) that re-rank the base's candidates,
    and the search parameters the build chose."""

    def __init__(self, kind: str, base, vectors: np.ndarray | None, meta: dict):
        self.kind = kind
        self.base = base
        self.vectors = vectors
        self.meta = meta
        self.params: dict = {}
        self.set_params(meta.get("params", {}))

    @property
    def rows(self) -> int:
        return int(self.base.ntotal)

    @property
    def dim(self) -> int:
        return int(self.base.d)

    def set_params(self, params: dict) -> None:
        """Search parameters: nprobe and k_factor (ivf-pq), efSearch (hnsw)."""
        apply_params(self.base, params)
        self.params = dict(params)

    def search(
        self, queries: np.ndarray, k: int, matrix: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Queries (Q, D) or (D,), unit rows -> (scores (Q, k) float32, row ids (Q, k) int64),
        best first. An id of -1 (score -inf) pads a list the index could not fill.

        The base index proposes k * k_factor candidates; they are re-scored exactly on the
        vectors file, or on `matrix` (the version's (N, D) unit rows) when the caller holds it.
        """
        q = np.ascontiguousarray(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
        if q.shape[1] != self.dim:
            raise IndexBuildError(
                f"Query vectors are {q.shape[1]}-d but the index is {self.dim}-d."
            )
        k = max(0, min(int(k), self.rows))
        if k == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        exact = matrix if matrix is not None else self.vectors
        depth = k if exact is None else min(self.rows, int(k * self.params.get("k_factor", 1)))
        scores, ids = self.base.search(q, depth)
        if exact is not None:
            ok = ids >= 0
            flat = np.where(ok, ids, 0).ravel()
            order = np.argsort(flat, kind="stable")  # read the file in row order
            rows = np.empty((len(flat), self.dim), np.float32)
            rows[order] = exact[flat[order]]
            scores = np.einsum("qkd,qd->qk", rows.reshape(len(q), depth, -1), q)
            scores = np.where(ok, scores, -np.inf).astype(np.float32)
            best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            scores = np.take_along_axis(scores, best, axis=1)
            ids = np.take_along_axis(ids, best, axis=1)
        scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
        return scores, ids.astype(np.int64)

    def bytes_per_vector(self) -> float:
        """Bytes of memory the index holds per vector (codes, ids, lists, quantizer); the
        memory-mapped vectors file is disk, read only for the candidates."""
        return len(_faiss().serialize_index(self.base)) / max(1, self.rows)


def index_dir(version_dir: str | os.PathLike) -> Path:
    """Where a version's index lives (it may not exist)."""
    return Path(version_dir) / INDEX_DIR


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex)."""
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _whole(value, name: str, low: float, high: float = math.inf) -> int:
    """value as an int in [low, high], or IndexBuildError naming the parameter."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value != int(value) or not low <= value <= high:
        raise IndexBuildError(f"its parameter {name}={value!r} is impossible")
    return int(value)


def _check_meta(meta, folder: Path) -> dict:
    """index.json's fields that loading and searching rely on, checked (IndexBuildError otherwise)."""
    if not isinstance(meta, dict) or not meta:
        raise IndexBuildError("its index.json holds no index description")
    if meta.get("kind") not in KINDS:
        raise IndexBuildError(f"its kind {meta.get('kind')!r} is not one of {', '.join(KINDS)}")
    params = meta.get("params", {})
    if not isinstance(params, dict):
        raise IndexBuildError(f"its parameters {params!r} are not a mapping")
    for name in ("nprobe", "efSearch", "k_factor"):
        if name in params:
            _whole(params[name], name, 1, 1 << 20)
    files = meta.get("files")
    if not isinstance(files, dict) or INDEX_FILE not in files:
        raise IndexBuildError("its index.json records no checksums (built by an older devise)")
    for name, want in files.items():
        if name not in (INDEX_FILE, VECTORS_FILE) or not isinstance(want, dict):
            raise IndexBuildError(f"its index.json lists an unknown file {name!r}")
        path = folder / name
        try:
            size = path.stat().st_size
        except OSError:
            raise IndexBuildError(f"its {name} is missing") from None
        if size != want.get("bytes"):
            raise IndexBuildError(
                f"its {name} holds {size} bytes, not the {want.get('bytes')} recorded"
            )
        if file_sha256(path) != want.get("sha256"):
            raise IndexBuildError(
                f"its {name} does not match the checksum recorded when it was built"
            )
    return meta


def load(version_dir: str | os.PathLike, expect_rows: int | None = None) -> AnnIndex | None:
    """The committed index of a version folder, or None when it has none (search is exact).
    IndexBuildError (one sentence) when it cannot be trusted: index.json unreadable or implausible,
    a file whose size or SHA-256 differs from what the build recorded, a vectors file of the
    wrong size, or a row count that is not the version's."""
    folder = index_dir(version_dir)
    try:
        try:
            text = (folder / INDEX_META).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise IndexBuildError(f"its index.json cannot be read ({e})") from None
        try:
            meta = json.loads(text)
        except ValueError:
            raise IndexBuildError("its index.json is not JSON") from None
        _check_meta(meta, folder)
        faiss = _faiss()
        try:
            base = faiss.read_index(str(folder / INDEX_FILE))
        except RuntimeError as e:
            raise IndexBuildError(
                f"its index.faiss cannot be read ({str(e).splitlines()[0]})"
            ) from None
        dim = int(base.d)
        if dim < 1 or base.ntotal < 0:
            raise IndexBuildError(f"its index.faiss says {dim}-d, {base.ntotal} rows")
        vectors = None
        if (folder / VECTORS_FILE).exists():
            size = (folder / VECTORS_FILE).stat().st_size
            if size == 0 or size != base.ntotal * dim * 4:
                raise IndexBuildError(
                    f"its vectors.f32 holds {size} bytes, not {base.ntotal} rows x {dim} float32"
                )
            vectors = np.memmap(folder / VECTORS_FILE, np.float32, "r").reshape(-1, dim)
        elif KINDS[meta["kind"]].rerank:
            raise IndexBuildError("its vectors.f32 is missing")
        if "nprobe" in meta.get("params", {}):
            ivf = faiss.try_extract_index_ivf(base)
            if ivf is None or meta["params"]["nprobe"] > ivf.nlist:
                raise IndexBuildError(
                    f"its parameter nprobe={meta['params']['nprobe']} is impossible"
                )
        ann = AnnIndex(meta["kind"], base, vectors, meta)
        if expect_rows is not None and ann.rows != expect_rows:
            raise IndexBuildError(f"it holds {ann.rows} rows but its version {expect_rows}")
    except IndexBuildError as e:
        raise IndexBuildError(
            f"The index in {folder} cannot be used: {e}; rebuild it with `devise index`."
        ) from None
    return ann


def new_index_folder(version: Version) -> Path:
    """A fresh versions/<v>/.index-tmp-* folder to build into (leftovers of crashed builds of
    this version are removed first)."""
    for old in version.folder.glob(".index-*"):
        shutil.rmtree(old, ignore_errors=True)
    tmp = version.folder / f".index-tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def commit_index(version: Version, tmp: Path, ann: AnnIndex, meta: dict) -> Path:
    """Write the index into `tmp` (which may hold its vectors file already), then rename it to
    versions/<v>/index. An index already there is moved aside first and removed after."""
    faiss = _faiss()
    try:
        faiss.write_index(ann.base, str(tmp / INDEX_FILE))
        # Every file's size and SHA-256: a reader trusts the index only when they match.
        meta["files"] = {
            p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
            for p in (tmp / INDEX_FILE, tmp / VECTORS_FILE)
            if p.exists()
        }
        with open(tmp / INDEX_META, "w", encoding="utf-8") as f:
            f.write(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp)
        from devise.fsutil import normal_mode

        normal_mode(tmp)
        final = index_dir(version.folder)
        aside = version.folder / f".index-old-{uuid.uuid4().hex[:8]}"
        if final.exists():
            os.rename(final, aside)
        os.rename(tmp, final)
        fsync_dir(version.folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    return final


def _vectors_file(folder: Path, rows: int, dim: int) -> Path:
    """An (rows, dim) float32 file of zeros to be filled in place."""
    path = folder / VECTORS_FILE
    with open(path, "wb") as f:
        f.truncate(rows * dim * 4)
    return path
