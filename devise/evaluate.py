"""Evaluation against the DeViSE paper's tables: flat and zero-shot hit@k, calibrated generalized
zero-shot, retrieval P@10/mAP, with softmax and ConSE baselines on the same features."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from devise.config import EvalConfig, PipelineConfig
from devise.errors import DeviseError
from devise.metrics import (
    KS,
    choose_gamma,
    generalized_zero_shot,
    hit_at_k,
    retrieval_metrics,
)
from devise.report import COMBINED, confusion_png, write_report
from devise.similarity import normalize_rows

log = logging.getLogger(__name__)


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
                batch_size=int(cfg["batch_size"]) * max(1, _train_workers(cfg)),
                weight_decay=float(cfg.get("weight_decay") or 0.0),
                loss=str(cfg.get("loss") or "rank"),
                margin=float(cfg.get("margin") or 0.1),
            )
            return recipe, str(path)
        except (OSError, ValueError, KeyError, TypeError):
            return cls(), "defaults (no readable run config.json next to the model)"


def _train_workers(cfg: dict) -> int:
    """The Train workers a run's config.json names (its resources; older runs: at the top)."""
    res = cfg.get("resources") or {}
    return int(res.get("num_workers") or cfg.get("num_workers") or 1)


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


@dataclass
class _Classes:
    """The evaluated classes: seen (the model's) first, then unseen, with their vectors."""

    seen_keys: list[str]
    seen_names: list[str]
    seen_matrix: np.ndarray
    unseen_keys: list[str]
    unseen_names: list[str]
    unseen_matrix: np.ndarray

    @cached_property
    def keys(self) -> list[str]:
        return self.seen_keys + self.unseen_keys

    @cached_property
    def names(self) -> list[str]:
        return self.seen_names + self.unseen_names

    @cached_property
    def matrix(self) -> np.ndarray:
        return np.concatenate([self.seen_matrix, self.unseen_matrix])

    @cached_property
    def is_unseen(self) -> np.ndarray:
        """(C,) bool over keys: the held-out classes."""
        return np.arange(len(self.keys)) >= len(self.seen_keys)

    @cached_property
    def _rows(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.keys)}

    def targets(self, labels) -> np.ndarray:
        """Each label's row in keys, -1 for a class not evaluated."""
        return np.array([self._rows.get(k, -1) for k in labels])


def _classes(spec, catalog, vectors) -> _Classes:
    seen_keys = list(spec.class_keys)
    names = catalog.groupby("label")["class_name"].first().to_dict()
    unseen_keys = sorted(set(catalog.loc[catalog["split"] == "unseen", "label"]) - set(seen_keys))
    wording = spec.class_text
    seen_names = [names.get(k, n) for k, n in zip(seen_keys, spec.class_names)]
    seen = _class_matrix(seen_keys, seen_names, vectors, wording)
    if unseen_keys:
        unseen = _class_matrix(unseen_keys, [names[k] for k in unseen_keys], vectors, wording)
    else:
        unseen = ([], [], np.zeros((0, seen[2].shape[1]), np.float32))
    return _Classes(*seen, *unseen)


def _read(config: EvalConfig):
    """The model, the catalog, its text space and the backbone features of every row."""
    from devise.catalog import read_catalog
    from devise.features import extract_features
    from devise.model import load_model
    from devise.runtime import resolve_resources
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
    pipeline = PipelineConfig(resources=resolve_resources(config.resources))
    fs = extract_features(
        catalog, spec.backbone, spec.backbone_weights, spec.image_size, 0,
        config.feature_cache, config.seed, pipeline, local=config.local,
    )  # fmt: skip
    return head, catalog, vectors, fs


