import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from devise.catalog import CatalogError, build_catalog, read_catalog, write_catalog
from devise.cli import main as cli_main


def _tiny_imagenet(root: Path, wnids=("n01", "n02", "n03"), per_class=10, val_per_class=4):
    """A Tiny-ImageNet-shaped tree: wnids.txt, words.txt, train/<wnid>/images, val/."""
    (root / "wnids.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    words = {"n01": "Egyptian cat", "n02": "steel arch bridge, bridge", "n03": "school bus"}
    (root / "words.txt").write_text(
        "\n".join(f"{w}\t{words[w]}" for w in wnids) + "\nn99\tnot in this dataset\n"
    )
    ann = []
    for c, wnid in enumerate(wnids):
        for i in range(per_class):
            p = root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), c * 40, np.uint8)).save(p, "JPEG")
        for i in range(val_per_class):
            name = f"val_{c}_{i}.JPEG"
            p = root / "val" / "images" / name
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), c * 40, np.uint8)).save(p, "JPEG")
            ann.append(f"{name}\t{wnid}\t0\t0\t8\t8")
    (root / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    (root / "test" / "images").mkdir(parents=True)
    return root


def test_folder_catalog_columns_and_split(image_tree):
    df = build_catalog(image_tree, test_fraction=0.5, seed=3)
    assert {"path", "label", "class_name", "split", "size_bytes", "mtime_ns"} <= set(df)
    assert len(df) == 30 and df["path"].is_unique
    assert set(df["label"]) == {"cat", "dog", "car", "ship", "ankle boot"}
    per_class = df.groupby(["label", "split"]).size().unstack()
    assert (per_class["test"] == 3).all() and (per_class["train"] == 3).all()
    assert (df["size_bytes"] == [Path(p).stat().st_size for p in df["path"]]).all()


def test_split_is_seeded_and_reproducible(image_tree):
    a = build_catalog(image_tree, seed=1)
    b = build_catalog(image_tree, seed=1)
    c = build_catalog(image_tree, seed=2)
    pd.testing.assert_frame_equal(a, b)
    assert not a["split"].equals(c["split"])


def test_holdout_puts_whole_classes_in_unseen(image_tree):
    df = build_catalog(image_tree, holdout=["ankle boot", "dog"])
    unseen = df[df["split"] == "unseen"]
    assert set(unseen["label"]) == {"ankle boot", "dog"} and len(unseen) == 12
    assert not (df[df["label"].isin(["dog", "ankle boot"])]["split"] != "unseen").any()
    counted = build_catalog(image_tree, holdout_count=2, seed=5)
    assert counted.loc[counted["split"] == "unseen", "label"].nunique() == 2


def test_unknown_holdout_and_bad_root_are_clear_errors(image_tree, tmp_path):
    with pytest.raises(CatalogError, match="zebra"):
        build_catalog(image_tree, holdout=["zebra"])
    with pytest.raises(CatalogError, match="does not exist"):
        build_catalog(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CatalogError, match="No images"):
        build_catalog(tmp_path / "empty")


def test_tiny_imagenet_reads_train_and_val_without_overlap(tmp_path):
    root = _tiny_imagenet(tmp_path / "tiny-imagenet-200")
    df = build_catalog(root, test_fraction=0.25, holdout=["school bus"], seed=0)
    assert len(df) == 3 * (10 + 4)
    assert set(df["source"]) == {"train", "val"}
    assert df["path"].is_unique  # no row in two splits
    assert set(df.loc[df["label"] == "n02", "class_name"]) == {"steel arch bridge"}
    assert set(df.loc[df["split"] == "unseen", "label"]) == {"n03"}
    seen = df[df["split"] != "unseen"]
    assert (seen.groupby("label")["split"].apply(lambda s: (s == "test").sum()) == 4).all()


def test_catalog_cli_writes_parquet(image_tree, tmp_path, capsys):
    out = tmp_path / "cat.parquet"
    rc = cli_main(["catalog", str(image_tree), "--out", str(out), "--holdout", "ship"])
    assert rc == 0
    df = read_catalog(out)
    assert len(df) == 30 and set(df.loc[df["split"] == "unseen", "label"]) == {"ship"}
    assert "Held out (unseen): ship" in capsys.readouterr().out
    assert len(read_catalog(out, splits=["unseen"])) == 6
    rc = cli_main(["catalog", str(tmp_path / "missing"), "--out", str(out)])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err


def test_write_catalog_is_atomic(image_tree, tmp_path):
    out = write_catalog(build_catalog(image_tree), tmp_path / "c.parquet")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert len(pd.read_parquet(out)) == 30


def test_odd_file_names_are_recorded_and_skipped_and_the_rest_catalogued(
    image_tree, tmp_path, capsys
):
    """A name that is not UTF-8 and one holding a newline (and an escape) are listed with a
    reason in OUT.skipped.parquet; every other image is catalogued; output stays one line each."""
    from conftest import make_image

    cat_dir = os.fsencode(image_tree / "cat")
    latin1 = os.fsdecode(cat_dir + b"/caf\xe9.png")  # Latin-1 bytes: not UTF-8
    make_image(Path(latin1), 1)
    make_image(image_tree / "dog" / "two\nlines\x1b[31m.png", 2)
    bad_class = os.fsdecode(os.fsencode(image_tree) + b"/b\xf6at")
    make_image(Path(bad_class) / "img.png", 3)
    out = tmp_path / "cat.parquet"
    rc = cli_main(["catalog", str(image_tree), "--out", str(out)])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith("Wrote ") and ": 30 images, 5 classes" in stdout
    assert len(stdout.splitlines()) == 2 and "\x1b" not in stdout
    assert "Skipped 3 file(s) whose names cannot be catalogued" in stdout
    df = read_catalog(out)
    assert len(df) == 30 and all("\n" not in p for p in df["path"])
    skipped = pd.read_parquet(tmp_path / "cat.skipped.parquet")
    assert len(skipped) == 3
    by_bytes = dict(zip(skipped["path_bytes"], skipped["reason"]))
    assert "not valid UTF-8" in by_bytes[os.fsencode(latin1)]
    newline = os.fsencode(image_tree / "dog" / "two\nlines\x1b[31m.png")
    assert "control character" in by_bytes[newline]
    assert "class folder skipped" in by_bytes[os.fsencode(bad_class)]
    assert any(p.endswith("two\\nlines\\x1b[31m.png") for p in skipped["path"])


def test_holdout_of_every_class_is_refused(image_tree, tmp_path, capsys):
    out = tmp_path / "cat.parquet"
    every = "cat,dog,car,ship,ankle boot"
    rc = cli_main(["catalog", str(image_tree), "--out", str(out), "--holdout", every])
    assert rc == 2 and not out.exists()
    err = capsys.readouterr().err.strip()
    assert err == (
        "devise catalog: error: --holdout names every class, which leaves no training class; "
        "hold out fewer."
    )
