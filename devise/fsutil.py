"""File-system helpers for outputs written by temp-then-rename."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
