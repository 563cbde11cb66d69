"""Tuning a built index: the cheapest search parameters that reach a recall@10 on held-out
rows, costed without timing (a busy machine would make the choice random)."""

from __future__ import annotations

import numpy as np

from devise.ann.index import AnnIndex
from devise.ann.kinds import KINDS
from devise.config import RECALL_K


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
        return scanned + params["k_factor"] * RECALL_K * meta["dim"] * 4 + meta["nlist"]
    if kind == "hnsw":
        return params["efSearch"]
    return rows


def tune(
    ann: AnnIndex,
    queries: np.ndarray,
    exact_ids: np.ndarray,
    self_ids: np.ndarray,
    target: float,
    k: int = RECALL_K,
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
