"""`make bench`: every hot path against the notebook's way and the hardware limit, in one run.

Writes bench/results/<start time>.json and prints one markdown table. Ratios matter, not
seconds: the machines are noisy, so each row's numbers come from the same run on the same data.

    python bench/run_all.py [--quick] [--vec-rows 2000000] [--per-class 300]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import cli_start
import embed_search
import engines_bench
import index_bench
import serve_bench
import text_encode
import train_epoch
import vectors_load
from report import Row, markdown


def _images(per_class: int) -> list[str]:
    from devise.assets import fashion_mnist_tree
    from devise.images import is_image_path

    tree = fashion_mnist_tree(per_class=per_class)
    return sorted(str(p) for p in tree.rglob("*") if is_image_path(p.name))


def raw_forward_ips(
    model_dir: Path, images: np.ndarray, batch: int, seconds: float = 10, threads: int | None = None
) -> float:
    """Backbone + head on images already decoded and resized in memory, in this process, prepared
    exactly as the pipeline's model actor prepares them (channels_last, inference mode)."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    from devise.backbones import load_backbone
    from devise.model import load_model
    from devise.pipeline import forward_images, prepare_for_inference

    cpu = torch.device("cpu")
    head = load_model(model_dir).eval()
    backbone = prepare_for_inference(
        load_backbone(head.spec.backbone, head.spec.backbone_weights), cpu
    )
    x = torch.from_numpy(images)
    done, start = 0, time.perf_counter()
    with torch.inference_mode():
        while time.perf_counter() - start < seconds or done < len(x):
            i = done % len(x)
            forward_images(backbone, head, x[i : i + batch])
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


def run_end_to_end(per_class: int, image_size: int, work: Path) -> dict:
    """Seconds from nothing loaded to embeddings on disk, on the same files: `devise embed`'s
    library call with default settings (executor start-up, decode, model, parquet commit)
    against the notebook's loop (model load, DataLoader loop, np.save), each at devise's
    default batch size. Python's own start and `import torch` are in neither."""
    from devise.assets import fashion_mnist_tree
    from devise.config import EmbedConfig
    from devise.embed import embed

    tree = fashion_mnist_tree(per_class=per_class)
    paths = _images(per_class)
    batch = EmbedConfig.batch_size
    model = embed_search._random_head(
        work / f"model-{image_size}", "efficientnet_lite0", image_size
    )
    out: dict = {"images": len(paths), "image_size": image_size, "batch": batch}

    def notebook() -> float:
        t0 = time.perf_counter()
        np.save(work / "notebook.npy", embed_search.notebook_embed(paths, model, batch))
        return time.perf_counter() - t0

    def devise() -> float:
        emb = work / f"emb-{image_size}-{per_class}"
        shutil.rmtree(emb, ignore_errors=True)
        t0 = time.perf_counter()
        result = embed(EmbedConfig(model_dir=str(model), out=str(emb), images=str(tree)))
        assert result.rows == len(paths), result
        return time.perf_counter() - t0

    # Alternate the two so a drift in this machine's speed hits both alike (N D D N; one pair
    # for a large set).
    out["notebook_s"], out["devise_s"] = [notebook()], [devise()]
    if len(paths) <= 2000:
        out["devise_s"].append(devise())
        out["notebook_s"].append(notebook())
    out["notebook_s_min"], out["devise_s_min"] = min(out["notebook_s"]), min(out["devise_s"])
    return out


def run_ray_pipeline(per_class: int, image_size: int, batch: int, workers: int, cpus: float,
                     decode_cpus: float, threads: int | None, work: Path) -> dict:  # fmt: skip
    """images/s of the Ray Data pipeline (3 runs: steady state after the first batch, and end
    to end incl. actor start), training's feature stage on the same pipeline, and the raw
    forward ceiling before and after, on the same files."""
    import pandas as pd
    import ray

    from devise.config import PipelineConfig, Resources
    from devise.features import extract_features
    from devise.pipeline import decode_batch, run_images
    from devise.runtime import init_ray

    paths = _images(per_class)
    model = embed_search._random_head(work / "model-ray", "efficientnet_lite0", image_size)
    decoded = decode_batch({"path": np.array(paths[:2048])}, "efficientnet_lite0", image_size)
    # This machine's speed drifts by tens of percent within minutes: measure the ceiling right
    # before and right after the pipeline and compare against their mean.
    ceiling_before = ceiling_ips(model, decoded["image"], batch)
    init_ray()
    config = PipelineConfig(
        backbone="efficientnet_lite0", image_size=image_size, head_dir=str(model),
        resources=Resources(workers, cpus, decode_cpus, batch_size=batch), torch_threads=threads,
    )  # fmt: skip
    # Warm-up: the first Ray Data run of a session starts worker processes (imports of torch).
    for _ in run_images(pd.DataFrame({"path": paths[:batch]}), config):
        pass
    steady, e2e = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        first_at, first_rows, rows = None, 0, 0
        for out in run_images(pd.DataFrame({"path": paths}), config):
            rows += len(out["path"])
            if first_at is None:
                first_at, first_rows = time.perf_counter(), rows
        end = time.perf_counter()
        steady.append((rows - first_rows) / max(end - first_at, 1e-9))
        e2e.append(rows / (end - t0))
    catalog = pd.DataFrame({"path": paths, "label": 0, "split": "train"})
    t0 = time.perf_counter()
    fs = extract_features(
        catalog, "efficientnet_lite0", image_size=image_size, cache_dir=work / "features",
        pipeline=PipelineConfig(resources=Resources(workers, cpus, decode_cpus, batch_size=batch),
                                torch_threads=threads),
    )  # fmt: skip
    features_ips = len(fs) / (time.perf_counter() - t0)
    ceiling_after = ceiling_ips(model, decoded["image"], batch)
    ray.shutdown()
    return {
        "images": len(paths),
        "image_size": image_size,
        "ceiling_ips": (ceiling_before["best"] + ceiling_after["best"]) / 2,
        "ceiling_before_after_ips": [ceiling_before, ceiling_after],
        "pipeline_steady_ips_runs": steady,
        "pipeline_steady_ips": statistics.median(steady),
        "pipeline_e2e_ips_runs": e2e,
        "pipeline_e2e_ips": statistics.median(e2e),
        "features_ips": features_ips,
    }


