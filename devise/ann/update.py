"""Keeping an index current: a new version's index made from the previous version's (kept rows
moved to their new row ids, added rows added, removed and changed rows removed), or rebuilt
when too much changed; and carrying it after an embedding run's commit."""

from __future__ import annotations

import logging
import os
import shutil
import time
from datetime import UTC, datetime

import numpy as np

from devise.ann.build import BuildResult, _build
from devise.ann.index import (
    AnnIndex,
    _vectors_file,
    commit_index,
    index_dir,
    load,
    new_index_folder,
)
from devise.ann.kinds import REBUILD_FRACTION, VECTORS_FILE, IndexBuildError, _faiss
from devise.ann.shards import _groups, _Runner, build_shard
from devise.ann.tuning import tune
from devise.config import DEFAULT_QUERIES, RECALL_K
from devise.similarity import merge_top_k
from devise.store import EmbedError, Manifest, Store, Version

log = logging.getLogger(__name__)


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
    on held-out queries and the parameters re-tuned (the quantizers stay). Takes no lock: the
    caller writes the folder (an embedding run carrying its index, `carry_index`)."""
    store = Store.open(emb_dir)
    new = store.version(version)
    prev_name = previous or new.manifest.base_version or new.manifest.previous_version
    if not prev_name or prev_name == new.name:
        return None
    try:
        prev = store.version(prev_name)
    except EmbedError:
        return None  # removed meanwhile: nothing to carry
    old = load(prev.folder)
    if old is None:
        return None
    target = float(old.meta.get("target_recall", 0.95))
    build_args = (local, num_tasks, cpus_per_task, queries, None, seed)
    if old.kind not in ("flat", "ivf-pq") or prev.manifest.model_id != new.manifest.model_id:
        return _build(new, old.kind, target, *build_args)
    t0 = time.perf_counter()
    old_to_new, added = _row_map(prev, new)
    removed = int((old_to_new < 0).sum())
    if added.size + removed > rebuild_fraction * max(1, new.rows):
        log.info("%s: %d added, %d removed: rebuilding the index.", new.name, added.size, removed)
        return _build(new, old.kind, target, *build_args)
    old.base = _moved_index(old, new, old_to_new, added)
    tmp = new_index_folder(new)
    try:
        runner = _Runner(local, cpus_per_task, new.name)
        ann, n_q, tuned = _retune(new, old, tmp, runner, num_tasks, queries, seed, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    params, recall, trials = tuned
    ann.meta |= {
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
    folder = commit_index(new, tmp, ann, ann.meta)
    log.info(
        "%s: index carried from %s (+%d, -%d), recall@10 %.3f",
        new.name,
        prev.name,
        added.size,
        removed,
        recall,
    )
    seconds, bpv = time.perf_counter() - t0, ann.meta["bytes_per_vector"]
    return BuildResult(folder, old.kind, new.rows, params, recall, seconds, bpv, ann.meta)


def _row_map(prev: Version, new: Version) -> tuple[np.ndarray, np.ndarray]:
    """(old row id -> new row id, -1 where the row was removed or changed; the new version's
    row ids that the previous one did not have), by each row's (path, size, mtime)."""
    position = {k: i for i, k in enumerate(new.input_keys())}
    old_to_new = np.array([position.get(k, -1) for k in prev.input_keys()], dtype=np.int64)
    added = np.setdiff1d(np.arange(new.rows, dtype=np.int64), old_to_new[old_to_new >= 0])
    return old_to_new, added


def _moved_index(old: AnnIndex, new: Version, old_to_new: np.ndarray, added: np.ndarray):
    """The previous index's faiss index in the new version's row ids: removed rows out, kept
    rows renumbered, added rows encoded with the trained quantizers."""
    faiss = _faiss()
    x_added = new.embeddings_at(added)
    ivf = faiss.try_extract_index_ivf(old.base)
    if ivf is not None:
        gone = np.flatnonzero(old_to_new < 0).astype(np.int64)
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
    return base


def _retune(
    new: Version,
    old: AnnIndex,
    tmp,
    runner: _Runner,
    num_tasks: int,
    queries: int,
    seed: int,
    target: float,
) -> tuple[AnnIndex, int, tuple[dict, float, list[dict]]]:
    """One pass over the new version: its vectors file (row-id order, when the kind re-ranks)
    and the exact neighbours of held-out rows, to measure recall again and re-tune. Returns
    (the updated AnnIndex, the number of held-out queries, tune's (params, recall, trials))."""
    rng = np.random.default_rng(seed)
    n_q = min(queries, new.rows)
    query_ids = np.sort(rng.choice(new.rows, size=n_q, replace=False))
    query_vecs = new.embeddings_at(query_ids)
    shared = {"queries": query_vecs, "k": RECALL_K + 1}
    if old.vectors is not None:
        shared["vectors_path"] = str(_vectors_file(tmp, new.rows, new.dim))
    exact_s = np.full((n_q, 0), -np.inf, np.float32)
    exact_i = np.full((n_q, 0), -1, np.int64)
    for sh in runner.map(build_shard, [(g,) for g in _groups(new.parts, num_tasks)], shared):
        exact_s, exact_i = merge_top_k(
            exact_s, exact_i, sh["gt_scores"], sh["gt_ids"], RECALL_K + 1
        )
    vectors = None
    if old.vectors is not None:
        vectors = np.memmap(tmp / VECTORS_FILE, np.float32, "r").reshape(-1, new.dim)
    meta = {k: v for k, v in old.meta.items() if k != "params"}
    ann = AnnIndex(old.kind, old.base, vectors, meta)
    return ann, n_q, tune(ann, query_vecs, exact_i, query_ids, target)


def carry_index(emb_dir: str | os.PathLike, version: str, manifest: Manifest) -> str | None:
    """After a commit: give `version` the index of the version it came from, when that one had
    an index and faiss is installed (`update_index`). Returns a line saying what was done, or
    None when there was nothing to carry. Never fails the commit: a failure is the line."""
    import importlib.util

    store = Store.open(emb_dir)
    prev = manifest.base_version or manifest.previous_version
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
