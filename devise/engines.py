"""ONNX Runtime as the CPU engine of both towers: graphs exported once from the verified weights
with torch, cached under $DEVISE_HOME/onnx, checked on load and rebuilt when missing or damaged.

    image tower: uint8 images (B, S, S, 3) -> pooled backbone features (B, F), and the ImageNet
                 classifier (B, F) -> logits (B, 1000), each its own graph (OnnxBackbone)
    text tower:  a sentence-transformers folder (Transformer + mean Pooling [+ Normalize]) ->
                 token ids -> mean over the attention mask -> L2 norm (OnnxSentenceEncoder)

A graph's folder is named by a sha256 of everything that changes its numbers (the weights' sha256,
the image size, torch's and the exporter's versions), so an edited weights file or a new torch
gives a new graph, never a stale one. This module imports neither torch nor transformers unless a
graph has to be exported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from devise.config import ENGINES
from devise.errors import DeviseError
from devise.fsutil import normal_mode
from devise.home import devise_home

if TYPE_CHECKING:
    from devise.assets import Asset

log = logging.getLogger(__name__)

# Bump when the exported graphs change (inputs, outputs, what the wrapper modules compute).
GRAPH_FORMAT = 1
OPSET = 17
GRAPH_FILE = "model.onnx"
META_FILE = "meta.json"


class EngineError(DeviseError, ValueError):
    """An engine that cannot be used as asked; str() says what to do."""


# ---------------------------------------------------------------------------------------------
# choosing the engine


@dataclass(frozen=True)
class EngineChoice:
    """Which engine runs the image backbone, and the one-line reason printed for the user."""

    name: str  # "torch" or "onnx"
    reason: str

    def line(self) -> str:
        return f"engine: {self.name} ({self.reason})"


def onnxruntime_available() -> bool:
    """True when onnxruntime can be imported (found without importing it)."""
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def choose_engine(requested: str = "auto", use_gpu: bool = False) -> EngineChoice:
    """The engine for the image backbone: requested "torch" or "onnx" is obeyed (onnx on the
    CPU only); "auto" runs torch when a GPU is asked for and onnxruntime on the CPU (several
    times faster there than torch eager, with the same features to cosine 0.9999)."""
    if requested not in ENGINES:
        raise EngineError(f"--engine must be one of {', '.join(ENGINES)}, not {requested!r}.")
    if requested == "onnx" and use_gpu:
        raise EngineError("--engine onnx runs on the CPU; drop --use-gpu or pass --engine torch.")
    if requested != "auto":
        return EngineChoice(requested, f"--engine {requested}")
    if use_gpu:
        return EngineChoice("torch", "a GPU is asked for; --engine onnx for the CPU graph")
    if not onnxruntime_available():
        return EngineChoice("torch", "onnxruntime is not installed")
    return EngineChoice("onnx", "onnxruntime on the CPU; --engine torch to run torch instead")


# ---------------------------------------------------------------------------------------------
# the graph cache


def graph_root() -> Path:
    """$DEVISE_HOME/onnx: one folder per exported graph."""
    return devise_home() / "onnx"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _intact(folder: Path, key: dict) -> bool:
    """True when folder holds a graph whose bytes match the sha256 recorded at export, made for
    this key."""
    try:
        meta = json.loads((folder / META_FILE).read_text())
        return meta.get("key") == key and _sha256(folder / GRAPH_FILE) == meta.get("sha256")
    except (OSError, ValueError):
        return False


_EXPORT_LOCK = threading.Lock()


def cached_graph(name: str, key: dict, export: Callable[[Path], None]) -> Path:
    """The graph file for (name, key): the cached one when intact, else exported now.

    export(path) writes an ONNX file at path. It runs in a temporary folder next to the cache
    entry, which is renamed into place once written and checksummed, so a reader never sees half
    a graph; a damaged entry (bytes differing from its recorded sha256) is replaced.
    """
    key = {"format": GRAPH_FORMAT, **key}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    final = graph_root() / f"{name}-{digest[:16]}"
    if _intact(final, key):
        return final / GRAPH_FILE
    with _EXPORT_LOCK:
        if _intact(final, key):
            return final / GRAPH_FILE
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            export(tmp / GRAPH_FILE)
            meta = {"key": key, "sha256": _sha256(tmp / GRAPH_FILE), "name": name}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
            normal_mode(tmp)  # mkdtemp's 0700 would hide the graph from other users of the home
            if _intact(final, key):  # another process exported it meanwhile
                return final / GRAPH_FILE
            if final.exists():  # damaged or half-removed: move it aside, then drop it
                log.warning("ONNX graph %s is damaged; exporting it again.", final)
                aside = final.with_name(f".{final.name}.damaged.{os.getpid()}")
                os.rename(final, aside)
                shutil.rmtree(aside, ignore_errors=True)
            try:
                os.rename(tmp, final)
            except OSError:
                if not _intact(final, key):  # not a concurrent exporter's good graph
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final / GRAPH_FILE


def _torch_version() -> str:
    """torch's version without importing torch (the key of a cached graph is read on every
    query; importing torch to read it would cost the seconds the graphs are there to save)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return "none"


