"""Building an index: sample -> train -> parallel shards (+ exact answers of held-out queries)
-> merge -> tune on the held-out queries -> commit, under the embeddings folder's lock."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from devise.ann.index import AnnIndex, _vectors_file, commit_index, new_index_folder
from devise.ann.kinds import (
    INDEX_FORMAT,
    KINDS,
    VECTORS_FILE,
    IndexBuildError,
    Kind,
    _faiss,
    choose_kind,
    nlist_for,
)
from devise.ann.shards import _deserialize, _groups, _Runner, _serialize, build_shard, sample_rows
from devise.ann.tuning import tune
from devise.config import DEFAULT_QUERIES, RECALL_K, IndexConfig
from devise.similarity import merge_top_k
from devise.store import Store, Version, part_embeddings

log = logging.getLogger(__name__)

TRAIN_PER_LIST = 30  # training rows per IVF list (k-means centroid)
LOCK_COMMAND = "devise index"  # how the lock names an index build to a second writer


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


def index_embeddings(config: IndexConfig) -> BuildResult:
    """`devise index`: check the settings and the version (before Ray starts), join Ray unless
    `local`, and build the index under the folder's lock (waiting up to wait_lock_s for an
    embedding run or another build to finish)."""
    if config.num_tasks < 1 or config.cpus_per_task <= 0:
        raise IndexBuildError("--num-tasks must be at least 1 and --cpus-per-task above 0.")
    emb_dir = Path(config.embeddings).expanduser()
    Store.open(emb_dir).version(config.version)  # a clear error before Ray starts
    _faiss()
    if not config.local:
        from devise.runtime import init_ray

        init_ray(config.address)
    return build_index(
        emb_dir,
        config.kind,
        config.target_recall,
        config.version,
        local=config.local,
        num_tasks=config.num_tasks,
        cpus_per_task=config.cpus_per_task,
        queries=config.queries,
        wait_lock_s=config.wait_lock_s,
    )


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
    wait_lock_s: float = 0.0,
    _after_shards: Callable[[], None] | None = None,
) -> BuildResult:
    """Build and commit an index for the current (or named) version of `emb_dir`, holding the
    folder's writer lock (LockHeldError when an embedding run or another build holds it past
    wait_lock_s).

    The quantizers train on a random sample of rows; Ray tasks (or this process, `local`) add
    the version's parts to copies of them and find the exact neighbours of `queries` held-out
    rows; the shards are merged; the search parameters are the cheapest that reach
    `target_recall` recall@10 on the held-out queries; the measured recall is recorded.
    """
    store = Store.open(emb_dir)
    with store.lock(wait_lock_s, command=LOCK_COMMAND):
        return _build(
            store.version(version),
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
    """Build a version's index (the caller holds the folder's lock): see build_index."""
    times = {"start": time.perf_counter()}
    rows, dim = version.rows, version.dim
    _faiss()
    if rows == 0:
        raise IndexBuildError(f"{version.folder} holds no rows; nothing to index.")
    if not 0.0 < target_recall <= 1.0:
        raise IndexBuildError(f"--target-recall must be in (0, 1], not {target_recall}.")
    kind = KINDS[choose_kind(kind_name, rows)]
    runner = _Runner(local, cpus_per_task, version.name)
    groups = _groups(version.parts, num_tasks)
    query_ids, query_vecs, train = _sample(
        version, kind, runner, groups, n_queries, train_rows, seed
    )
    times["train"] = time.perf_counter()
    base = _train(kind, dim, rows, train)
    times["add"] = time.perf_counter()
    log.debug(
        "%s: trained %s on %d rows in %.1fs",
        version.name,
        kind.name,
        len(train),
        times["add"] - times["train"],
    )
    tmp = new_index_folder(version)
    try:
        shared = {"queries": query_vecs, "k": RECALL_K + 1}
        if kind.shardable:
            shared["base_blob"] = _serialize(base)
        if kind.rerank:
            shared["vectors_path"] = str(_vectors_file(tmp, rows, dim))
        shards = runner.map(build_shard, [(g,) for g in groups], shared)
        ann, exact_i = _merge(kind, version, base, shards, tmp)
        times["tune"] = time.perf_counter()
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
            RECALL_K,
            recall,
            target_recall,
        )
    ann.meta |= _build_meta(version, ann, params, target_recall, recall, trials, times)
    ann.meta |= {"recall_queries": len(query_ids), "train_rows": len(train)}
    ann.meta |= {"tasks": len(groups), "nodes": sorted(runner.nodes)}  # none: --local
    folder = commit_index(version, tmp, ann, ann.meta)
    log.debug(
        "%s: committed its %s index (recall@10 %.3f, %s)", version.name, kind.name, recall, params
    )
    seconds = time.perf_counter() - times["start"]
    bpv = ann.meta["bytes_per_vector"]
    return BuildResult(folder, kind.name, rows, params, recall, seconds, bpv, ann.meta)


def _sample(
    version: Version,
    kind: Kind,
    runner: _Runner,
    groups: list,
    n_queries: int,
    train_rows: int | None,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pass for the training sample and the held-out queries: (query row ids, their
    vectors, the training rows)."""
    rows = version.rows
    rng = np.random.default_rng(seed)
    n_train = min(rows, train_rows or _make_probe(kind, rows, version.dim))
    n_q = min(n_queries, rows)
    wanted = np.sort(rng.choice(rows, size=min(rows, n_train + n_q), replace=False))
    picked = np.concatenate(
        [s for s in runner.map(sample_rows, [(g,) for g in groups], {"wanted": wanted}) if s.size]
    )
    is_query = np.zeros(len(wanted), bool)
    is_query[rng.choice(len(wanted), size=n_q, replace=False)] = True
    query_ids, query_vecs = wanted[is_query], np.ascontiguousarray(picked[is_query])
    train = picked if n_train >= rows else np.ascontiguousarray(picked[~is_query])
    return query_ids, query_vecs, train


