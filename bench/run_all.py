"""`make bench`: every hot path against the notebook's way and the hardware limit, in one run.

Writes bench/results/<date>.json and prints one markdown table. Ratios matter, not seconds: the
machines are noisy, so each row's numbers come from the same run on the same data.

    python bench/run_all.py [--quick] [--vec-rows 2000000] [--per-class 300]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import cli_start
import embed_search
import serve_bench
import text_encode
import train_epoch
import vectors_load


def _images(per_class: int) -> list[str]:
    from devise.assets import fashion_mnist_tree
    from devise.images import is_image_path

    tree = fashion_mnist_tree(per_class=per_class)
    return sorted(str(p) for p in tree.rglob("*") if is_image_path(p.name))


def raw_forward_ips(
    model_dir: Path, images: np.ndarray, batch: int, seconds: float = 10, threads: int | None = None
) -> float:
    """Backbone + head on images already decoded and resized in memory, in this process."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    from devise.backbones import load_backbone
    from devise.model import load_model

    head = load_model(model_dir)
    backbone = load_backbone(head.spec.backbone, head.spec.backbone_weights)
    x = torch.from_numpy(images)
    done, start = 0, time.perf_counter()
    with torch.inference_mode():
        while time.perf_counter() - start < seconds or done < len(x):
            i = done % len(x)
            head(backbone(x[i : i + batch]))
            done += len(x[i : i + batch])
    return done / (time.perf_counter() - start)


def _raw_worker(args) -> float:
    return raw_forward_ips(*args)


def ceiling_ips(model_dir: Path, images: np.ndarray, batch: int, seconds: float = 5) -> dict:
    """The ceiling: the best raw forward this machine gives, as one process using every core, or
    as one single-threaded process per core (on few cores, separate processes scale better than
    one process's intra-op threads)."""
    import multiprocessing as mp
    import os

    cores = os.cpu_count() or 1
    one = raw_forward_ips(model_dir, images, batch, seconds, threads=cores)
    with mp.get_context("spawn").Pool(cores) as pool:
        per = pool.map(_raw_worker, [(model_dir, images, batch, seconds, 1)] * cores)
    return {"one_process": one, "process_per_core": float(sum(per)), "best": max(one, sum(per))}


def run_embedding(per_class: int, image_size: int, batch: int, workers: int, cpus: float,
                  decode_cpus: float, threads: int | None, work: Path) -> dict:  # fmt: skip
    """images/s: the embed job through Ray Data (end to end, and steady state after the first
    batch), the notebook's DataLoader loop, and the raw forward ceiling, on the same files."""
    import ray

    from devise.embed import EmbedConfig, embed
    from devise.pipeline import PipelineConfig, decode_batch, run_images
    from devise.runtime import init_ray

    paths = _images(per_class)
    model = embed_search._random_head(work / "model", "efficientnet_lite0", image_size)
    decoded = decode_batch({"path": np.array(paths)}, "efficientnet_lite0", image_size)["image"]
    # This machine's speed drifts by tens of percent within minutes: measure the ceiling right
    # before and right after the pipeline and compare against their mean.
    ceiling_before = ceiling_ips(model, decoded, batch)

    t0 = time.perf_counter()
    embed_search.notebook_embed(paths, model, batch)
    notebook = len(paths) / (time.perf_counter() - t0)

    init_ray()
    config = PipelineConfig(
        backbone="efficientnet_lite0", image_size=image_size, head_dir=str(model),
        batch_size=batch, num_workers=workers, cpus_per_worker=cpus, decode_cpus=decode_cpus,
        torch_threads=threads,
    )  # fmt: skip
    import pandas as pd

    # Warm-up: the first Ray Data run of a session starts worker processes (imports of torch).
    for _ in run_images(pd.DataFrame({"path": paths[:batch]}), config):
        pass
    t0 = time.perf_counter()
    first_at, first_rows, rows = None, 0, 0
    for out in run_images(pd.DataFrame({"path": paths}), config):
        rows += len(out["path"])
        if first_at is None:
            first_at, first_rows = time.perf_counter(), rows
    end = time.perf_counter()
    steady = (rows - first_rows) / max(end - first_at, 1e-9)
    pipeline_e2e = rows / (end - t0)
    ceiling_after = ceiling_ips(model, decoded, batch)
    ceiling = (ceiling_before["best"] + ceiling_after["best"]) / 2

    result = embed(
        EmbedConfig(
            model_dir=str(model), out=str(work / "emb"), images=str(Path(paths[0]).parents[1]),
            batch_size=batch, num_workers=workers, cpus_per_worker=cpus,
            decode_cpus=decode_cpus, torch_threads=threads,
        )
    )  # fmt: skip
    ray.shutdown()
    return {
        "images": len(paths),
        "image_size": image_size,
        "ceiling_ips": ceiling,
        "ceiling_before_after_ips": [ceiling_before, ceiling_after],
        "notebook_ips": notebook,
        "pipeline_steady_ips": steady,
        "pipeline_e2e_ips": pipeline_e2e,
        "job_e2e_ips": result.rows / result.seconds,
        "job_rows": result.rows,
    }


