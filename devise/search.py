"""Search an embeddings folder: words, phrases or an image -> exact cosine top-k images, a
montage of the results, and the labels (from a label vocabulary) nearest to an image."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from devise.config import DEFAULT_K
from devise.errors import DeviseError
from devise.similarity import normalize_rows, top_k
from devise.store import EmbedError, Manifest, embedding_matrix, read_version

# "What does the model think this image shows" looks among these labels by default: the
# model's training classes plus the classes named in the embeddings folder.
DEFAULT_VOCABULARY = "classes"


class SearchError(DeviseError, ValueError):
    """A search that cannot run (folder, vectors or model mismatch); str() says what to do."""


@dataclass
class SearchResult:
    """One hit: the rank-th nearest image to `query`."""

    query: str
    rank: int
    path: str
    label: str | None
    score: float
    class_name: str | None = None

    @classmethod
    def from_records(cls, query: str, records) -> list[SearchResult]:
        """Index.search's records for one query as SearchResults (tables, montages)."""
        return [
            cls(query, r["rank"], r["path"], r["label"], r["score"], r.get("class_name"))
            for r in records
        ]

    def to_dict(self) -> dict:
        return {
            "query": self.query,
            "rank": self.rank,
            "path": self.path,
            "label": self.label,
            "class_name": self.class_name,
            "score": round(self.score, 6),
        }


