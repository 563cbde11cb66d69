"""Index kinds (flat, ivf-pq, hnsw): how each is made and which search parameters it tunes;
the index's file names and errors."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from devise.store import EmbedError

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