def table(r: dict) -> str:
    rows = [("measurement", "ours", "notebook's way", "notebook / ours", "limit", "ours / limit")]
    v = r.get("vectors")
    if v:
        what = f"word vectors {v['rows']:,} x {v['dim']} .vec"
        rows.append((f"{what}: first load (s)", f"{v['ours_first_load_s']:.2f}",
                     f"{v['notebook_load_s']:.2f}", f"{v['ratio_notebook_over_first']:.1f}x",
                     "", ""))  # fmt: skip
        rows.append((f"{what}: cached load (s)", f"{v['ours_cached_load_s']:.3f}",
                     f"{v['notebook_load_s']:.2f}", f"{v['ratio_notebook_over_cached']:.0f}x",
                     "", ""))  # fmt: skip
    e = r.get("embedding")
    if e:
        what = f"embed {e['images']:,} images, lite0@{e['image_size']} + head (images/s)"
        ceil = e["ceiling_ips"]
        rows.append((f"{what}: Ray Data steady state", f"{e['pipeline_steady_ips']:.0f}",
                     f"{e['notebook_ips']:.0f}",
                     f"{e['notebook_ips'] / e['pipeline_steady_ips']:.2f}x",
                     f"{ceil:.0f} (best raw forward)", f"{100 * e['pipeline_steady_ips'] / ceil:.0f}%"))  # fmt: skip
        rows.append((f"{what}: Ray Data incl. actor start", f"{e['pipeline_e2e_ips']:.0f}",
                     f"{e['notebook_ips']:.0f}", f"{e['notebook_ips'] / e['pipeline_e2e_ips']:.2f}x",
                     f"{ceil:.0f}", f"{100 * e['pipeline_e2e_ips'] / ceil:.0f}%"))  # fmt: skip
        rows.append((f"{what}: embed job incl. parquet commit", f"{e['job_e2e_ips']:.0f}",
                     f"{e['notebook_ips']:.0f}", f"{e['notebook_ips'] / e['job_e2e_ips']:.2f}x",
                     f"{ceil:.0f}", f"{100 * e['job_e2e_ips'] / ceil:.0f}%"))  # fmt: skip
    t = r.get("training")
    if t:
        c, o = t["modes"]["cached"], t["modes"]["online"]
        rows.append((f"head training, {t['images']} images, epoch after the first (s)",
                     f"{c['epoch_s']:.4f}", f"{o['epoch_s']:.3f}", f"{t['ratio']:.0f}x", "", ""))  # fmt: skip
    for s in r.get("search", []):
        what = f"search top-{s['k']} of {s['n']:,} x {s['dim']}, 1 query (ms)"
        rows.append((what, f"{s['ours_ms']:.1f}", f"{s['notebook_ms']:.1f}",
                     f"{s['notebook_ms'] / s['ours_ms']:.1f}x", f"{s['floor_ms']:.1f} (one matvec)",
                     f"{s['ours_ms'] / s['floor_ms']:.2f}x floor"))  # fmt: skip
        rows.append((what.replace("1 query", "batch of 16, per query"),
                     f"{s['ours_batch16_ms']:.2f}", f"{s['notebook_batch16_ms']:.1f}",
                     f"{s['notebook_batch16_ms'] / s['ours_batch16_ms']:.0f}x", "", ""))  # fmt: skip
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run in minutes")
    p.add_argument("--vec-rows", type=int, default=2_000_000)
    p.add_argument("--vec-dim", type=int, default=300)
    p.add_argument("--per-class", type=int, default=1000, help="Fashion-MNIST images per class")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--embed-workers", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=float, default=0.75)
    p.add_argument("--decode-cpus", type=float, default=0.5)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--search-rows", default="100000,1000000")
    p.add_argument(
        "--skip", default="", help="comma list of: cli,vectors,embedding,training,search,serve,text"
    )
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--keep", action="store_true", help="keep the generated files in the temp dir")
    args = p.parse_args(argv)
    if args.quick:
        args.vec_rows, args.per_class, args.search_rows = 100_000, 30, "100000"
    skip = set(filter(None, args.skip.split(",")))
    work = Path(tempfile.mkdtemp(prefix="devise-bench-"))
    results: dict = {"date": dt.datetime.now().isoformat(timespec="seconds"), "args": vars(args)}
    t_all = time.perf_counter()
    if "cli" not in skip:
        print("== CLI start-up (--help)", flush=True)
        results["cli_start"] = cli_start.run(runs=3)
        print(cli_start.table(results["cli_start"]), flush=True)
    if "vectors" not in skip:
        print("== word-vector load", flush=True)
        results["vectors"] = vectors_load.run(args.vec_rows, args.vec_dim, work / "vectors")
    if "embedding" not in skip:
        print("== embedding throughput", flush=True)
        results["embedding"] = run_embedding(
            args.per_class, args.image_size, args.batch_size, args.embed_workers,
            args.cpus_per_worker, args.decode_cpus, args.torch_threads, work,
        )  # fmt: skip
    if "training" not in skip:
        print("== head training per epoch", flush=True)
        results["training"] = train_epoch.run(
            per_class=max(30, args.per_class // 10), epochs=4, out=str(work / "train")
        )
    if "search" not in skip:
        print("== search", flush=True)
        results["search"] = [embed_search.run_search(int(n)) for n in args.search_rows.split(",")]
    if "serve" not in skip:
        results["serve"] = serve_bench.run([int(n) for n in args.search_rows.split(",")])
    if "text" not in skip:
        print("== query encoding", flush=True)
        results["text"] = text_encode.run(work / "text")
    results["seconds"] = round(time.perf_counter() - t_all, 1)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)  # the generated .vec alone is ~5 GB
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print()
    print(table(results))
    if results.get("text"):
        print("\n" + text_encode.table(results["text"]))
    print(f"\n{results['seconds']:.0f} s in all; numbers in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
