"""`devise search`: words, phrases or an image against the embeddings store."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from devise.config import DEFAULT_K

if TYPE_CHECKING:
    from devise.search import SearchResult


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "search",
        help="search embedded images by words, phrases or an image",
        description="Cosine top-k over the current version of an embeddings folder: exact, or "
        "through the version's index when `devise index` built one (candidates re-scored "
        "exactly; --exact scores every row).",
    )
    p.add_argument(
        "queries", nargs="*", metavar="QUERY", help="words or phrases (any phrase with an encoder)"
    )
    p.add_argument("--embeddings", required=True, help="embeddings folder (EMB_DIR)")
    p.add_argument("-k", type=int, default=DEFAULT_K, help="results per query")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--montage", metavar="OUT.png", help="also write a PNG strip of the results")
    p.add_argument("--image", help="search with an image instead of words")
    p.add_argument(
        "--include-self",
        action="store_true",
        help="with --image: keep the query image in the results when it is indexed itself",
    )
    p.add_argument(
        "--words",
        type=int,
        default=0,
        metavar="N",
        help="with --image: also show the N class names nearest to the image",
    )
    p.add_argument(
        "--vocabulary",
        default="classes",
        help="with --words: labels to name the image with: classes (the model's and the "
        "folder's), imagenet (1,000 ImageNet names) or a FILE with one label a line",
    )
    p.add_argument("--model", help="with --image: the model folder (default: the one embedded)")
    p.add_argument("--vectors", help="text space (default: the one named in the model spec)")
    p.add_argument("--version", help="search this version instead of the current one")
    p.add_argument(
        "--exact", action="store_true", help="exact search even when the version has an index"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`devise search`, on top of devise.api.Index."""
    from devise.api import Index, check_k
    from devise.search import MONTAGE_SUFFIXES, SearchError, SearchResult, montage

    if bool(args.queries) == bool(args.image):
        raise SearchError("Give words to search for, or --image PATH (not both).")
    check_k(args.k)  # Index's own bounds, said before the model loads
    if args.image:  # before the model loads: a file that is no image says so at once
        from devise.images import ImageDecodeError, decode_image

        try:
            decode_image(args.image)
        except ImageDecodeError as e:
            raise ImageDecodeError(f"Cannot use {args.image}: {e}.") from None
    if args.montage:  # before any search: a bad output name must not waste one
        from devise.fsutil import check_output_file

        check_output_file(args.montage, "--montage", MONTAGE_SUFFIXES)
    index = Index.open(
        args.embeddings,
        args.version,
        vectors=args.vectors,
        model=args.model,
        exact=getattr(args, "exact", False),
    )
    if args.image:
        hits = index.search_image(args.image, args.k, include_self=args.include_self)
        labels = []
        if args.words > 0:
            vec = index.encode_images([args.image])[0]
            labels = index.nearest_labels(vec, args.words, vocabulary=args.vocabulary)
        rows = [SearchResult.from_records(str(args.image), hits)]
        if args.json:
            payload = {
                "query": str(args.image),
                "images": hits,
                "labels": [{"label": w, "score": round(s, 6)} for w, s in labels],
            }
            print(json.dumps(payload, indent=2))
        else:
            if labels:
                print("Nearest labels: " + ", ".join(f"{w} ({s:.3f})" for w, s in labels))
            print(f"Nearest images to {args.image} ({index.version}, {len(index)} images):")
            _print_table(rows[0])
    else:
        found = index.search(list(args.queries), args.k)
        rows = [SearchResult.from_records(q, hits) for q, hits in zip(args.queries, found)]
        if args.json:
            print(
                json.dumps(
                    [{"query": q, **h} for q, hits in zip(args.queries, found) for h in hits],
                    indent=2,
                )
            )
        else:
            for i, hits in enumerate(rows):
                if i:
                    print()
                print(f'"{args.queries[i]}" ({index.version}, {len(index)} images):')
                _print_table(hits)
    if args.montage:
        out = montage(rows, args.montage)
        print(f"Wrote {out}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _print_table(hits: Sequence[SearchResult], file=None) -> None:
    names = [h.class_name or h.label or "-" for h in hits]
    width = max([5] + [len(str(n)) for n in names])
    print(f"{'rank':>4}  {'score':>7}  {'class':<{width}}  path", file=file)
    for h, n in zip(hits, names):
        print(f"{h.rank:>4}  {h.score:>7.4f}  {n!s:<{width}}  {h.path}", file=file)
