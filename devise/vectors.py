"""Word-vector tables: phrase lookup, nearest words and spellings, over a memory-mapped cache
folder (devise.vector_files parses a file into one; load_cache opens it)."""

from __future__ import annotations

import bisect
import difflib
import itertools
import json
import logging
import operator
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from devise.errors import DeviseError
from devise.vector_files import (
    DEFAULT_VECTORS,
    VectorFileError,
    convert_to_cache,
    default_cache_dir,
    read_wink_json,
    sort_orders,
)

logger = logging.getLogger(__name__)

_SUGGEST_MAX_CANDIDATES = 100_000
_SUGGEST_FREQUENT = 50_000


class UnknownWordError(DeviseError, KeyError):
    """A word or phrase none of whose tokens has a vector; carries the query and close spellings."""

    def __init__(self, query: str, suggestions: Sequence[str] = (), vectors_id: str = "") -> None:
        super().__init__(query)
        self.query = query
        self.suggestions = list(suggestions)
        self.vectors_id = vectors_id

    def __str__(self) -> str:
        table = f" in {self.vectors_id}" if self.vectors_id else ""
        if self.suggestions:
            close = ", ".join(f'"{s}"' for s in self.suggestions)
            return (
                f'No word vector for "{self.query}"{table}; '
                f"nearest spellings in the vocabulary: {close}."
            )
        return (
            f'No word vector for "{self.query}"{table} and no close spelling in the vocabulary; '
            "try another word or a larger --vectors table."
        )


