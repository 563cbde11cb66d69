"""Ray job: train the DeViSE head (same flags as `devise train`).

    ray job submit --working-dir . -- python jobs/train.py --catalog C --out RUN_DIR ...

Joins the cluster at RAY_ADDRESS (or --address) when set, else starts a local Ray; --local trains
in this process without Ray. Rerunning the same command resumes from the latest checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python jobs/train.py` puts jobs/ on sys.path, not the working dir that holds devise/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import devise.cli


def main(argv: list[str] | None = None) -> int:
    return devise.cli.main(argv, prog="python jobs/train.py", command="train")


if __name__ == "__main__":
    sys.exit(main())
