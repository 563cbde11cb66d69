"""The search service under load, beside the same search in-process and from a cold CLI.

For each row count: a synthetic embeddings folder (unit rows, D=384 by default) and a word table
of the same size; then
- in-process: `Index.search(q, k)` for the queries, one at a time (query encoding included);
- service: `devise serve`'s app on a local Ray Serve bound to 127.0.0.1, C concurrent clients
  in a bounded loop of GET /api/search (requests/s, p50/p99 latency, errors);
- cold CLI: `python -m devise search WORD --embeddings EMB` end to end, a fresh process each time.

    python bench/serve_bench.py [--rows 100000,1000000] [--clients 8] [--requests 400]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

WORDS = 2000


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def make_folder(root: Path, rows: int, dim: int, seed: int = 0) -> tuple[Path, list[str]]:
    """root/words.vec (WORDS words) and root/emb (one version of `rows` unit rows near them)."""
    import pandas as pd

    from devise.store import Store
    from devise.vectors import load_vectors

    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(WORDS)]
    table = rng.normal(size=(WORDS, dim)).astype(np.float32)
    root.mkdir(parents=True, exist_ok=True)
    vec = root / "words.vec"
    with open(vec, "w") as f:
        f.write(f"{WORDS} {dim}\n")
        f.writelines(
            w + " " + " ".join(f"{x:.4f}" for x in row) + "\n" for w, row in zip(words, table)
        )
    wv = load_vectors(vec)
    emb = root / "emb"
    step = 250_000
    mats = []
    for a in range(0, rows, step):
        n = min(step, rows - a)
        base = table[rng.integers(0, WORDS, n)]
        m = base + 0.8 * rng.normal(size=(n, dim)).astype(np.float32)
        mats.append(m / np.linalg.norm(m, axis=1, keepdims=True))
    frame = pd.DataFrame(
        {"path": [f"/images/{i // 1000:04d}/{i}.jpg" for i in range(rows)], "label": None}
    )
    Store.open(emb, create=True).write_version(
        frame,
        np.concatenate(mats),
        model_id="bench",
        vectors=str(vec),
        vectors_id=wv.vectors_id,
        chunk_rows=100_000,
    )
    return emb, words


def in_process(emb: Path, queries: list[str], k: int) -> dict:
    from devise import Index

    t0 = time.perf_counter()
    index = Index.open(emb)
    index.search(queries[0], k)  # loads the word table
    opened = time.perf_counter() - t0
    times = []
    for q in queries:
        t = time.perf_counter()
        index.search(q, k)
        times.append(time.perf_counter() - t)
    return {"open_s": opened, "p50_ms": 1e3 * _pct(times, 50), "p99_ms": 1e3 * _pct(times, 99)}


def cold_cli(emb: Path, word: str, k: int, runs: int = 3) -> dict:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "devise",
                "search",
                word,
                "--embeddings",
                str(emb),
                "-k",
                str(k),
            ],
            check=True,
            capture_output=True,
            timeout=600,
        )
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "runs": runs}


def load(url: str, queries: list[str], k: int, clients: int, requests_total: int) -> dict:
    """C threads share a bounded budget of GET /api/search requests."""
    import requests

    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests_total))

    def client(c: int) -> None:
        with requests.Session() as s:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                q = queries[(i * 7 + c) % len(queries)]
                t = time.perf_counter()
                try:
                    r = s.get(f"{url}/api/search", params={"q": q, "k": k}, timeout=60)
                    ok = r.status_code == 200 and len(r.json()["results"]) == k
                    if not ok:
                        errors.append(f"{r.status_code}: {r.text[:200]}")
                except requests.RequestException as e:
                    errors.append(repr(e))
                    continue
                with lock:
                    lat.append(time.perf_counter() - t)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "clients": clients,
        "requests": requests_total,
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
        "rps": len(lat) / wall,
        "p50_ms": 1e3 * _pct(lat, 50),
        "p99_ms": 1e3 * _pct(lat, 99),
    }


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(
    rows_list: list[int] = (100_000, 1_000_000),
    dim: int = 384,
    clients: int = 8,
    requests_total: int = 400,
    k: int = 10,
    replicas: int = 1,
    cpus_per_replica: float = 1.0,
    work: Path | None = None,
    without_ray: bool = False,
) -> list[dict]:
    """One result dict per row count (see the module docstring). without_ray: the same FastAPI
    app under uvicorn in this process (devise.serve.local_app), to tell the Serve proxy's cost
    from the app's, or where Ray cannot start."""
    import ray
    from ray import serve

    from devise.config import ServiceConfig
    from devise.serve import serve_locally, start

    work = Path(work or tempfile.mkdtemp(prefix="devise-serve-bench-"))
    os.environ.setdefault("DEVISE_HOME", str(work / "home"))
    out = []
    started_ray = not without_ray and not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    try:
        for rows in rows_list:
            t = time.perf_counter()
            emb, words = make_folder(work / f"rows{rows}", rows, dim)
            build_s = time.perf_counter() - t
            queries = words[:200]
            res = {"rows": rows, "dim": dim, "k": k, "build_s": round(build_s, 1)}
            res["in_process"] = in_process(emb, queries, k)
            res["cold_cli"] = cold_cli(emb, queries[0], k)
            t = time.perf_counter()
            config = ServiceConfig(embeddings=str(emb), poll_s=60.0)
            with ExitStack() as service:
                if without_ray:
                    url = service.enter_context(serve_locally(config))
                else:
                    url = start(config, "127.0.0.1", _free_port(), replicas, cpus_per_replica)
                    service.callback(serve.shutdown)
                res["server"] = (
                    "uvicorn, no Ray" if without_ray else f"Ray Serve, {replicas} replica(s)"
                )
                res["service_start_s"] = time.perf_counter() - t
                load(url, queries, k, 1, 20)  # warm: word table loaded, connections made
                res["service"] = load(url, queries, k, clients, requests_total)
                res["service_sequential"] = load(url, queries, k, 1, min(100, requests_total))
            res["p50_ratio"] = res["service"]["p50_ms"] / res["in_process"]["p50_ms"]
            print(json.dumps(res), flush=True)
            out.append(res)
    finally:
        if started_ray:
            ray.shutdown()
    return out


def table(results: list[dict]) -> str:
    lines = [
        (
            "| rows | server | in-process p50 | service, 1 client: p50 | service, C clients: "
            "req/s | p50 | p99 | errors | C-client p50 over in-process p50 | cold CLI |"
        ),
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in results:
        s, q = r["service"], r["service_sequential"]
        ratio = s["p50_ms"] / r["in_process"]["p50_ms"]
        lines.append(
            f"| {r['rows']:,} | {r['server']} | {r['in_process']['p50_ms']:.1f} ms | "
            f"{q['p50_ms']:.1f} ms | {s['rps']:.0f} | {s['p50_ms']:.1f} ms | "
            f"{s['p99_ms']:.1f} ms | {s['errors']} of {s['requests']} | {ratio:.2f}x as long "
            f"({s['clients']} clients) | {r['cold_cli']['median_s']:.2f} s |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="100000,1000000", help="comma list of row counts")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=400, help="requests per load run (bounded)")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--without-ray", action="store_true", help="the app under uvicorn, no Serve")
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args(argv)
    results = run(
        [int(n) for n in args.rows.split(",")],
        args.dim,
        args.clients,
        args.requests,
        replicas=args.replicas,
        cpus_per_replica=args.cpus_per_replica,
        without_ray=args.without_ray,
    )
    print(table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
