"""WordNet 3.0 nouns shipped with devise: what a class id means (lemmas, gloss, hypernyms) and
which classes a group word such as "bird" or "vehicle" covers.

The table (devise/data/wordnet.json.gz, made by scripts/wordnet_table.py) holds the synsets of
ImageNet-21k's wnids, which include ImageNet-1k's and Tiny ImageNet's, and all their
hypernyms. A wnid such as n01443537 is a WordNet 3.0 noun offset. Read once, on first use.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

TABLE = "data/wordnet.json.gz"

# How a class is put into words before it is encoded (labels.class_texts). `devise train
# --class-text auto` picks one on pseudo-unseen training classes and records it in the model.
#   name         its display name ("goldfish")
#   names        the mean of its names' encodings ("goldfish", "carassius auratus")
#   gloss        "name: description" ("goldfish: small golden or orange-red freshwater fishes...")
#   names-gloss  "name, name2: description"
#   hypernyms-gloss  "name (what it is a kind of, up the WordNet chain): description"
#                ("goose (anseriform bird, waterfowl, aquatic bird, bird, ...): web-footed ...")
# Descriptions are WordNet's glosses (this table) or the user's --class-text-file.
WORDINGS = ("name", "names", "gloss", "names-gloss", "hypernyms-gloss")

# Hypernyms too general to say what a class is; a chain stops before the first of them.
_TOO_GENERAL = frozenset(
    [
        "entity",
        "physical entity",
        "object",
        "whole",
        "abstraction",
        "artifact",
        "living thing",
        "organism",
        "matter",
        "instrumentality",
        "thing",
        "causal agent",
        "unit",
        "part",
    ]
)
CHAIN_LENGTH = 6


@dataclass(frozen=True)
class Synset:
    """One noun synset: its wnid, lemmas (most common first), gloss and direct hypernyms."""

    wnid: str
    lemmas: tuple[str, ...]
    gloss: str
    hypernyms: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.lemmas[0]


@cache
def _table() -> dict:
    raw = resources.files("devise").joinpath(TABLE).read_bytes()
    return json.loads(gzip.decompress(raw))


def is_wnid(key: str) -> bool:
    """True for a WordNet 3.0 noun id this table knows ("n01443537")."""
    return key in _table()["synsets"]


def synset(wnid: str) -> Synset:
    """The synset of a wnid (KeyError if the table does not hold it)."""
    s = _table()["synsets"][wnid]
    return Synset(wnid, tuple(s["l"]), s["g"], tuple(s["h"]))


def imagenet1k() -> list[str]:
    """ImageNet-1k's 1,000 wnids in the order of an ImageNet classifier's outputs."""
    return list(_table()["imagenet1k"])


@cache
def ancestors(wnid: str) -> frozenset[str]:
    """Every hypernym of wnid, over all paths to the root (not wnid itself)."""
    out: set[str] = set()
    todo = [wnid]
    while todo:
        for h in _table()["synsets"][todo.pop()]["h"]:
            if h not in out:
                out.add(h)
                todo.append(h)
    return frozenset(out)


@cache
def _by_lemma() -> dict[str, list[str]]:
    index: dict[str, list[str]] = {}
    for key, s in _table()["synsets"].items():
        for lemma in s["l"]:
            index.setdefault(lemma.lower(), []).append(key)
    return index


def lookup(word: str) -> list[str]:
    """Wnids whose lemmas include word (case and "_" vs " " ignored), in table order."""
    return list(_by_lemma().get(" ".join(word.replace("_", " ").lower().split()), []))


def noun_for_name(name: str) -> str | None:
    """The wnid a folder name ("automobile", "ankle_boot") names: its one synset in the table,
    or of several the one WordNet lists first (the most common sense: "dress" is the garment,
    "cat" the feline); None when no synset has this lemma."""
    hits = lookup(name)
    if len(hits) <= 1:
        return hits[0] if hits else None
    key = " ".join(name.replace("_", " ").lower().split())
    ranked = [w for w in _table()["senses"].get(key, []) if w in hits]
    return ranked[0] if ranked else None


def hypernym_chain(wnid: str, length: int = CHAIN_LENGTH) -> list[str]:
    """The names of what wnid is a kind of, nearest first, along its first hypernyms, stopping
    before the most general ones ("entity", "object", "artifact", "organism", ...)."""
    out: list[str] = []
    key = wnid
    while len(out) < length:
        parents = _table()["synsets"][key]["h"]
        if not parents:
            break
        key = parents[0]
        name = _table()["synsets"][key]["l"][0]
        if name in _TOO_GENERAL:
            break
        out.append(name)
    return out


def covers(concept: str, wnid: str) -> bool:
    """True when class wnid is concept or one of its hyponyms."""
    return wnid == concept or concept in ancestors(wnid)


def concept_for(word: str, classes: list[str], min_classes: int = 2) -> str | None:
    """The synset a group word names among classes (wnids): of the synsets with this lemma, the
    one covering the most classes, if it covers at least min_classes; else None."""
    best, best_n = None, 0
    for key in lookup(word):
        n = sum(covers(key, c) for c in classes if is_wnid(c))
        if n > best_n:
            best, best_n = key, n
    return best if best_n >= min_classes else None
