"""Choosing, on pseudo-unseen training classes, how a model words its classes and how far its
image vectors lean on the backbone's own ImageNet classifier (the ConSE blend weight).

Both choices are made like calibrated stacking's constant: a few draws each hold out a random
fifth of the training classes as pseudo-unseen, train an auxiliary head on most of the rest's
rows exactly like the real head, and score the held-back rows of seen and pseudo-unseen
classes together. The criterion is the harmonic mean H of seen and unseen per-class accuracy
at the best calibration constant, averaged over draws: a wording or weight that only helps
seen classes (or only unseen ones) does not win. Held-out classes and test rows are never
looked at.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

# Blend weights tried for the ConSE branch (0: the trained projection alone).
CONSE_WEIGHTS = tuple(round(float(x), 2) for x in np.linspace(0.0, 1.0, 11))
# Wordings "auto" tries with a sentence encoder (each costs an auxiliary head a draw): a class's
# name, and name + description with and without the hypernym chain (labels.WORDINGS).
AUTO_WORDINGS = ("name", "gloss", "hypernyms-gloss")
# Rows a class an auxiliary head trains on while choosing (enough to rank the candidates).
ROWS_PER_CLASS = 60
# Calibration constants tried when scoring a candidate (coarser than evaluation's grid).
GAMMAS = np.linspace(-0.3, 0.6, 46)


@dataclass
class Candidate:
    """One wording: its (C, D) class matrix over the training classes, and the (L, D) vectors
    of the classifier's labels in the same wording (None: no ConSE branch)."""

    wording: str
    class_matrix: np.ndarray
    label_vectors: np.ndarray | None = None


@dataclass
class Choice:
    """What was chosen, and the mean H of every (wording, weight) tried."""

    wording: str
    conse_weight: float
    h: float
    table: list[dict] = field(default_factory=list)
    draws: int = 0
    note: str = ""


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def conse_embed(probs: np.ndarray, label_vectors: np.ndarray, top: int = 10) -> np.ndarray:
    """(N, L) classifier probabilities, (L, D) label vectors (zero rows: no vector) -> (N, D)
    unit rows: the top labels that have a vector, weighted by probability."""
    known = np.linalg.norm(label_vectors, axis=1) > 0
    p = np.where(known[None, :], probs, 0.0)
    top = min(top, p.shape[1])
    idx = np.argpartition(-p, top - 1, axis=1)[:, :top]
    w = np.take_along_axis(p, idx, axis=1)
    w = w / np.maximum(w.sum(axis=1, keepdims=True), 1e-12)
    return _unit(np.einsum("nt,ntd->nd", w, label_vectors[idx]))


def _at_most_per_class(targets: np.ndarray, rows: np.ndarray, n: int, rng) -> np.ndarray:
    """(N,) bool: a random n of each class's selected rows (all of them when fewer)."""
    keep = np.zeros(len(targets), bool)
    for c in np.unique(targets[rows]):
        idx = np.flatnonzero(rows & (targets == c))
        keep[rng.permutation(idx)[:n]] = True
    return keep


def best_h(scores: np.ndarray, targets: np.ndarray, is_unseen: np.ndarray, unseen_classes) -> float:
    """The best H over GAMMAS (calibrated stacking) for (N, C) scores."""
    from devise.metrics import generalized_zero_shot

    return max(
        generalized_zero_shot(scores, targets, is_unseen, unseen_classes, g)["H"] for g in GAMMAS
    )


def choose(
    features: np.ndarray,
    targets: np.ndarray,
    candidates: Sequence[Candidate],
    fit_head: Callable[[np.ndarray, np.ndarray, np.ndarray, int], Callable],
    probs: np.ndarray | None = None,
    conse_top: int = 10,
    weights: Sequence[float] | None = None,
    draws: int = 2,
    seed: int = 0,
) -> Choice:
    """Pick the wording and ConSE weight with the best mean H over pseudo-unseen draws.

    features (N, F) training rows; targets (N,) class indices into every candidate's class
    matrix; fit_head(x, y, class_matrix, seed) -> a function (M, F) -> (M, D) unit rows;
    probs (N, L) the backbone classifier's probabilities on the same rows (None: no ConSE).
    weights: the ConSE weights to try (default CONSE_WEIGHTS, or 0 alone without probs).
    """
    n_classes = int(candidates[0].class_matrix.shape[0])
    p = max(1, round(0.2 * n_classes))
    if n_classes - p < 2 or len(features) < 4 * n_classes:
        c = candidates[0]
        return Choice(c.wording, 0.0, float("nan"), note="too few training classes to choose")
    if weights is None:
        weights = CONSE_WEIGHTS if probs is not None else (0.0,)
    scores = {(c.wording, w): [] for c in candidates for w in weights}
    for d in range(draws):
        rng = np.random.default_rng(seed + 7919 * d)
        pseudo = np.zeros(n_classes, bool)
        pseudo[rng.choice(n_classes, size=p, replace=False)] = True
        is_pseudo = pseudo[targets]
        fit = ~is_pseudo & (rng.random(len(targets)) < 0.8)
        val = ~fit
        fit &= _at_most_per_class(targets, fit, ROWS_PER_CLASS, rng)
        seen_idx = np.flatnonzero(~pseudo)
        remap = np.full(n_classes, -1)
        remap[seen_idx] = np.arange(len(seen_idx))
        for c in candidates:
            head = fit_head(features[fit], remap[targets[fit]], c.class_matrix[seen_idx], seed + d)
            emb_d = head(features[val])
            emb_c = None
            if probs is not None and c.label_vectors is not None:
                emb_c = conse_embed(probs[val], c.label_vectors, conse_top)
            for w in weights:
                if w > 0 and emb_c is None:
                    continue
                emb = emb_d if w == 0 else _unit((1 - w) * emb_d + w * emb_c)
                h = best_h(emb @ c.class_matrix.T, targets[val], is_pseudo[val], pseudo)
                scores[(c.wording, w)].append(h)
    table = [
        {"wording": k[0], "conse_weight": float(k[1]), "H": float(np.mean(v))}
        for k, v in scores.items()
        if v
    ]
    # Ties go to the earlier candidate and the smaller weight (the simpler model).
    best = max(table, key=lambda r: r["H"])
    log.debug("Chose class text %s, ConSE weight %.1f (H %.1f)", best["wording"],
             best["conse_weight"], best["H"])  # fmt: skip
    return Choice(best["wording"], best["conse_weight"], best["H"], table, draws)