def _onnx_export(module, args: tuple, path: Path, inputs, outputs, dynamic_axes) -> None:
    import torch

    with warnings.catch_warnings():
        # The tracer notes every Python-level shape check it freezes; the graphs are checked
        # against torch by the parity tests instead.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_axes=dynamic_axes,
        )


def session(path: Path, threads: int | None = None):
    """An onnxruntime CPU session on path. threads: intra-op threads (None: onnxruntime's
    default, one per physical core). Idle threads sleep instead of spinning, so decode workers
    sharing the cores are not starved."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.inter_op_num_threads = 1
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3  # warnings about unused initialisers are noise here
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------------
# the image tower


def weights_sha256(backbone: str, weights: str | os.PathLike | None) -> str:
    """sha256 of the backbone's weights file (remembered by path, size and mtime), or
    "seeded:<name>" for a backbone that needs no file."""
    from devise.backbones import weights_file
    from devise.fsutil import cached_sha256

    path = weights_file(backbone, weights)
    if path is None:
        return f"seeded:{backbone}"
    if not path.is_file():
        raise EngineError(f"Weights file {path} does not exist; pass --weights PATH.")
    return cached_sha256(path.resolve(), _sha256)


def _backbone_key(backbone: str, weights, image_size: int, part: str) -> dict:
    return {
        "tower": "image",
        "part": part,
        "backbone": backbone,
        "weights_sha256": weights_sha256(backbone, weights),
        "image_size": int(image_size),
        "torch": _torch_version(),
        "opset": OPSET,
    }


class OnnxBackbone:
    """A frozen backbone on onnxruntime: uint8 images (B, S, S, 3) -> features (B, F) float32,
    and `classify` (B, F) -> ImageNet logits, as FrozenBackbone computes them with torch.

    The image graph is exported at one image size (its spatial axes fixed, the batch axis free);
    a batch of another size gets that size's graph, exported on first use.
    """

    def __init__(
        self,
        backbone: str,
        weights: str | os.PathLike | None = None,
        image_size: int | None = None,
        threads: int | None = None,
        images: bool = True,
    ) -> None:
        """images=False: only `classify` will be used, so no image graph is made now."""
        from devise.backbones import backbone_info

        self.info = backbone_info(backbone)
        self.name = backbone
        self.weights = None if weights is None else str(weights)
        self.threads = threads
        self._module = None
        self._sessions: dict[int, object] = {}
        self._classifier = None
        self._lock = threading.Lock()
        self.image_size = int(image_size or self.info.image_size)
        if images:
            self._image_session(self.image_size)  # export or check now, not on the first batch

    @property
    def feature_dim(self) -> int:
        return self.info.feature_dim

    def _torch_module(self):
        if self._module is None:
            from devise.backbones import load_backbone

            self._module = load_backbone(self.name, self.weights)
        return self._module

    def graph(self, image_size: int) -> Path:
        """The image graph's file for this size (exported when missing or damaged)."""

        def export(path: Path) -> None:
            import torch

            probe = torch.zeros((2, image_size, image_size, 3), dtype=torch.uint8)
            _onnx_export(
                self._torch_module(),
                (probe,),
                path,
                ["images"],
                ["features"],
                {"images": {0: "batch"}, "features": {0: "batch"}},
            )

        key = _backbone_key(self.name, self.weights, image_size, "features")
        return cached_graph(f"{self.name}-{image_size}px", key, export)

    def _image_session(self, image_size: int):
        with self._lock:
            if image_size not in self._sessions:
                self._sessions[image_size] = session(self.graph(image_size), self.threads)
            return self._sessions[image_size]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, S, S, 3) -> float32 (B, F) pooled features."""
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise EngineError(f"expected a batch of images (B, H, W, 3), got {images.shape}")
        if images.shape[1] != images.shape[2]:
            raise EngineError(f"expected square images, got {images.shape[1:3]}")
        sess = self._image_session(int(images.shape[1]))
        return sess.run(["features"], {"images": images})[0]

    def classify(self, features: np.ndarray) -> np.ndarray:
        """Features (B, F) -> ImageNet logits (B, 1000) float32."""
        with self._lock:
            if self._classifier is None:
                self._classifier = session(self._classifier_graph(), self.threads)
        x = np.ascontiguousarray(features, dtype=np.float32)
        return self._classifier.run(["logits"], {"features": x})[0]

    def _classifier_graph(self) -> Path:
        def export(path: Path) -> None:
            import torch

            module = self._torch_module()
            if module.classifier is None:
                from devise.backbones import BackboneError

                raise BackboneError(f"backbone {self.name!r} has no ImageNet classifier")
            probe = torch.zeros((2, self.info.feature_dim), dtype=torch.float32)
            _onnx_export(
                module.classifier.eval(),
                (probe,),
                path,
                ["features"],
                ["logits"],
                {"features": {0: "batch"}, "logits": {0: "batch"}},
            )

        key = _backbone_key(self.name, self.weights, 0, "classifier")
        return cached_graph(f"{self.name}-classifier", key, export)


# ---------------------------------------------------------------------------------------------
# the text tower


def _read_json(path: Path) -> dict | list:
    return json.loads(path.read_text(encoding="utf-8"))


def onnx_text_supported(folder: str | os.PathLike) -> bool:
    """True when a sentence-transformers folder is a Transformer, a mean Pooling and at most a
    Normalize (what OnnxSentenceEncoder computes), with a tokenizer.json; other folders are
    encoded by sentence-transformers itself."""
    folder = Path(folder)
    try:
        modules = _read_json(folder / "modules.json")
        kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
        if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
            return False
        pooling = _read_json(folder / modules[1].get("path", "") / "config.json")
        mean_only = pooling.get("pooling_mode_mean_tokens") and not any(
            v
            for k, v in pooling.items()
            if k.startswith("pooling_mode_") and "mean_tokens" not in k
        )
        return bool(mean_only) and (folder / "tokenizer.json").is_file()
    except (OSError, ValueError, AttributeError, IndexError, TypeError):
        return False


def _max_seq_length(folder: Path) -> int:
    try:
        return int(_read_json(folder / "sentence_bert_config.json")["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return 512


class OnnxSentenceEncoder:
    """A sentence-transformers folder on onnxruntime + tokenizers: texts -> (N, D) float32 unit
    vectors equal to sentence-transformers' own (cosine 0.9999 or better).

    weights_sha256: the sha256 of the folder's weights, which keys the cached graph. verify: called
    with the folder before the weights are exported (a pinned sha256 check); a cached graph is
    checked against its own recorded sha256 instead.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        weights_sha256: str,
        threads: int | None = None,
        verify: Callable[[Path], object] | None = None,
    ) -> None:
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        self.max_length = _max_seq_length(self.folder)
        tok = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        # The shipped tokenizer.json has truncation at 128 and fixed padding to 128 built in;
        # sentence-transformers truncates at max_seq_length and pads to the longest text.
        pad_id, pad_token = 0, "[PAD]"
        try:
            cfg = _read_json(self.folder / "tokenizer_config.json")
            if isinstance(cfg.get("pad_token"), str):
                pad_token = cfg["pad_token"]
                pad_id = tok.token_to_id(pad_token) or 0
        except (OSError, ValueError):
            pass
        tok.no_padding()
        tok.enable_truncation(self.max_length)
        tok.enable_padding(pad_id=pad_id, pad_token=pad_token)
        self.tokenizer = tok
        self._verify = verify
        self.key = {
            "tower": "text",
            "weights_sha256": weights_sha256,
            "max_length": self.max_length,
            "torch": _torch_version(),
            "opset": OPSET,
        }
        self.session = session(self.graph(), threads)
        self.inputs = {i.name for i in self.session.get_inputs()}

    def graph(self) -> Path:
        """The encoder's graph file (exported from the folder's weights when missing)."""
        return cached_graph(f"text-{self.folder.name}", self.key, self._export)

    def _export(self, path: Path) -> None:
        if self._verify is not None:
            self._verify(self.folder)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from transformers import AutoModel

        model = AutoModel.from_pretrained(str(self.folder), local_files_only=True).eval()

        class Hidden(torch.nn.Module):
            def __init__(self, m) -> None:
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.m(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    token_type_ids=token_type_ids,
                ).last_hidden_state

        ids = torch.ones((2, 8), dtype=torch.int64)
        names = ("input_ids", "attention_mask", "token_type_ids", "hidden")
        dyn = {n: {0: "batch", 1: "tokens"} for n in names}
        _onnx_export(
            Hidden(model),
            (ids, torch.ones_like(ids), torch.zeros_like(ids)),
            path,
            list(names[:3]),
            ["hidden"],
            dyn,
        )

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(N,) texts -> (N, D) float32 unit vectors: mean of the token states over the
        attention mask, then L2 norm (as sentence-transformers' Pooling + Normalize)."""
        texts = list(texts)
        out = []
        for a in range(0, len(texts), batch_size):
            enc = self.tokenizer.encode_batch(texts[a : a + batch_size])
            ids = np.array([e.ids for e in enc], dtype=np.int64)
            mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
            feed = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in self.inputs:
                feed["token_type_ids"] = np.array([e.type_ids for e in enc], dtype=np.int64)
            hidden = self.session.run(["hidden"], feed)[0]
            m = mask[:, :, None].astype(np.float32)
            pooled = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
            out.append(pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12))
        if not out:
            return np.zeros((0, 0), np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)


