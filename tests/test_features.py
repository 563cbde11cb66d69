"""Feature stage: cached backbone features, keyed by settings and files, errors recorded."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from devise import features as F
from devise.backbones import backbone_info, load_backbone, prepare_transform
from devise.catalog import build_catalog
from devise.images import decode_image


def _catalog(root: Path) -> pd.DataFrame:
    return build_catalog(root, test_fraction=0.34, holdout=["ship"], seed=0)


def test_cache_key_follows_settings_and_files(image_tree: Path, tmp_path: Path) -> None:
    cat = _catalog(image_tree)
    base = F.cache_key(cat, "tiny", None, 32, 0, 0)
    assert F.cache_key(cat, "tiny", None, 32, 0, 0) == base
    assert F.cache_key(cat, "tiny", None, 48, 0, 0) != base
    assert F.cache_key(cat, "tiny", None, 32, 2, 0) != base
    assert F.cache_key(cat, "tiny", None, 32, 2, 0) != F.cache_key(cat, "tiny", None, 32, 2, 1)
    # Without augmentation the seed changes nothing, so it must not split the cache.
    assert F.cache_key(cat, "tiny", None, 32, 0, 7) == base
    assert F.cache_key(cat.iloc[:-1], "tiny", None, 32, 0, 0) != base
    # An image edited in place (new size/mtime) gets new features.
    p = Path(cat["path"].iloc[0])
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert F.cache_key(cat, "tiny", None, 32, 0, 0) != base


def test_weights_identity_names_the_file(tmp_path: Path) -> None:
    w = tmp_path / "w.pth"
    w.write_bytes(b"x" * 10)
    ident = F.weights_identity("resnet18", w)
    assert ident["file"] == str(w.resolve()) and ident["size"] == 10
    with pytest.raises(F.FeatureError, match="does not exist"):
        F.weights_identity("resnet18", tmp_path / "missing.pth")


def test_expand_views_augments_only_training_rows(image_tree: Path) -> None:
    cat = _catalog(image_tree)
    out = F.expand_views(cat, 2, ("train",))
    n_train = int((cat["split"] == "train").sum())
    assert len(out) == len(cat) + 2 * n_train
    assert set(out.loc[out["view"] > 0, "split"]) == {"train"}
    assert (out.groupby("view").size().loc[[1, 2]] == n_train).all()


@pytest.mark.timeout(240)
def test_extract_features_computes_once_then_reuses(
    image_tree: Path, tmp_path: Path, ray_session, monkeypatch
) -> None:
    broken = image_tree / "cat" / "broken.png"
    broken.write_bytes(b"not a png")
    cat = _catalog(image_tree)
    cache = tmp_path / "features"
    from devise.config import PipelineConfig, Resources

    pipe = PipelineConfig(resources=Resources(1, 0.5, 0.5, batch_size=16))
    with pytest.warns(UserWarning, match="1 images could not be decoded"):
        fs = F.extract_features(
            cat, "tiny", image_size=32, augment_views=2, cache_dir=cache, seed=3, pipeline=pipe
        )
    n_train = int((cat["split"] == "train").sum())
    ok_rows = len(cat) - 1 + 2 * (n_train - 1)  # the broken image is in train or test
    if cat.loc[cat["path"] == str(broken.resolve()), "split"].item() != "train":
        ok_rows = len(cat) - 1 + 2 * n_train
    assert fs.features.dtype == np.float16 and fs.features.shape == (ok_rows, 64)
    assert len(fs.paths) == len(fs.labels) == len(fs.splits) == len(fs.views) == ok_rows
    # The broken file is recorded, with its reason, for every view it had.
    assert str(broken.resolve()) in set(fs.errors["path"])
    assert (fs.errors["view"] == 0).sum() == 1
    assert fs.errors["error"].str.len().min() > 0
    assert str(broken.resolve()) not in set(fs.paths)
    assert fs.path.parent == cache and fs.path.name.startswith("tiny-32px-v2-")
    assert set(fs.views[fs.splits != "train"]) == {0}

    # View-0 features are the backbone's output on the plain transform (row alignment check).
    net = load_backbone("tiny")
    transform = prepare_transform(backbone_info("tiny"), 32)
    plain = fs.select(views=[0])
    for i in [0, len(plain) // 2, len(plain) - 1]:
        img = transform(decode_image(plain.paths[i]))
        with torch.no_grad():
            want = net(torch.from_numpy(img[None])).numpy()[0]
        np.testing.assert_allclose(plain.features[i].astype(np.float32), want, rtol=1e-2, atol=1e-2)
    # Augmented copies are different images, not copies of view 0.
    train0 = fs.select(splits=["train"], views=[0])
    train1 = fs.select(splits=["train"], views=[1])
    order0, order1 = np.argsort(train0.paths), np.argsort(train1.paths)
    assert (train0.paths[order0] == train1.paths[order1]).all()
    assert not np.allclose(train0.features[order0], train1.features[order1])

    # Same settings: read from the cache, no pipeline run.
    def no_pipeline(*a, **k):
        raise AssertionError("the pipeline ran although the features were cached")

    monkeypatch.setattr(F, "run_images", no_pipeline)
    again = F.extract_features(
        cat, "tiny", image_size=32, augment_views=2, cache_dir=cache, seed=3, pipeline=pipe
    )
    assert again.path == fs.path and again.key == fs.key
    np.testing.assert_array_equal(np.asarray(again.features), np.asarray(fs.features))
    assert not any(p.name.startswith(".") for p in cache.iterdir())  # no temp folders left
    loaded = F.load_feature_set(fs.path)
    assert loaded.meta["errors"] == len(fs.errors) and loaded.meta["augment_views"] == 2


def test_load_feature_set_rejects_broken_entry(tmp_path: Path) -> None:
    (tmp_path / "entry").mkdir()
    with pytest.raises(F.FeatureError, match="unreadable"):
        F.load_feature_set(tmp_path / "entry")


def test_extract_features_needs_catalog_columns(tmp_path: Path) -> None:
    with pytest.raises(F.FeatureError, match="lacks the columns"):
        F.extract_features(pd.DataFrame({"path": ["a.png"]}), "tiny", cache_dir=tmp_path)
