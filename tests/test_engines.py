"""onnxruntime as the CPU engine: the image graphs agree with torch, are cached by what changes
their numbers, and are rebuilt when missing or damaged; the engine choice follows the device."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from devise import engines
from devise.engines import EngineError, OnnxBackbone, choose_engine, graph_root


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DEVISE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _photos(n: int, seed: int = 0) -> list[Image.Image]:
    """Real photos from scikit-image, then smooth random pictures of odd sizes (a low-resolution
    random grid upsampled, so they have edges and regions like photos, not only noise)."""
    from skimage import data

    out = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in
           ("chelsea", "coffee", "rocket", "astronaut")]  # fmt: skip
    rng = np.random.default_rng(seed)
    sizes = [(37, 53), (301, 199), (225, 224), (97, 411), (64, 64), (640, 480), (13, 29)]
    while len(out) < n:
        w, h = sizes[len(out) % len(sizes)]
        grid = rng.integers(0, 256, size=(rng.integers(2, 9), rng.integers(2, 9), 3))
        img = Image.fromarray(grid.astype(np.uint8)).resize((w, h), Image.BICUBIC)
        out.append(img)
    return out


def test_auto_engine_is_onnx_on_cpu_torch_on_gpu_and_flags_are_obeyed():
    assert choose_engine("auto", use_gpu=False).name == "onnx"
    assert choose_engine("auto", use_gpu=True).name == "torch"
    assert choose_engine("torch").name == "torch"
    assert "onnx" in choose_engine("auto").line()
    with pytest.raises(EngineError, match="--engine must be one of"):
        choose_engine("tensorrt")
    with pytest.raises(EngineError, match="runs on the CPU"):
        choose_engine("onnx", use_gpu=True)


@pytest.mark.assets
@pytest.mark.slow
@pytest.mark.parametrize("size", [224, 64])
def test_lite0_on_onnxruntime_matches_torch_on_50_photos_and_a_batch_of_one(home, size):
    """The feature stage's ModelActor gives the same features on both engines (cosine >= 0.9999
    for every image), in a batch of 54 and for one image alone; the ImageNet logits too."""
    from devise.backbones import backbone_info, prepare_transform
    from devise.pipeline import ModelActor

    transform = prepare_transform(backbone_info("efficientnet_lite0"), size)
    images = np.stack([transform(img) for img in _photos(54)])
    batch = lambda x: {"image": x, "error": np.array([""] * len(x))}
    torch_actor = ModelActor("efficientnet_lite0", engine="torch")
    onnx_actor = ModelActor("efficientnet_lite0", engine="onnx", image_size=size)
    assert isinstance(onnx_actor.backbone, OnnxBackbone)
    want = torch_actor(batch(images))["feature"].astype(np.float32)
    got = onnx_actor(batch(images))["feature"].astype(np.float32)
    assert got.shape == want.shape == (54, 1280)
    assert _cosines(got, want).min() >= 0.9999
    one = onnx_actor(batch(images[3:4]))["feature"].astype(np.float32)
    assert _cosines(one, want[3:4]).min() >= 0.9999

    import torch

    feats = onnx_actor.backbone(images[:8])
    with torch.no_grad():
        logits_t = torch_actor.backbone.classify(torch.from_numpy(feats)).numpy()
    logits_o = onnx_actor.backbone.classify(feats)
    assert _cosines(logits_o, logits_t).min() >= 0.9999
    assert (logits_o.argmax(1) == logits_t.argmax(1)).all()
    if size == 224:  # the cat photo is a cat (ImageNet classes 281-285) on the ONNX graph
        assert 281 <= int(logits_o[0].argmax()) <= 285


def test_graph_is_cached_rebuilt_when_damaged_or_missing_and_keyed_by_weights(home, tmp_path):
    """Tiny seeded backbone: a second load reuses the graph; flipped bytes or a deleted file are
    noticed and the graph exported again; other weights get another graph."""
    import torch

    from devise.backbones import export_weights, load_backbone

    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    first = OnnxBackbone("tiny", image_size=32)
    path = first.graph(32)
    assert path.is_file() and path.parent.parent == graph_root()
    want = first(images)
    mtime = path.stat().st_mtime_ns
    OnnxBackbone("tiny", image_size=32)
    assert path.stat().st_mtime_ns == mtime  # reused, not exported again

    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    again = OnnxBackbone("tiny", image_size=32)
    assert again.graph(32) == path
    np.testing.assert_allclose(again(images), want, rtol=1e-5, atol=1e-5)

    path.unlink()
    np.testing.assert_allclose(OnnxBackbone("tiny", image_size=32)(images), want, atol=1e-5)
    meta = json.loads((path.parent / engines.META_FILE).read_text())
    assert meta["key"]["weights_sha256"] == "seeded:tiny" and meta["key"]["image_size"] == 32

    tuned = load_backbone("tiny")
    with torch.no_grad():
        for p in tuned.parameters():
            p.mul_(1.5)
    wfile = tmp_path / "tuned.pth"
    torch.save(export_weights(tuned), wfile)
    other = OnnxBackbone("tiny", weights=wfile, image_size=32)
    assert other.graph(32) != path
    with torch.no_grad():
        ref = tuned(torch.from_numpy(images)).numpy()
    assert _cosines(other(images), ref).min() >= 0.9999
    # a batch of another image size gets that size's graph
    assert other(images[:, :24, :24]).shape == (5, 64)
    assert other.graph(24) != other.graph(32)


def test_feature_stage_runs_on_onnx_by_default_and_says_so(home, image_tree, capsys):
    """The local executor's feature stage prints the engine once and gives torch's features."""
    from devise.catalog import build_catalog
    from devise.config import PipelineConfig, Resources
    from devise.features import extract_features

    catalog = build_catalog(image_tree, test_fraction=0.0)
    onnx_fs = extract_features(catalog, "tiny", cache_dir=home / "a", local=True)
    err = capsys.readouterr().err
    assert err.count("engine: onnx") == 1
    torch_fs = extract_features(
        catalog,
        "tiny",
        cache_dir=home / "b",
        local=True,
        pipeline=PipelineConfig(resources=Resources(engine="torch")),
    )
    assert "engine: torch (--engine torch)" in capsys.readouterr().err
    order = np.argsort(onnx_fs.paths)
    back = np.argsort(torch_fs.paths)
    a = np.asarray(onnx_fs.features, np.float32)[order]
    b = np.asarray(torch_fs.features, np.float32)[back]
    assert len(a) == len(catalog) and _cosines(a, b).min() >= 0.9999


# -- the text tower -----------------------------------------------------------------------------

TEXTS = [
    "",
    "shoe",
    "striped summer dress",
    "ankle boot",
    "t-shirt",
    "a photo of a dog",
    "Ünïcödé naïve café — résumé",
    "running shoes for the winter, waterproof!!!",
    "12345 67 8",
    "steel arch bridge, bridge",
    " ".join(["word"] * 400),  # truncated at the encoder's 256 tokens, as sentence-transformers
    "the quick brown fox jumps over the lazy dog " * 45,
] + [f"{a} {b}" for a in ("red", "old", "tiny", "wooden") for b in (
    "car", "ship", "cat", "bag", "sandal", "coat", "pullover", "bird", "bridge", "goldfish")]  # fmt: skip


@pytest.fixture(scope="module")
def text_home(tmp_path_factory):
    """A devise home whose MiniLM graph is exported (once for the module)."""
    from devise import assets
    from devise.engines import OnnxSentenceEncoder

    home = tmp_path_factory.mktemp("text-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEVISE_HOME", str(home))
        OnnxSentenceEncoder(
            assets.minilm_folder(), assets.ENCODER_SHA256, verify=assets.verify_minilm
        )
        yield home


@pytest.mark.assets
@pytest.mark.slow
def test_minilm_on_onnxruntime_matches_sentence_transformers_on_52_texts(text_home, monkeypatch):
    """Empty, 400-token, unicode and ordinary texts: cosine >= 0.9999 to sentence-transformers,
    in one batch and one at a time; the space id is the one stores and caches were keyed by."""
    from devise.text import EncodingCache, SentenceEncoderSpace, load_text_space

    monkeypatch.setenv("DEVISE_HOME", str(text_home))
    assert len(TEXTS) >= 50
    space = load_text_space("minilm")
    assert space.engine == "onnx" and space.id == "all-MiniLM-L6-v2@53aa5117"
    got = space.encode_uncached(TEXTS)
    alone = np.concatenate([space.encode_uncached([t]) for t in TEXTS[:12]])
    st = SentenceEncoderSpace(space.folder, space.id, cache=EncodingCache(None), engine="torch")
    want = st.encode_uncached(TEXTS)
    assert got.shape == want.shape == (len(TEXTS), 384)
    assert _cosines(got, want).min() >= 0.9999
    assert _cosines(alone, want[:12]).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.assets
@pytest.mark.slow
def test_index_open_and_a_new_phrase_import_neither_torch_nor_transformers(text_home, tmp_path):
    """A fresh interpreter opens a MiniLM index and answers a phrase it never encoded before,
    on onnxruntime + tokenizers only; the answer is the semantically nearest row."""
    import os
    import subprocess
    import sys

    import pandas as pd

    from devise import assets
    from devise.engines import OnnxSentenceEncoder
    from devise.store import Store

    words = ["dog", "car", "ship", "sandal", "coat", "goldfish", "bridge", "bag"]
    enc = OnnxSentenceEncoder(assets.minilm_folder(), assets.ENCODER_SHA256)
    emb = tmp_path / "emb"
    Store.open(emb, create=True).write_version(
        pd.DataFrame({"path": [f"/img/{w}.png" for w in words], "label": words}),
        enc.encode(words),
        model_id="m" * 16,
        vectors="minilm",
        vectors_id="all-MiniLM-L6-v2@53aa5117",
    )
    code = (
        "import sys, json\n"
        "from devise import Index\n"
        f"index = Index.open({str(emb)!r})\n"
        "hits = index.search('a small puppy playing fetch', k=2)\n"
        "print(json.dumps([hits[0]['label'],"
        " [m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules]]))\n"
    )
    env = {**os.environ, "DEVISE_HOME": str(text_home)}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["dog", []]
