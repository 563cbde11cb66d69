"""Approximate index against exact search on clustered synthetic embeddings.

Data: `clusters` Gaussian clusters on the unit sphere in `dim` dimensions; a point is its
cluster's centre plus a Gaussian spread inside a random `rank`-dimensional subspace of the
cluster (decaying variances, like real embeddings, whose variation inside a class spans few
directions) plus small isotropic noise, then L2-normalised. Generated in chunks as float32.

For each size: exact top-10 (devise.similarity.top_k, the path `devise search` runs) of held-out
query rows, the index built by devise.ann's own kind registry and tuner, recall@10 against exact
(the query's own row not counted), latency of one query and per query in batches of 16, build
time, bytes per vector.

    python bench/index_bench.py --sizes 1000000,5000000 [--kind ivf-pq] [--out bench/results]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]


def clustered(
    n: int,
    dim: int = 384,
    clusters: int = 3000,
    rank: int = 16,
    spread: float = 0.35,
    noise: float = 0.15,
    seed: int = 0,
    chunk: int = 8192,
) -> np.ndarray:
    """(n, dim) float32 unit rows drawn from a mixture of `clusters` Gaussian clusters."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    bases = rng.standard_normal((clusters, rank, dim), dtype=np.float32) / np.sqrt(dim)
    scale = (spread / np.sqrt(1.0 + np.arange(rank))).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    # Rows grouped by cluster: one small matrix product a cluster instead of gathering a basis
    # per row (same distribution; row order carries no meaning for the index).
    counts = np.bincount(rng.integers(0, clusters, n), minlength=clusters)
    a = 0
    for c, m in enumerate(counts):
        for s in range(0, m, chunk):
            k = min(chunk, m - s)
            coef = rng.standard_normal((k, rank), dtype=np.float32) * scale
            x = centres[c] + coef @ bases[c]
            x += rng.standard_normal((k, dim), dtype=np.float32) * (noise / np.sqrt(dim))
            out[a : a + k] = x / np.linalg.norm(x, axis=1, keepdims=True)
            a += k
    return out


def _latency(fn, queries: np.ndarray, batch: int, repeats: int) -> float:
    """Median milliseconds per query, searching `batch` queries at a time."""
    times = []
    for r in range(repeats):
        q = queries[(r * batch) % len(queries) :][:batch]
        t = time.perf_counter()
        fn(q)
        times.append((time.perf_counter() - t) * 1e3 / len(q))
    return float(np.median(times))


def run_size(
    n: int, kind: str, dim: int, queries: int, target: float, seed: int, work: Path
) -> dict:
    import faiss

    from devise import ann
    from devise.ann import build
    from devise.ann.index import _vectors_file
    from devise.config import DEFAULT_K
    from devise.similarity import top_k

    t = time.perf_counter()
    x = clustered(n, dim, seed=seed)
    gen_s = time.perf_counter() - t
    rng = np.random.default_rng(seed + 1)
    qid = np.sort(rng.choice(n, size=queries, replace=False))
    q = np.ascontiguousarray(x[qid])

    t = time.perf_counter()
    _, exact_i = top_k(x, q, DEFAULT_K + 1)
    exact_all_s = time.perf_counter() - t
    exact_one = _latency(lambda b: top_k(x, b, 10), q, 1, 5)
    exact_16 = _latency(lambda b: top_k(x, b, 10), q, 16, 3)

    spec = ann.KINDS[ann.choose_kind(kind, n)]
    t = time.perf_counter()
    train_n = min(n, build._make_probe(spec, n, dim))
    train = x[np.sort(rng.choice(n, size=train_n, replace=False))] if train_n else x[:0]
    base = build._train(spec, dim, n, train)
    del train
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    ivf = faiss.try_extract_index_ivf(base)
    for a in range(0, n, 262_144):
        part = x[a : a + 262_144]
        if ivf is not None:
            base.add_with_ids(part, np.arange(a, a + len(part), dtype=np.int64))
        else:
            base.add(part)
    vectors = None
    if spec.rerank:  # the exact vectors on disk, memory-mapped, as a built index keeps them
        path = _vectors_file(work, n, dim)
        mm = np.memmap(path, np.float32, "r+").reshape(n, dim)
        mm[:] = x
        mm.flush()
        del mm
        vectors = np.memmap(path, np.float32, "r").reshape(n, dim)
    add_s = time.perf_counter() - t
    index = ann.AnnIndex(spec.name, base, vectors, {"kind": spec.name, **build._kind_meta(base)})
    t = time.perf_counter()
    params, recall, trials = ann.tune(index, q, exact_i, qid, target)
    tune_s = time.perf_counter() - t
    approx_one = _latency(lambda b: index.search(b, 10), q, 1, 50)
    approx_16 = _latency(lambda b: index.search(b, 10), q, 16, 20)
    return {
        "rows": n,
        "dim": dim,
        "kind": spec.name,
        "generate_s": round(gen_s, 1),
        "exact": {
            "ms_one": round(exact_one, 2),
            "ms_per_query_batch16": round(exact_16, 2),
            "bytes_per_vector": 4 * dim,
            "ground_truth_s": round(exact_all_s, 1),
        },
        "index": {
            "params": params,
            "recall_at_10": round(recall, 4),
            "ms_one": round(approx_one, 3),
            "ms_per_query_batch16": round(approx_16, 3),
            "bytes_per_vector": round(index.bytes_per_vector(), 1),
            "disk_bytes_per_vector": 4 * dim if vectors is not None else 0,
            "train_s": round(train_s, 1),
            "add_s": round(add_s, 1),
            "tune_s": round(tune_s, 1),
            "build_s": round(train_s + add_s + tune_s, 1),
            "train_rows": train_n,
            "trials": trials,
        },
        "speedup_one": round(exact_one / approx_one, 1),
        "speedup_batch16": round(exact_16 / approx_16, 1),
        "memory_ratio": round(index.bytes_per_vector() / (4 * dim), 4),
        "queries": queries,
    }


