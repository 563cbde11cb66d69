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


def test_engine_rows_say_in_words_which_side_is_faster() -> None:
    from engines_bench import ratio, table

    assert ratio(1.0, 5.0) == "new is 5.0x faster" and ratio(3.0, 2.0) == "new is 1.5x slower"
    r = {
        "cold_phrase": {"onnx_s": [1.0, 1.2], "torch_s": [20.0, 24.0]},
        "embedding": [{"images": 1000, "image_size": 224, "onnx_s": 10.0, "torch_s": 50.0,
                       "notebook_s": 60.0}],
        "cold_search": [{"rows": 100000, "index_kind": "ivf-pq", "index_s": 3.0, "exact_s": 2.0}],
    }  # fmt: skip
    lines = table(r).splitlines()
    assert len(lines) == 2 + 1 + 2 + 1
    assert "new is 20.0x faster than sentence-transformers" in lines[2]
    assert "new is 5.0x faster than --engine torch" in lines[3]
    assert "new is 6.0x faster than the notebook's loop" in lines[4]
    assert "new is 1.5x slower than exact, no index" in lines[5]
