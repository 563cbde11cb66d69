"""Training losses for the DeViSE head: the paper's hinge rank loss and the notebook's cosine loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rank_loss(
    pred: torch.Tensor, class_vectors: torch.Tensor, targets: torch.Tensor, margin: float = 0.1
) -> torch.Tensor:
    """Hinge rank loss of Frome et al. (2013), averaged over the batch.

    pred (B, D) and class_vectors (C, D) L2-normalised; targets (B,) class indices.
    loss_i = sum_{j != t_i} max(0, margin - s(i, t_i) + s(i, j)) with s the dot product, so the
    negatives are all the other classes' vectors.
    """
    scores = pred @ class_vectors.T  # (B, C)
    true = scores.gather(1, targets[:, None])  # (B, 1)
    hinge = (margin - true + scores).clamp_min(0.0)
    hinge = hinge.masked_fill(F.one_hot(targets, scores.shape[1]).bool(), 0.0)
    return hinge.sum(dim=1).mean()


def cosine_loss(
    pred: torch.Tensor, class_vectors: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """The reference notebook's loss: 1 - cos(pred, target class vector), averaged.

    Same as torch.nn.CosineEmbeddingLoss with every pair labelled similar.
    """
    target_vecs = class_vectors[targets]
    return (1.0 - F.cosine_similarity(pred, target_vecs, dim=1)).mean()


LOSSES = {"rank": rank_loss, "cosine": cosine_loss}


def get_loss(name: str):
    """Loss function by name ('rank' or 'cosine')."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"Unknown loss {name!r}; choose 'rank' or 'cosine'.") from None
