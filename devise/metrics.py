"""Evaluation metrics as pure array functions: hit@k, calibrated stacking, retrieval P@k and mAP."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

KS = (1, 2, 5, 10)  # the k of every hit@k table


def hit_at_k(scores: np.ndarray, targets: np.ndarray, ks: Sequence[int] = KS) -> dict:
    """Flat hit@k in percent: the true class is among the k best-scored classes.

    scores (N, C), targets (N,) column indices into scores. k larger than C counts as C.
    """
    if len(targets) == 0:
        return {f"hit@{k}": float("nan") for k in ks}
    true = scores[np.arange(len(targets)), targets][:, None]
    # rank = number of classes scored strictly higher than the true one (ties favour the truth)
    rank = (scores > true).sum(axis=1)
    return {f"hit@{k}": float(100.0 * np.mean(rank < k)) for k in ks}


def per_class_accuracy(pred: np.ndarray, targets: np.ndarray) -> float:
    """Mean over classes of top-1 accuracy (percent), the usual zero-shot measure."""
    if len(targets) == 0:
        return float("nan")
    accs = [np.mean(pred[targets == c] == c) for c in np.unique(targets)]
    return float(100.0 * np.mean(accs))


def harmonic_mean(a: float, b: float) -> float:
    """Harmonic mean of seen and unseen accuracy (0 when either is 0)."""
    return 0.0 if a + b == 0 else float(2 * a * b / (a + b))


def generalized_zero_shot(
    scores: np.ndarray,
    targets: np.ndarray,
    is_unseen: np.ndarray,
    unseen_classes: np.ndarray,
    gamma: float = 0.0,
) -> dict:
    """Generalized zero-shot accuracy among all classes, with calibrated stacking.

    scores (N, C) over all classes; targets (N,); is_unseen (N,) bool per sample;
    unseen_classes (C,) bool per class. gamma is subtracted from seen-class scores (Chao et al.
    2016). Returns seen and unseen per-class accuracy and their harmonic mean, in percent.
    """
    adjusted = scores - gamma * (~unseen_classes)[None, :]
    pred = adjusted.argmax(axis=1)
    seen = per_class_accuracy(pred[~is_unseen], targets[~is_unseen])
    unseen = per_class_accuracy(pred[is_unseen], targets[is_unseen])
    return {"seen": seen, "unseen": unseen, "H": harmonic_mean(seen, unseen), "gamma": gamma}


def choose_gamma(
    scores: np.ndarray,
    targets: np.ndarray,
    is_unseen: np.ndarray,
    unseen_classes: np.ndarray,
    grid: np.ndarray | None = None,
) -> float:
    """The calibration constant maximising the harmonic mean on a validation set.

    Call it on validation data only (pseudo-unseen classes from the training data), never on
    the test split.
    """
    grid = np.linspace(-0.5, 1.0, 301) if grid is None else grid
    best = max(
        grid,
        key=lambda g: generalized_zero_shot(scores, targets, is_unseen, unseen_classes, g)["H"],
    )
    return float(best)


def retrieval_metrics(scores: np.ndarray, relevant: np.ndarray, k: int = 10) -> dict:
    """Precision@k and mean average precision, each query ranking all items.

    scores (Q, N): query-to-item similarity; relevant (Q, N) bool. Queries with no relevant
    item are skipped. Percent.
    """
    order = np.argsort(-scores, axis=1, kind="stable")
    rel_sorted = np.take_along_axis(relevant, order, axis=1)
    has = rel_sorted.any(axis=1)
    rel_sorted = rel_sorted[has]
    if len(rel_sorted) == 0:
        return {f"P@{k}": float("nan"), "mAP": float("nan")}
    p_at_k = rel_sorted[:, :k].mean(axis=1)
    hits = np.cumsum(rel_sorted, axis=1)
    ranks = np.arange(1, rel_sorted.shape[1] + 1)[None, :]
    ap = (rel_sorted * hits / ranks).sum(axis=1) / rel_sorted.sum(axis=1)
    return {f"P@{k}": float(100 * p_at_k.mean()), "mAP": float(100 * ap.mean())}
