"""Word-vector loading, side by side: our conversion and cached load vs the notebook's dict."""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import time
from pathlib import Path

import numpy as np

from devise.vectors import load_vectors


def _token_table() -> np.ndarray:
    """(110000, 8) uint8: every 7-character float token ("-0.1234" or "0.12345") plus a space.

    One fixed width lets a whole chunk of lines be built with numpy indexing, no Python per value.
    """
    tokens = [f"-0.{i:04d} " for i in range(10_000)] + [f"0.{i:05d} " for i in range(100_000)]
    return np.frombuffer("".join(tokens).encode("ascii"), dtype=np.uint8).reshape(-1, 8)


def make_vec_file(path: Path, rows: int, dim: int, seed: int = 0, chunk: int = 20_000) -> Path:
    """Write a seeded random fastText .vec ("N D" header, words w0000000...) unless present."""
    width = max(7, len(str(rows - 1)))
    header = f"{rows} {dim}\n".encode("ascii")
    line_bytes = 1 + width + 1 + dim * 8
    if path.is_file() and path.stat().st_size == len(header) + rows * line_bytes:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    table = _token_table()
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(header)
        for a in range(0, rows, chunk):
            n = min(chunk, rows - a)
            out = np.empty((n, line_bytes), dtype=np.uint8)
            words = "".join(f"w{i:0{width}d} " for i in range(a, a + n))
            out[:, : width + 2] = np.frombuffer(words.encode("ascii"), np.uint8).reshape(n, -1)
            idx = rng.integers(0, len(table), size=(n, dim))
            out[:, width + 2 :] = table[idx].reshape(n, dim * 8)
            out[:, -1] = ord("\n")
            f.write(out.tobytes())
    tmp.rename(path)
    return path


def notebook_load(path: Path) -> dict[str, np.ndarray]:
    """The reference notebook's way: one dict entry per line, floats parsed from split strings."""
    with open(path, encoding="utf-8") as f:
        next(f)  # the "N D" header
        return {line.split()[0]: np.array(line.split()[1:], dtype=np.float32) for line in f}


def run(rows: int = 2_000_000, dim: int = 300, workdir: str | Path = "/tmp/devise-bench") -> dict:
    """Time first load (conversion), cached load + one lookup, and the notebook's dict load."""
    workdir = Path(workdir)
    t = time.perf_counter()
    path = make_vec_file(workdir / f"random-{rows}x{dim}.vec", rows, dim)
    generate_s = time.perf_counter() - t
    cache = workdir / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    probe = f"w{rows // 2:0{max(7, len(str(rows - 1)))}d}"

    t = time.perf_counter()
    first = load_vectors(path, cache_dir=cache)
    first.lookup(probe)
    first_s = time.perf_counter() - t
    del first
    gc.collect()

    t = time.perf_counter()
    cached = load_vectors(path, cache_dir=cache)
    ours = cached.lookup(probe)
    cached_s = time.perf_counter() - t

    t = time.perf_counter()
    table = notebook_load(path)
    theirs = table[probe]
    notebook_s = time.perf_counter() - t
    same = bool(np.array_equal(ours, theirs))
    del table, cached
    gc.collect()

    return {
        "rows": rows,
        "dim": dim,
        "file_bytes": path.stat().st_size,
        "generate_s": round(generate_s, 3),
        "ours_first_load_s": round(first_s, 3),
        "ours_cached_load_s": round(cached_s, 3),
        "notebook_load_s": round(notebook_s, 3),
        "ratio_notebook_over_first": round(notebook_s / first_s, 2),
        "ratio_notebook_over_cached": round(notebook_s / cached_s, 1),
        "same_vector": same,
    }


def to_markdown(r: dict) -> str:
    size = f"{r['rows']:,} x {r['dim']} .vec ({r['file_bytes'] / 1e9:.2f} GB)"
    return "\n".join(
        [
            f"Word-vector load, {size}",
            "",
            "| method | seconds | notebook / this |",
            "| --- | ---: | ---: |",
            f"| notebook dict comprehension | {r['notebook_load_s']:.2f} | 1.0 |",
            (
                f"| ours, first load (convert to cache) | {r['ours_first_load_s']:.2f} | "
                f"{r['ratio_notebook_over_first']:.1f} |"
            ),
            (
                f"| ours, cached load + 1 lookup | {r['ours_cached_load_s']:.3f} | "
                f"{r['ratio_notebook_over_cached']:.0f} |"
            ),
            "",
            f"same vector for one probe word: {r['same_vector']}",
        ]
    )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--dim", type=int, default=300)
    p.add_argument("--dir", default="/tmp/devise-bench", help="work folder (file + cache)")
    p.add_argument("--json", dest="json_out", help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    result = run(args.rows, args.dim, args.dir)
    print(to_markdown(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
