"""Optional dependencies (pip extras): import one, or say in one line which extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from devise.errors import DeviseError

# The pip extras of pyproject.toml and what each one brings, for the message and for `known`.
EXTRAS: dict[str, str] = {
    "serve": "the search service (Ray Serve, FastAPI, uvicorn)",
    "index": "approximate-nearest-neighbour indexes (faiss)",
    "dev": "tests, lint and browser tests (pytest, ruff, Playwright, DuckDB)",
}


class MissingExtraError(DeviseError, ImportError):
    """An optional dependency is not installed; the message names the pip line that adds it."""


def install_line(extra: str) -> str:
    """The command that installs `extra`, e.g. ``pip install 'devise[serve]'``."""
    return f"pip install 'devise[{extra}]'"


def require(module: str, extra: str, feature: str | None = None) -> ModuleType:
    """Import `module` (e.g. "faiss") and return it, or raise MissingExtraError naming the
    `pip install 'devise[extra]'` line to run. `feature` names what needs it (e.g. "devise serve").

    Call it where the feature starts, not at module import, so the rest of devise (and
    `devise --help`) works without the extra.
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; known: {', '.join(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError as e:
        # Only a missing module (the one asked for or one it needs) is the extra's fault; a
        # broken install of a present package keeps its own message.
        if not isinstance(e, ModuleNotFoundError):
            raise
        what = feature or f"the {extra!r} extra"
        missing = e.name or module
        raise MissingExtraError(
            f"{what} needs {missing!r}, which is not installed: run {install_line(extra)}"
        ) from e
