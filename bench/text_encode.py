"""Query encoding with the default text space (all-MiniLM-L6-v2 on CPU) next to top-k search.

Measures, on this machine:
- a cold query in a fresh process: with its encoding in the on-disk cache (no
  sentence-transformers import) and without (import + load + encode);
- in one warm process: one new query, a batch of 16 new queries, a cached query;
- exact top-10 over 100,000 x 384 unit rows for one query and per query in a batch of 16.

    python bench/text_encode.py [--rows 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

_COLD = """
import time, json
t0 = time.perf_counter()
from devise.text import load_text_space
space = load_text_space("minilm")
v = space.encode([{query!r}])
import sys
print(json.dumps({{"s": time.perf_counter() - t0,
                   "imported_st": "sentence_transformers" in sys.modules}}))
"""


def _cold(home: Path, query: str) -> dict:
    env = {**os.environ, "DEVISE_HOME": str(home)}
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", _COLD.format(query=query)],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    inner = json.loads(out.stdout.strip().splitlines()[-1])
    return {"process_s": wall, "in_process_s": inner["s"], "imported_st": inner["imported_st"]}


def _median(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run(work: Path, rows: int = 100_000, repeat: int = 5) -> dict:
    from devise.search import normalize_rows, top_k
    from devise.text import EncodingCache, load_text_space

    work.mkdir(parents=True, exist_ok=True)
    home = work / "home"
    miss = _cold(home, "running shoes")  # empty cache: imports sentence-transformers
    hit = _cold(home, "running shoes")  # same text, now in the on-disk cache

    space = load_text_space("minilm")
    space.cache = EncodingCache(None)  # memory only, so every new text is a real encoding
    space.encode(["warm-up"])
    counter = iter(range(10**9))

    def fresh(n: int) -> list[str]:
        return [f"a photo of item {next(counter)}" for _ in range(n)]

    single = _median(lambda: space.encode(fresh(1)), repeat)
    batch16 = _median(lambda: space.encode(fresh(16)), repeat)
    space.encode(["winter jacket"])
    cached = _median(lambda: space.encode(["winter jacket"]), repeat)

    rng = np.random.default_rng(0)
    matrix = normalize_rows(rng.standard_normal((rows, space.dim)))
    queries = normalize_rows(rng.standard_normal((16, space.dim)))
    top_k(matrix, queries[:1], 10)
    topk1 = _median(lambda: top_k(matrix, queries[:1], 10), repeat)
    topk16 = _median(lambda: top_k(matrix, queries, 10), repeat) / 16
    return {
        "text_space": space.id,
        "cold_cache_miss": miss,
        "cold_cache_hit": hit,
        "encode_single_ms": 1e3 * single,
        "encode_batch16_per_query_ms": 1e3 * batch16 / 16,
        "encode_batch16_ms": 1e3 * batch16,
        "encode_cached_ms": 1e3 * cached,
        "topk_rows": rows,
        "topk_single_ms": 1e3 * topk1,
        "topk_batch16_per_query_ms": 1e3 * topk16,
    }


def table(r: dict) -> str:
    n = f"{r['topk_rows']:,} x 384"
    lines = [
        f"| query with {r['text_space']} on CPU | encode (ms) | top-10 of {n} (ms) |",
        "| --- | ---: | ---: |",
        f"| 1 new query | {r['encode_single_ms']:.1f} | {r['topk_single_ms']:.1f} |",
        (
            f"| batch of 16 new queries, per query | {r['encode_batch16_per_query_ms']:.1f} "
            f"| {r['topk_batch16_per_query_ms']:.2f} |"
        ),
        (
            f"| 1 query from the encoding cache | {r['encode_cached_ms']:.2f} | "
            f"{r['topk_single_ms']:.1f} |"
        ),
        "",
        "| fresh process, first query vector | seconds | imports sentence-transformers |",
        "| --- | ---: | --- |",
    ]
    for name, key in (("not in the cache", "cold_cache_miss"), ("in the cache", "cold_cache_hit")):
        c = r[key]
        lines.append(f"| {name} | {c['process_s']:.2f} | {'yes' if c['imported_st'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="devise-text-bench-") as tmp:
        r = run(Path(tmp), args.rows)
    print(table(r))
    print(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