def rows_for_table(results: list[dict]) -> list[tuple[str, str, str, str]]:
    """(what, index, exact, exact / index) rows for run_all's table."""
    out = []
    for r in results:
        i, e = r["index"], r["exact"]
        n = f"{r['rows']:,} x {r['dim']}"
        out += [
            (
                f"index {r['kind']} {n}: recall@10 ({i['params']})",
                f"{i['recall_at_10']:.3f}",
                "1.000",
                "",
            ),
            (
                f"index {n}: 1 query (ms)",
                f"{i['ms_one']:.2f}",
                f"{e['ms_one']:.1f}",
                f"{r['speedup_one']:.0f}x",
            ),
            (
                f"index {n}: batch of 16, per query (ms)",
                f"{i['ms_per_query_batch16']:.2f}",
                f"{e['ms_per_query_batch16']:.1f}",
                f"{r['speedup_batch16']:.0f}x",
            ),
            (
                f"index {n}: bytes per vector",
                f"{i['bytes_per_vector']:.0f}",
                f"{e['bytes_per_vector']}",
                f"{1 / r['memory_ratio']:.1f}x",
            ),
            (f"index {n}: build (train + add + tune, s)", f"{i['build_s']:.0f}", "", ""),
        ]
    return out


def run(
    sizes: list[int],
    kind: str = "ivf-pq",
    dim: int = 384,
    queries: int = 200,
    target: float = 0.95,
    seed: int = 0,
) -> list[dict]:
    import tempfile

    out = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="devise-index-bench-") as work:
            r = run_size(n, kind, dim, queries, target, seed, Path(work))
        print(
            json.dumps(
                {k: v for k, v in r.items() if k != "index"}
                | {"index": {k: v for k, v in r["index"].items() if k != "trials"}}
            ),
            flush=True,
        )
        out.append(r)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000000", help="comma list of row counts")
    p.add_argument("--kind", default="ivf-pq", help="index kind (auto, flat, ivf-pq, hnsw)")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    results = run(sizes, args.kind, args.dim, args.queries, args.target_recall)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"index-{dt.date.today()}-{'-'.join(str(s) for s in sizes)}.json"
    path.write_text(
        json.dumps(
            {
                "date": dt.datetime.now().isoformat(timespec="seconds"),
                "args": vars(args),
                "results": results,
            },
            indent=1,
        )
        + "\n"
    )
    print("| what | index | exact | exact / index |\n| --- | ---: | ---: | ---: |")
    for row in rows_for_table(results):
        print("| " + " | ".join(row) + " |")
    print(f"numbers in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
