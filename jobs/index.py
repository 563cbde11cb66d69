"""Entry point for `ray job submit -- python jobs/index.py EMB ...`: the same flags as `devise index`."""

from __future__ import annotations

import sys
from pathlib import Path

# `ray job submit --working-dir .` runs this file from the repository root: make devise importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import devise.cli


def main(argv: list[str] | None = None) -> int:
    return devise.cli.main(argv, prog="python jobs/index.py", command="index")


if __name__ == "__main__":
    sys.exit(main())
