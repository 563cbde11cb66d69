"""Run planning: which input rows a run embeds, keeps from the version it builds on, or records
as missing, and the refusal when too many inputs failed."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from devise.store.errors import TooManyErrorsError
from devise.store.format import KEY_COLUMNS, row_keys

if TYPE_CHECKING:
    import pandas as pd


def check_failures(failed: int, total: int, max_fraction: float, detail: str, kept: str) -> None:
    """Refuse (TooManyErrorsError) when more than max_fraction of total inputs failed."""
    if total and failed > max_fraction * total:
        raise TooManyErrorsError(
            f"{failed} of {total} inputs failed ({detail}), more than --max-error-fraction "
            f"{max_fraction:g}; nothing was committed and {kept}. Check that the images are "
            "reachable, or pass a higher --max-error-fraction."
        )


@dataclass
class Base:
    """The committed version a run carries unchanged rows over from, and which of its files
    to take them from (a repair leaves out the damaged ones)."""

    version: str
    parts: list[Path]
    errors: Path | None
    hashes: dict[str, str] = field(default_factory=dict)


@dataclass
class Plan:
    """What a run does with each input row (every row lands in exactly one table), and the
    versions it builds on."""

    todo: pd.DataFrame  # to embed (INPUT_COLUMNS)
    keep: pd.DataFrame  # unchanged since the base version: reuse its row or error
    missing: pd.DataFrame  # no such file: an error without a decode
    removed: list[str]  # in the previous version, not in the input any more
    base: Base | None = None  # where kept rows come from
    previous: str | None = None  # the current version when the run started
    damaged: list[str] = field(default_factory=list)  # moved aside by a repair's commit


def plan_run(
    table: pd.DataFrame,
    base: pd.DataFrame | None,
    previous_paths: Iterable[str] = (),
    hashes: Sequence[str | None] | None = None,
    base_hashes: dict[str, str] | None = None,
) -> Plan:
    """Split the input (INPUT_COLUMNS, stat'd; size -1 = missing) against the base version.

    base: (path, size_bytes, mtime_ns) of every row and error in the base version (same model),
    or None for a full run. A row is kept when its path, size and mtime all match the base, and,
    when hashes (one per input row) are given, its content hash matches base_hashes too; new or
    changed rows are embedded; removed = previous paths not in the input.
    """
    missing_mask = table["size_bytes"].to_numpy() < 0
    present = table[~missing_mask]
    if base is not None and len(base) and len(present):
        known = set(row_keys(base[KEY_COLUMNS]))
        same = row_keys(present).map(lambda k: k in known).to_numpy(dtype=bool)
        if hashes is not None:
            want = base_hashes or {}
            now = np.asarray(hashes, dtype=object)[~missing_mask]
            same &= np.array([want.get(p) == h for p, h in zip(present["path"], now)], dtype=bool)
    else:
        same = np.zeros(len(present), dtype=bool)
    inputs = set(table["path"])
    removed = sorted(p for p in set(previous_paths) if p not in inputs)
    return Plan(
        todo=present[~same].reset_index(drop=True),
        keep=present[same].reset_index(drop=True),
        missing=table[missing_mask].reset_index(drop=True),
        removed=removed,
    )
