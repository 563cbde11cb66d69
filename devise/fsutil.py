"""File-system helpers for outputs written by temp-then-rename."""

from __future__ import annotations

import os
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
