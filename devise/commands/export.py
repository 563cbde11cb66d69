"""`devise export`: the current embeddings version as one flat parquet file."""

from __future__ import annotations

import argparse


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write the current embeddings version as one flat parquet file",
        description="One parquet file: id (the 16-hex id search returns), row (the row "
        "number in the version), path, label, "
        "class_name, embedding (float32 fixed-size list, FLOAT[D] in DuckDB), for DuckDB, "
        "pandas or faiss.",
    )
    p.add_argument("embeddings", metavar="EMB", help="embeddings folder (EMB_DIR)")
    p.add_argument(
        "--to",
        required=True,
        metavar="FILE.parquet",
        help="output file (a new name or a regular file, outside every embeddings folder)",
    )
    p.add_argument("--version", help="export this version instead of the current one")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the file, then say how many rows went into it."""
    from devise.store import export_parquet

    out, rows = export_parquet(args.embeddings, args.to, args.version)
    print(f"Wrote {rows} rows to {out}")
    return 0
