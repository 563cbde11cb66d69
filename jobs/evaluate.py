"""Ray job: the paper-style evaluation report (same flags as `devise evaluate`).

ray job submit --working-dir . -- python jobs/evaluate.py --model RUN/model --catalog C --out R
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python jobs/evaluate.py` puts jobs/ on sys.path, not the working dir that holds devise/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import devise.cli


def main(argv: list[str] | None = None) -> int:
    return devise.cli.main(argv, prog="python jobs/evaluate.py", command="evaluate")


if __name__ == "__main__":
    sys.exit(main())