# ---------------------------------------------------------------------------------------------
# For a training run


@dataclass
class ClassifierLabels:
    """A backbone's own classifier: (L, F) weight, (L,) bias, and its L labels described."""

    weight: np.ndarray
    bias: np.ndarray
    infos: list


def classifier_labels(backbone: str, weights: str | None) -> ClassifierLabels | None:
    """The ImageNet-1k classifier of a backbone, with its labels as WordNet classes; None when
    the backbone has none (ConSE then has nothing to say)."""
    import torch

    from devise import wordnet
    from devise.backbones import load_backbone
    from devise.labels import ClassInfo, describe

    clf = load_backbone(backbone, weights).classifier
    if not isinstance(clf, torch.nn.Linear) or clf.out_features != len(wordnet.imagenet1k()):
        return None
    infos = describe([ClassInfo(w, []) for w in wordnet.imagenet1k()])
    return ClassifierLabels(
        clf.weight.detach().numpy().astype(np.float32),
        clf.bias.detach().numpy().astype(np.float32),
        infos,
    )


def label_matrix(infos: list, space, wording: str) -> np.ndarray:
    """(L, D) vectors of the classifier's labels in a wording; zero rows where a label has no
    vector in the space (word tables lack some ImageNet names)."""
    import warnings

    from devise.labels import class_vectors

    # Labels (or words of them) without a vector are simply not used: no warning per label.
    text_log = logging.getLogger("devise.text")
    level = text_log.level
    text_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cv = class_vectors(infos, space, wording=wording)
    finally:
        text_log.setLevel(level)
    out = np.zeros((len(infos), cv.matrix.shape[1]), np.float32)
    row = {k: i for i, k in enumerate(cv.keys)}
    for i, info in enumerate(infos):
        if info.key in row:
            out[i] = cv.matrix[row[info.key]]
    return out


def softmax_probs(features: np.ndarray, labels: ClassifierLabels) -> np.ndarray:
    """(N, F) backbone features -> (N, L) classifier probabilities."""
    logits = np.asarray(features, np.float32) @ labels.weight.T + labels.bias
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def plan(
    class_text: str,
    conse_weight: str,
    infos: list,
    keys: Sequence[str],
    space,
    labels: ClassifierLabels | None,
    features: np.ndarray | None,
    targets: np.ndarray | None,
    fit_head: Callable | None,
    seed: int = 0,
    conse_top: int = 10,
) -> tuple[Choice, Candidate]:
    """The wording and ConSE weight of a run: the ones given, or ("auto") chosen by `choose`
    on the training rows (features, targets index into keys). Without training features
    (online mode) "auto" means the class name and no ConSE. Returns the choice and the chosen
    wording's candidate (class matrix over keys, label vectors)."""
    if class_text != "auto":
        wordings = [class_text]
    elif getattr(space, "open_vocabulary", False):
        wordings = list(AUTO_WORDINGS)
    else:  # a word table averages a description's words into mush: names only
        wordings = ["name", "names"]
    if labels is None:
        weights: tuple[float, ...] = (0.0,)
    elif conse_weight != "auto":
        weights = (float(conse_weight),)
    else:
        weights = CONSE_WEIGHTS
    auto = len(wordings) > 1 or len(weights) > 1
    if auto and (features is None or fit_head is None):
        wordings, weights = wordings[:1], (0.0,) if conse_weight == "auto" else weights[:1]
        auto = False
    by_key = {i.key: i for i in infos}
    candidates = []
    for w in wordings:
        cm = label_matrix([by_key[k] for k in keys], space, w)
        if (np.linalg.norm(cm, axis=1) == 0).any():
            continue  # this wording leaves a class without a vector
        lv = label_matrix(labels.infos, space, w) if labels is not None else None
        candidates.append(Candidate(w, cm, lv))
    if not candidates:
        raise ValueError("No class wording gives every training class a vector.")
    if not auto:
        c = candidates[0]
        return Choice(c.wording, weights[0], float("nan"), note="given"), c
    probs = softmax_probs(features, labels) if labels is not None else None
    choice = choose(features, targets, candidates, fit_head, probs, conse_top, weights, seed=seed)
    return choice, next(c for c in candidates if c.wording == choice.wording)
