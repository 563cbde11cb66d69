"""One heavy client against four light ones: does one client's work hold the others' up?

A synthetic embeddings folder (bench/serve_bench.make_folder: unit rows near the words of a word
table, so every query is an already-encoded one) served by `devise serve`'s app on a local Ray
Serve bound to 127.0.0.1 (or under uvicorn, --without-ray). Two runs of the same bounded load:
- light only: 4 clients, each a bounded loop of GET /api/search?q=WORD&k=10;
- light + heavy: the same, while 1 more client loops over heavy requests: 8,000 q in one
  search, the largest search a request may ask (MAX_QUERIES x k), a 50-megapixel PNG upload
  (over the per-upload pixel budget) and a 36-megapixel one (decoded, then refused: the folder
  has no image model).
Reported: the light clients' p50/p99 in both runs, the p99 ratio (the target: at most 3x), the
heavy requests' answers by status code, and the count of 5xx answers (the target: 0).

    python bench/serve_fairness.py [--rows 100000] [--light-requests 300] [--heavy-requests 24]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from serve_bench import _free_port, _pct, _uvicorn, make_folder

LIGHT_CLIENTS = 4


def _png(width: int, height: int) -> bytes:
    """A one-colour PNG: many pixels, few bytes (under the upload byte limit)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (width, height), 200).save(buf, format="PNG")
    return buf.getvalue()


def light_load(url: str, words: list[str], per_client: int, stop_heavy: threading.Event) -> dict:
    """LIGHT_CLIENTS threads, each per_client searches of one known word (k=10)."""
    import requests

    lat: list[float] = []
    codes: Counter = Counter()
    lock = threading.Lock()

    def client(c: int) -> None:
        with requests.Session() as s:
            for i in range(per_client):
                q = words[(i * 7 + c) % len(words)]
                t = time.perf_counter()
                try:
                    r = s.get(f"{url}/api/search", params={"q": q, "k": 10}, timeout=120)
                    code = r.status_code
                except requests.RequestException:
                    code = -1
                dt = time.perf_counter() - t
                with lock:
                    codes[code] += 1
                    if code == 200:
                        lat.append(dt)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(LIGHT_CLIENTS)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    stop_heavy.set()
    return {
        "clients": LIGHT_CLIENTS,
        "requests": LIGHT_CLIENTS * per_client,
        "status": {str(k): v for k, v in sorted(codes.items())},
        "rps": len(lat) / wall,
        "p50_ms": 1e3 * _pct(lat, 50),
        "p99_ms": 1e3 * _pct(lat, 99),
        "max_ms": 1e3 * max(lat) if lat else float("nan"),
    }


def heavy_load(url: str, words: list[str], budget: int, stop: threading.Event, out: dict) -> None:
    """One client cycling through the heavy requests, at most `budget` of them, until stop."""
    import requests

    from devise.webapp import MAX_QUERIES, MAX_RESULTS

    big, large = _png(7100, 7100), _png(6000, 6000)  # 50.4 and 36 megapixels
    k_max = MAX_RESULTS // MAX_QUERIES
    kinds = [
        ("search, 8000 q", lambda s: s.get(f"{url}/api/search", params={"q": words[:8000]})),
        (
            f"search, {MAX_QUERIES} q x k={k_max}",
            lambda s: s.get(
                f"{url}/api/search", params={"q": words[:MAX_QUERIES], "k": k_max}, timeout=120
            ),
        ),
        (
            "upload, 50 MP PNG",
            lambda s: s.post(f"{url}/api/search/image", files={"file": ("a.png", big)}),
        ),
        (
            "upload, 36 MP PNG",
            lambda s: s.post(f"{url}/api/search/image", files={"file": ("b.png", large)}),
        ),
    ]
    codes: dict[str, Counter] = {name: Counter() for name, _ in kinds}
    lat: dict[str, list] = {name: [] for name, _ in kinds}
    sent = 0
    with requests.Session() as s:
        while sent < budget and not stop.is_set():
            name, send = kinds[sent % len(kinds)]
            t = time.perf_counter()
            try:
                code = send(s).status_code
            except requests.RequestException:
                code = -1
            codes[name][code] += 1
            lat[name].append(time.perf_counter() - t)
            sent += 1
    out.update(
        {
            name: {
                "status": {str(k): v for k, v in sorted(codes[name].items())},
                "p50_ms": 1e3 * _pct(lat[name], 50),
            }
            for name, _ in kinds
        }
    )
    out["sent"] = sent


