"""What a training run learns from: the catalog rows it uses, its classes put into words and
encoded, the feature arrays Ray Train's workers read, and the class text and ConSE weight
chosen on pseudo-unseen training classes (devise.selection)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from devise.backbones import backbone_info
from devise.config import TrainConfig
from devise.model import DeviseHead, HeadSpec
from devise.runs import TrainError
from devise.train_loops import Rows


def select_rows(
    catalog: pd.DataFrame, max_train_per_class: int | None = None, seed: int = 0
) -> pd.DataFrame:
    """The catalog rows a run uses: all test and unseen rows, and the train rows, at most
    max_train_per_class a class (a seeded sample, the same on every rerun)."""
    catalog = catalog.sort_values("path", kind="stable").reset_index(drop=True)
    if max_train_per_class is None:
        return catalog
    train = catalog[catalog["split"] == "train"]
    rng = np.random.default_rng(seed)
    picked = []
    for _, idx in sorted(train.groupby("label").indices.items()):
        if len(idx) > max_train_per_class:
            idx = np.sort(rng.choice(idx, size=max_train_per_class, replace=False))
        picked.append(idx)
    keep = train.iloc[np.concatenate(picked)]
    rest = catalog[catalog["split"] != "train"]
    return pd.concat([keep, rest]).sort_values("path", kind="stable").reset_index(drop=True)


def training_classes(
    catalog: pd.DataFrame,
    vectors,
    wording: str = "name",
    texts: dict[str, str] | None = None,
) -> Any:
    """ClassVectors of the classes with training rows (never the held-out `unseen` ones), each
    worded as `wording` says (labels.WORDINGS) from its names and description (labels.describe;
    texts: the user's --class-text descriptions).

    Classes without a vector in the text space are excluded with a warning
    (labels.class_vectors)."""
    from devise.labels import class_vectors

    try:
        found = class_vectors(training_class_infos(catalog, texts), vectors, wording=wording)
    except ValueError as e:
        raise TrainError(str(e)) from None
    if len(found.keys) < 2:
        raise TrainError(
            f"Only one training class ({', '.join(found.names)}) has a word "
            "vector; training needs at least two (check --holdout and the vectors)."
        )
    return found


def training_class_infos(catalog: pd.DataFrame, texts: dict[str, str] | None = None) -> list:
    """The described classes (labels.ClassInfo) with training rows, sorted by key."""
    from devise.labels import ClassInfo, describe

    train = catalog[catalog["split"] == "train"]
    if train.empty:
        raise TrainError("The catalog has no training rows (split 'train'); rebuild it.")
    names = train.groupby("label", sort=True)["class_name"].first()
    return describe([ClassInfo(str(k), [str(n)]) for k, n in names.items()], texts)


def class_texts(config: TrainConfig) -> dict[str, str] | None:
    from devise.labels import read_class_text

    if not config.class_text_file:
        return None
    try:
        return read_class_text(config.class_text_file)
    except ValueError as e:
        raise TrainError(str(e)) from None


def read_inputs(config: TrainConfig):
    from devise.catalog import read_catalog
    from devise.text import load_text_space

    if not Path(config.catalog).expanduser().exists():
        raise TrainError(
            f"Catalog {config.catalog} does not exist; build one with `devise catalog ROOT`."
        )
    catalog = read_catalog(Path(config.catalog).expanduser())
    if "class_name" not in catalog.columns:
        catalog["class_name"] = catalog["label"]
    catalog = select_rows(catalog, config.max_train_per_class, config.seed)
    vectors = load_text_space(config.vectors)
    wording = "name" if config.class_text == "auto" else config.class_text
    classes = training_classes(catalog, vectors, wording, class_texts(config))
    return catalog, vectors, classes


def feature_arrays(fs, classes) -> dict[str, dict[str, np.ndarray]]:
    """{"train": all views, "test": view 0} of the training classes' rows, each as columns
    feature (N, F) float16 and target (N,) int64 (the class's row in classes.matrix)."""
    index = {k: i for i, k in enumerate(classes.keys)}

    def build(mask: np.ndarray) -> dict[str, np.ndarray]:
        mask = mask & np.isin(fs.labels, classes.keys)
        x = np.asarray(fs.features[mask], dtype=np.float16)
        y = np.array([index[k] for k in fs.labels[mask]], dtype=np.int64)
        return {"feature": x, "target": y}

    return {
        "train": build(fs.mask(splits=["train"])),
        "test": build(fs.mask(splits=["test"], views=[0])),
    }


def ray_datasets(arrays: dict[str, dict[str, np.ndarray]], num_workers: int) -> dict:
    """The feature arrays as Ray Datasets, each split into many blocks so every worker gets a
    share."""
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    out = {}
    for name, cols in arrays.items():
        x, y = cols["feature"], cols["target"]
        blocks = max(1, min(len(y), 4 * num_workers))
        tables = [
            pa.table({"feature": ArrowTensorArray.from_numpy(x[part]), "target": pa.array(y[part])})
            for part in np.array_split(np.arange(len(y)), blocks)
        ]
        out[name] = ray.data.from_arrow(tables)
    return out


def catalog_rows(catalog: pd.DataFrame, split: str, classes) -> Rows:
    index = {k: i for i, k in enumerate(classes.keys)}
    part = catalog[(catalog["split"] == split) & catalog["label"].isin(index)]
    return Rows(part["path"].tolist(), [index[k] for k in part["label"]])


def choose_class_text(config, catalog, vectors, classes, x_train, arrays):
    """How classes are worded and how much ConSE is blended in (selection.plan): the given
    settings, or "auto" chosen on pseudo-unseen training classes. Returns the choice and the
    classes re-encoded in the chosen wording (the same keys, so feature arrays stay valid)."""
    from devise.evaluate import TrainRecipe, _embed, fit_aux_head
    from devise.labels import ClassVectors
    from devise.selection import classifier_labels, plan

    info = backbone_info(config.backbone)
    spec = HeadSpec(
        in_dim=info.feature_dim, out_dim=int(classes.matrix.shape[1]), kind=config.head,
        dropout=config.dropout,
    )  # fmt: skip
    recipe = TrainRecipe(
        epochs=config.epochs, lr=config.lr, batch_size=config.batch_size * config.resources.num_workers,
        weight_decay=config.weight_decay, loss=config.loss, margin=config.margin,
    )  # fmt: skip

    def fit_head(x, y, class_matrix, seed):
        head = fit_aux_head(spec, x, y, class_matrix, recipe.epochs, seed, recipe)
        return lambda rows: _embed(head, rows)

    labels = classifier_labels(config.backbone, config.weights)
    targets = None if arrays is None else arrays["train"]["target"]
    try:
        choice, chosen = plan(
            config.class_text, config.conse_weight, training_class_infos(catalog, class_texts(config)),
            classes.keys, vectors, labels, x_train, targets, fit_head, config.seed,
        )  # fmt: skip
    except ValueError as e:
        raise TrainError(str(e)) from None
    if choice.table:
        print(
            f"Class text: {choice.wording}; ConSE weight {choice.conse_weight:.1f} "
            f"(chosen on pseudo-unseen training classes, H {choice.h:.1f})",
            flush=True,
        )
    cv = ClassVectors(
        list(classes.keys), list(classes.names), chosen.class_matrix, list(classes.missing),
        labels, chosen.label_vectors,
    )  # fmt: skip
    return choice, cv


def with_conse(spec: HeadSpec, state: dict, classes) -> DeviseHead:
    """The trained head, with the ConSE branch filled when the backbone has a classifier."""
    labels = classes.labels
    if labels is not None:
        spec.conse_classes = len(labels.infos)
    head = DeviseHead(spec)
    head.load_state_dict(state, strict=labels is None)
    if labels is not None:
        head.set_conse(
            torch.from_numpy(labels.weight),
            torch.from_numpy(labels.bias),
            torch.from_numpy(classes.label_vectors),
        )
    return head.eval()