class EmbeddingIndex:
    """One committed version of an embeddings folder, ready for search.

    paths, labels, class_names: (N,) object arrays; matrix: (N, D) float32, unit rows;
    manifest: the version's manifest (model_id, dim, vectors, vectors_id, model_dir, ...).

    Without an approximate index every row is scored, so everything is read at open. With one,
    opening reads the manifest and the index only: a query reads the rows it returns (`rows_info`,
    from the parts that hold them), and the columns or the matrix are read in full only when
    something asks for them (a search by indexed id, exact fallback, the id table).
    """

    def __init__(
        self,
        emb_dir: Path,
        manifest: Manifest,
        paths: np.ndarray | None,
        labels: np.ndarray | None,
        class_names: np.ndarray | None,
        matrix: np.ndarray | None,
        ann=None,
    ) -> None:
        self.emb_dir = emb_dir
        self.manifest = manifest
        self._paths = paths
        self._labels = labels
        self._class_names = class_names
        self._matrix = matrix
        self.ann = ann  # the version's approximate index (devise.ann.AnnIndex), if any

    @classmethod
    def open(
        cls, emb_dir: str | os.PathLike, version: str | None = None, exact: bool = False
    ) -> EmbeddingIndex:
        """Load the current version (the newest complete one), or a named one, with its
        approximate index when it has one (`devise index`) and `exact` is False."""
        emb_dir = Path(emb_dir).expanduser()
        checked = None  # the version whose index was already tried (and warned about) here
        if not exact:
            lazy, checked = cls._open_with_index(emb_dir, version)
            if lazy is not None:
                return lazy
        for attempt in range(3):
            try:
                manifest, table = read_version(emb_dir, version)
                break
            except EmbedError as e:
                raise SearchError(str(e)) from None
            except FileNotFoundError:
                # A writer removed an old version while we read it: take the new current one.
                if attempt == 2 or version is not None:
                    raise
        matrix = _checked_matrix(emb_dir, manifest, embedding_matrix(table))
        col = table.column
        return cls(
            emb_dir,
            manifest,
            np.asarray(col("path").to_pylist(), dtype=object),
            np.asarray(col("label").to_pylist(), dtype=object),
            np.asarray(col("class_name").to_pylist(), dtype=object),
            matrix,
            None
            if exact or manifest.version == checked
            else _load_ann(emb_dir, manifest.version, len(matrix)),
        )

    @classmethod
    def _open_with_index(
        cls, emb_dir: Path, version: str | None
    ) -> tuple[EmbeddingIndex | None, str | None]:
        """(the version opened lazily when it has a usable approximate index, else None; the
        version whose index was tried, so the full read neither loads nor warns about it again).
        A manifest or parts that look damaged give (None, None): the full read falls back or
        says so."""
        from devise.store import Store

        try:
            manifest = Store.open(emb_dir).manifest(version)
        except (EmbedError, OSError):
            return None, None
        ann = _load_ann(emb_dir, manifest.version, manifest.rows)
        if ann is None:
            return None, manifest.version
        return cls(emb_dir, manifest, None, None, None, None, ann), manifest.version

    # Read on first use when the version was opened with its index.

    def _read_columns(self) -> None:
        _, table = read_version(self.emb_dir, self.version, ["path", "label", "class_name"])
        col = table.column
        self._paths = np.asarray(col("path").to_pylist(), dtype=object)
        self._labels = np.asarray(col("label").to_pylist(), dtype=object)
        self._class_names = np.asarray(col("class_name").to_pylist(), dtype=object)

    @property
    def paths(self) -> np.ndarray:
        if self._paths is None:
            self._read_columns()
        return self._paths

    @property
    def labels(self) -> np.ndarray:
        if self._labels is None:
            self._read_columns()
        return self._labels

    @property
    def class_names(self) -> np.ndarray:
        if self._class_names is None:
            self._read_columns()
        return self._class_names

    @property
    def matrix(self) -> np.ndarray:
        if self._matrix is None:
            _, table = read_version(self.emb_dir, self.version, ["embedding"])
            self._matrix = _checked_matrix(self.emb_dir, self.manifest, embedding_matrix(table))
        return self._matrix

    def rows_info(self, rows: Sequence[int]) -> dict[int, tuple[str, str | None, str | None]]:
        """{row: (path, label, class_name)} for the given rows: from memory when the columns are
        loaded, else read from only the parts that hold them."""
        rows = sorted({int(r) for r in rows if r >= 0})
        if self._paths is not None or not rows:
            return {r: (self.paths[r], self.labels[r], self.class_names[r]) for r in rows}
        from devise.store import read_rows

        cols = read_rows(self.emb_dir, self.manifest, rows, ["path", "label", "class_name"])
        return {r: t for r, t in zip(rows, zip(cols["path"], cols["label"], cols["class_name"]))}

    def __len__(self) -> int:
        if self._matrix is None:
            return self.manifest.rows
        return int(self._matrix.shape[0])

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def model_id(self) -> str:
        return self.manifest.model_id

    def search(self, vectors: np.ndarray, k: int = DEFAULT_K) -> tuple[np.ndarray, np.ndarray]:
        """Query vectors (Q, D) or (D,) -> (scores (Q, k), indices (Q, k)), cosine, best first."""
        q = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if q.shape[1] != self.dim:
            raise SearchError(
                f"Query vectors are {q.shape[1]}-d but {self.emb_dir} holds {self.dim}-d "
                "embeddings; use the word vectors or model it was embedded with."
            )
        q = normalize_rows(q)
        if self.ann is None:
            return top_k(self.matrix, q, k)
        # Candidates are scored exactly: on the matrix when it is in memory, else on the index's
        # own vectors (a memory map of which only the candidates' rows are read).
        try:
            scores, ids = self.ann.search(q, k, matrix=self._matrix)
        except Exception as e:  # noqa: BLE001 -- a damaged index must never fail a search
            import logging

            logging.getLogger(__name__).warning(
                "Searching exactly: the index of version %s failed (%s: %s); rebuild it with "
                "`devise index`.",
                self.version,
                type(e).__name__,
                e,
            )
            self.ann = None
            return top_k(self.matrix, q, k)
        short = (ids < 0).any(axis=1)  # lists too short to fill k: answer those exactly
        if short.any():
            scores[short], ids[short] = top_k(self.matrix, q[short], k)
        return scores, ids

    def results(
        self, queries: Sequence[str], scores: np.ndarray, indices: np.ndarray
    ) -> list[list[SearchResult]]:
        """Turn search() output into SearchResult lists, one list per query."""
        info = self.rows_info(np.asarray(indices).ravel().tolist())
        out = []
        for query, row_scores, row_idx in zip(queries, scores, indices):
            out.append(
                [
                    SearchResult(
                        query,
                        rank + 1,
                        str(info[int(i)][0]),
                        info[int(i)][1],
                        float(s),
                        info[int(i)][2],
                    )
                    for rank, (s, i) in enumerate(zip(row_scores, row_idx))
                ]
            )
        return out

    def check_vectors(self, space) -> None:
        """Refuse a text space whose size or identity differ from the one the model used."""
        from devise.text import as_text_space

        space = as_text_space(space)
        want_id = self.manifest.vectors_id or ""
        if space.dim != self.dim:
            raise SearchError(
                f"{self.emb_dir} holds {self.dim}-d embeddings (text space "
                f"{want_id or self.manifest.vectors}) but the text space {space.id} is "
                f"{space.dim}-d; pass --vectors with the one the model was trained on."
            )
        if want_id and space.id != want_id:
            raise SearchError(
                f"{self.emb_dir} was embedded for text space {want_id}, not {space.id}; pass "
                "--vectors with the one the model was trained on."
            )

    def word_vectors(self, source: str | os.PathLike | None = None):
        """The text space named in the manifest (or `source`), checked against the folder."""
        from devise.text import load_text_space

        src = source or self.manifest.vectors
        if not src:
            raise SearchError(f"{self.emb_dir} names no text space; pass --vectors.")
        space = load_text_space(src)
        self.check_vectors(space)
        return space


