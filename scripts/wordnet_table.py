"""Generate devise/data/wordnet.json.gz: WordNet 3.0 noun synsets for class ids and concept words.

The table holds every synset of a list of ImageNet wnids (ImageNet-21k's, which include
ImageNet-1k's and Tiny ImageNet's) and all their hypernyms: for each, its lemmas, gloss and
direct hypernyms (instance hypernyms included). It also records ImageNet-1k's 1,000 wnids in
classifier order. devise reads it at run time (devise/wordnet.py); nothing is fetched then.

Inputs (both from package registries, read once here):
- WordNet 3.0's dict folder: Debian's `wordnet-base` (`apt-get download wordnet-base &&
  dpkg-deb -x wordnet-base_*.deb root`: root/usr/share/wordnet); its data.noun is read here
  in WordNet's documented database format (wndb(5WN)).
- The wnid lists: timm's wheel carries them (`pip download --no-deps timm`, unzip
  timm/data/_info/imagenet_synsets.txt and imagenet21k_goog_synsets.txt).

    python scripts/wordnet_table.py --wordnet root/usr/share/wordnet \
        --imagenet1k imagenet_synsets.txt --wnids imagenet21k_goog_synsets.txt \
        --out devise/data/wordnet.json.gz

WordNet 3.0 licence (Princeton University; redistribution allowed with this notice) is copied
into the table's "licence" field.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

LICENCE = (
    "WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved. Permission to "
    "use, copy, modify and distribute this software and database and its documentation for "
    "any purpose and without fee or royalty is hereby granted, provided that you agree to "
    "comply with the following copyright notice and statements, including the disclaimer, and "
    "that the same appear on ALL copies of the software, database and documentation, including "
    "modifications that you make for internal use or for distribution. THIS SOFTWARE AND "
    'DATABASE IS PROVIDED "AS IS" AND PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR '
    "WARRANTIES, EXPRESS OR IMPLIED. The name of Princeton University or Princeton may not be "
    "used in advertising or publicity pertaining to distribution of the software and/or "
    "database. Title to copyright in this software, database and any associated documentation "
    "shall at all times remain with Princeton University and LICENSEE agrees to preserve same."
)


def read_nouns(data_noun: Path) -> dict[str, dict]:
    """data.noun -> {wnid: {"l": lemmas, "g": gloss, "h": direct hypernym wnids}}.

    A line is `offset lex_filenum ss_type w_cnt(hex) [word lex_id]... p_cnt [ptr]... | gloss`,
    a pointer `symbol offset pos source/target`; "@" is a hypernym, "@i" an instance hypernym.
    """
    out: dict[str, dict] = {}
    with open(data_noun, encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):  # the licence header
                continue
            fields, _, gloss = line.partition(" | ")
            tok = fields.split()
            n_words = int(tok[3], 16)
            words = [tok[4 + 2 * i] for i in range(n_words)]
            pos = 4 + 2 * n_words
            n_ptrs = int(tok[pos])
            hyper = []
            for i in range(n_ptrs):
                sym, off, ptr_pos = tok[pos + 1 + 4 * i : pos + 4 + 4 * i]
                if sym in ("@", "@i") and ptr_pos == "n":
                    hyper.append(f"n{off}")
            lemmas = [w.replace("_", " ") for w in words]
            # Adjective markers such as "(p)" never occur on nouns; strip any to be safe.
            lemmas = [w.split("(")[0] for w in lemmas]
            out[f"n{tok[0]}"] = {"l": lemmas, "g": gloss.strip().split('; "')[0], "h": hyper}
    return out


def read_sense_order(index_noun: Path) -> dict[str, list[str]]:
    """index.noun -> {lemma: [wnid, ...]} in WordNet's sense order (most frequent first).

    A line is `lemma pos synset_cnt p_cnt [ptr_symbol]... sense_cnt tagsense_cnt offset...`.
    """
    out: dict[str, list[str]] = {}
    with open(index_noun, encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):
                continue
            tok = line.split()
            n_synsets, n_ptrs = int(tok[2]), int(tok[3])
            offsets = tok[6 + n_ptrs : 6 + n_ptrs + n_synsets]
            out[tok[0].replace("_", " ")] = [f"n{o}" for o in offsets]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wordnet", required=True, help="WordNet 3.0 dict folder (data.noun, ...)")
    p.add_argument("--imagenet1k", required=True, help="ImageNet-1k wnids, classifier order")
    p.add_argument("--wnids", nargs="*", default=[], help="more wnid lists to include")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    nouns = read_nouns(Path(args.wordnet) / "data.noun")
    in1k = [w.strip() for w in Path(args.imagenet1k).read_text().split() if w.strip()]
    wanted = list(
        dict.fromkeys(in1k + [w for f in args.wnids for w in Path(f).read_text().split()])
    )
    table: dict[str, dict] = {}
    todo = list(wanted)
    while todo:
        key = todo.pop()
        if key in table:
            continue
        if key not in nouns:
            raise SystemExit(f"{key} is not a WordNet 3.0 noun synset")
        table[key] = nouns[key]
        todo.extend(nouns[key]["h"])
    # Sense order of each lemma with several synsets in the table (for folder names: the most
    # common sense of "dress" is the garment, not attire).
    order = read_sense_order(Path(args.wordnet) / "index.noun")
    lemmas = {lem.lower() for s in table.values() for lem in s["l"]}
    senses = {}
    for lemma in sorted(lemmas):
        ranked = [w for w in order.get(lemma, []) if w in table]
        if len(ranked) > 1:
            senses[lemma] = ranked
    out = {
        "source": "WordNet 3.0 (Princeton University), noun synsets",
        "licence": LICENCE,
        "imagenet1k": in1k,
        "synsets": dict(sorted(table.items())),
        "senses": senses,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    # mtime=0: the same inputs give the same bytes.
    Path(args.out).write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
    print(f"{args.out}: {len(table)} synsets, {len(in1k)} ImageNet-1k classes")


if __name__ == "__main__":
    main()
