import numpy as np
import pytest

from devise.metrics import (
    choose_gamma,
    generalized_zero_shot,
    harmonic_mean,
    hit_at_k,
    per_class_accuracy,
    retrieval_metrics,
)


def test_hit_at_k_counts_rank_of_the_true_class():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.5, 0.9], [0.1, 0.8, 0.3]])
    targets = np.array([0, 1, 0])  # ranks 0, 1, 2
    got = hit_at_k(scores, targets, ks=(1, 2, 3))
    assert got == pytest.approx({"hit@1": 100 / 3, "hit@2": 200 / 3, "hit@3": 100.0})


def test_per_class_accuracy_weights_classes_equally():
    pred = np.array([0, 0, 0, 0, 1, 0])
    targets = np.array([0, 0, 0, 0, 1, 1])
    assert per_class_accuracy(pred, targets) == pytest.approx(75.0)


def test_calibrated_stacking_recovers_unseen_class_and_raises_h():
    rng = np.random.default_rng(0)
    n = 200
    targets = rng.integers(0, 3, n)  # class 2 is unseen
    scores = rng.normal(0, 0.05, (n, 3))
    scores[np.arange(n), targets] += 0.3
    scores[:, :2] += 0.4  # bias toward trained classes
    unseen_cls = np.array([False, False, True])
    is_unseen = targets == 2
    raw = generalized_zero_shot(scores, targets, is_unseen, unseen_cls, 0.0)
    assert raw["unseen"] < 5 and raw["H"] < 10
    gamma = choose_gamma(scores, targets, is_unseen, unseen_cls)
    cal = generalized_zero_shot(scores, targets, is_unseen, unseen_cls, gamma)
    assert 0.1 < gamma < 0.7
    assert cal["H"] > 90 and cal["unseen"] > 90
    assert harmonic_mean(50, 100) == pytest.approx(66.666, rel=1e-3)


def test_retrieval_precision_and_map():
    scores = np.array([[0.9, 0.8, 0.7, 0.6]])
    relevant = np.array([[True, False, True, False]])
    got = retrieval_metrics(scores, relevant, k=2)
    assert got["P@2"] == pytest.approx(50.0)
    assert got["mAP"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    none = retrieval_metrics(scores, np.zeros_like(relevant), k=2)
    assert np.isnan(none["mAP"])