def _checked_matrix(emb_dir: Path, manifest: Manifest, matrix: np.ndarray) -> np.ndarray:
    """The version's (N, D) matrix as unit rows, SearchError when its width is not the
    manifest's."""
    dim = manifest.dim
    if matrix.shape[1] != dim:
        raise SearchError(
            f"{emb_dir} version {manifest.version} says {dim}-d embeddings but its parts "
            f"hold {matrix.shape[1]}-d ones; re-embed it with `devise embed`."
        )
    sample = matrix[:1000]
    if len(sample) and not np.allclose(np.linalg.norm(sample, axis=1), 1.0, atol=1e-3):
        matrix = normalize_rows(matrix)
    return np.ascontiguousarray(matrix)


def _load_ann(emb_dir: Path, version: str, rows: int):
    """The version's approximate index, or None: no index (exact search), or one that cannot
    be used here (faiss not installed, unreadable, wrong size), said once in a warning."""
    import logging

    from devise import ann
    from devise.store import Store

    folder = Store.open(emb_dir).version_dir(version)
    if not ann.index_dir(folder).is_dir():
        return None
    try:
        return ann.load(folder, expect_rows=rows)
    except DeviseError as e:  # IndexBuildError, or MissingExtraError without faiss
        logging.getLogger(__name__).warning("Searching exactly: %s", e)
        return None


def query_vector(text: str, space) -> np.ndarray:
    """A word or phrase -> its unit (D,) float32 vector. With a word table, UnknownWordError
    (with the nearest spellings) when no word of it has a vector."""
    from devise.text import as_text_space

    v = as_text_space(space).encode([text])[0]
    if not np.any(v):
        raise SearchError(f'The vector of "{text}" is all zeros; try other words.')
    return v


def search_text(
    index: EmbeddingIndex, queries: Sequence[str], space, k: int = DEFAULT_K
) -> list[list[SearchResult]]:
    """Words or phrases -> the k nearest images each (queries encoded in one batch)."""
    from devise.text import as_text_space

    q = as_text_space(space).encode(list(queries))
    scores, idx = index.search(q, k)
    return index.results(queries, scores, idx)