def _representations(head, vectors, config: EvalConfig, test, unseen, train):
    """Each method's image vectors in the word space (None where it has none), the note on
    ConSE's labels, and the model's ConSE function (None without its own branch)."""
    spec = head.spec
    reps: dict[str, dict[str, np.ndarray | None]] = {
        "DeViSE": {"test": _embed(head.devise, test.features), "unseen": _embed(head.devise, unseen.features)}
    }  # fmt: skip
    if not spec.conse_classes:
        reps["ConSE"], note = _conse_from_backbone(spec, vectors, config, test, unseen, train)
        return reps, note, None

    def conse_fn(x):  # the model's own ConSE branch, its labels in the model's wording
        return _embed(head.conse, x)

    reps["ConSE"] = {s: conse_fn(part.features) for s, part in (("test", test), ("unseen", unseen), ("train", train))}  # fmt: skip
    known = int(head.label_known.sum())
    note = (
        f"{known}/{spec.conse_classes} ImageNet classes have a vector in {vectors.id} "
        f"(worded as {spec.class_text})"
    )
    if spec.conse_weight > 0:
        reps[COMBINED] = {"test": _embed(head, test.features), "unseen": _embed(head, unseen.features)}  # fmt: skip
    return reps, note, conse_fn


def _softmax_scores(config: EvalConfig, classes: _Classes, train, t_train, test) -> np.ndarray:
    """The softmax baseline: a linear classifier over the seen classes, on the same features."""
    ok = t_train >= 0
    softmax = fit_softmax(train.features[ok], t_train[ok], len(classes.seen_keys), seed=config.seed)
    with torch.no_grad():
        return softmax(torch.from_numpy(test.features.astype(np.float32))).numpy()


def _gammas(
    config, spec, fs, classes: _Classes, reps: dict, t_train, conse_fn
) -> tuple[dict, dict]:
    """Calibrated stacking's γ per method, each chosen on the training split; (γs, details)."""
    seen = classes.seen_keys
    info = _choose_gamma_on_training_split(spec, fs, seen, classes.seen_matrix, config, conse_fn)
    gammas = {"DeViSE": info["gamma"], "ConSE": 0.0, COMBINED: info.get("gamma_combined", 0.0)}
    if reps["ConSE"]["test"] is not None and info.get("pseudo_unseen"):
        # ConSE has no training: its constant is chosen on the training split's images directly,
        # with the same pseudo-unseen classes.
        ok = t_train >= 0
        pseudo = np.isin(np.array(seen), info["pseudo_unseen"])
        gammas["ConSE"] = choose_gamma(
            reps["ConSE"]["train"][ok] @ classes.seen_matrix.T, t_train[ok], pseudo[t_train[ok]], pseudo
        )  # fmt: skip
    return gammas, info


def _score(rep: dict, classes: _Classes, t_test, t_unseen, gamma: float, concepts, vectors):
    """One method's row: flat hit@k, and with unseen classes zero-shot, generalized, GZSL,
    retrieval and group words; also the scores and targets of all evaluated images."""
    test_ok, unseen_ok = t_test >= 0, t_unseen >= 0
    row: dict = {
        "flat": hit_at_k(rep["test"][test_ok] @ classes.seen_matrix.T, t_test[test_ok], KS)
    }
    if not classes.unseen_keys:
        return row, None, None
    n_seen, matrix = len(classes.seen_keys), classes.matrix
    unseen_rep = rep["unseen"][unseen_ok]
    row["zero_shot"] = hit_at_k(
        unseen_rep @ classes.unseen_matrix.T, t_unseen[unseen_ok] - n_seen, KS
    )
    row["generalized_hit"] = hit_at_k(unseen_rep @ matrix.T, t_unseen[unseen_ok], KS)
    both = np.concatenate([rep["test"][test_ok], unseen_rep])
    targets = np.concatenate([t_test[test_ok], t_unseen[unseen_ok]])
    is_unseen = np.arange(len(targets)) >= test_ok.sum()
    scores = both @ matrix.T
    row["gzsl"] = generalized_zero_shot(scores, targets, is_unseen, classes.is_unseen, 0.0)
    row["gzsl_calibrated"] = generalized_zero_shot(
        scores, targets, is_unseen, classes.is_unseen, gamma
    )
    # Retrieval: each class name queries the embedded test + unseen images.
    relevant = targets[None, :] == np.arange(len(classes.keys))[:, None]
    row["retrieval"] = retrieval_metrics(matrix @ both.T, relevant, 10)
    if concepts:
        row["concepts"] = _concept_precision(concepts, vectors, both, targets)
    return row, scores, targets  # fmt: skip


