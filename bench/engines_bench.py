"""onnxruntime against torch for both towers, the way a user meets them, in one run:

- a never-seen phrase from a cold `devise search` (fresh process, fresh encoding cache): the
  onnxruntime + tokenizers path against sentence-transformers (DEVISE_TEXT_ENGINE=torch);
- warm query encoding, one phrase and a batch of 16 new phrases, in one process;
- embedding N images end to end (`devise embed`'s library call, local executor, Fashion-MNIST
  PNGs) at 64 and 224 px: --engine onnx, --engine torch, and the notebook's DataLoader loop;
- a cold `devise search` over R rows with and without an approximate index.

Every ratio says in words which side is faster. No asserts: it measures.

    python bench/engines_bench.py [--images 1000] [--rows 100000] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

SPACE_ID = "all-MiniLM-L6-v2@53aa5117"


def _env(home: Path, **extra: str) -> dict:
    """A fresh process's environment: DEVISE_HOME=home, and byte code cached (in a folder of the
    home) as an installed package has it, even where PYTHONDONTWRITEBYTECODE is set."""
    env = {**os.environ, "DEVISE_HOME": str(home), "PYTHONPATH": str(ROOT), **extra}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(home / "pycache")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


def _cli_seconds(args: list[str], env: dict) -> float:
    """Wall seconds of `python -m devise ARGS` in a fresh process (it must succeed)."""
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "devise", *args],
        env=env, cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"devise {' '.join(args)} failed: {out.stderr[-1500:]}")
    return seconds


def minilm_store(emb: Path, rows: int, seed: int = 0, chunk_rows: int = 4096) -> Path:
    """An embeddings folder of `rows` random unit 384-d rows in the MiniLM text space."""
    import pandas as pd

    from devise.store import Store

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, 384), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    table = pd.DataFrame({"path": [f"/img/{i}.jpg" for i in range(rows)], "label": "x"})
    Store.open(emb, create=True).write_version(
        table, x, model_id="bench", vectors="minilm", vectors_id=SPACE_ID, chunk_rows=chunk_rows
    )
    return emb


def run_cold_phrase(work: Path, runs: int = 2) -> dict:
    """A never-seen phrase from a cold CLI, new path (onnxruntime) and old (sentence-transformers),
    each run with an encoding cache that has never seen it; the one-time graph export apart."""
    from devise import assets
    from devise.engines import OnnxSentenceEncoder

    home = work / "home-text"
    emb = minilm_store(work / "emb-text", 1000)
    t0 = time.perf_counter()
    with _home(home):
        OnnxSentenceEncoder(
            assets.minilm_folder(), assets.ENCODER_SHA256, verify=assets.verify_minilm
        )
    export_s = time.perf_counter() - t0
    out: dict = {"export_s": export_s, "onnx_s": [], "torch_s": []}
    for engine in ("onnx", "torch"):  # byte code compiled once, as pip does on install
        args = ["search", f"warm-up {engine}", "--embeddings", str(emb), "-k", "5", "--json"]
        _cli_seconds(args, _env(home, DEVISE_TEXT_ENGINE=engine))
    for i in range(runs):  # alternate, so a drift in this machine's speed hits both alike
        for engine in ("torch", "onnx") if i % 2 else ("onnx", "torch"):
            phrase = f"striped summer dress {engine} {i} {time.time_ns()}"
            env = _env(home, DEVISE_TEXT_ENGINE=engine)
            args = ["search", phrase, "--embeddings", str(emb), "-k", "5", "--json"]
            out[f"{engine}_s"].append(_cli_seconds(args, env))
            print(f"  cold phrase, {engine}: {out[f'{engine}_s'][-1]:.2f} s", flush=True)
    return out


class _home:
    """DEVISE_HOME set to a folder for the duration of a with block."""

    def __init__(self, path: Path) -> None:
        self.path, self.old = path, None

    def __enter__(self):
        self.old = os.environ.get("DEVISE_HOME")
        os.environ["DEVISE_HOME"] = str(self.path)

    def __exit__(self, *exc) -> None:
        if self.old is None:
            os.environ.pop("DEVISE_HOME", None)
        else:
            os.environ["DEVISE_HOME"] = self.old


def run_warm_encode(work: Path, repeat: int = 15) -> dict:
    """Median seconds to encode 1 and 16 new phrases in a warm process, on each engine."""
    from devise import assets
    from devise.text import EncodingCache, SentenceEncoderSpace

    counter = iter(range(10**9))
    out = {}
    with _home(work / "home-text"):
        for engine in ("onnx", "torch"):
            space = SentenceEncoderSpace(
                assets.minilm_folder(),
                SPACE_ID,
                cache=EncodingCache(None),
                weights_sha256=assets.ENCODER_SHA256,
                engine=engine,
            )
            space.encode_uncached(["warm-up"])
            for n in (1, 16):
                times = []
                for _ in range(repeat):
                    texts = [f"a photo of item {next(counter)} in red" for _ in range(n)]
                    t0 = time.perf_counter()
                    space.encode_uncached(texts)
                    times.append(time.perf_counter() - t0)
                out[f"{engine}_{n}_ms"] = 1000 * statistics.median(times)
    return out


def run_embedding(work: Path, images: int, size: int) -> dict:
    """Seconds from nothing loaded to embeddings on disk for `images` Fashion-MNIST PNGs:
    `devise embed` (local executor) with --engine onnx and --engine torch, and the notebook's
    loop. The backbone graph is exported before (a one-time cost, timed apart)."""
    import embed_search

    from devise.assets import fashion_mnist_tree
    from devise.config import EmbedConfig, Resources
    from devise.embed import embed
    from devise.engines import OnnxBackbone
    from devise.images import is_image_path

    per_class = max(1, images // 10)
    tree = fashion_mnist_tree(per_class=per_class)
    paths = sorted(str(p) for p in tree.rglob("*") if is_image_path(p.name))
    model = embed_search._random_head(work / f"model-{size}", "efficientnet_lite0", size)
    t0 = time.perf_counter()
    OnnxBackbone("efficientnet_lite0", image_size=size)
    out: dict = {"images": len(paths), "image_size": size, "export_s": time.perf_counter() - t0}

    def devise(engine: str) -> float:
        emb = work / f"emb-{size}-{engine}"
        shutil.rmtree(emb, ignore_errors=True)
        t0 = time.perf_counter()
        r = embed(EmbedConfig(model_dir=str(model), out=str(emb), images=str(tree), resources=Resources(engine=engine),
                              executor="local"))  # fmt: skip
        assert r.rows == len(paths), r
        return time.perf_counter() - t0

    def notebook() -> float:
        t0 = time.perf_counter()
        np.save(work / "notebook.npy", embed_search.notebook_embed(paths, model, 64))
        return time.perf_counter() - t0

    out["onnx_s"] = devise("onnx")
    out["torch_s"] = devise("torch")
    out["notebook_s"] = notebook()
    print(f"  {len(paths)} images at {size} px: {json.dumps(out)}", flush=True)
    return out


def run_cold_search(work: Path, rows: int, kind: str = "ivf-pq") -> dict:
    """A cold `devise search` (fresh process, phrase already encoded, files in the page cache)
    over `rows` MiniLM rows, without and with an approximate index."""
    from devise import ann

    home = work / "home-text"
    emb = minilm_store(work / f"emb-{rows}", rows)
    env = _env(home)
    args = ["search", "shoe", "--embeddings", str(emb), "-k", "10", "--json"]
    _cli_seconds(args, env)  # encodes "shoe" into the cache; the files enter the page cache
    out: dict = {"rows": rows}
    out["exact_s"] = statistics.median(_cli_seconds(args, env) for _ in range(2))
    t0 = time.perf_counter()
    r = ann.build_index(emb, kind=kind, target_recall=0.95, local=True, queries=100)
    out.update(index_kind=r.kind, index_recall=r.recall, index_build_s=time.perf_counter() - t0)
    _cli_seconds(args, env)  # the index files into the page cache
    out["index_s"] = statistics.median(_cli_seconds(args, env) for _ in range(2))
    print(f"  cold search: {json.dumps(out)}", flush=True)
    return out


def ratio(new: float, old: float) -> str:
    """'5.2x faster' or '1.3x slower', new against old, for times (less is better)."""
    if new <= old:
        return f"new is {old / new:.1f}x faster"
    return f"new is {new / old:.1f}x slower"


def table(r: dict) -> str:
    """A markdown table of run()'s numbers: new beside old, and which is faster, in words."""
    lines = ["| measurement | new | old | ratio |", "| --- | ---: | ---: | --- |"]

    def row(what: str, new: float, old: float, unit: str, old_name: str) -> None:
        lines.append(f"| {what} | {new:.3g} {unit} | {old:.3g} {unit} ({old_name}) | "
                     f"{ratio(new, old)} than {old_name} |")  # fmt: skip

    c = r.get("cold_phrase")
    if c:
        new, old = statistics.median(c["onnx_s"]), statistics.median(c["torch_s"])
        row("cold `devise search` of a never-seen phrase", new, old, "s", "sentence-transformers")
    w = r.get("warm_encode")
    if w:
        for n in (1, 16):
            row(f"warm encode of {n} new phrase(s)", w[f"onnx_{n}_ms"], w[f"torch_{n}_ms"], "ms",
                "sentence-transformers")  # fmt: skip
    for e in r.get("embedding", []):
        what = f"embed {e['images']:,} images at {e['image_size']} px end to end"
        row(what, e["onnx_s"], e["torch_s"], "s", "--engine torch")
        row(what, e["onnx_s"], e["notebook_s"], "s", "the notebook's loop")
    for s in r.get("cold_search", []):
        row(f"cold `devise search` over {s['rows']:,} rows, {s['index_kind']} index vs exact",
            s["index_s"], s["exact_s"], "s", "exact, no index")  # fmt: skip
    return "\n".join(lines)


