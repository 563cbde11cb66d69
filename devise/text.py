"""Text spaces: one interface (encode, dim, id) over word-vector tables and sentence encoders,
a registry of named spaces, and an on-disk cache of encodings keyed by space id and text."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from devise.config import DEFAULT_TEXT_SPACE
from devise.fsutil import cached_sha256
from devise.home import devise_home
from devise.vectors import UnknownWordError, VectorFileError, WordVectors, load_vectors

logger = logging.getLogger(__name__)

_ENCODE_BATCH = 64
# What encodes a sentence-transformers folder: auto (onnxruntime when the folder allows it),
# onnx or torch (sentence-transformers); read when a space is opened, like DEVISE_HOME.
TEXT_ENGINE_ENV = "DEVISE_TEXT_ENGINE"


def _text_engine() -> str:
    return os.environ.get(TEXT_ENGINE_ENV) or "auto"


class TextSpaceError(VectorFileError):
    """A text space that cannot be opened or used as asked; str() says what to do."""


def normalize(x: np.ndarray) -> np.ndarray:
    """(N, D) -> float32 rows of unit L2 norm (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class TextSpace:
    """Texts -> unit vectors. Subclasses set `id`, `dim`, `kind` and `source`, and implement
    `_encode`; `encode` adds the checks every kind shares."""

    id: str
    dim: int
    kind: str  # "table" or "encoder"
    source: str
    # True when any text has a vector (a sentence encoder); False for a word table.
    open_vocabulary: bool = False

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(N,) texts -> (N, D) float32, L2-normalised rows, in the order given."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return normalize(self._encode(texts))

    def has_vector(self, text: str) -> bool:
        """True if `encode([text])` gives a vector (always, for a sentence encoder)."""
        return True

    def _encode(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.id!r}, {self.dim}-d)"


# ---------------------------------------------------------------------------------------------
# word tables


class WordTableSpace(TextSpace):
    """A word-vector table: a phrase is the mean of its words' vectors (see WordVectors.lookup).

    A phrase none of whose words has a vector raises UnknownWordError (with close spellings);
    words of a phrase that have no vector are dropped with a warning naming them.
    """

    kind = "table"
    open_vocabulary = False

    def __init__(self, table: WordVectors) -> None:
        self.table = table
        self.id = table.vectors_id
        self.dim = table.dim
        self.source = table.source

    def has_vector(self, text: str) -> bool:
        return self.table.has_vector(text)

    def _encode(self, texts: list[str]) -> np.ndarray:
        out = np.empty((len(texts), self.dim), np.float32)
        for i, text in enumerate(texts):
            out[i] = self.table.lookup(text)
            dropped = self.table.missing_words(text)
            if dropped:
                kept = " ".join(w for w in text.split() if w not in dropped)
                listed = ", ".join(f'"{w}"' for w in dropped)
                logger.warning(
                    'No word vector for %s in %s; "%s" was searched as "%s".',
                    listed, self.id, text, kept,
                )  # fmt: skip
        return out


# ---------------------------------------------------------------------------------------------
# sentence encoders