class WordVectors:
    """A vocabulary (file order) and its (N, D) float32 matrix, usually memory-mapped, not normalised.

    Lookup rules (see `lookup`): exact token first, then lower-case, then a case-insensitive match.
    """

    def __init__(
        self,
        words: Sequence[str],
        matrix: np.ndarray,
        *,
        vectors_id: str,
        source: str = "",
        skipped_lines: int = 0,
        sort_orders: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != len(words):
            raise ValueError(
                f"Word-vector matrix of shape {matrix.shape} does not match {len(words)} words."
            )
        self.words = words
        self.matrix = matrix
        self.vectors_id = vectors_id
        self.source = source
        self.skipped_lines = skipped_lines
        # Rows sorted by word and by case-folded word: lookups bisect these instead of building
        # a 2M-entry dict on load (seconds). The cache stores them; otherwise computed lazily.
        self._orders = sort_orders
        self._norms: np.ndarray | None = None
        self._lengths: np.ndarray | None = None
        self._initials: np.ndarray | None = None

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def __len__(self) -> int:
        return len(self.words)

    def __repr__(self) -> str:
        return f"WordVectors({self.vectors_id!r}, {len(self)} words x {self.dim})"

    def __contains__(self, word: object) -> bool:
        return isinstance(word, str) and self._row(word) is not None

    # -- lookup -----------------------------------------------------------------------------

    def _row(self, token: str) -> int | None:
        """Row of a token: exact, then lower-case, then any case (first in file order)."""
        if self._orders is None:
            self._orders = sort_orders(self.words)
        exact, folded = self._orders
        row = _bisect_row(exact, token, self.words.__getitem__)
        if row is None and token.lower() != token:
            row = _bisect_row(exact, token.lower(), self.words.__getitem__)
        if row is None and token:
            row = _bisect_row(folded, token.casefold(), lambda r: self.words[r].casefold())
        return row

    def _phrase_rows(self, phrase: str) -> tuple[list[int], list[str]]:
        """Rows whose average is the phrase's vector, and the tokens that had none."""
        text = " ".join(phrase.split())
        if not text:
            return [], [phrase]
        # The whole phrase as one token first ("new_york", "t-shirt", "ice-cream").
        for variant in dict.fromkeys([text, text.replace(" ", "_"), text.replace(" ", "-")]):
            row = self._row(variant)
            if row is not None:
                return [row], []
        rows: list[int] = []
        missing: list[str] = []
        for token in re.split(r"[\s_]+", text):
            if not token:
                continue
            row = self._row(token)
            if row is not None:
                rows.append(row)
                continue
            # "t-shirt" absent as one token: use its parts; a possessive "'s" adds nothing.
            parts = re.findall(r"[^\W_]+", re.sub(r"['’]s$", "", token))
            part_rows = [r for r in (self._row(p) for p in parts) if r is not None]
            if part_rows:
                rows.extend(part_rows)
            else:
                missing.append(token)
        return rows, missing

    def has_vector(self, phrase: str) -> bool:
        """True if `lookup(phrase)` would return a vector."""
        return bool(self._phrase_rows(phrase)[0])

    def missing_words(self, phrase: str) -> list[str]:
        """The words of a phrase that have no vector and would be left out of its average."""
        rows, missing = self._phrase_rows(phrase)
        return missing if rows else []

    def lookup(self, phrase: str) -> np.ndarray:
        """(D,) float32 vector of a word or phrase, not normalised.

        The whole phrase is tried as one token (also joined by "_" and "-"); otherwise it is
        split on spaces and underscores, a hyphenated token missing as a whole is split on its
        hyphens, and the vectors of the tokens that exist are averaged. Tokens without a vector
        are left out (logged at debug level); only when none has one is UnknownWordError raised.
        """
        rows, missing = self._phrase_rows(phrase)
        if not rows:
            raise UnknownWordError(phrase, self._suggest_for(missing or [phrase]), self.vectors_id)
        if missing:
            logger.debug("Phrase %r: no vector for %s; averaging the rest.", phrase, missing)
        if len(rows) == 1:
            return np.array(self.matrix[rows[0]], dtype=np.float32)
        return np.asarray(self.matrix[rows], dtype=np.float32).mean(axis=0, dtype=np.float32)

    def lookup_many(self, phrases: Sequence[str]) -> np.ndarray:
        """(len(phrases), D) float32; raises UnknownWordError on the first phrase with no vector."""
        out = np.empty((len(phrases), self.dim), dtype=np.float32)
        for i, phrase in enumerate(phrases):
            out[i] = self.lookup(phrase)
        return out

    # -- nearest words and spellings --------------------------------------------------------

    def row_norms(self) -> np.ndarray:
        """(N,) float32 L2 norms of the rows, computed once in chunks (the matrix may be mmapped)."""
        if self._norms is None:
            norms = np.empty(len(self), dtype=np.float32)
            step = 1 << 18
            for a in range(0, len(self), step):
                chunk = np.asarray(self.matrix[a : a + step], dtype=np.float32)
                norms[a : a + step] = np.sqrt(np.einsum("ij,ij->i", chunk, chunk))
            self._norms = norms
        return self._norms

    def nearest(
        self,
        vec: np.ndarray,
        k: int = 10,
        exclude: Iterable[str] = (),
        top_words: int | None = None,
    ) -> list[tuple[str, float]]:
        """The k words of highest cosine similarity to vec, best first, as (word, cosine).

        Words equal to one in `exclude` ignoring case are skipped. top_words limits the search
        to the first rows of the table: GloVe and fastText files list words by frequency, and
        among hundreds of thousands of rare words (names, typos) some are always near anything.
        """
        v = np.asarray(vec, dtype=np.float32).reshape(-1)
        if v.shape[0] != self.dim:
            raise ValueError(f"Vector of size {v.shape[0]} given to a {self.dim}-d table.")
        v_norm = float(np.linalg.norm(v))
        if v_norm == 0.0 or k <= 0 or len(self) == 0:
            return []
        n = len(self) if top_words is None else max(1, min(len(self), top_words))
        scores = np.asarray(self.matrix[:n] @ v, dtype=np.float32)
        scores /= np.maximum(self.row_norms()[:n], 1e-12) * v_norm
        banned = {e.casefold() for e in exclude}
        take = min(n, k + len(banned) + 8)
        while True:
            top = np.argpartition(-scores, take - 1)[:take] if take < n else np.arange(take)
            top = top[np.argsort(-scores[top], kind="stable")]
            found = [
                (self.words[i], float(scores[i]))
                for i in top
                if not banned or self.words[i].casefold() not in banned
            ]
            if len(found) >= k or take == n:
                return found[:k]
            take = min(n, take * 4)

    def suggest(self, word: str, n: int = 5) -> list[str]:
        """Up to n vocabulary words spelled like `word`, closest first (difflib ratio >= 0.6).

        Candidates are words of similar length that share the first letter or are among the
        most frequent (first) rows, capped so that a 2M-word table answers in well under a second.
        """
        query = word.strip().casefold()
        if not query or n <= 0 or len(self) == 0:
            return []
        if self._lengths is None:
            self._lengths = np.fromiter(map(len, self.words), dtype=np.int32, count=len(self))
            # map() keeps this in C: about 0.1 s for 2M words. Empty words get "\0".
            firsts = map(operator.itemgetter(slice(0, 1)), self.words)
            padded = map(str.ljust, firsts, itertools.repeat(1), itertools.repeat("\0"))
            self._initials = np.fromiter(map(ord, padded), dtype=np.int32, count=len(self))
        tol = max(2, len(query) // 3)
        near_len = np.abs(self._lengths - len(query)) <= tol
        ranked = np.arange(len(self)) < _SUGGEST_FREQUENT
        same_initial = (self._initials == ord(query[0])) | (
            self._initials == ord(query[0].upper()[0])
        )
        candidates = np.flatnonzero(near_len & (ranked | same_initial))[:_SUGGEST_MAX_CANDIDATES]
        by_folded: dict[str, str] = {}
        for i in candidates:
            w = self.words[i]
            by_folded.setdefault(w.casefold(), w)
        close = difflib.get_close_matches(query, list(by_folded), n=n, cutoff=0.6)
        return [by_folded[c] for c in close]

    def _suggest_for(self, tokens: Sequence[str], n: int = 5) -> list[str]:
        out: list[str] = []
        per = max(1, n // max(1, len(tokens)))
        for token in tokens:
            for s in self.suggest(token, per if len(tokens) > 1 else n):
                if s not in out:
                    out.append(s)
        return out[:n]


def _bisect_row(order: np.ndarray, key: str, word_at: Callable[[int], str]) -> int | None:
    i = bisect.bisect_left(order, key, key=word_at)
    if i < len(order):
        row = int(order[i])
        if word_at(row) == key:
            return row
    return None


def load_cache(folder: str | os.PathLike, vectors_id: str | None = None) -> WordVectors:
    """Open a cache folder written by convert_to_cache; the matrix is memory-mapped."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        matrix = np.load(folder / "matrix.npy", mmap_mode="r")
        text = (folder / "words.txt").read_text(encoding="utf-8")
    except (OSError, ValueError) as e:
        raise VectorFileError(f"Word-vector cache {folder} is unreadable ({e}).") from e
    words = text[:-1].split("\n") if text else []
    orders = None
    if (folder / "order.npy").is_file() and (folder / "order_folded.npy").is_file():
        orders = (
            np.load(folder / "order.npy", mmap_mode="r"),
            np.load(folder / "order_folded.npy", mmap_mode="r"),
        )
        if len(orders[0]) != len(words) or len(orders[1]) != len(words):
            orders = None
    if matrix.ndim != 2 or len(words) != matrix.shape[0] or meta.get("count") != len(words):
        raise VectorFileError(
            f"Word-vector cache {folder} is inconsistent; delete the folder to rebuild it."
        )
    return WordVectors(
        words,
        matrix,
        vectors_id=vectors_id or meta["vectors_id"],
        source=meta.get("source", str(folder)),
        skipped_lines=int(meta.get("skipped_lines", 0)),
        sort_orders=orders,
    )


def load_vectors(
    source: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    max_words: int | None = None,
    *,
    vectors_id: str | None = None,
) -> WordVectors:
    """Word vectors from a vector file (.vec/.txt(.gz)/wink .json) or a cache folder.

    The first load of a file converts it into the cache (see convert_to_cache); later loads
    memory-map the cached matrix and take well under a second. vectors_id names the table
    (default: the file's stem and a hash of its content). Named tables such as "glove-100d" are
    resolved by devise.text.
    """
    path = Path(source).expanduser()
    if path.is_dir() and (path / "meta.json").is_file():
        return load_cache(path, vectors_id=vectors_id)
    if not path.is_file():
        raise VectorFileError(
            f"Word-vector file {path} does not exist; pass --vectors PATH to a .vec/.txt "
            f"file or '{DEFAULT_VECTORS}'."
        )
    folder = convert_to_cache(path, cache_dir, vectors_id=vectors_id, max_words=max_words)
    return load_cache(folder, vectors_id=vectors_id)


__all__ = [
    "DEFAULT_VECTORS",
    "UnknownWordError",
    "VectorFileError",
    "WordVectors",
    "convert_to_cache",
    "default_cache_dir",
    "load_cache",
    "load_vectors",
    "read_wink_json",
    "sort_orders",
]