def _draw_confusions(out: Path, scores, targets, classes: _Classes, gamma: float) -> None:
    """confusion.png (raw cosine) and confusion_calibrated.png (seen scores − γ)."""
    for g, name, title in (
        (0.0, "confusion.png", "uncalibrated (raw cosine, γ = 0)"),
        (gamma, "confusion_calibrated.png", f"calibrated stacking (seen scores − γ, γ = {gamma:.3f})"),
    ):  # fmt: skip
        shifted = scores - g * (~classes.is_unseen)[None, :]
        confusion_png(shifted, targets, classes.names, classes.is_unseen, out / name, title)


def evaluate(config: EvalConfig) -> dict:
    """Run every measurement and write metrics.json, report.md and confusion.png to config.out.

    Features not in the cache yet are computed by the Ray Data pipeline (Ray must be
    initialised), or with config.local by the local executor in this process."""
    head, catalog, vectors, fs = _read(config)
    spec = head.spec
    classes = _classes(spec, catalog, vectors)
    test, unseen, train = (fs.select(splits=[s], views=[0]) for s in ("test", "unseen", "train"))
    t_test, t_unseen = classes.targets(test.labels), classes.targets(unseen.labels)
    t_train = classes.targets(train.labels)
    counts = {
        "train_images": len(train),
        "test_images": int((t_test >= 0).sum()),
        "unseen_images": int((t_unseen >= 0).sum()),
        "seen_classes": len(classes.seen_keys),
        "unseen_classes": len(classes.unseen_keys),
        "decode_errors": len(fs.errors),
    }
    log.info("Evaluating on %s", counts)
    reps, conse_note, conse_fn = _representations(head, vectors, config, test, unseen, train)
    default_method = COMBINED if COMBINED in reps else "DeViSE"
    gammas, gamma_info = _gammas(config, spec, fs, classes, reps, t_train, conse_fn)
    concepts = _concepts(classes.keys, classes.names, config.concepts)
    softmax = _softmax_scores(config, classes, train, t_train, test)
    rows: dict[str, dict] = {"softmax": {"flat": hit_at_k(softmax[t_test >= 0], t_test[t_test >= 0], KS)}}  # fmt: skip
    for method in ("ConSE", "DeViSE", COMBINED):
        rep = reps.get(method)
        if rep is None:
            continue
        if rep["test"] is None:
            rows[method] = {"note": conse_note}
            continue
        args = (classes, t_test, t_unseen, gammas[method], concepts, vectors)
        rows[method], scores, targets = _score(rep, *args)
        if method == default_method and scores is not None:
            _draw_confusions(Path(config.out), scores, targets, classes, gammas[method])
    report = {
        "model": str(config.model),
        "catalog": str(config.catalog),
        "backbone": spec.backbone,
        "image_size": spec.image_size,
        "head": spec.kind,
        "vectors": vectors.id,
        "counts": counts,
        "seen_classes": classes.seen_names,
        "unseen_classes": classes.unseen_names,
        "calibration": gamma_info,
        "conse": conse_note,
        "class_text": spec.class_text,
        "conse_weight": float(spec.conse_weight) if spec.conse_classes else 0.0,
        "default_method": default_method,
        "methods": rows,
        "config": asdict(config),
    }
    write_report(report, Path(config.out))
    return report


def _conse_from_backbone(spec, vectors, config, test, unseen, train) -> tuple[dict, str]:
    """ConSE for a model without its own branch: the backbone's classifier and the ImageNet
    class names in the text space."""
    try:
        from devise.backbones import imagenet_categories, load_backbone
        from devise.engines import OnnxBackbone, choose_engine

        if choose_engine(config.resources.engine, config.resources.use_gpu).name == "onnx":
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