def _encoder_dim(folder: Path) -> int:
    """Output size of a sentence-transformers folder, read from its module configs (no torch):
    the last Dense module's out_features, else the pooling's word_embedding_dimension."""
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
        dim = None
        for m in modules:
            cfg = folder / m.get("path", "") / "config.json"
            if m.get("type", "").endswith("Pooling") and cfg.is_file():
                dim = int(json.loads(cfg.read_text())["word_embedding_dimension"])
            elif m.get("type", "").endswith("Dense") and cfg.is_file():
                dim = int(json.loads(cfg.read_text())["out_features"])
        if dim:
            return dim
        return int(json.loads((folder / "config.json").read_text())["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TextSpaceError(
            f"{folder} is not a readable sentence-transformers model folder ({e}); pass "
            "--vectors minilm, glove-100d, a .vec/.txt file or such a folder."
        ) from e


def _weights_file(folder: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise TextSpaceError(
        f"{folder} holds no model.safetensors or pytorch_model.bin; pass a complete "
        "sentence-transformers model folder."
    )


class SentenceEncoderSpace(TextSpace):
    """A sentence-transformers model folder, loaded offline on first use (importing
    sentence-transformers takes seconds, so a text found in the cache never imports it).

    Texts are encoded on onnxruntime + tokenizers (devise.engines.OnnxSentenceEncoder: no torch,
    no transformers; the graph exported once from the verified weights) when the folder is a
    plain Transformer + mean Pooling [+ Normalize] and its weights' sha256 is known; else by
    sentence-transformers. Both give the same vectors to cosine 0.9999 (tests/test_text.py), so
    the space id, and every store and cache keyed by it, is the same whichever encodes.

    verify: called with the folder before the weights are read (e.g. a pinned sha256 check).
    device: torch device for sentence-transformers (CPU unless given; query batches are tiny).
    weights_sha256: the sha256 of the folder's weights (keys the exported graph).
    engine: "auto" (onnx when the folder allows it), "onnx" or "torch".
    """

    kind = "encoder"
    open_vocabulary = True

    def __init__(
        self,
        folder: str | os.PathLike,
        space_id: str,
        *,
        verify: Callable[[Path], object] | None = None,
        cache: EncodingCache | None = None,
        device: str = "cpu",
        weights_sha256: str | None = None,
        engine: str = "auto",
    ) -> None:
        from devise.engines import onnx_text_supported, onnxruntime_available

        self.folder = Path(folder)
        self.id = space_id
        self.source = str(self.folder)
        self.dim = _encoder_dim(self.folder)
        self.device = device
        self._verify = verify
        self._model = None
        self._onnx = None
        self.weights_sha256 = weights_sha256
        if engine not in ("auto", "onnx", "torch"):
            raise TextSpaceError(
                f"The text engine must be auto, onnx or torch, not {engine!r} (${TEXT_ENGINE_ENV})."
            )
        can_onnx = (
            weights_sha256 is not None
            and device == "cpu"
            and onnx_text_supported(self.folder)
            and onnxruntime_available()
        )
        if engine == "onnx" and not can_onnx:
            raise TextSpaceError(
                f"{self.folder} cannot be encoded on onnxruntime (it needs a tokenizer.json, a "
                "Transformer with mean pooling, a known weights sha256 and the CPU); use "
                "engine torch."
            )
        self.engine = "onnx" if engine != "torch" and can_onnx else "torch"
        self._lock = threading.Lock()
        self.cache = cache if cache is not None else EncodingCache.default()

    def model(self):
        """The loaded SentenceTransformer (loaded once per process, after `verify`)."""
        with self._lock:
            if self._model is None:
                if self._verify is not None:
                    self._verify(self.folder)
                # Nothing may be fetched at run time: the folder is complete or loading fails.
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                from sentence_transformers import SentenceTransformer

                try:
                    self._model = SentenceTransformer(
                        str(self.folder), device=self.device, local_files_only=True
                    )
                except (OSError, ValueError) as e:
                    raise TextSpaceError(
                        f"Sentence encoder {self.folder} could not be loaded offline ({e})."
                    ) from e
            return self._model

    def onnx_encoder(self):
        """The onnxruntime encoder (devise.engines.OnnxSentenceEncoder), opened once per process;
        its graph is exported from the folder's weights, after `verify`, when not cached."""
        from devise.engines import OnnxSentenceEncoder

        with self._lock:
            if self._onnx is None:
                self._onnx = OnnxSentenceEncoder(
                    self.folder, self.weights_sha256, verify=self._verify
                )
            return self._onnx

    def warm(self) -> None:
        """Load the encoder this space uses now (onnxruntime's, else sentence-transformers')."""
        if self.engine == "onnx":
            self.onnx_encoder()
        else:
            self.model()

    def encode_uncached(self, texts: list[str]) -> np.ndarray:
        """(N,) texts -> (N, D) float32 unit vectors from the encoder itself (no cache)."""
        if self.engine == "onnx":
            return self.onnx_encoder().encode(texts, batch_size=_ENCODE_BATCH)
        return (
            self.model()
            .encode(
                texts,
                batch_size=_ENCODE_BATCH,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
            .astype(np.float32)
        )

    def _encode(self, texts: list[str]) -> np.ndarray:
        cached = self.cache.get(self.id, texts)
        todo = list(dict.fromkeys(t for t in texts if t not in cached))
        if todo:
            vecs = self.encode_uncached(todo)
            fresh = dict(zip(todo, vecs))
            self.cache.put(self.id, fresh)
            cached.update(fresh)
        return np.stack([cached[t] for t in texts])


class EncodingCache:
    """Encodings by (text space id, text): a dict in memory in front of one SQLite file.

    The file is optional: if it cannot be opened or written (read-only home), the cache works
    in memory only. SQLite keeps concurrent writers from several processes consistent.
    """

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path) if path is not None else None
        self._memory: dict[tuple[str, str], np.ndarray] = {}
        self._db: sqlite3.Connection | None = None
        self._disabled = path is None

    @classmethod
    def default(cls) -> EncodingCache:
        """The shared cache at $DEVISE_HOME/text/encodings.sqlite (one per path per process)."""
        path = devise_home() / "text" / "encodings.sqlite"
        with _CACHES_LOCK:
            if path not in _CACHES:
                _CACHES[path] = cls(path)
            return _CACHES[path]

    def _conn(self) -> sqlite3.Connection | None:
        if self._disabled:
            return None
        if self._db is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
                db.execute(
                    "CREATE TABLE IF NOT EXISTS enc (space TEXT, text TEXT, vec BLOB, "
                    "PRIMARY KEY (space, text))"
                )
                db.commit()
                self._db = db
            except (OSError, sqlite3.Error) as e:
                logger.debug("Encoding cache %s unavailable (%s); memory only.", self.path, e)
                self._disabled = True
                return None
        return self._db

    def get(self, space_id: str, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached encodings among `texts`, as {text: (D,) float32}."""
        found = {t: self._memory[(space_id, t)] for t in texts if (space_id, t) in self._memory}
        wanted = list(dict.fromkeys(t for t in texts if t not in found))
        db = self._conn() if wanted else None
        if db is not None:
            try:
                for a in range(0, len(wanted), 500):
                    chunk = wanted[a : a + 500]
                    marks = ",".join("?" * len(chunk))
                    rows = db.execute(
                        f"SELECT text, vec FROM enc WHERE space = ? AND text IN ({marks})",
                        [space_id, *chunk],
                    ).fetchall()
                    for text, blob in rows:
                        vec = np.frombuffer(blob, dtype="<f4").copy()
                        self._memory[(space_id, text)] = vec
                        found[text] = vec
            except sqlite3.Error as e:
                logger.debug("Encoding cache %s unreadable (%s).", self.path, e)
        return found

    def put(self, space_id: str, vectors: dict[str, np.ndarray]) -> None:
        for text, vec in vectors.items():
            self._memory[(space_id, text)] = np.asarray(vec, dtype=np.float32)
        db = self._conn()
        if db is None or not vectors:
            return
        try:
            with db:
                db.executemany(
                    "INSERT OR REPLACE INTO enc VALUES (?, ?, ?)",
                    [
                        (space_id, t, np.asarray(v, dtype="<f4").tobytes())
                        for t, v in vectors.items()
                    ],
                )
        except sqlite3.Error as e:
            logger.debug("Encoding cache %s not written (%s).", self.path, e)


_CACHES: dict[Path, EncodingCache] = {}
_CACHES_LOCK = threading.Lock()


# ---------------------------------------------------------------------------------------------
# the registry


@dataclass(frozen=True)
class TextSpaceKind:
    """One way to open a text space: a named space ("minilm") or a kind of path."""

    name: str
    description: str
    open: Callable[[str], TextSpace]
    # For path kinds: does this path look like this kind? None for named spaces.
    matches: Callable[[Path], bool] | None = None


def _open_minilm(_: str) -> TextSpace:
    from devise import assets

    folder = assets.minilm_folder()
    return SentenceEncoderSpace(
        folder,
        f"{assets.ENCODER_NAME}@{assets.ENCODER_SHA256[:8]}",
        verify=assets.verify_minilm,
        weights_sha256=assets.ENCODER_SHA256,  # the graph is exported only after verify passes
        engine=_text_engine(),
    )


def _open_glove(_: str) -> TextSpace:
    from devise import assets

    return WordTableSpace(load_vectors(assets.glove_json_path(), vectors_id="glove-100d"))


def _is_st_folder(path: Path) -> bool:
    return path.is_dir() and (path / "modules.json").is_file()


def _open_st_folder(source: str) -> TextSpace:
    from devise.fsutil import sha256_file

    folder = Path(source).expanduser().resolve()
    weights = _weights_file(folder)
    digest = cached_sha256(weights, sha256_file)
    return SentenceEncoderSpace(
        folder, f"{folder.name}@{digest[:8]}", weights_sha256=digest, engine=_text_engine()
    )


def _is_table(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and (path / "meta.json").is_file())


def _open_table(source: str) -> TextSpace:
    return WordTableSpace(load_vectors(source))


TEXT_SPACES: dict[str, TextSpaceKind] = {}


def register(kind: TextSpaceKind) -> None:
    """Add a text space kind; named ones are looked up first, path kinds in registration order."""
    TEXT_SPACES[kind.name] = kind


register(
    TextSpaceKind("minilm", "all-MiniLM-L6-v2 sentence encoder, 384-d (default)", _open_minilm)
)
register(TextSpaceKind("glove-100d", "GloVe-6B 100-d word table (341k words)", _open_glove))
register(
    TextSpaceKind(
        "sentence-transformers folder",
        "a local sentence-transformers model folder (modules.json inside)",
        _open_st_folder,
        _is_st_folder,
    )
)
register(
    TextSpaceKind(
        "word-vector file",
        "a .vec/.txt(.gz) or wink .json word-vector file, or its cache folder",
        _open_table,
        _is_table,
    )
)

_OPEN: dict[str, TextSpace] = {}
_OPEN_LOCK = threading.Lock()


def load_text_space(source: str | os.PathLike | None = None) -> TextSpace:
    """A text space by name (see TEXT_SPACES: "minilm", "glove-100d") or by path (a
    sentence-transformers folder, a word-vector file or cache folder). Opened once per process:
    a second call returns the same object, so an encoder is never reloaded per query."""
    name = str(source) if source is not None else DEFAULT_TEXT_SPACE
    with _OPEN_LOCK:
        if name in _OPEN:
            return _OPEN[name]
    kind = TEXT_SPACES.get(name)
    if kind is None or kind.matches is not None:
        path = Path(name).expanduser()
        kind = next(
            (k for k in TEXT_SPACES.values() if k.matches is not None and k.matches(path)), None
        )
        if kind is None:
            named = ", ".join(k for k, v in TEXT_SPACES.items() if v.matches is None)
            what = (
                "is a folder that holds neither a sentence-transformers model nor word vectors"
                if path.is_dir()
                else "is not a word-vector file"
                if path.exists()
                else f"does not exist and is not a known text space ({named})"
            )
            raise TextSpaceError(
                f"--vectors {name} {what}; pass one of {named}, a word-vector file or a "
                "sentence-transformers model folder."
            )
    space = kind.open(name)
    with _OPEN_LOCK:
        return _OPEN.setdefault(name, space)


def as_text_space(obj: TextSpace | WordVectors) -> TextSpace:
    """A text space as is; a WordVectors table wrapped as one."""
    return WordTableSpace(obj) if isinstance(obj, WordVectors) else obj


def check_same_space(want_id: str, space: TextSpace, what: str) -> None:
    """Refuse a text space other than the one `what` (a model, an embeddings folder) was made
    with, in one sentence."""
    if want_id and space.id != want_id:
        raise TextSpaceError(
            f"{what} was made with text space {want_id}, but --vectors gives {space.id}; pass "
            "the --vectors it was trained with."
        )


__all__ = [
    "DEFAULT_TEXT_SPACE",
    "TEXT_SPACES",
    "EncodingCache",
    "SentenceEncoderSpace",
    "TextSpace",
    "TextSpaceError",
    "TextSpaceKind",
    "UnknownWordError",
    "WordTableSpace",
    "as_text_space",
    "cached_sha256",
    "check_same_space",
    "load_text_space",
    "normalize",
    "register",
]
