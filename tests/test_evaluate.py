import json

import numpy as np
import pytest
import torch

from devise.catalog import build_catalog, write_catalog
from devise.config import EvalConfig, PipelineConfig, Resources
from devise.evaluate import conse_embeddings, evaluate, fit_aux_head
from devise.features import extract_features
from devise.model import DeviseHead, HeadSpec, save_model
from devise.report import markdown_report
from devise.train_inputs import training_classes
from devise.vectors import load_vectors


def test_conse_is_a_convex_combination_of_the_top_labels():
    vecs = np.eye(4, dtype=np.float32)
    logits = np.log(np.array([[0.6, 0.3, 0.1, 1e-9]]))
    known = np.array([True, True, True, True])
    emb = conse_embeddings(logits, vecs, known, top=2)
    expected = np.array([0.6, 0.3, 0, 0]) / np.linalg.norm([0.6, 0.3])
    assert np.allclose(emb[0], expected, atol=1e-5)
    # labels without a word vector never contribute
    emb = conse_embeddings(logits, vecs, np.array([False, True, True, True]), top=2)
    assert emb[0, 0] == 0 and emb[0, 1] > emb[0, 2] > 0


@pytest.mark.timeout(300)
def test_evaluate_writes_the_paper_tables(ray_session, image_tree, vec_file, tmp_path):
    catalog = build_catalog(image_tree, test_fraction=0.34, holdout=["ship"], seed=0)
    cat_path = write_catalog(catalog, tmp_path / "catalog.parquet")
    cache = tmp_path / "features"
    pipe = PipelineConfig(resources=Resources(1, 0.5, 0.5, batch_size=16))
    fs = extract_features(catalog, "tiny", None, 32, 0, cache, 0, pipe)
    vectors = load_vectors(vec_file, cache_dir=tmp_path / "vc")
    classes = training_classes(catalog, vectors)
    spec = HeadSpec(
        in_dim=fs.dim, out_dim=vectors.dim, kind="linear", dropout=0.0, backbone="tiny",
        image_size=32, vectors=str(vec_file), vectors_id=vectors.vectors_id,
        class_keys=list(classes.keys), class_names=list(classes.names),
    )  # fmt: skip
    train = fs.select(splits=["train"])
    index = {k: i for i, k in enumerate(classes.keys)}
    head = fit_aux_head(
        spec, train.features, np.array([index[k] for k in train.labels]), classes.matrix, 200
    )
    trained = DeviseHead(spec)
    trained.load_state_dict(head.state_dict())
    save_model(tmp_path / "model", trained)

    report = evaluate(
        EvalConfig(
            model=str(tmp_path / "model"), catalog=str(cat_path), out=str(tmp_path / "report"),
            feature_cache=str(cache), aux_epochs=5, resources=Resources(1, 0.5, 0.5),
        )
    )  # fmt: skip
    m = report["methods"]
    assert report["counts"]["unseen_classes"] == 1 and report["unseen_classes"] == ["ship"]
    # colour-separable classes: the trained head and the softmax baseline are far above chance
    assert m["DeViSE"]["flat"]["hit@1"] >= 75
    assert m["softmax"]["flat"]["hit@1"] >= 75
    assert m["DeViSE"]["zero_shot"]["hit@1"] == 100.0  # one unseen class: trivially right
    assert set(m["DeViSE"]["gzsl_calibrated"]) == {"seen", "unseen", "H", "gamma"}
    assert "not available" in report["conse"]  # the test backbone has no ImageNet classifier
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert saved["methods"]["DeViSE"]["flat"] == m["DeViSE"]["flat"]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| DeViSE |" in md and "| softmax |" in md and "calibrated stacking" in md
    assert (tmp_path / "report" / "confusion.png").stat().st_size > 1000
    assert (tmp_path / "report" / "confusion_calibrated.png").stat().st_size > 1000
    cal = report["calibration"]
    assert len(cal["draws"]) == 5 and cal["aux_epochs"] == 5
    assert len({tuple(d["pseudo_unseen"]) for d in cal["draws"]}) > 1  # different draws
    assert markdown_report(report) == md
    assert torch.is_tensor(next(trained.parameters()))


def test_evaluate_without_test_or_unseen_rows_is_one_line_error(image_tree, tmp_path):
    from devise.evaluate import EvalError

    catalog = build_catalog(image_tree, test_fraction=0.34, seed=0).assign(split="train")
    cat_path = write_catalog(catalog, tmp_path / "catalog.parquet")
    spec = HeadSpec(in_dim=64, out_dim=8, kind="linear", backbone="tiny", image_size=32)
    model = save_model(tmp_path / "model", DeviseHead(spec))
    with pytest.raises(EvalError) as info:
        evaluate(EvalConfig(model=str(model), catalog=str(cat_path), out=str(tmp_path / "out")))
    assert str(info.value) == (
        f"Catalog {cat_path} has no test or unseen rows, so there is nothing to evaluate; "
        "rebuild it with --test-fraction above 0 or --holdout."
    )
    assert not (tmp_path / "out").exists()
