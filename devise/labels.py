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
from devise.wordnet import WORDINGS

if TYPE_CHECKING:
    from devise.vectors import WordVectors

# How a class with several names (Tiny ImageNet's synonym lists) gets one vector:
# "mean" averages each name's unit encoding; "joined" encodes the names joined by ", ".
SYNONYM_STRATEGIES = ("mean", "joined")


@dataclass
class ClassInfo:
    """One class: its key (a wnid or a folder name), its names, most common first, and a
    description (WordNet's gloss, or the user's own words) that may be empty."""

    key: str
    names: list[str] = field(default_factory=list)
    description: str = ""
    kind_of: list[str] = field(default_factory=list)  # WordNet hypernyms, nearest first


def class_texts(info: ClassInfo, wording: str) -> list[str]:
    """The texts whose unit encodings are averaged into the class's vector (see WORDINGS).

    A class with no description is worded by its names alone."""
    if wording not in WORDINGS:
        raise ValueError(f"class wording must be one of {', '.join(WORDINGS)}, not {wording!r}.")
    names = info.names or [info.key]
    if wording == "name":
        return names[:1]
    if wording == "names" or not info.description:
        return names
    if wording == "gloss":
        return [f"{names[0]}: {info.description}"]
    if wording == "hypernyms-gloss" and info.kind_of:
        return [f"{names[0]} ({', '.join(info.kind_of)}): {info.description}"]
    if wording == "hypernyms-gloss":
        return [f"{names[0]}: {info.description}"]
    return [f"{', '.join(names)}: {info.description}"]


def describe(classes: Sequence[ClassInfo], texts: dict[str, str] | None = None) -> list[ClassInfo]:
    """Classes with names and descriptions filled in: a WordNet id (Tiny ImageNet, ImageNet)
    gets its lemmas (when it has no names) and gloss; a folder name the gloss of the WordNet
    noun it names in its most common sense; `texts` (key or name -> description, from
    --class-text FILE) replaces either."""
    from devise import wordnet

    texts = texts or {}
    out = []
    for info in classes:
        names = list(info.names)
        description = info.description
        kind_of = list(info.kind_of)
        wnid = info.key if wordnet.is_wnid(info.key) else None
        if wnid is None and names:
            wnid = wordnet.noun_for_name(names[0])
        if wnid is not None:
            syn = wordnet.synset(wnid)
            if not names:
                names = [n.lower() for n in syn.lemmas]
            description = description or syn.gloss
            kind_of = kind_of or wordnet.hypernym_chain(wnid)
        name = names[0] if names else info.key
        description = texts.get(info.key) or texts.get(name) or description
        out.append(ClassInfo(info.key, names, description, kind_of))
    return out


def read_class_text(path: str | os.PathLike) -> dict[str, str]:
    """A --class-text file: one class a line, "key<TAB>description" (a key is a class id or
    name); blank lines and lines starting with # are skipped."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(
            f"Class text file {path} cannot be read ({e.__class__.__name__})."
        ) from None
    out: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, text = line.partition("\t")
        if not sep or not key.strip() or not text.strip():
            raise ValueError(f'Line {n} of class text file {path} is not "class<TAB>description".')
        out[key.strip()] = " ".join(text.split())
    return out


@dataclass
class ClassVectors:
    """Classes that have a vector: keys, display names, and (C, D) float32 unit-length rows."""

    keys: list[str]
    names: list[str]
    matrix: np.ndarray
    missing: list[str] = field(default_factory=list)
    # The backbone classifier's labels (selection.ClassifierLabels) and their (L, D) vectors in
    # the same wording, for a model's ConSE branch; None when the backbone has no classifier.
    labels: object | None = None
    label_vectors: np.ndarray | None = None

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
    classes: Sequence[ClassInfo],
    space: TextSpace | WordVectors,
    synonyms: str = "mean",
    wording: str | None = None,
) -> ClassVectors:
    """Unit-length vector of each class from its names; classes with none are excluded.

    Each name is encoded as a phrase by the text space (space.encode). A class with several
    names: synonyms="mean" averages the unit encodings of the names that have one, "joined"
    encodes "name1, name2, ..." as one text (with a word table this is the mean over all their
    words). wording (one of WORDINGS) words each class by class_texts instead; a text with no
    vector is left out. Excluded classes are named in one warning; if no class has a vector,
    ValueError.
    """
    if synonyms not in SYNONYM_STRATEGIES:
        raise ValueError(f"synonyms must be one of {SYNONYM_STRATEGIES}, not {synonyms!r}.")
    space = as_text_space(space)
    texts: list[list[str]] = []
    for info in classes:
        if wording is not None:
            texts.append([t for t in class_texts(info, wording) if space.has_vector(t)])
            continue
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
