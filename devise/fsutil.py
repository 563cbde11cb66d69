"""File-system helpers: outputs written by temp-then-rename, file identity (stat, content hash)
and paths made safe to print."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_mode(path: str | os.PathLike) -> Path:
    """Give a temp file or folder (mkstemp/mkdtemp make them private, 0600/0700) the mode a plain
    open() or mkdir() would have, so other users and pods on shared storage can read outputs."""
    path = Path(path)
    mask = _umask()
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            os.chmod(root, 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)
    return path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to `path` to write into. When the block ends without error the file
    gets normal permissions and replaces `path` in one rename, so readers see the old file or the
    new one, never half of one; on error it is removed. Temporary names are `.NAME.HEX.tmp`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        normal_mode(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder next to `path` to fill. When the block ends without error the folder
    gets normal permissions and is renamed to `path` (which must not exist yet), so readers see
    no folder or a complete one; on error, or when the rename fails, it is removed. Temporary
    names are `.NAME.HEX.tmp`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        normal_mode(tmp)
        fsync_dir(tmp)
        os.rename(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (new names, renames) to disk where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F]} | {
    0x0A: "\\n",
    0x0D: "\\r",
    0x09: "\\t",
}


def printable(text: str | os.PathLike) -> str:
    """A path or name safe to print on one line: control characters escaped (\\n, \\x1b) and
    bytes that are not UTF-8 (surrogate-escaped by the OS layer) shown as \\xNN."""
    text = os.fspath(text)
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text.translate(_CONTROL)


def stat_paths(paths: Sequence[str], threads: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(size_bytes, mtime_ns) int64 arrays for paths; -1 where a path is missing or unreadable.

    Threads, since stat() waits on the file system (NFS) rather than the CPU.
    """

    def one(p: str) -> tuple[int, int]:
        try:
            st = os.stat(p)
        except OSError:
            return -1, -1
        return st.st_size, st.st_mtime_ns

    if len(paths) > 2000:
        with ThreadPoolExecutor(threads) as pool:
            stats = list(pool.map(one, paths, chunksize=512))
    else:
        stats = [one(p) for p in paths]
    arr = np.array(stats, dtype=np.int64).reshape(-1, 2)
    return arr[:, 0].copy(), arr[:, 1].copy()


def hash_paths(paths: Sequence[str], threads: int = 8) -> list[str | None]:
    """A 128-bit BLAKE2b digest of each file's bytes (None where it cannot be read): what
    `--verify content` compares, since size and mtime miss a same-size overwrite whose mtime
    was put back."""

    def one(p: str) -> str | None:
        try:
            with open(p, "rb") as f:
                return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()
        except OSError:
            return None

    with ThreadPoolExecutor(threads) as pool:  # hashlib releases the GIL on large reads
        return list(pool.map(one, paths, chunksize=64))


def name_problem(path: str | os.PathLike) -> str | None:
    """Why a path cannot travel through parquet tables and one-line outputs unharmed, or None:
    bytes that are not UTF-8, or a control character (a newline, a tab, an escape)."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "the file name is not valid UTF-8"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        return "the file name contains a control character (a newline, tab or escape)"
    return None