def rows(r: dict) -> list[Row]:
    """The bench table's rows from a results dict (sections that did not run are left out)."""
    out: list[Row] = []
    v = r.get("vectors")
    if v:
        what = f"word vectors {v['rows']:,} x {v['dim']} .vec"
        out.append(Row(f"{what}: first load", "s", v["ours_first_load_s"], v["notebook_load_s"]))
        out.append(Row(f"{what}: cached load", "s", v["ours_cached_load_s"], v["notebook_load_s"]))
    for e in r.get("end_to_end", []):
        what = (
            f"embed {e['images']:,} images, lite0@{e['image_size']} + head, end to end "
            f"(default settings, batch {e['batch']}, best of {len(e['devise_s'])})"
        )
        out.append(Row(what, "s", e["devise_s_min"], e["notebook_s_min"]))
    e = r.get("embedding")
    if e:
        what = f"Ray Data, {e['images']:,} images, lite0@{e['image_size']} + head"
        ceil = e["ceiling_ips"]
        note = "best raw forward"
        out.append(Row(f"{what}: steady state, median of 3", "images/s",
                       e["pipeline_steady_ips"], limit=ceil, limit_note=note))  # fmt: skip
        out.append(Row(f"{what}: incl. actor start, median of 3", "images/s",
                       e["pipeline_e2e_ips"], limit=ceil))  # fmt: skip
        stage = f"training's feature stage, {e['images']:,} images, lite0@{e['image_size']}"
        out.append(Row(f"{stage}, Ray Data", "images/s", e["features_ips"], limit=ceil))
    t = r.get("training")
    if t:
        c, o = t["modes"]["cached"], t["modes"]["online"]
        out.append(Row(f"head training, {t['images']} images, epoch after the first", "s",
                       c["epoch_s"], o["epoch_s"]))  # fmt: skip
    for s in r.get("search", []):
        what = f"search top-{s['k']} of {s['n']:,} x {s['dim']}"
        out.append(Row(f"{what}, 1 query", "ms", s["ours_ms"], s["notebook_ms"], s["floor_ms"],
                       "one matvec"))  # fmt: skip
        out.append(Row(f"{what}, batch of 16, per query", "ms", s["ours_batch16_ms"],
                       s["notebook_batch16_ms"]))  # fmt: skip
    # The approximate index against exact search over the same rows (the "notebook's way"
    # column is exact search here); recall and memory are in the row's name.
    for x in r.get("index", []):
        i, e = x["index"], x["exact"]
        what = (
            f"index {x['kind']} top-10 of {x['rows']:,} x {x['dim']} clustered, recall@10 "
            f"{i['recall_at_10']:.3f}, {i['bytes_per_vector']:.0f} B/vector (exact: "
            f"{e['bytes_per_vector']}), vs exact search"
        )
        out.append(Row(f"{what}, 1 query", "ms", i["ms_one"], e["ms_one"]))
        out.append(Row(f"{what}, batch of 16, per query", "ms", i["ms_per_query_batch16"],
                       e["ms_per_query_batch16"]))  # fmt: skip
    return out


def table(r: dict) -> str:
    return markdown(rows(r))


