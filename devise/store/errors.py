"""What goes wrong with an embeddings folder, as DeviseError subclasses that say what to do."""

from __future__ import annotations

from pathlib import Path

from devise.errors import DeviseError
from devise.fsutil import printable


class EmbedError(DeviseError, ValueError):
    """An embedding run or folder that cannot be used; str() says what to do."""


class LockHeldError(EmbedError):
    """Another live run holds EMB_DIR's lock (the command exits with EXIT_CODE)."""

    EXIT_CODE = 75  # EX_TEMPFAIL: nothing was written; a scheduler can treat the tick as skipped


class DamagedVersionError(EmbedError):
    """A committed version whose manifest or files do not match; names the file."""

    def __init__(self, store: Path, version: str, path: Path, problem: str) -> None:
        self.version, self.path = version, path
        super().__init__(f"Version {version} of {store} is damaged: {printable(path)} {problem}")


class TooManyErrorsError(EmbedError):
    """A run whose failed inputs exceed --max-error-fraction: nothing is committed."""