def label_vocabulary(index: EmbeddingIndex, source: str | None = None) -> list[str]:
    """Labels to name an image with: "classes" (the model's training classes and the classes
    named in the embeddings folder), "imagenet" (ImageNet-1k's 1,000 names) or a text FILE
    with one label a line."""
    source = source or DEFAULT_VOCABULARY
    if source == "classes":
        from devise.model import load_spec

        names: list[str] = []
        model_dir = Path(index.manifest.model_dir or "")
        if str(model_dir) and (model_dir / "spec.json").is_file():
            names += list(load_spec(model_dir).class_names)
        names += [str(n) for n in index.class_names if n is not None]
        return list(dict.fromkeys(n for n in names if n))
    if source == "imagenet":
        from devise.backbones import imagenet_categories

        return list(dict.fromkeys(imagenet_categories()))
    path = Path(source).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeError) as e:
        raise SearchError(
            f"Label vocabulary {path} cannot be read ({e}); pass --vocabulary classes, imagenet "
            "or a UTF-8 text file with one label a line."
        ) from None
    labels = list(dict.fromkeys(" ".join(x.split()) for x in lines if x.strip()))
    if not labels:
        raise SearchError(f"Label vocabulary {path} holds no label; put one label a line.")
    return labels


def nearest_labels(
    vec: np.ndarray, space, labels: Sequence[str], k: int = 10
) -> list[tuple[str, float]]:
    """The k labels whose encodings are nearest (cosine) to a unit vector, best first. Labels a
    word table has no vector for are skipped."""
    from devise.text import as_text_space

    space = as_text_space(space)
    usable = [x for x in labels if space.has_vector(x)]
    if not usable or k <= 0:
        return []
    scores = space.encode(usable) @ np.asarray(vec, dtype=np.float32)
    top = np.argsort(-scores, kind="stable")[:k]
    return [(usable[i], float(scores[i])) for i in top]


def resolve_model(index: EmbeddingIndex, model_dir: str | os.PathLike | None = None) -> Path:
    """The model folder that embedded the index (or model_dir), checked by model id."""
    from devise.model import model_id

    path = Path(model_dir or index.manifest.model_dir or "").expanduser()
    if not str(path) or not (path / "spec.json").is_file():
        raise SearchError(
            f"The model that embedded {index.emb_dir} ({path}) is not there; pass --model "
            "RUN_DIR/model."
        )
    got = model_id(path)
    if got != index.model_id:
        raise SearchError(
            f"{index.emb_dir} was embedded with model {index.model_id}, but {path} is model "
            f"{got}; pass the --model it was embedded with, or re-embed with this one."
        )
    return path


# ---------------------------------------------------------------------------------------------
# montage


MONTAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _fit(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def montage(
    results: Sequence[Sequence[SearchResult]], out_png: str | os.PathLike, tile: int = 128
) -> Path:
    """Write a PNG: one row per query (its text above), each result's image with rank, score
    and label below it. Unreadable images become grey tiles saying why."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    from devise.images import ImageDecodeError, decode_image

    font = ImageFont.load_default()
    pad, head, caption = 4, 16, 28
    cols = max((len(r) for r in results), default=0) or 1
    row_h = head + tile + caption + pad
    width = pad + cols * (tile + pad)
    canvas = Image.new("RGB", (width, pad + max(1, len(results)) * row_h), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(results):
        y = pad + r * row_h
        if row:
            draw.text((pad, y + 2), _fit(draw, row[0].query, font, width - 2 * pad), "black", font)
        for c, hit in enumerate(row):
            x = pad + c * (tile + pad)
            try:
                img = ImageOps.pad(decode_image(hit.path), (tile, tile), color="white")
            except (ImageDecodeError, OSError) as e:
                img = Image.new("RGB", (tile, tile), (200, 200, 200))
                ImageDraw.Draw(img).text((4, tile // 2), _fit(draw, str(e), font, tile), "black")
            canvas.paste(img, (x, y + head))
            name = hit.class_name or hit.label or Path(hit.path).name
            top = f"{hit.rank}. {hit.score:.3f}"
            draw.text((x, y + head + tile + 2), top, "black", font)
            draw.text((x, y + head + tile + 14), _fit(draw, str(name), font, tile), "black", font)
    from devise.fsutil import atomic_path, check_output_file

    out = check_output_file(out_png, "--montage", MONTAGE_SUFFIXES)
    with atomic_path(out) as tmp:
        canvas.save(tmp, format=Image.registered_extensions()[out.suffix.lower()])
    return out


# ---------------------------------------------------------------------------------------------
# CLI
