"""Shards of a build: Ray tasks (or this process) that read a version's parts, add them to a
copy of the trained index, write their exact vectors, and find the held-out queries' exact
neighbours among them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from devise.ann.kinds import IndexBuildError, IndexTasksLostError, _faiss
from devise.config import DEFAULT_K
from devise.similarity import merge_top_k, top_k
from devise.store import part_embeddings


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
            out.append(part_embeddings(path)[local])
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
        x = part_embeddings(path)
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
