"""Approximate nearest-neighbour indexes (faiss) for an embeddings version: build them with Ray
tasks, commit them inside the version, keep them current across incremental versions, load and
search them; and the flat parquet export.

Layout inside a committed version (the version's own files are never touched)::

    versions/<v>/index/            index.json (kind, parameters, measured recall, each file's
                                   size and SHA-256), index.faiss,
                                   and vectors.f32 for IVF kinds (the rows' float32 vectors in
                                   row-id order, memory-mapped to re-rank candidates exactly);
                                   renamed into place complete
    versions/<v>/.index-tmp-*/     a build in progress; a later build removes leftovers

Row ids are positions in the version's rows (its parts concatenated in manifest order), the
same positions exact search returns. A crash before the rename leaves no `index/`, and search
stays exact; a reader sees the old index, no index, or the new one, never half of one.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from devise.config import DEFAULT_K, DEFAULT_QUERIES
from devise.fsutil import fsync_dir
from devise.similarity import merge_top_k, top_k
from devise.store import EmbedError, row_id

log = logging.getLogger(__name__)

INDEX_DIR = "index"
INDEX_META = "index.json"
INDEX_FILE = "index.faiss"
VECTORS_FILE = "vectors.f32"
INDEX_FORMAT = 2  # 2: index.json records each file's size and SHA-256
# `auto` keeps exact (flat) search below this many rows: ~56 ms a query at 10^6 x 300 here.
AUTO_FLAT_MAX = 1_000_000
# An incremental version whose added + removed rows exceed this share of its rows is rebuilt
# (the quantizer was trained on the old distribution).
REBUILD_FRACTION = 0.2


class IndexBuildError(EmbedError):
    """An index that cannot be built, read or used; str() says what to do."""


class IndexTasksLostError(IndexBuildError):
    """The build's Ray tasks were lost (their nodes or workers died) past their retries; nothing
    was committed and a rerun can succeed."""

    EXIT_CODE = 75  # EX_TEMPFAIL: as a skipped scheduled run, try again later


def _faiss():
    from devise.extras import require

    return require("faiss", "index", "an approximate index")


# ---------------------------------------------------------------------------------------------
# the store, as this module sees it: a version folder, its manifest and its parts in row order


@dataclass
class Version:
    """A committed embeddings version: folder, manifest, and parts with their first row id."""

    folder: Path
    manifest: dict
    parts: list[tuple[Path, int, int]]  # (file, first row id, rows)

    @property
    def name(self) -> str:
        return str(self.manifest["version"])

    @property
    def rows(self) -> int:
        return sum(n for _, _, n in self.parts)

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])


def open_version(emb_dir: str | os.PathLike, version: str | None = None) -> Version:
    """The current (or named) committed version of an embeddings folder."""
    from devise.store import Store

    store = Store.open(emb_dir)
    manifest = store.manifest(version)
    return version_at(store.version_dir(manifest["version"]), manifest)


def version_at(folder: str | os.PathLike, manifest: dict | None = None) -> Version:
    """The version committed in `folder` (versions/<v>)."""
    from devise.store import MANIFEST_FILE

    folder = Path(folder)
    if manifest is None:
        try:
            manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise IndexBuildError(f"{folder} is not a committed embeddings version.") from None
    parts, start = [], 0
    for p in manifest["parts"]:
        parts.append((folder / p["file"], start, int(p["rows"])))
        start += int(p["rows"])
    return Version(folder, manifest, parts)


def read_embeddings(path: Path) -> np.ndarray:
    """One part file -> its (n, D) float32 embeddings."""
    from devise.store import embedding_matrix

    return embedding_matrix(pq.read_table(path, columns=["embedding"]))


def read_keys(version: Version) -> list[tuple]:
    """(path, size_bytes, mtime_ns) of every row, in row-id order: what identifies a row's input
    across versions (a file changed in place gets a new key)."""
    keys: list[tuple] = []
    for path, _, _ in version.parts:
        t = pq.read_table(path, columns=["path", "size_bytes", "mtime_ns"]).to_pydict()
        keys += list(zip(t["path"], t["size_bytes"], t["mtime_ns"]))
    return keys


# ---------------------------------------------------------------------------------------------
# index kinds: each one entry with how to make it untrained and which parameters to tune


@dataclass(frozen=True)
class Kind:
    """How one kind of index is made and searched.

    make(dim, rows) -> an untrained faiss index; tune: the search parameters tried during the
    build, cheapest first, as dicts for `apply_params`; shardable: whether shards built by
    parallel tasks can be merged (IVF lists and flat codes can; an HNSW graph cannot); rerank:
    whether candidates are re-scored on the exact vectors kept on disk (vectors.f32).
    """

    name: str
    make: Callable[[int, int], object]
    tune: Callable[[int], list[dict]]
    shardable: bool = True
    rerank: bool = False
    description: str = ""


def nlist_for(rows: int) -> int:
    """IVF lists: the power of two nearest sqrt(rows), between 16 and 65536 (about sqrt(rows)
    vectors a list: training stays minutes on a few cores; the PQ scan of a list is cheap)."""
    target = math.sqrt(max(1, rows))
    return int(min(65536, max(16, 2 ** round(math.log2(target)))))


def _pq_m(dim: int, bytes_per_vector: int) -> int:
    """The largest PQ sub-quantizer count <= bytes_per_vector that divides dim."""
    for m in range(min(dim, bytes_per_vector), 0, -1):
        if dim % m == 0:
            return m
    return 1


def _make_flat(dim: int, rows: int):
    return _faiss().IndexFlatIP(dim)


def _make_ivf_pq(dim: int, rows: int):
    """IVF lists of PQ codes (dim/4 bytes, plus an 8-byte id) in memory pick candidates; the
    candidates are re-scored on the exact vectors read from disk. PQ codes alone cannot order
    close neighbours in a tight cluster (recall@10 0.46 measured on clustered data; a second, finer
    PQ code of dim/3 bytes as re-ranker reached 0.93 at best), the exact re-rank restores it."""
    faiss = _faiss()
    nlist = nlist_for(rows)
    m = _pq_m(dim, max(8, dim // 4))
    if nlist >= 1024:  # assigning to many lists: a graph over the centroids, not a scan
        quantizer = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    else:
        quantizer = faiss.IndexFlatIP(dim)
    base = faiss.IndexIVFPQ(quantizer, dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
    base.own_fields = True
    quantizer.this.disown()
    # 10 k-means iterations instead of 25: the codebooks barely move after that, training is
    # the slowest step of a build, and recall is measured afterwards anyway.
    base.cp.niter = 10
    base.pq.cp.niter = 10
    return base


def _make_hnsw(dim: int, rows: int):
    faiss = _faiss()
    index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 80
    return index


def _tune_ivf(rows: int) -> list[dict]:
    nlist = nlist_for(rows)
    probes = [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if p <= nlist]
    return [{"nprobe": p, "k_factor": f} for p in probes for f in (1, 2, 5, 10, 20, 50)]


KINDS: dict[str, Kind] = {
    "flat": Kind("flat", _make_flat, lambda rows: [{}], True, False, "exact, a float32 copy"),
    "ivf-pq": Kind(
        "ivf-pq",
        _make_ivf_pq,
        _tune_ivf,
        True,
        True,
        "IVF lists of PQ codes in memory, candidates re-ranked on exact vectors on disk",
    ),
    "hnsw": Kind(
        "hnsw",
        _make_hnsw,
        lambda rows: [{"efSearch": e} for e in (16, 32, 64, 128, 256, 512)],
        False,
        False,
        "HNSW graph over float32 vectors (fast; more memory than float32)",
    ),
}


def choose_kind(kind: str, rows: int) -> str:
    """`auto`: flat below AUTO_FLAT_MAX rows, else ivf-pq; any other name is checked."""
    if kind == "auto":
        return "flat" if rows < AUTO_FLAT_MAX else "ivf-pq"
    if kind not in KINDS:
        raise IndexBuildError(f"Unknown index kind {kind!r}; use auto, {', '.join(KINDS)}.")
    return kind


def apply_params(base, params: dict) -> None:
    """Set faiss search parameters (nprobe, efSearch) on a loaded index."""
    faiss = _faiss()
    if "nprobe" in params:
        ivf = faiss.extract_index_ivf(base)
        ivf.nprobe = int(params["nprobe"])
        quantizer = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):  # it must return nprobe good lists
            quantizer.hnsw.efSearch = max(64, 2 * int(params["nprobe"]))
    if "efSearch" in params:
        base.hnsw.efSearch = int(params["efSearch"])


# ---------------------------------------------------------------------------------------------
# building: sample -> train -> parallel shards (+ exact answers of held-out queries) -> merge ->
# tune on the held-out queries -> commit


@dataclass
class BuildResult:
    """What a build committed: where, which kind and parameters, the recall it measured."""

    folder: Path
    kind: str
    rows: int
    params: dict
    recall: float | None
    seconds: float
    bytes_per_vector: float
    meta: dict = field(default_factory=dict)


def _serialize(index) -> np.ndarray | None:
    return None if index is None else _faiss().serialize_index(index)


def _deserialize(blob):
    return None if blob is None else _faiss().deserialize_index(np.asarray(blob))


def sample_rows(files: Sequence[tuple[str, int, int]], wanted: np.ndarray) -> np.ndarray:
    """The embeddings of row ids `wanted` (sorted) found in these parts, in row-id order."""
    out = []
    for path, start, n in files:
        local = wanted[(wanted >= start) & (wanted < start + n)] - start
        if len(local):
            out.append(read_embeddings(Path(path))[local])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def build_shard(
    files: Sequence[tuple[str, int, int]],
    base_blob=None,
    vectors_path: str | None = None,
    queries: np.ndarray | None = None,
    k: int = DEFAULT_K,
) -> dict:
    """Add the rows of some parts to a copy of the trained (empty) index, write their vectors
    at their row ids into the vectors file, and find the exact top-k of the held-out queries
    among them. Runs as a Ray task (on any node that sees the version folder); also callable
    in-process. files: (part path, first row id, rows); queries: (Q, D) or None.
    Returns the serialized shard and exact (Q, k) scores and row ids.
    """
    base = _deserialize(base_blob)
    faiss = _faiss()
    ivf = faiss.try_extract_index_ivf(base) if base is not None else None
    vectors = None
    q = len(queries) if queries is not None else 0
    best_s = np.full((q, 0), -np.inf, np.float32)
    best_i = np.full((q, 0), -1, np.int64)
    for path, start, n in files:
        x = read_embeddings(Path(path))
        if len(x) != n:
            raise IndexBuildError(f"{path} holds {len(x)} rows, its manifest says {n}; re-embed.")
        if base is not None:
            if ivf is not None:
                base.add_with_ids(x, np.arange(start, start + n, dtype=np.int64))
            else:
                base.add(x)
        if vectors_path is not None:
            if vectors is None:
                vectors = np.memmap(vectors_path, np.float32, "r+").reshape(-1, x.shape[1])
            vectors[start : start + n] = x
        if q:
            s, i = top_k(x, queries, k)
            best_s, best_i = merge_top_k(best_s, best_i, s, i + start, k)
    if vectors is not None:
        vectors.flush()
    return {"base": _serialize(base), "gt_scores": best_s, "gt_ids": best_i}


def _groups(parts: Sequence[tuple[Path, int, int]], n: int) -> list[list[tuple[str, int, int]]]:
    """Contiguous groups of parts with about the same number of rows each (order kept, so flat
    codes merge into row-id order)."""
    n = max(1, min(n, len(parts)))
    total = sum(r for _, _, r in parts) or 1
    groups: list[list[tuple[str, int, int]]] = [[] for _ in range(n)]
    for path, start, rows in parts:
        g = min(n - 1, int(start * n / total))
        groups[g].append((str(path), start, rows))
    return [g for g in groups if g]


# A task lost with its node or worker process runs again on another node, up to this many
# times (Ray's default). Its work is idempotent: a shard is rebuilt from the parts, and its
# rows land at the same offsets of the vectors file.
TASK_RETRIES = 3


def _on_node(fn: Callable, *args, **kwargs) -> tuple[str, object]:
    """(the Ray node this task ran on, fn's result): a Ray task."""
    import ray

    return ray.get_runtime_context().get_node_id(), fn(*args, **kwargs)


class _Runner:
    """Runs a shard function over tasks as Ray tasks spread over the cluster's nodes, or in
    this process (`local`). `shared` keyword arguments (trained indexes, queries) are put in
    Ray's object store once. nodes: the Ray nodes that ran tasks. A task that cannot finish
    even after its retries (its nodes lost) ends the build with one IndexBuildError line."""

    def __init__(self, local: bool, cpus_per_task: float, what: str = "the version"):
        self.local = local
        self.cpus_per_task = cpus_per_task
        self.what = what
        self.nodes: set[str] = set()

    def map(self, fn: Callable, tasks: Sequence[tuple], shared: dict) -> list:
        if self.local:
            return [fn(*args, **shared) for args in tasks]
        import ray
        from ray.exceptions import RayError, RayTaskError

        remote = ray.remote(
            num_cpus=self.cpus_per_task, max_retries=TASK_RETRIES, scheduling_strategy="SPREAD"
        )(_on_node)
        refs = {k: ray.put(v) for k, v in shared.items()}
        try:
            done = ray.get([remote.remote(fn, *args, **refs) for args in tasks])
        except RayTaskError:
            raise  # the task's own error (an IndexBuildError says what to do)
        except RayError as e:  # a node or worker lost past the retries
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise IndexTasksLostError(
                f"Building the index of {self.what} lost its Ray tasks ({type(e).__name__}: "
                f"{first}); nothing was committed and its search is as before: rerun "
                "`devise index`."
            ) from None
        self.nodes.update(node for node, _ in done)
        return [out for _, out in done]


def recall_at_k(approx: np.ndarray, exact: np.ndarray, self_ids: np.ndarray, k: int) -> float:
    """Mean share of each query's exact top-k found by the approximate top-k, not counting the
    query's own row (the held-out queries are rows of the version): (Q, >k), (Q, >k), (Q,)."""
    hits = 0
    for a, e, s in zip(approx, exact, self_ids):
        a = [i for i in a if i != s and i >= 0][:k]
        e = [i for i in e if i != s][:k]
        hits += len(set(a) & set(e)) / max(1, len(e))
    return hits / max(1, len(approx))


def _cost(kind: str, params: dict, rows: int, meta: dict) -> float:
    """A machine-independent cost of one query: codes scanned plus vectors re-ranked (measured
    latency on a busy machine would make the chosen parameters random)."""
    if kind == "ivf-pq":
        scanned = params["nprobe"] * rows / meta["nlist"] * meta["coarse_bytes"]
        return scanned + params["k_factor"] * DEFAULT_K * meta["dim"] * 4 + meta["nlist"]
    if kind == "hnsw":
        return params["efSearch"]
    return rows


def tune(
    ann: AnnIndex,
    queries: np.ndarray,
    exact_ids: np.ndarray,
    self_ids: np.ndarray,
    target: float,
    k: int = DEFAULT_K,
) -> tuple[dict, float, list[dict]]:
    """Try the kind's search parameters on the held-out queries; keep the cheapest that reaches
    `target` recall@k (else the best one). Returns (params, recall, every trial)."""
    kind = KINDS[ann.kind]
    trials: list[dict] = []
    best: dict | None = None
    reached_factors: set = set()
    for params in kind.tune(ann.rows):
        if params.get("k_factor") in reached_factors:
            continue  # more lists at the same re-rank depth only cost more
        ann.set_params(params)
        _, ids = ann.search(queries, k + 1)
        r = recall_at_k(ids, exact_ids, self_ids, k)
        trial = {
            **params,
            "recall": round(r, 4),
            "cost": _cost(ann.kind, params, ann.rows, ann.meta),
        }
        trials.append(trial)
        if r >= target:
            reached_factors.add(params.get("k_factor"))
            if best is None or best["recall"] < target or trial["cost"] < best["cost"]:
                best = trial
        elif best is None or (best["recall"] < target and r > best["recall"]):
            best = trial
    assert best is not None
    chosen = {k_: v for k_, v in best.items() if k_ not in ("recall", "cost")}
    ann.set_params(chosen)
    return chosen, float(best["recall"]), trials


# ---------------------------------------------------------------------------------------------
# a loaded index


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


def _train(kind: Kind, dim: int, rows: int, sample: np.ndarray):
    base = kind.make(dim, rows)
    ivf = _faiss().try_extract_index_ivf(base)
    if ivf is not None:  # the sample size is chosen (_make_probe); faiss need not warn about it
        ivf.cp.min_points_per_centroid = max(1, min(TRAIN_PER_LIST, len(sample) // ivf.nlist))
    if not base.is_trained:
        base.train(sample)
    return base


def _kind_meta(base) -> dict:
    ivf = _faiss().try_extract_index_ivf(base)
    meta: dict = {"dim": int(base.d)}
    if ivf is not None:
        meta["nlist"] = int(ivf.nlist)
        meta["coarse_bytes"] = int(ivf.code_size)
    return meta


def build_index(
    emb_dir: str | os.PathLike,
    kind: str = "auto",
    target_recall: float = 0.95,
    version: str | None = None,
    *,
    local: bool = False,
    num_tasks: int = 4,
    cpus_per_task: float = 1.0,
    queries: int = DEFAULT_QUERIES,
    train_rows: int | None = None,
    seed: int = 0,
    _after_shards: Callable[[], None] | None = None,
) -> BuildResult:
    """Build and commit an index for the current (or named) version of `emb_dir`.

    The quantizers train on a random sample of rows; Ray tasks (or this process, `local`) add
    the version's parts to copies of them and find the exact neighbours of `queries` held-out
    rows; the shards are merged; the search parameters are the cheapest that reach
    `target_recall` recall@10 on the held-out queries; the measured recall is recorded.
    """
    return _build(
        open_version(emb_dir, version),
        kind,
        target_recall,
        local,
        num_tasks,
        cpus_per_task,
        queries,
        train_rows,
        seed,
        _after_shards,
    )


def _build(
    version: Version,
    kind_name: str,
    target_recall: float,
    local: bool,
    num_tasks: int,
    cpus_per_task: float,
    n_queries: int,
    train_rows: int | None,
    seed: int,
    after_shards: Callable[[], None] | None = None,
) -> BuildResult:
    t0 = time.perf_counter()
    faiss = _faiss()
    rows, dim = version.rows, version.dim
    if rows == 0:
        raise IndexBuildError(f"{version.folder} holds no rows; nothing to index.")
    if not 0.0 < target_recall <= 1.0:
        raise IndexBuildError(f"--target-recall must be in (0, 1], not {target_recall}.")
    kind = KINDS[choose_kind(kind_name, rows)]
    runner = _Runner(local, cpus_per_task, version.name)
    groups = _groups(version.parts, num_tasks)
    rng = np.random.default_rng(seed)

    # One pass for the training sample and the held-out queries.
    probe = _make_probe(kind, rows, dim)
    n_train = min(rows, train_rows or probe)
    n_q = min(n_queries, rows)
    wanted = np.sort(rng.choice(rows, size=min(rows, n_train + n_q), replace=False))
    picked = np.concatenate(
        [s for s in runner.map(sample_rows, [(g,) for g in groups], {"wanted": wanted}) if s.size]
    )
    is_query = np.zeros(len(wanted), bool)
    is_query[rng.choice(len(wanted), size=n_q, replace=False)] = True
    query_ids, query_vecs = wanted[is_query], np.ascontiguousarray(picked[is_query])
    train = picked if n_train >= rows else np.ascontiguousarray(picked[~is_query])
    t_train = time.perf_counter()
    base = _train(kind, dim, rows, train)
    t_add = time.perf_counter()
    log.debug(
        "%s: trained %s on %d rows in %.1fs", version.name, kind.name, len(train), t_add - t_train
    )

    tmp = new_index_folder(version)
    try:
        shared = {"queries": query_vecs, "k": DEFAULT_K + 1}
        if kind.shardable:
            shared["base_blob"] = _serialize(base)
        if kind.rerank:
            shared["vectors_path"] = str(_vectors_file(tmp, rows, dim))
        shards = runner.map(build_shard, [(g,) for g in groups], shared)
        ann, exact_i, t_tune = _merge(kind, version, base, shards, tmp)
        del shards
        params, recall, trials = tune(ann, query_vecs, exact_i, query_ids, target_recall)
        if after_shards is not None:
            after_shards()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if recall < target_recall:
        log.warning(
            "%s: the %s index reaches recall@%d %.3f at best, under the target %.3f.",
            version.name,
            kind.name,
            DEFAULT_K,
            recall,
            target_recall,
        )
    meta = ann.meta
    meta |= {
        "format": INDEX_FORMAT,
        "version": version.name,
        "model_id": version.manifest.get("model_id"),
        "rows": rows,
        "dim": dim,
        "params": params,
        "target_recall": target_recall,
        "recall_at_10": round(recall, 4),
        "recall_queries": int(n_q),
        "tuning": trials,
        "train_rows": len(train),
        "tasks": len(groups),
        "nodes": sorted(runner.nodes),  # the Ray nodes that ran its tasks (none: --local)
        "bytes_per_vector": round(ann.bytes_per_vector(), 1),
        "seconds": {
            "sample": round(t_train - t0, 2),
            "train": round(t_add - t_train, 2),
            "add": round(t_tune - t_add, 2),
            "tune": round(time.perf_counter() - t_tune, 2),
        },
        "faiss": faiss.__version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "built_from": None,
    }
    ann.meta = meta
    folder = commit_index(version, tmp, ann, meta)
    log.debug(
        "%s: committed its %s index (recall@10 %.3f, %s)", version.name, kind.name, recall, params
    )
    return BuildResult(
        folder,
        kind.name,
        rows,
        params,
        recall,
        time.perf_counter() - t0,
        meta["bytes_per_vector"],
        meta,
    )


def _merge(kind: Kind, version: Version, base, shards: list[dict], tmp: Path):
    """Shards -> one AnnIndex (IVF lists merged, flat codes appended in row order, a graph
    built here part by part), and the exact (Q, k+1) neighbours of the held-out queries."""
    faiss = _faiss()
    n_q = len(shards[0]["gt_ids"])
    exact_s = np.full((n_q, 0), -np.inf, np.float32)
    exact_i = np.full((n_q, 0), -1, np.int64)
    for sh in shards:
        exact_s, exact_i = merge_top_k(
            exact_s, exact_i, sh["gt_scores"], sh["gt_ids"], DEFAULT_K + 1
        )
    if kind.shardable:
        base = _deserialize(shards[0]["base"])
        ivf = faiss.try_extract_index_ivf(base)
        for sh in shards[1:]:
            (ivf or base).merge_from(_deserialize(sh["base"]), 0)
            sh["base"] = None
    else:  # a graph is built by one process (faiss threads), part by part
        for path, _, _ in version.parts:
            base.add(read_embeddings(path))
    if base.ntotal != version.rows:
        raise IndexBuildError(
            f"Internal error: the index holds {base.ntotal} of {version.rows} rows."
        )
    vectors = None
    if kind.rerank:
        vectors = np.memmap(tmp / VECTORS_FILE, np.float32, "r").reshape(-1, version.dim)
    ann = AnnIndex(kind.name, base, vectors, {"kind": kind.name, **_kind_meta(base)})
    return ann, exact_i, time.perf_counter()


TRAIN_PER_LIST = 30  # training rows per IVF list (k-means centroid)


def _make_probe(kind: Kind, rows: int, dim: int) -> int:
    """Rows to train on: ~30 a list for IVF (at least 10,000 for the PQ codebooks), none for
    flat and HNSW (held-out queries only)."""
    if kind.name == "ivf-pq":
        return int(min(100_000, max(10_000, TRAIN_PER_LIST * nlist_for(rows))))
    return 0


# ---------------------------------------------------------------------------------------------
# keeping the index current: a new version's index from the previous version's


def _remap_ivf(ivf, old_to_new: np.ndarray) -> None:
    """Rewrite the row ids stored in an IVF index's lists: old id i becomes old_to_new[i]
    (every id left must map to a row of the new version)."""
    faiss = _faiss()
    invlists = ivf.invlists
    for lst in range(ivf.nlist):
        n = invlists.list_size(lst)
        if n:
            ids = faiss.rev_swig_ptr(invlists.get_ids(lst), n)  # a view: writes go to the list
            ids[:] = old_to_new[ids]


def _remap_codes(index, old_to_new: np.ndarray, rows: int, added: np.ndarray, x_added):
    """A flat-codes index (IndexFlat, IndexPQ) in new row order: kept rows' codes moved to their
    new positions, added rows encoded. Returns a new index of the same kind."""
    faiss = _faiss()
    size = index.sa_code_size()
    old = faiss.vector_to_array(index.codes).reshape(index.ntotal, size)
    new = np.zeros((rows, size), np.uint8)
    kept = old_to_new >= 0
    new[old_to_new[kept]] = old[kept]
    if len(added):
        new[added] = index.sa_encode(x_added)
    out = faiss.clone_index(index)
    out.reset()
    out.add_sa_codes(new)
    return out


def _rows_at(version: Version, wanted: np.ndarray) -> np.ndarray:
    """Embeddings of row ids `wanted` (sorted), reading only the parts that hold them."""
    x = sample_rows([(str(p), s, n) for p, s, n in version.parts], wanted)
    return x if len(x) else np.zeros((0, version.dim), np.float32)


def update_index(
    emb_dir: str | os.PathLike,
    version: str | None = None,
    previous: str | None = None,
    *,
    rebuild_fraction: float = REBUILD_FRACTION,
    local: bool = True,
    num_tasks: int = 4,
    cpus_per_task: float = 1.0,
    queries: int = DEFAULT_QUERIES,
    seed: int = 0,
) -> BuildResult | None:
    """Give a new version (default: the current one) the index of the version it was built
    from (default: its manifest's base_version, else previous_version), with its added rows
    added and its removed or changed rows removed, so removed rows never come back. Rebuilt from
    scratch when more than `rebuild_fraction` of the rows changed, when the model changed, or
    for a graph index. None when the previous version has no index. Recall is measured again
    on held-out queries and the parameters re-tuned (the quantizers stay)."""
    new = open_version(emb_dir, version)
    prev_name = previous or new.manifest.get("base_version") or new.manifest.get("previous_version")
    if not prev_name or prev_name == new.name:
        return None
    try:
        prev = open_version(emb_dir, prev_name)
    except EmbedError:
        return None  # removed meanwhile: nothing to carry
    old = load(prev.folder)
    if old is None:
        return None
    target = float(old.meta.get("target_recall", 0.95))
    build_args = (local, num_tasks, cpus_per_task, queries, None, seed)
    if old.kind not in ("flat", "ivf-pq") or prev.manifest.get("model_id") != new.manifest.get(
        "model_id"
    ):
        return _build(new, old.kind, target, *build_args)
    t0 = time.perf_counter()
    old_keys, new_keys = read_keys(prev), read_keys(new)
    position = {k: i for i, k in enumerate(new_keys)}
    old_to_new = np.array([position.get(k, -1) for k in old_keys], dtype=np.int64)
    kept = old_to_new >= 0
    added = np.setdiff1d(np.arange(new.rows, dtype=np.int64), old_to_new[kept])
    removed = int((~kept).sum())
    if added.size + removed > rebuild_fraction * max(1, new.rows):
        log.info("%s: %d added, %d removed: rebuilding the index.", new.name, added.size, removed)
        return _build(new, old.kind, target, *build_args)
    faiss = _faiss()
    x_added = _rows_at(new, added)
    ivf = faiss.try_extract_index_ivf(old.base)
    if ivf is not None:
        gone = np.flatnonzero(~kept).astype(np.int64)
        if gone.size:
            ivf.remove_ids(faiss.IDSelectorBatch(gone))
        _remap_ivf(ivf, old_to_new)
        if added.size:
            old.base.add_with_ids(x_added, added)
        base = old.base
    else:
        base = _remap_codes(old.base, old_to_new, new.rows, added, x_added)
    if base.ntotal != new.rows:
        raise IndexBuildError(
            f"Internal error: the updated index holds {base.ntotal} of {new.rows} rows."
        )

    # One pass over the new version: its vectors file (row-id order) and the exact neighbours
    # of held-out rows, to measure recall again and re-tune.
    rng = np.random.default_rng(seed)
    n_q = min(queries, new.rows)
    query_ids = np.sort(rng.choice(new.rows, size=n_q, replace=False))
    query_vecs = _rows_at(new, query_ids)
    tmp = new_index_folder(new)
    try:
        shared = {"queries": query_vecs, "k": DEFAULT_K + 1}
        if old.vectors is not None:
            shared["vectors_path"] = str(_vectors_file(tmp, new.rows, new.dim))
        runner = _Runner(local, cpus_per_task, new.name)
        exact_s = np.full((n_q, 0), -np.inf, np.float32)
        exact_i = np.full((n_q, 0), -1, np.int64)
        for sh in runner.map(build_shard, [(g,) for g in _groups(new.parts, num_tasks)], shared):
            exact_s, exact_i = merge_top_k(
                exact_s, exact_i, sh["gt_scores"], sh["gt_ids"], DEFAULT_K + 1
            )
        vectors = None
        if old.vectors is not None:
            vectors = np.memmap(tmp / VECTORS_FILE, np.float32, "r").reshape(-1, new.dim)
        meta = {k: v for k, v in old.meta.items() if k != "params"}
        ann = AnnIndex(old.kind, base, vectors, meta)
        params, recall, trials = tune(ann, query_vecs, exact_i, query_ids, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    meta |= {
        "version": new.name,
        "rows": new.rows,
        "params": params,
        "recall_at_10": round(recall, 4),
        "recall_queries": int(n_q),
        "tuning": trials,
        "bytes_per_vector": round(ann.bytes_per_vector(), 1),
        "built_from": prev.name,
        "update": {
            "added": int(added.size),
            "removed": removed,
            "seconds": round(time.perf_counter() - t0, 2),
        },
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    ann.meta = meta
    folder = commit_index(new, tmp, ann, meta)
    log.info(
        "%s: index carried from %s (+%d, -%d), recall@10 %.3f",
        new.name,
        prev.name,
        added.size,
        removed,
        recall,
    )
    return BuildResult(
        folder,
        old.kind,
        new.rows,
        params,
        recall,
        time.perf_counter() - t0,
        meta["bytes_per_vector"],
        meta,
    )


def carry_index(emb_dir: str | os.PathLike, version: str, manifest: dict) -> str | None:
    """After a commit: give `version` the index of the version it came from, when that one had
    an index and faiss is installed (`update_index`). Returns a line saying what was done, or
    None when there was nothing to carry. Never fails the commit: a failure is the line."""
    import importlib.util

    from devise.store import Store

    store = Store.open(emb_dir)
    prev = manifest.get("base_version") or manifest.get("previous_version")
    if not prev or prev == version or not index_dir(store.version_dir(prev)).is_dir():
        return None
    if importlib.util.find_spec("faiss") is None:
        return None  # no index extra here: the new version is searched exactly
    try:
        r = update_index(emb_dir, version, prev)
    except EmbedError as e:
        return f"The index of {prev} was not carried to {version} ({e}); run `devise index`."
    if r is None:
        return None
    how = "updated" if "update" in r.meta else "rebuilt"
    recall = "n/a" if r.recall is None else f"{r.recall:.3f}"
    return f"Index {how} from {prev}: {r.kind}, recall@10 {recall} -> {r.folder}"


# ---------------------------------------------------------------------------------------------
# export: one flat parquet file for DuckDB, pandas, faiss and friends


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
        metadata={f"devise.{k}".encode(): str(v).encode() for k, v in (meta or {}).items()},
    )


def export_parquet(
    emb_dir: str | os.PathLike, out: str | os.PathLike, version: str | None = None
) -> tuple[Path, int]:
    """Write the current (or named) version as one parquet file, part by part (memory stays one
    part), under a temporary name renamed into place. Returns (path, rows)."""
    from devise.fsutil import atomic_path, check_output_file

    out = check_output_file(out, "--to")
    v = open_version(emb_dir, version)
    meta = {
        "version": v.name,
        "model_id": v.manifest.get("model_id", ""),
        "vectors_id": v.manifest.get("vectors_id", ""),
        "dim": v.dim,
    }
    schema = export_schema(v.dim, meta)
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for path, start, n in v.parts:
            t = pq.read_table(path, columns=["path", "label", "class_name", "embedding"])
            ids = pa.array([row_id(p) for p in t.column("path").to_pylist()], pa.string())
            rows = pa.array(np.arange(start, start + t.num_rows, dtype=np.int64))
            writer.write_table(
                pa.Table.from_arrays([ids, rows, *t.columns], schema=schema),
                row_group_size=65536,
            )
    return out, v.rows


# ---------------------------------------------------------------------------------------------
# CLI


def run_cli_index(args: argparse.Namespace) -> int:
    """`devise index` (flags: devise/commands/index.py)."""
    from devise.store import Store

    if args.num_tasks < 1 or args.cpus_per_task <= 0:
        raise IndexBuildError("--num-tasks must be at least 1 and --cpus-per-task above 0.")
    emb_dir = Path(args.embeddings).expanduser()
    open_version(emb_dir, args.version)  # a clear error before Ray starts
    _faiss()
    if not args.local:
        from devise.runtime import init_ray

        init_ray(args.address)
    with Store.open(emb_dir).lock(args.wait_lock):
        r = build_index(
            emb_dir,
            args.kind,
            args.target_recall,
            args.version,
            local=args.local,
            num_tasks=args.num_tasks,
            cpus_per_task=args.cpus_per_task,
            queries=args.queries,
        )
    recall = "n/a" if r.recall is None else f"{r.recall:.3f}"
    print(
        f"Indexed {r.rows} rows of {r.meta['version']} as {r.kind}"
        + (f" {r.params}" if r.params else "")
        + f" in {r.seconds:.1f}s: recall@10 {recall} on {r.meta['recall_queries']} held-out rows, "
        f"{r.bytes_per_vector:.0f} bytes a vector -> {r.folder}"
    )
    return 0


def run_cli_export(args: argparse.Namespace) -> int:
    """`devise export` (flags: devise/commands/export.py)."""
    out, rows = export_parquet(args.embeddings, args.to, args.version)
    print(f"Wrote {rows} rows to {out}")
    return 0