def run(
    rows: int = 100_000,
    dim: int = 384,
    light_requests: int = 300,
    heavy_requests: int = 24,
    without_ray: bool = False,
    work: Path | None = None,
) -> dict:
    """Both runs against one service; see the module docstring."""
    from devise.config import ServiceConfig
    from devise.serve import start

    work = Path(work or tempfile.mkdtemp(prefix="devise-serve-fairness-"))
    os.environ.setdefault("DEVISE_HOME", str(work / "home"))
    emb, words = make_folder(work / "data", rows, dim)
    words = (words * (8000 // len(words) + 1))[:8000]
    config = ServiceConfig(embeddings=str(emb), poll_s=60.0)
    ray = None
    if without_ray:
        url, stop_service = _uvicorn(config)
    else:
        import ray
        from ray import serve

        ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
        url = start(config, "127.0.0.1", _free_port(), replicas=1, cpus_per_replica=1.0)
        stop_service = serve.shutdown
    try:
        per_client = max(1, light_requests // LIGHT_CLIENTS)
        light_load(url, words, 10, threading.Event())  # warm: connections, word table
        alone = light_load(url, words, per_client, threading.Event())
        heavy: dict = {}
        stop = threading.Event()
        heavy_thread = threading.Thread(
            target=heavy_load, args=(url, words, heavy_requests, stop, heavy)
        )
        heavy_thread.start()
        time.sleep(0.5)  # the heavy client is under way before the light ones start
        together = light_load(url, words, per_client, stop)
        heavy_thread.join()
    finally:
        stop_service()
        if ray is not None:
            ray.shutdown()
    fivexx = sum(
        v
        for part in (alone, together, *[h for h in heavy.values() if isinstance(h, dict)])
        for k, v in part["status"].items()
        if k.startswith("5") or k == "-1"
    )
    return {
        "rows": rows,
        "dim": dim,
        "server": "uvicorn, no Ray" if without_ray else "Ray Serve, 1 replica (1 CPU)",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "light_alone": alone,
        "light_with_heavy": together,
        "heavy": heavy,
        "p99_ratio": together["p99_ms"] / alone["p99_ms"],
        "errors_5xx": fivexx,
    }


def summary(r: dict) -> str:
    a, t = r["light_alone"], r["light_with_heavy"]
    verdict = "within" if r["p99_ratio"] <= 3 else "over"
    lines = [
        f"{r['rows']:,} rows x {r['dim']}, {r['server']}, {r['machine']}",
        (
            f"light clients alone:      p50 {a['p50_ms']:.1f} ms, p99 {a['p99_ms']:.1f} ms "
            f"({a['requests']} requests, status {a['status']})"
        ),
        (
            f"light beside the heavy:   p50 {t['p50_ms']:.1f} ms, p99 {t['p99_ms']:.1f} ms "
            f"({t['requests']} requests, status {t['status']})"
        ),
        (
            f"p99 with the heavy client is {r['p99_ratio']:.2f}x the p99 without it "
            f"({verdict} the 3x target); 5xx answers: {r['errors_5xx']}"
        ),
    ]
    for name, h in r["heavy"].items():
        if isinstance(h, dict):
            lines.append(f"heavy {name}: status {h['status']}, p50 {h['p50_ms']:.0f} ms")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--light-requests", type=int, default=300, help="per run, all light clients")
    p.add_argument("--heavy-requests", type=int, default=24, help="at most, heavy client")
    p.add_argument("--without-ray", action="store_true", help="the app under uvicorn, no Serve")
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args(argv)
    r = run(args.rows, args.dim, args.light_requests, args.heavy_requests, args.without_ray)
    print(summary(r))
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