def ensure_graphs(text: bool = True, image: bool = True) -> list[Asset]:
    """Export (or check) the onnxruntime graphs of the default encoder and backbone (at its own
    image size), so the first query and the first embedding need no export (`devise assets`);
    they are exported on first use otherwise."""
    from devise.assets import (
        ENCODER_NAME,
        ENCODER_SHA256,
        WEIGHTS_FILE,
        Asset,
        minilm_folder,
        verify_minilm,
    )

    if not onnxruntime_available():
        return []
    out = []
    if text:
        enc = OnnxSentenceEncoder(minilm_folder(), ENCODER_SHA256, verify=verify_minilm)
        out.append(
            Asset(
                "encoder-onnx",
                enc.graph(),
                f"exported from the verified {ENCODER_NAME} weights (torch.onnx)",
                "Apache-2.0 (model)",
            )
        )
    if image:
        backbone = OnnxBackbone("efficientnet_lite0")
        out.append(
            Asset(
                "weights-onnx",
                backbone.graph(backbone.image_size),
                f"exported from {WEIGHTS_FILE} (torch.onnx, {backbone.image_size} px)",
                "Apache-2.0",
            )
        )
    return out


__all__ = [
    "ENGINES",
    "EngineChoice",
    "EngineError",
    "OnnxBackbone",
    "OnnxSentenceEncoder",
    "cached_graph",
    "choose_engine",
    "ensure_graphs",
    "graph_root",
    "onnx_text_supported",
    "session",
]
