"""The Python API: `Index.open(EMB_DIR)` and searches by text, image or indexed image, returning
records {rank, id, path, label, score}. `devise search` and `devise serve` both use it.

    from devise import Index
    index = Index.open("runs/demo/embeddings")
    index.search("running shoes", k=10)

Opening an index reads parquet and numpy only (with an approximate index, only the manifest and
the index: a query then reads the rows it returns); torch is imported when the first image query
needs the model, and the text space is loaded when the first text query needs it (a sentence
encoder runs on onnxruntime + tokenizers, without torch).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from devise.config import DEFAULT_K
from devise.search import EmbeddingIndex, SearchError, resolve_model
from devise.similarity import normalize_rows
from devise.store import row_id

# A k above this is refused: results are for people and pages, not bulk export.
MAX_K = 1000
# Queries longer than this are refused (no class name or phrase is this long).
MAX_QUERY_CHARS = 1000
ImageInput = str | os.PathLike | bytes | Any  # a path, encoded bytes or a PIL image

log = logging.getLogger(__name__)


def _store_current_version(emb_dir: Path) -> str | None:
    # The embeddings store is read here and in EmbeddingIndex.open only.
    from devise.store import current_version

    return current_version(emb_dir)


class _ImageEncoder:
    """Images -> (N, D) unit embeddings with the model that embedded the index, in this process
    (the same decode, transform, backbone and head as the embedding job)."""

    def __init__(self, model_dir: Path, engine: str = "auto") -> None:
        from devise.backbones import backbone_info, prepare_transform
        from devise.model import load_spec
        from devise.pipeline import ModelActor

        spec = load_spec(model_dir)
        self.model_dir = model_dir
        self.class_names = list(spec.class_names)
        self.transform = prepare_transform(backbone_info(spec.backbone), spec.image_size)
        self.actor = ModelActor(
            spec.backbone,
            spec.backbone_weights,
            str(model_dir),
            engine=engine,
            image_size=spec.image_size or backbone_info(spec.backbone).image_size,
        )
        log.info("image queries: backbone on %s", self.actor.engine)

    def __call__(self, images: Sequence[ImageInput]) -> np.ndarray:
        from devise.images import ImageDecodeError, decode_image

        pixels = []
        for img in images:
            if hasattr(img, "convert") and hasattr(img, "size"):  # a PIL image
                rgb = img.convert("RGB")
            else:
                try:
                    rgb = decode_image(img)
                except ImageDecodeError as e:
                    name = "the uploaded image" if isinstance(img, bytes | bytearray) else img
                    raise ImageDecodeError(f"Cannot use {name}: {e}.") from None
            pixels.append(self.transform(rgb))
        batch = {"image": np.stack(pixels), "error": np.array([""] * len(pixels))}
        return normalize_rows(self.actor(batch)["embedding"])


def check_k(k: int) -> int:
    """k as an int, or SearchError unless it is a whole number from 1 to MAX_K."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= MAX_K:
        raise SearchError(f"k must be a whole number from 1 to {MAX_K}, not {k!r}.")
    return int(k)


