"""The `devise` command line: one sub-command per stage, each defined next to its code."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules that register a sub-command with add_cli(subparsers), in help order.
COMMAND_MODULES = (
    "devise.assets",
    "devise.catalog",
    "devise.training",
    "devise.embed",
    "devise.search",
    "devise.serve",
    "devise.evaluate",
    "devise.demo",
)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors a user can cause (bad path, unknown word, broken file): printed as one line."""
    errors: list[type[BaseException]] = [FileNotFoundError]
    for module, names in {
        "devise.assets": ["AssetError"],
        "devise.backbones": ["BackboneError"],
        "devise.catalog": ["CatalogError"],
        "devise.images": ["ImageDecodeError"],
        "devise.vectors": ["UnknownWordError", "VectorFileError"],
        "devise.embed": ["EmbedError"],
        "devise.search": ["SearchError"],
        "devise.serve": ["ServeError"],
        "devise.training": ["TrainError"],
        "devise.evaluate": ["EvalError"],
        "devise.features": ["FeatureError"],
    }.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        errors += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return tuple(errors)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="devise",
        description="Search images by words with a visual-semantic embedding (DeViSE) on Ray.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # stage not built into this version
                continue
            raise
        module.add_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except _user_errors() as e:
        if args.debug:
            raise
        msg = str(e).strip().strip('"') or type(e).__name__
        print(f"devise {args.command}: error: {msg}", file=sys.stderr)
        return getattr(e, "EXIT_CODE", 2)
    except KeyboardInterrupt:
        print(f"devise {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
