"""Choosing the class wording and the ConSE weight on pseudo-unseen training classes."""

import numpy as np

from devise.selection import Candidate, choose, conse_embed


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _data(seed=0, classes=10, per_class=40, dim=8, features=16):
    rng = np.random.default_rng(seed)
    matrix = _unit(rng.normal(size=(classes, dim))).astype(np.float32)
    means = rng.normal(size=(classes, features)) * 3
    y = np.repeat(np.arange(classes), per_class)
    x = (means[y] + rng.normal(size=(len(y), features))).astype(np.float32)
    return x, y, matrix


def _ridge_head(x, y, class_matrix, seed):
    """A stand-in for the trained projection: least squares onto the seen classes' vectors. It
    knows nothing of classes it never saw, as a real head would."""
    w = np.linalg.lstsq(x, class_matrix[y], rcond=None)[0]
    return lambda rows: _unit(rows @ w)


def test_an_informative_classifier_gets_weight_and_a_useless_one_none():
    x, y, matrix = _data()
    sure = np.full((len(y), 10), 0.01)
    sure[np.arange(len(y)), y] = 0.9  # a classifier that knows every class, seen or not
    c = Candidate("name", matrix, label_vectors=matrix)
    good = choose(x, y, [c], _ridge_head, probs=sure, draws=2)
    alone = next(r["H"] for r in good.table if r["conse_weight"] == 0.0)
    assert good.conse_weight >= 0.5 and good.h > alone + 20
    assert len(good.table) == 11 and {r["conse_weight"] for r in good.table} >= {0.0, 1.0}
    rng = np.random.default_rng(1)
    noise = rng.dirichlet(np.ones(10), size=len(y))
    bad = choose(x, y, [c], _ridge_head, probs=noise, draws=2)
    assert bad.conse_weight < good.conse_weight
    assert bad.h < good.h


def test_the_wording_whose_class_vectors_carry_structure_wins():
    # Classes 0-4 and 5-9 form two groups in feature space; the "structured" wording's vectors
    # reflect that grouping, the other's are unrelated: only the first lets a head place
    # pseudo-unseen classes near their group.
    rng = np.random.default_rng(3)
    groups = np.repeat([0, 1], 5)
    centre = _unit(rng.normal(size=(2, 8)))
    structured = _unit(centre[groups] + 0.3 * rng.normal(size=(10, 8))).astype(np.float32)
    unrelated = _unit(rng.normal(size=(10, 8))).astype(np.float32)
    feat_centre = rng.normal(size=(2, 16)) * 4
    y = np.repeat(np.arange(10), 40)
    x = feat_centre[groups][y] + rng.normal(size=(10, 16))[y] + rng.normal(size=(400, 16))
    cands = [Candidate("unrelated", unrelated), Candidate("structured", structured)]
    choice = choose(x.astype(np.float32), y, cands, _ridge_head, draws=3)
    assert choice.wording == "structured" and choice.conse_weight == 0.0


def test_conse_embed_skips_labels_without_a_vector():
    labels = np.eye(3, 4, dtype=np.float32)
    labels[0] = 0.0
    probs = np.array([[0.7, 0.2, 0.1]])
    out = conse_embed(probs, labels, top=1)
    assert np.allclose(out, labels[1])


def test_too_few_classes_keep_the_first_wording_and_no_conse():
    x, y, matrix = _data(classes=2, per_class=5)
    choice = choose(x, y, [Candidate("name", matrix)], _ridge_head)
    assert (choice.wording, choice.conse_weight) == ("name", 0.0) and "too few" in choice.note
