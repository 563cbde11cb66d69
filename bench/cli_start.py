"""Start-up of the `devise` command: `devise --help` and every `devise SUB --help`, beside a bare
`python -c pass`, as fresh processes (the median of several runs; no asserts, it measures).

    python bench/cli_start.py [--runs 5] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _seconds(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(
            cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True
        )
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(runs: int = 5) -> dict:
    """{'python -c pass': s, 'devise --help': s, 'devise SUB --help': s, ...} in seconds."""
    from devise.cli import build_parser

    action = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices)
    py = [sys.executable]
    rows = {"python -c pass": _seconds([*py, "-c", "pass"], runs)}
    rows["devise --help"] = _seconds([*py, "-m", "devise", "--help"], runs)
    for sub in action.choices:
        rows[f"devise {sub} --help"] = _seconds([*py, "-m", "devise", sub, "--help"], runs)
    return rows


def table(rows: dict) -> str:
    """A markdown table of run()'s seconds, each beside `python -c pass`."""
    base = rows["python -c pass"]
    lines = ["| command | seconds | over python -c pass |", "| --- | ---: | ---: |"]
    lines += [f"| `{name}` | {s:.3f} | {s - base:+.3f} |" for name, s in rows.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="runs per command (median)")
    p.add_argument("--json", dest="json_out", help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    rows = run(args.runs)
    print(table(rows))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