def run(
    work: Path, images: int = 1000, sizes=(64, 224), rows: tuple[int, ...] = (100_000,)
) -> dict:
    """Every measurement above; returns the numbers (seconds, milliseconds)."""
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {"date": dt.datetime.now().isoformat(timespec="seconds"), "cpus": os.cpu_count()}
    t0 = time.perf_counter()
    print("== cold phrase", flush=True)
    out["cold_phrase"] = run_cold_phrase(work)
    print("== warm encode", flush=True)
    out["warm_encode"] = run_warm_encode(work)
    print(f"  {json.dumps(out['warm_encode'])}", flush=True)
    print("== embedding end to end", flush=True)
    out["embedding"] = [run_embedding(work, images, size) for size in sizes]
    print("== cold search", flush=True)
    out["cold_search"] = [run_cold_search(work, n) for n in rows]
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000, help="images embedded at each size")
    p.add_argument("--sizes", default="64,224", help="image sizes, comma-separated")
    p.add_argument("--rows", default="100000", help="rows of the cold searches, comma-separated")
    p.add_argument("--json", dest="json_out", help="write the numbers here too")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="devise-engines-"))
    try:
        r = run(
            work,
            args.images,
            tuple(int(s) for s in args.sizes.split(",")),
            tuple(int(float(n)) for n in args.rows.split(",")),
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    r["args"] = vars(args)
    print()
    print(table(r))
    print(f"\n{r['seconds']:.0f} s in all")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(r, indent=1) + "\n")
        print(f"numbers in {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
