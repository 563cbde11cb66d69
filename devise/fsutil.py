"""File-system helpers: outputs written by temp-then-rename, file identity (stat, content hash)
and paths made safe to print."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from devise.errors import DeviseError


class OutputPathError(DeviseError):
    """A user-named output path that must not be written (a device, a folder, inside an
    embeddings store); str() says which path to give instead."""


# What marks a folder as an embeddings store (the names devise/store.py writes).
_STORE_MARKS = ("CURRENT", "versions")


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
    _refuse_special(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        normal_mode(tmp)
        _refuse_special(path)  # something else may have appeared there meanwhile
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _refuse_special(path: Path) -> None:
    # A rename replaces what the name points at: only ever a regular file (never a device,
    # FIFO, socket or folder, even when running as root).
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return
    if not stat.S_ISREG(st.st_mode):
        raise OutputPathError(
            f"{printable(path)} is {_kind(st.st_mode)}, not a regular file; give a new file name."
        )


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def is_store(folder: str | os.PathLike) -> bool:
    """Whether a folder is an embeddings store (it holds CURRENT or a committed version)."""
    folder = Path(folder)
    if (folder / _STORE_MARKS[0]).is_file():
        return True
    try:
        return any((folder / _STORE_MARKS[1]).glob("*/manifest.json"))
    except OSError:
        return False


def check_output_file(
    path: str | os.PathLike,
    flag: str,
    suffixes: Sequence[str] = (),
    owned: str | os.PathLike | None = None,
) -> Path:
    """A user-named output file (`flag` names it in messages) checked before any work: a new
    name or a regular file, whose parent is (or can become) a folder, outside every embeddings
    store except `owned`, and ending with one of `suffixes` when given. OutputPathError (one
    sentence) otherwise; returns the expanded path."""
    path = Path(path).expanduser()
    shown = printable(path)
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        st = None
    except OSError as e:
        raise OutputPathError(f"{flag} {shown} cannot be checked: {e.strerror}.") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        example = path / ("out" + (suffixes[0] if suffixes else ""))
        raise OutputPathError(
            f"{flag} {shown} is a folder; give a file name such as {printable(example)}."
        )
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OutputPathError(
            f"{flag} {shown} is {_kind(st.st_mode)}, not a regular file; give a new file name."
        )
    if suffixes and path.suffix.lower() not in suffixes:
        raise OutputPathError(
            f"{flag} {shown} must end with {' or '.join(suffixes)} (the format is taken from "
            "the name)."
        )
    _check_parents(path.absolute().parent, flag, shown, owned)
    return path


def check_output_dir(
    path: str | os.PathLike, flag: str, owned: str | os.PathLike | None = None
) -> Path:
    """A user-named output folder checked before any work: a folder or a new name, not under
    a file, outside every embeddings store except `owned`. OutputPathError otherwise."""
    path = Path(path).expanduser()
    shown = printable(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{flag} {shown} is a file, not a folder; give a folder path.")
    _check_parents(path.absolute(), flag, shown, owned)
    return path


def _check_parents(
    start: Path, flag: str, shown: str, owned: str | os.PathLike | None = None
) -> None:
    for folder in (start, *start.parents):
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                raise OutputPathError(
                    f"{flag} {shown}: {printable(folder)} is a file, not a folder; give a path "
                    "under a folder."
                )
            break
    owned_root = Path(owned).expanduser().resolve() if owned is not None else None
    real = start.resolve()
    for folder in (real, *real.parents):
        if is_store(folder) and folder != owned_root:
            raise OutputPathError(
                f"{flag} {shown} is inside the embeddings folder {printable(folder)}, which "
                "this command does not write; give a path outside it."
            )


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


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cached_sha256(path: Path, digest: Callable[[Path], str]) -> str:
    """sha256 of a file, remembered in the encoding cache's folder by path, size and mtime."""
    st = path.stat()
    from devise.home import devise_home

    memo = devise_home() / "text" / "sha256.json"
    key = f"{path}\0{st.st_size}\0{st.st_mtime_ns}"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = digest(path)
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
            tmp.write_text(json.dumps(known))
            os.replace(tmp, memo)
        except OSError:
            pass
    return known[key]
