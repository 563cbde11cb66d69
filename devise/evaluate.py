"""Evaluation against the DeViSE paper's tables: flat and zero-shot hit@k, calibrated generalized
zero-shot, retrieval P@10/mAP, with softmax and ConSE baselines on the same features."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from devise.config import EvalConfig
from devise.errors import DeviseError
from devise.metrics import (
    choose_gamma,
    generalized_zero_shot,
    hit_at_k,
    retrieval_metrics,
)
from devise.similarity import normalize_rows

log = logging.getLogger(__name__)
KS = (1, 2, 5, 10)
# The model's default scorer when it blends DeViSE with its backbone's ConSE (HeadSpec).
COMBINED = "DeViSE+ConSE"
METHODS = ("softmax", "ConSE", "DeViSE", COMBINED)


class EvalError(DeviseError, ValueError):
    """An evaluation that cannot run as asked; str() says what to do."""


# ---------------------------------------------------------------------------------------------
# Scores: image representations against class vectors


def conse_embeddings(
    logits: np.ndarray, label_vectors: np.ndarray, known: np.ndarray, top: int = 10
) -> np.ndarray:
    """ConSE (Norouzi et al. 2014): the convex combination of the word vectors of the top-T
    ImageNet classes, weighted by their softmax probabilities. No training.

    logits (N, 1000); label_vectors (1000, D) L2-normalised (rows of unknown names ignored);
    known (1000,) bool. Returns (N, D) L2-normalised.
    """
    probs = torch.from_numpy(logits).float().softmax(dim=1).numpy()
    probs[:, ~known] = 0.0
    idx = np.argpartition(-probs, top - 1, axis=1)[:, :top]
    weights = np.take_along_axis(probs, idx, axis=1)
    weights = weights / np.maximum(weights.sum(axis=1, keepdims=True), 1e-12)
    emb = np.einsum("nt,ntd->nd", weights, label_vectors[idx])
    return normalize_rows(emb)


def fit_softmax(
    x: np.ndarray, y: np.ndarray, num_classes: int, epochs: int = 300, seed: int = 0
) -> torch.nn.Module:
    """The softmax baseline: a linear classifier on standardised features, full-batch Adam with
    weight decay. x (N, F), y (N,) -> model mapping (N, F) float32 -> logits (N, C)."""
    torch.manual_seed(seed)
    xt = torch.from_numpy(np.asarray(x, dtype=np.float32))
    mean, std = xt.mean(0), xt.std(0).clamp_min(1e-6)
    model = torch.nn.Sequential(_Standardize(mean, std), torch.nn.Linear(xt.shape[1], num_classes))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model.eval()


class _Standardize(torch.nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@dataclass
class TrainRecipe:
    """How the real head was trained (RUN_DIR/config.json), so the auxiliary head matches it."""

    epochs: int = 15
    lr: float = 1e-3
    batch_size: int = 128  # the effective batch: per-worker batch x Ray Train workers
    weight_decay: float = 0.0
    loss: str = "rank"
    margin: float = 0.1

    @classmethod
    def of_model(cls, model_dir: str | Path) -> tuple[TrainRecipe, str]:
        """The recipe of the run that wrote model_dir, and where it came from."""
        path = Path(model_dir).expanduser().parent / "config.json"
        try:
            cfg = json.loads(path.read_text())["config"]
            recipe = cls(
                epochs=int(cfg["epochs"]),
                lr=float(cfg["lr"]),
                batch_size=int(cfg["batch_size"]) * max(1, int(cfg.get("num_workers") or 1)),
                weight_decay=float(cfg.get("weight_decay") or 0.0),
                loss=str(cfg.get("loss") or "rank"),
                margin=float(cfg.get("margin") or 0.1),
            )
            return recipe, str(path)
        except (OSError, ValueError, KeyError, TypeError):
            return cls(), "defaults (no readable run config.json next to the model)"


def fit_aux_head(
    spec,
    x: np.ndarray,
    y: np.ndarray,
    class_matrix: np.ndarray,
    epochs: int,
    seed: int = 0,
    recipe: TrainRecipe | None = None,
):
    """A head like the model's (same kind and dropout) trained in-process on cached features
    with the real run's recipe (optimizer settings, batch, loss, margin) for `epochs` epochs.

    Used only to choose the calibration constant on pseudo-unseen classes of the training split.
    """
    from dataclasses import replace

    from devise.losses import get_loss
    from devise.model import DeviseHead

    recipe = recipe or TrainRecipe()
    torch.manual_seed(seed)
    head = DeviseHead(replace(spec, class_keys=[], class_names=[], conse_classes=0))
    xt = torch.from_numpy(np.asarray(x, dtype=np.float32))
    head.set_feature_stats(xt.mean(0), xt.std(0))
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    cm = torch.from_numpy(class_matrix.astype(np.float32))
    opt = torch.optim.Adam(head.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    loss_fn = get_loss(recipe.loss)
    kwargs = {"margin": recipe.margin} if recipe.loss == "rank" else {}
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        head.train()
        for idx in torch.randperm(len(xt), generator=gen).split(recipe.batch_size):
            opt.zero_grad()
            loss_fn(head(xt[idx]), cm, yt[idx], **kwargs).backward()
            opt.step()
    return head.eval()


def _embed(head, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return head(torch.from_numpy(np.asarray(x, dtype=np.float32))).numpy()


# ---------------------------------------------------------------------------------------------
# The evaluation


def _class_matrix(keys, names, space, wording="name") -> tuple[list[str], list[str], np.ndarray]:
    from devise.labels import ClassInfo, class_vectors, describe

    infos = describe([ClassInfo(k, [n]) for k, n in zip(keys, names)])
    cv = class_vectors(infos, space, wording=wording)
    return list(cv.keys), list(cv.names), cv.matrix


GAMMA_GRID = np.linspace(-0.5, 1.0, 301)


def _choose_gamma_on_training_split(spec, fs, train_keys, class_matrix, config, conse=None) -> dict:
    """Calibrated stacking's constant, chosen on the training split only.

    Each of `calibration_draws` draws holds out a different random set of training classes as
    pseudo-unseen, trains an auxiliary head on the rest (80% of their rows) exactly like the
    real head (the run's epochs, optimizer, batch, loss), and scores the other 20% plus the
    pseudo-unseen rows. The H curves over gamma are averaged across draws and gamma is their
    argmax: one draw's optimum depends on which classes happened to be held out. With
    `conse` (features -> ConSE embedding) the model's blend of both gets its own constant
    ("gamma_combined"), from the auxiliary head blended with ConSE at spec.conse_weight."""
    n_classes = len(train_keys)
    p = config.pseudo_unseen or max(1, round(0.2 * n_classes))
    if n_classes - p < 2:
        return {"gamma": 0.0, "note": "too few training classes to calibrate"}
    recipe, recipe_source = TrainRecipe.of_model(config.model)
    epochs = config.aux_epochs or recipe.epochs
    train = fs.select(splits=["train"], views=[0])
    key_index = {k: i for i, k in enumerate(train_keys)}
    targets = np.array([key_index.get(k, -1) for k in train.labels])
    keep = targets >= 0
    curves, curves_combined, draws = [], [], []
    w = float(spec.conse_weight)

    def h_curve(scores, val_rows, is_pseudo, unseen_classes):
        return np.array(
            [
                generalized_zero_shot(
                    scores, targets[val_rows], is_pseudo[val_rows], unseen_classes, g
                )["H"]
                for g in GAMMA_GRID
            ]
        )

    for d in range(max(1, config.calibration_draws)):
        rng = np.random.default_rng(config.seed + 7919 * d)
        pseudo = set(rng.choice(train_keys, size=p, replace=False).tolist())
        is_pseudo = np.array([k in pseudo for k in train.labels]) & keep
        fit_rows = keep & ~is_pseudo & (rng.random(len(targets)) < 0.8)
        val_rows = keep & ~fit_rows
        seen_idx = [key_index[k] for k in train_keys if k not in pseudo]
        remap = {c: i for i, c in enumerate(seen_idx)}
        head = fit_aux_head(
            spec,
            train.features[fit_rows],
            np.array([remap[t] for t in targets[fit_rows]]),
            class_matrix[seen_idx],
            epochs,
            config.seed + d,
            recipe,
        )
        emb = _embed(head, train.features[val_rows])
        unseen_classes = np.array([k in pseudo for k in train_keys])
        curve = h_curve(emb @ class_matrix.T, val_rows, is_pseudo, unseen_classes)
        curves.append(curve)
        if conse is not None and 0 < w:
            both = normalize_rows((1 - w) * emb + w * conse(train.features[val_rows]))
            curves_combined.append(
                h_curve(both @ class_matrix.T, val_rows, is_pseudo, unseen_classes)
            )
        draws.append(
            {
                "pseudo_unseen": sorted(pseudo),
                "gamma": float(GAMMA_GRID[int(curve.argmax())]),
                "validation_rows": int(val_rows.sum()),
            }
        )
    mean_curve = np.mean(curves, axis=0)
    combined = {}
    if curves_combined:
        combined["gamma_combined"] = float(GAMMA_GRID[int(np.mean(curves_combined, 0).argmax())])
    return {
        "gamma": float(GAMMA_GRID[int(mean_curve.argmax())]),
        **combined,
        "draws": draws,
        "pseudo_unseen": draws[0]["pseudo_unseen"],
        "validation_rows": draws[0]["validation_rows"],
        "aux_epochs": epochs,
        "recipe": asdict(recipe),
        "recipe_source": recipe_source,
    }


def evaluate(config: EvalConfig) -> dict:
    """Run every measurement and write metrics.json, report.md and confusion.png to config.out.

    Features not in the cache yet are computed by the Ray Data pipeline (Ray must be
    initialised), or with config.local by the local executor in this process."""
    from devise.catalog import read_catalog
    from devise.features import extract_features
    from devise.model import load_model
    from devise.pipeline import PipelineConfig
    from devise.runtime import Resources, resolve_resources
    from devise.text import check_same_space, load_text_space

    head = load_model(config.model)
    spec = head.spec
    catalog = read_catalog(config.catalog)
    if "class_name" not in catalog.columns:
        catalog["class_name"] = catalog["label"]
    if not catalog["split"].isin(["test", "unseen"]).any():
        raise EvalError(
            f"Catalog {config.catalog} has no test or unseen rows, so there is nothing to "
            "evaluate; rebuild it with --test-fraction above 0 or --holdout."
        )
    vectors = load_text_space(spec.vectors)
    check_same_space(spec.vectors_id, vectors, f"Model {config.model}")
    res = Resources(
        config.num_workers, config.cpus_per_worker, config.decode_cpus, config.use_gpu,
        config.gpus_per_worker, config.batch_size, config.engine,
    )  # fmt: skip
    pipeline = PipelineConfig(**resolve_resources(res).as_kwargs())
    fs = extract_features(
        catalog, spec.backbone, spec.backbone_weights, spec.image_size, 0,
        config.feature_cache, config.seed, pipeline, local=config.local,
    )  # fmt: skip

    seen_keys = list(spec.class_keys)
    names = catalog.groupby("label")["class_name"].first().to_dict()
    unseen_keys = sorted(set(catalog.loc[catalog["split"] == "unseen", "label"]) - set(seen_keys))
    wording = spec.class_text
    seen_keys, seen_names, seen_matrix = _class_matrix(
        seen_keys, [names.get(k, n) for k, n in zip(seen_keys, spec.class_names)], vectors, wording
    )
    if unseen_keys:
        unseen_keys, unseen_names, unseen_matrix = _class_matrix(
            unseen_keys, [names[k] for k in unseen_keys], vectors, wording
        )
    else:
        unseen_names, unseen_matrix = [], np.zeros((0, seen_matrix.shape[1]), np.float32)
    all_keys = seen_keys + unseen_keys
    all_names = seen_names + unseen_names
    all_matrix = np.concatenate([seen_matrix, unseen_matrix])
    key_index = {k: i for i, k in enumerate(all_keys)}
    unseen_classes = np.arange(len(all_keys)) >= len(seen_keys)

    test = fs.select(splits=["test"], views=[0])
    unseen = fs.select(splits=["unseen"], views=[0])
    train = fs.select(splits=["train"], views=[0])
    t_test = np.array([key_index.get(k, -1) for k in test.labels])
    t_unseen = np.array([key_index.get(k, -1) for k in unseen.labels])
    test_ok, unseen_ok = t_test >= 0, t_unseen >= 0

    counts = {
        "train_images": len(train),
        "test_images": int(test_ok.sum()),
        "unseen_images": int(unseen_ok.sum()),
        "seen_classes": len(seen_keys),
        "unseen_classes": len(unseen_keys),
        "decode_errors": len(fs.errors),
    }
    log.info("Evaluating on %s", counts)

    # Representations of each method: (N, D) in the word space, or None where it has none.
    reps: dict[str, dict[str, np.ndarray | None]] = {}
    reps["DeViSE"] = {
        "test": _embed(head.devise, test.features),
        "unseen": _embed(head.devise, unseen.features),
    }
    conse_note = ""
    conse_fn = None
    if spec.conse_classes:
        # The model's own ConSE branch: its classifier and its labels in the model's wording.

        def conse_fn(x):
            return _embed(head.conse, x)

        reps["ConSE"] = {
            "test": conse_fn(test.features),
            "unseen": conse_fn(unseen.features),
            "train": conse_fn(train.features),
        }
        known = int(head.label_known.sum())
        conse_note = (
            f"{known}/{spec.conse_classes} ImageNet classes have a vector in {vectors.id} "
            f"(worded as {wording})"
        )
    if spec.conse_classes and spec.conse_weight > 0:
        reps[COMBINED] = {
            "test": _embed(head, test.features),
            "unseen": _embed(head, unseen.features),
        }
    if not spec.conse_classes:
        reps["ConSE"], conse_note = _conse_from_backbone(spec, vectors, config, test, unseen, train)

    softmax = fit_softmax(
        train.features[[k in key_index for k in train.labels]],
        np.array([key_index[k] for k in train.labels if k in key_index]),
        len(seen_keys),
        seed=config.seed,
    )
    with torch.no_grad():
        softmax_test = softmax(torch.from_numpy(test.features.astype(np.float32))).numpy()

    rows: dict[str, dict] = {}
    default_method = COMBINED if COMBINED in reps else "DeViSE"
    gamma_info = _choose_gamma_on_training_split(spec, fs, seen_keys, seen_matrix, config, conse_fn)
    gammas = {
        "DeViSE": gamma_info["gamma"],
        "ConSE": 0.0,
        COMBINED: gamma_info.get("gamma_combined", 0.0),
    }
    if reps["ConSE"]["test"] is not None and gamma_info.get("pseudo_unseen"):
        # ConSE has no training: its constant is chosen on the training split's images directly,
        # with the same pseudo-unseen classes.
        t_train = np.array([key_index.get(k, -1) for k in train.labels])
        ok = t_train >= 0
        pseudo = np.isin(np.array(seen_keys), gamma_info["pseudo_unseen"])
        gammas["ConSE"] = choose_gamma(
            reps["ConSE"]["train"][ok] @ seen_matrix.T, t_train[ok], pseudo[t_train[ok]], pseudo
        )
    concepts = _concepts(all_keys, all_names, config.concepts)
    methods = [("softmax", None), ("ConSE", reps["ConSE"]), ("DeViSE", reps["DeViSE"])]
    if COMBINED in reps:
        methods.append((COMBINED, reps[COMBINED]))
    for method, rep in methods:
        row: dict = {}
        if method == "softmax":
            row["flat"] = hit_at_k(softmax_test[test_ok], t_test[test_ok], KS)
            rows[method] = row
            continue
        if rep["test"] is None:
            rows[method] = {"note": conse_note}
            continue
        row["flat"] = hit_at_k(rep["test"][test_ok] @ seen_matrix.T, t_test[test_ok], KS)
        if unseen_keys:
            zs_scores = rep["unseen"][unseen_ok] @ unseen_matrix.T
            row["zero_shot"] = hit_at_k(zs_scores, t_unseen[unseen_ok] - len(seen_keys), KS)
            row["generalized_hit"] = hit_at_k(
                rep["unseen"][unseen_ok] @ all_matrix.T, t_unseen[unseen_ok], KS
            )
            both = np.concatenate([rep["test"][test_ok], rep["unseen"][unseen_ok]])
            targets = np.concatenate([t_test[test_ok], t_unseen[unseen_ok]])
            is_unseen = np.arange(len(targets)) >= test_ok.sum()
            scores = both @ all_matrix.T
            row["gzsl"] = generalized_zero_shot(scores, targets, is_unseen, unseen_classes, 0.0)
            row["gzsl_calibrated"] = generalized_zero_shot(
                scores, targets, is_unseen, unseen_classes, gammas[method]
            )
            # Retrieval: each class name queries the embedded test + unseen images.
            row["retrieval"] = retrieval_metrics(
                all_matrix @ both.T, targets[None, :] == np.arange(len(all_keys))[:, None], 10
            )
            if concepts:
                row["concepts"] = _concept_precision(concepts, vectors, both, targets)
            if method == default_method:
                for gamma, name, title in (
                    (0.0, "confusion.png", "uncalibrated (raw cosine, γ = 0)"),
                    (
                        gammas[method],
                        "confusion_calibrated.png",
                        f"calibrated stacking (seen scores − γ, γ = {gammas[method]:.3f})",
                    ),
                ):
                    _confusion_png(
                        scores - gamma * (~unseen_classes)[None, :],
                        targets,
                        all_names,
                        unseen_classes,
                        Path(config.out) / name,
                        title,
                    )
        rows[method] = row

    report = {
        "model": str(config.model),
        "catalog": str(config.catalog),
        "backbone": spec.backbone,
        "image_size": spec.image_size,
        "head": spec.kind,
        "vectors": vectors.id,
        "counts": counts,
        "seen_classes": seen_names,
        "unseen_classes": unseen_names,
        "calibration": gamma_info,
        "conse": conse_note,
        "class_text": spec.class_text,
        "conse_weight": float(spec.conse_weight) if spec.conse_classes else 0.0,
        "default_method": default_method,
        "methods": rows,
        "config": asdict(config),
    }
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2, default=_json_default))
    (out / "report.md").write_text(markdown_report(report))
    return report


def _conse_from_backbone(spec, vectors, config, test, unseen, train) -> tuple[dict, str]:
    """ConSE for a model without its own branch: the backbone's classifier and the ImageNet
    class names in the text space."""
    try:
        from devise.backbones import imagenet_categories, load_backbone
        from devise.engines import OnnxBackbone, choose_engine

        if choose_engine(config.engine, config.use_gpu).name == "onnx":
            backbone = OnnxBackbone(spec.backbone, spec.backbone_weights, images=False)
            classify = backbone.classify
        else:
            backbone = load_backbone(spec.backbone, spec.backbone_weights)

            def classify(x: np.ndarray) -> np.ndarray:
                with torch.no_grad():
                    return backbone.classify(torch.from_numpy(x)).numpy()

        cats = imagenet_categories()
        known = np.array([vectors.has_vector(c) for c in cats])
        label_vectors = np.zeros((len(cats), vectors.dim), np.float32)
        label_vectors[known] = vectors.encode([c for c, k in zip(cats, known) if k])

        def conse(x):
            logits = classify(np.ascontiguousarray(x, dtype=np.float32))
            return conse_embeddings(logits, label_vectors, known, config.conse_top)

        rep = {"test": conse(test.features), "unseen": conse(unseen.features)}
        rep["train"] = conse(train.features)
        note = f"{int(known.sum())}/{len(cats)} ImageNet class names have a vector in {vectors.id}"
        return rep, note
    except Exception as e:  # noqa: BLE001 -- e.g. the test backbone has no ImageNet classifier
        return {"test": None, "unseen": None}, f"ConSE not available: {e}"


# Everyday words that name a group of classes; each is scored where it covers two or more of
# the evaluated classes (WordNet hyponyms). Not "container": WordNet files every wheeled vehicle
# under it, which is not what a person searching for containers means.
CONCEPT_WORDS = (
    "dog", "cat", "bird", "fish", "insect", "monkey", "snake", "fruit", "vegetable", "vehicle",
    "boat", "bridge", "building", "clothing", "footwear", "furniture", "kitchen utensil",
    "musical instrument", "tool",
)  # fmt: skip


def _concepts(keys: list[str], names: list[str], words) -> dict[str, np.ndarray]:
    """Group word -> (C,) bool: which evaluated classes it covers (WordNet hyponyms). A class is
    placed in WordNet by its wnid, or by the noun its name names."""
    from devise import wordnet

    synsets = [k if wordnet.is_wnid(k) else wordnet.noun_for_name(n) for k, n in zip(keys, names)]
    known = [s for s in synsets if s]
    out = {}
    for word in words if words is not None else CONCEPT_WORDS:
        concept = wordnet.concept_for(word, known)
        if concept is not None:
            out[word] = np.array([bool(s) and wordnet.covers(concept, s) for s in synsets])
    return out


def _concept_precision(concepts: dict, space, images: np.ndarray, targets: np.ndarray) -> dict:
    """Each group word as a query over the images: P@10 (an image counts when its class is a
    hyponym), per word and their mean, in percent."""
    words = [w for w in concepts if space.has_vector(w)]
    if not words:
        return {}
    sims = space.encode(words) @ images.T
    per = {}
    for i, word in enumerate(words):
        top = np.argsort(-sims[i], kind="stable")[:10]
        per[word] = float(100.0 * concepts[word][targets[top]].mean())
    return {"P@10": float(np.mean(list(per.values()))), "per_word": per}


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


def _confusion_png(scores, targets, names, unseen_classes, out: Path, how: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    pred = scores.argmax(axis=1)
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (targets, pred), 1)
    frac = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.6 * n))
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    labels = [f"{m}*" if u else m for m, u in zip(names, unseen_classes)]
    ax.set_xticks(range(n), labels, rotation=60, ha="right")
    ax.set_yticks(range(n), labels)
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(
                    j,
                    i,
                    cm[i, j],
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if frac[i, j] > 0.5 else "black",
                )
    ax.set_xlabel("predicted (among all classes)")
    ax.set_ylabel("true class (* = held out, never trained on)")
    ax.set_title(f"DeViSE confusion, test + held-out images:\n{how}", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _fmt(x) -> str:
    return "—" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.1f}"


def markdown_report(report: dict) -> str:
    """The paper-style tables as markdown."""
    c = report["counts"]
    lines = [
        (
            f"Backbone {report['backbone']} at {report['image_size']} px, {report['head']} head, "
            f"text space {report['vectors']}. {c['train_images']} train, {c['test_images']} test "
            f"and {c['unseen_images']} unseen images; {c['seen_classes']} training classes, "
            f"{c['unseen_classes']} held out ({', '.join(report['unseen_classes']) or 'none'})."
        ),
        "",
        (
            "| method | flat hit@1 | @2 | @5 | @10 | zero-shot hit@1 | @2 | @5 | @10 | P@10 | mAP "
            "| group words P@10 |"
        ),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    methods = [m for m in METHODS if m in report["methods"]]
    for method in methods:
        row = report["methods"].get(method, {})
        flat = [row.get("flat", {}).get(f"hit@{k}") for k in KS]
        zs = [row.get("zero_shot", {}).get(f"hit@{k}") for k in KS]
        ret = row.get("retrieval", {})
        cells = [*flat, *zs, ret.get("P@10"), ret.get("mAP"), row.get("concepts", {}).get("P@10")]
        name = f"**{method}** (default)" if method == report.get("default_method") else method
        lines.append(f"| {name} | " + " | ".join(_fmt(x) for x in cells) + " |")
    lines += [
        "",
        (
            "Flat hit@k: test images of the training classes, nearest among the training classes. "
            "Zero-shot (DeViSE-0): held-out images among the held-out classes only. "
            "P@10 and mAP: each class's text as a search query over the test and held-out "
            'images. Group words: everyday words that name several classes ("bird", '
            '"vehicle"), an image counting when WordNet puts its class under the word.'
        ),
        "",
        "Generalized zero-shot (test + held-out images among all classes; per-class top-1):",
        "",
        "| method | calibration | seen | unseen | H |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for method in methods[1:]:
        row = report["methods"].get(method, {})
        for key, label in (("gzsl", "none"), ("gzsl_calibrated", "calibrated stacking")):
            g = row.get(key)
            if g:
                lbl = label if key == "gzsl" else f"{label}, γ = {g['gamma']:.3f}"
                lines.append(
                    f"| {method} | {lbl} | {_fmt(g['seen'])} | {_fmt(g['unseen'])} | "
                    f"{_fmt(g['H'])} |"
                )
    cal = report["calibration"]
    if cal.get("draws"):
        optima = ", ".join(f"{d['gamma']:.2f}" for d in cal["draws"])
        lines += [
            "",
            (
                f"γ was chosen on the training split only: in each of {len(cal['draws'])} draws "
                f"{len(cal['draws'][0]['pseudo_unseen'])} training classes were held out as "
                f"pseudo-unseen and an auxiliary head was trained on the rest like the real one "
                f"({cal['aux_epochs']} epochs, recipe from {Path(cal['recipe_source']).name}); "
                f"γ maximises the mean H over the draws (per-draw optima "
                f"{optima}). ConSE, which has no "
                "training, takes its γ from the training images with the first draw's classes."
            ),
        ]
    if report.get("conse"):
        lines += ["", f"ConSE: {report['conse']}."]
    lines += [
        "",
        (
            f"Class text: {report.get('class_text', 'name')}; the default scorer blends ConSE in "
            f"with weight {report.get('conse_weight', 0.0):.1f} (both chosen on pseudo-unseen "
            "training classes when training)."
        ),
    ]
    per = report["methods"].get(report.get("default_method"), {}).get("concepts", {})
    if per.get("per_word"):
        words = ", ".join(f"{w} {p / 10:.0f}/10" for w, p in per["per_word"].items())
        lines += ["", f"Group words, {report.get('default_method')} top 10: {words}."]
    return "\n".join(lines) + "\n"


def run_cli(args: argparse.Namespace) -> int:
    """`devise evaluate` (flags: devise/commands/evaluate.py)."""
    from devise.commands.common import resources_from_args
    from devise.runtime import init_ray, resolve_resources

    if not Path(args.model).exists():
        raise EvalError(f"Model folder {args.model} does not exist; train one with `devise train`.")
    from devise.fsutil import check_output_dir

    check_output_dir(args.out, "--out")  # before Ray and the model: a bad folder wastes nothing
    if not args.local:
        init_ray(args.address)
    config = EvalConfig(
        model=args.model, catalog=args.catalog, out=args.out, feature_cache=args.feature_cache,
        conse_top=args.conse_top, pseudo_unseen=args.pseudo_unseen,
        calibration_draws=args.calibration_draws, seed=args.seed,
        address=args.address, local=args.local,
        **resolve_resources(resources_from_args(args)).as_kwargs(),
    )  # fmt: skip
    report = evaluate(config)
    print((Path(args.out) / "report.md").read_text())
    print(
        f"Wrote {Path(args.out) / 'metrics.json'}, report.md, confusion.png (uncalibrated) and "
        "confusion_calibrated.png"
    )
    return 0 if report else 1