def _save(results: dict, out_dir: str) -> Path:
    """bench/results/<start time>.json: one file per run, never another run's."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.fromisoformat(results["date"])
    path = out / f"{started:%Y-%m-%dT%H%M}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run in minutes")
    p.add_argument("--vec-rows", type=int, default=2_000_000)
    p.add_argument("--vec-dim", type=int, default=300)
    p.add_argument("--per-class", type=int, default=1000, help="Fashion-MNIST images per class")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument(
        "--e2e",
        default="100:64,1000:64,100:224",
        help="end-to-end embed runs, comma list of PER_CLASS:IMAGE_SIZE",
    )
    p.add_argument(
        "--ray-per-class",
        type=int,
        default=None,
        help="images per class for the Ray Data runs (default: --per-class)",
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--embed-workers", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=float, default=0.75)
    p.add_argument("--decode-cpus", type=float, default=0.5)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--search-rows", default="100000,1000000")
    p.add_argument(
        "--index-rows",
        default="1000000,5000000",
        help="approximate index sizes (both: ~12 min on 2 cores, 10 GB of memory)",
    )
    p.add_argument(
        "--skip",
        default="",
        help="comma list of: cli,vectors,end_to_end,ray,embedding (both),training,search,"
        "serve,text,index,engines",
    )
    p.add_argument(
        "--engines-images",
        type=int,
        default=1000,
        help="images embedded at 64 and 224 px by each engine (bench/engines_bench.py)",
    )
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--keep", action="store_true", help="keep the generated files in the temp dir")
    args = p.parse_args(argv)
    if args.quick:
        args.vec_rows, args.per_class, args.search_rows = 100_000, 30, "100000"
        args.index_rows = "100000"
        args.e2e = "3:64,30:64,3:224"
        args.engines_images = 100
    skip = set(filter(None, args.skip.split(",")))
    work = Path(tempfile.mkdtemp(prefix="devise-bench-"))
    results: dict = {"date": dt.datetime.now().isoformat(timespec="seconds"), "args": vars(args)}
    t_all = time.perf_counter()
    if "engines" not in skip:
        print("== onnxruntime against torch, both towers (bench/engines_bench.py)", flush=True)
        rows = tuple(int(n) for n in args.search_rows.split(","))
        results["engines"] = engines_bench.run(work / "engines", args.engines_images, rows=rows)
        print(engines_bench.table(results["engines"]), flush=True)
        _save(results, args.out)
    if "cli" not in skip:
        print("== CLI start-up (--help)", flush=True)
        results["cli_start"] = cli_start.run(runs=3)
        print(cli_start.table(results["cli_start"]), flush=True)
    # Results are saved after every section, so a run cut short still leaves its numbers.
    if "embedding" in skip:
        skip |= {"end_to_end", "ray"}
    if "end_to_end" not in skip:
        print("== embedding end to end: devise embed vs the notebook's loop", flush=True)
        results["end_to_end"] = []
        sizes = [tuple(int(x) for x in item.split(":")) for item in args.e2e.split(",")]
        for per_class, size in sizes:
            results["end_to_end"].append(run_end_to_end(per_class, size, work))
            print(json.dumps(results["end_to_end"][-1]), flush=True)
            _save(results, args.out)
    if "ray" not in skip:
        print("== Ray Data pipeline against the raw forward ceiling", flush=True)
        results["embedding"] = run_ray_pipeline(
            args.ray_per_class or args.per_class, args.image_size, args.batch_size,
            args.embed_workers,
            args.cpus_per_worker, args.decode_cpus, args.torch_threads, work,
        )  # fmt: skip
        print(json.dumps(results["embedding"]), flush=True)
        _save(results, args.out)
    if "training" not in skip:
        print("== head training per epoch", flush=True)
        results["training"] = train_epoch.run(
            per_class=max(30, args.per_class // 10), epochs=4, out=str(work / "train")
        )
        _save(results, args.out)
    if "search" not in skip:
        print("== search", flush=True)
        results["search"] = [embed_search.run_search(int(n)) for n in args.search_rows.split(",")]
        _save(results, args.out)
    if "index" not in skip:
        print("== approximate index against exact search", flush=True)
        results["index"] = index_bench.run([int(float(n)) for n in args.index_rows.split(",")])
        _save(results, args.out)
    if "serve" not in skip:
        print("== search service under load", flush=True)
        results["serve"] = serve_bench.run([int(n) for n in args.search_rows.split(",")])
        _save(results, args.out)
    if "text" not in skip:
        print("== query encoding", flush=True)
        results["text"] = text_encode.run(work / "text")
    if "vectors" not in skip:
        print("== word-vector load", flush=True)
        results["vectors"] = vectors_load.run(args.vec_rows, args.vec_dim, work / "vectors")
    results["seconds"] = round(time.perf_counter() - t_all, 1)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)  # the generated .vec alone is ~5 GB
    path = _save(results, args.out)
    print()
    print(table(results))
    if results.get("serve"):
        print("\n" + serve_bench.table(results["serve"]))
    if results.get("text"):
        print("\n" + text_encode.table(results["text"]))
    if results.get("engines"):
        print("\n" + engines_bench.table(results["engines"]))
    print(f"\n{results['seconds']:.0f} s in all; numbers in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
