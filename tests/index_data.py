"""A small searchable embeddings folder for the API, service and page tests: real images, a real
(tiny) model whose linear head is fitted so each class lands on its word vector, and a committed
version embedded with that model. Text, image and similar-image queries all have known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from conftest import TINY_CLASSES, write_class_tree, write_vec

VEC_WORDS = ["cat", "dog", "car", "ship", "ankle", "boot", "shoe", "bridge", "kitten", "the"]


def make_searchable(root: Path, per_class: int = 4) -> dict:
    """root/tiny.vec, root/images (5 classes x per_class), root/model, root/emb (one committed
    version). Returns {emb, model, images, paths, labels, vectors}."""
    import torch

    from devise.api import _ImageEncoder
    from devise.backbones import backbone_info, load_backbone, prepare_transform
    from devise.images import decode_image
    from devise.model import DeviseHead, HeadSpec, model_id, save_model
    from devise.store import Store
    from devise.vectors import load_vectors

    vec_file = root / "tiny.vec"
    write_vec(vec_file, VEC_WORDS, dim=8, seed=1)
    images = write_class_tree(root / "images", per_class)
    paths = sorted(str(p) for p in images.glob("*/*.png"))
    labels = [Path(p).parent.name for p in paths]
    wv = load_vectors(vec_file)
    spec = HeadSpec(
        in_dim=64, out_dim=wv.dim, kind="linear", dropout=0.0, backbone="tiny", image_size=32,
        vectors=str(vec_file), vectors_id=wv.vectors_id, class_names=list(TINY_CLASSES),
    )  # fmt: skip
    transform = prepare_transform(backbone_info("tiny"), 32)
    x = torch.from_numpy(np.stack([transform(decode_image(p)) for p in paths]))
    with torch.no_grad():
        feats = load_backbone("tiny")(x).float()
    # Each image: its class's word vector plus its own small offset (no two rows tie).
    rng = np.random.default_rng(0)
    targets = np.stack([wv.lookup(label) for label in labels])
    targets /= np.linalg.norm(targets, axis=1, keepdims=True)
    targets += 0.25 * rng.normal(size=targets.shape) / np.sqrt(targets.shape[1])
    head = DeviseHead(spec).eval()
    mean, std = feats.mean(0), feats.std(0).clamp_min(1e-6)
    head.set_feature_stats(mean, std)
    z = ((feats - mean) / std).numpy()
    design = np.hstack([z, np.ones((len(z), 1), np.float32)])
    coef, *_ = np.linalg.lstsq(design, targets, rcond=None)  # (65, D): each class -> its word
    linear = head.net[1]
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(coef[:-1].T.copy()))
        linear.bias.copy_(torch.from_numpy(coef[-1].copy()))
    model = save_model(root / "model", head)
    embeddings = _ImageEncoder(model)(paths)
    emb = root / "emb"
    Store.open(emb, create=True).write_version(
        pd.DataFrame({"path": paths, "label": labels, "class_name": labels}),
        embeddings,
        model_id=model_id(model),
        vectors=str(vec_file),
        vectors_id=wv.vectors_id,
        extra={"model_dir": str(model)},
    )
    return {
        "emb": emb, "model": model, "images": images, "paths": paths, "labels": labels,
        "vectors": vec_file,
    }  # fmt: skip