class Index:
    """One committed version of an embeddings folder, searchable by words, images and ids.

    Records are dicts {rank, id, path, label, score}: rank from 1, id a stable hash of the path
    (`row_id`), score the cosine similarity. A version never changes once committed; `reopen()`
    returns the index of the version CURRENT names now.
    """

    def __init__(
        self,
        base: EmbeddingIndex,
        vectors: str | os.PathLike | None = None,
        model: str | os.PathLike | None = None,
        pinned: bool = False,
        exact: bool = False,
        engine: str = "auto",
    ) -> None:
        self._base = base
        self._exact = exact
        self._engine = engine
        self._vectors_source = vectors
        self._model_source = model
        self._pinned = pinned
        self._word_vectors = None
        self._image_encoder: _ImageEncoder | None = None
        self._ids: np.ndarray | None = None
        self._row_of: dict[str, int] | None = None
        self._labels_cache: dict[str, list[str]] = {}

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        emb_dir: str | os.PathLike,
        version: str | None = None,
        *,
        vectors: str | os.PathLike | None = None,
        model: str | os.PathLike | None = None,
        exact: bool = False,
        engine: str = "auto",
    ) -> Index:
        """The version CURRENT names (or `version`). vectors / model override the word vectors
        and model folder named in the version's manifest. Searches go through the version's
        approximate index (`devise index`) when it has one, unless `exact`: then, and without
        an index, every row is scored. engine: what runs the image backbone of image queries
        (auto: onnxruntime on the CPU, torch on a GPU; see devise.engines.choose_engine)."""
        base = EmbeddingIndex.open(emb_dir, version, exact=exact)
        return cls(base, vectors, model, pinned=bool(version), exact=exact, engine=engine)

    def reopen(self) -> Index:
        """The index of the version CURRENT names now: self when it has not moved (or this index
        was opened at a fixed version); else a new Index, keeping the loaded word vectors and
        model when the new version uses the same ones."""
        if self._pinned or _store_current_version(self.emb_dir) in (None, self.version):
            return self
        new = Index(
            EmbeddingIndex.open(self.emb_dir, exact=self._exact),
            self._vectors_source,
            self._model_source,
            False,
            self._exact,
            self._engine,
        )
        old_m, new_m = self._base.manifest, new._base.manifest
        same_vectors = (new_m.vectors_id, new_m.vectors) == (old_m.vectors_id, old_m.vectors)
        if same_vectors:
            new._word_vectors = self._word_vectors
        if new.model_id == self.model_id:
            new._image_encoder = self._image_encoder
        return new

    # -- what it is ----------------------------------------------------------------------------

    @property
    def emb_dir(self) -> Path:
        return self._base.emb_dir

    @property
    def version(self) -> str:
        return self._base.version

    @property
    def model_id(self) -> str:
        return self._base.model_id

    @property
    def dim(self) -> int:
        return self._base.dim

    def __len__(self) -> int:
        return len(self._base)

    def __repr__(self) -> str:
        return f"Index({str(self.emb_dir)!r}, version={self.version!r}, rows={len(self)})"

    def info(self) -> dict:
        """{embeddings, version, rows, dim, model_id, text_space, created, search}; search is
        "exact" or the approximate index's kind and measured recall@10."""
        m = self._base.manifest
        ann = self._base.ann
        search = "exact"
        if ann is not None:
            search = f"{ann.kind} (recall@10 {ann.meta.get('recall_at_10', 'n/a')})"
        return {
            "embeddings": str(self.emb_dir),
            "version": self.version,
            "rows": len(self),
            "dim": self.dim,
            "model_id": self.model_id,
            "text_space": m.vectors_id or m.vectors or "",
            "created": m.created or "",
            "search": search,
        }

    # -- ids and records -----------------------------------------------------------------------

    def ids(self) -> np.ndarray:
        """(N,) ids of the rows, computed on first use."""
        if self._ids is None:
            self._ids = np.asarray([row_id(str(p)) for p in self._base.paths], dtype=object)
        return self._ids

    def row(self, id: str) -> int:
        """The row holding `id`; KeyError when this version has no such image."""
        if self._row_of is None:
            self._row_of = {i: r for r, i in enumerate(self.ids())}
        try:
            return self._row_of[id]
        except (KeyError, TypeError):
            raise KeyError(
                f"No image with id {id!r} in {self.emb_dir} version {self.version}."
            ) from None

    def record(self, row: int, rank: int = 0, score: float = 0.0) -> dict:
        """One result record of row `row`."""
        return self._record(self._base.rows_info([row])[row], rank, score)

    @staticmethod
    def _record(info: tuple, rank: int, score: float) -> dict:
        path, label, name = info
        return {
            "rank": rank,
            "id": row_id(str(path)),
            "path": str(path),
            "label": None if label is None else str(label),
            # What people call the class ("viaduct"); label keeps its id ("n04532670").
            "class_name": None if name is None else str(name),
            "score": round(float(score), 6),
        }

    def path_of(self, id: str) -> Path:
        """The image file of an indexed id (KeyError for any id not in this version): the only
        way from a request to the file system."""
        return Path(str(self._base.paths[self.row(id)]))

    # -- encoding queries ----------------------------------------------------------------------

    def _text_space(self):
        """The text space queries are encoded in, loaded on first use and checked against the
        embeddings folder."""
        if self._word_vectors is None:
            self._word_vectors = self._base.word_vectors(self._vectors_source)
        return self._word_vectors

    def encode_text(self, queries: Sequence[str]) -> np.ndarray:
        """Words or phrases -> (N, D) float32 unit query vectors in the index's text space.

        Every text query goes through here (one batch). UnknownWordError when, with a word table,
        a query has no word with a vector."""
        vecs = self._text_space().encode(list(queries))
        for q, v in zip(queries, vecs):
            if not np.any(v):
                raise SearchError(f'The vector of "{q}" is all zeros; try other words.')
        return vecs

    def warm(self) -> None:
        """Load the text space and its encoder now, so that the first query does not wait."""
        load = getattr(self._text_space(), "warm", None)  # a word table has nothing to load
        if callable(load):
            load()

    def encodes_quickly(self, queries: Sequence[str]) -> bool:
        """True when encoding these queries needs no encoder run: a word table, or every query
        already in the encoding cache."""
        space = self._text_space()
        cache = getattr(space, "cache", None)
        if not getattr(space, "open_vocabulary", False) or cache is None:
            return True
        texts = {q.strip() for q in queries if isinstance(q, str)}
        try:
            return len(cache.get(space.id, sorted(texts))) == len(texts)
        except Exception:  # noqa: BLE001 -- a cache that cannot answer: take the slow path
            return False

    def encode_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Image paths, encoded bytes or PIL images -> (N, D) float32 unit vectors, with the
        model that embedded this version (loaded on first use; imports torch).

        ImageDecodeError (one sentence) for anything that is not a readable image."""
        if self._image_encoder is None:
            self._image_encoder = _ImageEncoder(
                resolve_model(self._base, self._model_source), self._engine
            )
        return self._image_encoder(list(images))

    # -- searching -----------------------------------------------------------------------------

    def search_vectors(
        self, vectors: np.ndarray, k: int = DEFAULT_K, exclude: Sequence[int | None] | None = None
    ) -> list[list[dict]]:
        """Query vectors (Q, D) -> Q lists of k records. exclude[q], a row number, is left out
        of query q's results."""
        k = check_k(k)
        extra = 1 if exclude is not None and any(e is not None for e in exclude) else 0
        scores, idx = self._base.search(vectors, k + extra)
        info = self._base.rows_info(idx.ravel().tolist())
        out = []
        for q, (row_scores, rows) in enumerate(zip(scores, idx)):
            skip = exclude[q] if exclude is not None else None
            hits = [(int(r), float(s)) for s, r in zip(row_scores, rows) if r != skip][:k]
            out.append(
                [self._record(info[r], rank, s) for rank, (r, s) in enumerate(hits, start=1)]
            )
        return out

    def search(
        self, query: str | Sequence[str], k: int = DEFAULT_K
    ) -> list[dict] | list[list[dict]]:
        """Text -> the k nearest images: a list of records for one query, a list of such lists
        for a list of queries."""
        single = isinstance(query, str)
        queries = [query] if single else list(query)
        for q in queries:
            if not isinstance(q, str) or not q.strip():
                raise SearchError("A text query must be a non-empty string.")
            if not q.isascii():  # bytes that are not UTF-8 (from a shell), or a lone surrogate
                try:
                    q.encode("utf-8")
                except UnicodeEncodeError:
                    raise SearchError(
                        "A text query must be valid UTF-8 text; this one holds bytes or "
                        "characters that are not."
                    ) from None
            if len(q) > MAX_QUERY_CHARS:
                raise SearchError(
                    f"A text query is {len(q)} characters long; the limit is {MAX_QUERY_CHARS}."
                )
        k = check_k(k)
        if not queries:
            return []
        rows = self.search_vectors(self.encode_text([q.strip() for q in queries]), k)
        return rows[0] if single else rows

    def search_image(
        self, image: ImageInput, k: int = DEFAULT_K, include_self: bool = False
    ) -> list[dict]:
        """An image (path, encoded bytes or PIL image) -> its k nearest images. A path that is
        itself in the index is left out of its results unless include_self."""
        k = check_k(k)
        vec = self.encode_images([image])
        skip = None
        if not include_self and isinstance(image, str | os.PathLike):
            skip = self._row_of_path(image)
        return self.search_vectors(vec, k, exclude=[skip])[0]

    def similar(self, id: str, k: int = DEFAULT_K) -> list[dict]:
        """The k images nearest to an indexed image (itself left out); KeyError for unknown ids."""
        k = check_k(k)
        row = self.row(id)
        return self.search_vectors(self._base.matrix[row][None], k, exclude=[row])[0]

    def nearest_labels(
        self, vector: np.ndarray, n: int = 5, vocabulary: str | None = None
    ) -> list[tuple[str, float]]:
        """The n labels nearest to a vector, as (label, cosine), from a label vocabulary:
        "classes" (default: the model's training classes and this version's class names),
        "imagenet" (ImageNet's 1,000 names) or a text FILE with one label a line."""
        from devise.search import label_vocabulary, nearest_labels

        if n <= 0:
            return []
        key = vocabulary or "classes"
        if key not in self._labels_cache:
            self._labels_cache[key] = label_vocabulary(self._base, vocabulary)
        return nearest_labels(vector, self._text_space(), self._labels_cache[key], n)

    def _row_of_path(self, path: str | os.PathLike) -> int | None:
        want = {str(path), os.path.abspath(path)}
        try:
            want.add(str(Path(path).resolve()))
        except OSError:
            pass
        for p in want:
            try:
                return self.row(row_id(p))
            except KeyError:
                continue
        return None


def thumbnail(path: str | os.PathLike, size: int) -> bytes:
    """An image file -> JPEG bytes of at most size x size pixels (aspect kept)."""
    from devise.images import decode_image

    img = decode_image(path)
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


__all__ = ["MAX_K", "Index", "row_id", "thumbnail"]
