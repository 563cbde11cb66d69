"""Cosine similarity on unit rows: normalising, exact top-k, merging top-k lists (below exact
search, the faiss index and the Python API, importing nothing from devise)."""

from __future__ import annotations

import numpy as np

# Scores of one block of queries against all rows stay under this many bytes.
_BLOCK_BYTES = 256 << 20


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """(N, D) -> float32 rows of unit L2 norm (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def top_k(
    matrix: np.ndarray, queries: np.ndarray, k: int, block_bytes: int = _BLOCK_BYTES
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product: matrix (N, D), queries (Q, D) or (D,) -> scores (Q, k)
    float32 and indices (Q, k) int64, best first.

    With unit rows this is cosine similarity. One matrix product per block of queries, then
    argpartition (O(N)) and a sort of only the k winners, not a sort of all N.
    """
    q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    n = matrix.shape[0]
    k = max(0, min(int(k), n))
    scores_out = np.empty((len(q), k), dtype=np.float32)
    index_out = np.empty((len(q), k), dtype=np.int64)
    if k == 0 or len(q) == 0:
        return scores_out, index_out
    step = max(1, block_bytes // max(1, 4 * n))
    for a in range(0, len(q), step):
        sims = q[a : a + step] @ matrix.T  # (B, N)
        if k < n:
            # The k largest sit at the end after partitioning; no negated copy of (B, N).
            part = np.argpartition(sims, n - k, axis=1)[:, n - k :]
        else:
            part = np.broadcast_to(np.arange(n), (len(sims), n))
        part_scores = np.take_along_axis(sims, part, axis=1)
        order = np.argsort(-part_scores, axis=1, kind="stable")
        index_out[a : a + step] = np.take_along_axis(part, order, axis=1)
        scores_out[a : a + step] = np.take_along_axis(part_scores, order, axis=1)
    return scores_out, index_out


def merge_top_k(
    scores: np.ndarray, ids: np.ndarray, more_scores: np.ndarray, more_ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Two (Q, a) and (Q, b) best-first lists -> the best k of both, (Q, k) each."""
    s = np.concatenate([scores, more_scores], axis=1)
    i = np.concatenate([ids, more_ids], axis=1)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1)
