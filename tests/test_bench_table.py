"""The bench table reads one way: every speed-up is how many times faster devise is, whether
the row measures seconds or images/s."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from report import Row, cells, fmt_speedup, markdown


def test_time_and_throughput_rows_both_say_how_many_times_faster_devise_is() -> None:
    # devise takes 2 s where the notebook takes 5 s: 2.5x faster.
    time_row = cells(Row("embed 1,000 images", "s", devise=2.0, notebook=5.0))
    assert time_row[0] == "embed 1,000 images (s)"
    assert time_row[3] == "2.50x"
    # devise does 440 images/s where the notebook does 800: slower, and printed so.
    rate_row = cells(Row("Ray Data steady state", "images/s", 440.0, 800.0, 660.0, "raw forward"))
    assert rate_row[3] == "0.55x (slower)"
    assert rate_row[4] == "660 (raw forward)" and rate_row[5] == "0.67x (slower)"
    # A time row against a floor reads the same way as a rate row against a ceiling.
    floor_row = cells(Row("search, 1 query", "ms", devise=5.2, notebook=92.9, limit=5.7))
    assert floor_row[3] == "17.9x" and floor_row[5] == "1.10x"


def test_markdown_has_one_line_per_row_and_blank_cells_for_missing_numbers() -> None:
    text = markdown([Row("cached load", "s", 0.124, 69.06), Row("features", "images/s", 300.0)])
    lines = text.splitlines()
    assert len(lines) == 4 and "x faster" in lines[0]
    assert lines[2].startswith("| cached load (s) | 0.124 | 69.06 | 557x |")
    assert lines[3] == "| features (images/s) | 300 |  |  |  |  |"
    assert fmt_speedup(1.0) == "1.00x" and fmt_speedup(0.999) == "1.00x (slower)"