def _build_meta(
    version: Version,
    ann: AnnIndex,
    params: dict,
    target_recall: float,
    recall: float,
    trials: list[dict],
    times: dict[str, float],
) -> dict:
    """index.json's fields that describe a fresh build (files are added by commit_index)."""
    return {
        "format": INDEX_FORMAT,
        "version": version.name,
        "model_id": version.manifest.model_id,
        "rows": version.rows,
        "dim": version.dim,
        "params": params,
        "target_recall": target_recall,
        "recall_at_10": round(recall, 4),
        "tuning": trials,
        "bytes_per_vector": round(ann.bytes_per_vector(), 1),
        "seconds": {
            "sample": round(times["train"] - times["start"], 2),
            "train": round(times["add"] - times["train"], 2),
            "add": round(times["tune"] - times["add"], 2),
            "tune": round(time.perf_counter() - times["tune"], 2),
        },
        "faiss": _faiss().__version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "built_from": None,
    }


def _merge(
    kind: Kind, version: Version, base, shards: list[dict], tmp: Path
) -> tuple[AnnIndex, np.ndarray]:
    """Shards -> one AnnIndex (IVF lists merged, flat codes appended in row order, a graph
    built here part by part), and the exact (Q, k+1) neighbours of the held-out queries."""
    faiss = _faiss()
    n_q = len(shards[0]["gt_ids"])
    exact_s = np.full((n_q, 0), -np.inf, np.float32)
    exact_i = np.full((n_q, 0), -1, np.int64)
    for sh in shards:
        exact_s, exact_i = merge_top_k(
            exact_s, exact_i, sh["gt_scores"], sh["gt_ids"], RECALL_K + 1
        )
    if kind.shardable:
        base = _deserialize(shards[0]["base"])
        ivf = faiss.try_extract_index_ivf(base)
        for sh in shards[1:]:
            (ivf or base).merge_from(_deserialize(sh["base"]), 0)
            sh["base"] = None
    else:  # a graph is built by one process (faiss threads), part by part
        for path, _, _ in version.parts:
            base.add(part_embeddings(path))
    if base.ntotal != version.rows:
        raise IndexBuildError(
            f"Internal error: the index holds {base.ntotal} of {version.rows} rows."
        )
    vectors = None
    if kind.rerank:
        vectors = np.memmap(tmp / VECTORS_FILE, np.float32, "r").reshape(-1, version.dim)
    ann = AnnIndex(kind.name, base, vectors, {"kind": kind.name, **_kind_meta(base)})
    return ann, exact_i


def _make_probe(kind: Kind, rows: int, dim: int) -> int:
    """Rows to train on: ~30 a list for IVF (at least 10,000 for the PQ codebooks), none for
    flat and HNSW (held-out queries only)."""
    if kind.name == "ivf-pq":
        return int(min(100_000, max(10_000, TRAIN_PER_LIST * nlist_for(rows))))
    return 0


def _train(kind: Kind, dim: int, rows: int, sample: np.ndarray):
    """An untrained index of the kind, trained on the sample (IVF and PQ codebooks)."""
    base = kind.make(dim, rows)
    ivf = _faiss().try_extract_index_ivf(base)
    if ivf is not None:  # the sample size is chosen (_make_probe); faiss need not warn about it
        ivf.cp.min_points_per_centroid = max(1, min(TRAIN_PER_LIST, len(sample) // ivf.nlist))
    if not base.is_trained:
        base.train(sample)
    return base


def _kind_meta(base) -> dict:
    """The built index's shape that the tuner's cost needs (dim; nlist and code size of IVF)."""
    ivf = _faiss().try_extract_index_ivf(base)
    meta: dict = {"dim": int(base.d)}
    if ivf is not None:
        meta["nlist"] = int(ivf.nlist)
        meta["coarse_bytes"] = int(ivf.code_size)
    return meta
