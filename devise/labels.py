"""Class ids -> names -> vectors: Tiny ImageNet wnids/words.txt, folder names, class vectors."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from devise.text import TextSpace, as_text_space

if TYPE_CHECKING:
    from devise.vectors import WordVectors

# How a class with several names (Tiny ImageNet's synonym lists) gets one vector:
# "mean" averages each name's unit encoding; "joined" encodes the names joined by ", ".
SYNONYM_STRATEGIES = ("mean", "joined")


@dataclass
class ClassInfo:
    """One class: its key (a wnid or a folder name) and its names, most common first."""

    key: str
    names: list[str] = field(default_factory=list)


@dataclass
class ClassVectors:
    """Classes that have a vector: keys, display names, and (C, D) float32 unit-length rows."""

    keys: list[str]
    names: list[str]
    matrix: np.ndarray
    missing: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)


def _split_names(text: str) -> list[str]:
    """'Steel arch bridge, bridge' -> ['steel arch bridge', 'bridge'] (lower-case, no repeats)."""
    names = (" ".join(n.split()).lower() for n in text.split(","))
    return list(dict.fromkeys(n for n in names if n))


def read_tiny_imagenet_classes(root: str | os.PathLike) -> list[ClassInfo]:
    """Classes of a Tiny ImageNet folder, in wnids.txt order, named from words.txt.

    root/wnids.txt holds one wnid a line; root/words.txt holds "wnid<TAB>name, name, ...". Names
    are lower-cased and stripped; multi-word names stay phrases ("steel arch bridge"). A wnid
    missing from words.txt gets no names (class_vectors will then exclude it, with a warning).
    """
    root = Path(root)
    wnids_path, words_path = root / "wnids.txt", root / "words.txt"
    for p in (wnids_path, words_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"Tiny ImageNet file {p} does not exist; pass the folder holding wnids.txt "
                "and words.txt."
            )
    wnids = list(
        dict.fromkeys(w.strip() for w in wnids_path.read_text(encoding="utf-8").splitlines())
    )
    wnids = [w for w in wnids if w]
    wanted = set(wnids)
    names: dict[str, list[str]] = {}
    with open(words_path, encoding="utf-8") as f:
        for line in f:
            key, sep, text = line.rstrip("\n").partition("\t")
            key = key.strip()
            if sep and key in wanted and key not in names:
                names[key] = _split_names(text)
    return [ClassInfo(w, names.get(w, [])) for w in wnids]


def folder_classes(names: Iterable[str]) -> list[ClassInfo]:
    """One class per folder name; the name is the folder's with "_" as spaces ("ankle_boot").

    Hyphens are kept ("t-shirt"); word lookup splits them only if the whole token is missing.
    """
    out = []
    for folder in names:
        name = " ".join(folder.replace("_", " ").split())
        out.append(ClassInfo(folder, [name] if name else []))
    return out


def class_name(info: ClassInfo) -> str:
    """Display name: the first name, or the key when the class has none."""
    return info.names[0] if info.names else info.key


def class_vectors(
    classes: Sequence[ClassInfo], space: TextSpace | WordVectors, synonyms: str = "mean"
) -> ClassVectors:
    """Unit-length vector of each class from its names; classes with none are excluded.

    Each name is encoded as a phrase by the text space (space.encode). A class with several
    names: synonyms="mean" averages the unit encodings of the names that have one, "joined"
    encodes "name1, name2, ..." as one text (with a word table this is the mean over all their
    words). Excluded classes are named in one warning; if no class has a vector, ValueError.
    """
    if synonyms not in SYNONYM_STRATEGIES:
        raise ValueError(f"synonyms must be one of {SYNONYM_STRATEGIES}, not {synonyms!r}.")
    space = as_text_space(space)
    texts: list[list[str]] = []
    for info in classes:
        names = [n for n in info.names if space.has_vector(n)]
        if synonyms == "joined" and len(names) > 1:
            names = [", ".join(names)]
        texts.append(names)
    flat = list(dict.fromkeys(t for names in texts for t in names))
    encoded = dict(zip(flat, space.encode(flat))) if flat else {}
    keys: list[str] = []
    display: list[str] = []
    rows: list[np.ndarray] = []
    missing: list[ClassInfo] = []
    for info, names in zip(classes, texts):
        mean = np.mean([encoded[n] for n in names], axis=0, dtype=np.float64) if names else None
        norm = float(np.linalg.norm(mean)) if mean is not None else 0.0
        if norm == 0.0 or not np.isfinite(norm):
            missing.append(info)
            continue
        keys.append(info.key)
        display.append(class_name(info))
        rows.append((mean / norm).astype(np.float32))
    if missing:
        listed = ", ".join(
            f"{c.key} ({class_name(c)})" if c.names else f"{c.key} (no names)" for c in missing
        )
        warnings.warn(
            f"Excluded {len(missing)} of {len(classes)} classes with no vector in "
            f"{space.id}: {listed}.",
            stacklevel=2,
        )
    if not rows:
        raise ValueError(
            f"None of the {len(classes)} classes has a vector in {space.id}; "
            "check the class names or pass another --vectors text space."
        )
    return ClassVectors(
        keys=keys,
        names=display,
        matrix=np.stack(rows).astype(np.float32),
        missing=[c.key for c in missing],
    )
