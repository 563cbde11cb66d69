"""The cache root of devise ($DEVISE_HOME), read at call time; imports nothing from devise."""

from __future__ import annotations

import os
from pathlib import Path


def devise_home() -> Path:
    """The cache root: $DEVISE_HOME (when set and not empty), else ~/.cache/devise; read at call
    time. Every cache of devise (assets, word vectors, text encodings, features) lives below it."""
    return Path(os.environ.get("DEVISE_HOME") or "~/.cache/devise").expanduser()
